"""Metric sinks of a run, written by the main process only. Each has `log(metrics, step)` and `close()`.

Keys are grouped: `train/...`, `eval/...`, `perf/...`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from toolkit.files import write_atomic


class TensorBoardSink:
    """One event file per run under `log_dir`. After a resume, `purge_step` drops the events a killed run
    wrote past its checkpoint, so the curves continue without duplicated or out-of-order steps."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_text(self, tag: str, text: str) -> None:
        # hparams would start a second event file in a subfolder: the config goes in as text instead
        self.writer.add_text(tag, "```\n" + text + "\n```", global_step=0)
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class JsonlSink:
    """`metrics.jsonl`: one JSON object per epoch, flushed to disk as it is written. A resumed run first
    rewrites the file to the records its checkpoint holds, so no epoch appears twice."""

    def __init__(self, path: Path, records: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        if records is not None:
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
        self.file = open(path, "a")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()
