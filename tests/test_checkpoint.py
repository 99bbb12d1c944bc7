"""Checkpoint format, atomicity, retention and unsafe input (unit level, no training)."""

import errno
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

from toolkit import checkpoint, saver
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


def reseal(path, legacy=False):
    """Rewrite a checkpoint's marker to match its files as they are now (what a forger, or an editor, does)."""
    files = {name: path / name for name in checkpoint.FILES if (path / name).exists()}
    if legacy:  # the earlier format: sizes only
        marker = {name: file.stat().st_size for name, file in files.items()}
    else:
        marker = {"format": 2, "files": {name: {"bytes": file.stat().st_size,
                                                "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
                                         for name, file in files.items()}}
    (path / "COMPLETE").write_text(json.dumps(marker))


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
    assert "train_model.safetensors" in json.loads((path / "COMPLETE").read_text())["files"]
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
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted: its contents differ"):
        checkpoint.load(path)
    reseal(path)  # a marker forged to match: the file itself is still checked
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        checkpoint.load(path)


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tiny_save(tmp_path / "ck", 1)
    evil = path / "trainer_state.pt"
    torch.save({"optimizer": Sentinel(sentinel)}, evil)
    with pytest.raises(CheckpointError, match="trainer_state.pt is truncated or corrupted"):
        checkpoint.load(path)
    reseal(path)  # a forged marker: sizes and checksums anyone can compute do not make a file trusted
    with pytest.raises(CheckpointError, match="corrupted or unsafe"):
        checkpoint.load(path)
    # the same bytes where the weights belong
    (path / "model.safetensors").write_bytes(pickle.dumps(Sentinel(sentinel)))
    reseal(path)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        checkpoint.load(path)
    assert not sentinel.exists()


def test_retention_deletes_only_after_the_new_checkpoint_is_complete(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        tiny_save(tmp_path, step)
        saver.prune(tmp_path, keep_last=2, keep=checkpoint.step_dir(tmp_path, 1))
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
        "step-00000001", "step-00000002", "step-00000003"]  # 1 is the best: kept apart from the last 2

    real_save = torch.save

    def crash_midway(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint step-00000004 in .*No space left on "
                                              r"device.*about \d+ MB.*from step-00000003, which is intact, "
                                              r"with --resume auto"):
        tiny_save(tmp_path, 4)
    monkeypatch.setattr(torch, "save", real_save)
    # the half-written folder is gone, and every complete checkpoint is still there and loadable
    assert not list(tmp_path.glob(".tmp-*"))
    assert [p.name for p in checkpoint.latest(tmp_path)] == ["step-00000003", "step-00000002", "step-00000001"]
    checkpoint.load(checkpoint.latest(tmp_path)[0])

    tiny_save(tmp_path, 5)
    saver.prune(tmp_path, keep_last=2, keep=checkpoint.step_dir(tmp_path, 1))
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
    expected = saver.expected_bytes(model, optimizer, momentum, averaged)
    assert expected <= actual <= expected * 1.02 + 32_000  # the tensors, plus headers and small files


def test_disk_warning_counts_what_the_run_keeps(tmp_path, monkeypatch):
    free = {"bytes": 0}
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    directory = tmp_path / "run" / "checkpoints"  # not there yet: the disk under it counts
    free["bytes"] = 3_999
    assert "need about 0.00 GB" in saver.disk_warning(directory, per_checkpoint=1_000, keep_last=2)
    free["bytes"] = 4_000  # 2 kept + the best + the one being written
    assert saver.disk_warning(directory, per_checkpoint=1_000, keep_last=2) is None
    big = 2 * 10**9
    free["bytes"] = 3 * big
    message = saver.disk_warning(directory, per_checkpoint=big, keep_last=2)
    assert message == ("warning: 6.00 GB free for " + str(directory) + ", and checkpoints need about 8.00 GB more "
                       "(2 kept, the best, and the one being written, 2.00 GB each): free space or lower "
                       "--keep-last, or a save may fail")
    for step in (1, 2):  # checkpoints already there (a resumed run) take their part of the need
        tiny_save(directory, step)
    per = sum(f.stat().st_size for f in checkpoint.step_dir(directory, 2).iterdir())
    free["bytes"] = 2 * per  # room for the best and the one being written
    assert saver.disk_warning(directory, per_checkpoint=per, keep_last=2) is None
    free["bytes"] = 2 * per - 1
    assert saver.disk_warning(directory, per_checkpoint=per, keep_last=2) is not None
    free["bytes"] = per - 1  # the one being written always needs its own room
    assert saver.disk_warning(directory, per_checkpoint=per, keep_last=0) is not None


# --- integrity: checksums, and every field of the metadata checked ---

def test_same_size_corruption_is_caught_by_the_checksum(tmp_path):
    # tensors large enough that the damage lands in their data, which parses as well as before
    path = checkpoint.save(tmp_path, state({"w": torch.arange(4096.0)}, {"optimizer": {"x": torch.arange(4096.0)}},
                                           step=1, config={"lr": 0.1}))
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["format"] == 2 and set(marker["files"]) == {"model.safetensors", "trainer_state.pt", "state.json",
                                                              "config.yaml"}
    for name, entry in marker["files"].items():  # what `sha256sum` says of each file
        assert entry == {"bytes": (path / name).stat().st_size,
                         "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
    for name in ("model.safetensors", "trainer_state.pt", "state.json", "config.yaml"):
        file = path / name
        original = file.read_bytes()
        middle = len(original) // 2
        file.write_bytes(original[:middle] + b"\xff" * min(64, len(original) - middle) + original[middle + 64:])
        assert file.stat().st_size == len(original)
        with pytest.raises(CheckpointError, match=f"{name} is corrupted: its contents differ from those saved"):
            checkpoint.load(path)
        with pytest.raises(CheckpointError, match=f"{name} is corrupted"):
            checkpoint.verify(path)
        if name != "trainer_state.pt":  # a reader that reads only some files checks only those
            with pytest.raises(CheckpointError, match=f"{name} is corrupted"):
                checkpoint.verify(path, files=["model.safetensors", "config.yaml", "state.json"])
        else:
            checkpoint.verify(path, files=["model.safetensors", "config.yaml", "state.json"])
        file.write_bytes(original)
    checkpoint.load(path)


def test_checkpoints_of_the_earlier_size_only_format_still_load_and_say_so(tmp_path):
    for step in (1, 2):
        tiny_save(tmp_path, step)
    reseal(checkpoint.step_dir(tmp_path, 2), legacy=True)
    said = []
    loaded = saver.choose_for_resume(tmp_path, "auto", said.append)
    assert loaded.progress.step == 2 and not checkpoint.has_checksums(loaded.path)
    assert said == [f"note: {loaded.path} was saved by an earlier version, without checksums: its file sizes were "
                    f"checked, not its contents"]
    # what that format cannot see: same-size damage where the parser still reads a valid file
    weights = loaded.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\xff\xff\xff\xff"  # the last weight's bytes
    weights.write_bytes(bytes(data))
    assert not torch.equal(checkpoint.load(loaded.path).weights["w"], torch.full((3,), 2.0))
    saver.choose_for_resume(tmp_path, "auto", said.append)
    assert len(said) == 2 and said[1].startswith("note: ")  # nothing more to say, and nothing it can


def edit_json(name, change):
    def edit(path):
        data = json.loads((path / name).read_text())
        change(data)
        (path / name).write_text(json.dumps(data))
    return edit


def write(name, content):
    def edit(path):
        (path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return edit


def progress(key, value):
    return edit_json("state.json", lambda d: d["progress"].__setitem__(key, value))


def marker_file(name, key, value):
    return edit_json("COMPLETE", lambda d: d["files"][name].__setitem__(key, value))


def legacy_marker(change):
    def edit(path):
        reseal(path, legacy=True)
        edit_json("COMPLETE", change)(path)
    return edit


# (case, how the marker is damaged, what the error line says after the checkpoint's folder)
CORRUPTED_MARKERS = [
    ("a JSON list", write("COMPLETE", "[1, 2]"), "COMPLETE is corrupted: a list where an object belongs"),
    ("not JSON", write("COMPLETE", b"\x00\xff{"), "COMPLETE is corrupted: not JSON"),
    ("null", write("COMPLETE", "null"), "COMPLETE is corrupted: null where an object belongs"),
    ("another format", edit_json("COMPLETE", lambda d: d.__setitem__("format", 3)),
     "COMPLETE is of format 3, which this version does not read"),
    ("unknown key", edit_json("COMPLETE", lambda d: d.__setitem__("extra", 1)),
     "COMPLETE is corrupted: unknown key 'extra'"),
    ("files a list", edit_json("COMPLETE", lambda d: d.__setitem__("files", [])),
     "COMPLETE is corrupted: files is a list where an object belongs"),
    ("without state.json", edit_json("COMPLETE", lambda d: d["files"].pop("state.json")),
     "COMPLETE is corrupted: it does not list state.json"),
    ("a path outside", edit_json("COMPLETE", lambda d: d["files"].__setitem__(
        "../../etc/passwd", d["files"]["config.yaml"])), "COMPLETE is corrupted: it lists '../../etc/passwd'"),
    ("entry a number", edit_json("COMPLETE", lambda d: d["files"].__setitem__("config.yaml", 12)),
     'COMPLETE is corrupted: the entry of config.yaml is not {"bytes": ..., "sha256": ...}'),
    ("size a string", marker_file("state.json", "bytes", "12"),
     'COMPLETE is corrupted: state.json bytes is the string "12", not a whole number'),
    ("size negative", marker_file("state.json", "bytes", -1),
     "COMPLETE is corrupted: state.json bytes is -1, not a finite value of at least 0"),
    ("checksum not hex", marker_file("state.json", "sha256", "xyz"),
     'COMPLETE is corrupted: the sha256 of state.json is the string "xyz", not 64 hexadecimal digits'),
    ("size-only: size true", legacy_marker(lambda d: d.__setitem__("config.yaml", True)),
     "COMPLETE is corrupted: config.yaml is true, not a whole number"),
    ("size-only: unknown file", legacy_marker(lambda d: d.__setitem__("notes.txt", 3)),
     "COMPLETE is corrupted: it lists 'notes.txt', which is not a checkpoint file"),
    ("size-only: without weights", legacy_marker(lambda d: d.pop("model.safetensors")),
     "COMPLETE is corrupted: it does not list model.safetensors"),
]


@pytest.mark.parametrize("case, damage, message", CORRUPTED_MARKERS, ids=[c[0] for c in CORRUPTED_MARKERS])
def test_every_marker_field_is_checked_and_named(tmp_path, case, damage, message):
    path = tiny_save(tmp_path, 5)
    damage(path)
    for check in (checkpoint.load, checkpoint.verify):
        with pytest.raises(CheckpointError) as raised:
            check(path)
        assert str(raised.value).startswith(f"{path}/{message}") and "\n" not in str(raised.value), raised.value


# (case, how a file is damaged, what the error line says after the checkpoint's folder). The marker is resealed
# after each damage (its sizes and checksums then match), so each case tests the field checks themselves: what
# stands between a same-size corruption and a traceback for checkpoints of the size-only format.
CORRUPTED_FIELDS = [
    ("state.json a list", write("state.json", "[]"), "state.json is corrupted: a list where an object belongs"),
    ("state.json not JSON", write("state.json", "{progress"), "state.json is corrupted: not JSON"),
    ("progress missing", edit_json("state.json", lambda d: d.pop("progress")),
     "state.json is corrupted: progress is null where an object belongs"),
    ("step a string", progress("step", "abc"),
     'state.json is corrupted: progress.step is the string "abc", not a whole number'),
    ("step a fraction", progress("step", 3.5), "state.json is corrupted: progress.step is the number 3.5, not a "
                                               "whole number"),
    ("step true", progress("step", True), "state.json is corrupted: progress.step is true, not a whole number"),
    ("epoch negative", progress("epoch", -2), "state.json is corrupted: progress.epoch is -2, not a finite value of "
                                              "at least 0"),
    ("loss sum not finite", progress("epoch_loss_sum", float("nan")),
     "state.json is corrupted: progress.epoch_loss_sum is nan, not a finite value"),
    ("best accuracy above 1", progress("best_accuracy", 1.5),
     "state.json is corrupted: progress.best_accuracy is 1.5, neither -1"),
    ("best step past the step", progress("best_step", 9), "state.json is corrupted: progress.best_step is 9, past "
                                                          "progress.step 5"),
    ("unknown progress field", progress("learning", 1), "state.json is corrupted: unknown progress field 'learning'"),
    ("history an object", progress("history", {}), "state.json is corrupted: progress.history is an object where a "
                                                   "list belongs"),
    ("history record a list", progress("history", [[1]]), "state.json is corrupted: progress.history[0] is a list "
                                                          "where an object belongs"),
    ("history record without accuracy", progress("history", [{"epoch": 1}]),
     "state.json is corrupted: progress.history[0].eval_accuracy is null, not a number"),
    ("step of another folder", progress("step", 4), "state.json is corrupted: progress.step is 4, and the folder is "
                                                    "step-00000005"),
    ("world size a string", edit_json("state.json", lambda d: d.__setitem__("world_size", "2")),
     'state.json is corrupted: world_size is the string "2", not a whole number'),
    ("world size 0", edit_json("state.json", lambda d: d.__setitem__("world_size", 0)),
     "state.json is corrupted: world_size is 0, not at least 1"),
    ("device a number", edit_json("state.json", lambda d: d.__setitem__("device", 3)),
     "state.json is corrupted: device is the number 3, not a string"),
    ("config a list", write("config.yaml", "- lr\n- 0.1\n"),
     "config.yaml is corrupted: a YAML list where a mapping of keys to values belongs"),
    ("config not YAML", write("config.yaml", "lr: [0.1\n"), "config.yaml is corrupted: not YAML"),
    ("config not text", write("config.yaml", b"lr: \xff\xfe\n"), "config.yaml is corrupted: not YAML"),
    ("config a number key", write("config.yaml", "1: 2\n"), "config.yaml is corrupted: the key 1 is not a name"),
    ("trainer state a list", lambda path: torch.save([1, 2], path / "trainer_state.pt"),
     "trainer_state.pt is corrupted: it holds a list, not a dict of states"),
]


@pytest.mark.parametrize("legacy", [False, True], ids=["checksums", "size-only"])
@pytest.mark.parametrize("case, damage, message", CORRUPTED_FIELDS, ids=[c[0] for c in CORRUPTED_FIELDS])
def test_every_metadata_field_is_checked_and_named(tmp_path, case, damage, message, legacy):
    path = tiny_save(tmp_path, 5)
    damage(path)
    reseal(path, legacy=legacy)
    with pytest.raises(CheckpointError) as raised:
        checkpoint.load(path)
    assert str(raised.value).startswith(f"{path}/{message}") and "\n" not in str(raised.value), raised.value


def test_a_corrupted_config_of_the_same_size_is_caught_either_way(tmp_path):
    path = tiny_save(tmp_path, 5)
    size = (path / "config.yaml").stat().st_size
    (path / "config.yaml").write_bytes(b"[" * size)
    with pytest.raises(CheckpointError, match="config.yaml is corrupted: its contents differ"):
        checkpoint.load(path)
    reseal(path, legacy=True)  # a size-only marker still matches: the YAML check catches it
    with pytest.raises(CheckpointError, match="config.yaml is corrupted: not YAML"):
        checkpoint.load(path)


def test_resume_auto_skips_a_checkpoint_that_fails_a_field_check(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2):
        tiny_save(checkpoints, step)
    newest = checkpoint.step_dir(checkpoints, 2)
    progress("step", "two")(newest)
    reseal(newest)
    said = []
    assert saver.choose_for_resume(checkpoints, "auto", said.append).progress.step == 1
    assert said == [f'warning: {newest}/state.json is corrupted: progress.step is the string "two", not a whole '
                    f'number; trying the previous checkpoint']
    (newest / "state.json").write_text("[]")
    reseal(newest)
    # inference picks a run's checkpoint by the best step its state records: no traceback, the latest, whose
    # own checks then name the file
    assert checkpoint.for_inference(tmp_path) == (newest, "latest in the run")
    with pytest.raises(CheckpointError, match="state.json is corrupted: a list where an object belongs"):
        checkpoint.load_meta(newest)


# --- writes that fail: nothing partial left, one line, the interrupt passed on ---

class Full(Exception):
    pass


FAILURES = {  # what the writer raises, and what the error line says of it
    "disk full": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                  r"\(No space left on device\): free space \(a checkpoint takes about \d+ MB\) and continue from "
                  r"step-00000001, which is intact, with --resume auto"),
    "quota": (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), r"\(Disk quota exceeded\): free space"),
    "file size limit": (OSError(errno.EFBIG, os.strerror(errno.EFBIG)),
                        r"\(File too large\): a limit on file size \(ulimit -f, or the filesystem's own\) refuses "
                        r"a file of this checkpoint; lift it and continue from step-00000001"),
    "I/O error": (OSError(errno.EIO, os.strerror(errno.EIO)),
                  r"\(Input/output error\); continue from step-00000001, which is intact"),
    "safetensors": (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                    r"\(No space left on device\): free space"),
    "torch.save": (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
                   r"\(RuntimeError: \[enforce fail at inline_container.cc:672\] . unexpected pos 576 vs 534\); "
                   r"continue from step-00000001"),
    "anything": (Full("no room\nsecond line"), r"\(Full: no room\); continue from step-00000001"),
}
STAGES = {  # where in the save it fails
    "weights": "save_weights", "trainer state": "torch.save", "small files": "write_through", "marker": "fsync",
    "rename": "install"}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("failure", FAILURES)
def test_a_failing_write_leaves_no_partial_folder_and_one_line(tmp_path, monkeypatch, failure, stage):
    tiny_save(tmp_path, 1)
    before = snapshot(tmp_path)
    error, message = FAILURES[failure]
    fail_at(monkeypatch, stage, error)
    with pytest.raises(CheckpointError) as raised:
        tiny_save(tmp_path, 2)
    text = str(raised.value)
    assert "\n" not in text and text.startswith(f"could not write checkpoint step-00000002 in {tmp_path} ")
    assert re.search(message, text), text
    assert snapshot(tmp_path) == before  # no partial folder; the intact one untouched


@pytest.mark.parametrize("stage", STAGES)
def test_an_interrupt_while_writing_cleans_up_and_goes_on(tmp_path, monkeypatch, stage):
    tiny_save(tmp_path, 1)
    before = snapshot(tmp_path)
    fail_at(monkeypatch, stage, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        tiny_save(tmp_path, 2)
    assert snapshot(tmp_path) == before


def test_replacing_a_step_that_fails_puts_the_earlier_one_back(tmp_path, monkeypatch):
    tiny_save(tmp_path, 1)
    before = snapshot(tmp_path)
    real_rename = os.rename

    def second_rename_fails(src, dst):
        if str(src).startswith(str(tmp_path / ".tmp-")):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", second_rename_fails)
    with pytest.raises(CheckpointError, match="Input/output error"):
        tiny_save(tmp_path, 1)
    assert snapshot(tmp_path) == before


def fail_at(monkeypatch, stage, error):
    """Make the save fail at `stage` with `error`, after writing part of a file (as a full disk does)."""
    target = STAGES[stage]
    owner = torch if target == "torch.save" else checkpoint
    real = getattr(owner, target.split(".")[-1])
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if target == "write_through" and calls["n"] < 3:  # the trainer state goes through it first
            return real(*args, **kwargs)
        if target == "fsync" and not str(args[0]).endswith("COMPLETE"):
            return real(*args, **kwargs)
        if target == "save_weights":
            args[1].write_bytes(b"half")
        raise error

    monkeypatch.setattr(owner, target.split(".")[-1], failing)


def snapshot(*folders):
    """{path: sha256} of every file and folder under `folders`: what "byte-identical" means in these tests."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


@pytest.mark.slow
def test_a_real_file_size_limit_is_said_as_the_disk_said_it(tmp_path):
    # torch.save reports a write error as an opaque RuntimeError: the hashing file keeps the disk's own error
    script = ("import resource, torch, sys; from pathlib import Path; from toolkit import checkpoint as c;"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY));"
              "s = c.Checkpoint(weights={'w': torch.zeros(10)}, train_weights=None,"
              " trainer_state={'big': torch.zeros(1 << 19)}, progress=c.TrainProgress(step=3), config={}, meta={});"
              "c.save(Path(sys.argv[1]), s)")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(Path(checkpoint.__file__).parents[1])})
    assert result.returncode == 1
    assert "CheckpointError: could not write checkpoint step-00000003" in result.stderr
    assert "(File too large): a limit on file size" in result.stderr and "lift it and run again" in result.stderr
    assert list(tmp_path.iterdir()) == []


# --- staging folders: one per writer, and pruning spares a writer that may still be writing ---

@pytest.mark.slow
def test_staging_names_are_unique_per_writer_and_pruning_spares_live_writers(tmp_path):
    names = {checkpoint.staging_name(".tmp-", "step-00000001") for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith(f".tmp-step-00000001.{checkpoint.HOST}.{os.getpid()}.") for n in names)
    tiny_save(tmp_path, 1)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        leftovers = {
            "live writer": f".tmp-step-00000002.{checkpoint.HOST}.{sleeper.pid}.0a1b2c3d",
            "dead writer": f".tmp-step-00000002.{checkpoint.HOST}.{int(dead.stdout)}.0a1b2c3d",
            "earlier version": ".tmp-step-00000002",
            "replaced by a dead writer": f".old-step-00000001.{checkpoint.HOST}.{int(dead.stdout)}.00000000",
            "another host": ".tmp-step-00000002.node-7.cluster.example.12345.0a1b2c3d"}
        for name in leftovers.values():
            (tmp_path / name).mkdir()
        saver.prune(tmp_path, keep_last=2)
        kept = {p.name for p in tmp_path.iterdir()}
        assert kept == {"step-00000001", leftovers["live writer"], leftovers["another host"]}
        saver.prune(tmp_path, keep_last=2, sole_writer=True)  # the run folder's lock holder: no other writer
        assert {p.name for p in tmp_path.iterdir()} == {"step-00000001", leftovers["live writer"]}
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("keep_last", [1, 2])
def test_the_best_kept_apart_keeps_its_weights_only_and_the_newest_everything(tmp_path, keep_last):
    """The best kept apart from the newest `keep_last`: those can continue the run; the best keeps what using the
    model needs (a fraction of the size), verifies, and is what a run folder gives inference."""
    from toolkit.rundir import RunFolder

    folder = RunFolder(tmp_path, owner=True)
    keeper = saver.CheckpointSaver(folder, bytes_per_checkpoint=1, keep_last=keep_last, every_steps=0, slim_bytes=1)
    for step in (1, 2, 3, 4):
        keeper.save(state({"w": torch.full((3,), float(step))}, {"optimizer": {"x": torch.ones(1000)}},
                          train_weights={"w": torch.zeros(3)}, step=step, best_step=1, best_accuracy=0.5,
                          config={"lr": 0.1}, meta={"world_size": 1}), best_step=1)
    best, newest = checkpoint.step_dir(tmp_path / "checkpoints", 1), checkpoint.step_dir(tmp_path / "checkpoints", 4)
    kept = [checkpoint.step_dir(tmp_path / "checkpoints", step) for step in range(5 - keep_last, 5)]
    assert checkpoint.complete_checkpoints(tmp_path / "checkpoints") == [best, *kept]
    assert all(not checkpoint.read_marker(path).weights_only for path in kept)  # each can continue the run
    assert sorted(p.name for p in best.iterdir()) == ["COMPLETE", "config.yaml", "model.safetensors", "state.json"]
    assert checkpoint.read_marker(best).weights_only and not checkpoint.read_marker(newest).weights_only
    checkpoint.verify(best)
    with pytest.raises(CheckpointError, match="keeps its weights only .* resume from the run's newest checkpoint"):
        checkpoint.load(best)
    assert checkpoint.load(newest).trainer_state["optimizer"]["x"].shape == (1000,)
    assert checkpoint.for_inference(tmp_path) == (best, "best eval accuracy in the run")
    assert saver.slim(best) == 0  # once is enough


def test_a_slim_interrupted_between_its_marker_and_its_deletions_still_verifies(tmp_path, monkeypatch):
    path = tiny_save(tmp_path, 1)
    real_unlink = Path.unlink

    def interrupted(self, missing_ok=False):
        if self.name == "trainer_state.pt":  # a kill before the first of the files not kept goes
            raise KeyboardInterrupt
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", interrupted)
    with pytest.raises(KeyboardInterrupt):
        saver.slim(path)
    monkeypatch.undo()
    assert (path / "trainer_state.pt").exists() and checkpoint.read_marker(path).weights_only
    checkpoint.verify(path)


def test_resume_auto_never_starts_over_where_the_runs_checkpoints_all_fail(tmp_path):
    said = []
    for step in (1, 2):
        (tiny_save(tmp_path, step) / "trainer_state.pt").write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match=r"none of the checkpoints in .* can continue the run \(step-00000002, "
                                              r"step-00000001: see the warnings above\)"):
        saver.choose_for_resume(tmp_path, "auto", said.append)
    assert len(said) == 2 and all("trying the previous checkpoint" in line for line in said)
    assert saver.choose_for_resume(tmp_path / "empty", "auto", said.append) is None  # nothing there: a fresh start
