"""The trackers through Accelerate (TensorBoard here: one event file, the config as text, purged on resume) and
metrics.jsonl (rewritten to the checkpoint's records on resume)."""

import json
import time

import numpy as np
import pytest
from accelerate import Accelerator
from conftest import accelerate_state

from toolkit import tracking
from toolkit.errors import UsageError


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events, [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_through_accelerate_config_images_and_purge_on_resume(tmp_path):
    with accelerate_state():
        first = tracking.Trackers(Accelerator(cpu=True), ["tensorboard"], tmp_path, purge_step=None)
        first.log_config("lr: 0.1\n", {"lr": 0.1})
        for step in (1, 2, 3):
            first.log({"train/loss": float(step)}, step)
        first.log_images({"eval/confusion": np.zeros((8, 8, 3), dtype=np.uint8)}, step=3)
        first.accelerator.end_training()
    # event files sort by their second of creation, then by a per-process writer count: a resume is a new process
    # in a later second, and the test's second session must be too, or a reader would take the files out of order
    time.sleep(1.1)
    with accelerate_state():  # resumed from step 1's checkpoint: steps 2 and 3 are dropped, then logged again
        again = tracking.Trackers(Accelerator(cpu=True), ["tensorboard"], tmp_path, purge_step=2)
        again.log({"train/loss": 20.0}, 2)
        again.accelerator.end_training()
    events, loss = scalars(tmp_path / "tensorboard", "train/loss")
    assert loss == [(1, 1.0), (2, 20.0)]
    # one event file per session, side by side (no subfolder, as hparams would make)
    files = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(files) == 2 and {f.parent for f in files} == {tmp_path / "tensorboard"}
    assert "config/text_summary" in events.Tags()["tensors"]
    assert "eval/confusion" in events.Tags()["images"]


def test_a_tracker_not_installed_names_its_pip_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "comet_ml" else real(name, *a))
    with pytest.raises(UsageError, match="log_with: comet_ml is not installed: pip install comet-ml"):
        tracking.check_installed(["tensorboard", "comet_ml"])
    tracking.check_installed(["tensorboard"])


def test_jsonl_is_rewritten_to_the_checkpoints_records_then_appended(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')  # a killed run logged 2 and 3 after its checkpoint
    sink = tracking.JsonlSink(path, records=[{"step": 1}])
    sink.log({"step": 2, "eval_accuracy": 0.5})
    sink.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1},
                                                                             {"step": 2, "eval_accuracy": 0.5}]


def test_mlflow_gets_the_config_and_metrics_in_the_run_folder(tmp_path, monkeypatch):
    # a non-default tracker for real (mlflow-skinny is in the test extras): an offline store in the run folder
    pytest.importorskip("mlflow", reason="the test extras install mlflow-skinny: pip install -e '.[test]'")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with accelerate_state():
        trackers = tracking.Trackers(Accelerator(cpu=True), ["tensorboard", "mlflow"], tmp_path, purge_step=None)
        trackers.log_config("lr: 0.1\n", {"lr": 0.1, "output_dir": ""})
        for step in (1, 2):
            trackers.log({"train/loss": 1.0 / step, "eval/accuracy": 0.5 * step}, step)
        trackers.log_images({"eval/confusion": np.zeros((8, 8, 3), dtype=np.uint8)}, step=2)  # TensorBoard only
        trackers.accelerator.end_training()
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name(tracking.PROJECT).experiment_id])
    assert run.data.params == {"lr": "0.1", "output_dir": "-"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(1, 1.0),
                                                                                                     (2, 0.5)]
    assert run.data.metrics["eval/accuracy"] == 1.0
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1  # beside it, unchanged
