"""Using a trained model: load a checkpoint for use, choose where and in what precision it runs, prepare any
image as MNIST's are, and the serving model (the training preprocessing, then the network). `toolkit.evaluate`,
`toolkit.predict` and `toolkit.export` are thin commands over this module.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
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


def runtime(config: TrainConfig, meta: dict[str, Any], precision_flag: str | None) -> Any:
    """Where a trained model runs (`assemble.Runtime`, built as training builds its own), in the precision
    `choose_precision` picks; its `notes` say what was chosen otherwise than asked (the precision, the threads)."""
    from toolkit import assemble

    device = devices.resolve(config.device)
    precision, note = choose_precision(device, precision_flag, meta.get("precision"))
    return assemble.runtime(replace(config, compile=False), precision=(precision, "chosen for inference"), note=note)


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
# MNIST's own framing (LeCun et al.): each digit fitted in a 20x20 box keeping its aspect ratio, then placed in
# 28x28 so that its centre of mass is at the centre. Measured on all 70,000 MNIST images: the ink's box is 20
# pixels on its longer side (19 for 16 of them), and the centre of mass (0-based pixel coordinates) lies
# within 13.48-14.5 on both axes.
MNIST_BOX = 20
MNIST_CENTRE = 14.0
MNIST_CENTRE_TOLERANCE = 0.6  # px: placing by whole pixels leaves the centre of mass up to 0.5 px off (MNIST: 0.52)
EDGE_SHARE = 0.005  # the darkest and the brightest 0.5% of the pixels: the ink's level and the paper's extremes
IMAGE_PREPARATION = (
    "EXIF rotation applied; an animated or multi-page image read at its first frame (said so); transparent areas "
    "flattened onto white when the visible pixels are dark, else black; converted to grey (Pillow's ITU-R 601 "
    "luma; 16-bit grey scaled to 8 bits). Polarity (--invert / --no-invert force it): 255 - pixel when the "
    "background (the median of the border pixels) is nearer the brightest pixels than the darkest, so the digit "
    "is white on black. Framing as MNIST's (--no-center: only fitted into 28x28 keeping its aspect ratio and "
    "centred on black): an image already framed so (28x28, its non-zero pixels within 20x20 and centred by mass) "
    "is left as it is; else the paper is levelled to black and the ink to white, the image is cropped to the ink "
    "(the pixels nearer the ink's level than the background's, isolated specks ignored), fitted in 20x20 keeping "
    "its aspect ratio (bilinear, antialiased) and placed in 28x28 with its centre of mass at the centre. Then as "
    "the training images: /255, standardised with MNIST's mean and std if the checkpoint was trained so, "
    "bilinear resize to its image size")


class ImageError(UserError):
    pass


@dataclass(frozen=True)
class Prepared:
    """One image made into what MNIST's are, and what was done to it."""

    image: torch.Tensor  # uint8 (28, 28), a white digit on black
    inverted: bool
    polarity: str  # why it was inverted, or not
    framing: str  # what was done to place the digit in 28x28
    box: tuple[int, int, int, int] | None = None  # the ink cropped to, in the image read: left, top, right, bottom
    scale: float | None = None  # 28x28 pixels per pixel of the image read, when cropped to the ink
    note: str = ""  # anything else the user should know (only the first frame of an animation read)

    def to_json(self) -> dict[str, Any]:
        return {"inverted": self.inverted, "polarity": self.polarity, "framing": self.framing,
                "box": list(self.box) if self.box else None, "scale": self.scale, "note": self.note or None}

    def summary(self) -> str:
        """A few words for the table: inverted or not, how it was framed, the note."""
        if self.box:
            width, height = self.box[2] - self.box[0], self.box[3] - self.box[1]
            framed = f"ink {width}x{height} px x{self.scale:.2g}"
        else:
            framed = self.framing.split(":")[0]
        return ", ".join(part for part in ("inverted" if self.inverted else "", framed, self.note) if part)


def image_files(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(the files to read, in order, [(path, why it cannot be read)], [(folder, why it was not read)]): a folder
    gives its files, sorted; its sub-folders are named, not read (a folder of folders is seldom one of digits)."""
    files: list[Path] = []
    errors: list[tuple[Path, str]] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(path.iterdir())
            if all(entry.is_dir() for entry in inside):
                errors.append((path, "folder holds no files"))
            for entry in inside:
                if entry.is_dir():
                    skipped.append((entry, f"a folder inside {path}: not read (give it as an IMAGE to read it)"))
                elif entry.is_file():
                    files.append(entry)
                else:
                    errors.append((entry, not_a_file(entry)))
        elif path.is_file():
            files.append(path)
        else:
            errors.append((path, not_a_file(path)))
    return files, errors, skipped


def not_a_file(path: Path) -> str:
    """Why `path`, neither a folder nor a regular file, is not read: missing, a dangling link, or what it is."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a link to a missing file" if path.is_symlink() else "no such file or folder"
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "not a file nor a folder")
    return f"{kind}, not a regular file: not read"


