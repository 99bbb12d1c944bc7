"""Which checkpoints a run writes and keeps, and which one it resumes from (the file format and its checks are
`toolkit.checkpoint`'s).

A run saves at the end of each epoch, every `checkpoint_every_steps` optimizer steps, and when it stops early
(a signal, the time limit, a target reached); the main process writes while the others wait. It keeps the newest
`keep_last` complete checkpoints and the best one by eval accuracy; older ones are deleted only after a newer one
is complete. With `slim_checkpoints` (the default) the best, kept apart from the newest `keep_last`, keeps what
using the model needs, not what continuing the training does (the optimizer state, the trained weights beside
their average): about a quarter of the size with AdamW. Leftovers of interrupted saves are removed after the next
complete save, never while their writer may still be writing. `save_checkpoints: false` writes none (a trial, a
benchmark).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from toolkit.agreement import decided_on_main
from toolkit.checkpoint import (
    FOR_USE,
    FORMAT,
    HASH,
    MARKER,
    STAGING,
    Checkpoint,
    CheckpointError,
    TrainProgress,
    complete_checkpoints,
    has_checksums,
    is_complete,
    latest,
    load,
    read_marker,
    save,
    step_dir,
    tensor_bytes,
)
from toolkit.files import write_atomic
from toolkit.rundir import HOST, RunFolder, process_exists

SLOW_DISK_BYTES_PER_S = 100e6  # what a save is assumed to take before one is timed: a slow disk's speed


class CheckpointSaver:
    """The checkpoints of one run, in its folder's `checkpoints/`. Every process holds one; only the main
    process writes."""

    def __init__(self, folder: RunFolder, bytes_per_checkpoint: int, keep_last: int, every_steps: int,
                 enabled: bool = True, slim_bytes: int | None = None) -> None:
        self.folder = folder
        self.directory = folder.checkpoints
        self.bytes_per_checkpoint = bytes_per_checkpoint
        self.slim_bytes = slim_bytes  # what an older checkpoint keeps, slimmed; None: they are not slimmed
        self.keep_last = keep_last
        self.every_steps = every_steps
        self.enabled = enabled
        self.last_saved: tuple[int, int, int] | None = None  # (step, epoch, evaluations) of the last state saved
        self.last_seconds = 0.0  # how long the last save took, all processes waiting for it

    def due(self, step: int) -> bool:
        """Whether step `step` is one of the periodic saves (`checkpoint_every_steps`)."""
        return bool(self.every_steps) and step % self.every_steps == 0

    def saved(self, progress: TrainProgress) -> bool:
        """Whether `progress` is the state saved last: a step saved periodically at an epoch's last batch is saved
        again once the epoch's evaluation and end have changed it."""
        return self.last_saved == (progress.step, progress.epoch, len(progress.history))

    def mark_saved(self, progress: TrainProgress) -> None:
        self.last_saved = (progress.step, progress.epoch, len(progress.history))

    def save(self, state: Checkpoint, best_step: int) -> Path | None:
        """Write `state` (main process; the others return None at once) and prune, keeping the best checkpoint
        (of `best_step`); the run folder's record names the new one."""
        step = state.progress.step
        self.mark_saved(state.progress)
        if not self.enabled or not self.folder.owner:
            return None
        started = time.perf_counter()
        path = save(self.directory, state)
        self.folder.saved(step, path)
        prune(self.directory, self.keep_last, keep=step_dir(self.directory, best_step), sole_writer=self.folder.locked)
        if self.slim_bytes is not None:  # the best, kept apart from the newest: what using the model needs
            for older in complete_checkpoints(self.directory)[:-self.keep_last]:
                slim(older)
        self.last_seconds = time.perf_counter() - started
        return path

    def seconds_to_save(self) -> float:
        """How long a save takes: the last one timed, else its size at a slow disk's speed, plus a second."""
        if not self.enabled:
            return 0.0
        return self.last_seconds or 1 + self.bytes_per_checkpoint / SLOW_DISK_BYTES_PER_S

    def best(self, best_step: int) -> Path | None:
        """The best checkpoint's folder, if it is (still) complete."""
        path = step_dir(self.directory, best_step)
        return path if best_step >= 0 and is_complete(path) else None

    def newest(self) -> Path | None:
        found = latest(self.directory)
        return found[0] if found else None

    def disk_warning(self) -> str | None:
        return disk_warning(self.directory, self.bytes_per_checkpoint, self.keep_last) if self.enabled else None


def expected_bytes(model: torch.nn.Module, optimizer: str, momentum: float, averaged: bool) -> int:
    """The size of one checkpoint of a run: the weights, the optimizer's state per weight (AdamW two moments,
    SGD one buffer with momentum, none without), and the trained weights beside their average, if any."""
    copies = 1 + (2 if optimizer == "adamw" else int(momentum > 0)) + int(averaged)
    return tensor_bytes(model.state_dict()) * copies


