#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one call of under 8 minutes, the most valuable numbers first. Each step
# has its own time limit and all share one budget (BUDGET_S): a step that would run past it is cut short or
# skipped, and what the steps before it wrote is already in $OUT (at most 8 small files, never checkpoints):
#   1. preflight: GPU, torch, accelerate, MNIST and the reference in place; a failure stops here -> preflight.json
#   2. the trainer pipeline against the model-only step, paired, bf16, channels_last,
#      batch 256 and 512: images/s, their ratio, MFU                                      -> paired.json, paired.png
#   3. the recommended recipe's first epoch (--max-steps 469), evaluated every 50 steps:
#      time to 99%, accuracy, images/s                                                    -> recipe-metrics.jsonl
#   4. variants at batch 512: contiguous memory, fp32, --compile; inference at batch 500 -> variants.json
#   5. the reference loop and the toolkit's trainer on the same GPU                      -> reference.json
# log.txt holds every step's output and a summary at its end. Each step runs in a process group of its own, and
# when it ends (done, or cut at its limit) whatever is left of the group is ended too: nothing of one step runs
# on into the next. Nothing downloads: a missing MNIST fails the preflight.
#
#   bash benchmarks/gpu_check.sh --prepare     # here, once: MNIST (gzip) and the reference into gpu-data/
#   bash benchmarks/gpu_check.sh               # on the GPU machine: run(..., carry=["gpu-data"], timeout_s=540)
#   OUT=/tmp/gpucheck DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh    # a rehearsal on the CPU: tiny sizes
# Settings: OUT (default benchmarks/results/gpu-<date>), DEVICE (cuda), QUICK, BUDGET_S, PYTHON (python3), and
# STEP_LIMIT_S, a cap on every measuring step's limit (a rehearsal of steps cut at their limit).
set -uo pipefail
cd "$(dirname "$0")/.."
MNIST_FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
PACK=gpu-data  # ignored by git; travels to the GPU machine as a carried folder

if [ "${1:-}" = --prepare ]; then  # here, beside ../shared: fill gpu-data/ for the GPU machine
    set -e
    data="${TOOLKIT_DATA_DIR:-../shared/data}/MNIST/raw"
    reference="${REFERENCE_DIR:-../shared/reference/seed}"
    rm -rf "$PACK"
    mkdir -p "$PACK/mnist" "$PACK/reference"
    for name in "${MNIST_FILES[@]}"; do
        gzip --no-name -c "$data/$name" >"$PACK/mnist/$name.gz"
    done
    cp "$reference/model.py" "$reference/train.py" "$PACK/reference/"
    # the code these files were prepared beside (the GPU machine's copy of the tree has no git)
    { git rev-parse HEAD; git status --porcelain --untracked-files=no | grep -q . && echo dirty || echo clean; } \
        >"$PACK/commit" 2>/dev/null || true
    du -sh "$PACK"
    exit 0
fi

PYTHON="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/log.txt"
: >"$LOG"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/toolkit-gpu-check.XXXXXX")"  # unpacked data, the recipe's run folder
trap 'rm -rf "$WORK"' EXIT
# this checkout first; a PYTHONPATH already set (wheels carried to the machine) is kept after it
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# collect_env (pip list, nvidia-smi, lscpu) once for every results file of this call, not once per step
export TOOLKIT_BENCH_ENVIRONMENT="$WORK/environment.json"
status=0

if [ -n "${QUICK:-}" ]; then  # the same steps and files, at sizes a busy 2-core CPU gets through in 5 minutes
    BUDGET_S="${BUDGET_S:-285}"
    SIZE=65; PAIRED=(--batch-size 16 --warmup 1 --steps 1 --repeats 2)
    RECIPE=(--image-size 65 --batch-size 16 --max-steps 4 --eval-samples 100 --log-every-steps 2
            --eval-every-steps 2)
    BATCH=8; WARMUP=1; STEPS=1; REPEATS=1; INFER_BATCH=8; INFER_STEPS=1
    COMPILE_WARMUP=0  # compile skipped: inductor takes minutes on two cores (rehearse it apart with --compile)
    REFERENCE=(--batch-size 2 --warmup 0 --steps 1 --repeats 1)
