#!/usr/bin/env bash
# GPU check of bsnas for a lent GPU machine (H100/H200, python3 with a CUDA build of
# torch, nvcc, pytest; nothing installed, no venv). Run from anywhere:
#
#     bash benchmarks/gpu_check.sh            # outputs in ${OUT:-/tmp/bsnas_out}
#
# The tables are written under the names they have in benchmarks/results/
# (gpu_ops.md, gpu_block.md, gpu_profile.md, gpu_bn_act.md): copy them there. The
# depthwise op section is timed first into dw/gpu_ops.md, the other sections later into
# gpu_ops.md; the quick block cases go to gpu_block_quick_*.md.
#
# Stages, the facts that matter first: device/version info; in-place CUDA build (sm_90);
# bsnas.cuda_compiled(); the CUDA tests of the paths never run on a GPU (mbconv_train,
# bn_train_act_dwconv2d, the channel-stats gradient, non-finite propagation) in one
# process, with compute-sanitizer memcheck of them alongside; the spring block on
# representative cases (float32 NCHW, bfloat16 channels_last; training and inference);
# the block profile; the depthwise op benchmark; then the other CUDA tests, memcheck of
# the small op tests, the full block table, the other op sections and bn_act.
# Every stage runs under `timeout`, bounded so that the whole script ends within about 8
# minutes; a stage that runs out of time leaves what it measured, a failed stage is
# recorded and the next one still runs. Exits non-zero if any stage failed.
# torch.compile baselines take minutes to compile: run them in a separate, short call,
#     python3 benchmarks/bench_block.py --device cuda --quick --compile --out /tmp/c.md
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

SANITIZER="$(command -v compute-sanitizer || true)"
if [[ -z "$SANITIZER" && -x "$CUDA_HOME/bin/compute-sanitizer" ]]; then
  SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
fi

# The paths that have never run on a GPU come first, in one pytest process
# (BSNAS_REQUIRE_CUDA=1: a broken setup errors instead of skipping), with memcheck of
# the same tests running alongside on the same card.
NEW_TESTS="tests/test_mbconv_train.py tests/test_bn_train_act_dwconv.py
  tests/test_channel_stats.py tests/test_nonfinite.py"
NEW_K="cuda"
memcheck_pid=""
if [[ -n "$SANITIZER" ]]; then
  # No caching allocator: every tensor is its own allocation, so memcheck sees any
  # access past a tensor's end.
  ( env BSNAS_REQUIRE_CUDA=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=10 150 \
      "$SANITIZER" --tool memcheck --error-exitcode 1 --target-processes all \
      "$PY" -m pytest -q -x -p no:cacheprovider $NEW_TESTS -k "$NEW_K and not float16" \
      >"$OUT/memcheck_new.log" 2>&1; echo $? >"$OUT/memcheck_new.rc" ) &
  memcheck_pid=$!
fi
run_stage pytest_new 150 "$OUT/pytest_new.log" \
  env BSNAS_REQUIRE_CUDA=1 "$PY" -X faulthandler -m pytest -q -rs -p no:cacheprovider \
  $NEW_TESTS -k "$NEW_K"

# Representative block cases, training and inference each: float32 NCHW and bfloat16
# channels_last over every third proxyless layer at widths 25/50/100 %.
now=$(date +%s)
if ((DEADLINE - now > 40)); then
  run_stage block_f32_nchw 60 "$OUT/gpu_block_quick_f32_nchw.md.log" \
    "$PY" benchmarks/bench_block.py --device cuda --quick --reps 20 \
    --out "$OUT/gpu_block_quick_f32_nchw.md"
  run_stage block_bf16_cl 60 "$OUT/gpu_block_quick_bf16_cl.md.log" \
    "$PY" benchmarks/bench_block.py --device cuda --quick --reps 20 --dtype bfloat16 \
    --channels-last --out "$OUT/gpu_block_quick_bf16_cl.md"
else
  STAGES+=("block_quick|skipped (no time left)|0|-")
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

if [[ -n "$memcheck_pid" ]]; then
  wait "$memcheck_pid" || true
  rc=$(cat "$OUT/memcheck_new.rc" 2>/dev/null || echo 1)
  tail -n 8 "$OUT/memcheck_new.log" | sed 's/^/    /'
  if [[ "$rc" == 0 ]]; then
    STAGES+=("memcheck_new|ok|-|$OUT/memcheck_new.log")
  else
    STAGES+=("memcheck_new|FAILED (rc=$rc)|-|$OUT/memcheck_new.log")
    FAILED=1
  fi
else
  STAGES+=("memcheck_new|skipped (compute-sanitizer not found)|0|-")
fi

# The depthwise op against cuDNN on sliced weights (bench_gpu stops starting
# measurements at its --budget and reports what it has).
now=$(date +%s)
left=$((DEADLINE - now))
if ((left > 45)); then
  dw_t=$((left > 120 ? 120 : left))
  mkdir -p "$OUT/dw"
  TAIL_LINES=5 run_stage bench_dw "$dw_t" "$OUT/bench_dw.log" \
    "$PY" benchmarks/bench_gpu.py --only dw --out "$OUT/dw" --budget "$((dw_t - 20))"
else
  STAGES+=("bench_dw|skipped (no time left)|0|-")
fi

# The rest: the other CUDA test files (one process each, so a crash leaves the others'
# results), memcheck of the small op tests, the full block table, the other op sections.
REST_TEST_FILES="tests/test_ops_cuda.py tests/test_spring_block_cuda.py tests/test_bn_from_sums.py
  tests/test_bn_act.py"
run_stage pytest_rest 120 "$OUT/pytest_rest.log" \
  env BSNAS_REQUIRE_CUDA=1 PY="$PY" FILES="$REST_TEST_FILES" bash -c '
    rc=0
    for f in $FILES; do
      echo "--- $f"
      "$PY" -X faulthandler -m pytest -q -rs -p no:cacheprovider "$f" || { rc=1; echo "--- $f FAILED"; }
    done
    exit $rc'
if [[ -n "$SANITIZER" ]]; then
  run_stage memcheck 90 "$OUT/memcheck.log" \
    env BSNAS_REQUIRE_CUDA=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 1 --target-processes all \
    "$PY" -m pytest -q -x -p no:cacheprovider tests/test_ops_cuda.py -k "smoke and not float16"
fi
now=$(date +%s)
block_t=$((DEADLINE - now))
if ((block_t > 40)); then
  run_stage block $((block_t > 120 ? 120 : block_t)) "$OUT/block.log" \
    "$PY" benchmarks/bench_block.py --device cuda --reps 20 --out "$OUT/gpu_block.md"
else
  STAGES+=("block|skipped (no time left)|0|-")
fi
now=$(date +%s)
left=$((DEADLINE - now))
if ((left > 45)); then
  TAIL_LINES=5 run_stage bench_ops "$left" "$OUT/bench.log" \
    "$PY" benchmarks/bench_gpu.py --only bnact pw --out "$OUT" --budget "$((left - 20))"
else
  STAGES+=("bench_ops|skipped (no time left)|0|-")
fi
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
