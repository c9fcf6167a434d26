#!/usr/bin/env bash
# CPU benchmark of the masked convolution ops: runs
# benchmarks/test_bench_ops.py with --benchmark-json into benchmarks/out/, then
# benchmarks/ratio_table.py on it (markdown next to the JSON, and on stdout).
#
#   benchmarks/run_cpu_bench.sh              # full run: 900 benchmarks, ~7 min on a 2-vCPU
#                                            # VM when it is quiet or with RT=1; without
#                                            # RT it waits for quiet and can take much longer
#   QUICK=1 benchmarks/run_cpu_bench.sh      # 8 groups / 24 benchmarks (~15 s when quiet)
#   BSNAS_BENCH_N=64 benchmarks/run_cpu_bench.sh -k "dw and fwd-"   # extra args -> pytest
#   BSNAS_BENCH_STRIDES=2 benchmarks/run_cpu_bench.sh -k dw      # stride-2 depthwise cases
#
# Env: QUICK=1, KEEP_FREED=1 (-> BSNAS_BENCH_KEEP_FREED=1: freed memory kept for reuse,
# as in training), RT=1 (-> BSNAS_BENCH_RT=1: measure at SCHED_FIFO priority on a busy
# shared box, needs root/CAP_SYS_NICE; see test_bench_ops.py), PYTHON or PY (default
# .venv/bin/python if present, else python),
# BSNAS_BENCH_N / BSNAS_BENCH_TARGET_S / BSNAS_BENCH_MIN_ROUNDS / BSNAS_BENCH_MAX_ROUNDS
# (see benchmarks/test_bench_ops.py). Outputs: benchmarks/out/cpu-{quick,full}-STAMP.{json,md}
# and copies benchmarks/out/cpu-{quick,full}-latest.{json,md}. A full run without pytest
# arguments also writes its table to benchmarks/results/cpu_ops.md (with
# BSNAS_BENCH_STRIDES=2, arguments allowed: cpu_ops_stride2.md); TABLE=FILE names another
# file, TABLE= (empty) none.
# Groups measured while other processes were busy (see ratio_table.py --list-contended)
# are rerun once into cpu-MODE-STAMP-rerun.json, whose groups replace the first run's
# in the table (RERUN=0 turns this off).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

PYTHON="${PYTHON:-${PY:-}}"  # the Makefile passes PY
if [[ -z "$PYTHON" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

mode=full
if [[ "${QUICK:-0}" != "0" && -n "${QUICK:-}" ]]; then
    mode=quick
    export BSNAS_BENCH_QUICK=1
else
    export BSNAS_BENCH_QUICK=0
fi

if [[ "${RT:-0}" != "0" && -n "${RT:-}" ]]; then export BSNAS_BENCH_RT=1; fi
if [[ "${KEEP_FREED:-0}" != "0" && -n "${KEEP_FREED:-}" ]]; then export BSNAS_BENCH_KEEP_FREED=1; fi

outdir=benchmarks/out
mkdir -p "$outdir"
stamp="$(date +%Y%m%d-%H%M%S)"
json="$outdir/cpu-$mode-$stamp.json"
md="$outdir/cpu-$mode-$stamp.md"

start=$(date +%s)
# python -m pytest puts the repo root on sys.path (the extension is built in place).
"$PYTHON" -m pytest benchmarks/test_bench_ops.py -q -p no:cacheprovider \
    --benchmark-only --benchmark-json="$json" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name "$@"
end=$(date +%s)
echo "benchmark wall time: $((end - start)) s (mode $mode, N=${BSNAS_BENCH_N:-8})"

jsons=("$json")
if [[ "${RERUN:-1}" != "0" ]]; then
    mapfile -t contended < <("$PYTHON" benchmarks/ratio_table.py "$json" --list-contended)
    if (( ${#contended[@]} > 0 )); then
        echo "rerunning ${#contended[@]} benchmarks of contended groups"
        rerun="$outdir/cpu-$mode-$stamp-rerun.json"
        "$PYTHON" -m pytest -q -p no:cacheprovider --benchmark-only \
            --benchmark-json="$rerun" --benchmark-columns=median,iqr,rounds \
            --benchmark-sort=name "${contended[@]}" || true
        [[ -f "$rerun" ]] && jsons+=("$rerun")
        echo "benchmark wall time incl. rerun: $(( $(date +%s) - start )) s"
    fi
fi

"$PYTHON" benchmarks/ratio_table.py "${jsons[@]}" --out "$md"
cp "$json" "$outdir/cpu-$mode-latest.json"
cp "$md" "$outdir/cpu-$mode-latest.md"
echo "wrote $json and $md"

# The stable results file: only a table that covers its whole benchmark replaces it.
if [[ -z "${TABLE+set}" && "$mode" == full ]]; then
    strides="${BSNAS_BENCH_STRIDES:-1}"
    if [[ "$strides" == 1 && $# -eq 0 ]]; then
        TABLE=benchmarks/results/cpu_ops.md
    elif [[ "$strides" == 2 ]]; then
        TABLE=benchmarks/results/cpu_ops_stride2.md
    fi
fi
if [[ -n "${TABLE:-}" ]]; then
    mkdir -p "$(dirname "$TABLE")"
    cp "$md" "$TABLE"
    echo "wrote $TABLE"
fi
