"""Honest throughput of AlexNet on MNIST per device, precision and batch size: images/s, step time, peak memory,
achieved TFLOP/s and the fraction of the device's peak.

    python -m toolkit.bench [--device auto|cpu|cuda|mps|all] [--mode train|infer|both]
                            [--pipeline model|trainer|both] [--batch-size 64,128] [--precision no,bf16] ...
    python -m toolkit.bench --compare A.json B.json

Both pipelines run the trainer's own code, so the ratio between them is the cost of the data path:
- `model`: the trainer's `forward_backward` + `optimizer_step` (train), or its model's forward under no_grad and
  Accelerate's autocast (infer), on one batch prepared once on the device.
- `trainer`: `Trainer.train_epoch` as training runs it (index gather and resize on the device, the step, the
  per-step loss sync, logging) timed by the trainer itself; for infer, `metrics.evaluate` over the trainer's
  evaluation batches (preprocessing from uint8 on the device + forward).

Timing: `warmup` steps are run and discarded (cuDNN autotuning, allocator growth, compilation). Then `repeats`
windows of `steps` steps. Each window starts and ends with `devices.synchronize` and nothing inside it is
synchronised beyond what the pipeline itself does (the trainer's `loss.item()`), so a window covers exactly the
device work queued in it. images/s is the median over windows; step_ms (median, p10, p90) is over windows of
window time / steps: a mean step per window, not per-step samples, which would need a sync after every step.
The trainer pipeline's windows alternate with windows of the model-only step in the same process, and
`trainer_over_model` is the median of their window-by-window ratios: a shared machine's speed drifts, and a
ratio of two runs made minutes apart would measure the drift.

Every configuration runs in a fresh process on the CPU, and every precision in a fresh process on a GPU:
Accelerate holds one precision per process, and a process's peak resident memory (the CPU's figure) cannot be
reset.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from toolkit import devices
from toolkit.config import ArgumentParser, TrainConfig, coerce, from_dict, read_yaml
from toolkit.data import DATA_DIR_ENV, DataError, mnist_present, resolve_data_dir, write_idx
from toolkit.errors import UsageError, UserError, exit_on_user_error
from toolkit.files import write_atomic

PROG = "toolkit.bench"
MODES = ("train", "infer")
PIPELINES = ("model", "trainer")
PRECISIONS = ("auto", "no", "bf16", "fp16")
MNIST_TRAIN_IMAGES = 60_000
MNIST_TEST_IMAGES = 10_000
RESULTS_DIR = Path("benchmarks") / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
# Square matmul that measures a CPU's or MPS's own peak in the same process as the configuration, right after
# its windows (a busy machine slows both alike): compute-bound, and on a 2-core CPU about 0.1 s in fp32.
MATMUL_SIZE = {"cpu": 2048, "cuda": 4096, "mps": 4096}
MATMUL_SECONDS = 0.1  # each timing lasts at least this long; the best of MATMUL_TRIALS is the peak
MATMUL_TRIALS = 3
MATMUL_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATUSES = ("ok", "oom", "error")

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets and architecture whitepapers, matched against
# torch.cuda.get_device_name() in order (more specific names first). `tf32` is what fp32 convolutions run at
# while torch.backends.cudnn.allow_tf32 is on, PyTorch's default; convolutions are ~95% of this network's FLOPs.
# GeForce cards: fp16/bf16 tensor cores with fp32 accumulation (what autocast does), half their fp16-accumulate
# rate. A GPU not listed gets its measured matmul rate as the peak, marked as such.
GPU_PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"B200", "B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1125.0, "fp32": 75.0}),
    (r"H200 NVL", "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H100 PCIe", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100 NVL", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100|GH200", "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", "L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"L40\b", "L40", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX A6000", "RTX A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"RTX 4090", "RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090", "RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"V100.*PCIE", "V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
    (r"V100", "V100 SXM2", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", "T4", {"fp16": 65.0, "fp32": 8.1}),
)


# ---------------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Case:
    """One configuration, one row of results; everything resolved (no `auto`)."""

    device: str  # cpu | cuda | mps
    mode: str  # train | infer
    pipeline: str  # model | trainer
    batch_size: int  # per process
    precision: str  # no | bf16 | fp16
    channels_last: bool
    compile: bool
    image_size: int
    warmup: int
    steps: int
    repeats: int
    recipe: str = ""  # trainer config YAML the run starts from ('' = the trainer's defaults)
    requested_precision: str = ""  # as asked for (`auto` included): lines devices up side by side

    def label(self) -> str:
        return (f"{self.device} {self.mode} {self.pipeline} batch {self.batch_size} {self.precision}"
                f"{' channels_last' if self.channels_last else ''}{' compiled' if self.compile else ''}"
                f" {self.image_size}px")


def trainer_config(case: Case, data_dir: Path, output_dir: Path) -> TrainConfig:
    """The trainer's config for one case: the recipe, with just enough data on the device for the windows."""
    base = from_dict(read_yaml(case.recipe), source=case.recipe) if case.recipe else TrainConfig()
    batch, trainer_pipeline = case.batch_size, case.pipeline == "trainer"
    # the trainer pipeline reads a new batch every step; the model pipeline reuses one
    train_batches = case.warmup + case.steps * case.repeats if trainer_pipeline and case.mode == "train" else 1
    eval_batches = min(case.steps, MNIST_TEST_IMAGES // batch) if trainer_pipeline and case.mode == "infer" else 1
    overrides = {
        "device": case.device, "precision": case.precision, "channels_last": str(case.channels_last).lower(),
        "image_size": case.image_size, "batch_size": batch, "eval_batch_size": batch,
        "train_samples": min(train_batches * batch, MNIST_TRAIN_IMAGES), "eval_samples": max(1, eval_batches) * batch,
        "data_dir": str(data_dir), "download": False, "output_dir": str(output_dir), "resume": "",
        "max_steps": 0, "checkpoint_every_steps": 0,
    }
    return from_dict(overrides, source=PROG, base=base)


def write_synthetic_mnist(root: Path, train_images: int, test_images: int) -> Path:
    """Random uint8 images in MNIST's own file format under root/MNIST/raw/, so the model pipeline runs the real
    Trainer where MNIST is absent (the timing of a fixed batch does not depend on its pixels)."""
    generator = torch.Generator().manual_seed(0)
    for train, count in ((True, train_images), (False, test_images)):
        images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
        write_idx(root, train, images, torch.randint(0, 10, (count,), generator=generator))
    return root


def data_for(case: Case, scratch: Path) -> tuple[Path, str]:
    """(folder holding MNIST/raw/, "mnist" or "synthetic")."""
    root = resolve_data_dir()
    if mnist_present(root):
        return root, "mnist"
    if case.pipeline == "trainer":
        raise DataError(no_mnist_message(root))
    config = trainer_config(case, root, scratch)
    return write_synthetic_mnist(scratch / "data", config.train_samples, config.eval_samples), "synthetic"


def no_mnist_message(root: Path) -> str:
    return (f"--pipeline trainer reads MNIST, which is not in {root / 'MNIST' / 'raw'}: set ${DATA_DIR_ENV} to the "
            f"folder holding MNIST/ (toolkit.train downloads it there), or use --pipeline model (synthetic images)")


# ---------------------------------------------------------------------------------------------- measuring
def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timed(run_steps: Callable[[int], Any], device: torch.device) -> Callable[[int], float]:
    """`run_steps` as a timed window: seconds from an idle device to the end of the work queued in it."""
    def window(count: int) -> float:
        devices.synchronize(device)  # the window opens on an idle device...
        started = time.perf_counter()
        run_steps(count)
        devices.synchronize(device)  # ...and closes when the work queued in it is done
        return time.perf_counter() - started

    return window


def windows(case: Case, window: Callable[[int], float],
            partner: Callable[[int], float] | None = None) -> tuple[list[float], list[float]]:
    """Seconds of `repeats` windows of `steps` steps after `warmup` untimed ones; with a partner (the model-only
    step, for the trainer pipeline), each window is paired with one of the partner's, right before or after it
    in the same process, so the drift of a shared machine's speed (2x over minutes is common on a cloud VM)
    hits both alike."""
    window(case.warmup)
    if partner:
        partner(case.warmup)
    own, other = [], []
    for repeat in range(case.repeats):
        if partner and repeat % 2:  # alternate which goes first, so neither always follows the other
            other.append(partner(case.steps))
        own.append(window(case.steps))
        if partner and not repeat % 2:
            other.append(partner(case.steps))
    return own, other


def model_train_steps(trainer: Any, images: torch.Tensor, labels: torch.Tensor) -> Callable[[int], None]:
    """The trainer's step on one fixed batch, without its data path."""
    def run(count: int) -> None:
        for _ in range(count):
            trainer.train_step(images, labels)

    return run


def model_infer_steps(trainer: Any, images: torch.Tensor) -> Callable[[int], None]:
    def run(count: int) -> None:
        for _ in range(count):
            trainer.infer(images)

    return run


def trainer_infer_steps(trainer: Any) -> Callable[[int], None]:
    """`Trainer.evaluate` over the trainer's evaluation batches, `count` times (one window's worth each)."""
    def run(count: int) -> None:
        for _ in range(count):
            trainer.evaluate()

    return run


def measure_matmul_tflops(device: torch.device, precision: str) -> float:
    """The device's own dense matmul rate in the precision's compute dtype (the CPU's and MPS's peak for MFU):
    the best of a few timings, each long enough to swamp the synchronisation."""
    size, dtype = MATMUL_SIZE[device.type], MATMUL_DTYPES[precision]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty_like(a)

    def timed(count: int) -> float:
        devices.synchronize(device)
        started = time.perf_counter()
        for _ in range(count):
            torch.mm(a, b, out=out)
        devices.synchronize(device)
        return time.perf_counter() - started

    timed(1)  # warm-up: library initialisation and kernel choice
    count = 1
    while (seconds := timed(count)) < MATMUL_SECONDS:
        count *= 2
    best = min([seconds] + [timed(count) for _ in range(MATMUL_TRIALS - 1)])
    return 2 * size ** 3 * count / best / 1e12


def gpu_peak_tflops(device_name: str, precision: str) -> tuple[float, str] | None:
    """(dense peak TFLOP/s, where it comes from) for a known NVIDIA GPU, else None."""
    for pattern, label, peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            if precision in ("bf16", "fp16"):
                kind = precision
            else:
                kind = "tf32" if torch.backends.cudnn.allow_tf32 and "tf32" in peaks else "fp32"
            if kind not in peaks:
                return None
            return peaks[kind], f"{label} datasheet, {kind} dense"
    return None


def flops_per_image(image_size: int, known: dict[str, Any]) -> tuple[int, int]:
    """(forward, training step) FLOPs per image, counted once per image size and passed on to later workers."""
    key = f"flops:{image_size}"
    if key not in known:
        from toolkit.model import build_model, count_flops

        known[key] = list(count_flops(build_model(), image_size))
    return tuple(known[key])  # type: ignore[return-value]


def case_fields(case: Case) -> dict[str, Any]:
    row = asdict(case)
    row.update(device_name=None, processes=1, data=None, images_per_sec=None, images_per_sec_windows=None,
               step_ms=None, peak_memory=None, gflop_per_image=None, achieved_tflops=None, peak_tflops=None,
               peak_source=None, matmul_tflops=None, mfu=None, trainer_over_model=None,
               paired_model_images_per_sec=None, status="error", message="")
    return row


def run_case(case: Case, known: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process. An out-of-memory error makes an `oom` row, any other error an
    `error` row; neither stops a sweep."""
    from toolkit.train import Trainer

    row = case_fields(case)
    trainer = None
    with tempfile.TemporaryDirectory(prefix="toolkit-bench-") as scratch:
        try:
            data_dir, row["data"] = data_for(case, Path(scratch))
            trainer = Trainer(trainer_config(case, data_dir, Path(scratch) / "run"), quiet=True)
            device = trainer.accelerator.device
            row["device_name"] = devices.name(device)
            row["processes"] = trainer.world_size
            if case.compile:
                trainer.model = torch.compile(trainer.model)
            devices.reset_peak_memory(device)
            seconds, paired = measure(trainer, case)
            row["peak_memory"] = devices.peak_memory_bytes(device)
            row.update(rates(case, seconds, paired, trainer.world_size, device, row["device_name"], known))
            row["status"] = "ok"
        except Exception as error:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
            if devices.is_out_of_memory(error):
                row["status"], row["message"] = "oom", first_line(error)
            else:
                row["status"], row["message"] = "error", f"{type(error).__name__}: {first_line(error)}"
                if not isinstance(error, UserError):
                    traceback.print_exc()
        finally:
            if trainer is not None:
                trainer.close()
    del trainer  # before emptying the cache: the failed step's tensors must be unreachable first
    gc.collect()
    devices.empty_cache(case.device)
    return row


def measure(trainer: Any, case: Case) -> tuple[list[float], list[float]]:
    """(seconds of each timed window, and for the trainer pipeline the model-only step's paired windows)."""
    device = trainer.accelerator.device
    if case.mode == "train":
        images, labels = trainer.example_batch(train=True)  # prepared once, as training prepares them
        model = timed(model_train_steps(trainer, images, labels), device)
        pipeline = timed(trainer.train_steps, device)
    else:
        images, _ = trainer.example_batch(train=False)
        model = timed(model_infer_steps(trainer, images), device)
        # one evaluation pass is `steps` batches: the window runs it once (warm-up: as many passes as asked)
        pipeline = timed(lambda count: trainer_infer_steps(trainer)(max(1, count // case.steps) if count else 0),
                         device)
    if case.pipeline == "model":
        return windows(case, model)
    return windows(case, pipeline, partner=model)


def rates(case: Case, seconds: list[float], paired: list[float], processes: int, device: torch.device,
          device_name: str, known: dict[str, Any]) -> dict[str, Any]:
    images = case.steps * case.batch_size * processes
    per_window = [images / s for s in seconds]
    # the trainer pipeline over the model-only step, window by window (same steps: the ratio of their times)
    over_model = statistics.median(m / s for s, m in zip(seconds, paired, strict=True)) if paired else None
    paired_rate = statistics.median(images / m for m in paired) if paired else None
    step_ms = [1000 * s / case.steps for s in seconds]
    forward, step = flops_per_image(case.image_size, known)
    flops = step if case.mode == "train" else forward
    images_per_sec = statistics.median(per_window)
    achieved = images_per_sec * flops / 1e12
    measured = measure_matmul_tflops(device, case.precision)
    listed = gpu_peak_tflops(device_name, case.precision) if device.type == "cuda" else None
    size = MATMUL_SIZE[device.type]
    peak, source = listed or (measured, f"measured {size}x{size} matmul, {case.precision}")
    return {"images_per_sec": images_per_sec, "images_per_sec_windows": per_window,
            "step_ms": {"median": statistics.median(step_ms), "p10": percentile(step_ms, 10),
                        "p90": percentile(step_ms, 90)},
            "gflop_per_image": flops / 1e9, "achieved_tflops": achieved, "peak_tflops": peak,
            "peak_source": source, "matmul_tflops": measured, "mfu": achieved / peak,
            "trainer_over_model": over_model, "paired_model_images_per_sec": paired_rate}


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_cases(cases: list[Case], known: dict[str, Any],
              on_row: Callable[[dict[str, Any]], None] = lambda row: None) -> list[dict[str, Any]]:
    """Measure `cases` one after another in this process (they must share device and precision)."""
    rows = []
    for case in cases:
        rows.append(run_case(case, known))
        on_row(rows[-1])
    return rows


# ---------------------------------------------------------------------------------------------- processes
def worker_main(job_path: Path) -> int:
    """The hidden `--_worker JOB` entry: run the job's cases, writing rows to JOB.out after each one."""
    job = json.loads(job_path.read_text())
    known = job["known"]
    cases = [Case(**fields) for fields in job["cases"]]
    out_path = job_path.with_suffix(".out")
    rows: list[dict[str, Any]] = []

    def save(row: dict[str, Any]) -> None:
        rows.append(row)
        worker = {"torch_threads": torch.get_num_threads(), "device_name": row["device_name"]}
        if cases[0].device == "cuda":
            worker.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        out_path.write_text(json.dumps({"rows": rows, "known": known, "worker": worker}))

    run_cases(cases, known, on_row=save)
    return 0


def process_groups(cases: list[Case]) -> list[list[Case]]:
    """One process per case on the CPU (its peak RSS is the case's own); one per device and precision (and
    compile) elsewhere, where the allocator's peak is reset per case and a process costs seconds to start."""
    groups: dict[tuple[Any, ...], list[Case]] = {}
    for index, case in enumerate(cases):
        key = (index,) if case.device == "cpu" else (case.device, case.precision, case.compile)
        groups.setdefault(key, []).append(case)
    return list(groups.values())


def run_in_processes(cases: list[Case], known: dict[str, Any], announce: Callable[[str], None] = print,
                     workers: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each group of cases in a fresh `python -m toolkit.bench --_worker` process; results in case order."""
    rows = []
    workers = {} if workers is None else workers
    for group in process_groups(cases):
        announce(f"measuring {group[0].label()}" + (f" and {len(group) - 1} more" if len(group) > 1 else ""))
        with tempfile.TemporaryDirectory(prefix="toolkit-bench-job-") as scratch:
            job = Path(scratch) / "job.json"
            job.write_text(json.dumps({"cases": [asdict(c) for c in group], "known": known}))
            result = subprocess.run([sys.executable, "-m", "toolkit.bench", "--_worker", str(job)],
                                    capture_output=True, text=True)
            out = job.with_suffix(".out")
            done = json.loads(out.read_text()) if out.is_file() else {"rows": [], "known": known, "worker": {}}
        known.update(done["known"])
        if done["worker"]:
            workers[group[0].device] = done["worker"]
        for case in group[len(done["rows"]):]:
            row = case_fields(case)
            row["message"] = f"worker process {describe_exit(result.returncode)} before finishing this case"
            done["rows"].append(row)
        if result.returncode != 0 or any(row["status"] == "error" for row in done["rows"]):
            sys.stderr.write(result.stderr[-4000:])
        for row in done["rows"]:
            announce(f"  {row['status']}: {summary(row)}")
        rows.extend(done["rows"])
    return rows


def describe_exit(returncode: int) -> str:
    if returncode == -9:
        return "was killed (SIGKILL: the kernel's out-of-memory killer?)"
    if returncode < 0:
        return f"died of signal {-returncode}"
    return f"exited with status {returncode}"


def summary(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        return f"{row['images_per_sec']:,.1f} images/s, {row['step_ms']['median']:.1f} ms/step"
    return row["message"]


# ---------------------------------------------------------------------------------------------- environment
def git_state() -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it) of the project's checkout, or None where unknown."""
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:  # not a checkout, or no commit yet
        return None, None
    # the code's state: recorded results (benchmarks/results/) being rewritten do not make it dirty
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    return commit, (bool(status) if status is not None else None)


def environment(argv: list[str], workers: dict[str, Any]) -> dict[str, Any]:
    import accelerate
    import torchvision

    commit, dirty = git_state()
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m toolkit.bench", *argv]),
        "torch": torch.__version__, "accelerate": accelerate.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "os": platform.platform(),
        "cpu_model": devices.cpu_model(), "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "devices": workers,  # per device: its name and the torch threads the trainer set
        "git_commit": commit, "git_dirty": dirty,
        "method": "warm-up steps excluded; windows of `steps` steps, devices.synchronize at both ends of each; "
                  "images_per_sec: median over windows; step_ms: window time / steps, median and p10/p90 over "
                  "windows; model pipeline: forward_backward + optimizer_step on a fixed batch on the device; "
                  "trainer pipeline: Trainer.train_epoch's own timing (train) or metrics.evaluate (infer)",
    }


# ---------------------------------------------------------------------------------------------- command line
def parse_list(text: str, flag: str, convert: Callable[[str], Any]) -> list[Any]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise UsageError(f"{flag}: expected one value or a comma-separated list, got {text!r}")
    return list(dict.fromkeys(convert(v) for v in values))


def choice(allowed: tuple[str, ...], flag: str) -> Callable[[str], str]:
    def convert(value: str) -> str:
        if value not in allowed:
            raise UsageError(f"{flag}: '{value}' is not one of {', '.join(allowed)}")
        return value

    return convert


def counted(flag: str, minimum: int) -> Callable[[str], int]:
    def convert(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise UsageError(f"{flag}: expected an integer, got {value!r}") from None
        if number < minimum:
            raise UsageError(f"{flag}: must be at least {minimum}, got {number}")
        return number

    return convert


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0].replace("\n", " "),
                            epilog="Results: a table here and JSON in --json (default "
                                   "benchmarks/results/<device>-<YYYYMMDD>.json).")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps, or all: every device this "
                                                         "machine has, side by side (default auto)")
    parser.add_argument("--mode", default="both", choices=("train", "infer", "both"), help="default both")
    parser.add_argument("--pipeline", default="both", choices=("model", "trainer", "both"),
                        help="model: the step alone on a batch already on the device; trainer: the trainer's "
                             "data path plus the step (default both: their ratio is the data path's cost)")
    parser.add_argument("--batch-size", default=str(TrainConfig.batch_size), metavar="N[,N...]",
                        help=f"images per step, one or a list (default {TrainConfig.batch_size})")
    parser.add_argument("--precision", default="auto", metavar="P[,P...]",
                        help="no, bf16, fp16 or auto (the trainer's choice for the device), one or a list "
                             "(default auto)")
    parser.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                        help="channels-last memory format (default: what the trainer uses on the device)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up includes "
                                                               "compilation: give it a few steps)")
    parser.add_argument("--image-size", default=str(TrainConfig.image_size), metavar="PX",
                        help=f"input size in pixels, at least 65 (default {TrainConfig.image_size})")
    parser.add_argument("--warmup", default="5", metavar="STEPS", help="untimed steps first (default 5)")
    parser.add_argument("--steps", default="10", metavar="STEPS", help="steps per timed window (default 10)")
    parser.add_argument("--repeats", default="5", metavar="N", help="timed windows (default 5)")
    parser.add_argument("--config", default="", metavar="YAML",
                        help="trainer recipe to start from, e.g. configs/seed.yaml (default: the trainer's "
                             "defaults); the flags above override it")
    parser.add_argument("--json", default="", metavar="PATH", help="where to write the results")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                        help="print the ratios B/A between two result files, and nothing else")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    return parser


def plan(args: argparse.Namespace, announce: Callable[[str], None]) -> tuple[list[str], list[Case]]:
    """The devices and the cases to run, in order; a UsageError for anything that cannot run."""
    if args.device == "all":
        device_list = devices.available()
    else:
        device_list = [devices.resolve(args.device)]
    batch_sizes = sorted(parse_list(args.batch_size, "--batch-size",
                                    lambda v: coerce("batch_size", v, "--batch-size")))  # small first: OOM last
    requested = parse_list(args.precision, "--precision", choice(PRECISIONS, "--precision"))
    image_size = coerce("image_size", args.image_size, "--image-size")
    warmup = counted("--warmup", 0)(args.warmup)
    steps = counted("--steps", 1)(args.steps)
    repeats = counted("--repeats", 1)(args.repeats)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    pipelines = list(PIPELINES) if args.pipeline == "both" else [args.pipeline]
    if args.config:
        read_yaml(args.config)  # a missing or broken file is one line now, not one error row per case
    if "trainer" in pipelines:
        root = resolve_data_dir()
        if not mnist_present(root):
            raise DataError(no_mnist_message(root))
        if "train" in modes and steps * max(batch_sizes) > MNIST_TRAIN_IMAGES:
            raise UsageError(f"--steps {steps} x --batch-size {max(batch_sizes)} is more than one MNIST epoch "
                             f"({MNIST_TRAIN_IMAGES} images): a timed window must fit in one")
        if "infer" in modes and max(batch_sizes) > MNIST_TEST_IMAGES:
            raise UsageError(f"--batch-size {max(batch_sizes)} is more than the MNIST test set "
                             f"({MNIST_TEST_IMAGES} images)")

    cases = []
    for device in device_list:
        precisions = []
        for wanted in requested:
            if wanted != "auto" and wanted not in devices.supported_precisions(device):
                message = (f"--precision {wanted} is not supported on {device}; supported: "
                           f"{', '.join(devices.supported_precisions(device))}")
                if args.device != "all":
                    raise UsageError(message)
                announce(f"skipped: {message}")
                continue
            precision = devices.resolve_precision(device, wanted)[0]
            if precision not in (p for p, _ in precisions):
                precisions.append((precision, wanted))
        channels_last = devices.use_channels_last(device, "auto" if args.channels_last is None
                                                  else str(args.channels_last).lower())
        for (precision, wanted), mode, pipeline, batch_size in itertools.product(precisions, modes, pipelines,
                                                                                 batch_sizes):
            cases.append(Case(device=device, mode=mode, pipeline=pipeline, batch_size=batch_size,
                              precision=precision, channels_last=channels_last, compile=args.compile,
                              image_size=image_size, warmup=warmup, steps=steps, repeats=repeats,
                              recipe=args.config, requested_precision=wanted))
    return device_list, cases


def default_json_path(label: str) -> Path:
    """benchmarks/results/<label>-<YYYYMMDD>.json under the working directory; a time is added rather than
    overwrite an earlier run of the same day."""
    now = datetime.now()
    path = RESULTS_DIR / f"{label}-{now:%Y%m%d}.json"
    return path.with_name(f"{label}-{now:%Y%m%d-%H%M%S}.json") if path.exists() else path


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(document, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- tables
def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    return ""


def main_memory(peak: dict[str, int] | None) -> str:
    if not peak:
        return "-"
    for key, label in (("cuda_peak_allocated", ""), ("mps_driver_allocated", " driver"), ("cpu_peak_rss", " RSS")):
        if key in peak:
            return format_bytes(peak[key]) + label
    return "-"


def console_for_tables() -> Any:
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200)


def results_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="AlexNet on MNIST: throughput", title_justify="left")
    for column in ("device", "mode", "pipeline", "batch", "precision", "ch-last", "px"):
        table.add_column(column)
    for column in ("images/s", "step ms (p10-p90)", "vs model", "peak memory", "GFLOP/img", "TFLOP/s", "of peak"):
        table.add_column(column, justify="right")
    table.add_column("status")
    for r in rows:
        ok = r["status"] == "ok"
        ratio = r.get("trainer_over_model")
        table.add_row(
            r["device"], r["mode"], r["pipeline"], str(r["batch_size"]),
            r["precision"] + (" compiled" if r["compile"] else ""), "yes" if r["channels_last"] else "no",
            str(r["image_size"]),
            f"{r['images_per_sec']:,.1f}" if ok else "-",
            f"{r['step_ms']['median']:,.1f} ({r['step_ms']['p10']:,.1f}-{r['step_ms']['p90']:,.1f})" if ok else "-",
            f"{ratio:.3f}" if ratio else "",
            main_memory(r["peak_memory"]),
            f"{r['gflop_per_image']:.3f}" if ok else "-",
            f"{r['achieved_tflops']:.3f}" if ok else "-",
            f"{r['mfu']:.1%}" if ok else "-",
            r["status"] if ok else f"{r['status']}: {r['message'][:80]}",
        )
    return table


