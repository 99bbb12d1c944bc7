"""Writing files so that a reader never finds half of one: a temporary file beside the target, flushed to disk,
then renamed over it (a rename within a folder is atomic on POSIX filesystems). And the files a command writes
for its user (`Outputs`): checked before the work, written all or none after it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from toolkit.errors import UsageError, UserError


class OutputError(UserError):
    """A file could not be written (a full disk, a quota): nothing was written, the old files are intact."""

    same_on_every_machine = True


def fsync(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, so a rename survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it: set, then put back (at import, before any thread writes files)
    os.umask(mask)
    return mask


UMASK = _umask()


def file_mode() -> int:
    """The mode a new file gets here (0666 less the umask), for files written by libraries that choose their own."""
    return 0o666 & ~UMASK


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process, for writing before the rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace `path` with `content`: a reader sees the old file or the new one, never half of one. On any
    failure (a full disk, a quota) the temporary file is removed and the old file is left as it was."""
    write_all({path: content})


def write_all(contents: dict[Path, str | bytes]) -> None:
    """Replace each path with its content, all or none: every temporary file is written and flushed first, and
    only then is each renamed over its path. On a failure while writing (a full disk, a quota) the temporary
    files are removed and every old file is left as it was."""
    temporaries: list[Path] = []
    try:
        for path, content in contents.items():
            temporaries.append(temporary_name(path))
            temporaries[-1].unlink(missing_ok=True)  # a leftover of this pid's: never write through what is there
            descriptor = os.open(temporaries[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            with open(descriptor, "w" if isinstance(content, str) else "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
        for path, tmp in zip(contents, temporaries, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
    for folder in dict.fromkeys(path.parent for path in contents):
        fsync(folder)


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else its closest ancestor that does."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class Outputs:
    """The files a command writes for its user, in three steps. `file` and `folder` check each path as it is
    named (a UsageError: a folder where a file is wanted, a file where a folder is, a path under a file);
    `make_ready`, before the work, creates missing folders and proves each takes a file (by creating and
    removing an empty hidden one: permission bits say nothing to root, nor about a read-only mount);
    `write`, after the work, writes them all or none (an OutputError). As a context manager it removes the
    folders it created when the command fails, so a failed command leaves nothing behind."""

    def __init__(self) -> None:
        self.targets: dict[Path, str] = {}  # file -> the flag that named it
        self.folders: dict[Path, str] = {}  # folder to make ready -> the flag and path that named it
        self.created: list[Path] = []  # folders made by make_ready, parents first

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is not None:
            for folder in reversed(self.created):
                try:
                    folder.rmdir()  # only if still empty
                except OSError:
                    pass

    def file(self, raw: str, flag: str) -> Path:
        """The file `raw` names for `flag`, once it is clear a file can go there."""
        if not raw:
            raise UsageError(f"{flag}: give the path of a file to write, got ''")
        path = Path(raw)
        if raw.endswith(("/", os.sep)) or path.is_dir():
            raise UsageError(f"{flag} {raw} is a folder: give the path of the file to write")
        if path.exists() and not path.is_file():
            raise UsageError(f"{flag} {raw} exists and is not a regular file: give the path of a file to write")
        self._under_folders(path.parent, flag, raw)
        self.targets[path] = flag
        self.folders.setdefault(path.parent, f"{flag} {raw}")
        return path

    def folder(self, raw: str, flag: str, names: tuple[str, ...]) -> Path:
        """The folder `raw` names for `flag`, to hold the files `names`."""
        if not raw:
            raise UsageError(f"{flag}: give the path of a folder, got ''")
        path = Path(raw)
        if path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {raw} is a file: give a folder (it is created if missing)")
        self._under_folders(path, flag, raw)
        self.folders.setdefault(path, f"{flag} {raw}")
        for name in names:
            self.file(str(path / name), flag)
        return path

    @staticmethod
    def _under_folders(folder: Path, flag: str, raw: str) -> None:
        existing = nearest_existing(folder)
        if not existing.is_dir():
            raise UsageError(f"{flag} {raw}: {existing} is a file, not a folder")

    def make_ready(self) -> None:
        """Create the missing folders and check each takes a new file (a UsageError if not)."""
        for folder, named in self.folders.items():
            missing = []
            probe = Path(os.path.abspath(folder))
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            for path in reversed(missing):
                try:
                    path.mkdir()
                except FileExistsError:
                    continue  # another process of the same command made it
                except OSError as error:
                    raise UsageError(f"{named}: cannot create the folder {path} ({_reason(error)})") from None
                self.created.append(path)
            try:
                descriptor, name = tempfile.mkstemp(prefix=".probe-", dir=folder)
                os.close(descriptor)
                os.unlink(name)
            except OSError as error:
                raise UsageError(f"{named}: cannot write in {folder} ({_reason(error)})") from None

    def check_space(self, path: Path, needed_bytes: int, what: str) -> None:
        """An OutputError, before the work, when the disk under `path` clearly cannot take `needed_bytes`."""
        free = shutil.disk_usage(nearest_existing(path.parent)).free
        if free < needed_bytes:
            raise OutputError(f"{path.parent} has {free / 1e6:,.0f} MB free and {what} takes about "
                              f"{needed_bytes / 1e6:,.0f} MB: free space, or give another {self.targets[path]}")

    def write(self, contents: dict[Path, str | bytes]) -> None:
        """Write the files (named before), all or none; a failure is one OutputError line."""
        try:
            write_all(contents)
        except OSError as error:
            flags = " / ".join(dict.fromkeys(self.targets[p] for p in contents))
            raise OutputError(f"could not write {', '.join(str(p) for p in contents)} ({_reason(error)}): nothing "
                              f"was written; free space, or give another {flags}") \
                from None


def _reason(error: OSError) -> str:
    return error.strerror or str(error)
