"""What a training run prints. Only the main process prints.

On a terminal: a header, a live progress bar (loss, images/s, ETA) and a table per evaluation, then a summary.
Otherwise (CI, nohup, SLURM logs): the same facts as plain lines, a progress line every `log_every_steps` steps,
no control codes. Either way the plain lines also go to the run folder's `console.log`, and a console whose reader
goes away (a closed pipe, `| head`, a terminal closed) goes on quietly: the run trains on and the log keeps it all.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

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


class Survivor:
    """A text stream that outlives its reader: once a write fails (a closed pipe, a terminal gone), the stream's
    file descriptor is pointed at /dev/null and the rest is dropped quietly, so that neither this run nor the
    interpreter's last flush at exit fails on it."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lost = False

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                self.stream.write(text)
            except (OSError, ValueError):  # ValueError: the stream was closed
                self._lose()
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self._lose()

    def _lose(self) -> None:
        self.lost = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)

    def isatty(self) -> bool:
        try:
            return not self.lost and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"


class LiveBars(Progress):
    """rich's Progress with a line of its own under the bars (where the time goes), so that the bars keep their
    width in a 100-column terminal."""

    detail = ""

    def get_renderables(self) -> Iterator[Any]:
        yield self.make_tasks_table(self.tasks)
        if self.detail:
            yield Text(self.detail, style="dim", no_wrap=True, overflow="ellipsis")


