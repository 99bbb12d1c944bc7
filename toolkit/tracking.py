"""Where a run's metrics go, written by the main process only: the trackers of `log_with`, through Accelerate's
tracking API, and `metrics.jsonl`. Keys are grouped: `train/...`, `eval/...`, `perf/...`, `memory/...`.

TensorBoard (the default) writes one event file under `<run folder>/tensorboard/`; after a resume, `purge_step`
drops the events a killed attempt wrote past its checkpoint, so curves continue without repeated steps. The
config goes in as text (Accelerate's hparams would start a second event file). Other trackers write where
their own settings say (a server, or a folder in the run folder for the offline ones).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from toolkit.errors import UsageError
from toolkit.files import write_atomic

# log_with name -> (module Accelerate imports, pip package)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "aim": ("aim", "aim"), "comet_ml": ("comet_ml", "comet-ml"),
            "clearml": ("clearml", "clearml"), "dvclive": ("dvclive", "dvclive")}
PROJECT = "toolkit"


def check_installed(names: list[str]) -> None:
    """A UsageError naming the pip package of the first tracker asked for but not installed."""
    for name in names:
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"log_with: {name} is not installed: pip install {package} (or log with another "
                             f"tracker, e.g. --log-with tensorboard)")


def _tracker(name: str, run_dir: Path, purge_step: int | None) -> Any:
    """Accelerate's tracker for `name`, writing into the run folder where the tracker keeps files locally."""
    from accelerate import tracking

    run_name = run_dir.name
    if name == "tensorboard":
        return tracking.TensorBoardTracker("tensorboard", run_dir, purge_step=purge_step)
    if name == "wandb":
        return tracking.WandBTracker(PROJECT, name=run_name, dir=str(run_dir))
    if name == "mlflow":
        # a local store in the run folder unless the user points MLflow elsewhere (a server, a database);
        # MLflow 3 refuses a folder store unless it is allowed
        if "MLFLOW_TRACKING_URI" not in os.environ:
            os.environ["MLFLOW_TRACKING_URI"] = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return tracking.MLflowTracker(PROJECT, run_name=run_name)
    if name == "aim":
        return tracking.AimTracker(run_name, run_dir)
    if name == "comet_ml":
        return tracking.CometMLTracker(PROJECT, experiment_name=run_name)
    if name == "clearml":
        return tracking.ClearMLTracker(PROJECT, task_name=run_name)
    if name == "dvclive":
        return tracking.DVCLiveTracker(run_name, dir=str(run_dir / "dvclive"), save_dvc_exp=False)
    raise ValueError(f"unknown tracker {name!r}")


class Trackers:
    """The trackers of one run, started through `accelerator.init_trackers` and written through
    `accelerator.log` (main process only: on the others every call does nothing)."""

    def __init__(self, accelerator: Accelerator, names: list[str], run_dir: Path, purge_step: int | None) -> None:
        self.accelerator = accelerator
        self.names = names
        if accelerator.is_main_process:
            # made here, once the run folder is known, rather than by name in Accelerator(log_with=...), which
            # would need the folder before the processes have agreed on it
            accelerator.log_with = [_tracker(name, run_dir, purge_step) for name in names]
            accelerator.init_trackers(PROJECT)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.accelerator.log(metrics, step=step)

    def log_config(self, text: str, values: dict[str, Any]) -> None:
        """The resolved config: as text in TensorBoard, as parameters elsewhere."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_text("config", "```\n" + text + "\n```", global_step=0)
                tracker.writer.flush()
            else:
                tracker.store_init_configuration({k: v if v != "" else "-" for k, v in values.items()})

    def log_text(self, tag: str, text: str) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_text(tag, "```\n" + text + "\n```", global_step=0)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        """Pictures (uint8 (H, W, 3) each) at `step`, for the trackers that show them."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({k: v[None] for k, v in images.items()}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({k: [v] for k, v in images.items()}, step=step)

    def flush(self) -> None:
        """On disk before a checkpoint: a resume purges what comes after it, and must find all before it."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.flush()

    def close(self) -> None:
        """Finish every tracker (TensorBoard's background writer included) while the run folder is still there: a
        run that failed to start has its folder removed next."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()


class JsonlSink:
    """`metrics.jsonl`: one JSON object per evaluation, flushed to disk as it is written. A resumed run first
    rewrites the file to the records its checkpoint holds, so no evaluation appears twice."""

    def __init__(self, path: Path, records: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        if records is not None:
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
        # opened in place, never through a link planted there
        self.file = open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666), "a")

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()
