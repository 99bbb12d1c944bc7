"""A run folder belongs to one run: which run may use it, who holds it now, and how the run ended.

Which run may use a folder (`claim`, before anything is written):
- no `--resume`: a new run, in a folder that is new or holds no run (none of `RUN_FILES`), and not inside one;
- `--resume auto`, or a checkpoint in the folder's own `checkpoints/`: the run in the folder, continued;
- `--resume` of any other checkpoint: a new run forked from it, in a folder as for a new run. `run.json` records
  `forked_from`; the source run's files are only read.
Anything else stops with one line and exit 2, before a file is touched.

Who holds it: while a run trains, its main process holds an advisory lock (`flock`) on `run.lock`, a file that
names it (pid, host, start time). A second training on the folder stops at once, naming the holder. The kernel
drops the lock when the process ends, however it ends; the file, still naming a process that was killed, is taken
over with a line saying so. A run that ends removes the file.

How the run ended: `run.json`, rewritten atomically by the main process, says `running` (with the last checkpoint
saved), `finished`, `stopped` (by a signal, saved, to be resumed: `resume` holds the flags) or `failed` (with the
one-line error). Schedulers read it rather than the launcher's exit code, which `accelerate launch` does not pass
on. A new run that fails before its first step leaves no folder behind.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from toolkit.errors import UsageError, UserError, decided_on_main, one_line
from toolkit.files import write_atomic

LOCK = "run.lock"
RECORD = "run.json"
RUN_FILES = ("config.yaml", "metrics.jsonl", RECORD, "checkpoints", "tensorboard")  # what makes a folder a run's
CHECKPOINTS = "checkpoints"
DEFAULT_PARENT = Path("runs")
HOST = socket.gethostname()
RESUMABLE = ("SIGTERM", "SIGINT", "time_limit")  # stop reasons that leave a run to be continued
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}  # a filesystem without working flock (some NFS, Lustre)

Announce = Callable[[str], None]


class RunFolderError(UsageError):
    """The run folder cannot be used as asked. Raised on every process, reported by the main one."""


class RunFolder:
    """The run folder of this run. Only the main process (`owner`) holds the lock and writes `run.json`; on the
    other processes every method does nothing."""

    def __init__(self, path: Path, owner: bool = False, new: bool = False, announce: Announce = print) -> None:
        self.path = path
        self.owner = owner
        self.new = new  # it held no run before this one: a failure before the first step removes what it made
        self.announce = announce
        self.locked = False  # the lock is held (False where the filesystem has no working locks)
        self.forked_from: str | None = None
        self.started = now()
        self.step: int | None = None  # of the last checkpoint saved
        self.checkpoint: str | None = None
        self.start_step = 0  # where this session started: a fork starts at its checkpoint's step
        self.created: list[Path] = []  # folders this claim made, outermost first
        self.previous_entries: set[str] = set()  # names already in a folder that existed
        self.fd: int | None = None
        self.saved_any = False
        self.discard = False
        self.released = False

    # ------------------------------------------------------------------ what the trainer reports
    def starts_at(self, step: int) -> None:
        """The step this session starts from (a resumed or forked checkpoint's)."""
        self.start_step = step

    def saved(self, step: int, checkpoint: Path) -> None:
        """A checkpoint is complete: the run now has something to resume from."""
        self.step, self.checkpoint, self.saved_any = step, str(checkpoint), True
        self.record("running")

    def ended(self, code: int, reason: str | None = None) -> None:
        """The run returned `code`, having saved, for `reason` (the trainer's stop reason; by default the signal
        of a code 128 + n). A signal or the time limit leaves it stopped, to be resumed; anything else (its
        epochs, max_steps, a target reached, early stopping) finished."""
        if reason is None and code > 128:
            try:
                reason = signal.Signals(code - 128).name
            except ValueError:
                pass
        if reason in RESUMABLE or code != 0:
            self.record("stopped", reason or f"exit status {code}")
        else:
            self.record("finished", reason)

    def failed(self, error: BaseException, step: int) -> None:
        """The run raised `error` at `step`. A new run that did no step is discarded at `release`; any other
        records the error's one line."""
        if not self.owner:
            return
        if self.new and not self.saved_any and step <= self.start_step:
            self.discard = True
            return
        message = str(error) if isinstance(error, UserError) else one_line(error)
        self.record("failed", type(error).__name__, message)

    def record(self, status: str, reason: str | None = None, message: str | None = None) -> None:
        """Rewrite `run.json`. A failure to write it is a warning: the run's own results are not at stake."""
        if not self.owner:
            return
        record = {"status": status, "reason": reason, "message": message, "step": self.step,
                  "checkpoint": self.checkpoint,
                  "resume": None if status == "finished" else f"--resume auto --output-dir "
                                                              f"{shlex.quote(str(self.path))}",
                  "forked_from": self.forked_from, "started": self.started, "updated": now(), "host": HOST,
                  "pid": os.getpid()}
        try:
            write_atomic(self.path / RECORD, json.dumps(record, indent=1) + "\n")
        except OSError as error:
            self.announce(f"warning: could not record the run's state in {self.path / RECORD} ({error.strerror})")

    # ------------------------------------------------------------------ the end
    def release(self) -> None:
        """Give the folder up: a discarded run's files go, the lock file is removed and the lock dropped, and the
        folders the claim made are removed if empty."""
        if not self.owner or self.released:
            return
        self.released = True
        if self in _held:
            _held.remove(self)
        if self.discard and self.path in self.created:  # made by this run and held by it since: all of it is its
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.discard:
            remove_entries(self.path, keep=self.previous_entries)
        if self.fd is not None:
            # unlinked before the lock drops: a process waiting on this file then finds it gone and makes anew
            (self.path / LOCK).unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except FileNotFoundError:  # removed above
                continue
            except OSError:  # not empty: the run is kept, or something else is there now
                break


_held: list[RunFolder] = []  # folders this process holds: `release_held` lets go of them when a run fails to start


def release_held(error: BaseException) -> None:
    """For a run that failed before it could report it (while the trainer was being built): each folder this
    process holds records the failure, or, new, is removed; then it is released."""
    for folder in list(_held):
        folder.failed(error, step=folder.start_step)
        folder.release()


# ------------------------------------------------------------------ claiming
def claim(output_dir: str, resume: str, main_process: bool = True, announce: Announce = print) -> RunFolder:
    """The run folder for a run with `--output-dir output_dir` ('' = a new `runs/<timestamp>`) and `--resume
    resume`. Every process calls it: the main process checks and takes the folder, and the others learn its
    path, or its refusal (then every process fails with it; only the main process reports it)."""
    folder: RunFolder | None = None

    def take_on_main() -> str:
        nonlocal folder
        folder = take(output_dir, resume, announce)
        return str(folder.path)

    path = decided_on_main(take_on_main, main_process)
    return folder or RunFolder(Path(path), owner=False, announce=announce)


def take(output_dir: str, resume: str, announce: Announce) -> RunFolder:
    """Check what the run may do with the folder, then lock it and record the run as running. Nothing is written
    before every check that needs no lock has passed."""
    source = Path(resume) if resume and resume != "auto" else None
    if not output_dir:
        if resume == "auto":
            raise RunFolderError("--resume auto needs --output-dir: the run folder to continue")
        check_folder_path(DEFAULT_PARENT)
        path, created = new_default_folder(DEFAULT_PARENT)
        continuing = False
    else:
        path = Path(output_dir)
        check_folder_path(path)
        continuing = resume == "auto" or (source is not None and is_checkpoint_of(source, path))
        refuse_if_held(path)
        refuse_if_not_free(path, source, continuing)
        created = make_folders(path)
    folder = RunFolder(path, owner=True, announce=announce)
    folder.created = created
    try:
        lock(folder)
        refuse_if_not_free(path, source, continuing)  # again, under the lock: a run may have been here meanwhile
    except BaseException:
        folder.release()  # the lock file, if it made one, and the folders it made, if empty: nothing else
        raise
    folder.new = not run_entries(path)
    folder.previous_entries = {entry.name for entry in path.iterdir()} - {LOCK}
    if continuing:
        carry_over(folder)
    elif source is not None:
        folder.forked_from = str(source.resolve())
    folder.record("running")
    _held.append(folder)
    return folder


def check_folder_path(path: Path) -> None:
    """A run folder is a folder: not a file, nor under one."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return
        if candidate.exists() or candidate.is_symlink():
            if candidate == path:
                raise RunFolderError(f"--output-dir {path} is a file, not a folder: choose another --output-dir")
            raise RunFolderError(f"--output-dir {path} lies under {candidate}, which is a file, not a folder: "
                                 f"choose another --output-dir")


def is_checkpoint_of(checkpoint: Path, path: Path) -> bool:
    """Whether `checkpoint` lies in the run folder `path`'s own checkpoints/."""
    return checkpoint.resolve().parent == (path / CHECKPOINTS).resolve()


def run_entries(path: Path) -> list[str]:
    """The files and folders of a run that `path` holds."""
    return [name for name in RUN_FILES if (path / name).exists()] if path.is_dir() else []


def run_folder_around(path: Path) -> Path | None:
    """The run folder that `path` lies inside, if any."""
    for parent in path.resolve().parents:
        if (parent / RECORD).is_file() or (parent / "metrics.jsonl").is_file():
            return parent
    return None


def refuse_if_not_free(path: Path, source: Path | None, continuing: bool) -> None:
    """A new run (fresh or forked) needs a folder that holds no run and lies inside none."""
    if continuing:
        return
    entries = run_entries(path)
    if entries and source is None:
        raise RunFolderError(f"{path} already holds a run: pass --resume auto to continue it, or choose another "
                             f"--output-dir (it has {', '.join(entries)})")
    if entries:
        source_run = source.parent.parent if source.parent.name == CHECKPOINTS else source
        raise RunFolderError(f"--resume {source} is a checkpoint of the run {source_run}, and --output-dir {path} "
                             f"holds another run: a run continues only from its own checkpoints (--resume auto); "
                             f"to start a new run from {source}, choose a new or empty --output-dir")
    around = run_folder_around(path)
    if around is not None:
        raise RunFolderError(f"--output-dir {path} lies inside the run folder {around}: choose a folder outside "
                             f"any run")


def make_folders(path: Path) -> list[Path]:
    """Create `path` and its missing parents; the ones created, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
            created.append(folder)
        except FileExistsError:  # made meanwhile by another process: not ours
            pass
        except OSError as error:
            raise RunFolderError(f"cannot create the run folder {path} ({error.strerror}): choose another "
                                 f"--output-dir") from None
    return created


def new_default_folder(parent: Path) -> tuple[Path, list[Path]]:
    """A new folder `parent/<timestamp>` (`-2`, `-3`... when runs start in the same second), made at once so
    that no other run takes the same name."""
    created = make_folders(parent)
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    for number in itertools.count(1):
        path = parent / (stamp if number == 1 else f"{stamp}-{number}")
        try:
            path.mkdir()
            return path, [*created, path]
        except FileExistsError:
            continue
        except OSError as error:
            raise RunFolderError(f"cannot create the run folder {path} ({error.strerror}): give one with "
                                 f"--output-dir") from None
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ the lock
def lock(folder: RunFolder) -> None:
    """Take the folder's lock, or raise RunFolderError naming its holder. A lock file still naming a process
    (one that was killed) is taken over, saying so."""
    path = folder.path / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise RunFolderError(f"cannot write in the run folder {folder.path} ({error.strerror}): choose another "
                                 f"--output-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise RunFolderError(in_use(folder.path, holder)) from None
        except OSError as error:
            if error.errno not in NO_LOCKS:
                os.close(fd)
                raise RunFolderError(f"cannot lock the run folder {folder.path} ({error.strerror})") from None
            folder.announce(f"warning: the filesystem of {folder.path} has no working file locks "
                            f"({error.strerror}): a second training started on this folder would not be stopped")
            holder = read_holder(fd)  # the pid is all there is to go by: enough on this machine
            if holder and holder.get("host") == HOST and process_exists(holder.get("pid")):
                os.close(fd)
                raise RunFolderError(in_use(folder.path, holder)) from None
            break
        if same_file(fd, path):
            folder.locked = True
            break
        os.close(fd)  # the holder removed the file as it let go: lock the one there now
    folder.fd = fd
    previous = read_holder(fd)
    if previous and folder.locked:
        folder.announce(f"note: {folder.path} was held by {describe(previous)}, which ended without letting go "
                        f"of it (killed, or crashed): this run takes it over")
    elif previous:
        folder.announce(f"note: {folder.path} was held by {describe(previous)}; without working locks, whether it "
                        f"still runs cannot be told from here: this run takes the folder over")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": HOST, "started": folder.started}).encode(), 0)
    except OSError:  # a full disk: the lock holds all the same, only its holder goes unnamed
        pass


def process_exists(pid: Any) -> bool:
    """Whether a process `pid` runs on this machine."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, and someone else's
        return True
    return True


def refuse_if_held(path: Path) -> None:
    """Stop at once if a live process holds `path`'s lock; a probe that writes nothing."""
    try:
        fd = os.open(path / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file (or none readable): nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunFolderError(in_use(path, read_holder(fd))) from None
    except OSError:  # no working locks here: `lock` says so
        pass
    finally:
        os.close(fd)  # and with it the probe's own lock


def read_holder(fd: int) -> dict[str, Any] | None:
    """What the lock file says about its holder, if it says anything readable."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def in_use(path: Path, holder: dict[str, Any] | None) -> str:
    who = describe(holder) if holder else "another process"
    return (f"{path} is in use by another training ({who}): wait for it to end or stop it, or choose another "
            f"--output-dir")


def describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


def same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------ the record
def read_record(path: Path) -> dict[str, Any] | None:
    """The run folder's `run.json`, or None if it has none (or none readable)."""
    try:
        record = json.loads((path / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def carry_over(folder: RunFolder) -> None:
    """A continued run keeps what its record says of its whole life: where it started, what it forked from, its
    last checkpoint."""
    record = read_record(folder.path) or {}
    if isinstance(record.get("started"), str):
        folder.started = record["started"]
    if isinstance(record.get("forked_from"), str):
        folder.forked_from = record["forked_from"]
    if isinstance(record.get("step"), int) and isinstance(record.get("checkpoint"), str):
        folder.step, folder.checkpoint = record["step"], record["checkpoint"]


def remove_entries(path: Path, keep: set[str]) -> None:
    """Remove what a run wrote into `path`, keeping the names in `keep` (there before it)."""
    for name in (*RUN_FILES, LOCK):
        if name in keep:
            continue
        entry = path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")

