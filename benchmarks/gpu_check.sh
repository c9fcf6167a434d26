#!/usr/bin/env bash
# GPU check of bsnas for a lent GPU machine (H100/H200, python3 with a CUDA build of
# torch, nvcc, pytest; nothing installed, no venv). Run from anywhere:
#
#     bash benchmarks/gpu_check.sh            # outputs in ${OUT:-/tmp/bsnas_out}
#
# The tables are written under the names they have in benchmarks/results/
# (gpu_ops.md, gpu_block.md, gpu_profile.md, gpu_bn_act.md): copy them there.
#
# Stages: device/version info; in-place CUDA build (sm_90); bsnas.cuda_compiled(); the
# CUDA test files (one process each); the small "smoke" CUDA tests under
# compute-sanitizer memcheck (when compute-sanitizer is found), then the training-path
# kernels' float32 CUDA tests under memcheck; benchmarks/bench_gpu.py;
# benchmarks/bench_block.py; benchmarks/profile_block.py; benchmarks/bench_bn_act.py.
# Every stage runs under `timeout`, bounded so that the whole script ends within about 8
# minutes; a failed stage is recorded and the next one still runs. Exits non-zero if any
# stage failed.
# The summary table is printed last.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/bsnas_out}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PY="${PYTHON:-python3}"

T_START=$(date +%s)
DEADLINE=$((T_START + 465))   # whole script: under 8 minutes, with margin
STAGES=()
FAILED=0

# run_stage NAME CAP_SECONDS LOGFILE CMD...: runs CMD under timeout (CAP, or less if
# the deadline is nearer), logs to LOGFILE, prints the log's tail, records the result.
run_stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local now left t t0 rc=0 status
  now=$(date +%s)
  left=$((DEADLINE - now))
  t=$((cap < left ? cap : left))
  if ((t < 15)); then
    STAGES+=("$name|SKIPPED (no time left)|0|$log")
    FAILED=1
    echo "=== $name: skipped, no time left"
    return 0
  fi
  echo "=== $name (timeout ${t}s) -> $log"
  t0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" >"$log" 2>&1 || rc=$?
  local dt=$(($(date +%s) - t0))
  if ((rc == 0)); then
    status=ok
  elif ((rc == 124 || rc == 137)); then
    status="FAILED (timeout ${t}s)"
    FAILED=1
  else
    status="FAILED (rc=$rc)"
    FAILED=1
  fi
  tail -n "${TAIL_LINES:-15}" "$log" | sed 's/^/    /'
  echo "=== $name: $status in ${dt}s"
  STAGES+=("$name|$status|$dt|$log")
}

echo "=== device and versions"
{
  nvidia-smi -L || echo "nvidia-smi failed"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available(),
"device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' || true
  "$CUDA_HOME/bin/nvcc" --version | tail -n 2 || echo "nvcc not found under $CUDA_HOME"
} 2>&1 | tee "$OUT/versions.txt"

# Build (only the bsnas._C extension, in place; sm_90 only).
run_stage build 240 "$OUT/build.log" \
  env MAX_JOBS=16 CUDA_HOME="$CUDA_HOME" BSNAS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
  "$PY" setup.py build_ext --inplace

run_stage cuda_compiled 60 "$OUT/cuda_compiled.log" \
  "$PY" -c 'import sys, torch, bsnas
ok = bsnas.cuda_compiled() and torch.cuda.is_available()
print("bsnas.cuda_compiled() =", bsnas.cuda_compiled(), "; cuda available =", torch.cuda.is_available())
sys.exit(0 if ok else 1)'

# BSNAS_REQUIRE_CUDA=1: the CUDA tests error out instead of skipping on a broken setup.
# One pytest process per file (faulthandler on), so that a crash in one file still
# leaves the others' results; the stage fails if any file failed.
CUDA_TEST_FILES="tests/test_ops_cuda.py tests/test_spring_block_cuda.py tests/test_bn_from_sums.py
  tests/test_channel_stats.py tests/test_bn_act.py tests/test_bn_train_act_dwconv.py
  tests/test_mbconv_train.py"
run_stage pytest_cuda 150 "$OUT/pytest_cuda.log" \
  env BSNAS_REQUIRE_CUDA=1 PY="$PY" FILES="$CUDA_TEST_FILES" bash -c '
    rc=0
    for f in $FILES; do
      echo "--- $f"
      "$PY" -X faulthandler -m pytest -q -rs -p no:cacheprovider "$f" || { rc=1; echo "--- $f FAILED"; }
    done
    exit $rc'

