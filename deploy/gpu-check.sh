#!/usr/bin/env bash
# GPU check for a box with an NVIDIA GPU, PyTorch and nvidia-smi: gpuswap's supervisor swapping
# two backends that each really hold most of GPU 0's memory (deploy/gpu-check-backend.py).
#
#   deploy/gpu-check.sh            (BIN_DIR=target/release, PYTHON=python3, FRACTION=0.6)
#
# Proves the NVML path of a stop: each backend takes FRACTION (> 1/2) of the GPU's memory and
# exits 1 with "CUDA out of memory" when it cannot, so every swap A -> B -> A ... succeeds only
# if the supervisor starts the next backend after the last one's memory is released; a stop
# returns only once nvidia-smi shows the memory free; kill -9 of the supervisor frees it too.
# A control run with gpu_release_timeout = "0s" (no wait) shows what the wait prevents.
# Prints PASS/FAIL lines; exits 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN_DIR=${BIN_DIR:-target/release}
PYTHON=${PYTHON:-python3}
FRACTION=${FRACTION:-0.6}
SWAPS=${SWAPS:-4}
failed=0

say() { printf '%s\n' "$*"; }
pass() { say "PASS: $*"; }
fail() { say "FAIL: $*"; failed=1; }

for bin in gpuswap-supervisor gpuswapctl; do
  if [ ! -x "$BIN_DIR/$bin" ]; then
    if command -v cargo >/dev/null; then
      cargo build --release -q -p gpuswap-supervisor -p gpuswap-ctl || exit 1
    else
      say "$BIN_DIR/$bin is missing and there is no cargo to build it"; exit 2
    fi
  fi
done
command -v nvidia-smi >/dev/null || { say "nvidia-smi not found: not a GPU box"; exit 2; }
"$PYTHON" -c 'import torch; assert torch.cuda.is_available()' ||
  { say "PyTorch with CUDA is needed ($PYTHON)"; exit 2; }

work=$(mktemp -d /tmp/gpuswap-gpu-check.XXXXXX)
trap 'kill -9 $sup 2>/dev/null; rm -rf "$work"' EXIT
sock=$work/s.sock
ctl() { "$BIN_DIR/gpuswapctl" --endpoint "unix://$sock" "$@"; }
gpu_used_mib() { nvidia-smi -i 0 --query-gpu=memory.used --format=csv,noheader,nounits | tr -d ' '; }
gpu_apps() { nvidia-smi -i 0 --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | tr -d ' '; }
now_ms() { date +%s%3N; }

say "== $(nvidia-smi -i 0 --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
say "== torch $("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
say "== gpuswap $("$BIN_DIR/gpuswap-supervisor" --version 2>/dev/null)"
baseline=$(gpu_used_mib)
say "== GPU 0 memory used before: $baseline MiB; apps: $(gpu_apps | tr '\n' ' ')"

