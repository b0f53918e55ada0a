#!/usr/bin/env bash
# Builds gpuswap and runs supervisor + gateway on deploy/demo.toml (mock backends, no GPU).
# Then: curl localhost:8002/v1/models, and see the README for a swap. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bins --locked
export PATH="$PWD/target/debug:$PATH"
mkdir -p /tmp/gpuswap-demo
config=deploy/demo.toml

gpuswap-supervisor --config "$config" &
supervisor=$!
gateway=
cleanup() {
  trap - EXIT INT TERM
  [ -n "$gateway" ] && kill -TERM "$gateway" 2>/dev/null
  # The supervisor stops every backend (and their process trees) before it exits.
  kill -TERM "$supervisor" 2>/dev/null
  wait 2>/dev/null
  echo "demo stopped; no backend left running"
}
trap cleanup EXIT INT TERM

for _ in $(seq 1 200); do
  gpuswapctl --endpoint unix:///tmp/gpuswap-demo/supervisor.sock status >/dev/null 2>&1 && break
  kill -0 "$supervisor" 2>/dev/null || { echo "supervisor failed to start" >&2; exit 1; }
  sleep 0.1
done
gpuswap-gateway --config "$config" &
gateway=$!

cat <<'MSG'

gpuswap demo is up: OpenAI API on http://127.0.0.1:8002/v1 (four mock models).
  curl -s localhost:8002/v1/models | python3 -m json.tool
  curl -sN localhost:8002/v1/chat/completions -H 'content-type: application/json' \
       -d '{"model":"llama-sglang","stream":true,"messages":[{"role":"user","content":"hi"}]}'
  target/debug/gpuswapctl --endpoint unix:///tmp/gpuswap-demo/supervisor.sock status
  target/debug/gpuswapctl --endpoint unix:///tmp/gpuswap-demo/supervisor.sock logs -f
Ctrl-C stops everything.
MSG
wait
