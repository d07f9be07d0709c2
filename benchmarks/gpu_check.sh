#!/usr/bin/env bash
# One-call GPU check: the GPU, the GPU tests, training / sampling / likelihood throughput of vp_cifar, and a
# short vp_cifar training run on CIFAR-10 followed by bits/dim on 500 test images and a sample grid.
#
#   bash benchmarks/gpu_check.sh                        # on the device machine (under 9 min on an H100/H200)
#   bash benchmarks/gpu_check.sh --quick --device cpu   # every step at tiny sizes on CPU (seconds; tests this script)
#
# Options: --quick (tiny networks, batches and data); --device cuda|cpu (default cuda; cpu needs --quick);
#          --cpu-dry-run (the same as --quick --device cpu); --data DIR (CIFAR-10 npz parts train*.npz /
#          test*.npz for the run steps, default .data/cifar10: scripts/prepare_device_data.sh; --quick without
#          --data makes 16 random images); --budget SECONDS (all steps together, default 530: under 9 minutes
#          and inside the device tool's 560 s call); --steps NAME,... (run only these of: env tests_gpu train
#          sample likelihood tests_perf train_compile run run_bpd run_sample).
#          --force (write into an OUT that holds an earlier check's results; without it that is refused).
# Results go to $OUT (default benchmarks/results/gpu; with --quick a new temporary folder), 8 files (the device tool returns at most 8): steps.json
# (every step's status, rc, seconds, and the machine as "env"), train.json / sample.json / likelihood.json
# (benchmarks/throughput.py reports; train.json holds the compiled bf16 rows too), run.json (the short
# training run: steps/s, bits/dim, NFE, seconds, samples), run_samples.png (its sample grid), summary.md
# (human summary, environment included), gpu_check.log (every step's output).
# Each step runs under its own `timeout` (cut to what is left of the budget), cheapest first; a failed or
# timed-out step is recorded and the next one runs; steps.json / summary.md / gpu_check.log are rewritten
# after every step. The script exits 0 once the device was found, 2 without CUDA or with a torch that does
# not import (both recorded in OUT as a failed "env" step), or on a bad argument.
# Missing torchsde / ml_collections are installed offline from .wheels/ (scripts/fetch_device_wheels.sh).
set -u
STEP_NAMES="env tests_gpu train sample likelihood tests_perf train_compile run run_bpd run_sample"
# OUT and --data relative to where the script was called from; everything else runs from the repository root
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd); fi
CALLER=$(pwd)
cd "$(dirname "$0")/.."
FORCE=0

QUICK=0
DEVICE=cuda
BUDGET=530
ONLY=""
DATA=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --device) DEVICE="${2:-}"; shift ;;
        --cpu-dry-run) QUICK=1; DEVICE=cpu ;;
        --data) DATA="${2:-}"; shift ;;
        --budget) BUDGET="${2:-}"; shift ;;
        --steps) ONLY=",${2:-},"; shift ;;
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (use --quick, --device cuda|cpu, --data DIR, --budget SECONDS, --steps NAME,...)" >&2; exit 2 ;;
    esac
    shift
done
case "$DEVICE" in
    cuda) ;;
    cpu) if [ "$QUICK" = 0 ]; then echo "gpu_check: --device cpu needs --quick (the full sizes would take hours on a CPU)" >&2; exit 2; fi ;;
    *) echo "gpu_check: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
for name in $(printf '%s' "$ONLY" | tr ',' ' '); do
    case " $STEP_NAMES " in *" $name "*) ;; *)
        echo "gpu_check: unknown step '$name' in --steps (valid: $STEP_NAMES)" >&2; exit 2 ;;
    esac
done
if [ "$ONLY" = ",," ]; then echo "gpu_check: --steps needs step names (valid: $STEP_NAMES)" >&2; exit 2; fi
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
    echo "gpu_check: --budget needs a whole number of seconds, got '$BUDGET'" >&2; exit 2