write_config() { # $1: gpu_release_timeout
  local port_a=$((20000 + RANDOM % 20000)) port_b=$((20000 + RANDOM % 20000 + 1))
  cat >"$work/gpuswap.toml" <<EOF
[supervisor]
listen = "unix://$sock"
state_file = "$work/state.json"
min_residency = "0s"
gpu_release_timeout = "$1"

[gateway]
supervisor = "unix://$sock"
EOF
  for m in a:$port_a b:$port_b; do
    cat >>"$work/gpuswap.toml" <<EOF

[models."hog-${m%%:*}"]
kind = "openai"
health_path = "/health"
command = ["$PYTHON", "deploy/gpu-check-backend.py", "--port", "${m#*:}", "--name", "hog-${m%%:*}", "--fraction", "$FRACTION"]
port = ${m#*:}
gpus = [0]
startup_timeout = "300s"
stop_timeout = "20s"
EOF
  done
}

start_supervisor() {
  rm -f "$sock"
  RUST_LOG=info "$BIN_DIR/gpuswap-supervisor" --config "$work/gpuswap.toml" >>"$work/supervisor.log" 2>&1 &
  sup=$!
  for _ in $(seq 100); do ctl status >/dev/null 2>&1 && return 0; sleep 0.1; done
  say "the supervisor did not answer"; tail -20 "$work/supervisor.log"; exit 1
}

# $1: label; swaps A B A B ... and reports each; returns the number of failed activations
swap_loop() {
  local bad=0 i model t0 t1 apps
  for i in $(seq "$SWAPS"); do
    model=hog-$([ $((i % 2)) = 1 ] && echo a || echo b)
    t0=$(now_ms)
    if out=$(ctl activate "$model" 2>&1); then
      t1=$(now_ms)
      apps=$(gpu_apps | tr '\n' ' ')
      say "$1: activate $model ok in $((t1 - t0)) ms; GPU 0 used $(gpu_used_mib) MiB; apps: $apps"
      # Informative only: in a container nvidia-smi may list no process (PID namespaces).
      [ "$(gpu_apps | grep -c .)" -le 1 ] || say "$1: more than one process on the GPU: $apps"
    else
      say "$1: activate $model FAILED after $(($(now_ms) - t0)) ms: $(printf '%s' "$out" | grep -m3 -iE 'out of memory|failed|exited' | tr '\n' ' ')"
      bad=$((bad + 1))
    fi
  done
  return $bad
}

# 1. Swaps with the release wait (the default gpu_release_timeout).
write_config 30s
start_supervisor
if swap_loop swap; then pass "$SWAPS swaps, each backend holding ${FRACTION} of the GPU: no out-of-memory, one process on the GPU at a time"; else fail "a swap failed (see above)"; fi
say "== gpuswapctl status (what Status says about the GPU):"
ctl status 2>&1 | sed 's/^/   /'
say "== the supervisor's lines about GPU memory:"
for m in hog-a hog-b; do ctl logs "$m" -n 400 2>&1 | grep -iE 'GPU memory|NVML|nvidia' | sed 's/^/   /'; done

# 2. A stop returns only when the memory is free.
t0=$(now_ms)
ctl deactivate --all >/dev/null 2>&1 || ctl deactivate hog-a >/dev/null 2>&1
t1=$(now_ms)
after=$(gpu_used_mib); apps=$(gpu_apps | tr '\n' ' ')
say "deactivate returned after $((t1 - t0)) ms; GPU 0 used $after MiB (before the check: $baseline MiB); apps: ${apps:-none}"
if [ $((after - baseline)) -lt 1024 ]; then
  pass "at the stop's return the memory is released (GPU 0 used within 1 GiB of the baseline)"
else
  fail "the stop returned while the GPU still held memory or a process"
fi

# 3. kill -9 of the supervisor with a backend holding the GPU.
ctl activate hog-a >/dev/null 2>&1 || fail "activate hog-a before the kill"
held=$(gpu_used_mib)
kill -9 "$sup"; t0=$(now_ms)
for _ in $(seq 300); do [ $(($(gpu_used_mib) - baseline)) -lt 1024 ] && break; sleep 0.05; done
t1=$(now_ms)
if [ $(($(gpu_used_mib) - baseline)) -lt 1024 ]; then
  pass "kill -9 of the supervisor: the backend's memory ($((held - baseline)) MiB) released $((t1 - t0)) ms later (polled every 50 ms)"
else
  fail "kill -9 of the supervisor left memory held: $(gpu_used_mib) MiB; apps: $(gpu_apps | tr '\n' ' ')"
fi

# 4. Control: the same swaps without the wait (gpu_release_timeout = 0s).
write_config 0s
start_supervisor
if swap_loop control; then
  say "CONTROL: without the release wait every swap still succeeded here (the driver freed the memory before the next backend allocated)"
else
  say "CONTROL: without the release wait some swaps failed: the wait is what prevents that"
fi
kill -9 "$sup" 2>/dev/null
for _ in $(seq 300); do [ $(($(gpu_used_mib) - baseline)) -lt 1024 ] && break; sleep 0.05; done

say "== supervisor log (last lines):"
tail -n 15 "$work/supervisor.log" | sed 's/^/   /'
if [ $failed = 0 ]; then say "RESULT: all checks passed"; else say "RESULT: some checks FAILED"; fi
exit $failed
