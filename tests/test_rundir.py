"""A run folder belongs to one run: which run may use it, the lock on it, and `run.json`.

Unit tests first (no training); then the cases that lost data before, with real processes through the real
command line, each checking that every file that existed before is byte-identical afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import ROOT, mnist_root, run, run_module, wait_for

from toolkit import checkpoint, rundir
from toolkit.errors import LAUNCHER_NOTE, UsageError
from toolkit.rundir import HOST, RunFolderError


def snapshot(*folders: Path) -> dict[str, str]:
    """{path: sha256} of every file (and each folder) under `folders`."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


def record(path: Path) -> dict:
    return json.loads((path / "run.json").read_text())


@pytest.fixture
def said() -> list[str]:
    return []


def take(path, resume="", said=None):
    """What `rundir.claim` does on the main process when it enters its `with` block."""
    return rundir.take(str(path), resume, announce=(said.append if said is not None else print))


def fake_run(path: Path, steps=(1,)) -> Path:
    """A run folder as a run leaves it (the checkpoints need not load: claiming reads none)."""
    for step in steps:
        (checkpoint.step_dir(path / "checkpoints", step)).mkdir(parents=True)
        (checkpoint.step_dir(path / "checkpoints", step) / "COMPLETE").write_text("{}")
    (path / "config.yaml").write_text("lr: 0.1\n")
    (path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (path / "tensorboard").mkdir()
    return path


# ------------------------------------------------------------------ which run may use a folder

def test_a_new_run_takes_its_folder_records_itself_and_lets_go(tmp_path, said):
    path = tmp_path / "runs" / "a"
    folder = take(path, said=said)
    assert folder.path == path and folder.owner and folder.new and folder.locked and said == []
    holder = json.loads((path / "run.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == HOST
    assert not (path / "run.json").exists()  # set-up writes nothing of the run's: it starts with training
    folder.training_starts()
    assert record(path)["status"] == "running" and record(path)["resume"] == f"--resume auto --output-dir {path}"
    folder.saved(3, path / "checkpoints" / "step-00000003")
    assert (record(path)["step"], record(path)["checkpoint"]) == (3, str(path / "checkpoints" / "step-00000003"))
    folder.ended("finished", None)
    folder.release()
    assert record(path)["status"] == "finished" and record(path)["resume"] is None
    assert sorted(p.name for p in path.iterdir()) == ["run.json"]  # the lock file goes with the lock


@pytest.mark.parametrize("where", ["is", "under"])
def test_an_output_dir_that_is_a_file_or_under_one_is_refused_before_anything_is_written(tmp_path, where):
    (tmp_path / "notes.txt").write_text("mine")
    path = tmp_path / "notes.txt" if where == "is" else tmp_path / "notes.txt" / "run" / "x"
    before = snapshot(tmp_path)
    with pytest.raises(RunFolderError) as raised:
        take(path)
    message = (f"--output-dir {path} is a file, not a folder" if where == "is" else
               f"--output-dir {path} lies under {tmp_path / 'notes.txt'}, which is a file, not a folder")
    assert str(raised.value).startswith(message) and raised.value.exit_code == 2
    assert snapshot(tmp_path) == before


def test_a_new_run_refuses_a_folder_that_holds_a_run(tmp_path):
    path = fake_run(tmp_path / "run")
    before = snapshot(tmp_path)
    with pytest.raises(RunFolderError, match=f"{path} already holds a run: pass --resume auto to continue it, or "
                                             f"choose another --output-dir \\(it has config.yaml, metrics.jsonl, "
                                             f"checkpoints, tensorboard\\)"):
        take(path)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("entry", rundir.WRITTEN)
@pytest.mark.parametrize("resume", ["", "auto"])
def test_files_a_run_would_write_that_no_run_wrote_are_never_overwritten(tmp_path, entry, resume):
    """A user's own exp1/config.yaml (or any name a run writes) is not a run: neither a new run nor --resume auto
    takes the folder, whatever the tool's own advice said before."""
    path = tmp_path / "exp1"
    path.mkdir()
    (path / entry).mkdir() if entry in ("checkpoints", "tensorboard", "profile", "mlruns", "dvclive", "wandb",
                                        ".aim") else (path / entry).write_text("# my own notes\nlr: 0.1\n")
    before = snapshot(tmp_path)
    with pytest.raises(RunFolderError) as raised:
        take(path, resume)
    message = str(raised.value)
    assert f"{entry}, which a run writes there and no run of this toolkit wrote" in message, message
    assert "--resume auto" not in message.split(":")[-1] and raised.value.exit_code == 2
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("planted", ["link", "fifo", "folder"])
def test_a_lock_file_that_is_not_a_file_is_refused_and_nothing_is_written_through_it(tmp_path, planted):
    path = fake_run(tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    if planted == "link":
        (path / "run.lock").symlink_to(victim)
    elif planted == "fifo":
        os.mkfifo(path / "run.lock")  # opening one for reading would block for ever
    else:
        (path / "run.lock").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(RunFolderError) as raised:
        take(path, "auto")
    kind = {"link": "is a symbolic link", "fifo": "is not a regular file", "folder": "is a folder"}[planted]
    assert str(raised.value).startswith(f"{path / 'run.lock'} {kind}") and "remove it" in str(raised.value)
    assert snapshot(tmp_path) == before and victim.read_text() == "precious"


def test_another_runs_checkpoint_starts_a_fork_in_a_new_folder_and_nowhere_else(tmp_path, said):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b")
    source = b / "checkpoints" / "step-00000001"
    before = snapshot(a, b)
    with pytest.raises(RunFolderError) as raised:  # the data-loss case: resuming B's checkpoint into A
        take(a, str(source))
    assert str(raised.value) == (
        f"--resume {source} is a checkpoint of the run {b}, and --output-dir {a} holds another run: a run continues "
        f"only from its own checkpoints (--resume auto); to start a new run from {source}, choose a new or empty "
        f"--output-dir")
    with pytest.raises(RunFolderError, match=f"--output-dir {a / 'sub'} lies inside the run folder {a}"):
        take(a / "sub", str(source))
    assert snapshot(a, b) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]

    fork = take(tmp_path / "c", str(source))
    fork.training_starts()
    assert fork.new and fork.forked_from == str(source.resolve())
    assert record(tmp_path / "c")["forked_from"] == str(source.resolve())
    fork.release()
    assert snapshot(a, b) == before  # the source run only read

    for resume in ("auto", str(a / "checkpoints" / "step-00000001"), str(a / "checkpoints" / ".." / "checkpoints" /
                                                                          "step-00000001")):
        own = take(a, resume)  # its own run: continued
        assert not own.new and own.forked_from is None
        own.release()


def test_a_continued_run_keeps_its_history(tmp_path):
    path = tmp_path / "c"
    fork = take(path, str(fake_run(tmp_path / "b") / "checkpoints" / "step-00000001"))
    fork.training_starts()
    fork.saved(7, path / "checkpoints" / "step-00000007")
    fork.ended("stopped", "SIGTERM")
    fork.release()
    started = record(path)["started"]
    again = take(path, "auto")
    assert record(path)["status"] == "stopped"  # until training starts, the record says how the run stood
    again.training_starts()
    kept = record(path)
    assert (kept["status"], kept["started"], kept["step"], kept["forked_from"]) == (
        "running", started, 7, str((tmp_path / "b" / "checkpoints" / "step-00000001").resolve()))
    again.release()


def test_default_folders_get_their_own_name_even_in_the_same_second(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 5, 6, 7, 8, 9)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir, "datetime", Frozen)
    first, second = take(""), take("")
    assert (first.path, second.path) == (Path("runs/20240506-070809"), Path("runs/20240506-070809-2"))
    for folder in (second, first):
        folder.failed(RuntimeError("out of memory"), step=0)
        folder.release()
    assert list(tmp_path.iterdir()) == []  # failed before a step: nothing left, not even runs/
    with pytest.raises(RunFolderError, match="--resume auto needs --output-dir"):
        take("", "auto")


# ------------------------------------------------------------------ the lock

def test_a_held_folder_is_refused_at_once_naming_its_holder(tmp_path):
    path = tmp_path / "run"
    first = take(path)
    before = snapshot(tmp_path)
    for resume in ("", "auto"):
        with pytest.raises(RunFolderError) as raised:
            take(path, resume)
        assert str(raised.value).startswith(f"{path} is in use by another training (pid {os.getpid()} on {HOST}, "
                                            f"started {first.started}): wait for it to end or stop it")
    assert snapshot(tmp_path) == before
    first.release()
    take(path, "auto").release()


HOLDER = ("import sys, time; from toolkit import rundir; "
          "rundir.take(sys.argv[1], 'auto', announce=lambda m: None); print('held', flush=True); time.sleep(120)")


@pytest.mark.slow
def test_a_lock_left_by_a_killed_process_is_taken_over_saying_so(tmp_path, said):
    path = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunFolderError, match=f"in use by another training \\(pid {holder.pid} on {HOST}"):
            take(path, "auto")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    left = json.loads((path / "run.lock").read_text())
    assert left["pid"] == holder.pid  # what a killed holder leaves
    folder = take(path, "auto", said)
    assert said == [f"note: {path} was held by pid {holder.pid} on {HOST}, started {left['started']}, which "
                    f"ended without letting go of it (killed, or crashed): this run takes it over"]
    assert json.loads((path / "run.lock").read_text())["pid"] == os.getpid()
    folder.release()


@pytest.mark.slow
def test_a_filesystem_without_locks_is_said_and_not_fatal(tmp_path, monkeypatch, said):
    path = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline() == "held\n"

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    warning = (f"warning: the filesystem of {path} has no working file locks (No locks available): a second "
               f"training started on this folder would not be stopped")
    try:  # without locks, a holder on this machine is still known by its pid
        with pytest.raises(RunFolderError, match=f"in use by another training \\(pid {holder.pid} on {HOST}"):
            take(path, "auto", said)
        assert said == [warning]
    finally:
        holder.kill()
        holder.wait()
    started = json.loads((path / "run.lock").read_text())["started"]
    folder = take(path, "auto", said)
    assert not folder.locked and said[1:] == [warning, f"note: {path} was held by pid {holder.pid} on {HOST}, "
                                                       f"started {started}; without working locks, "
                                                       f"whether it still runs cannot be told from here: this run "
                                                       f"takes the folder over"]
    folder.release()
    assert not (path / "run.lock").exists()


# ------------------------------------------------------------------ how a run ended

@pytest.mark.parametrize("reason, status, code", [
    (None, "finished", 0), ("SIGTERM", "stopped", 143), ("SIGINT", "stopped", 130), ("SIGHUP", "stopped", 129),
    ("time_limit", "stopped", 0),  # the time limit stops with exit status 0, and is to be resumed all the same
    ("max_steps", "finished", 0), ("early_stop", "finished", 0), ("target_accuracy", "finished", 0)])
def test_how_a_run_ended_is_recorded(tmp_path, reason, status, code):
    from toolkit.stopping import Stop

    folder = take(tmp_path / "run")
    folder.training_starts()
    folder.saved(4, tmp_path / "run" / "checkpoints" / "step-00000004")
    if reason and reason.startswith("SIG"):
        folder.stopping(reason)
        assert record(tmp_path / "run")["status"] == "stopping"  # what a launcher's kill during the save leaves
    stop = Stop(reason, 4) if reason else None
    assert (stop.exit_code if stop else 0) == code
    folder.ended(stop.status if stop else "finished", reason)
    folder.release()
    saved = record(tmp_path / "run")
    assert (saved["status"], saved["reason"], saved["step"]) == (status, reason, 4)
    assert saved["resume"] == (None if status == "finished" else f"--resume auto --output-dir {tmp_path / 'run'}")


def test_a_new_run_that_fails_before_its_first_step_leaves_nothing(tmp_path):
    nested = tmp_path / "a" / "b" / "run"
    folder = take(nested)
    (nested / "config.yaml").write_text("x")  # what a trainer writes before its first step
    (nested / "tensorboard").mkdir()
    (nested / "profile").mkdir()  # anything else it made in a folder of its own goes too
    folder.failed(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), step=0)
    folder.release()
    assert list(tmp_path.iterdir()) == []

    mine = tmp_path / "mine"  # a folder the user made, with a file of theirs: only the run's files go
    mine.mkdir()
    (mine / "slurm-1.out").write_text("log")
    with pytest.raises(UsageError), rundir.claim(str(mine), "", announce=print):
        (mine / "metrics.jsonl").write_text("")
        raise UsageError("bad")
    assert [p.name for p in mine.iterdir()] == ["slurm-1.out"]

    fork = take(tmp_path / "fork", str(fake_run(tmp_path / "src") / "checkpoints" / "step-00000001"))
    fork.starts_at(1)
    fork.failed(RuntimeError("out of memory"), step=1)
    fork.release()
    assert not (tmp_path / "fork").exists()