class TrainConsole:
    def __init__(self, enabled: bool) -> None:
        self.console = Console(file=Survivor(sys.stdout), quiet=not enabled, highlight=False)
        self.live = enabled and self.console.is_terminal
        self.console.soft_wrap = not self.console.is_terminal  # a log line stays one line, however long
        self.enabled = enabled
        self.log_file: IO[str] | None = None
        self.progress: Progress | None = None
        self.task = self.run_task = self.eval_task = None
        self.epoch_label = ""
        self.started = time.perf_counter()
        self.done_at_start = self.total_steps = 0

    def keep_log(self, path: Path) -> None:
        """From here on every line also goes to `path` (appended), in the plain form."""
        if self.enabled:
            if path.is_symlink():  # planted: replaced by the run's own file, never written through
                path.unlink()
            self.log_file = open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666), "a")

    def _logged(self, *lines: str) -> None:
        if self.log_file is not None:
            try:
                self.log_file.write("".join(line + "\n" for line in lines))
                self.log_file.flush()
            except OSError:  # a full disk: the terminal still has it
                pass

    def print(self, message: str) -> None:
        self.console.print(message, markup=False)
        self._logged(message)

    def _plain(self, *lines: str) -> None:
        """Lines for the log file, and for the console when it is not a terminal."""
        if not self.live:
            for line in lines:
                self.console.print(line, markup=False)
        self._logged(*lines)

    def header(self, facts: dict[str, Any], config: dict[str, Any], defaults: dict[str, Any] | None = None,
               config_file: str = "") -> None:
        """The facts of the run, and its config: in full in the log; on a terminal, the keys set away from their
        `defaults` (all of it is in `config_file`)."""
        config_line = "config: " + " ".join(f"{k}={v}" for k, v in config.items())
        if self.live:
            table = Table.grid(padding=(0, 2))
            for key, value in facts.items():
                table.add_row(f"[bold]{key}[/]", str(value))
            changed = {k: v for k, v in config.items() if defaults is None or defaults.get(k) != v}
            table.add_row("[bold]config[/]", Text((" ".join(f"{k}={v}" for k, v in changed.items()) or "the defaults")
                                                  + (f"; the rest as the defaults: all of it in {config_file}"
                                                     if config_file else ""), style="dim"))
            self.console.print(table)
        self._plain(" | ".join(f"{k}: {v}" for k, v in facts.items()), config_line)

    def epoch_started(self, epoch: int, epochs: int, total_steps: int, done_steps: int, run_done: int = 0,
                      run_total: int = 0) -> None:
        """An epoch (re)starts at `done_steps` of its `total_steps`; the run at `run_done` of `run_total`."""
        self.epoch_label = f"epoch {epoch + 1}/{epochs}"
        self.started = time.perf_counter()
        self.done_at_start = done_steps
        self.total_steps = total_steps
        if not self.live:
            return
        if self.progress is None:  # one live display for the whole run: a bar for the epoch, one for the run
            self.progress = LiveBars(TextColumn("{task.description}"), BarColumn(bar_width=28), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), console=self.console, transient=True,
                                     refresh_per_second=4)
            self.progress.start()
            self.run_task = self.progress.add_task("run", total=run_total, completed=run_done,
                                                   info="time so far and left: after the first steps")
            self.task = self.progress.add_task(self.epoch_label, total=total_steps, completed=done_steps,
                                               info="loss, images/s: after the first step")
        else:
            self.progress.update(self.task, description=self.epoch_label, total=total_steps, completed=done_steps)

    def advance(self, done_steps: int, run_done: int | None = None) -> None:
        """Called after every step: moves the live bars (nothing to read from the device)."""
        if self.progress is not None:
            self.progress.update(self.task, completed=done_steps)
            if run_done is not None:
                self.progress.update(self.run_task, completed=run_done)

    def log(self, done_steps: int, metrics: dict[str, float | None], first_window: bool = False,
            run: dict[str, float | None] | None = None, peek: bool = False) -> None:
        """Called at log steps with the loss, speed and memory of all processes since the last log, and `run`:
        the run's time so far and left (`elapsed_s`, `eta_s`). A `peek` (the first steps of a session, on a
        terminal only) moves the live bars and writes no line."""
        if not self.enabled:
            return
        loss = metrics["train/loss"]
        loss_text = f"{loss:.4f}" if loss is not None else "-"
        rate = f"{metrics['perf/images_per_sec']:,.0f}"
        epoch_eta = _eta(time.perf_counter() - self.started, done_steps - self.done_at_start,
                         self.total_steps - done_steps)
        where = []  # where the time goes
        if "perf/data_ms_per_step" in metrics:
            data, step = metrics["perf/data_ms_per_step"], metrics["perf/step_ms"]
            where.append(f"data {100 * data / max(data + step, 1e-9):.0f}%")
        if "perf/mfu" in metrics:
            where.append(f"{metrics['perf/tflops']:.2f} TFLOP/s ({metrics['perf/mfu']:.0%} of peak)")
        if "memory/peak_gib" in metrics:
            where.append(f"mem {metrics['memory/peak_gib']:.1f} GiB")
        left = _duration(run["eta_s"]) if run and run.get("eta_s") is not None else None
        if self.progress is not None:
            self.progress.update(self.task, completed=done_steps,
                                 info=f"loss {loss_text} · {rate} img/s · epoch ETA {epoch_eta}")
            elapsed = _duration(run["elapsed_s"]) if run else "-"
            self.progress.update(self.run_task, info=f"{elapsed} so far" + (f", about {left} left" if left else ""))
            self.progress.detail = "where the time goes: " + " · ".join(where) if where else ""
        if peek:
            return
        line = f"{self.epoch_label} step {done_steps}/{self.total_steps} loss {loss_text} images/s {rate}"
        line += "".join(f" {part}" for part in where)
        line += f" eta {epoch_eta}" + (f" (run: {left} left)" if left else "")
        self._plain(line + (" (first window: warm-up included)" if first_window else ""))

    def evaluating(self, batches: int) -> Callable[[], None]:
        """An evaluation starts: a bar for its batches on a terminal; the callback moves it (no host sync)."""
        if self.progress is None:
            return lambda: None
        task = self.progress.add_task("evaluating", total=batches, info="")
        self.eval_task = task
        return lambda: self.progress.advance(task) if self.progress is not None else None

    def evaluated(self, record: dict[str, Any]) -> None:
        """An evaluation: at an epoch's end ("epoch 2/8 done") or within one (`eval_every_steps`)."""
        label = self.epoch_label + (" done" if record["complete"] else f" step {record['step']} evaluated")
        if self.progress is not None and self.eval_task is not None:
            self.progress.remove_task(self.eval_task)
            self.eval_task = None
        if self.live:
            table = Table(title=label, title_justify="left")
            for title, _ in EPOCH_COLUMNS:
                table.add_column(title, justify="right")
            table.add_row(*(_format(key, record[key]) for _, key in EPOCH_COLUMNS))
            self.console.print(table)
        self._plain(label + ": " + ", ".join(
            f"{title} {_format(key, record[key])}" for title, key in EPOCH_COLUMNS[1:]))

    def summary(self, rows: dict[str, str]) -> None:
        """The end of a run: best accuracy, times to the milestones, totals, where things are."""
        if self.live:
            table = Table(title="summary", title_justify="left", show_header=False)
            for key, value in rows.items():
                table.add_row(key, value)
            self.console.print(table)
        self._plain(*(f"{key}: {value}" for key, value in rows.items()))

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
        self._plain(*(f"rank {row['rank']}: {row['images']:,} images in {row['seconds']:.1f}s, "
                      f"{row['images_per_sec']:,.0f} images/s, {row['step_ms']:.1f} ms/step" for row in rows))

    def close_live(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        self.close_live()
        if self.log_file is not None:
            with contextlib.suppress(OSError):
                self.log_file.close()
            self.log_file = None


def _eta(elapsed: float, done: int, remaining: int) -> str:
    if done <= 0:
        return "-"
    seconds = int(elapsed / done * remaining)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _duration(seconds: float) -> str:
    """1h02m, 12m05s, 45s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
