#!/usr/bin/env bash
# Creates the Python environment of the client tests once: the official openai and anthropic SDKs and grpcurl
# (e2e/python/requirements.txt). Usage: make-venv.sh [VENV_DIR] (default target/test-venv).
# Safe to run from many tests at once: a file lock makes one install and the others wait for it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-$here/../../target/test-venv}
requirements=$here/requirements.txt
# Written last, so a venv whose install was interrupted is rebuilt rather than trusted.
stamp=$venv/.gpuswap-requirements

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9

if [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$stamp"; then
  exit 0
fi
python3 -m venv --clear "$venv"
if ! "$venv/bin/python" -m pip install --quiet --requirement "$requirements"; then
  echo "make-venv.sh: pip could not install $requirements into $venv;" \
       "the client tests need the PyPI registry (or a mirror set in pip's configuration)" >&2
  exit 1
fi
cp "$requirements" "$stamp"
