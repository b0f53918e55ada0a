#!/usr/bin/env bash
# gpuswap benchmarks against the backend alone, nginx and LiteLLM.
#
#   bench/run.sh            full run (~10 min of CPU): writes bench/RESULTS.md
#   bench/run.sh --quick    smoke run (~1-2 min), for CI: writes bench/out/RESULTS.md
#
# Other flags go to `gpuswap-loadgen suite` (see `--help`), e.g. `--rounds 5`,
# `--secs 20`, `--skip litellm`. Raw JSON: bench/out/results.json, bench/out/raw/;
# process logs: bench/out/logs/. Exits non-zero only when something fails to
# run, never for a missed target.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*" >&2; }

skip_litellm=false
for arg in "$@"; do
  case "$arg" in
    --skip=*litellm* ) skip_litellm=true ;;
  esac
done
# "--skip litellm" (two words) too.
prev=""
for arg in "$@"; do
  if [ "$prev" = "--skip" ] && [[ "$arg" == *litellm* ]]; then skip_litellm=true; fi
  prev="$arg"
done

# nginx: Debian's package; it is run in the foreground with its own config.
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  log "installing nginx"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq nginx >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# LiteLLM proxy in its own venv (bench/.venv, git-ignored).
LITELLM=bench/.venv/bin/litellm
if ! $skip_litellm && [ ! -x "$LITELLM" ]; then
  log "installing LiteLLM into bench/.venv (about a minute)"
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install -q 'litellm[proxy]'
fi

log "building release binaries"
cargo build --release -q -p gpuswap-gateway -p gpuswap-supervisor -p gpuswap-mock-backend -p gpuswap-loadgen

# 1,000 concurrent streams need a few thousand descriptors.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

reproduce="bench/run.sh${*:+ $*}"
exec target/release/gpuswap-loadgen suite --nginx "$NGINX" --litellm "$LITELLM" \
  --reproduce "$reproduce" "$@"
