"""Checkpoints that survive a kill at any moment.

A checkpoint is a folder `checkpoints/step-XXXXXXXX/` holding
- `model.safetensors`: the weights to use (the moving average when the run keeps one), no pickle;
- `train_model.safetensors`: with a moving average, the trained weights training continues from;
- `trainer_state.pt`: optimizer, LR schedule, gradient scaler and every process's random state (tensors and
  plain values only, read back with `torch.load(weights_only=True)`, which refuses anything that could run code);
- `state.json`: the position (epoch, next batch, step), the metrics so far, the best accuracy, the world size;
- `config.yaml`: the resolved config;
- `COMPLETE`: written last, listing each file's size.

It is written into a temporary folder beside its final place, each file flushed to disk, then renamed into
place. A folder without its marker, or whose files do not match the marker, is never loaded. Old checkpoints
are deleted only after the new one is complete, and the best one (by eval accuracy) is never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from toolkit.errors import UserError
from toolkit.files import fsync

MARKER = "COMPLETE"
WEIGHTS = "model.safetensors"
TRAIN_WEIGHTS = "train_model.safetensors"
TRAINER_STATE = "trainer_state.pt"
STATE = "state.json"
CONFIG = "config.yaml"
PREFIX = "step-"


class CheckpointError(UserError):
    pass


@dataclass
class TrainProgress:
    """Where training stands; saved in `state.json`."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # the next batch of that epoch (with gradient accumulation, the next micro-batch)
    step: int = 0  # optimizer steps done
    epoch_loss_sum: float = 0.0  # this epoch's training loss so far, summed over images, all processes
    epoch_images: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluation
    best_accuracy: float = -1.0
    best_step: int = -1
    evaluations_since_best: int = 0  # for early stopping
    skipped_steps: int = 0  # fp16 steps the gradient scaler skipped (inf/NaN gradients)
    images_seen: int = 0  # training images, all processes, all sessions
    train_seconds: float = 0.0  # time in training steps, evaluation and checkpoints excluded, all sessions
    wall_seconds: float = 0.0  # time the run's sessions took, start-up included
    reached: dict[str, dict[str, Any]] = field(default_factory=dict)  # accuracy -> when evaluation first reached it


@dataclass
class Checkpoint:
    """What a checkpoint holds: the trainer's whole state (`Trainer.state_dict()`), and once saved or loaded,
    its folder."""

    weights: dict[str, torch.Tensor]  # the weights to use: the moving average when the run keeps one
    train_weights: dict[str, torch.Tensor] | None  # with a moving average, the weights training continues from
    trainer_state: dict[str, Any]  # optimizer, schedule, scaler, every process's random state
    progress: TrainProgress
    config: dict[str, Any]
    meta: dict[str, Any]  # world_size, device, precision
    path: Path | None = None


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors stores plain row-major tensors: channels-last weights are made contiguous for the file
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(path),
              metadata={"format": "pt"})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None


def step_dir(directory: Path, step: int) -> Path:
    return directory / f"{PREFIX}{step:08d}"


def save(directory: Path, state: Checkpoint) -> Path:
    """Write a complete checkpoint for `state.progress.step` atomically; return its folder."""
    weights, train_weights, trainer_state = state.weights, state.train_weights, state.trainer_state
    progress, config, meta = state.progress, state.config, state.meta
    directory.mkdir(parents=True, exist_ok=True)
    final = step_dir(directory, progress.step)
    tmp = directory / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    files = [WEIGHTS, TRAINER_STATE, STATE, CONFIG] + ([TRAIN_WEIGHTS] if train_weights is not None else [])
    try:
        tmp.mkdir()
        save_weights(weights, tmp / WEIGHTS)
        if train_weights is not None:
            save_weights(train_weights, tmp / TRAIN_WEIGHTS)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / STATE).write_text(json.dumps({**meta, "progress": asdict(progress)}, indent=1))
        (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        for name in files:
            fsync(tmp / name)
        (tmp / MARKER).write_text(json.dumps({name: (tmp / name).stat().st_size for name in files}))
        fsync(tmp / MARKER)
        fsync(tmp)
    except (OSError, SafetensorError) as error:  # a full disk, a quota, a read-only folder: give the space back
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest(directory)
        then = f"continue from {kept[0].name}, which is intact, with --resume auto" if kept else "run again"
        reason = getattr(error, "strerror", None) or str(error)
        megabytes = tensor_bytes([weights, train_weights, trainer_state]) / 1e6
        raise CheckpointError(f"could not write checkpoint {final.name} in {directory} ({reason}): free space (a "
                              f"checkpoint takes about {megabytes:.0f} MB) and {then}") from None
    if final.exists():  # the same step saved by an earlier attempt of this run: replace it
        stale = directory / f".old-{final.name}"
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale)
    else:
        os.rename(tmp, final)
    fsync(directory)
    return final


