"""The results file: a row's fields, where the file goes when no --json names it, and writing it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from toolkit.bench.plan import Case

STATUSES = ("ok", "oom", "error")


def blank_row(case: Case, pipeline: str | None = None) -> dict[str, Any]:
    """A row with every field a result file holds: the case's settings (its `pipeline`, or the one given: a paired
    case makes a row for each), the measured fields empty, and the status `error` until the case is measured."""
    row = asdict(case)
    row.update(pipeline=pipeline or case.pipeline, paired=case.paired(), device_name=None, processes=1, data=None,
               images_per_sec=None, images_per_sec_windows=None, step_ms=None, peak_memory=None,
               gflop_per_image=None, achieved_tflops=None, peak_tflops=None, peak_source=None, matmul_tflops=None,
               mfu=None, trainer_over_model=None, paired_model_images_per_sec=None, status="error", message="")
    return row


def results_dir() -> Path:
    """The user's own folder for results: $XDG_DATA_HOME/toolkit/bench (~/.local/share/toolkit/bench), never the
    working directory (run from a checkout, results there would be untracked files in it)."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "toolkit" / "bench"


def default_json_path(label: str) -> Path:
    """<results_dir>/<label>-<YYYYMMDD-HHMMSS>.json: a new file for every run."""
    return results_dir() / f"{label}-{datetime.now():%Y%m%d-%H%M%S}.json"


def document(environment: dict[str, Any], rows: list[dict[str, Any]], cases: int, finished: int,
             stopped_by: str | None = None) -> str:
    """The results file's text: what ran it, the rows so far, and how far the run got."""
    run = {"cases": cases, "finished": finished, "stopped_by": stopped_by}
    return json.dumps({"environment": environment, "run": run, "results": rows}, indent=2) + "\n"
