"""The results file: a row's fields, where the file goes by default, and writing it."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from toolkit.bench.plan import Case
from toolkit.files import write_atomic

RESULTS_DIR = Path("benchmarks") / "results"
STATUSES = ("ok", "oom", "error")


def blank_row(case: Case) -> dict[str, Any]:
    """A row with every field a result file holds: the case's settings, the measured fields empty, and the status
    `error` until the case is measured."""
    row = asdict(case)
    row.update(device_name=None, processes=1, data=None, images_per_sec=None, images_per_sec_windows=None,
               step_ms=None, peak_memory=None, gflop_per_image=None, achieved_tflops=None, peak_tflops=None,
               peak_source=None, matmul_tflops=None, mfu=None, trainer_over_model=None,
               paired_model_images_per_sec=None, status="error", message="")
    return row


def default_json_path(label: str) -> Path:
    """benchmarks/results/<label>-<YYYYMMDD>.json under the working directory; a time is added rather than
    overwrite an earlier run of the same day."""
    now = datetime.now()
    path = RESULTS_DIR / f"{label}-{now:%Y%m%d}.json"
    return path.with_name(f"{label}-{now:%Y%m%d-%H%M%S}.json") if path.exists() else path


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(document, indent=2) + "\n")
