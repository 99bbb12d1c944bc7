"""Export a checkpoint as a self-contained model for serving: ONNX or TorchScript, preprocessing included.

    python -m toolkit.export --checkpoint runs/x --format onnx --output model.onnx
    python -m toolkit.export --checkpoint runs/x --format torchscript --output model.pt

The exported model takes MNIST-style images as they are: input `images`, uint8 (N, 28, 28), 0-255, a white
digit on black (invert black-on-white scans first; `toolkit.predict` shows how to prepare any image), N free.
Inside the graph is the training code's own preprocessing (`toolkit.data.Preprocess`: /255, standardise
with MNIST's mean and std when the checkpoint was trained so, bilinear resize to its image size), then
AlexNet, in fp32. Output `logits`: float32 (N, 10), one score per digit 0-9; softmax gives probabilities.
A sidecar `FILE.json` records this, the checkpoint and the check below.

Before the file is put in place, a batch of MNIST test images (random images if MNIST is not on this
machine, stated) goes through PyTorch and through the exported model, read back from the file: TorchScript
with torch.jit.load, ONNX with ONNX Runtime if it is installed (else the check is skipped, stated). Every
logit must agree within ATOL + RTOL * |logit|, or the command exits 1 and writes nothing. ONNX needs the
optional packages onnx and onnxscript (the exporter that ships with torch, `torch.onnx.export(dynamo=True)`,
builds on them) and onnxruntime for the check: `pip install -e '.[onnx]'`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from toolkit import devices
from toolkit.config import build_parser, from_dict
from toolkit.data import MNIST_MEAN, MNIST_STD, SOURCE_SIZE, DataError, Preprocess, load_mnist, resolve_data_dir
from toolkit.errors import UsageError, UserError, exit_on_user_error
from toolkit.evaluate import load_for_inference
from toolkit.files import fsync, write_atomic
from toolkit.model import NUM_CLASSES, AlexNet
from toolkit.predict import IMAGE_PREPARATION

PROG = "toolkit.export"
FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# fp32 on the CPU: the same kernels (TorchScript) agree to the bit; ONNX Runtime's convolutions and matrix
# products sum in another order, which moves logits of magnitude ~5 by a few 1e-6. 1e-4 leaves room for other
# CPUs and still catches any real difference (a wrong normalisation moves logits by whole units).
ATOL = 1e-4
RTOL = 1e-4
VERIFY_IMAGES = 64  # the first 64 MNIST test images; also the first one alone, to exercise a batch of one
ONNX_PACKAGES = ("onnx", "onnxscript")


class ServingModel(nn.Module):
    """uint8 images (N, 28, 28) -> logits (N, 10): the training preprocessing, then the network."""

    def __init__(self, model: AlexNet, preprocess: Preprocess) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(images))  # (N, 28, 28) -> (N, 1, S, S) -> (N, 10)


@dataclass(frozen=True)
class Check:
    runtime: str  # what ran the exported file, or why nothing did
    images: str  # what went through both
    count: int = 0
    max_abs_diff: float = 0.0
    worst_ratio: float = 0.0  # max |difference| / (ATOL + RTOL * |logit|): within tolerance when <= 1
    top1_agreement: int = 0

    @property
    def ran(self) -> bool:
        return self.count > 0

    @property
    def passed(self) -> bool:
        return self.worst_ratio <= 1

    def summary(self) -> str:
        if not self.ran:
            return f"check skipped: {self.runtime}"
        verdict = "passed" if self.passed else "FAILED"
        return (f"check ({self.runtime}, {self.images}): max |logit difference| {self.max_abs_diff:.2e}, "
                f"top-1 agreement {self.top1_agreement}/{self.count}, tolerance |difference| <= {ATOL:g} + "
                f"{RTOL:g} * |logit|: {verdict}")


def export_torchscript(serving: ServingModel, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        # PyTorch marks TorchScript deprecated in favour of torch.export; it still runs anywhere libtorch does.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        # The model's input-size check reads H and W, which the preprocessing fixes: a constant is right.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(serving, example)
        torch.jit.save(traced, str(path))


def require_onnx_exporter() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ONNX export needs the optional packages {' and '.join(ONNX_PACKAGES)} "
                        f"({', '.join(missing)} not installed): pip install -e '.[onnx]', or use --format torchscript")


def export_onnx(serving: ServingModel, example: torch.Tensor, path: Path) -> None:
    program = torch.onnx.export(serving, (example,), dynamo=True, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
                                verbose=False)
    program.save(str(path), external_data=False)  # one file: the weights (187 MB) are far below ONNX's 2 GB


def runner(kind: str, path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """(a function running the exported file on uint8 images, what runs it), or (None, why it cannot run)."""
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            loaded = torch.jit.load(str(path), map_location="cpu")
        return loaded, "torch.jit.load"
    if importlib.util.find_spec("onnxruntime") is None:
        return None, "onnxruntime is not installed (pip install -e '.[onnx]')"
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (lambda images: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]),
            f"ONNX Runtime {onnxruntime.__version__}")


def verification_images(data_dir: str) -> tuple[torch.Tensor, str]:
    """(uint8 (VERIFY_IMAGES, 28, 28), where they come from): MNIST test images, else seeded random ones."""
    try:
        images, _ = load_mnist(resolve_data_dir(data_dir), train=False, download=False)
        return images[:VERIFY_IMAGES], f"{VERIFY_IMAGES} MNIST test images"
    except DataError:
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (VERIFY_IMAGES, SOURCE_SIZE, SOURCE_SIZE), dtype=torch.uint8,
                               generator=generator)
        return images, f"{VERIFY_IMAGES} random images: MNIST is not on this machine"


@torch.no_grad()
def check(serving: ServingModel, kind: str, path: Path, images: torch.Tensor, source: str) -> Check:
    """Compare PyTorch's logits with the exported file's, on `images` as one batch and on the first alone."""
    run, runtime = runner(kind, path)
    if run is None:
        return Check(runtime=runtime, images=source)
    worst_ratio, max_abs_diff, agree = 0.0, 0.0, 0
    for batch in (images, images[:1]):
        expected, got = serving(batch), run(batch).float()  # (B, 10) each
        difference = (got - expected).abs()
        max_abs_diff = max(max_abs_diff, float(difference.max()))
        worst_ratio = max(worst_ratio, float((difference / (ATOL + RTOL * expected.abs())).max()))
        if len(batch) == len(images):
            agree = int((got.argmax(dim=1) == expected.argmax(dim=1)).sum())
    return Check(runtime=runtime, images=source, count=len(images), max_abs_diff=max_abs_diff,
                 worst_ratio=worst_ratio, top1_agreement=agree)


def write_verified(path: Path, write: Callable[[Path], None], verify: Callable[[Path], Check]) -> Check:
    """Write through `write` to a temporary file beside `path`, check it, and only if it passes rename it
    onto `path`: a reader finds the old file or a complete, checked new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync(tmp)
        result = verify(tmp)
        if result.ran and not result.passed:
            raise UserError(f"the exported model differs from PyTorch beyond tolerance, {path} not written: "
                            f"{result.summary()}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)
    return result


def describe(kind: str, output: Path, folder: Path, preprocess: Preprocess, result: Check) -> dict[str, Any]:
    """The sidecar: what the exported file expects and returns, and how it was checked."""
    return {
        "format": kind, "file": output.name, "checkpoint": str(folder), "torch": torch.__version__,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["N", SOURCE_SIZE, SOURCE_SIZE],
                  "range": [0, 255], "layout": "white digit on black, as MNIST (invert black-on-white scans)"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", NUM_CLASSES],
                   "meaning": "logits of the digits 0-9; softmax gives probabilities"},
        "inside": {"scale": "x / 255",
                   "standardise": {"mean": MNIST_MEAN, "std": MNIST_STD} if preprocess.normalize else None,
                   "resize": {"size": preprocess.image_size, "mode": "bilinear", "align_corners": False,
                              "antialias": False},
                   "precision": "fp32"},
        "preparing_any_image": IMAGE_PREPARATION,
        "check": {**asdict(result), "atol": ATOL, "rtol": RTOL, "passed": result.passed if result.ran else None},
    }