def disk_warning(directory: Path, per_checkpoint: int, keep_last: int) -> str | None:
    """A warning when the disk under `directory` cannot take the checkpoints a run keeps: `keep_last`, the best,
    and the one being written, less those already there (counted whole: the best is slimmed only once a newer one
    is complete). None when it can."""
    existing = sum(f.stat().st_size for p in complete_checkpoints(directory) for f in p.iterdir() if f.is_file())
    needed = max(per_checkpoint, per_checkpoint * (keep_last + 2) - existing)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free >= needed:
        return None
    return (f"warning: {free / 1e9:.2f} GB free for {directory}, and checkpoints need about {needed / 1e9:.2f} GB "
            f"more ({keep_last} kept, the best, and the one being written, {per_checkpoint / 1e9:.2f} GB each): "
            f"free space or lower --keep-last, or a save may fail")


def prune(directory: Path, keep_last: int, keep: Path | None = None, sole_writer: bool = False) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (never `keep`, the best one) and the leftovers
    of interrupted saves whose writer cannot still be writing them (`sole_writer`: the caller holds the run
    folder's lock, so no other process writes here). Called only after a new checkpoint is complete."""
    removed = []
    for path in complete_checkpoints(directory)[:-keep_last]:
        if keep is None or path.resolve() != keep.resolve():
            shutil.rmtree(path)
            removed.append(path)
    for path in directory.iterdir():
        if path.is_dir() and path.name.startswith(STAGING) and not writer_may_be_running(path.name, sole_writer):
            shutil.rmtree(path, ignore_errors=True)
    return removed


def writer_may_be_running(name: str, sole_writer: bool) -> bool:
    """Whether the writer of the staging folder `name` may still be writing it: a process of this host that is
    still there, or one of another host, unless the caller is the folder's only writer (it holds the run folder's
    lock). A leftover of an earlier version (`.tmp-step-N`) names no writer."""
    try:
        head, pid_text, _token = name.rsplit(".", 2)
        host, pid = head.split(".", 2)[2], int(pid_text)
    except (ValueError, IndexError):
        return False
    if host != HOST:
        return not sole_writer
    return pid != os.getpid() and process_exists(pid)


def choose_for_resume(directory: Path, resume: str, announce: Callable[[str], None]) -> Checkpoint | None:
    """The checkpoint a run resumes from, loaded: `resume` auto is the newest complete checkpoint in `directory`
    that loads and passes every check (announcing each one skipped), or None when there is none; otherwise
    `resume` is a checkpoint folder, and one that does not load is a CheckpointError."""
    if resume != "auto":
        return loaded(Path(resume), announce)
    refused = []
    for path in latest(directory):
        try:
            return loaded(path, announce)
        except CheckpointError as error:
            announce(f"warning: {error}; trying the previous checkpoint")
            refused.append(path.name)
    if refused:  # never start over where the run's own checkpoints are: its records would be rewritten
        raise CheckpointError(f"none of the checkpoints in {directory} can continue the run ({', '.join(refused)}: "
                              f"see the warnings above): move them aside to start the run over, or give "
                              f"--resume a checkpoint of your choice")
    announce(f"no complete checkpoint in {directory}: starting from scratch")
    return None


def slim(path: Path) -> int:
    """Keep what using the model needs of the checkpoint `path` (`checkpoint.FOR_USE`): its marker is rewritten
    first, atomically, to list only those files, then the others are removed; a kill at any moment leaves a
    checkpoint that verifies. The bytes freed (0 for one slimmed already, or of the earlier, size-only format)."""
    marker = read_marker(path)
    if marker.weights_only or marker.digests is None:
        return 0
    kept = {name: {"bytes": marker.sizes[name], HASH: marker.digests[name]} for name in marker.sizes
            if name in FOR_USE}
    write_atomic(path / MARKER, json.dumps({"format": FORMAT, "files": kept, "weights_only": True}, indent=1))
    freed = 0
    for name in sorted(set(marker.sizes) - set(kept)):
        freed += marker.sizes[name]
        (path / name).unlink(missing_ok=True)
    return freed


def chosen_for_resume(resume: str, folder: RunFolder, main_process: bool,
                      announce: Callable[[str], None]) -> tuple[Checkpoint | None, Path | None]:
    """(the checkpoint loaded, on the main process; its folder, on every process) for `--resume resume`, or
    (None, None) when `auto` finds none. The main process chooses, loading and checking as it goes; a refusal
    stops every process. Chosen before the run's parts are built: a wrong `--resume` is said at once."""
    chosen: Checkpoint | None = None

    def choose() -> str | None:
        nonlocal chosen
        chosen = choose_for_resume(folder.checkpoints, resume, announce)
        return str(chosen.path) if chosen else None

    path = decided_on_main(choose, main_process)
    return chosen, Path(path) if path else None


def loaded(path: Path, announce: Callable[[str], None]) -> Checkpoint:
    state = load(path)
    if not has_checksums(path):
        announce(f"note: {path} was saved by an earlier version, without checksums: its file sizes were checked, "
                 f"not its contents")
    return state
