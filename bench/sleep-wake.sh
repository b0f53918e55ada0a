#!/usr/bin/env bash
# Cold vs wake, side by side, per sleep protocol: two mock models that cannot share the GPU,
# swapped a -> b -> a through the real supervisor; the last swap (b out, a in) is timed with
# `gpuswapctl activate a`. "cold": sleep off (b stops, a starts from nothing: --load-time);
# "wake": sleep on with the kind's own protocol (b sleeps, a wakes in its own process: the
# mock's wake takes --load-time / 20, its sleep --load-time / 40, as its defaults say).
# Protocols: vllm (sleep = true, level 1), sglang (--enable-weights-cpu-backup), tabbyapi
# (unload/load with the admin key), and the table form (vLLM's routes named by hand).
# Rounds interleave the cases. Prints each swap and the medians.
#   bench/sleep-wake.sh [LOAD_TIME=2s] [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
load_time=${1:-2s}
rounds=${2:-3}
cargo build -q -p gpuswap-supervisor -p gpuswap-ctl -p gpuswap-mock-backend
bin=$PWD/target/debug
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The model table of `name` on `port` for protocol $1 and case $2 (cold|wake).
model() { # protocol case name port
  local protocol=$1 case=$2 name=$3 port=$4 flavor=$1 args="" extra=""
  case $protocol in
    vllm)
      args='"--enable-sleep-mode"'
      extra='env = { VLLM_SERVER_DEV_MODE = "1" }'
      [ "$case" = wake ] && extra="$extra"$'\nsleep = true\nhost_memory = "1GiB"' ;;
    sglang)
      args='"--enable-memory-saver", "--enable-weights-cpu-backup"'
      [ "$case" = wake ] && extra=$'sleep = true\nhost_memory = "1GiB"' ;;
    tabbyapi)
      args='"--api-key", "k", "--admin-key", "k"'
      extra='api_key = "k"'
      [ "$case" = wake ] && extra="$extra"$'\nsleep = true' ;;
    table)
      flavor=vllm
      extra='env = { VLLM_SERVER_DEV_MODE = "1" }'
      [ "$case" = wake ] && extra="$extra"$'\nsleep = { enter = "POST /sleep?level=1", leave = "POST /wake_up", asleep = "GET /is_sleeping" }\nhost_memory = "1GiB"' ;;
  esac
  [ -n "$args" ] && args=", $args"
  cat <<EOF
[models.$name]
kind = "$flavor"
port = $port
gpus = [0]
command = ["$bin/gpuswap-mock-backend", "--flavor", "$flavor", "--port", "$port", "--model", "$name", "--load-time", "$load_time"$args]
$extra

EOF
}

run_case() { # protocol case; prints the seconds of the swap b -> a
  local dir=$work/$1-$2
  rm -rf "$dir"; mkdir -p "$dir"
  {
    printf '[supervisor]\nlisten = "unix://%s/s.sock"\nstate_file = "%s/state"\nmin_residency = "0s"\nhost_memory = "10GiB"\n\n' "$dir" "$dir"
    model "$1" "$2" a "$(free_port)"
    model "$1" "$2" b "$(free_port)"
  } >"$dir/config.toml"
  "$bin/gpuswap-supervisor" --config "$dir/config.toml" 2>"$dir/supervisor.log" &
  local sup=$!
  local ctl=("$bin/gpuswapctl" --endpoint "unix://$dir/s.sock")
  for _ in $(seq 1 300); do "${ctl[@]}" status >/dev/null 2>&1 && break; sleep 0.05; done
  "${ctl[@]}" activate a >/dev/null 2>&1
  "${ctl[@]}" activate b >/dev/null 2>&1
  local started ended
  started=$(date +%s.%N)
  "${ctl[@]}" activate a >/dev/null 2>&1
  ended=$(date +%s.%N)
  if [ "$2" = wake ] && ! "${ctl[@]}" status b | grep -q sleeping; then
    echo "$1: b is not sleeping after the swap" >&2; tail -20 "$dir/supervisor.log" >&2; exit 1
  fi
  kill -TERM "$sup"; wait "$sup" 2>/dev/null || true
  python3 -c "print(f\"{$ended - $started:.3f}\")"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
protocols=(vllm sglang tabbyapi table)
printf 'mock load time: %s; rounds: %d (cases interleaved)\n' "$load_time" "$rounds"
printf '%-6s %-9s %-5s %8s\n' round protocol case "swap s"
for round in $(seq 1 "$rounds"); do
  for protocol in "${protocols[@]}"; do
    for case in cold wake; do
      seconds=$(run_case "$protocol" "$case")
      echo "$seconds" >>"$work/results-$protocol-$case"
      printf '%-6s %-9s %-5s %8s\n' "$round" "$protocol" "$case" "$seconds"
    done
  done
done
for protocol in "${protocols[@]}"; do
  printf 'median %-9s cold %ss, wake %ss\n' "$protocol" \
    "$(median <"$work/results-$protocol-cold")" "$(median <"$work/results-$protocol-wake")"
done
