"""Checkpoints that survive a kill at any moment, and say so when they are damaged.

A checkpoint is a folder `checkpoints/step-XXXXXXXX/` holding
- `model.safetensors`: the weights to use (the moving average when the run keeps one), no pickle;
- `train_model.safetensors`: with a moving average, the trained weights training continues from;
- `trainer_state.pt`: optimizer, LR schedule, gradient scaler and every process's random state (tensors and
  plain values only, read back with `torch.load(weights_only=True)`, which refuses anything that could run code);
- `state.json`: the position (epoch, next batch, step), the metrics so far, the best accuracy, the world size;
- `config.yaml`: the resolved config;
- `COMPLETE`: written last, listing each file's size and SHA-256 (`sha256sum` checks them from a shell).

It is written into a temporary folder beside its final place (a name unique to the writing process), each file
flushed to disk, then renamed into place. Any failure while writing (a full disk, a quota, an error, an interrupt)
removes the temporary folder. A folder without its marker, or whose files do not match it (size, checksum, or
fields of the wrong type), is never loaded. Checkpoints of the earlier format (sizes only in `COMPLETE`) still
load, with a note that their contents could not be checked. Which checkpoints a run writes, keeps and resumes from
is `toolkit.saver`'s.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from toolkit.errors import UserError, one_line
from toolkit.files import file_mode, fsync

MARKER = "COMPLETE"
WEIGHTS = "model.safetensors"
TRAIN_WEIGHTS = "train_model.safetensors"
TRAINER_STATE = "trainer_state.pt"
STATE = "state.json"
CONFIG = "config.yaml"
PREFIX = "step-"
REQUIRED = (WEIGHTS, TRAINER_STATE, STATE, CONFIG)
FILES = (*REQUIRED, TRAIN_WEIGHTS)
# A slimmed checkpoint (an older one a run keeps, `saver.slim`) holds what using the model needs, not what
# continuing the training does; its marker says `"weights_only": true`.
FOR_USE = (WEIGHTS, STATE, CONFIG)
FORMAT = 2  # of COMPLETE: 2 = {"format": 2, "files": {name: {"bytes", "sha256"}}}; the earlier one, {name: bytes}
HASH = "sha256"  # hashed with SHA-NI at ~1.8 GB/s here, and checkable with `sha256sum`
STAGING = (".tmp-", ".old-")  # a checkpoint being written, and one being replaced
HOST = socket.gethostname()


class CheckpointError(UserError):
    same_on_every_machine = True


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


@dataclass(frozen=True)
class Marker:
    """What `COMPLETE` records: each file's size, and its SHA-256 (None for the earlier, size-only format)."""

    sizes: dict[str, int]
    digests: dict[str, str] | None
    weights_only: bool = False


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors stores plain row-major tensors: channels-last weights are made contiguous for the file
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(path),
              metadata={"format": "pt"})
    os.chmod(path, file_mode())  # safetensors creates its files 0600; the rest of a run's files follow the umask


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None


def step_dir(directory: Path, step: int) -> Path:
    return directory / f"{PREFIX}{step:08d}"


# ------------------------------------------------------------------ writing
def save(directory: Path, state: Checkpoint) -> Path:
    """Write a complete checkpoint for `state.progress.step` atomically; return its folder. Whatever fails while
    it is written, the partial folder is removed first: then an error is a CheckpointError naming the intact
    checkpoint to resume from, and an interrupt (KeyboardInterrupt) goes on as it came."""
    directory.mkdir(parents=True, exist_ok=True)
    final = step_dir(directory, state.progress.step)
    tmp = directory / staging_name(".tmp-", final.name)
    try:
        tmp.mkdir()
        written = write_files(tmp, state)
        marker = {"format": FORMAT, "files": written}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        fsync(tmp / MARKER)
        fsync(tmp)
        install(tmp, final)
    except BaseException as error:  # torch.save reports a full disk as a RuntimeError: every failure cleans up
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(error, Exception):
            raise
        raise write_error(directory, final, state, error) from None
    return final