def tensor_bytes(value: Any) -> int:
    """The bytes of the tensors in `value`, a tensor or nested dicts, lists and tuples of them: what they take
    in a checkpoint, headers aside."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    return 0


def expected_bytes(model: torch.nn.Module, optimizer: str, momentum: float, averaged: bool) -> int:
    """The size of one checkpoint of a run: the weights, the optimizer's state per weight (AdamW two moments,
    SGD one buffer with momentum, none without), and the trained weights beside their average, if any."""
    copies = 1 + (2 if optimizer == "adamw" else int(momentum > 0)) + int(averaged)
    return tensor_bytes(model.state_dict()) * copies


def disk_warning(directory: Path, per_checkpoint: int, keep_last: int) -> str | None:
    """A warning when the disk under `directory` cannot take the checkpoints a run keeps: `keep_last`, the best,
    and the one being written, less those already there. None when it can."""
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


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint folders under `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def prune(directory: Path, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (never `keep`, the best one) and any
    leftovers of interrupted saves. Called only after a new checkpoint is complete."""
    removed = []
    for path in complete_checkpoints(directory)[:-keep_last]:
        if keep is None or path.resolve() != keep.resolve():
            shutil.rmtree(path)
            removed.append(path)
    for path in directory.iterdir():
        if path.is_dir() and path.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(path, ignore_errors=True)
    return removed


def verify(path: Path) -> None:
    """Raise CheckpointError unless `path` is a complete checkpoint whose files match its marker."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder")
    if not is_complete(path):
        raise CheckpointError(f"{path} is incomplete (no {MARKER} marker): it was being written when its run "
                              f"stopped")
    try:
        sizes = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{path / MARKER} is corrupted") from None
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file} is truncated or corrupted ({file.stat().st_size} bytes, "
                                  f"{size} when saved)")


def load(path: Path) -> Checkpoint:
    """Read a verified checkpoint onto the CPU. Nothing is unpickled beyond tensors and plain values."""
    verify(path)
    weights = load_weights(path / WEIGHTS)
    train_weights = load_weights(path / TRAIN_WEIGHTS) if (path / TRAIN_WEIGHTS).exists() else None
    try:
        trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, or a pickle the safe loader refuses
        reason = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path / TRAINER_STATE} is corrupted or unsafe and was not loaded ({reason})") \
            from None
    try:
        progress = TrainProgress(**json.loads((path / STATE).read_text())["progress"])
    except (OSError, ValueError, TypeError, KeyError):
        raise CheckpointError(f"{path / STATE} is unreadable") from None
    return Checkpoint(weights=weights, train_weights=train_weights, trainer_state=trainer_state,
                      progress=progress, config=load_config(path), meta=load_meta(path), path=path)


def load_config(path: Path) -> dict[str, Any]:
    """The resolved training config saved with a checkpoint."""
    try:
        config = yaml.safe_load((path / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / CONFIG} is missing or unreadable")
    return config


def load_meta(path: Path) -> dict[str, Any]:
    """World size, device and precision of the run that saved a checkpoint ({} if unknown)."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in state.items() if k != "progress"} if isinstance(state, dict) else {}


def load_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `weights` into `model`, or raise CheckpointError naming what does not match."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"shape {', '.join(wrong[:3])}" if wrong else ""]))
        raise CheckpointError(f"{source} does not hold this model's weights: {detail}")
    model.load_state_dict(weights)


def latest(directory: Path) -> list[Path]:
    """Complete checkpoints, newest first: the order `--resume auto` tries them in."""
    return list(reversed(complete_checkpoints(directory)))


def choose_for_resume(directory: Path, resume: str, announce: Callable[[str], None]) -> Checkpoint | None:
    """The checkpoint a run resumes from, loaded: `resume` auto is the newest complete checkpoint in `directory`
    that loads (announcing each one skipped), or None when there is none; otherwise `resume` is a checkpoint
    folder, and one that does not load is a CheckpointError."""
    if resume != "auto":
        return load(Path(resume))
    for path in latest(directory):
        try:
            return load(path)
        except CheckpointError as error:
            announce(f"warning: {error}; trying the previous checkpoint")
    announce(f"no complete checkpoint in {directory}: starting from scratch")
    return None


def for_inference(path: Path) -> tuple[Path, str]:
    """The checkpoint folder to use for `path` and why: a checkpoint folder itself, or for a run folder its
    best checkpoint (by eval accuracy) if it still exists, else its latest."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        raise CheckpointError(f"{path} is a file: a checkpoint is a folder holding {WEIGHTS} "
                              f"(runs/x/checkpoints/step-...), or give the run folder")
    if (path / WEIGHTS).exists() or is_complete(path):
        return path, "checkpoint given"
    candidates = latest(path / "checkpoints")
    if not candidates:
        raise CheckpointError(f"{path} is neither a checkpoint folder nor a run folder with complete checkpoints")
    try:
        best_step = json.loads((candidates[0] / STATE).read_text())["progress"]["best_step"]
    except (OSError, ValueError, KeyError):
        best_step = -1
    best = step_dir(path / "checkpoints", best_step)
    if best_step >= 0 and is_complete(best):
        return best, "best eval accuracy in the run"
    return candidates[0], "latest in the run"