def peaks_note(rows: list[dict[str, Any]]) -> list[str]:
    seen = dict.fromkeys(f"{r['device']} {r['precision']}: peak {r['peak_tflops']:.2f} TFLOP/s ({r['peak_source']})"
                         for r in rows if r["status"] == "ok")
    return list(seen)


def side_by_side_table(rows: list[dict[str, Any]], device_list: list[str]) -> Any:
    """images/s of each device for the same setting, and each device's speedup over the CPU."""
    from rich.table import Table

    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return (row["mode"], row["pipeline"], row["batch_size"], row["requested_precision"])

    by_key: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault(key(row), {})[row["device"]] = row
    table = Table(title="side by side (images/s; x = speedup over the CPU)", title_justify="left")
    for column in ("mode", "pipeline", "batch", "precision"):
        table.add_column(column)
    for device in device_list:
        table.add_column(device, justify="right")
    for (mode, pipeline, batch, precision), found in by_key.items():
        cpu = found.get("cpu")
        cells = []
        for device in device_list:
            row = found.get(device)
            if not row or row["status"] != "ok":
                cells.append(row["status"] if row else "-")
                continue
            cell = f"{row['images_per_sec']:,.1f} ({row['precision']})"
            if device != "cpu" and cpu and cpu["status"] == "ok":
                cell += f" {row['images_per_sec'] / cpu['images_per_sec']:,.1f}x"
            cells.append(cell)
        table.add_row(mode, pipeline, str(batch), precision, *cells)
    return table


