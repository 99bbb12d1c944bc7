"""Predict the digit in image files with a trained checkpoint.

    python -m toolkit.predict --checkpoint runs/x digit.png scans/ [--invert] [--top-k 3] [--json out.json]

IMAGE is a PNG, JPEG, BMP, GIF, TIFF or WebP file of any size, colour or grey, or a folder (its files, sorted;
not its subfolders). Each image is made into what MNIST's are, then goes through the training code's own
resize and normalisation (`toolkit.data.Preprocess`, with the checkpoint's image size): see
`toolkit.inference.read_image`. Files that cannot be read are listed on stderr, one line each, and the exit
code is 1; the others still get their answer.
"""

from __future__ import annotations

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
    with exit_on_user_error(PROG), Outputs() as outputs, contextlib.ExitStack() as finish:
        parser = build_parser("python -m toolkit.predict", __doc__.splitlines()[0], keys=PREDICT_KEYS)
        parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
        parser.add_argument("images", nargs="+", metavar="IMAGE", help="image file, or folder of image files")
        parser.add_argument("--invert", action="store_true", default=False,
                            help="the images are dark digits on a light background (scans): invert them")
        parser.add_argument("--top-k", type=int, default=1, help="also list the K most likely digits [default: 1]")
        parser.add_argument("--json", dest="json_path", help="also write the answers to this JSON file")
        parser.epilog = (f"{inference.PRECISION_RULE} Exit code: 0 when every image was read, 1 when any could "
                         "not be (the others are still answered), 2 for bad usage.")
        args = vars(parser.parse_args(argv))
        paths, invert, top_k = [Path(p) for p in args.pop("images")], args.pop("invert"), args.pop("top_k")
        checkpoint_path, json_raw = args.pop("checkpoint"), args.pop("json_path", None)
        if not 1 <= top_k <= NUM_CLASSES:
            raise UsageError(f"--top-k: must be between 1 and {NUM_CLASSES}, got {top_k}")
        json_path = outputs.file(json_raw, "--json") if json_raw is not None else None
        loaded = inference.load(Path(checkpoint_path), args)
        files, errors = inference.image_files(paths)
        inference.refuse_overwriting(outputs, loaded, files)
        outputs.make_ready()
        run = inference.runtime(loaded.config, loaded.meta, args.get("precision"))
        finish.callback(run.accelerator.end_training)  # also on failure: the process group ends cleanly
        if run.accelerator.num_processes > 1:
            raise UsageError("predict runs as one process: use python -m toolkit.predict, not accelerate launch")
        console = Console(highlight=False, soft_wrap=True)  # a line stays one line in logs and pipes

        files, images, unreadable = inference.read_images(files, invert)
        errors += unreadable
        model, preprocess = inference.on_device(loaded.model, loaded.config, run.accelerator)
        records = answers(files, predict(model, images, preprocess, run.accelerator,
                                         loaded.config.eval_batch_size), top_k)

        console.print(f"checkpoint: {escape(str(loaded.folder))} ({loaded.reason})")
        console.print(f"device: {run.device}, precision: {run.precision}, images read: {len(files)}"
                      + (", inverted (black on white)" if invert else ""))
        if run.note:
            console.print(f"note: {escape(run.note)}")
        if records:
            report(console, records, top_k)
        for path, error in errors:
            print(f"{PROG}: error: {path}: {error}", file=sys.stderr, flush=True)
        if json_path:
            outputs.write({json_path: json.dumps({
                "checkpoint": str(loaded.folder), "chosen_because": loaded.reason, "device": run.device,
                "precision": run.precision, "invert": invert, "predictions": records,
                "errors": [{"file": str(path), "error": error} for path, error in errors]}, indent=1) + "\n"})
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
