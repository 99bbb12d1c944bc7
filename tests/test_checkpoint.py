"""Checkpoint format, atomicity, retention and unsafe input (unit level, no training)."""

import errno
import json
import os
import pickle
from types import SimpleNamespace

import pytest
import torch

from toolkit import checkpoint
from toolkit.checkpoint import Checkpoint, CheckpointError, TrainProgress


class Sentinel:
    """Unpickling this creates a file: the proof that a loader ran code from a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def state(weights, trainer_state=None, train_weights=None, config=None, meta=None, **progress):
    return Checkpoint(weights=weights, train_weights=train_weights, trainer_state=trainer_state or {},
                      progress=TrainProgress(**progress), config=config or {}, meta=meta or {})


def tiny_save(directory, step, **extra):
    weights = {"w": torch.full((3,), float(step))}
    return checkpoint.save(directory, state(weights, {"optimizer": {"x": torch.ones(2)}, **extra}, step=step,
                                            config={"lr": 0.1}, meta={"world_size": 1}))


def test_save_is_complete_and_loads_back(tmp_path):
    path = tiny_save(tmp_path, 5)
    assert path.name == "step-00000005"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "config.yaml", "model.safetensors", "state.json",
                                                      "trainer_state.pt"]
    loaded = checkpoint.load(path)
    assert torch.equal(loaded.weights["w"], torch.full((3,), 5.0))
    assert loaded.progress.step == 5 and loaded.config == {"lr": 0.1} and loaded.meta["world_size"] == 1
    assert not list(tmp_path.glob(".tmp-*"))


def test_trained_weights_are_kept_beside_the_averaged_ones(tmp_path):
    path = checkpoint.save(tmp_path, state({"w": torch.zeros(2)}, train_weights={"w": torch.ones(2)}, step=1))
    loaded = checkpoint.load(path)
    assert torch.equal(loaded.weights["w"], torch.zeros(2)) and torch.equal(loaded.train_weights["w"], torch.ones(2))
    assert "train_model.safetensors" in json.loads((path / "COMPLETE").read_text())
    assert checkpoint.load(tiny_save(tmp_path / "plain", 1)).train_weights is None


def test_folder_without_marker_is_never_loaded(tmp_path):
    path = tiny_save(tmp_path, 1)
    (path / "COMPLETE").unlink()
    assert checkpoint.latest(tmp_path) == []
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpoint.load(path)


def test_truncated_file_is_named(tmp_path):
    path = tiny_save(tmp_path, 1)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupted"):
        checkpoint.load(path)


def test_corrupted_weights_of_the_right_size_are_refused(tmp_path):
    path = tiny_save(tmp_path, 1)
    weights = path / "model.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        checkpoint.load(path)


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tiny_save(tmp_path / "ck", 1)
    evil = path / "trainer_state.pt"
    torch.save({"optimizer": Sentinel(sentinel)}, evil)
    marker = json.loads((path / "COMPLETE").read_text())
    marker["trainer_state.pt"] = evil.stat().st_size  # a forged marker: sizes alone do not make it trusted
    (path / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="corrupted or unsafe"):
        checkpoint.load(path)
    # the same bytes where the weights belong
    (path / "model.safetensors").write_bytes(pickle.dumps(Sentinel(sentinel)))
    marker["model.safetensors"] = (path / "model.safetensors").stat().st_size
    (path / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        checkpoint.load(path)
    assert not sentinel.exists()


def test_retention_deletes_only_after_the_new_checkpoint_is_complete(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        tiny_save(tmp_path, step)
        checkpoint.prune(tmp_path, keep_last=2, keep=checkpoint.step_dir(tmp_path, 1))
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
        "step-00000001", "step-00000002", "step-00000003"]  # 1 is the best: kept apart from the last 2

    real_save = torch.save

    def crash_midway(obj, path, *args, **kwargs):
        with open(path, "wb") as file:
            file.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint step-00000004 in .*No space left on "
                                              r"device.*about \d+ MB.*from step-00000003, which is intact, "
                                              r"with --resume auto"):
        tiny_save(tmp_path, 4)
    monkeypatch.setattr(torch, "save", real_save)
    # the half-written folder is gone, and every complete checkpoint is still there and loadable
    assert not (tmp_path / ".tmp-step-00000004").exists()
    assert [p.name for p in checkpoint.latest(tmp_path)] == ["step-00000003", "step-00000002", "step-00000001"]
    checkpoint.load(checkpoint.latest(tmp_path)[0])

    tiny_save(tmp_path, 5)
    checkpoint.prune(tmp_path, keep_last=2, keep=checkpoint.step_dir(tmp_path, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000003", "step-00000005"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    tiny_save(tmp_path, 2)
    path = checkpoint.save(tmp_path, state({"w": torch.zeros(1)}, step=2))
    assert torch.equal(checkpoint.load(path).weights["w"], torch.zeros(1))
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]


def test_inference_picks_the_best_then_the_latest(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    tiny_save(checkpoints, 1)
    checkpoint.save(checkpoints, state({"w": torch.zeros(1)}, step=2, best_step=1, best_accuracy=0.9))
    assert checkpoint.for_inference(tmp_path) == (checkpoint.step_dir(checkpoints, 1), "best eval accuracy in the run")
    (checkpoint.step_dir(checkpoints, 1) / "COMPLETE").unlink()
    assert checkpoint.for_inference(tmp_path) == (checkpoint.step_dir(checkpoints, 2), "latest in the run")
    assert checkpoint.for_inference(checkpoints / "step-00000002")[1] == "checkpoint given"
    with pytest.raises(CheckpointError, match="nothing does not exist"):
        checkpoint.for_inference(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a run folder"):
        checkpoint.for_inference(tmp_path / "empty")
    (tmp_path / "model.pth").write_bytes(b"\x80\x04.")
    with pytest.raises(CheckpointError, match="model.pth is a file: a checkpoint is a folder"):
        checkpoint.for_inference(tmp_path / "model.pth")


def test_weights_of_another_model_are_refused_with_the_difference(tmp_path):
    model = torch.nn.Linear(2, 3)
    with pytest.raises(CheckpointError, match="missing bias.*shape weight"):
        checkpoint.load_weights_into(model, {"weight": torch.zeros(3, 3)}, tmp_path / "model.safetensors")


@pytest.mark.parametrize("optimizer, momentum, averaged", [("adamw", 0.9, False), ("adamw", 0.9, True),
                                                           ("sgd", 0.0, False), ("sgd", 0.9, True)])
def test_expected_bytes_is_the_size_a_checkpoint_takes(tmp_path, optimizer, momentum, averaged):
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.AdamW(model.parameters()) if optimizer == "adamw" else \
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    model(torch.randn(4, 512)).sum().backward()
    opt.step()
    path = checkpoint.save(tmp_path, state(model.state_dict(), {"optimizer": opt.state_dict()},
                                           train_weights=model.state_dict() if averaged else None, step=1))
    actual = sum(f.stat().st_size for f in path.iterdir())
    expected = checkpoint.expected_bytes(model, optimizer, momentum, averaged)
    assert expected <= actual <= expected * 1.02 + 32_000  # the tensors, plus headers and small files


def test_disk_warning_counts_what_the_run_keeps(tmp_path, monkeypatch):
    free = {"bytes": 0}
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    directory = tmp_path / "run" / "checkpoints"  # not there yet: the disk under it counts
    free["bytes"] = 3_999
    assert "need about 0.00 GB" in checkpoint.disk_warning(directory, per_checkpoint=1_000, keep_last=2)
    free["bytes"] = 4_000  # 2 kept + the best + the one being written
    assert checkpoint.disk_warning(directory, per_checkpoint=1_000, keep_last=2) is None
    big = 2 * 10**9
    free["bytes"] = 3 * big
    message = checkpoint.disk_warning(directory, per_checkpoint=big, keep_last=2)
    assert message == ("warning: 6.00 GB free for " + str(directory) + ", and checkpoints need about 8.00 GB more "
                       "(2 kept, the best, and the one being written, 2.00 GB each): free space or lower "
                       "--keep-last, or a save may fail")
    for step in (1, 2):  # checkpoints already there (a resumed run) take their part of the need
        tiny_save(directory, step)
    per = sum(f.stat().st_size for f in checkpoint.step_dir(directory, 2).iterdir())
    free["bytes"] = 2 * per  # room for the best and the one being written
    assert checkpoint.disk_warning(directory, per_checkpoint=per, keep_last=2) is None
    free["bytes"] = 2 * per - 1
    assert checkpoint.disk_warning(directory, per_checkpoint=per, keep_last=2) is not None
    free["bytes"] = per - 1  # the one being written always needs its own room
    assert checkpoint.disk_warning(directory, per_checkpoint=per, keep_last=0) is not None
