"""Helpers for the tests of using a trained model (test_inference, test_evaluate, test_predict, test_export):
checkpoints made in a second, the one-line error check, and proof that no file a user had was touched."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from toolkit import checkpoint
from toolkit.config import TrainConfig
from toolkit.model import build_model

IMAGE_SIZE = 65  # the smallest input the network takes: the fastest to evaluate


def save_checkpoint(directory: Path, weights: dict[str, torch.Tensor] | None = None, precision: str = "no",
                    config: dict | None = None) -> Path:
    """A complete checkpoint folder under `directory`: `weights` (else a seeded, untrained AlexNet), saved as if
    trained in `precision`, with `config` (else the defaults at IMAGE_SIZE px)."""
    if weights is None:
        torch.manual_seed(0)
        weights = build_model(init="default", dropout=0.5).state_dict()
    return checkpoint.save(directory, checkpoint.Checkpoint(
        weights=weights, train_weights=None, trainer_state={}, progress=checkpoint.TrainProgress(),
        config=config or TrainConfig(image_size=IMAGE_SIZE).to_dict(), meta={"precision": precision}))


def one_error_line(capsys: pytest.CaptureFixture[str], main: Callable[[list[str]], int], argv: list[str],
                   code: int = 1) -> str:
    """Run a command in-process as its command line does (`raise SystemExit(main())`): it must exit with `code`
    and write exactly one line to stderr (no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def snapshot(*roots: Path) -> dict[Path, str]:
    """{path: sha256 of its bytes, or "folder"} of everything under `roots`, to show later that nothing changed,
    appeared or disappeared there. Files over a megabyte (checkpoints' weights) are known by their size and their
    inode's change time instead, which any write or rename changes, in nanoseconds: hashing them twice per case
    took seconds."""
    found: dict[Path, str] = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            if path.is_dir():
                found[path] = "folder"
            elif path.is_file():
                info = path.stat()
                found[path] = (f"{info.st_size} bytes, changed {info.st_ctime_ns}, inode {info.st_ino}"
                               if info.st_size > 1 << 20 else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def temporaries(root: Path) -> list[Path]:
    """Temporary or probe files a write may have left under `root`."""
    return [p for p in root.rglob(".*") if ".tmp-" in p.name or p.name.startswith(".probe-")]


def full_disk_after(limit: int) -> type:
    """An `open` for toolkit.files (monkeypatch it in as `toolkit.files.open`) whose files fail like a full disk
    once `limit` bytes are written in all."""
    written = [0]

    class FullDisk:
        def __init__(self, path, mode):
            self.file = open(path, mode)  # closed by __exit__

        def write(self, content):
            written[0] += len(content)
            if written[0] > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(content)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def __getattr__(self, name):
            return getattr(self.file, name)

    return FullDisk
