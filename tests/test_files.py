"""toolkit.files: atomic writes, and the files a command writes for its user checked before the work, written
all or none after it, and the folders made for them removed when the command fails."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from inference_cases import full_disk_after, snapshot, temporaries

from toolkit import files
from toolkit.errors import UsageError
from toolkit.files import OutputError, Outputs


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    files.write_atomic(target, "new")
    files.write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert target.read_text() == "new" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert temporaries(tmp_path) == []


def bad_paths(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """{case: (path given to --json, text its error must hold)}"""
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("a file")
    return {"empty": ("", "--json: give the path of a file to write, got ''"),
            "a folder": (str(tmp_path / "folder"), "is a folder: give the path of the file to write"),
            "ends with /": (str(tmp_path / "new") + "/", "is a folder: give the path of the file to write"),
            "under a file": (str(tmp_path / "notes.txt" / "out.json"), f"{tmp_path / 'notes.txt'} is a file, not a "
                                                                       f"folder"),
            "deep under a file": (str(tmp_path / "notes.txt" / "a" / "b.json"), "is a file, not a folder"),
            "a device": (os.devnull, "exists and is not a regular file")}


def test_output_files_are_checked_when_named(tmp_path):
    cases = bad_paths(tmp_path)
    before = snapshot(tmp_path)
    for case, (raw, reason) in cases.items():
        with pytest.raises(UsageError) as error:
            Outputs().file(raw, "--json")
        assert reason in str(error.value) and str(error.value).startswith("--json"), (case, error.value)
    with pytest.raises(UsageError, match="notes.txt is a file: give a folder"):
        Outputs().folder(str(tmp_path / "notes.txt"), "--plots", ("a.png",))
    with pytest.raises(UsageError, match="folder/a.png is a folder"):  # a file of the folder is a folder
        (tmp_path / "folder" / "a.png").mkdir()
        Outputs().folder(str(tmp_path / "folder"), "--plots", ("a.png",))
    (tmp_path / "folder" / "a.png").rmdir()
    assert snapshot(tmp_path) == before  # checking creates nothing


def test_missing_folders_are_made_ready_and_removed_when_the_command_fails(tmp_path):
    with Outputs() as outputs:
        kept = outputs.file(str(tmp_path / "a" / "b" / "out.json"), "--json")
        outputs.make_ready()
    assert kept.parent.is_dir() and list(kept.parent.iterdir()) == []  # no probe file left
    with pytest.raises(RuntimeError), Outputs() as outputs:
        outputs.file(str(tmp_path / "c" / "d" / "out.json"), "--json")
        outputs.folder(str(tmp_path / "a" / "plots"), "--plots", ("x.png",))
        outputs.make_ready()
        assert (tmp_path / "c" / "d").is_dir() and (tmp_path / "a" / "plots").is_dir()
        raise RuntimeError("the work failed")
    assert not (tmp_path / "c").exists() and not (tmp_path / "a" / "plots").exists()
    assert (tmp_path / "a" / "b").is_dir()  # made by the earlier command, which succeeded


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_a_place_that_cannot_take_a_file_is_refused_before_the_work():
    # /proc takes no new files, not even from root, whom permission bits do not stop
    for raw, reason in (("/proc/out.json", "cannot write in /proc"),
                        ("/proc/new/out.json", "cannot create the folder /proc/new")):
        outputs = Outputs()
        outputs.file(raw, "--json")
        with pytest.raises(UsageError, match=reason):
            outputs.make_ready()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_the_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    outputs = Outputs()
    outputs.file(str(locked / "out.json"), "--json")
    with pytest.raises(UsageError, match="cannot write in"):
        outputs.make_ready()


def test_a_full_disk_writes_nothing_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    first, second = tmp_path / "a.json", tmp_path / "b.png"
    first.write_text("the old a")
    second.write_bytes(b"the old b")
    before = snapshot(tmp_path)
    outputs = Outputs()
    outputs.file(str(first), "--json")
    outputs.file(str(second), "--plots")
    monkeypatch.setattr(files, "open", full_disk_after(10), raising=False)
    with pytest.raises(OutputError) as error:
        outputs.write({first: "new a", second: b"the new b, too long for the disk"})
    assert str(error.value) == (f"could not write {first}, {second} (No space left on device): nothing was written; "
                                f"free space, or give another --json / --plots")
    assert snapshot(tmp_path) == before  # the first file, complete, was not put in place either


def test_too_little_free_space_is_said_before_the_work(tmp_path, monkeypatch):
    outputs = Outputs()
    target = outputs.file(str(tmp_path / "new" / "model.pt"), "--output")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=0, free=50_000_000))
    with pytest.raises(OutputError, match=r"has 50 MB free and the export takes about 187 MB: free space, or give "
                                          r"another --output"):
        outputs.check_space(target, 187_000_000, "the export")
    outputs.check_space(target, 40_000_000, "the export")
