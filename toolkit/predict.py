"""Predict the digit in image files with a trained checkpoint.

    python -m toolkit.predict --checkpoint runs/x digit.png scans/ [--top-k 3] [--json out.json]

IMAGE is a PNG, JPEG, BMP, GIF, TIFF or WebP file of any size, colour or grey, or a folder (its files, sorted;
its sub-folders are named, not read). Each image is made into what MNIST's are: a white digit on black (a dark
digit on light paper is inverted, told by the image's background, unless --invert or --no-invert says),
cropped to the ink, fitted in 20x20 and centred by its centre of mass in 28x28 as MNIST's digits were (unless
--no-center); then it goes through the training code's own resize and normalisation (`toolkit.data.Preprocess`,
with the checkpoint's image size): see `toolkit.inference.read_image`. The table and the JSON say what was done
to each image. Files that cannot be read are listed on stderr, one line each, and the exit code is 1; the
others still get their answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolkit import inference
from toolkit.agreement import end_process_group
from toolkit.config import build_parser
from toolkit.data import Preprocess
from toolkit.errors import UsageError, exit_on_user_error
from toolkit.files import Outputs
from toolkit.model import NUM_CLASSES, AlexNet

PROG = "toolkit.predict"
# Settings a user may change; the image size and normalisation come from the checkpoint.
PREDICT_KEYS = ("device", "precision", "channels_last", "cpu_threads", "eval_batch_size")


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


def answers(files: list[Path], prepared: list[inference.Prepared], probabilities: torch.Tensor,
            top_k: int) -> list[dict[str, Any]]:
    """One record per file: the digit, its probability, the `top_k` most likely digits, and how the image was
    prepared."""
    top = probabilities.topk(top_k, dim=1)
    return [{"file": str(path), "digit": int(digits[0]), "probability": float(values[0]),
             "top_k": [{"digit": int(d), "probability": float(p)} for d, p in zip(digits, values, strict=True)],
             "prepared": image.to_json()}
            for path, image, values, digits in zip(files, prepared, top.values.tolist(), top.indices.tolist(),
                                                   strict=True)]


def report(console: Console, records: list[dict[str, Any]], prepared: list[inference.Prepared], top_k: int) -> None:
    table = Table()
    table.add_column("file", overflow="fold")
    table.add_column("digit", justify="right")
    table.add_column("probability", justify="right")
    if top_k > 1:
        table.add_column(f"top {top_k}")
    table.add_column("prepared", overflow="fold")
    for record, image in zip(records, prepared, strict=True):
        row = [escape(record["file"]), str(record["digit"]), f"{record['probability']:.2%}"]
        if top_k > 1:
            row.append(", ".join(f"{t['digit']} {t['probability']:.1%}" for t in record["top_k"]))
        table.add_row(*row, escape(image.summary()))
    console.print(table)


def preparation(prepared: list[inference.Prepared], invert: bool | None, center: bool) -> str:
    """How the images were prepared, in a few words: how many were inverted and why, and the framing."""
    polarity = "auto" if invert is None else ("--invert" if invert else "--no-invert")
    inverted = sum(image.inverted for image in prepared)
    return (f"inverted: {inverted} ({polarity}), "
            f"{'framed as MNIST' if center else 'not framed as MNIST (--no-center)'}")


def main(argv: list[str] | None = None) -> int:
    with exit_on_user_error(PROG), Outputs() as outputs, contextlib.ExitStack() as finish:
        parser = build_parser("python -m toolkit.predict", __doc__.splitlines()[0], keys=PREDICT_KEYS)
        parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
        parser.add_argument("images", nargs="+", metavar="IMAGE", help="image file, or folder of image files")
        parser.add_argument("--invert", action=argparse.BooleanOptionalAction, default=None,
                            help="--invert: the digits are dark on a light background (scans, photos of paper), "
                                 "invert every image; --no-invert: they are light on dark, as MNIST's [default: "
                                 "each image by its background: inverted when the background is nearer its "
                                 "brightest pixels than its darkest]")
        parser.add_argument("--center", action=argparse.BooleanOptionalAction, default=True,
                            help="frame each digit as MNIST's were: cropped to the ink, fitted in 20x20 and placed "
                                 "in 28x28 by its centre of mass; --no-center only fits the whole image into 28x28 "
                                 "[default: on; an image already framed so is left as it is]")
        parser.add_argument("--top-k", type=int, default=1, help="also list the K most likely digits [default: 1]")
        parser.add_argument("--json", dest="json_path", help="also write the answers to this JSON file")
        parser.epilog = (f"{inference.PRECISION_RULE} Exit code: 0 when every image was read, 1 when any could "
                         "not be (the others are still answered), 2 for bad usage.")
        args = vars(parser.parse_args(argv))
        paths, invert, center = [Path(p) for p in args.pop("images")], args.pop("invert"), args.pop("center")
        top_k = args.pop("top_k")
        checkpoint_path, json_raw = args.pop("checkpoint"), args.pop("json_path", None)
        if not 1 <= top_k <= NUM_CLASSES:
            raise UsageError(f"--top-k: must be between 1 and {NUM_CLASSES}, got {top_k}")
        json_path = outputs.file(json_raw, "--json") if json_raw is not None else None
        loaded = inference.load(Path(checkpoint_path), args)
        files, errors, skipped = inference.image_files(paths)
        inference.refuse_overwriting(outputs, loaded, files)
        outputs.make_ready()
        run = inference.runtime(loaded.config, loaded.meta, args.get("precision"))
        finish.callback(end_process_group, run.accelerator)  # also on failure: the process group ends cleanly
        if run.accelerator.num_processes > 1:
            raise UsageError("predict runs as one process: use python -m toolkit.predict, not accelerate launch")
        console = Console(highlight=False, soft_wrap=True)  # a line stays one line in logs and pipes

        files, prepared, unreadable = inference.read_images(files, invert, center)
        errors += unreadable
        model, preprocess = inference.on_device(loaded.model, loaded.config, run.accelerator)
        records = answers(files, prepared, predict(model, inference.batch(prepared), preprocess, run.accelerator,
                                                   loaded.config.eval_batch_size), top_k)

        console.print(f"checkpoint: {escape(str(loaded.folder))} ({loaded.reason})")
        console.print(f"device: {run.device}, precision: {run.precision}, images read: {len(files)}, "
                      f"{preparation(prepared, invert, center)}")
        for note in run.notes:
            console.print(f"note: {escape(note)}")
        if records:
            report(console, records, prepared, top_k)
        for path, why in skipped:
            console.print(f"note: {escape(str(path))}: {escape(why)}")
        for path, error in errors:
            print(f"{PROG}: error: {path}: {error}", file=sys.stderr, flush=True)
        if json_path:
            outputs.write({json_path: json.dumps({
                "checkpoint": str(loaded.folder), "chosen_because": loaded.reason, "device": run.device,
                "precision": run.precision, "invert": invert, "center": center, "predictions": records,
                "errors": [{"file": str(path), "error": error} for path, error in errors],
                "skipped": [{"path": str(path), "why": why} for path, why in skipped]}, indent=1) + "\n"})
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