def test_a_run_that_fails_later_keeps_its_folder_and_says_why(tmp_path):
    folder = take(tmp_path / "new")
    folder.training_starts()
    folder.failed(UsageError("loss is not finite at step 3"), step=3)
    folder.release()
    saved = record(tmp_path / "new")
    assert (saved["status"], saved["reason"], saved["message"]) == ("failed", "UsageError",
                                                                    "loss is not finite at step 3")
    existing = fake_run(tmp_path / "old")
    with pytest.raises(RuntimeError), rundir.claim(str(existing), "auto", announce=print) as folder:
        folder.training_starts()  # a continued run is never removed: it failed, and says so
        raise RuntimeError("first line\nsecond line")
    assert record(existing)["message"] == "RuntimeError: first line" and (existing / "metrics.jsonl").exists()


def test_an_attempt_that_fails_before_training_leaves_the_runs_record_as_it_was(tmp_path):
    """A usage error made while resuming (another process count mid-epoch, another recipe) must not change how
    the run it refers to ended: a scheduler requeues from that record."""
    path = fake_run(tmp_path / "run")
    first = take(path, "auto")
    first.training_starts()
    first.ended("stopped", "SIGTERM")
    first.release()
    before = (path / "run.json").read_text()
    with pytest.raises(UsageError), rundir.claim(str(path), "auto", announce=print):
        raise UsageError("cannot resume with 3 processes: it stopped mid-epoch with 2")
    assert (path / "run.json").read_text() == before and not (path / "run.lock").exists()


