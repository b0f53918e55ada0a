#!/usr/bin/env bash
# Cold vs warmed weights, side by side: the same swap (old -> new, the old model taking 2 s to
# stop) through the real supervisor, with the new model's mock reading a weights file as its
# load. "cold": the file is dropped from the page cache before each swap and the model has no
# `weights` key; "warmed": the same, with `weights` naming the file, so the supervisor reads it
# into the page cache while the old model stops. Rounds interleave the two. Prints the load's
# read time (the mock's "Read N bytes of weights in S s") and the swap time per round, and the
# medians.
#   bench/warm-weights.sh [SIZE_MiB=1024] [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
rounds=${2:-3}
cargo build -q -p gpuswap-supervisor -p gpuswap-ctl -p gpuswap-mock-backend  # reading is I/O: a debug build measures it as well
bin=$PWD/target/debug
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
weights=$work/model-00001-of-00001.safetensors
head -c $((size_mib << 20)) /dev/urandom >"$weights"

drop_cache() {
  python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$1"
}

run_case() { # $1 = cold|warmed; prints "read_seconds swap_seconds"
  local dir=$work/$1 port_old port_new
  rm -rf "$dir"; mkdir -p "$dir"
  port_old=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  port_new=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  local weights_line=""
  [ "$1" = warmed ] && weights_line="weights = [\"$work/*.safetensors\"]"
  cat >"$dir/config.toml" <<EOF
[supervisor]
listen = "unix://$dir/s.sock"
state_file = "$dir/state"
min_residency = "0s"

[models.old]
kind = "vllm"
port = $port_old
gpus = [0]
command = ["$bin/gpuswap-mock-backend", "--flavor", "vllm", "--port", "$port_old", "--model", "old", "--load-time", "100ms", "--stop-delay", "2s"]

[models.new]
kind = "vllm"
port = $port_new
gpus = [0]
command = ["$bin/gpuswap-mock-backend", "--flavor", "vllm", "--port", "$port_new", "--model", "new", "--load-time", "100ms", "--load-file", "$weights"]
$weights_line
EOF
  "$bin/gpuswap-supervisor" --config "$dir/config.toml" 2>"$dir/supervisor.log" &
  local sup=$!
  local ctl=("$bin/gpuswapctl" --endpoint "unix://$dir/s.sock")
  for _ in $(seq 1 300); do "${ctl[@]}" status >/dev/null 2>&1 && break; sleep 0.05; done
  "${ctl[@]}" activate old >/dev/null 2>&1
  drop_cache "$weights"
  local started ended
  started=$(date +%s.%N)
  "${ctl[@]}" activate new >/dev/null 2>&1
  ended=$(date +%s.%N)
  local read
  read=$("${ctl[@]}" logs new -n 1000 | sed -n 's/.*Read [0-9]* bytes of weights in \([0-9.]*\) s.*/\1/p' | tail -n 1)
  kill -TERM "$sup"; wait "$sup" 2>/dev/null || true
  echo "$read $(python3 -c "print(f\"{$ended - $started:.3f}\")")"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf 'weights file: %d MiB; rounds: %d (cold and warmed interleaved)\n' "$size_mib" "$rounds"
printf '%-6s %-7s %12s %12s\n' round case "load read s" "swap s"
: >"$work/results-cold"; : >"$work/results-warmed"
for round in $(seq 1 "$rounds"); do
  for case in cold warmed; do
    result=$(run_case "$case")
    echo "$result" >>"$work/results-$case"
    printf '%-6s %-7s %12s %12s\n' "$round" "$case" $result
  done
done
for case in cold warmed; do
  printf 'median %-7s load read %ss, swap %ss\n' "$case" \
    "$(cut -d" " -f1 "$work/results-$case" | median)" "$(cut -d" " -f2 "$work/results-$case" | median)"
done