def decode(path: Path, invert: bool | None) -> tuple[Image.Image, str]:
    """(the image at `path` in grey, mode "L", a note): EXIF rotation applied, transparency flattened onto the
    paper's colour (white when `invert`, black when not, else whichever the visible pixels contrast with).
    An animation or a multi-page file gives its first frame, with a note saying so. Raises ImageError."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as opened:
            opened.load()  # decode now: a truncated file fails here, not halfway through a conversion
            frames = getattr(opened, "n_frames", 1)
            note = f"only frame 1 of {frames} read" if frames > 1 else ""  # an animation, a multi-page TIFF
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
                # convert("L") would drop alpha and keep whatever colour hides under it (often black)
                rgba = image.convert("RGBA")
                paper = (255 if invert else 0) if invert is not None else _paper_behind(rgba)
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (paper,) * 3 + (255,)), rgba)
            elif image.mode.startswith("I"):
                # 16-bit grey: convert("L") would clip everything above 255 to white
                image = image.convert("I").point(lambda value: value / 257)
            return image.convert("L"), note
    except UnidentifiedImageError:
        raise ImageError(f"not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"refused: {error}") from None
    except Exception as error:  # Pillow reports broken files as OSError, SyntaxError, ValueError, struct.error...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ImageError(f"corrupted or unreadable image ({reason})") from None


def _paper_behind(rgba: Image.Image) -> int:
    """White when the visible pixels of `rgba` are mostly dark (strokes drawn on a transparent page), else black."""
    visible = as_tensor(rgba.convert("L"))[as_tensor(rgba.getchannel("A")) >= 128]
    return 255 if len(visible) and int((visible < 128).sum()) * 2 > len(visible) else 0


def as_tensor(grey: Image.Image) -> torch.Tensor:
    """A mode "L" image as uint8 (H, W)."""
    return torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(grey.height, grey.width)


def percentile(histogram: torch.Tensor, share: float) -> int:
    """The grey level below which `share` of the pixels counted in `histogram` (256 bins) lie."""
    cumulative = histogram.cumsum(0)
    return int(torch.searchsorted(cumulative, share * cumulative[-1]).clamp(max=255))


def border(grey: torch.Tensor) -> torch.Tensor:
    """The outermost ring of pixels of uint8 (H, W), flattened: mostly paper, whatever the digit."""
    return torch.cat([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]])


def polarity(grey: torch.Tensor, invert: bool | None) -> tuple[bool, str]:
    """(invert, why): `invert` when given; else invert when the background (the border's median) is nearer the
    brightest pixels than the darkest: then the digit is the dark part."""
    if invert is not None:
        return invert, "--invert" if invert else "--no-invert"
    histogram = torch.bincount(grey.flatten().int(), minlength=256)
    dark, light = percentile(histogram, EDGE_SHARE), percentile(histogram, 1 - EDGE_SHARE)
    background = int(border(grey).median())
    if light - dark < 2:
        return False, f"auto: one grey level ({background}), nothing to tell the digit by: not inverted"
    if background - dark > light - background:
        return True, f"auto: background {background} nearer the light end ({light}) than the dark ({dark})"
    return False, f"auto: background {background} nearer the dark end ({dark}) than the light ({light})"


def mnist_framed(grey: torch.Tensor) -> bool:
    """Whether white-on-black uint8 (H, W) is already framed as MNIST's are: 28x28, its non-zero pixels within
    a 20x20 box, its centre of mass within MNIST_CENTRE_TOLERANCE of MNIST_CENTRE (all 70,000 MNIST images are)."""
    if grey.shape != (SOURCE_SIZE, SOURCE_SIZE) or not grey.any():
        return False
    rows, columns = grey.any(1).nonzero(), grey.any(0).nonzero()
    if max(int(rows[-1] - rows[0]), int(columns[-1] - columns[0])) + 1 > MNIST_BOX:
        return False
    return all(abs(centre - MNIST_CENTRE) <= MNIST_CENTRE_TOLERANCE for centre in centre_of_mass(grey.float()))


def centre_of_mass(image: torch.Tensor) -> tuple[float, float]:
    """(row, column) of float (H, W)'s centre of mass, in 0-based pixel coordinates."""
    mass = image.sum()
    rows, columns = torch.arange(image.shape[0]), torch.arange(image.shape[1])
    return float((image.sum(1) * rows).sum() / mass), float((image.sum(0) * columns).sum() / mass)


def levelled(grey: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float (H, W) with the paper at 0 and the ink at 255, bool (H, W): the ink) for a white-on-black uint8
    image. The paper's level: the border's median; the ink's: the brightest 0.5%. Ink: pixels nearer the ink's
    level than the paper's, less isolated specks. Made 0: up to the border's 99th percentile (its noise), at
    most a quarter of the way to the ink; made 255: from the ink pixels' median up (MNIST's strokes are solid)."""
    histogram = torch.bincount(grey.flatten().int(), minlength=256)
    paper = border(grey).float()
    background, ink_level = float(paper.median()), float(percentile(histogram, 1 - EDGE_SHARE))
    threshold = (background + ink_level) / 2
    ink = grey > threshold
    neighbours = F.avg_pool2d(ink[None, None].float(), 3, stride=1, padding=1, count_include_pad=False)[0, 0] * 9
    ink &= neighbours >= 3  # itself and at least 2 of its 8 neighbours: a speck of noise or dust is not the digit
    if not ink.any():
        return grey.float(), ink
    floor = min(float(paper.quantile(0.99)), (background + threshold) / 2)
    ceiling = max(float(grey[ink].float().median()), floor + 1)
    return ((grey.float() - floor) * (255 / (ceiling - floor))).clamp(0, 255), ink


def frame(grey: torch.Tensor) -> tuple[torch.Tensor, str, tuple[int, int, int, int] | None, float | None]:
    """(uint8 (28, 28), what was done, the ink's box, the scale): white-on-black uint8 (H, W) framed as MNIST's."""
    if mnist_framed(grey):
        return grey, "already framed as MNIST's: left as it is", None, None
    image, ink = levelled(grey)
    if not ink.any():
        return fit(grey), "no ink found: fitted into 28x28", None, None
    rows, columns = ink.any(1).nonzero(), ink.any(0).nonzero()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1
    scale = MNIST_BOX / max(bottom - top, right - left)
    size = [max(1, round((bottom - top) * scale)), max(1, round((right - left) * scale))]
    digit = F.interpolate(image[None, None, top:bottom, left:right], size=size, mode="bilinear",
                          align_corners=False, antialias=True)[0, 0].round().clamp(0, 255)  # (h, w), h or w = 20
    row, column = centre_of_mass(digit) if digit.any() else ((size[0] - 1) / 2, (size[1] - 1) / 2)
    y = min(max(round(MNIST_CENTRE - row), 0), SOURCE_SIZE - size[0])  # kept whole inside 28x28
    x = min(max(round(MNIST_CENTRE - column), 0), SOURCE_SIZE - size[1])
    framed = torch.zeros(SOURCE_SIZE, SOURCE_SIZE, dtype=torch.uint8)
    framed[y:y + size[0], x:x + size[1]] = digit.to(torch.uint8)
    return framed, "levelled, cropped to the ink, fitted in 20x20, centred by mass", (left, top, right, bottom), \
        round(scale, 4)


def fit(grey: torch.Tensor) -> torch.Tensor:
    """uint8 (H, W) fitted into 28x28 keeping its aspect ratio (Pillow bilinear, which averages when shrinking),
    centred on black; a 28x28 image as it is."""
    if grey.shape == (SOURCE_SIZE, SOURCE_SIZE):
        return grey
    fitted = ImageOps.pad(Image.fromarray(grey.numpy()), (SOURCE_SIZE, SOURCE_SIZE), method=Image.Resampling.BILINEAR,
                          color=0)
    return as_tensor(fitted)


def read_image(path: Path, invert: bool | None = None, center: bool = True) -> Prepared:
    """The image at `path` as MNIST's are, uint8 (28, 28) white digit on black, and what was done to it.
    `invert`: True or False forces it, None decides (`polarity`); `center`: frame it as MNIST's (`frame`), else
    only fit it into 28x28. Raises ImageError."""
    grey, note = decode(path, invert)
    image = as_tensor(grey)
    inverted, why = polarity(image, invert)
    if inverted:
        image = 255 - image
    if center:
        image, framing, box, scale = frame(image)
    else:
        image, framing, box, scale = fit(image), "--no-center: fitted into 28x28", None, None
    return Prepared(image=image, inverted=inverted, polarity=why, framing=framing, box=box, scale=scale, note=note)


def read_images(files: list[Path], invert: bool | None, center: bool
                ) -> tuple[list[Path], list[Prepared], list[tuple[Path, str]]]:
    """(files read, each one prepared, [(path, why it could not be read)])."""
    good: list[Path] = []
    prepared: list[Prepared] = []
    errors: list[tuple[Path, str]] = []
    for path in files:
        try:
            prepared.append(read_image(path, invert, center))
            good.append(path)
        except ImageError as error:
            errors.append((path, str(error)))
    return good, prepared, errors


def batch(prepared: list[Prepared]) -> torch.Tensor:
    """The prepared images as uint8 (N, 28, 28)."""
    if not prepared:
        return torch.empty(0, SOURCE_SIZE, SOURCE_SIZE, dtype=torch.uint8)
    return torch.stack([p.image for p in prepared])


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
