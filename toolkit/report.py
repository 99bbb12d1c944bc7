"""What a run reports, and where: the console (main process), the trackers of `log_with`, `metrics.jsonl` and the
run folder's `config.yaml`. The trainer says what happened (`logged`, `evaluated`, `finished`...); the report
decides what each sink shows, and when a step logs (`should_log`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import devices, tracking
from toolkit.assemble import Parts
from toolkit.checkpoint import TrainProgress
from toolkit.config import TrainConfig, to_yaml
from toolkit.console import TrainConsole
from toolkit.errors import ACCELERATE_LAUNCHED
from toolkit.files import write_atomic
from toolkit.rundir import RunFolder
from toolkit.tracking import JsonlSink

MILESTONES = (0.98, 0.99, 0.995)  # accuracies whose time and images the run notes, reached or not


class RunReport:
    def __init__(self, config: TrainConfig, parts: Parts, folder: RunFolder, console: TrainConsole) -> None:
        self.config = config
        self.parts = parts
        self.folder = folder
        self.console = console
        self.main = parts.runtime.is_main
        self.trackers: tracking.Trackers | None = None
        self.jsonl: JsonlSink | None = None

    # ------------------------------------------------------------------ the start
    def begin(self, progress: TrainProgress, facts: dict[str, Any], warnings: list[str], resumed: bool) -> None:
        """Open the sinks (a resumed run's `metrics.jsonl` and TensorBoard curves continue from its checkpoint: what
        a killed attempt logged past it goes), write the resolved config, and print the header and the warnings."""
        config = self.config
        if self.main:
            self.console.keep_log(self.folder.console_log)
            write_atomic(self.folder.config_file, to_yaml(config))
            self.jsonl = JsonlSink(self.folder.metrics_file, records=progress.history)
        self.trackers = tracking.Trackers(self.parts.runtime.accelerator, config.trackers, self.folder.path,
                                          purge_step=progress.step + 1 if resumed else None)
        self.trackers.log_config(to_yaml(config), config.to_dict())
        self.console.header(facts, config.to_dict(), TrainConfig().to_dict(), str(self.folder.config_file))
        self.trackers.log_text("run", "\n".join(f"{k}: {v}" for k, v in facts.items()))
        for warning in warnings:
            self.console.print(warning)

    def print(self, line: str) -> None:
        self.console.print(line)

    # ------------------------------------------------------------------ the loop
    def should_log(self, step: int) -> bool:
        return step % self.config.log_every_steps == 0

    def should_peek(self, session_steps: int) -> bool:
        """Whether the live bar shows values before the first log step: at a session's steps 1, 2, 4, 8... below
        `log_every_steps`, on a terminal only (each is a host sync; a log read by no one needs none)."""
        return self.console.live and session_steps < self.config.log_every_steps and \
            session_steps & (session_steps - 1) == 0

    def run_steps(self) -> int:
        """The optimizer steps this run takes in all: its epochs', or `max_steps`."""
        total = self.parts.training.total_steps
        return min(total, self.config.max_steps) if self.config.max_steps else total

    def epoch_started(self, epoch: int, epoch_step: int, step: int) -> None:
        self.console.epoch_started(epoch, self.config.epochs, self.parts.training.steps_per_epoch, epoch_step,
                                   run_done=step, run_total=self.run_steps())

    def advanced(self, epoch_step: int, step: int) -> None:
        self.console.advance(epoch_step, step)

    def logged(self, step: int, epoch_step: int, metrics: dict[str, Any], first_window: bool = False,
               run: dict[str, float | None] | None = None, peek: bool = False) -> None:
        """A log step: the window's loss (None when no step ran in it), speed, time split and memory, and the
        run's time so far and left. The session's first window holds its warm-up (the first steps' kernel
        choices), and says so. A `peek` goes to the live bar only."""
        self.console.log(epoch_step, metrics, first_window, run, peek)
        if peek:
            return
        if metrics["train/loss"] is not None:
            self.trackers.log(metrics, step)

    def skipped(self, count: int, step: int) -> None:
        """fp16 steps the gradient scaler skipped so far (inf or NaN gradients)."""
        self.trackers.log({"train/skipped_steps": count}, step)

    def evaluating(self, batches: int) -> Any:
        """An evaluation of `batches` batches starts: the callback its loop calls after each one."""
        return self.console.evaluating(batches)

    def evaluated(self, record: dict[str, Any], images: dict[str, np.ndarray] | None) -> None:
        """An evaluation's record (metrics.jsonl, the console, the trackers' curves) and, on the main process, its
        pictures (`images`)."""
        step = record["step"]
        self.trackers.log({"eval/loss": record["eval_loss"], "eval/accuracy": record["eval_accuracy"],
                           "train/epoch_loss": record["train_loss"],
                           "perf/epoch_images_per_sec": record["images_per_sec"]}, step)
        if images:
            self.trackers.log_images(images, step)
        if self.jsonl:
            self.jsonl.log(record)
        self.console.evaluated(record)

    def flush(self) -> None:
        """On disk before a checkpoint: a resume purges what comes after it, and must find all before it."""
        if self.trackers:
            self.trackers.flush()

    # ------------------------------------------------------------------ the end
    def finished(self, ranks: list[dict[str, Any]], stop_line: str | None, summary: dict[str, str],
                 profile: tuple[Path, str] | None) -> None:
        self.console.close_live()  # the bars go before the last lines, whatever a ^C echoed into them
        self.console.ranks(ranks)
        if stop_line:
            self.console.print(stop_line)
        self.console.summary(summary)
        if profile:
            trace, table = profile
            self.console.print(f"profile of steps {trace.stem.removeprefix('trace-steps-').replace('-', ' to ')}: "
                               f"{trace} (open in "
                               f"https://ui.perfetto.dev); top operators by self time:\n{table}")

    def close(self) -> None:
        """Every sink closed, the trackers' background writers included, while the run folder is still there."""
        if self.jsonl:
            self.jsonl.close()
        if self.trackers:
            self.trackers.close()
        self.console.close()


