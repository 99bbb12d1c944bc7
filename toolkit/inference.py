"""Using a trained model: load a checkpoint for use, choose where and in what precision it runs, prepare any
image as MNIST's are, and the serving model (the training preprocessing, then the network). `toolkit.evaluate`,
`toolkit.predict` and `toolkit.export` are thin commands over this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from toolkit import checkpoint, devices
from toolkit.config import TrainConfig, from_dict
from toolkit.data import MNIST_FILES, SOURCE_SIZE, Preprocess, resolve_data_dir
from toolkit.errors import UsageError, UserError
from toolkit.files import Outputs
from toolkit.model import AlexNet, build_model

PRECISION_RULE = ("Precision: --precision if given, refused when this device cannot run it (as training refuses "
                  "it); else the checkpoint's training precision, or auto when this device cannot run that (said so).")


# --- a checkpoint, loaded for use ---

@dataclass(frozen=True)
class Loaded:
    model: AlexNet  # on the CPU, in eval mode, as saved (fp32)
    config: TrainConfig  # the checkpoint's training config, overridden by the flags given
    meta: dict[str, Any]  # world size, device and precision of the run that saved it
    folder: Path  # the checkpoint folder used
    reason: str  # why that folder: "checkpoint given", "best eval accuracy in the run", "latest in the run"


def load(path: Path, flags: dict[str, Any] | None = None) -> Loaded:
    """The checkpoint at `path` (a checkpoint folder, or a run folder: its best checkpoint, else its latest),
    verified against its marker, with finite weights, its config overridden by `flags` (config keys).
    Raises CheckpointError (exit 1) for a checkpoint that cannot be used, UsageError for a bad flag value."""
    folder, reason = checkpoint.for_inference(Path(path))
    checkpoint.verify(folder, files=(checkpoint.WEIGHTS, checkpoint.CONFIG, checkpoint.STATE))  # what this reads
    try:
        config = from_dict(checkpoint.load_config(folder), source=str(folder / checkpoint.CONFIG))
    except UsageError as error:
        raise checkpoint.CheckpointError(f"{folder} was saved with a config this version cannot use: {error}") \
            from None
    weights_file = folder / checkpoint.WEIGHTS
    weights = checkpoint.load_weights(weights_file)
    check_finite(weights, weights_file)
    model = build_model(init="default", dropout=config.dropout)
    checkpoint.load_weights_into(model, weights, weights_file)
    config = from_dict(flags or {}, source="command line", base=config)
    return Loaded(model=model.eval(), config=config, meta=checkpoint.load_meta(folder), folder=folder, reason=reason)


def check_finite(weights: dict[str, torch.Tensor], source: Path) -> None:
    """A CheckpointError naming `source` and how many values are NaN or infinite, if any are: such a model
    answers NaN, and its argmax is a meaningless 0."""
    bad = {name: int((~tensor.isfinite()).sum()) for name, tensor in weights.items() if tensor.is_floating_point()}
    bad = {name: count for name, count in bad.items() if count}
    if bad:
        names = ", ".join(list(bad)[:3]) + (", ..." if len(bad) > 3 else "")
        raise checkpoint.CheckpointError(
            f"{source} holds {sum(bad.values()):,} values that are not finite (NaN or infinite), in "
            f"{len(bad)} of its {len(weights)} tensors ({names}): this model cannot be used; use an earlier "
            f"checkpoint of the run")


# --- where it runs, and in what precision ---

@dataclass(frozen=True)
class Runtime:
    accelerator: Accelerator
    device: str
    precision: str
    note: str  # when the checkpoint's precision does not run here: why, and what is used instead; else ""


def choose_precision(device: str, flag: str | None, saved: str | None) -> tuple[str, str]:
    """(precision, note). A precision the user asks for (`flag`) goes through `devices.resolve_precision` as in
    training: one it cannot run is a UsageError. Without one, the checkpoint's training precision (`saved`),
    or auto when this device cannot run it, with a note saying so."""
    if flag is not None:
        return devices.resolve_precision(device, flag)[0], ""
    saved = saved or "auto"
    problem = devices.precision_problem(device, saved) if saved != "auto" else ""
    if not problem:
        return devices.resolve_precision(device, saved)[0], ""
    precision = devices.resolve_precision(device, "auto")[0]
    return precision, (f"the checkpoint was trained in {saved}, which {device} cannot run here ({problem}): "
                       f"using auto, {precision}")


def runtime(config: TrainConfig, meta: dict[str, Any], precision_flag: str | None) -> Runtime:
    """The accelerator for using a trained model on `config.device`, in the precision `choose_precision` picks."""
    device = devices.resolve(config.device)
    precision, note = choose_precision(device, precision_flag, meta.get("precision"))
    accelerator = devices.build_accelerator(device, precision, config.dist_timeout_s)
    devices.configure(device, config.deterministic, config.cpu_threads, accelerator.num_processes, tf32=config.tf32)
    return Runtime(accelerator=accelerator, device=device, precision=precision, note=note)


def on_device(model: AlexNet, config: TrainConfig, accelerator: Accelerator) -> tuple[AlexNet, Preprocess]:
    """The model on the accelerator in the memory format training uses there, and the training preprocessing
    (without augmentation) that feeds it."""
    channels_last = devices.use_channels_last(accelerator.device.type, config.channels_last)
    model = model.to(accelerator.device, memory_format=torch.channels_last if channels_last else
                     torch.preserve_format)
    return model, Preprocess(config.image_size, config.normalize, channels_last=channels_last)


class ServingModel(nn.Module):
    """uint8 images (N, 28, 28) -> logits (N, 10): the training preprocessing, then the network."""

    def __init__(self, model: AlexNet, preprocess: Preprocess) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(images))  # (N, 28, 28) -> (N, 1, S, S) -> (N, 10)


# --- any image, made into what MNIST's are ---

# Decoders offered to files from anywhere: the common formats, not every one Pillow knows.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
IMAGE_PREPARATION = (
    "EXIF rotation applied; transparent areas flattened onto the background (black, or white with --invert); "
    "converted to grey (Pillow's ITU-R 601 luma; 16-bit grey scaled to 8 bits); with --invert, 255 - pixel "
    "(for black-on-white scans); if not 28x28, fitted into 28x28 keeping its aspect ratio (Pillow bilinear, "
    "which averages when shrinking) and centred on black; then as the training images: /255, standardised "
    "with MNIST's mean and std if the checkpoint was trained so, bilinear resize to its image size")


class ImageError(UserError):
    pass


def image_files(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(the files to read, in order, [(path, why it was skipped)]): folders give their files, sorted."""
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file())
            if not inside:
                skipped.append((path, "folder holds no files"))
            files.extend(inside)
        elif path.is_file():
            files.append(path)
        else:
            skipped.append((path, "no such file or folder"))
    return files, skipped


