"""A run folder belongs to one run: which run may use it, who holds it now, and how the run ended.

Which run may use a folder (`claim`, before anything is written):
- no `--resume`: a new run, in a folder that is new, or holds neither a run nor any of the files a run writes
  (`WRITTEN`: a user's own `config.yaml` there is never overwritten), and lies inside no run;
- `--resume auto`, or a checkpoint in the folder's own `checkpoints/`: the run in the folder, continued (a folder
  with no run in it starts one from scratch, unless it holds files a run would write);
- `--resume` of any other checkpoint: a new run forked from it, in a folder as for a new run. `run.json` records
  `forked_from`; the source run's files are only read.
Anything else stops with one line and exit 2, before a file is touched. A folder holds a run of this toolkit when
it has a `run.json` it wrote (or, from before `run.json` existed, complete checkpoints).

Who holds it: while a run trains, its main process holds an advisory lock (`flock`) on `run.lock`, a file that
names it (pid, host, start time), opened without following a link. A second training on the folder stops at once,
naming the holder. The kernel drops the lock when the process ends, however it ends; the file, still naming a
process that was killed, is taken over with a line saying so. A run that ends removes the file.

How the run ended: `run.json`, rewritten atomically by the main process once training starts, says `running`
(with the last checkpoint saved), `stopping` (a signal arrived: the last checkpoint, or the one being written, is
where it continues), `finished`, `stopped` (by a signal or the time limit, saved, to be resumed: `resume` holds the
flags) or `failed` (with the one-line error). Schedulers read it rather than a launcher's exit code. An attempt
that fails before its first step leaves a new folder nowhere and an existing run's `run.json` as it was.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import secrets
import shlex
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from toolkit.agreement import decided_on_main, same_everywhere, shared_with_every_machine
from toolkit.errors import UsageError, UserError, one_line
from toolkit.files import write_atomic

LOCK = "run.lock"
RECORD = "run.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
PROFILE = "profile"
CONSOLE_LOG = "console.log"
# What a run writes in its folder (the lock aside), its trackers' local folders included: a new run never starts
# where one of these already is and is not its own.
WRITTEN = (CONFIG, METRICS, RECORD, CHECKPOINTS, TENSORBOARD, PROFILE, CONSOLE_LOG, "mlruns", "dvclive", "wandb",
           ".aim")
STATUSES = ("running", "stopping", "stopped", "finished", "failed")
DEFAULT_PARENT = Path("runs")
HOST = socket.gethostname()
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}  # a filesystem without working flock (some NFS, Lustre)

Announce = Callable[[str], None]


class RunFolderError(UsageError):
    """The run folder cannot be used as asked. Raised on every process, reported by the main one."""


class RunFolder:
    """The run folder of this run, and the names of what a run keeps there. Only the main process (`owner`) holds
    the lock and writes `run.json`; on the other processes every method that writes does nothing."""

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
        self.start_step = 0  # where this session started: a resumed or forked checkpoint's step
        self.created: list[Path] = []  # folders this claim made, outermost first
        self.previous_entries: set[str] = set()  # names already in a folder that existed
        self.fd: int | None = None
        self.training = False  # this session has started training (and `run.json` says so)
        self.saved_any = False
        self.outcome: str | None = None  # how this session ended, once recorded
        self.status: str | None = None  # what run.json says, once this session wrote it
        self.discard = False
        self.released = False
        self.token: str | None = None  # a file left for every machine to see, while they check

    # ------------------------------------------------------------------ what a run keeps here
    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def profile(self) -> Path:
        return self.path / PROFILE

    @property
    def console_log(self) -> Path:
        return self.path / CONSOLE_LOG

    @property
    def resume_flags(self) -> str:
        """The flags that continue this run, quoted for a shell."""
        return f"--resume auto --output-dir {shlex.quote(str(self.path))}"

    # ------------------------------------------------------------------ what the trainer reports
    def starts_at(self, step: int) -> None:
        """The step this session starts from (a resumed or forked checkpoint's)."""
        self.start_step = step

    def training_starts(self) -> None:
        """Set-up is done and the first step comes: from here on `run.json` follows this session."""
        self.training = True
        self.record("running")

    def saved(self, step: int, checkpoint: Path) -> None:
        """A checkpoint is complete: the run now has something to resume from."""
        self.step, self.checkpoint, self.saved_any = step, str(checkpoint), True
        self.record("running")

    def stopping(self, reason: str) -> None:
        """A signal arrived: until the save completes (and if it never does), the run is one to continue from its
        last complete checkpoint."""
        if self.status != "stopping":
            self.record("stopping", reason)

    def ended(self, status: str, reason: str | None) -> None:
        """The run returned: `stopped` (to be continued) or `finished`, for `reason` (a `stopping.Stop`'s)."""
        self.outcome = status
        self.record(status, reason)

    def failed(self, error: BaseException, step: int | None = None) -> None:
        """The run raised `error` at `step` (the first report counts). An attempt that never started training
        changes nothing of the run it refers to; a new run that did no step is discarded at `release`; any other
        records the error's one line."""
        if not self.owner or self.outcome is not None:
            return
        self.outcome = "failed"
        if self.new and not self.saved_any and (step is None or step <= self.start_step):
            self.discard = True
            return
        if not self.training:
            return
        message = str(error) if isinstance(error, UserError) else one_line(error)
        self.record("failed", type(error).__name__, message)

    def record(self, status: str, reason: str | None = None, message: str | None = None) -> None:
        """Rewrite `run.json`. A failure to write it is a warning: the run's own results are not at stake."""
        if not self.owner:
            return
        self.status = status
        record = {"status": status, "reason": reason, "message": message, "step": self.step,
                  "checkpoint": self.checkpoint, "resume": None if status == "finished" else self.resume_flags,
                  "forked_from": self.forked_from, "started": self.started, "updated": now(), "host": HOST,
                  "pid": os.getpid()}
        try:
            write_atomic(self.path / RECORD, json.dumps(record, indent=1) + "\n")
        except OSError as error:
            self.announce(f"warning: could not record the run's state in {self.path / RECORD} ({error.strerror})")

    # ------------------------------------------------------------------ what every machine must see
    def leave_token(self) -> str:
        """A file for every machine to find (`agreement.shared_with_every_machine`): its name."""
        self.token = f".shared-{secrets.token_hex(8)}"
        (self.path / self.token).write_text(f"{HOST} {os.getpid()}\n")
        return self.token

    def take_token(self) -> None:
        if self.owner and self.token:
            (self.path / self.token).unlink(missing_ok=True)

    # ------------------------------------------------------------------ the end
    def release(self) -> None:
        """Give the folder up: a discarded run's files go, the lock file is removed and the lock dropped, and the
        folders the claim made are removed if empty."""
        if not self.owner or self.released:
            return
        self.released = True
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


# ------------------------------------------------------------------ claiming
@contextmanager
def claim(output_dir: str, resume: str, main_process: bool = True, announce: Announce = print) -> Iterator[RunFolder]:
    """The run folder for a run with `--output-dir output_dir` ('' = a new `runs/<timestamp>`) and `--resume
    resume`, held for the `with` block. Every process calls it: the main process checks and takes the folder, and
    the others learn its path, or its refusal (then every process fails with it; only the main process reports
    it). Leaving the block with an error records it (`RunFolder.failed`); leaving it anyhow lets the folder go."""
    same_everywhere({"--output-dir": output_dir, "--resume": resume})
    folder: RunFolder | None = None

    def take_on_main() -> tuple[str, str]:
        nonlocal folder
        folder = take(output_dir, resume, announce)
        return str(folder.path), folder.leave_token()

    path, token = decided_on_main(take_on_main, main_process)
    folder = folder or RunFolder(Path(path), owner=False, announce=announce)
    try:
        try:
            shared_with_every_machine(folder.path, token)
        finally:
            folder.take_token()
        yield folder
    except BaseException as error:
        folder.failed(error)
        raise
    finally:
        folder.release()


def take(output_dir: str, resume: str, announce: Announce) -> RunFolder:
    """Check what the run may do with the folder, then lock it. Nothing is written before every check that needs
    no lock has passed; `run.json` is written when training starts (`RunFolder.training_starts`)."""
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
    folder.new = not holds_run(path)
    folder.previous_entries = {entry.name for entry in path.iterdir()} - {LOCK}
    if continuing:
        carry_over(folder)
    elif source is not None:
        folder.forked_from = str(source.resolve())
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


def written_entries(path: Path) -> list[str]:
    """The names a run writes that `path` holds, links included."""
    if not path.is_dir():
        return []
    return [name for name in WRITTEN if os.path.lexists(path / name)]


def holds_run(path: Path) -> bool:
    """Whether `path` holds a run of this toolkit: a `run.json` it wrote, or (a run from before `run.json`
    existed) complete checkpoints."""
    if not path.is_dir():
        return False
    record = read_record(path)
    if record is not None and record.get("status") in STATUSES:
        return True
    checkpoints = path / CHECKPOINTS
    return checkpoints.is_dir() and any((p / "COMPLETE").is_file() for p in checkpoints.glob("step-*"))


def run_folder_around(path: Path) -> Path | None:
    """The run folder that `path` lies inside, if any."""
    for parent in path.resolve().parents:
        if holds_run(parent):
            return parent
    return None


def refuse_if_not_free(path: Path, source: Path | None, continuing: bool) -> None:
    """A new run (fresh or forked) needs a folder that holds no run and none of the files a run writes, and lies
    inside no run; a continued one, a run or a folder without a run's files."""
    run_here, entries = holds_run(path), written_entries(path)
    if continuing:
        if entries and not run_here:
            raise RunFolderError(f"{path} holds no run to continue, but has {', '.join(entries)}, which a run "
                                 f"writes there and no run of this toolkit wrote (there is no {RECORD}): move "
                                 f"{'them' if len(entries) > 1 else 'it'}, or choose another --output-dir")
        return
    if run_here and source is None:
        raise RunFolderError(f"{path} already holds a run: pass --resume auto to continue it, or choose another "
                             f"--output-dir (it has {', '.join(entries)})")
    if run_here:
        source_run = source.parent.parent if source.parent.name == CHECKPOINTS else source
        raise RunFolderError(f"--resume {source} is a checkpoint of the run {source_run}, and --output-dir {path} "
                             f"holds another run: a run continues only from its own checkpoints (--resume auto); "
                             f"to start a new run from {source}, choose a new or empty --output-dir")
    if entries:
        raise RunFolderError(f"--output-dir {path} holds {', '.join(entries)}, which a run writes there and no run "
                             f"of this toolkit wrote (there is no {RECORD}): move "
                             f"{'them' if len(entries) > 1 else 'it'}, or choose another --output-dir")
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
def open_lock_file(path: Path, flags: int) -> int:
    """The lock file opened in place, never through a link planted there, never blocking on a FIFO; a
    RunFolderError naming what is there instead of a file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RunFolderError(f"{path} is a symbolic link: a run never writes through a link in its folder; remove "
                                 f"it (a run makes its own {LOCK})") from None
        if error.errno == errno.EISDIR:
            raise RunFolderError(f"{path} is a folder, where a run keeps its lock file: remove it") from None
        raise
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):  # opened read-only, a folder gives no EISDIR
        os.close(fd)
        raise RunFolderError(f"{path} is a folder, where a run keeps its lock file: remove it")
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise RunFolderError(f"{path} is not a regular file (a FIFO, a socket or a device), where a run keeps its "
                             f"lock file: remove it")
    return fd


def lock(folder: RunFolder) -> None:
    """Take the folder's lock, or raise RunFolderError naming its holder. A lock file still naming a process
    (one that was killed) is taken over, saying so."""
    path = folder.path / LOCK
    while True:
        try:
            fd = open_lock_file(path, os.O_RDWR | os.O_CREAT)
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
    """Whether a process `pid` runs on this machine (a zombie, dead but not yet reaped by its parent, does not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, and someone else's
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): the signal's answer stands
        return True
    return state not in ("Z", "X")


def refuse_if_held(path: Path) -> None:
    """Stop at once if a live process holds `path`'s lock; a probe that writes nothing."""
    try:
        fd = open_lock_file(path / LOCK, os.O_RDONLY)
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
        return os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
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
    for name in (*WRITTEN, LOCK):
        if name in keep:
            continue
        entry = path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