else
    BUDGET_S="${BUDGET_S:-440}"
    SIZE=224; PAIRED=(--batch-size 256,512 --warmup 20 --steps 50 --repeats 10)
    # the default recipe's first epoch (469 steps of 128), evaluated every 50 steps: the time to 99%
    RECIPE=(--max-steps 469 --log-every-steps 50 --eval-every-steps 50)
    BATCH=512; WARMUP=20; STEPS=50; REPEATS=5; COMPILE_WARMUP=30
    INFER_BATCH=500; INFER_STEPS=20  # a trainer inference window is one evaluation: the 10,000 test images
    REFERENCE=(--warmup 2 --steps 20 --repeats 2)  # its loop is bound by PIL on one core: 42 batches tell it
fi
RECIPE+=(--no-download)  # MNIST comes from gpu-data/ (the preflight checked it), never from the network
# its 0.75 GB checkpoint would be written, hashed and fsynced, then deleted
RECIPE+=(--no-save-checkpoints)
if [ "$DEVICE" = cuda ]; then LAUNCH_CONFIG=launch/cuda.yaml; else LAUNCH_CONFIG=launch/cpu.yaml; fi

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S COMMAND...: run it under its own limit, cut to what is left of the budget (and STEP_LIMIT_S)
step() {
    local name=$1 limit=$2 left=$((BUDGET_S - SECONDS)) started=$SECONDS rc
    shift 2
    if [ "$left" -lt 15 ]; then
        say "=== $name: skipped, ${left} s of the ${BUDGET_S} s budget left"
        status=1
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    [ -n "${STEP_LIMIT_S:-}" ] && [ "$name" != preflight ] && [ "$limit" -gt "$STEP_LIMIT_S" ] && limit=$STEP_LIMIT_S
    say "=== $name (limit ${limit} s, at ${SECONDS} s)"
    # in the background, and waited for: `wait` lets the script's traps run at once (a foreground pipeline would
    # hold them until it ended); pipefail makes its status the step's
    in_own_group "$limit" "$@" <&0 | tee -a "$LOG" &
    wait $!
    rc=$?
    rm -f "$WORK/step-group"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        say "=== $name: stopped at its limit of ${limit} s"
    else
        say "=== $name: exit ${rc} after $((SECONDS - started)) s"
    fi
    [ "$rc" = 0 ] || status=1
    return "$rc"
}

# in_own_group LIMIT_S COMMAND...: COMMAND in a new session, so a process group of its own (setsid: the
# script runs without job control, so its children are not group leaders and setsid does not fork), under
# timeout, which signals the whole group at the limit. timeout returns as soon as COMMAND itself ends, and a
# child of it may outlive it (a benchmark worker whose parent was stopped): the group's leftovers get SIGTERM,
# then SIGKILL after 10 s. The group is noted in $WORK/step-group: a SIGTERM or Ctrl-C to the script ends it too
# (it is in another session: nothing else would reach it).
in_own_group() {
    local limit=$1 group rc
    shift
    setsid timeout --kill-after=10 "$limit" "$@" 2>&1 <&0 &  # <&0: a background job would read /dev/null
    group=$!
    echo "$group" >"$WORK/step-group"
    trap 'end_group "$group"; exit 143' TERM
    wait "$group"
    rc=$?
    end_group "$group"
    return "$rc"
}

end_group() {  # end_group PGID: SIGTERM to whatever is left in the group, SIGKILL to what is there 10 s later
    local group=$1 waited=0
    [ "$group" -gt 1 ] 2>/dev/null || return 0
    kill -TERM -- "-$group" 2>/dev/null || return 0
    while kill -0 -- "-$group" 2>/dev/null && [ "$waited" -lt 10 ]; do
        sleep 1
        waited=$((waited + 1))
    done
    kill -KILL -- "-$group" 2>/dev/null || true
}

