#!/usr/bin/env bash
# Installs OpenWebUI (PyPI open-webui, pinned below) for the OpenWebUI test (e2e/tests/it/clients_openwebui.rs)
# into ~/.cache/gpuswap/open-webui-VERSION/venv (or $1) and prints the venv's path.
# Its install is large (torch, transformers, ...: a few GB) and slow, so it is cached per version
# and made by .ci/run before the tests rather than inside a timed test.
# Safe to run from many tests at once: a file lock makes one install and the others wait for it.
set -euo pipefail
version=0.12.4
venv=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/gpuswap/open-webui-$version/venv}
# Written last, so a venv whose install was interrupted is rebuilt rather than trusted.
stamp=$venv/.gpuswap-open-webui

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9

if ! { [ -x "$venv/bin/open-webui" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; }; then
  python3 -m venv --clear "$venv" >&2
  if ! "$venv/bin/python" -m pip install --quiet "open-webui==$version" >&2; then
    echo "make-venv.sh: pip could not install open-webui==$version into $venv;" \
         "the OpenWebUI test needs the PyPI registry (or a mirror set in pip's configuration)" >&2
    exit 1
  fi
  echo "$version" > "$stamp"
fi
echo "$venv"
