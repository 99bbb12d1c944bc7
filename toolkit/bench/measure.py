"""One case in this process: build the trainer as training builds it, time its windows through the trainer's
public benchmark methods, and turn the seconds into a row."""

from __future__ import annotations

import gc
import statistics
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit import devices, peaks
from toolkit.bench import timing
from toolkit.bench.plan import Case, data_for, trainer_config
from toolkit.bench.results import blank_row
from toolkit.errors import UserError


def run_case(case: Case, known: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process. An out-of-memory error makes an `oom` row, any other error an
    `error` row; neither stops a sweep."""
    from toolkit.train import training_run

    row = blank_row(case)
    with tempfile.TemporaryDirectory(prefix="toolkit-bench-") as scratch:
        try:
            data_dir, row["data"] = data_for(case, Path(scratch))
            with training_run(trainer_config(case, data_dir, Path(scratch) / "run"), quiet=True) as trainer:
                device = trainer.accelerator.device
                row["device_name"] = devices.name(device)
                row["processes"] = trainer.world_size
                devices.reset_peak_memory(device)
                seconds, paired = measure(trainer, case)
                row["peak_memory"] = devices.peak_memory_bytes(device)
                row.update(rates(case, seconds, paired, trainer.world_size, known))
                row.update(peaks.device_peak(device, row["device_name"], case.precision, trainer.config.tf32))
                row["mfu"] = row["achieved_tflops"] / row["peak_tflops"]
                row["status"] = "ok"
                del trainer  # before emptying the cache: the failed step's tensors must be unreachable first
        except Exception as error:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
            if devices.is_out_of_memory(error):
                row["status"], row["message"] = "oom", first_line(error)
            else:
                row["status"], row["message"] = "error", f"{type(error).__name__}: {first_line(error)}"
                if not isinstance(error, UserError):
                    traceback.print_exc()
    gc.collect()
    devices.empty_cache(case.device)
    return row


def measure(trainer: Any, case: Case) -> tuple[list[float], list[float]]:
    """(seconds of each timed window, and for the trainer pipeline the model-only step's paired windows)."""
    device = trainer.accelerator.device
    model_step, pipeline = steps_of(trainer, case)
    if case.pipeline == "model":
        return timing.timer_windows(model_step, device, case.warmup, case.steps, case.repeats), []
    return timing.paired_windows(timing.timed(pipeline, device), timing.timed(timing.repeated(model_step), device),
                                 case.warmup, case.steps, case.repeats)


def steps_of(trainer: Any, case: Case) -> tuple[Callable[[], Any], Callable[[int], Any]]:
    """(the model-only step, `count` steps of the trainer pipeline) of the case's mode."""
    if case.mode == "train":
        images, labels = trainer.example_batch(train=True)  # prepared once, as training prepares them
        return (lambda: trainer.train_step(images, labels)), trainer.train_steps
    images, _ = trainer.example_batch(train=False)

    def evaluations(count: int) -> None:
        # one evaluation is `steps` batches, so a window is one; the warm-up as many as it covers, at least one
        for _ in range(-(-count // case.steps)):
            trainer.evaluate()

    return (lambda: trainer.infer(images)), evaluations


def rates(case: Case, seconds: list[float], paired: list[float], processes: int,
          known: dict[str, Any]) -> dict[str, Any]:
    images = case.steps * case.batch_size * processes
    per_window = [images / s for s in seconds]
    # the trainer pipeline over the model-only step, window by window (same steps: the ratio of their times)
    over_model = statistics.median(m / s for s, m in zip(seconds, paired, strict=True)) if paired else None
    forward, step = flops_per_image(case.image_size, known)
    flops = step if case.mode == "train" else forward
    images_per_sec = statistics.median(per_window)
    return {"images_per_sec": images_per_sec, "images_per_sec_windows": per_window,
            "step_ms": timing.spread([1000 * s / case.steps for s in seconds]),
            "gflop_per_image": flops / 1e9, "achieved_tflops": images_per_sec * flops / 1e12,
            "trainer_over_model": over_model,
            "paired_model_images_per_sec": statistics.median(images / m for m in paired) if paired else None}


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


def flops_per_image(image_size: int, known: dict[str, Any]) -> tuple[int, int]:
    """(forward, training step) FLOPs per image, counted once per image size and passed on to later workers."""
    key = f"flops:{image_size}"
    if key not in known:
        from toolkit.model import flops_per_image as count

        known[key] = list(count(image_size))
    return tuple(known[key])  # type: ignore[return-value]