def write_files(folder: Path, state: Checkpoint) -> dict[str, dict[str, Any]]:
    """Write the checkpoint's files into `folder`, each flushed to disk: {name: {"bytes", "sha256"}}."""
    written = {WEIGHTS: write_weights(state.weights, folder / WEIGHTS)}
    if state.train_weights is not None:
        written[TRAIN_WEIGHTS] = write_weights(state.train_weights, folder / TRAIN_WEIGHTS)
    written[TRAINER_STATE] = write_through(folder / TRAINER_STATE, lambda file: torch.save(state.trainer_state, file))
    state_text = json.dumps({**state.meta, "progress": asdict(state.progress)}, indent=1)
    written[STATE] = write_through(folder / STATE, lambda file: file.write(state_text.encode()))
    config_text = yaml.safe_dump(state.config, sort_keys=False)
    written[CONFIG] = write_through(folder / CONFIG, lambda file: file.write(config_text.encode()))
    return written


def write_weights(weights: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    # safetensors writes the file itself: it is hashed read back from the page cache it was just written to
    # (measured: cheaper than serializing to bytes first to hash them on the way)
    save_weights(weights, path)
    fsync(path)
    return {"bytes": path.stat().st_size, HASH: file_digest(path)}


def write_through(path: Path, write: Callable[[BinaryIO], Any]) -> dict[str, Any]:
    """Create `path` with `write(file)`, hashing the bytes on their way to the file and flushing it to disk."""
    with open(path, "wb") as file:
        hashing = HashingFile(file)
        try:
            write(hashing)
        except Exception:
            if hashing.error is not None:  # the disk's own error (ENOSPC, EFBIG), not torch's RuntimeError about it
                raise hashing.error from None
            raise
        file.flush()
        os.fsync(file.fileno())
    return {"bytes": path.stat().st_size, HASH: hashing.hash.hexdigest()}


class HashingFile:
    """A binary file that hashes what is written to it, so a checksum costs no second read. It keeps the first
    write error: torch.save turns it into a RuntimeError that no longer says what the disk said."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.hash = hashlib.new(HASH)
        self.error: OSError | None = None

    def write(self, data: bytes | memoryview) -> int:
        try:
            written = self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise
        self.hash.update(data)
        return written

    def flush(self) -> None:
        self.file.flush()


def install(tmp: Path, final: Path) -> None:
    """Rename the written folder `tmp` to `final`. The same step saved by an earlier attempt of this run is
    replaced; if that fails, the earlier one is put back."""
    if final.exists():
        stale = final.parent / staging_name(".old-", final.name)
        os.rename(final, stale)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(stale, final)
            raise
        fsync(final.parent)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(tmp, final)
        fsync(final.parent)


def staging_name(prefix: str, name: str) -> str:
    """A hidden folder name for writing `name`, unique to this writer: its host, its process and a random part,
    so that two writers never share one, and pruning can tell whether its writer may still be running."""
    return f"{prefix}{name}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}"


def write_error(directory: Path, final: Path, state: Checkpoint, error: Exception) -> CheckpointError:
    """The one line for a checkpoint that could not be written: why, what to do, and where to continue from."""
    try:
        kept = latest(directory)
    except OSError:
        kept = []
    then = f"continue from {kept[0].name}, which is intact, with --resume auto" if kept else "run again"
    number = error_number(error)
    reason = os.strerror(number) if number else one_line(error)
    start = f"could not write checkpoint {final.name} in {directory} ({reason})"
    if number in (errno.ENOSPC, errno.EDQUOT):
        megabytes = tensor_bytes([state.weights, state.train_weights, state.trainer_state]) / 1e6
        return CheckpointError(f"{start}: free space (a checkpoint takes about {megabytes:.0f} MB) and {then}")
    if number == errno.EFBIG:
        return CheckpointError(f"{start}: a limit on file size (ulimit -f, or the filesystem's own) refuses a file "
                               f"of this checkpoint; lift it and {then}")
    return CheckpointError(f"{start}; {then}")


def error_number(error: BaseException) -> int | None:
    """The OS error number behind `error`: an OSError's, or the one safetensors writes into its message."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    found = re.search(r"\(os error (\d+)\)", str(error))
    return int(found.group(1)) if found else None


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


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint folders under `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


# ------------------------------------------------------------------ reading
def verify(path: Path, files: Collection[str] | None = None) -> Marker:
    """Raise CheckpointError unless `path` is a complete checkpoint whose files (or those of them named in
    `files`: what a reader will read) match its marker: their sizes, and their checksums when the marker records
    them (the earlier format records sizes only). Returns the marker."""
    if not is_complete(path):
        raise CheckpointError(not_a_checkpoint(path))
    marker = read_marker(path)
    checked = [name for name in marker.sizes if files is None or name in files]
    for name in checked:  # every size first: cheap, and what a truncated copy shows
        size = marker.sizes[name]
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file} is truncated or corrupted ({file.stat().st_size} bytes, "
                                  f"{size} when saved)")
    for name in checked if marker.digests else ():
        if file_digest(path / name) != marker.digests[name]:
            raise CheckpointError(f"{path / name} is corrupted: its contents differ from those saved (the "
                                  f"{HASH} recorded in {MARKER} does not match)")
    return marker


def not_a_checkpoint(path: Path) -> str:
    """Why `path`, given as a checkpoint, is none: what it is instead, and what to give."""
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is a file, not a checkpoint folder (checkpoints/step-...)"
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
        return f"{path} is an empty folder, not a checkpoint"
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
        return (f"{path} is a run folder, not a checkpoint: continue it with --resume auto --output-dir {path}, or "
                f"give one of its checkpoints/{PREFIX}... folders")
    inside = [name for name in entries if name.startswith(PREFIX) and is_complete(path / name)]
    if inside:
        return f"{path} holds checkpoints, and is none: give one of them, e.g. {path / inside[-1]}"
    if any(name in FILES for name in entries):
        return f"{path} is incomplete (no {MARKER} marker): it was being written when its run stopped"
    return f"{path} is not a checkpoint folder (it holds no {MARKER} and none of {', '.join(REQUIRED)})"


def file_digest(path: Path) -> str:
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, HASH).hexdigest()
    except OSError as error:
        raise CheckpointError(f"{path} is unreadable ({error.strerror})") from None


def read_marker(path: Path) -> Marker:
    """The marker of the checkpoint folder `path`, checked field by field: a CheckpointError says what is wrong."""
    file = path / MARKER
    marker = read_json(file)
    if not isinstance(marker, dict):
        raise CheckpointError(f"{file} is corrupted: {json_kind(marker)} where an object belongs")
    if "format" not in marker:  # the earlier format: {name: bytes}
        check_names(file, marker)
        for name, size in marker.items():
            check_number(file, name, size, int, minimum=0)
        return Marker(sizes=dict(marker), digests=None)
    if marker["format"] != FORMAT:
        raise CheckpointError(f"{file} is of format {marker['format']!r}, which this version does not read "
                              f"(it reads {FORMAT} and the earlier size-only format)")
    unknown = sorted(set(marker) - {"format", "files", "weights_only"})
    if unknown:
        raise CheckpointError(f"{file} is corrupted: unknown key {unknown[0]!r}")
    weights_only = marker.get("weights_only", False)
    if not isinstance(weights_only, bool):
        raise CheckpointError(f"{file} is corrupted: weights_only is {json_kind(weights_only)}, not true or false")
    entries = marker.get("files")
    if not isinstance(entries, dict):
        raise CheckpointError(f"{file} is corrupted: files is {json_kind(entries)} where an object belongs")
    check_names(file, entries, FOR_USE if weights_only else REQUIRED)
    sizes, digests = {}, {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) != {"bytes", HASH}:
            raise CheckpointError(f"{file} is corrupted: the entry of {name} is not {{\"bytes\": ..., "
                                  f"\"{HASH}\": ...}}")
        sizes[name] = check_number(file, f"{name} bytes", entry["bytes"], int, minimum=0)
        digest = entry[HASH]
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise CheckpointError(f"{file} is corrupted: the {HASH} of {name} is {json_kind(digest)}, not 64 "
                                  f"hexadecimal digits")
        digests[name] = digest
    return Marker(sizes=sizes, digests=digests, weights_only=weights_only)


def check_names(file: Path, entries: dict[str, Any], required: tuple[str, ...] = REQUIRED) -> None:
    unknown = sorted(set(entries) - set(FILES))
    if unknown:  # a name such as ../../x must never become a path to read
        raise CheckpointError(f"{file} is corrupted: it lists {unknown[0]!r}, which is not a checkpoint file")
    missing = [name for name in required if name not in entries]
    if missing:
        raise CheckpointError(f"{file} is corrupted: it does not list {missing[0]}")


def load(path: Path) -> Checkpoint:
    """Read a verified checkpoint onto the CPU, to continue training from. Nothing is unpickled beyond tensors and
    plain values."""
    marker = verify(path)
    if marker.weights_only:
        raise CheckpointError(f"{path} keeps its weights only (for evaluate, predict and export), not the optimizer "
                              f"state that continuing the training needs: resume from the run's newest checkpoint")
    weights = load_weights(path / WEIGHTS)
    train_weights = load_weights(path / TRAIN_WEIGHTS) if TRAIN_WEIGHTS in marker.sizes else None
    try:
        trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, or a pickle the safe loader refuses
        reason = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path / TRAINER_STATE} is corrupted or unsafe and was not loaded ({reason})") \
            from None
    if not isinstance(trainer_state, dict):
        raise CheckpointError(f"{path / TRAINER_STATE} is corrupted: it holds a {type(trainer_state).__name__}, "
                              f"not a dict of states")
    progress, meta = read_state(path)
    return Checkpoint(weights=weights, train_weights=train_weights, trainer_state=trainer_state,
                      progress=progress, config=load_config(path), meta=meta, path=path)


def has_checksums(path: Path) -> bool:
    """Whether the checkpoint's marker records checksums (the earlier format records sizes only)."""
    return read_marker(path).digests is not None


def load_config(path: Path) -> dict[str, Any]:
    """The resolved training config saved with a checkpoint: a mapping of names to values."""
    file = path / CONFIG
    try:
        config = yaml.safe_load(file.read_text())
    except OSError as error:
        raise CheckpointError(f"{file} is missing or unreadable ({error.strerror})") from None
    except (yaml.YAMLError, ValueError) as error:  # ValueError: bytes that are not UTF-8
        reason = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{file} is corrupted: not YAML ({reason})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} is corrupted: a YAML {type(config).__name__} where a mapping of keys to "
                              f"values belongs")
    wrong = [key for key in config if not isinstance(key, str)]
    if wrong:
        raise CheckpointError(f"{file} is corrupted: the key {wrong[0]!r} is not a name")
    return config


def load_meta(path: Path) -> dict[str, Any]:
    """World size, device and precision of the run that saved a checkpoint (each only if recorded)."""
    return read_state(path)[1]


# `state.json`: each progress field is checked against its type in TrainProgress; a number is a count or a time
# (at least 0) but for these, -1 before the first evaluation. The metadata beside it:
PROGRESS_MINIMUM = {"best_accuracy": -1.0, "best_step": -1}
META_FIELDS: dict[str, type] = {"world_size": int, "device": str, "precision": str}


def read_state(path: Path) -> tuple[TrainProgress, dict[str, Any]]:
    """(progress, metadata) from a checkpoint's `state.json`, every field checked: a CheckpointError names the
    file and the field. A field a checkpoint does not hold (saved before it existed) has its default."""
    file = path / STATE
    state = read_json(file)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} is corrupted: {json_kind(state)} where an object belongs")
    saved = state.get("progress")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{file} is corrupted: progress is {json_kind(saved)} where an object belongs")
    known = {f.name: str(f.type) for f in fields(TrainProgress)}  # name: annotation ("int", "list[...]")
    unknown = sorted(set(saved) - set(known))
    if unknown:
        raise CheckpointError(f"{file} is corrupted: unknown progress field {unknown[0]!r}")
    values = {}
    for name, value in saved.items():
        kind = known[name]
        if kind in ("int", "float"):
            values[name] = check_number(file, f"progress.{name}", value, int if kind == "int" else float,
                                        PROGRESS_MINIMUM.get(name, 0))
        elif kind.startswith(("list", "dict")) and not isinstance(value, list if kind.startswith("list") else dict):
            wanted = "a list" if kind.startswith("list") else "an object"
            raise CheckpointError(f"{file} is corrupted: progress.{name} is {json_kind(value)} where {wanted} "
                                  f"belongs")
        else:
            values[name] = value
    if "history" in values:
        check_history(file, values["history"])
    progress = TrainProgress(**values)
    if progress.best_accuracy > 1 or -1 < progress.best_accuracy < 0:
        raise CheckpointError(f"{file} is corrupted: progress.best_accuracy is {progress.best_accuracy}, neither "
                              f"-1 (none yet) nor between 0 and 1")
    for name in ("best_step", "skipped_steps"):
        if getattr(progress, name) > progress.step:
            raise CheckpointError(f"{file} is corrupted: progress.{name} is {getattr(progress, name)}, past "
                                  f"progress.step {progress.step}")
    if re.fullmatch(rf"{PREFIX}\d{{8}}", path.name) and step_dir(path.parent, progress.step).name != path.name:
        raise CheckpointError(f"{file} is corrupted: progress.step is {progress.step}, and the folder is "
                              f"{path.name}")
    meta = {key: value for key, value in state.items() if key != "progress"}
    for key, kind in META_FIELDS.items():
        if key in meta and (not isinstance(meta[key], kind) or isinstance(meta[key], bool)):
            raise CheckpointError(f"{file} is corrupted: {key} is {json_kind(meta[key])}, not "
                                  f"{'a whole number' if kind is int else 'a string'}")
    if meta.get("world_size", 1) < 1:
        raise CheckpointError(f"{file} is corrupted: world_size is {meta['world_size']}, not at least 1")
    return progress, meta


def check_history(file: Path, history: list[Any]) -> None:
    """The evaluation records: objects, each with its epoch and eval accuracy (what a run's summary reads)."""
    for index, record in enumerate(history):
        if not isinstance(record, dict):
            raise CheckpointError(f"{file} is corrupted: progress.history[{index}] is {json_kind(record)} where "
                                  f"an object belongs")
        check_number(file, f"progress.history[{index}].epoch", record.get("epoch"), int, 0)
        check_number(file, f"progress.history[{index}].eval_accuracy", record.get("eval_accuracy"), float, 0.0)


def check_number(file: Path, name: str, value: Any, kind: type, minimum: float) -> Any:
    """`value` if it is a `kind` (an int where a float belongs is one) of at least `minimum`, finite; else a
    CheckpointError naming `file` and the field."""
    allowed = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, allowed):
        wanted = "a whole number" if kind is int else "a number"
        raise CheckpointError(f"{file} is corrupted: {name} is {json_kind(value)}, not {wanted}")
    if not math.isfinite(value) or value < minimum:
        raise CheckpointError(f"{file} is corrupted: {name} is {value}, not a finite value of at least {minimum:g}")
    return kind(value)


def read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except OSError as error:
        raise CheckpointError(f"{file} is missing or unreadable ({error.strerror})") from None
    except ValueError as error:  # not JSON, or bytes that are not UTF-8
        raise CheckpointError(f"{file} is corrupted: not JSON ({str(error).splitlines()[0]})") from None


def json_kind(value: Any) -> str:
    """How a JSON value is named in a message: 'a list', 'the string \"abc\"', 'null'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str):
        shown = value if len(value) <= 20 else value[:17] + "..."
        return f"the string {json.dumps(shown)}"
    if isinstance(value, int | float):
        return f"the number {value}"
    return {dict: "an object", list: "a list"}.get(type(value), f"a {type(value).__name__}")


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
        best_step = read_state(candidates[0])[0].best_step
    except CheckpointError:  # then the latest, whose own check will say what is wrong
        best_step = -1
    best = step_dir(path / "checkpoints", best_step)
    if best_step >= 0 and is_complete(best):
        return best, "best eval accuracy in the run"
    return candidates[0], "latest in the run"
