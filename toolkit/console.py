"""What a training run prints. Only the main process prints.

On a terminal: a header, a live progress bar (loss, images/s, ETA) and a table per epoch. Otherwise (CI,
nohup, SLURM logs): the same facts as plain lines, a progress line every `log_every_steps` steps, no control
codes.
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
        self.progress: Progress | None = None
        self.task = None
        self.epoch_label = ""
        self.started = 0.0

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

    def log(self, done_steps: int, loss: float | None, images_per_sec: float) -> None:
        """Called at log steps with the mean loss and the throughput of all processes since the last log."""
        loss_text = f"{loss:.4f}" if loss is not None else "-"
        if self.progress is not None:
            self.progress.update(self.task, completed=done_steps, loss=loss_text, rate=f"{images_per_sec:,.0f}")
        else:
            eta = _eta(time.perf_counter() - self.started, done_steps - self.done_at_start,
                       self.total_steps - done_steps)
            self.print(f"{self.epoch_label} step {done_steps}/{self.total_steps} loss {loss_text} "
                       f"images/s {images_per_sec:,.0f} eta {eta}")

    def epoch_finished(self, record: dict[str, Any]) -> None:
        self._stop_progress()
        if self.live:
            table = Table(title=self.epoch_label, title_justify="left")
            for title, _ in EPOCH_COLUMNS:
                table.add_column(title, justify="right")
            table.add_row(*(_format(key, record[key]) for _, key in EPOCH_COLUMNS))
            self.console.print(table)
        else:
            self.print(self.epoch_label + " done: " + ", ".join(
                f"{title} {_format(key, record[key])}" for title, key in EPOCH_COLUMNS[1:]))

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