def checkpoints_fact(config: TrainConfig, full: int, slim: int | None) -> str:
    if not config.save_checkpoints:
        return "none (save_checkpoints false)"
    kept = "the newest and the best" if config.keep_last == 1 else f"the newest {config.keep_last} and the best"
    older = f", {slim / 1e9:.2f} GB once older (weights only)" if slim is not None else ""
    return f"{full / 1e9:.2f} GB{older}; {kept} are kept"


def facts(parts: Parts, folder: RunFolder, bytes_per_checkpoint: int, resumed: str | None,
          slim_bytes: int | None = None) -> dict[str, Any]:
    """The header: where the run runs, on what, and where it writes."""
    config, run, data = parts.config, parts.runtime, parts.data
    batch, world, accumulate = parts.images_per_step, run.world_size, min(config.grad_accum_steps, len(data.train))
    facts = {
        "device": f"{run.device} ({devices.name(run.torch_device)})",
        "precision": f"{devices.describe_precision(run.torch_device, run.precision, config.tf32)} "
                     f"({run.precision_source}{launcher_precision_note(run)})",
        "processes": f"{world} ({run.accelerator.distributed_type.value})",
        "global batch": f"{parts.global_batch_size} ({batch} x {world}"
                        + (f" x {accumulate} accumulated)" if accumulate > 1 else ")"),
        "parameters": f"{sum(p.numel() for p in parts.training.network.parameters()):,}",
        "steps/epoch": parts.training.steps_per_epoch,
        "data": data.source,
        "evaluated on": data.description,
        "checkpoints": checkpoints_fact(config, bytes_per_checkpoint, slim_bytes),
        "run folder": str(folder.path),
    }
    if resumed:
        facts["resumed"] = resumed
    return facts


def launcher_precision_note(run: Any) -> str:
    """Under `accelerate launch` without `--mixed_precision`, the launcher lists `'no'` among the defaults it used:
    that is only what it was told, and the run's own precision (auto) decided."""
    if os.environ.get(ACCELERATE_LAUNCHED) == "no" and run.precision_source.startswith("auto"):
        return "; accelerate launch's `--mixed_precision 'no'` only says it was given none"
    return ""


def milestones(config: TrainConfig) -> tuple[float, ...]:
    """The accuracies whose time and images the run notes: MILESTONES, and the target if there is one."""
    return MILESTONES + ((config.target_accuracy,) if config.target_accuracy else ())


def summary(progress: TrainProgress, config: TrainConfig, wall_seconds: float, best: Path | None,
            run_folder: Path, evaluations_a_run: str) -> dict[str, str]:
    """The end-of-run rows: the best accuracy, the time to each milestone reached, the totals."""
    rows = {}
    if progress.best_step >= 0:
        rows["best eval accuracy"] = (f"{progress.best_accuracy:.2%} at step {progress.best_step}"
                                      + (f" ({best})" if best else ""))
    for threshold in milestones(config):
        reached = progress.reached.get(f"{threshold:g}")
        if reached:
            rows[f"time to {threshold:.1%}"] = (f"{reached['train_seconds']:.1f} s training, "
                                                f"{reached['wall_seconds']:.1f} s wall, "
                                                f"{reached['images_seen']:,} images (step {reached['step']})")
    if any(key.startswith("time to") for key in rows):
        rows["time to ... resolution"] = evaluations_a_run
    rows["training time"] = (f"{progress.train_seconds:.1f} s ({progress.images_seen:,} images, "
                             f"{progress.images_seen / max(progress.train_seconds, 1e-9):,.0f} images/s)")
    rows["wall time"] = f"{wall_seconds:.1f} s"
    rows["run folder"] = str(run_folder)
    return rows
