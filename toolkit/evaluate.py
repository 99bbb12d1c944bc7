"""Evaluate a checkpoint on the MNIST test set: accuracy, mean loss, per-class accuracy, confusion matrix.

    python -m toolkit.evaluate --checkpoint runs/x [--eval-samples 1000] [--json out.json] [--plots DIR]
    accelerate launch --config_file launch/cpu_ddp.yaml -m toolkit.evaluate --checkpoint runs/x

PATH is a checkpoint folder, or a run folder (then its best checkpoint by eval accuracy, else its latest).
Images are prepared exactly as in training (the checkpoint's image size and normalisation). With several
processes the sums are gathered exactly: the same count of correct answers as one process. `--plots DIR`
writes the pictures training logs to TensorBoard: DIR/confusion.png and DIR/misclassified.png.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolkit import inference, plots
from toolkit.agreement import end_process_group, main_first
from toolkit.config import build_parser
from toolkit.data import EvalBatches, first, load_mnist, resolve_data_dir
from toolkit.errors import exit_on_user_error
from toolkit.files import Outputs
from toolkit.metrics import EvalResult, evaluate
from toolkit.model import NUM_CLASSES

# Settings a user may change when using a trained model; the rest (image size, normalisation) come from it.
INFERENCE_KEYS = ("device", "precision", "channels_last", "cpu_threads", "data_dir", "download", "eval_samples",
                  "eval_batch_size")
PLOT_FILES = {"eval/confusion": "confusion.png", "eval/misclassified": "misclassified.png"}  # tag: file in DIR


def main(argv: list[str] | None = None) -> int:
    with exit_on_user_error("toolkit.evaluate"), Outputs() as outputs, contextlib.ExitStack() as finish:
        parser = build_parser("python -m toolkit.evaluate", __doc__.splitlines()[0], keys=INFERENCE_KEYS)
        parser.epilog = (f"{inference.PRECISION_RULE} Output files are checked before the evaluation; missing "
                         f"folders are created (and removed again if the command fails).")
        parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
        parser.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
        parser.add_argument("--plots", dest="plots_dir", metavar="DIR",
                            help=f"also write the confusion matrix and the first {plots.MISCLASSIFIED_SHOWN} "
                                 f"misclassified images to DIR/{PLOT_FILES['eval/confusion']} and "
                                 f"DIR/{PLOT_FILES['eval/misclassified']}")
        args = vars(parser.parse_args(argv))
        checkpoint_path, json_raw, plots_raw = args.pop("checkpoint"), args.pop("json_path", None), \
            args.pop("plots_dir", None)
        json_path = outputs.file(json_raw, "--json") if json_raw is not None else None
        plots_dir = outputs.folder(plots_raw, "--plots", tuple(PLOT_FILES.values())) if plots_raw is not None \
            else None
        # the checkpoint's settings, overridden by the flags given (device, precision, data, batch, samples)
        loaded = inference.load(Path(checkpoint_path), args)
        config = loaded.config
        inference.refuse_overwriting(outputs, loaded, inference.mnist_files(config.data_dir))
        outputs.make_ready()
        run = inference.runtime(config, loaded.meta, args.get("precision"))
        finish.callback(end_process_group, run.accelerator)  # also on failure: the process group ends cleanly
        accelerator = run.accelerator
        console = Console(quiet=not accelerator.is_main_process, highlight=False, soft_wrap=True)

        root = resolve_data_dir(config.data_dir)
        images, labels = first(*main_first(accelerator, lambda: load_mnist(root, train=False,
                                                                           download=config.download)),
                               config.eval_samples)
        model, preprocess = inference.on_device(loaded.model, config, accelerator)
        batches = EvalBatches(images.to(accelerator.device), labels.to(accelerator.device), config.eval_batch_size,
                              preprocess, accelerator.process_index, accelerator.num_processes)
        result = evaluate(model, batches, accelerator, expected_count=len(labels),
                          keep_misclassified=plots.MISCLASSIFIED_SHOWN if plots_dir else 0)

        if accelerator.is_main_process:
            report(console, result, loaded, run)
            contents: dict[Path, str | bytes] = {}
            if json_path:
                contents[json_path] = json.dumps(to_json(result, loaded.folder, loaded.reason, run.device,
                                                         run.precision, accelerator.num_processes), indent=1) + "\n"
            if plots_dir:
                for tag, image in plots.evaluation_images(result, images).items():
                    contents[plots_dir / PLOT_FILES[tag]] = plots.png_bytes(image)
            outputs.write(contents)
            if plots_dir:
                console.print(f"plots: {escape(', '.join(str(plots_dir / name) for name in PLOT_FILES.values()))}")
    return 0


def to_json(result: EvalResult, folder: Path, reason: str, device: str, precision: str,
            processes: int) -> dict[str, Any]:
    return {"checkpoint": str(folder), "chosen_because": reason, "device": device, "precision": precision,
            "processes": processes, "accuracy": result.accuracy, "loss": result.loss, "correct": result.correct,
            "count": result.count, "per_class_accuracy": result.per_class_accuracy(),
            "confusion": result.confusion.tolist()}


def report(console: Console, result: EvalResult, loaded: inference.Loaded, run: Any) -> None:
    console.print(f"checkpoint: {escape(str(loaded.folder))} ({loaded.reason})")
    console.print(f"device: {run.device}, precision: {run.precision}, processes: {run.accelerator.num_processes}")
    for note in run.notes:
        console.print(f"note: {escape(note)}")
    console.print(f"accuracy: {result.accuracy:.2%} ({result.correct}/{result.count}), mean loss {result.loss:.4f}")
    per_class = Table(title="per class", title_justify="left")
    per_class.add_column("digit", justify="right")
    per_class.add_column("images", justify="right")
    per_class.add_column("accuracy", justify="right")
    totals = result.confusion.sum(dim=1).tolist()
    for digit, (total, accuracy) in enumerate(zip(totals, result.per_class_accuracy(), strict=True)):
        per_class.add_row(str(digit), str(total), f"{accuracy:.2%}")
    console.print(per_class)
    confusion = Table(title="confusion (rows: true digit, columns: predicted)", title_justify="left")
    confusion.add_column("")
    for digit in range(NUM_CLASSES):
        confusion.add_column(str(digit), justify="right")
    for digit, row in enumerate(result.confusion.tolist()):
        confusion.add_row(str(digit), *(f"[bold]{n}[/]" if i == digit else (str(n) if n else ".")
                                        for i, n in enumerate(row)))
    console.print(confusion)


if __name__ == "__main__":
    raise SystemExit(main())
