#!/usr/bin/env bash
# The commands behind the CPU tables in benchmarks/README.md. Run on a quiet machine (nothing else busy: two
# cores are easily shared away), from anywhere; results (JSON, and a chart beside each) land in benchmarks/results/,
# to be recorded (RESULTS elsewhere for a try). Each command gives its windows (--warmup/--steps/--repeats), so
# none is the quick default's time-budgeted measurement.
#   benchmarks/run_cpu.sh                                  # the recorded settings (about 20 minutes on 2 cores)
#   WARMUP=1 STEPS=1 REPEATS=1 PAIRED_STEPS=1 PAIRED_REPEATS=2 RESULTS=/tmp/check benchmarks/run_cpu.sh   # a quick check that each command runs
set -euo pipefail
cd "$(dirname "$0")/.."
export TOOLKIT_DATA_DIR="${TOOLKIT_DATA_DIR:-../shared/data}"  # the folder holding MNIST/raw/
REFERENCE_DIR="${REFERENCE_DIR:-../shared/reference/seed}"  # the reference's model.py and train.py
WARMUP="${WARMUP:-3}"
STEPS="${STEPS:-10}"
REPEATS="${REPEATS:-3}"
RESULTS="${RESULTS:-benchmarks/results}"
DATE="$(date +%Y%m%d)"
TIMING=(--warmup "$WARMUP" --steps "$STEPS" --repeats "$REPEATS")

# 1. The data path's cost: the trainer pipeline against the model-only step, 224 px, batch 64, bf16,
#    channels_last, training, in windows paired in one process (each trainer window next to a model-only window,
#    the order alternating), so the drift of a shared machine's speed hits both alike (target: trainer >= 0.95 x
#    model). A row for each pipeline, both from the same pairs.
python -m toolkit.bench --device cpu --mode train --pipeline both --image-size 224 --batch-size 64 \
    --precision bf16 --channels-last --warmup "$WARMUP" --steps "${PAIRED_STEPS:-5}" --repeats "${PAIRED_REPEATS:-16}" \
    --json "$RESULTS/cpu-224px-b64-bf16-paired-$DATE.json"

# 2. Which batch size and precision: a sweep at 112 px (a quarter of the FLOPs of 224 px), train and infer.
python -m toolkit.bench --device cpu --mode both --pipeline model --image-size 112 --batch-size 32,64,128,256 \
    --precision no,bf16 "${TIMING[@]}" --json "$RESULTS/cpu-112px-sweep-$DATE.json"

# 3. Against the reference loop (PIL resize, DataLoader, SGD), 224 px, batch 64: as written (fp32), with bf16
#    autocast, and the toolkit's trainer in bf16 (target: toolkit >= 2x the reference).
python benchmarks/compare_reference.py --device cpu --precision bf16 --reference-dir "$REFERENCE_DIR" "${TIMING[@]}" \
    --json "$RESULTS/reference-cpu-224px-b64-$DATE.json"
