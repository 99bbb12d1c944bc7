"""Writing files so that a reader never finds half of one: a temporary file beside the target, flushed to disk,
then renamed over it (a rename within a folder is atomic on POSIX filesystems)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, so a rename survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process, for writing before the rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace `path` with `content`: a reader sees the old file or the new one, never half of one. On any
    failure (a full disk, a quota) the temporary file is removed and the old file is left as it was."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb" if isinstance(content, bytes) else "w") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)