def read_image(path: Path, invert: bool = False) -> torch.Tensor:
    """The image at `path` as MNIST's are: uint8 (28, 28), white digit on black. Raises ImageError."""
    background = 255 if invert else 0  # the paper's colour before inversion, black after it
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as opened:
            opened.load()  # decode now: a truncated file fails here, not halfway through a conversion
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
                # convert("L") would drop alpha and keep whatever colour hides under it (often black)
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (background,) * 3 + (255,)), rgba)
            elif image.mode.startswith("I"):
                # 16-bit grey: convert("L") would clip everything above 255 to white
                image = image.convert("I").point(lambda value: value / 257)
            grey = image.convert("L")
    except UnidentifiedImageError:
        raise ImageError(f"not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"refused: {error}") from None
    except Exception as error:  # Pillow reports broken files as OSError, SyntaxError, ValueError, struct.error...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ImageError(f"corrupted or unreadable image ({reason})") from None
    if invert:
        grey = ImageOps.invert(grey)
    if grey.size != (SOURCE_SIZE, SOURCE_SIZE):
        grey = ImageOps.pad(grey, (SOURCE_SIZE, SOURCE_SIZE), method=Image.Resampling.BILINEAR, color=0)
    return torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(SOURCE_SIZE, SOURCE_SIZE)


def read_images(files: list[Path], invert: bool) -> tuple[list[Path], torch.Tensor, list[tuple[Path, str]]]:
    """(files read, their images uint8 (N, 28, 28), [(path, why it could not be read)])."""
    good: list[Path] = []
    images: list[torch.Tensor] = []
    errors: list[tuple[Path, str]] = []
    for path in files:
        try:
            images.append(read_image(path, invert))
            good.append(path)
        except ImageError as error:
            errors.append((path, str(error)))
    stacked = torch.stack(images) if images else torch.empty(0, SOURCE_SIZE, SOURCE_SIZE, dtype=torch.uint8)
    return good, stacked, errors


# --- what a command writes must not be what it uses ---

def mnist_files(data_dir: str) -> list[Path]:
    """The four MNIST files under `data_dir` (as `--data-dir` resolves), which evaluation reads."""
    raw = resolve_data_dir(data_dir) / "MNIST" / "raw"
    return [raw / name for name in MNIST_FILES]


def refuse_overwriting(outputs: Outputs, loaded: Loaded, inputs: Iterable[Path] = ()) -> None:
    """A UsageError when a file the command is to write is one it reads (a file of the checkpoint used, or one of
    `inputs`), or lies inside a checkpoint folder or a run's checkpoints/ folder: that folder holds exactly what
    training saved, and a run prunes and replaces what is in it."""
    read = {p.resolve() for p in [*loaded.folder.iterdir(), *inputs]}
    used_folder = loaded.folder.resolve()
    checkpoints_folder = used_folder.parent if used_folder.parent.name == "checkpoints" else None
    for path, flag in outputs.targets.items():
        resolved = path.resolve()
        if resolved in read:
            raise UsageError(f"{flag} {path} is a file this command reads: it would be overwritten; "
                             f"give another path")
        for folder in resolved.parents:
            if folder == used_folder or checkpoint.is_complete(folder) or (folder / checkpoint.WEIGHTS).is_file():
                raise UsageError(f"{flag} {path} lies inside the checkpoint folder {folder}, which holds only what "
                                 f"training saved: give a path outside it")
            if folder == checkpoints_folder or checkpoint.complete_checkpoints(folder):
                raise UsageError(f"{flag} {path} lies inside {folder}, a run's checkpoints folder, whose "
                                 f"checkpoints training replaces and prunes: give a path outside it")
