#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run, so a lent GPU is used once and briefly:
#   1. the recommended recipe, one epoch on one GPU in bf16 through launch/cuda.yaml (images/s, epoch time,
#      accuracy after the first epoch);
#   2. the benchmark sweep: batch 64-512 x fp32/bf16 x channels-last on/off, train and infer, both pipelines;
#   3. the reference loop against the toolkit's trainer on the same GPU.
# Results land in $RESULTS (default benchmarks/results/gpu-<date>/): JSON files and a log of each step.
#   benchmarks/gpu_check.sh                       # on the GPU machine, from the repository root
#   DEVICE=cpu QUICK=1 benchmarks/gpu_check.sh    # a rehearsal on any machine: tiny sizes, same commands
set -uo pipefail
cd "$(dirname "$0")/.."
export TOOLKIT_DATA_DIR="${TOOLKIT_DATA_DIR:-../shared/data}" PYTHONUNBUFFERED=1
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"   # runs without installing the package
DEVICE="${DEVICE:-cuda}"
RESULTS="${RESULTS:-benchmarks/results/gpu-$(date +%Y%m%d)}"
mkdir -p "$RESULTS"
if [ -n "${QUICK:-}" ]; then
    SIZE=65; BATCHES=16,32; TIMING=(--warmup 1 --steps 2 --repeats 2); EPOCH=(--max-steps 20 --eval-samples 500)
    REFERENCE=(--warmup 1 --steps 2)
else
    SIZE=224; BATCHES=64,128,256,512; TIMING=(--warmup 10 --steps 50 --repeats 5); EPOCH=(--max-steps 469)
    REFERENCE=(--warmup 5 --steps 50 --repeats 3)
fi
status=0
step() { echo "=== $1"; shift; "$@" 2>&1 | tee -a "$RESULTS/log.txt"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || status=$rc; }

step "environment" python -c "import torch, accelerate; print(torch.__version__, accelerate.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"

# 1. One epoch of the recommended recipe (8-epoch schedule, stopped after its first epoch: 469 steps of 128).
if [ "$DEVICE" = cuda ]; then
    LAUNCH=(accelerate launch --config_file launch/cuda.yaml)
else
    LAUNCH=(accelerate launch --config_file launch/cpu.yaml)
fi
step "recipe, first epoch" "${LAUNCH[@]}" toolkit/train.py --device "$DEVICE" --image-size "$SIZE" "${EPOCH[@]}" \
    --log-every-steps 100 --output-dir "$RESULTS/recipe-run"
cp "$RESULTS/recipe-run/metrics.jsonl" "$RESULTS/recipe-metrics.jsonl" 2>/dev/null

# 2. The sweep, with and without channels-last, then their ratio.
for layout in channels-last no-channels-last; do
    step "sweep $layout" python -m toolkit.bench --device "$DEVICE" --mode both --pipeline both \
        --batch-size "$BATCHES" --precision no,bf16 "--$layout" --image-size "$SIZE" "${TIMING[@]}" \
        --json "$RESULTS/bench-$layout.json"
done
step "channels-last / contiguous" python -m toolkit.bench --compare "$RESULTS/bench-no-channels-last.json" \
    "$RESULTS/bench-channels-last.json"

# 3. The reference loop (PIL resize, DataLoader, SGD) and the toolkit's trainer at 224 px, batch 64.
if [ -d ../shared/reference/seed ]; then
    step "reference" python benchmarks/compare_reference.py --device "$DEVICE" --precision bf16 "${REFERENCE[@]}" \
        --json "$RESULTS/reference.json"
else
    echo "=== reference: skipped, ../shared/reference/seed is not beside this checkout" | tee -a "$RESULTS/log.txt"
fi
exit $status