def main(argv: list[str] | None = None) -> int:
    with exit_on_user_error(PROG):
        parser = build_parser("python -m toolkit.export", __doc__.splitlines()[0], keys=("data_dir", "cpu_threads"))
        parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
        parser.add_argument("--format", required=True, choices=FORMATS, help="onnx or torchscript")
        parser.add_argument("--output", required=True, help="file to write (replaced if it exists)")
        parser.epilog = (f"The model takes uint8 images (N, 28, 28) and returns logits (N, 10); it is checked "
                         f"against PyTorch (|difference| <= {ATOL:g} + {RTOL:g} * |logit|) before it is written.")
        args = vars(parser.parse_args(argv))
        kind, output = args.pop("format"), Path(args.pop("output"))
        if output.is_dir():
            raise UsageError(f"--output {output} is a folder: give the file to write (model.onnx, model.pt)")
        if kind == "onnx":
            require_onnx_exporter()
        model, config, _, folder, reason = load_for_inference(Path(args.pop("checkpoint")))
        config = from_dict(args, source="command line", base=config)
        devices.configure("cpu", deterministic=False, cpu_threads=config.cpu_threads, local_processes=1)
        console = Console(highlight=False, soft_wrap=True)

        preprocess = Preprocess(config.image_size, config.normalize)
        serving = ServingModel(model.float(), preprocess).eval()
        images, source = verification_images(config.data_dir)
        example = images[:2]  # a batch of two: a batch of one would let the exporters fix N at 1
        exporter = export_onnx if kind == "onnx" else export_torchscript
        result = write_verified(output, lambda path: exporter(serving, example, path),
                                lambda path: check(serving, kind, path, images, source))
        sidecar = output.with_name(output.name + ".json")
        write_atomic(sidecar, json.dumps(describe(kind, output, folder, preprocess, result), indent=1)
                                + "\n")

        console.print(f"checkpoint: {escape(str(folder))} ({reason})")
        console.print(f"wrote {escape(str(output))} ({kind}, {output.stat().st_size / 1e6:.1f} MB) and "
                      f"{escape(sidecar.name)} (what it expects)")
        console.print(f"input: {INPUT_NAME}, uint8 (N, {SOURCE_SIZE}, {SOURCE_SIZE}), 0-255, white digit on black")
        standardise = f", (x - {MNIST_MEAN}) / {MNIST_STD}" if preprocess.normalize else ""
        console.print(f"inside: x / 255{standardise}, bilinear resize to {preprocess.image_size}x"
                      f"{preprocess.image_size}, AlexNet, fp32")
        console.print(f"output: {OUTPUT_NAME}, float32 (N, {NUM_CLASSES}), logits of the digits 0-9")
        console.print(escape(result.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
