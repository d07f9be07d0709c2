#!/usr/bin/env bash
# One-call GPU check: the GPU, the GPU tests, and training / sampling / likelihood throughput of vp_cifar.
#
#   bash benchmarks/gpu_check.sh                 # on the device machine (~6 min on an H100/H200)
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # every step at tiny sizes on CPU (tests this script)
#
# Options: --cpu-dry-run; --budget SECONDS (all steps together, default 500: inside the device tool's 600 s);
#          --steps NAME,... (run only these of: env tests_gpu train sample likelihood tests_perf).
# Results go to ${OUT:-benchmarks/results/gpu}: env.json (machine), train.json / sample.json /
# likelihood.json (benchmarks/throughput.py reports), steps.json (every step's status, rc, seconds),
# summary.md (human summary), gpu_check.log (every step's output): 7 files, within the device tool's 8.
# Each step runs under its own `timeout` (cut to what is left of the budget); a failed or timed-out step
# is recorded and the next one runs; the script exits 0 once CUDA was found, 2 without CUDA (no dry run).
# Missing torchsde / ml_collections are installed offline from .wheels/ (scripts/fetch_device_wheels.sh).
set -u
# OUT relative to where the script was called from; everything else runs from the repository root
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd); fi
cd "$(dirname "$0")/.."

DRY=0
BUDGET=500
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-dry-run) DRY=1 ;;
        --budget) BUDGET="${2:-}"; shift ;;
        --steps) ONLY=",${2:-},"; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (use --cpu-dry-run, --budget SECONDS, --steps NAME,...)" >&2; exit 2 ;;
    esac
    shift
done
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
    echo "gpu_check: --budget needs a whole number of seconds, got '$BUDGET'" >&2; exit 2
fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-benchmarks/results/gpu}"
export PYTHONUNBUFFERED=1
START=$(date +%s)

if [ "$DRY" = 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False for $PYTHON); run it on the GPU machine, or pass --cpu-dry-run to test the script on CPU" >&2
    exit 2
fi

mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")

# torchsde / ml_collections: the device image lacks them; install the carried wheels offline.
if ! "$PYTHON" -c "import torchsde, ml_collections" 2>/dev/null; then
    if ls .wheels/*.whl >/dev/null 2>&1; then
        SITE="$WORK/site"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .wheels/*.whl \
            && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PYTHON" -c "import torchsde, ml_collections" \
        || echo "gpu_check: torchsde / ml_collections missing and no usable .wheels/ (run scripts/fetch_device_wheels.sh and carry .wheels); steps that need them will fail" >&2
fi

# run_step NAME TIMEOUT RESULT_FILE_OR_- CMD...: run CMD under timeout, log to $WORK/NAME.log, record the outcome.
run_step() {
    local name="$1" limit="$2" result="$3"; shift 3
    if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then return 0; fi
    local left=$(( BUDGET - ($(date +%s) - START) ))
    [ "$left" -lt "$limit" ] && limit=$left
    local status rc note="" t0 t1
    # a result file from an earlier run must not pass for this run's
    [ "$result" != "-" ] && rm -f "$OUT/$result"
    if [ "$limit" -lt 5 ]; then
        status=skipped; rc=0; t0=$(date +%s%N); t1=$t0; note="budget of ${BUDGET} s spent"; limit=0; result="-"
        echo "gpu_check: $name skipped: $note" >"$WORK/$name.log"
    else
        echo "== $name (timeout ${limit} s): $*"
        t0=$(date +%s%N)
        timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
        rc=$?
        t1=$(date +%s%N)
        tail -n 15 "$WORK/$name.log"
        case $rc in
            0) status=ok ;;
            124|137) status=timeout; note="killed after ${limit} s" ;;
            *) status=failed ;;
        esac
        [ "$status" = ok ] || note="$note${note:+; }$(grep -v '^[[:space:]]*$' "$WORK/$name.log" | tail -n 1 | cut -c1-200)"
        if [ "$result" != "-" ] && [ "$status" = ok ] && [ ! -s "$OUT/$result" ]; then
            status=failed; note="no $result written"
        fi
        case "$name" in tests*) [ "$status" = timeout ] || note="$(grep -E '(passed|failed|skipped|error|no tests ran|deselected|collected)' "$WORK/$name.log" | tail -n 1 | tr '\t|' '  ')" ;; esac
    fi
    note=$(printf '%s' "$note" | tr '\t|' '  ')
    if [ "$result" = "-" ]; then result=""; elif [ "$status" != ok ]; then rm -f "$OUT/$result"; result=""; fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" \
        "$(printf "%d.%03d" $(( (t1 - t0) / 1000000000 )) $(( (t1 - t0) / 1000000 % 1000 )))" "$limit" "$result" "$note" >>"$WORK/steps.tsv"
    echo "== $name: $status (rc $rc)"
}

TP="benchmarks/throughput.py"
GPU_TEST_FILES=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
if [ "$DRY" = 1 ]; then
    MODE=cpu-dry-run
    # tiny networks and batches, one CPU thread, loose likelihood tolerance: checks the plumbing, not speed
    SIZE=(--device cpu --threads 1 --quick --configs vp_cifar --matmul_size 64)
    TRAIN=(--batch_sizes 2 --steps 1 --warmup 0)
    SAMPLE=(--sample_batch 2 --sample_nfe 2)
    LIK=(--likelihood_batch 1 --likelihood_tol 1e-2 --likelihood_scipy)
    PERF_TESTS=(--collect-only tests/test_performance_paths.py)
else
    MODE=gpu
    # full-size vp_cifar DDPM++ (61.8 M parameters) with random weights and random uint8 images
    SIZE=(--device cuda --configs vp_cifar --matmul_size 8192)
    TRAIN=(--batch_sizes 128 --steps 20 --warmup 5)
    SAMPLE=(--sample_batch 1024 --sample_nfe 20)
    LIK=(--likelihood_batch 64 --likelihood_tol 1e-5 --likelihood_scipy)
    PERF_TESTS=(tests/test_performance_paths.py)
fi

run_step env 60 env.json "$PYTHON" benchmarks/gpu_check_report.py env --out "$OUT/env.json"
[ "$DRY" = 0 ] && nvidia-smi 2>&1 | head -n 20
run_step tests_gpu 150 - "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu $GPU_TEST_FILES
run_step train 180 train.json "$PYTHON" "$TP" "${SIZE[@]}" --parts train --precisions bf16,float32 --compile off \
    "${TRAIN[@]}" --out "$OUT/train.json"
run_step sample 120 sample.json "$PYTHON" "$TP" "${SIZE[@]}" --parts sample "${SAMPLE[@]}" --out "$OUT/sample.json"
run_step likelihood 180 likelihood.json "$PYTHON" "$TP" "${SIZE[@]}" --parts likelihood "${LIK[@]}" \
    --out "$OUT/likelihood.json"
run_step tests_perf 90 - "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" "${PERF_TESTS[@]}"

"$PYTHON" benchmarks/gpu_check_report.py summary --work "$WORK" --out "$OUT" --mode "$MODE" \
    --total_seconds "$(( $(date +%s) - START ))" --print
rm -rf "$WORK"
echo "gpu_check: results in $OUT"
exit 0