# ------------------------------------------------------------------ real processes, the real command line

needs_mnist = pytest.mark.skipif(mnist_root() is None, reason="MNIST is not on this machine: set TOOLKIT_DATA_DIR "
                                                               "to a folder holding MNIST/raw/")
# 2 steps per epoch, a checkpoint each step (0.75 GB), stopped after the first
RUN = ["--image-size", "65", "--train-samples", "32", "--eval-samples", "50", "--batch-size", "16", "--epochs", "1",
       "--warmup-steps", "1", "--log-every-steps", "1", "--checkpoint-every-steps", "1", "--keep-last", "1",
       "--seed", "3", "--max-steps", "1", "--cpu-threads", "1"]
LONG = ["--train-samples", "256", "--max-steps", "0", "--checkpoint-every-steps", "8"]  # 16 steps
STEP_1 = "checkpoints/step-00000001"


def start(out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "toolkit.train", *RUN, "--output-dir", str(out), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stopped(pid: int) -> None:
    """Wait until a process that was sent SIGSTOP is stopped: until then its threads may still write."""
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"pid {pid} did not stop"
        time.sleep(0.05)
    time.sleep(0.2)  # and a writer thread's write already under way is on disk


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("toolkit.train: error: ")
    return lines[0].removeprefix("toolkit.train: error: ")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs started at once in two folders (each to its first checkpoint): (a, b)."""
    folder = tmp_path_factory.mktemp("two-runs")
    a, b = folder / "a", folder / "b"
    processes = [start(a), start(b)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    yield a, b
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@needs_mnist
def test_two_runs_at_once_in_two_folders_both_finish(two_runs):
    for path in two_runs:
        assert record(path)["status"] == "finished"
        assert sorted(p.name for p in path.iterdir()) == ["checkpoints", "config.yaml", "console.log", "metrics.jsonl",
                                                          "run.json", "tensorboard"]
        assert [p.name for p in (path / "checkpoints").iterdir()] == ["step-00000001"]
        checkpoint.load(path / STEP_1)


@pytest.mark.slow
@needs_mnist
def test_resuming_another_runs_checkpoint_into_a_run_is_refused_and_changes_nothing(two_runs):
    a, b = two_runs
    before = snapshot(a, b)
    result = run_module("toolkit.train", *RUN, "--output-dir", str(a), "--resume", str(b / STEP_1),
                        "--keep-last", "1")
    assert result.returncode == 2
    assert one_error_line(result).startswith(f"--resume {b / STEP_1} is a checkpoint of the run {b}, and "
                                             f"--output-dir {a} holds another run")
    assert snapshot(a, b) == before


@pytest.mark.slow
@needs_mnist
def test_another_runs_checkpoint_forks_a_new_run_that_records_it(two_runs, tmp_path):
    _, b = two_runs
    before = snapshot(b)
    result = run_module("toolkit.train", *RUN, "--output-dir", str(tmp_path / "fork"), "--resume", str(b / STEP_1),
                        "--max-steps", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    saved = record(tmp_path / "fork")
    assert (saved["status"], saved["forked_from"], saved["step"]) == ("finished", str(b / STEP_1), 2)
    assert snapshot(b) == before


@pytest.mark.slow
@needs_mnist
def test_a_second_training_on_a_folder_in_use_is_refused_at_once(tmp_path):
    out = tmp_path / "run"
    first = start(out, *LONG)
    try:
        wait_for(first, "step 1/16")
        first.send_signal(signal.SIGSTOP)  # held still, so that any write by the others would show
        stopped(first.pid)
        before = snapshot(out)
        started = json.loads((out / "run.lock").read_text())["started"]
        for extra in (("--resume", "auto"), ()):
            result = run_module("toolkit.train", *RUN, *LONG, "--output-dir", str(out), *extra, timeout=120)
            assert result.returncode == 2
            assert one_error_line(result) == (f"{out} is in use by another training (pid {first.pid} on {HOST}, "
                                              f"started {started}): wait for it to end or stop it, or choose another "
                                              f"--output-dir")
        assert snapshot(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 0, output  # before, both died at their first checkpoint
    assert record(out)["status"] == "finished"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000016"]


@pytest.mark.slow
@needs_mnist
def test_the_lock_of_a_killed_training_is_taken_over(tmp_path):
    out = tmp_path / "run"
    killed = start(out, *LONG)
    wait_for(killed, "step 2/16")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert record(out)["status"] == "running"  # what a killed run leaves: the record says it never ended
    result = run_module("toolkit.train", *RUN, "--output-dir", str(out), "--resume", "auto")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"note: {out} was held by pid {killed.pid} on {HOST}" in result.stdout
    assert record(out)["status"] == "finished" and not (out / "run.lock").exists()


@pytest.mark.slow
@needs_mnist
def test_a_full_disk_while_saving_is_one_line_and_the_intact_checkpoint_stays(two_runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_runs[0], out)
    before = snapshot(out / "checkpoints")

    def limit_file_size():  # the weights files (187 MB each) fit; the AdamW state (375 MB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (250 * 2**20, resource.RLIM_INFINITY))

    result = subprocess.run([sys.executable, "-m", "toolkit.train", *RUN, "--output-dir", str(out), "--resume", "auto",
                             "--max-steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stdout + result.stderr
    line = one_error_line(result)
    assert line == (f"could not write checkpoint step-00000002 in {out / 'checkpoints'} (File too large): a limit on "
                    f"file size (ulimit -f, or the filesystem's own) refuses a file of this checkpoint; lift it and "
                    f"continue from step-00000001, which is intact, with --resume auto")
    assert snapshot(out / "checkpoints") == before  # no partial folder, the intact one untouched
    assert (record(out)["status"], record(out)["message"]) == ("failed", line)


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize("where", ["is", "under"])
def test_an_output_dir_that_is_a_file_is_one_line_and_writes_nothing(tmp_path, where):
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" if where == "is" else tmp_path / "file" / "run"
    before = snapshot(tmp_path)
    result = run_module("toolkit.train", *RUN, "--output-dir", str(out))
    assert result.returncode == 2
    assert f"--output-dir {out} " in one_error_line(result)
    assert snapshot(tmp_path) == before


@pytest.mark.slow
@needs_mnist
def test_a_run_that_cannot_start_leaves_no_folder_and_an_existing_one_as_it_was(two_runs, tmp_path):
    result = run_module("toolkit.train", *RUN, "--output-dir", str(tmp_path / "new"), "--resume",
                        str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert one_error_line(result) == f"{tmp_path / 'nothing'} does not exist"
    assert list(tmp_path.iterdir()) == []

    out = tmp_path / "run"
    shutil.copytree(two_runs[0], out)
    before = snapshot(out)
    result = run_module("toolkit.train", *RUN, "--output-dir", str(out), "--resume", "auto", "--lr", "0.5")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "the config differs (lr:" in line
    assert snapshot(out) == before  # run.json included: the run it refers to finished, and still says so


@needs_mnist
def test_out_of_memory_at_the_first_step_is_one_line_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    from toolkit import train
    from toolkit.trainer import Trainer

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "forward_backward", out_of_memory)  # what every step calls first
    with pytest.raises(SystemExit) as exit_info:
        train.main([*RUN, "--output-dir", str(tmp_path / "runs" / "x")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "toolkit.train: error: out of memory with --image-size 65 and --batch-size 16: lower them (CUDA out of "
        "memory. Tried to allocate 2.00 GiB)"]
    assert list(tmp_path.iterdir()) == []


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "launch" / "cpu_ddp.yaml"),
              "--num_processes", "2", "toolkit/train.py", "--device", "cpu"]


@pytest.mark.slow
@needs_mnist
def test_under_ddp_a_refusal_is_one_line_from_the_main_process_and_no_hang(tmp_path):
    out = tmp_path / "run"
    holder = take(out)  # this test process holds the folder
    before = snapshot(out)
    started = time.monotonic()
    result = run([*ACCELERATE, *RUN, "--output-dir", str(out), "--resume", "auto"], timeout=180)
    assert result.returncode != 0 and time.monotonic() - started < 120
    errors = [line for line in result.stderr.splitlines() if line.startswith("toolkit.train: error")]
    assert errors == [f"toolkit.train: error: {out} is in use by another training (pid {os.getpid()} on {HOST}, "
                      f"started {holder.started}): wait for it to end or stop it, or choose another --output-dir"
                      f"{LAUNCHER_NOTE}"]
    assert snapshot(out) == before
    holder.release()


@pytest.mark.slow
@needs_mnist
def test_sigterm_to_the_ddp_launcher_exits_143_and_run_json_says_stopped(tmp_path):
    out = tmp_path / "run"
    launcher = subprocess.Popen([*ACCELERATE, *RUN, *LONG, "--log-every-steps", "2", "--output-dir", str(out)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for(launcher, "step 2/8")
    launcher.send_signal(signal.SIGTERM)  # the launcher alone: it passes the signal on to its workers
    output = launcher.communicate(timeout=180)[0]
    # accelerate >= 1.16 (pyproject.toml): the launcher passes the signal on, its workers save and exit, and it
    # returns 128 + the signal's number
    assert launcher.returncode == 143, output
    saved = record(out)
    assert (saved["status"], saved["reason"]) == ("stopped", "SIGTERM"), output
    assert saved["resume"] == f"--resume auto --output-dir {out}"
    assert saved["checkpoint"] == str(checkpoint.step_dir(out / "checkpoints", saved["step"]))
    checkpoint.load(Path(saved["checkpoint"]))



def test_the_flags_that_continue_a_run_are_quoted_for_a_shell(tmp_path):
    folder = rundir.RunFolder(tmp_path / "my runs" / "a'b", owner=False)
    assert folder.resume_flags == f"--resume auto --output-dir '{tmp_path}/my runs/a'\"'\"'b'"