fi
if [ -n "$DATA" ]; then
    case "$DATA" in /*) ;; *) DATA="$CALLER/$DATA" ;; esac
    if [ ! -d "$DATA" ]; then echo "gpu_check: --data '$DATA' is not a folder (CIFAR-10 npz parts: scripts/prepare_device_data.sh)" >&2; exit 2; fi
fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${OUT:-}" ]; then  # a quick check never lands on (or replaces) the GPU results
    if [ "$QUICK" = 1 ]; then OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_quick.XXXXXX"); else OUT=benchmarks/results/gpu; fi
fi
if [ -e "$OUT/steps.json" ] && [ "$FORCE" = 0 ]; then
    echo "gpu_check: $OUT holds an earlier check's results (steps.json); pass --force to replace them, or set OUT to another folder" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
START=$(date +%s)

mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
REPORT=(benchmarks/gpu_check_report.py)
if [ "$QUICK" = 1 ]; then MODE="quick-$DEVICE"; else MODE=gpu; fi

# torch must import and (for --device cuda) see a GPU; otherwise the reason is recorded as a failed env step
PROBE=$("$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() or sys.argv[1] == 'cpu' else 3)" "$DEVICE" 2>&1)
PROBE_RC=$?
if [ "$PROBE_RC" != 0 ]; then
    if [ "$PROBE_RC" = 3 ]; then
        REASON="no CUDA device (torch.cuda.is_available() is False for $PYTHON); run it on the GPU machine, or pass --quick --device cpu to test the script on CPU"
    else
        REASON="torch does not import with $PYTHON: $(printf '%s' "$PROBE" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-200)"
    fi
    echo "gpu_check: $REASON" >&2
    printf 'env\tfailed\t%s\t0.000\t0\t\t%s\n' "$PROBE_RC" "$REASON" >"$WORK/steps.tsv"
    printf '%s\n' "$PROBE" >"$WORK/env.log"
    "$PYTHON" benchmarks/gpu_check_report.py summary --work "$WORK" --out "$OUT" --mode "$MODE" --total_seconds 0 >/dev/null 2>&1 \
        || echo "gpu_check: could not write the summary in $OUT" >&2
    rm -rf "$WORK"
    exit 2
fi

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

selected() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
summarize() {
    "$PYTHON" "${REPORT[@]}" summary --work "$WORK" --out "$OUT" --mode "$MODE" \
        --total_seconds "$(( $(date +%s) - START ))" "$@"
}
# record NAME STATUS RC SECONDS TIMEOUT RESULT NOTE: one line of $WORK/steps.tsv, then the summary files again
record() {
    local note
    note=$(printf '%s' "$7" | tr '\t|\n' '   ')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$note" >>"$WORK/steps.tsv"
    echo "== $1: $2 (rc $3)"
    summarize >/dev/null 2>&1
}
# off NAME NOTE: a step this mode leaves out on purpose (status "off", counts as ok)
off() {
    selected "$1" || return 0
    echo "gpu_check: $1 off: $2" >"$WORK/$1.log"
    record "$1" off 0 0.000 0 "" "$2"
}

# run_step NAME TIMEOUT RESULT CMD...: run CMD under timeout, log to $WORK/NAME.log, record the outcome.
# RESULT: a file CMD writes in $OUT, "+FILE" for one it adds to (kept when the step fails), or "-".
run_step() {
    local name="$1" limit="$2" result="$3"; shift 3
    selected "$name" || return 0
    local budget_left; budget_left=$(left)
    [ "$budget_left" -lt "$limit" ] && limit=$budget_left
    local status rc note="" t0 t1 keep=0
    case "$result" in +*) keep=1; result="${result#+}" ;; esac
    # a result file from an earlier run must not pass for this run's
    [ "$result" != "-" ] && [ "$keep" = 0 ] && rm -f "$OUT/$result"
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
        case "$name" in tests*) [ "$status" = timeout ] || note="$(grep -E '(passed|failed|skipped|error|no tests ran|deselected|collected)' "$WORK/$name.log" | tail -n 1)" ;; esac
    fi
    if [ "$result" = "-" ]; then result=""
    elif [ "$status" != ok ]; then [ "$keep" = 0 ] && rm -f "$OUT/$result"; [ -s "$OUT/$result" ] || result=""; fi
    record "$name" "$status" "$rc" \
        "$(printf "%d.%03d" $(( (t1 - t0) / 1000000000 )) $(( (t1 - t0) / 1000000 % 1000 )))" "$limit" "$result" "$note"
}

TP="benchmarks/throughput.py"
GPU_TEST_FILES=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
MAIN=("$PYTHON" main.py --device "$DEVICE")
if [ "$QUICK" = 1 ]; then
    # tiny networks and batches, one thread on CPU, loose likelihood tolerance: checks the plumbing, not speed
    SIZE=(--device "$DEVICE" --threads 1 --quick --configs vp_cifar --matmul_size 64)
    TRAIN=(--batch_sizes 2 --steps 1 --warmup 0)
    SAMPLE=(--sample_batch 2 --sample_nfe 2)
    LIK=(--likelihood_batch 1 --likelihood_tol 1e-2 --likelihood_scipy)
    PERF_TESTS=(--collect-only tests/test_performance_paths.py)
    # the run steps: a tiny U-Net, a few steps, 4 images at a loose tolerance, 4 samples at 2 NFE
    RUN_NET=("--config.model.nf=8" "--config.model.ch_mult=(1,)" "--config.model.num_res_blocks=1"
             "--config.model.attn_resolutions=()" "--config.training.batch_size=4")
    RUN_TRAIN_S=0; RUN_ITERS=3; RUN_RESERVE=0; RUN_OVERHEAD=60
    RUN_LIK=(--num_batches 1 "--config.likelihood.batch_size=4" "--config.likelihood.rtol=1e-2"
             "--config.likelihood.atol=1e-2")
    RUN_SAMPLE=(--num_samples 4 --solver em --nfe 2)
    [ "$DEVICE" = cpu ] && export OMP_NUM_THREADS=1
else
    # full-size vp_cifar DDPM++ (61.8 M parameters) with random weights and random uint8 images
    SIZE=(--device cuda --configs vp_cifar --matmul_size 8192)
    TRAIN=(--batch_sizes 128 --steps 20 --warmup 5)
    SAMPLE=(--sample_batch 1024 --sample_nfe 20)
    LIK=(--likelihood_batch 64 --likelihood_tol 1e-5 --likelihood_scipy)
    PERF_TESTS=(tests/test_performance_paths.py)
    # the run steps: vp_cifar as configured (batch 128, bf16); training fills what is left of the budget
    # after RUN_RESERVE seconds for bits/dim (timeout 160 s) and sampling (60 s), between 30 and RUN_TRAIN_S seconds
    RUN_NET=()
    RUN_TRAIN_S=180; RUN_ITERS=""; RUN_RESERVE=200; RUN_OVERHEAD=45
    # 5 batches of 100: each finished batch is saved, so a timeout still reports the batches done
    RUN_LIK=(--num_batches 5 "--config.likelihood.batch_size=100")
    RUN_SAMPLE=(--num_samples 64 --solver dpmpp2m --nfe 20)
fi

# cheapest first: the machine, the tests, the eager throughput rows, compilation, then the training run
run_step env 60 - "$PYTHON" "${REPORT[@]}" env --out "$WORK/env.json"
[ "$DEVICE" = cuda ] && nvidia-smi 2>&1 | head -n 20
run_step tests_gpu 120 - "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu $GPU_TEST_FILES
run_step train 120 train.json "$PYTHON" "$TP" "${SIZE[@]}" --parts train --precisions bf16,float32 --compile off \
    "${TRAIN[@]}" --out "$OUT/train.json"
run_step sample 90 sample.json "$PYTHON" "$TP" "${SIZE[@]}" --parts sample "${SAMPLE[@]}" --out "$OUT/sample.json"
run_step likelihood 150 likelihood.json "$PYTHON" "$TP" "${SIZE[@]}" --parts likelihood "${LIK[@]}" \
    --out "$OUT/likelihood.json"
run_step tests_perf 90 - "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" "${PERF_TESTS[@]}"

# bf16 with torch.compile: its rows are appended to train.json (1-2 minutes of compilation on the GPU; in
# --quick only when named in --steps)
if [ "$QUICK" = 1 ] && [[ "$ONLY" != *",train_compile,"* ]]; then
    off train_compile "compile on: not run in --quick (torch.compile takes minutes); --steps train_compile runs it"
else
    run_step train_compile 180 +train.json bash -c \
        '"$1" "$2" "${@:5}" --out "$3" && "$1" benchmarks/gpu_check_report.py append_training --into "$4" --add "$3"' \
        _ "$PYTHON" "$TP" "$WORK/train_compile.json" "$OUT/train.json" \
        "${SIZE[@]}" --parts train --precisions bf16 --compile on "${TRAIN[@]}"
fi

# the short training run: train, bits/dim on the test images, a sample grid; run.json collected after each
RUN_DIR="$WORK/run"
if selected run || selected run_bpd || selected run_sample; then
    if [ -z "$DATA" ] && [ "$QUICK" = 1 ]; then
        DATA="$WORK/data"  # 16 random 32x32 images as train and test parts (the loader's npz format)
        "$PYTHON" -c "import sys; sys.path.insert(0, '.'); import numpy as np; from atomic_io import save_npz
r = np.random.default_rng(0)
for split in ('train', 'test'):
    save_npz(sys.argv[1] + '/' + split + '_tiny.npz', x=r.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), y=r.integers(0, 10, 16).astype(np.uint8))" "$DATA"
    fi
    DATA="${DATA:-.data/cifar10}"
    if [ -z "$RUN_ITERS" ]; then
        budget_left=$(left)
        RUN_TRAIN_TARGET=$(( budget_left - RUN_RESERVE - RUN_OVERHEAD ))
        [ "$RUN_TRAIN_TARGET" -gt "$RUN_TRAIN_S" ] && RUN_TRAIN_TARGET=$RUN_TRAIN_S
        [ "$RUN_TRAIN_TARGET" -lt 30 ] && RUN_TRAIN_TARGET=30
        RUN_ITERS=$("$PYTHON" "${REPORT[@]}" run_iters --train_json "$OUT/train.json" --seconds "$RUN_TRAIN_TARGET" --batch 128)
    else
        RUN_TRAIN_TARGET=$RUN_TRAIN_S
    fi
    SNAPSHOT=$(( RUN_ITERS / 3 > 0 ? RUN_ITERS / 3 : 1 ))  # a timed-out run still leaves a checkpoint
    LIK_DEFAULTS=$("$PYTHON" "${REPORT[@]}" likelihood_defaults --config vp_cifar 2>/dev/null)
    collect() {
        "$PYTHON" "${REPORT[@]}" collect_run --workdir "$RUN_DIR" --out "$OUT" --planned_iters "$RUN_ITERS" \
            --train_seconds_target "$RUN_TRAIN_TARGET" "--likelihood_overrides=$LIK_DEFAULTS" >>"$WORK/collect.log" 2>&1 \
            || echo "gpu_check: collecting run.json failed: $(tail -n 1 "$WORK/collect.log")" >&2
    }
    rm -f "$OUT/run.json" "$OUT/run_samples.png"
    run_step run $(( RUN_TRAIN_TARGET + RUN_OVERHEAD )) - "${MAIN[@]}" --mode train --config vp_cifar \
        --workdir "$RUN_DIR" "--config.data.path=$DATA" "${RUN_NET[@]}" "--config.training.n_iters=$RUN_ITERS" \
        "--config.training.snapshot_every=$SNAPSHOT" --config.training.plot_samples=0 \
        --config.training.progress=false --config.training.log_every=50
    collect
    # the toolkit's default likelihood settings (vp_cifar keeps the paper's) on the test images, batch by batch
    # shellcheck disable=SC2086
    run_step run_bpd 160 - "${MAIN[@]}" --mode likelihood --workdir "$RUN_DIR" --split test \
        $LIK_DEFAULTS "${RUN_LIK[@]}"
    collect
    run_step run_sample 60 - "${MAIN[@]}" --mode sample --workdir "$RUN_DIR" "${RUN_SAMPLE[@]}"
    collect
fi

summarize --print
rm -rf "$WORK"
echo "gpu_check: results in $OUT"
exit 0