# summary: the numbers that matter, last in the log (and in the output's tail)
summary() {
    WALL_S="$(cat "$WORK/recipe-wall-s" 2>/dev/null)" "$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import json, os
from pathlib import Path

out = Path(os.environ["OUT"])


def load(name):
    path = out / name
    try:
        return json.loads(path.read_text()) if path.suffix == ".json" else [
            json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None


def rows(document):
    return document["results"] if document else []


def rate(value):
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def bench_line(row):
    flags = [row["mode"], f"batch {row['batch_size']}", "fp32" if row["precision"] == "no" else row["precision"],
             "channels_last" if row["channels_last"] else "contiguous"] + (["compiled"] if row["compile"] else [])
    if row.get("status") != "ok":
        return f"{' '.join(flags)}: {row['status']}: {row.get('message', '')}"
    line = f"{' '.join(flags)}: {rate(row['images_per_sec'])} images/s"
    if row.get("trainer_over_model"):
        line += f" (model-only {rate(row['paired_model_images_per_sec'])}, trainer/model {row['trainer_over_model']:.3f})"
    return line + f", MFU {row['mfu']:.1%} of {row['peak_tflops']:.3g} TFLOP/s"


print("=== summary")
preflight = load("preflight.json") or {}
print(f"device: {preflight.get('gpu') or preflight.get('cpu_model')}; torch {preflight.get('torch')}, "
      f"accelerate {preflight.get('accelerate')}")
for row in rows(load("paired.json")):
    print("paired:", bench_line(row))
evaluations = load("recipe-metrics.jsonl") or []
reached = next((r for r in evaluations if r.get("eval_accuracy", 0) >= 0.99), None)
if reached:  # the first evaluation at 99% (one every 50 steps): an upper bound at that granularity
    print(f"recipe: 99% test accuracy at step {reached['step']} ({reached['images_seen']:,} images): "
          f"{reached['train_seconds']:.1f} s of training, {reached['wall_seconds']:.1f} s wall from the start")
elif evaluations:
    best = max(evaluations, key=lambda r: r.get("eval_accuracy", 0))
    print(f"recipe: 99% not reached in {len(evaluations)} evaluations (best {best.get('eval_accuracy', 0):.2%} "
          f"at step {best.get('step')})")
if evaluations:
    last = evaluations[-1]
    print(f"recipe: step {last.get('step')}: eval accuracy {last.get('eval_accuracy', 0):.2%}, "
          f"{rate(last.get('images_per_sec', 0))} images/s over {last.get('epoch_s', 0):.1f} s of training; "
          f"{os.environ.get('WALL_S') or '?'} s end to end (start-up and evaluations included)")
for row in rows(load("variants.json")):
    print("variant:", bench_line(row))
for row in rows(load("reference.json")):
    ratio = f", toolkit {row['toolkit_over_this']:.2f}x this" if row.get("toolkit_over_this") else ""
    speed = f"{rate(row['images_per_sec'])} images/s" if row.get("status") == "ok" else row.get("status")
    print(f"reference: {row['side']}: {speed}{ratio}")
EOF
    say "=== done in ${SECONDS} s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
}

# a SIGTERM or Ctrl-C ends the step running (its group) and then the script, with the summary of what finished
stopped() {  # stopped SIGNAL STATUS
    end_group "$(cat "$WORK/step-group" 2>/dev/null || echo 0)"
    say "=== stopped by $1"
    summary
    exit "$2"
}
trap 'stopped SIGINT 130' INT
trap 'stopped SIGTERM 143' TERM

# --- data: MNIST unpacked from gpu-data/ (else $TOOLKIT_DATA_DIR as it is), the reference beside it
if [ -d "$PACK/mnist" ]; then
    mkdir -p "$WORK/data/MNIST/raw"
    for name in "${MNIST_FILES[@]}"; do
        gunzip -c "$PACK/mnist/$name.gz" >"$WORK/data/MNIST/raw/$name" || say "cannot unpack $PACK/mnist/$name.gz"
    done
    export TOOLKIT_DATA_DIR="$WORK/data"
else
    export TOOLKIT_DATA_DIR="${TOOLKIT_DATA_DIR:-../shared/data}"
    say "note: no $PACK/ (bash benchmarks/gpu_check.sh --prepare makes it); MNIST from $TOOLKIT_DATA_DIR"
fi
if [ -d "$PACK/reference" ]; then REFERENCE_DIR="$PACK/reference"; else REFERENCE_DIR=../shared/reference/seed; fi
export DEVICE REFERENCE_DIR OUT PACK

# --- 1. preflight
step "preflight" 60 "$PYTHON" - <<'EOF'
import importlib.util, json, os, platform, sys
from pathlib import Path

import accelerate, torch

from toolkit import devices
from toolkit.data import mnist_present, resolve_data_dir
from toolkit.errors import UsageError

device = os.environ["DEVICE"]
facts = {"python": platform.python_version(), "torch": torch.__version__, "accelerate": accelerate.__version__,
         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "device": device,
         "device_available": device in devices.available(), "cpu_model": devices.cpu_model(),
         "cpu_cores": os.cpu_count()}
if device == "cuda" and torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                 multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
root = resolve_data_dir()
facts.update(mnist=mnist_present(root), reference=(Path(os.environ["REFERENCE_DIR"]) / "model.py").is_file(),
             matplotlib=importlib.util.find_spec("matplotlib") is not None)
try:
    devices.check_compile(device)
    facts["compile"] = "ok"
except UsageError as error:
    facts["compile"] = str(error)
commit = Path(os.environ["PACK"]) / "commit"
facts["prepared_beside"] = commit.read_text().split() if commit.is_file() else None
Path(os.environ["OUT"], "preflight.json").write_text(json.dumps(facts, indent=2) + "\n")
for key, value in facts.items():
    print(f"{key}: {value}")
sys.exit(0 if facts["device_available"] and facts["mnist"] else 1)
EOF
if [ "$status" != 0 ]; then  # no device or no MNIST: every step after would fail, or try to download
    say "=== preflight failed: nothing measured (see preflight.json)"
    summary
    exit 1
fi

# --- 2. the data path's cost: trainer pipeline vs the model-only step, paired in one process
step "paired: trainer vs model, bf16, channels_last" 150 "$PYTHON" -m toolkit.bench --device "$DEVICE" --mode train \
    --pipeline trainer --precision bf16 --channels-last --image-size "$SIZE" "${PAIRED[@]}" --json "$OUT/paired.json"

# --- 3. the recommended recipe's first epoch, end to end, evaluated every 50 steps (no checkpoint kept)
recipe_started=$SECONDS
step "recipe, first epoch" 180 "$PYTHON" -m accelerate.commands.launch --config_file "$LAUNCH_CONFIG" \
    toolkit/train.py --device "$DEVICE" "${RECIPE[@]}" --output-dir "$WORK/recipe"
echo $((SECONDS - recipe_started)) >"$WORK/recipe-wall-s"
cp "$WORK/recipe/metrics.jsonl" "$OUT/recipe-metrics.jsonl" 2>/dev/null || say "recipe: no metrics.jsonl"

# --- 4. variants at one batch size, each merged into variants.json as it arrives
variant() {  # variant NAME LIMIT_S FLAGS...
    local name=$1 limit=$2
    shift 2
    step "variant: $name" "$limit" "$PYTHON" -m toolkit.bench --device "$DEVICE" --pipeline trainer \
        --image-size "$SIZE" --no-chart --json "$WORK/variant-$name.json" "$@"
    [ -f "$WORK/variant-$name.json" ] || return 0
    "$PYTHON" - "$OUT/variants.json" "$WORK"/variant-*.json <<'EOF'
import json, sys
documents = [json.load(open(path)) for path in sys.argv[2:]]
merged = {"environment": {**documents[0]["environment"], "command": [d["environment"]["command"] for d in documents]},
          "results": [row for d in documents for row in d["results"]]}
with open(sys.argv[1], "w") as out:
    json.dump(merged, out, indent=2)
EOF
}
TIMING=(--steps "$STEPS" --repeats "$REPEATS")
variant contiguous 60 --mode train --batch-size "$BATCH" --precision bf16 --no-channels-last --warmup "$WARMUP" \
    "${TIMING[@]}"
variant fp32 60 --mode train --batch-size "$BATCH" --precision no --channels-last --warmup "$WARMUP" "${TIMING[@]}"
variant infer 60 --mode infer --batch-size "$INFER_BATCH" --precision bf16 --channels-last --warmup "$INFER_STEPS" \
    --steps "$INFER_STEPS" --repeats "$REPEATS"
if [ "$COMPILE_WARMUP" -gt 0 ]; then
    variant compile 120 --mode train --batch-size "$BATCH" --precision bf16 --channels-last --compile \
        --warmup "$COMPILE_WARMUP" "${TIMING[@]}"
else
    say "=== variant: compile: skipped (QUICK)"
fi
# --- CUDA graphs (torch.compile's reduce-overhead): the host's ~180 ops a step replayed by the GPU, at batch 128,
# the recipe's, where the host's time comes closest to the GPU's
if [ "$COMPILE_WARMUP" -gt 0 ]; then
    variant compile-reduce-overhead 120 --mode train --batch-size 128 --precision bf16 --channels-last --compile \
        --compile-mode reduce-overhead --warmup "$COMPILE_WARMUP" "${TIMING[@]}"
fi

# --- 5. the reference loop (PIL resize, DataLoader, SGD) against the toolkit's trainer at 224 px
step "reference loop vs toolkit" 120 "$PYTHON" benchmarks/compare_reference.py --device "$DEVICE" --precision bf16 \
    --reference-dir "$REFERENCE_DIR" "${REFERENCE[@]}" --json "$OUT/reference.json"

summary
exit $status
