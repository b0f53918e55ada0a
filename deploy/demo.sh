#!/usr/bin/env bash
# Builds gpuswap and runs supervisor + gateway on deploy/demo.toml (mock backends, no GPU).
# Then: curl localhost:8002/v1/models, and see the README for a swap. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'USAGE'
Usage: deploy/demo.sh [--smoke] [--config FILE] [--no-build]

Builds gpuswap (cargo build --bins) and runs the supervisor and the gateway on the built-in demo
(deploy/demo.toml: four mock backends that behave like SGLang, TabbyAPI and vLLM; no GPU needed).
Ctrl-C stops everything and leaves no process behind.

  --smoke        run the demo unattended and check it, then stop: build, start both daemons,
                 list the models (GET /v1/models), one streaming chat for a model that is not
                 loaded and one for the model it must swap with (a swap), then Ctrl-C (SIGINT)
                 and check that no supervisor, gateway or backend process is left. Exits
                 non-zero on any failure. CI runs it first on a fresh clone.
  --config FILE  another configuration (the demo's test moves ports and paths to free ones)
  --no-build     use the binaries already built (target/debug, or $GPUSWAP_BIN_DIR)
  -h, --help     this text
USAGE
}

smoke=false build=true config=deploy/demo.toml
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=true ;;
    --config) config=${2:?--config needs a file}; shift ;;
    --no-build) build=false ;;
    -h|--help) usage; exit 0 ;;
    *) echo "demo.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if $build; then
  cargo build --bins --locked
fi
bin_dir=${GPUSWAP_BIN_DIR:-$PWD/target/debug}
for b in gpuswap-supervisor gpuswap-gateway gpuswapctl gpuswap-mock-backend; do
  [ -x "$bin_dir/$b" ] || { echo "demo.sh: $bin_dir/$b is not built" >&2; exit 1; }
done
export PATH="$bin_dir:$PATH"

# The socket, state file and gateway address come from the configuration.
setting() { sed -n "/^\[$1\]/,/^\[/s/^$2 *= *\"\(.*\)\".*/\1/p" "$config" | head -n 1; }
socket=$(setting supervisor listen)
gateway_addr=${GPUSWAP__GATEWAY__LISTEN:-$(setting gateway listen)}
mkdir -p "$(dirname "${socket#unix://}")"

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

ctl() { gpuswapctl --endpoint "$socket" "$@"; }
for _ in $(seq 1 600); do
  ctl status >/dev/null 2>&1 && break
  kill -0 "$supervisor" 2>/dev/null || { echo "supervisor failed to start" >&2; exit 1; }
  sleep 0.1
done
gpuswap-gateway --config "$config" &
gateway=$!

if ! $smoke; then
  cat <<MSG

gpuswap demo is up: OpenAI API on http://$gateway_addr/v1 (four mock models).
  curl -s $gateway_addr/v1/models | python3 -m json.tool
  curl -sN $gateway_addr/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"model":"llama-sglang","stream":true,"messages":[{"role":"user","content":"hi"}]}'
  target/debug/gpuswapctl --endpoint $socket status
  target/debug/gpuswapctl --endpoint $socket logs -f
Ctrl-C stops everything.
MSG
  wait
  exit 0
fi

# --- smoke: the README's requests, then Ctrl-C, then nothing may be left -----------------------
fail() { echo "demo smoke: FAILED: $*" >&2; exit 1; }
base="http://$gateway_addr"
for _ in $(seq 1 600); do
  curl -sf -o /dev/null "$base/v1/models" && break
  kill -0 "$gateway" 2>/dev/null || fail "the gateway exited"
  sleep 0.1
done
models=$(curl -sf "$base/v1/models") || fail "GET /v1/models"
for m in qwen-sglang llama-sglang monstral-tabby phi-vllm; do
  grep -q "\"id\":\"$m\"" <<<"$models" || fail "/v1/models lacks $m: $models"
done
echo "demo smoke: /v1/models lists the four models"

chat() {
  curl -sN --max-time 120 "$base/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"$1\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
}
# llama-sglang starts cold; qwen-sglang shares its GPU and port, so it is a swap.
for m in llama-sglang qwen-sglang; do
  served=$(sed -n "/^\[models\.$m\]/,/^\[/s/^served_name *= *\"\(.*\)\"/\1/p" "$config")
  answer=$(chat "$m") || fail "chat with $m"
  grep -q '^data: \[DONE\]' <<<"$answer" || fail "the $m stream did not end with [DONE]: $answer"
  grep -q "served by $served" <<<"$answer" || fail "$m was not answered by $served: $answer"
  echo "demo smoke: a streaming chat with $m was answered by its backend ($served)"
done
status=$(ctl status) || fail "gpuswapctl status"
grep -q 'qwen-sglang' <<<"$status" || fail "gpuswapctl status: $status"

# Every process the supervisor started, before Ctrl-C.
descendants() {
  local children
  children=$(pgrep -P "$1" || true)
  for c in $children; do echo "$c"; descendants "$c"; done
}
tree=$(descendants "$supervisor")
[ -n "$tree" ] || fail "the supervisor runs no backend"

# Ctrl-C: the terminal sends SIGINT to both daemons at once.
trap - EXIT INT TERM
kill -INT "$supervisor" "$gateway"
wait "$supervisor" || fail "the supervisor exited with $? on SIGINT"
wait "$gateway" || fail "the gateway exited with $? on SIGINT"
left=()
for pid in $tree; do
  if kill -0 "$pid" 2>/dev/null; then left+=("$pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"); fi
done
[ ${#left[@]} -eq 0 ] || fail "processes left after Ctrl-C: ${left[*]}"
[ ! -e "${socket#unix://}" ] || fail "the supervisor left its socket ${socket#unix://}"
echo "demo smoke: OK (Ctrl-C left no supervisor, gateway or backend process)"