# ---------------------------------------------------------------------------------------------- --compare
COMPARE_FIELDS = ("device", "mode", "pipeline", "image_size", "batch_size", "precision", "channels_last", "compile")


def load_results(path: str) -> list[dict[str, Any]]:
    try:
        document = json.loads(Path(path).read_text())
        rows = document["results"]
        for row in rows:
            for field in (*COMPARE_FIELDS, "status", "images_per_sec"):
                row[field]  # noqa: B018 - a KeyError here means not a bench file
    except FileNotFoundError:
        raise UsageError(f"--compare: {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--compare: {path} is not a toolkit.bench results file") from None
    return rows


def compare(path_a: str, path_b: str) -> int:
    """Print B/A for each configuration found in both files. A setting that varies within a file identifies
    rows; one that is constant within each file is what is being compared (cpu.json vs cuda.json, an eager run
    vs a compiled one) and is left out of the match."""
    from rich.table import Table

    rows_a, rows_b = load_results(path_a), load_results(path_b)
    fields = [f for f in COMPARE_FIELDS if len({r[f] for r in rows_a}) > 1 or len({r[f] for r in rows_b}) > 1]
    compared = [f for f in COMPARE_FIELDS if f not in fields and rows_a and rows_b and rows_a[0][f] != rows_b[0][f]]

    def keyed(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
        return {tuple(r[f] for f in fields): r for r in rows}

    a, b = keyed(rows_a), keyed(rows_b)
    title = f"B / A   (A = {Path(path_a).name}, B = {Path(path_b).name})"
    if compared:
        title += ("   A: " + ", ".join(f"{f}={rows_a[0][f]}" for f in compared)
                  + "; B: " + ", ".join(f"{f}={rows_b[0][f]}" for f in compared))
    table = Table(title=title, title_justify="left")
    for f in fields:
        table.add_column(f.replace("_", " "))
    for column in ("A images/s", "B images/s", "B/A images/s", "A step ms", "B step ms"):
        table.add_column(column, justify="right")

    def rate(row: dict[str, Any]) -> str:
        return f"{row['images_per_sec']:,.1f}" if row["status"] == "ok" else row["status"]

    def step(row: dict[str, Any]) -> str:
        return f"{row['step_ms']['median']:,.1f}" if row["status"] == "ok" else "-"

    for key in (k for k in a if k in b):
        ra, rb = a[key], b[key]
        both_ok = ra["status"] == rb["status"] == "ok"
        ratio = f"{rb['images_per_sec'] / ra['images_per_sec']:.3f}" if both_ok else "-"
        table.add_row(*(str(v) for v in key), rate(ra), rate(rb), ratio, step(ra), step(rb))
    console = console_for_tables()
    console.print(table)
    for label, only in (("A", [k for k in a if k not in b]), ("B", [k for k in b if k not in a])):
        for key in only:
            settings = ", ".join(f"{f}={v}" for f, v in zip(fields, key, strict=True))
            console.print(f"only in {label}: {settings}", markup=False)
    if not any(k in b for k in a):
        console.print("no configuration is in both files")
    return 0


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with exit_on_user_error(PROG):
        args = build_parser().parse_args(argv)
        if args._worker:
            return worker_main(Path(args._worker))
        if args.compare:
            return compare(*args.compare)
        console = console_for_tables()
        device_list, cases = plan(args, announce=lambda line: console.print(line, markup=False))
        if not cases:
            raise UsageError("nothing to measure: no requested precision is supported on the chosen device(s)")
        known: dict[str, Any] = {}
        workers: dict[str, Any] = {}
        try:
            rows = run_in_processes(cases, known, announce=lambda line: console.print(line, markup=False),
                                    workers=workers)
        except KeyboardInterrupt:
            console.print("interrupted: no results written")
            return 130
        console.print(results_table(rows))
        for line in peaks_note(rows):
            console.print(line, markup=False)
        if len(device_list) > 1:
            console.print(side_by_side_table(rows, device_list))
        path = Path(args.json) if args.json else default_json_path("all" if args.device == "all" else device_list[0])
        write_json(path, {"environment": environment(argv, workers), "results": rows})
        console.print(f"results: {path}", markup=False)
        return 1 if any(row["status"] == "error" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
