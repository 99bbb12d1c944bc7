"""Predict the digit in image files with a trained checkpoint.

    python -m toolkit.predict --checkpoint runs/x digit.png scans/ [--invert] [--top-k 3] [--json out.json]

IMAGE is a PNG, JPEG, BMP, GIF, TIFF or WebP file of any size, colour or grey, or a folder (its files, sorted;
not its subfolders). Each image is made into what MNIST's are, then goes through the training code's own
resize and normalisation (`toolkit.data.Preprocess`, with the checkpoint's image size). Files that cannot be
read are listed on stderr, one line each, and the exit code is 1; the others still get their answer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from PIL import Image, ImageOps, UnidentifiedImageError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolkit.config import build_parser, from_dict
from toolkit.data import SOURCE_SIZE, Preprocess
from toolkit.errors import UsageError, UserError, exit_on_user_error
from toolkit.evaluate import PRECISION_RULE, inference_accelerator, load_for_inference, on_device
from toolkit.files import write_atomic
from toolkit.model import NUM_CLASSES, AlexNet

PROG = "toolkit.predict"
# Decoders offered to files from anywhere: the common formats, not every one Pillow knows.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
# Settings a user may change; the image size and normalisation come from the checkpoint.
PREDICT_KEYS = ("device", "precision", "channels_last", "cpu_threads", "eval_batch_size")
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


def read_images(paths: list[Path], invert: bool) -> tuple[list[Path], torch.Tensor, list[tuple[Path, str]]]:
    """(files read, their images uint8 (N, 28, 28), [(path, why it could not be read)])."""
    files, errors = image_files(paths)
    good: list[Path] = []
    images: list[torch.Tensor] = []
    for path in files:
        try:
            images.append(read_image(path, invert))
            good.append(path)
        except ImageError as error:
            errors.append((path, str(error)))
    stacked = torch.stack(images) if images else torch.empty(0, SOURCE_SIZE, SOURCE_SIZE, dtype=torch.uint8)
    return good, stacked, errors


@torch.no_grad()
def predict(model: AlexNet, images: torch.Tensor, preprocess: Preprocess, accelerator: Accelerator,
            batch_size: int) -> torch.Tensor:
    """Softmax probabilities float32 (N, 10) on the CPU for uint8 images (N, 28, 28)."""
    model.eval()
    probabilities = []
    with accelerator.autocast():
        for start in range(0, len(images), batch_size):
            batch = preprocess(images[start:start + batch_size].to(accelerator.device))  # (B, 1, S, S)
            probabilities.append(model(batch).float().softmax(dim=1).cpu())  # (B, 10)
    return torch.cat(probabilities) if probabilities else torch.empty(0, NUM_CLASSES)


def answers(files: list[Path], probabilities: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
    """One record per file: the digit, its probability and the `top_k` most likely digits."""
    top = probabilities.topk(top_k, dim=1)
    return [{"file": str(path), "digit": int(digits[0]), "probability": float(values[0]),
             "top_k": [{"digit": int(d), "probability": float(p)} for d, p in zip(digits, values, strict=True)]}
            for path, values, digits in zip(files, top.values.tolist(), top.indices.tolist(), strict=True)]


def report(console: Console, records: list[dict[str, Any]], top_k: int) -> None:
    table = Table()
    table.add_column("file", overflow="fold")
    table.add_column("digit", justify="right")
    table.add_column("probability", justify="right")
    if top_k > 1:
        table.add_column(f"top {top_k}")
    for record in records:
        row = [escape(record["file"]), str(record["digit"]), f"{record['probability']:.2%}"]
        if top_k > 1:
            row.append(", ".join(f"{t['digit']} {t['probability']:.1%}" for t in record["top_k"]))
        table.add_row(*row)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    with exit_on_user_error(PROG):
        parser = build_parser("python -m toolkit.predict", __doc__.splitlines()[0], keys=PREDICT_KEYS)
        parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
        parser.add_argument("images", nargs="+", metavar="IMAGE", help="image file, or folder of image files")
        parser.add_argument("--invert", action="store_true", default=False,
                            help="the images are dark digits on a light background (scans): invert them")
        parser.add_argument("--top-k", type=int, default=1, help="also list the K most likely digits [default: 1]")
        parser.add_argument("--json", dest="json_path", help="also write the answers to this JSON file")
        parser.epilog = (f"{PRECISION_RULE} Exit code: 0 when every image was read, 1 when any could not be "
                         "(the others are still answered), 2 for bad usage.")
        args = vars(parser.parse_args(argv))
        paths, invert, top_k = [Path(p) for p in args.pop("images")], args.pop("invert"), args.pop("top_k")
        json_path = args.pop("json_path", None)
        if not 1 <= top_k <= NUM_CLASSES:
            raise UsageError(f"--top-k: must be between 1 and {NUM_CLASSES}, got {top_k}")
        model, config, meta, folder, reason = load_for_inference(Path(args.pop("checkpoint")))
        config = from_dict(args, source="command line", base=config)
        accelerator, device, precision = inference_accelerator(config, meta, "precision" in args)
        if accelerator.num_processes > 1:
            raise UsageError("predict runs as one process: use python -m toolkit.predict, not accelerate launch")
        console = Console(highlight=False, soft_wrap=True)  # a line stays one line in logs and pipes

        files, images, errors = read_images(paths, invert)
        model, preprocess = on_device(model, config, accelerator)
        records = answers(files, predict(model, images, preprocess, accelerator, config.eval_batch_size), top_k)

        console.print(f"checkpoint: {escape(str(folder))} ({reason})")
        console.print(f"device: {device}, precision: {precision}, images read: {len(files)}"
                      + (", inverted (black on white)" if invert else ""))
        if records:
            report(console, records, top_k)
        for path, error in errors:
            print(f"{PROG}: error: {path}: {error}", file=sys.stderr, flush=True)
        if json_path:
            write_atomic(Path(json_path), json.dumps({
                "checkpoint": str(folder), "chosen_because": reason, "device": device, "precision": precision,
                "invert": invert, "predictions": records,
                "errors": [{"file": str(path), "error": error} for path, error in errors]}, indent=1) + "\n")
        accelerator.end_training()
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
