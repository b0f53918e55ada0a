#!/usr/bin/env bash
# gpuswap benchmarks against the backend alone, nginx, LiteLLM and llama-server's router mode.
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
skip_router=false
quick=false
for arg in "$@"; do
  case "$arg" in
    --skip=*litellm* ) skip_litellm=true ;;
  esac
  case "$arg" in
    --skip=*router* | --load-only ) skip_router=true ;;
    --quick ) quick=true ;;
  esac
done
# "--skip litellm" (two words) too.
prev=""
for arg in "$@"; do
  if [ "$prev" = "--skip" ] && [[ "$arg" == *litellm* ]]; then skip_litellm=true; fi
  if [ "$prev" = "--skip" ] && [[ "$arg" == *router* ]]; then skip_router=true; fi
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

# llama-server's router mode, raced against gpuswap: llama.cpp is built (once per machine,
# cached) by e2e/real/setup.sh; the two GGUF models are made here, never committed: a few
# hundred MB each so that loading them is measurable (the smoke run makes small ones).
router_args=()
if ! $skip_router; then
  log "llama-server and the model tools (e2e/real/setup.sh; cached after the first run)"
  eval "$(e2e/real/setup.sh llama-server)"
  eval "$(e2e/real/setup.sh models)"
  if $quick; then
    size=(--hidden 512 --layers 4 --ffn 2048) models_dir=bench/out/router-models/small  # ~34 MB
  else
    size=(--hidden 1024 --layers 8 --ffn 4096) models_dir=bench/out/router-models/large # ~270 MB
  fi
  mkdir -p "$models_dir"
  for side in a b; do
    model=$models_dir/$side.gguf
    if [ ! -f "$model" ]; then
      log "making $model"
      seed=$([ $side = a ] && echo 1 || echo 2)
      "$GPUSWAP_REAL_MODEL_TOOLS_PYTHON" e2e/real/make_models.py gguf "$model" \
        "${size[@]}" --head-dim 64 --f16 --seed "$seed" >&2
    fi
  done
  router_args=(--llama-server "$GPUSWAP_REAL_LLAMA_SERVER"
    --router-models "$models_dir/a.gguf,$models_dir/b.gguf")
fi

log "building release binaries"
cargo build --release -q -p gpuswap-gateway -p gpuswap-supervisor -p gpuswap-mock-backend -p gpuswap-loadgen

# 1,000 concurrent streams need a few thousand descriptors.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

reproduce="bench/run.sh${*:+ $*}"
exec target/release/gpuswap-loadgen suite --nginx "$NGINX" --litellm "$LITELLM" \
  --reproduce "$reproduce" "${router_args[@]}" "$@"