SANITIZER="$(command -v compute-sanitizer || true)"
if [[ -z "$SANITIZER" && -x "$CUDA_HOME/bin/compute-sanitizer" ]]; then
  SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
fi
if [[ -n "$SANITIZER" ]]; then
  # No caching allocator: every tensor is its own allocation, so memcheck sees any
  # access past a tensor's end.
  run_stage memcheck 120 "$OUT/memcheck.log" \
    env BSNAS_REQUIRE_CUDA=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 1 --target-processes all \
    "$PY" -m pytest -q -x -p no:cacheprovider tests/test_ops_cuda.py -k "smoke and not float16"
  # The training-path kernels (bn_train_act_dwconv2d, mbconv_train, the channel-stats
  # gradient) under memcheck too: float32 only, their small random shapes.
  run_stage memcheck_train 90 "$OUT/memcheck_train.log" \
    env BSNAS_REQUIRE_CUDA=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 1 --target-processes all \
    "$PY" -m pytest -q -x -p no:cacheprovider tests/test_bn_train_act_dwconv.py \
    tests/test_mbconv_train.py tests/test_channel_stats.py \
    -k "(cuda_matches_reference and dtype0) or (grad_add_cuda and float32)"
else
  STAGES+=("memcheck|skipped (compute-sanitizer not found)|0|-")
  echo "=== memcheck: compute-sanitizer not found, skipped"
fi

# The benchmark stops starting measurements at its --budget and reports what it has.
now=$(date +%s)
bench_t=$((DEADLINE - now))
bench_t=$((bench_t > 240 ? 240 : bench_t))
TAIL_LINES=5 run_stage bench 240 "$OUT/bench.log" \
  "$PY" benchmarks/bench_gpu.py --out "$OUT" --budget "$((bench_t > 45 ? bench_t - 30 : 15))"
if [[ -f "$OUT/gpu_ops.md" ]]; then
  echo "=== benchmark summary ($OUT/gpu_ops.md has the full tables)"
  # Everything before the first per-configuration table: header and geometric means.
  awk '/^## masked_dwconv2d$/ {exit} {print}' "$OUT/gpu_ops.md"
  awk '/^## bn_act_dwconv2d: summary/ {p=1} /^## bn_act_dwconv2d \(/ {p=0} p' "$OUT/gpu_ops.md"
  awk '/^## masked_pwconv2d: summary/ {p=1} /^## masked_pwconv2d \(/ {p=0} p' "$OUT/gpu_ops.md"
fi

# The spring block against slicing / masking (and compiled slicing when time allows).
now=$(date +%s)
block_t=$((DEADLINE - now))
if ((block_t > 40)); then
  compile_flag=$([[ $block_t -gt 150 ]] && echo --compile || true)
  run_stage block $((block_t > 150 ? 150 : block_t)) "$OUT/block.log" \
    "$PY" benchmarks/bench_block.py --device cuda --reps 20 $compile_flag --out "$OUT/gpu_block.md"
else
  STAGES+=("block|skipped (no time left)|0|-")
fi

# Where the block's time goes (launches, kernel time, wall time per call; top host-time
# ops): tells host-bound layers from kernel-bound ones.
now=$(date +%s)
if ((DEADLINE - now > 30)); then
  TAIL_LINES=12 run_stage profile 40 "$OUT/gpu_profile.md" \
    "$PY" benchmarks/profile_block.py --top 15
else
  STAGES+=("profile|skipped (no time left)|0|-")
fi

# bn_act against the addcmul + relu6 composite it replaced in the block.
now=$(date +%s)
if ((DEADLINE - now > 25)); then
  TAIL_LINES=3 run_stage bn_act 30 "$OUT/bn_act.log" \
    "$PY" benchmarks/bench_bn_act.py --device cuda --out "$OUT/gpu_bn_act.md"
else
  STAGES+=("bn_act|skipped (no time left)|0|-")
fi

echo
echo "=== summary ($(($(date +%s) - T_START))s total; outputs in $OUT)"
printf '%-14s %-40s %7s  %s\n' stage status seconds log
for s in "${STAGES[@]}"; do
  IFS='|' read -r name status dt log <<<"$s"
  printf '%-14s %-40s %7s  %s\n' "$name" "$status" "$dt" "$log"
done
if ((FAILED)); then
  echo "gpu_check: FAILED"
  exit 1
fi
echo "gpu_check: all stages passed"
