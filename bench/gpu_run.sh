#!/usr/bin/env bash
# What to measure on a lent GPU, as two device calls of under 10 minutes each (bench/GPU.md is the runbook:
# what each step measures and what to record in bench/RESULTS.md). Build the kit here first
# (`bash bench/gpu_kit.sh`), then:
#
#   run(carry=[".gpu-kit"], timeout_s=590, command="bash bench/gpu_run.sh serve")   # GPU tests + serving
#   run(carry=[".gpu-kit"], timeout_s=590, command="bash bench/gpu_run.sh train")   # training benches
#
# A session has 15 minutes of device time, the machine's start included, so both calls at full length do
# not fit in one: serve first, train with what is left (or in a later session).
# Each step has its own time limit and its whole log goes to $OUT (what comes back); a failing step does not
# stop the next. The steps print their last lines, so the call's output tail holds every result.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" != serve && "${1:-}" != train ]]; then
    echo "usage: bash bench/gpu_run.sh serve|train" >&2
    exit 2
fi
bash bench/gpu_kit.sh --install || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-run}
mkdir -p "$OUT"
TOKENIZER=.gpu-kit/smollm2-tokenizer
SERVE_BASE=(--random-shape llama-8b --dtype bf16 --base-model "$TOKENIZER")

step() {  # NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, log to $OUT/NAME.log, show its end
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: exit $? after $SECONDS s in all"
    grep -v -i "warn" "$OUT/$name.log" | tail -n "${TAIL:-30}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-}" in
serve)
    TAIL=15 step gpu-tests 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_graphs.py \
        tests/test_engine_liger.py tests/test_engine_local.py tests/test_attention.py tests/test_train.py
    # not GPU-only (a CPU runs it under Triton's interpreter, which the image's Triton 3.6 cannot): here on CUDA
    TAIL=5 step fused-loss 60 python -m pytest -q -p no:cacheprovider tests/test_dataset.py -k fused_linear_cross
    step serve 240 python bench/serve.py "${SERVE_BASE[@]}" --quantization none --new-tokens 64 --rounds 2
    step projections 100 python bench/projections.py "${SERVE_BASE[@]}" --steps 30
    ;;
train)
    step train 300 python bench/train.py --shape llama-8b --tokenizer "$TOKENIZER" --steps 10 --batch-size 2 \
        --gradient-checkpointing
    step train-every-2 240 python bench/train.py --shape llama-8b --tokenizer "$TOKENIZER" --steps 10 \
        --batch-size 2 --gradient-checkpointing --checkpoint-every 2
    ;;
esac
