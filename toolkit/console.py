"""What a training run prints. Only the main process prints.

On a terminal: a header, a live progress bar (loss, images/s, ETA) and a table per evaluation, then a summary.
Otherwise (CI, nohup, SLURM logs): the same facts as plain lines, a progress line every `log_every_steps` steps,
no control codes.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

EPOCH_COLUMNS = (("epoch", "epoch"), ("train loss", "train_loss"), ("eval loss", "eval_loss"),
                 ("accuracy", "eval_accuracy"), ("time", "epoch_s"), ("images/s", "images_per_sec"))


def _format(key: str, value: Any) -> str:
    if key == "eval_accuracy":
        return f"{value:.2%}"
    if key.endswith("loss"):
        return f"{value:.4f}"
    if key == "epoch_s":
        return f"{value:.1f}s"
    if key == "images_per_sec":
        return f"{value:,.0f}"
    return str(value)


class TrainConsole:
    def __init__(self, enabled: bool) -> None:
        self.console = Console(quiet=not enabled, highlight=False)
        self.live = enabled and self.console.is_terminal
        self.console.soft_wrap = not self.console.is_terminal  # a log line stays one line, however long
        self.enabled = enabled
        self.progress: Progress | None = None
        self.task = None
        self.epoch_label = ""
        self.started = time.perf_counter()
        self.done_at_start = self.total_steps = 0

    def print(self, message: str) -> None:
        self.console.print(message, markup=False)

    def header(self, facts: dict[str, Any], config: dict[str, Any]) -> None:
        if self.live:
            table = Table.grid(padding=(0, 2))
            for key, value in facts.items():
                table.add_row(f"[bold]{key}[/]", str(value))
            self.console.print(table)
            self.console.print("[dim]config: " + " ".join(f"{k}={v}" for k, v in config.items()) + "[/]")
        else:
            self.print(" | ".join(f"{k}: {v}" for k, v in facts.items()))
            self.print("config: " + " ".join(f"{k}={v}" for k, v in config.items()))

    def epoch_started(self, epoch: int, epochs: int, total_steps: int, done_steps: int) -> None:
        self.epoch_label = f"epoch {epoch + 1}/{epochs}"
        self.started = time.perf_counter()
        self.done_at_start = done_steps
        self.total_steps = total_steps
        if self.live:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"),
                                     TextColumn("{task.fields[rate]} img/s"),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     console=self.console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.epoch_label, total=total_steps, completed=done_steps,
                                               loss="-", rate="-")

    def advance(self, done_steps: int) -> None:
        """Called after every step: moves the live bar (nothing to read from the device)."""
        if self.progress is not None:
            self.progress.update(self.task, completed=done_steps)

    def log(self, done_steps: int, metrics: dict[str, float | None]) -> None:
        """Called at log steps with the loss, speed and memory of all processes since the last log."""
        if not self.enabled:
            return
        loss = metrics["train/loss"]
        loss_text = f"{loss:.4f}" if loss is not None else "-"
        rate = f"{metrics['perf/images_per_sec']:,.0f}"
        if self.progress is not None:
            self.progress.update(self.task, completed=done_steps, loss=loss_text, rate=rate)
            return
        eta = _eta(time.perf_counter() - self.started, done_steps - self.done_at_start,
                   self.total_steps - done_steps)
        line = f"{self.epoch_label} step {done_steps}/{self.total_steps} loss {loss_text} images/s {rate}"
        if "perf/data_ms_per_step" in metrics:
            data, step = metrics["perf/data_ms_per_step"], metrics["perf/step_ms"]
            line += f" data {100 * data / max(data + step, 1e-9):.0f}%"
        if "perf/mfu" in metrics:
            line += f" {metrics['perf/tflops']:.2f} TFLOP/s ({metrics['perf/mfu']:.0%} of peak)"
        if "memory/peak_gib" in metrics:
            line += f" mem {metrics['memory/peak_gib']:.1f} GiB"
        self.print(f"{line} eta {eta}")

    def evaluated(self, record: dict[str, Any]) -> None:
        """An evaluation: at an epoch's end ("epoch 2/8 done") or within one (`eval_every_steps`)."""
        label = self.epoch_label + (" done" if record["complete"] else f" step {record['step']} evaluated")
        if record["complete"]:
            self._stop_progress()
        if self.live:
            table = Table(title=label, title_justify="left")
            for title, _ in EPOCH_COLUMNS:
                table.add_column(title, justify="right")
            table.add_row(*(_format(key, record[key]) for _, key in EPOCH_COLUMNS))
            self.console.print(table)
        else:
            self.print(label + ": " + ", ".join(
                f"{title} {_format(key, record[key])}" for title, key in EPOCH_COLUMNS[1:]))

    def summary(self, rows: dict[str, str]) -> None:
        """The end of a run: best accuracy, times to the milestones, totals, where things are."""
        if self.live:
            table = Table(title="summary", title_justify="left", show_header=False)
            for key, value in rows.items():
                table.add_row(key, value)
            self.console.print(table)
        else:
            for key, value in rows.items():
                self.print(f"{key}: {value}")

    def ranks(self, rows: list[dict[str, Any]]) -> None:
        """Per-process throughput, so a straggler shows."""
        if len(rows) < 2:
            return
        if self.live:
            table = Table(title="per process", title_justify="left")
            for column in ("rank", "images", "seconds", "images/s", "step ms"):
                table.add_column(column, justify="right")
            for row in rows:
                table.add_row(str(row["rank"]), f"{row['images']:,}", f"{row['seconds']:.1f}",
                              f"{row['images_per_sec']:,.0f}", f"{row['step_ms']:.1f}")
            self.console.print(table)
        else:
            for row in rows:
                self.print(f"rank {row['rank']}: {row['images']:,} images in {row['seconds']:.1f}s, "
                           f"{row['images_per_sec']:,.0f} images/s, {row['step_ms']:.1f} ms/step")

    def _stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        self._stop_progress()


def _eta(elapsed: float, done: int, remaining: int) -> str:
    if done <= 0:
        return "-"
    seconds = int(elapsed / done * remaining)
    return f"{seconds // 60}m{seconds % 60:02d}s"
