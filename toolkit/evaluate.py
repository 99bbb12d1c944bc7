"""Evaluate a checkpoint on the MNIST test set: accuracy, mean loss, per-class accuracy, confusion matrix.

    python -m toolkit.evaluate --checkpoint runs/x [--eval-samples 1000] [--json out.json]
    accelerate launch --config_file launch/cpu_ddp.yaml -m toolkit.evaluate --checkpoint runs/x

PATH is a checkpoint folder, or a run folder (then its best checkpoint by eval accuracy, else its latest).
Images are prepared exactly as in training (the checkpoint's image size and normalisation). With several
processes the sums are gathered exactly: the same count of correct answers as one process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.table import Table

from toolkit import checkpoint, devices
from toolkit.config import TrainConfig, build_parser, from_dict
from toolkit.data import EvalBatches, Preprocess, first, load_mnist, resolve_data_dir
from toolkit.errors import UsageError, exit_on_user_error
from toolkit.files import write_atomic
from toolkit.metrics import EvalResult, evaluate
from toolkit.model import NUM_CLASSES, AlexNet, build_model

PRECISION_RULE = "Precision: the checkpoint's training precision when this device runs it, else auto; " \
                 "--precision overrides."
# Settings a user may change when using a trained model; the rest (image size, normalisation) come from it.
INFERENCE_KEYS = ("device", "precision", "channels_last", "cpu_threads", "data_dir", "download", "eval_samples",
                  "eval_batch_size")


def load_for_inference(path: Path) -> tuple[AlexNet, TrainConfig, dict[str, Any], Path, str]:
    """(model on the CPU in eval mode, its training config, its metadata, the checkpoint folder, why that one)."""
    folder, reason = checkpoint.for_inference(path)
    checkpoint.verify(folder)
    try:
        saved = checkpoint.load_config(folder)
        config = from_dict(saved, source=str(folder / checkpoint.CONFIG))
    except UsageError as error:
        raise checkpoint.CheckpointError(f"{folder} was saved with a config this version cannot use: {error}") \
            from None
    model = build_model(init="default", dropout=config.dropout)
    checkpoint.load_weights_into(model, checkpoint.load_weights(folder / checkpoint.WEIGHTS),
                                 folder / checkpoint.WEIGHTS)
    return model.eval(), config, checkpoint.load_meta(folder), folder, reason


def inference_accelerator(config: TrainConfig, meta: dict[str, Any], precision_given: bool
                          ) -> tuple[Accelerator, str, str]:
    """(accelerator, device, precision) for using a trained model: the precision flag if given, else the
    checkpoint's training precision when this device runs it, else auto. The same rule as toolkit.evaluate."""
    device = devices.resolve(config.device)
    requested = config.precision if precision_given else meta.get("precision", "auto")
    if requested not in devices.supported_precisions(device):
        requested = "auto"
    precision, _ = devices.resolve_precision(device, requested)
    accelerator = devices.build_accelerator(device, precision, config.dist_timeout_s)
    devices.configure(device, config.deterministic, config.cpu_threads, accelerator.num_processes)
    return accelerator, device, precision


def on_device(model: AlexNet, config: TrainConfig, accelerator: Accelerator) -> tuple[AlexNet, Preprocess]:
    """The model on the accelerator in the memory format training uses there, and the training preprocessing
    (without augmentation) that feeds it."""
    channels_last = devices.use_channels_last(accelerator.device.type, config.channels_last)
    model = model.to(accelerator.device, memory_format=torch.channels_last if channels_last else
                     torch.preserve_format)
    return model, Preprocess(config.image_size, config.normalize, channels_last=channels_last)


def main(argv: list[str] | None = None) -> int:
    with exit_on_user_error("toolkit.evaluate"):
        parser = build_parser("python -m toolkit.evaluate", __doc__.splitlines()[0], keys=INFERENCE_KEYS)
        parser.epilog = PRECISION_RULE
        parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
        parser.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
        args = vars(parser.parse_args(argv))
        model, config, meta, folder, reason = load_for_inference(Path(args.pop("checkpoint")))
        json_path = args.pop("json_path", None)
        # the checkpoint's settings, overridden by the flags given (device, precision, data, batch, samples)
        config = from_dict(args, source="command line", base=config)
        accelerator, device, precision = inference_accelerator(config, meta, "precision" in args)
        console = Console(quiet=not accelerator.is_main_process, highlight=False, soft_wrap=True)

        with accelerator.main_process_first():
            images, labels = first(*load_mnist(resolve_data_dir(config.data_dir), train=False,
                                               download=config.download), config.eval_samples)
        model, preprocess = on_device(model, config, accelerator)
        batches = EvalBatches(images.to(accelerator.device), labels.to(accelerator.device), config.eval_batch_size,
                              preprocess, accelerator.process_index, accelerator.num_processes)
        result = evaluate(model, batches, accelerator, expected_count=len(labels))

        if accelerator.is_main_process:
            report(console, result, folder, reason, device, precision, accelerator.num_processes)
            if json_path:
                write_atomic(Path(json_path), json.dumps(
                    to_json(result, folder, reason, device, precision, accelerator.num_processes), indent=1) + "\n")
        accelerator.end_training()
    return 0


def to_json(result: EvalResult, folder: Path, reason: str, device: str, precision: str,
            processes: int) -> dict[str, Any]:
    return {"checkpoint": str(folder), "chosen_because": reason, "device": device, "precision": precision,
            "processes": processes, "accuracy": result.accuracy, "loss": result.loss, "correct": result.correct,
            "count": result.count, "per_class_accuracy": result.per_class_accuracy(),
            "confusion": result.confusion.tolist()}


def report(console: Console, result: EvalResult, folder: Path, reason: str, device: str, precision: str,
           processes: int) -> None:
    console.print(f"checkpoint: {folder} ({reason})")
    console.print(f"device: {device}, precision: {precision}, processes: {processes}")
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
