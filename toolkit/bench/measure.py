"""One case in this process: build the trainer as training builds it, time its windows through the trainer's
public benchmark methods, and turn the seconds into rows (one per pipeline)."""

from __future__ import annotations

import contextlib
import gc
import signal
import statistics
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from toolkit import devices, peaks
from toolkit.bench import timing
from toolkit.bench.plan import Case, data_for, trainer_config
from toolkit.bench.results import blank_row
from toolkit.errors import UserError, one_line

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def signals_as_before() -> Iterator[None]:
    """Build the trainer with SIGTERM and SIGINT held back, then put back the handlers there were before (a worker
    process's defaults: SIGTERM ends it) and let a held signal through. A worker starts with the signals held
    (worker.start_worker), so its other threads hold them too and this thread is the one that takes them; no
    handler that only sets a flag (the training command's) is ever in place where a benchmark measures."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    holding = hasattr(signal, "pthread_sigmask")
    if holding:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        if holding:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def run_case(case: Case, known: dict[str, Any],
             warmed: Callable[[float], None] = lambda seconds: None) -> list[dict[str, Any]]:
    """Measure one configuration in this process: a row per pipeline. An out-of-memory error makes `oom` rows, any
    other error `error` rows; neither stops a sweep. `warmed` gets the seconds a step took in the warm-up."""
    from toolkit.train import training_run

    blank = [blank_row(case, pipeline) for pipeline in case.pipelines()]
    rows = blank
    facts: dict[str, Any] = {}  # what is known of the case so far: an error row keeps it too
    trainer = None
    with tempfile.TemporaryDirectory(prefix="toolkit-bench-") as scratch, contextlib.ExitStack() as run:
        try:
            data_dir, splits, facts["data"] = data_for(case, Path(scratch))
            with signals_as_before():
                trainer = run.enter_context(training_run(trainer_config(case, data_dir, Path(scratch) / "run"),
                                                         quiet=True, splits=splits, source=facts["data"]))
            device = trainer.accelerator.device
            facts.update(device_name=devices.name(device), processes=trainer.world_size)
            devices.reset_peak_memory(device)
            measured = measure(trainer, case, warmed)
            facts["peak_memory"] = devices.peak_memory_bytes(device)
            facts.update(peaks.device_peak(device, facts["device_name"], case.precision, trainer.config.tf32))
            rows = [{**row, **facts, **rates(case, row["pipeline"], measured, trainer.world_size, known)}
                    for row in rows]
            for row in rows:
                row["mfu"] = row["achieved_tflops"] / row["peak_tflops"]
        except Exception as error:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
            if devices.is_out_of_memory(error):
                status, message = "oom", one_line(error)
            else:
                status, message = "error", one_line(error)
                if not isinstance(error, UserError):
                    traceback.print_exc()
            rows = [{**row, **facts, "status": status, "message": message} for row in blank]
        finally:
            run.close()  # the trainer's parts given back before the scratch folder goes
    del trainer  # before emptying the cache: the failed step's tensors must be unreachable first
    gc.collect()
    devices.empty_cache(case.device)
    return rows


def measure(trainer: Any, case: Case, warmed: Callable[[float], None]) -> dict[str, timing.Timed]:
    """The timed windows of each pipeline the case measures: the model-only step alone (Timer), or the trainer
    pipeline in windows paired with the model-only step's."""
    device = trainer.accelerator.device
    model_step, pipeline = steps_of(trainer, case)
    if not case.paired():
        return {"model": timing.timer_windows(model_step, device, case.warmup, case.steps, case.repeats,
                                              case.budget_s, warmed)}
    own, partner = timing.paired_windows(timing.timed(pipeline, device),
                                         timing.timed(timing.repeated(model_step), device),
                                         case.warmup, case.steps, case.repeats, case.budget_s, warmed)
    return {"trainer": own, "model": partner}


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


def rates(case: Case, pipeline: str, measured: dict[str, timing.Timed], processes: int,
          known: dict[str, Any]) -> dict[str, Any]:
    """A row's numbers: its pipeline's windows, and for paired windows the ratio of the trainer's to the model's."""
    steps, seconds = measured[pipeline]
    images = steps * case.batch_size * processes
    per_window = [images / s for s in seconds]
    forward, step = flops_per_image(case.image_size, known)
    flops = step if case.mode == "train" else forward
    images_per_sec = statistics.median(per_window)
    found = {"steps": steps, "repeats": len(seconds), "images_per_sec": images_per_sec,
             "images_per_sec_windows": per_window, "step_ms": timing.spread([1000 * s / steps for s in seconds]),
             "gflop_per_image": flops / 1e9, "achieved_tflops": images_per_sec * flops / 1e12, "status": "ok"}
    if "trainer" in measured:
        model = measured["model"].seconds
        found["paired"] = True
        if pipeline == "trainer":
            # the trainer pipeline over the model-only step, pair by pair (same steps: the ratio of their times)
            found["trainer_over_model"] = statistics.median(m / s for s, m in zip(seconds, model, strict=True))
            found["paired_model_images_per_sec"] = statistics.median(images / m for m in model)
    return found


def run_cases(cases: list[Case], known: dict[str, Any],
              on_rows: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
              warmed: Callable[[int, float], None] = lambda index, seconds: None) -> list[dict[str, Any]]:
    """Measure `cases` one after another in this process (they must share device and precision)."""
    rows = []
    for index, case in enumerate(cases):
        found = run_case(case, known, lambda seconds, index=index: warmed(index, seconds))
        rows.extend(found)
        on_rows(found)
    return rows


def flops_per_image(image_size: int, known: dict[str, Any]) -> tuple[int, int]:
    """(forward, training step) FLOPs per image, counted once per image size and passed on to later workers."""
    key = f"flops:{image_size}"
    if key not in known:
        from toolkit.model import flops_per_image as count

        known[key] = list(count(image_size))
    return tuple(known[key])  # type: ignore[return-value]
