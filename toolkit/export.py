"""Export a checkpoint as a self-contained model for serving: ONNX or TorchScript, preprocessing included.

    python -m toolkit.export --checkpoint runs/x --format onnx --output model.onnx
    python -m toolkit.export --checkpoint runs/x --format torchscript --output model.pt

The exported model takes MNIST-style images as they are: input `images`, uint8 (N, 28, 28), 0-255, a white
digit on black framed as MNIST's (`toolkit.predict` prepares any image so: `toolkit.inference.read_image`, and
the sidecar's "preparing_any_image"), N free.
Inside the graph is the training code's own preprocessing (`toolkit.data.Preprocess`: /255, standardise
with MNIST's mean and std when the checkpoint was trained so, bilinear resize to its image size), then
AlexNet, in fp32. Output `logits`: float32 (N, 10), one score per digit 0-9; softmax gives probabilities.
A sidecar `FILE.json` records this, the checkpoint and the check below.

The model is serialised in memory; before anything is written, a batch of MNIST test images (random images
if MNIST is not on this machine, stated) goes through PyTorch and through the exported model read back from
those bytes: TorchScript with torch.jit.load, ONNX with ONNX Runtime if it is installed (else the check is
skipped, stated). Every logit must be finite and agree within ATOL + RTOL * |logit|, or the command exits 1
and writes nothing. Then Python writes the bytes and the sidecar, both or neither (`toolkit.files`): a full
disk is one line and leaves no temporary file, and the output must not be a file the command reads nor lie in
a checkpoint folder. ONNX needs the
optional packages onnx and onnxscript (the exporter that ships with torch, `torch.onnx.export(dynamo=True)`,
builds on them) and onnxruntime for the check: `pip install -e '.[onnx]'`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from toolkit import devices, inference
from toolkit.checkpoint import tensor_bytes
from toolkit.config import build_parser
from toolkit.data import MNIST_MEAN, MNIST_STD, SOURCE_SIZE, DataError, Preprocess, load_mnist, resolve_data_dir
from toolkit.errors import UsageError, UserError, exit_on_user_error
from toolkit.files import Outputs
from toolkit.inference import ServingModel
from toolkit.model import NUM_CLASSES

PROG = "toolkit.export"
FORMATS = ("onnx", "torchscript")
FORMAT_NAMES = {"onnx": "ONNX", "torchscript": "TorchScript"}
# The extensions each format's files go by: an --output wearing another one would mislead whoever opens it.
EXTENSIONS = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".torchscript")}
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# fp32 on the CPU: the same kernels (TorchScript) agree to the bit; ONNX Runtime's convolutions and matrix
# products sum in another order, which moves logits of magnitude ~5 by a few 1e-6. 1e-4 leaves room for other
# CPUs and still catches any real difference (a wrong normalisation moves logits by whole units).
ATOL = 1e-4
RTOL = 1e-4
VERIFY_IMAGES = 64  # the first 64 MNIST test images; also the first one alone, to exercise a batch of one
ONNX_PACKAGES = ("onnx", "onnxscript")


@dataclass(frozen=True)
class Check:
    runtime: str  # what ran the exported model, or why nothing did
    images: str  # what went through both
    count: int = 0
    max_abs_diff: float = 0.0  # inf when any logit is not finite
    worst_ratio: float = 0.0  # max |difference| / (ATOL + RTOL * |logit|): within tolerance when <= 1
    top1_agreement: int = 0
    non_finite: int = 0  # logits, of PyTorch's and the exported model's, that are NaN or infinite

    @property
    def ran(self) -> bool:
        return self.count > 0

    @property
    def passed(self) -> bool:
        return self.non_finite == 0 and self.worst_ratio <= 1

    def summary(self) -> str:
        if not self.ran:
            return f"check skipped: {self.runtime}"
        verdict = "passed" if self.passed else "FAILED"
        finite = f"{self.non_finite} logits not finite, " if self.non_finite else ""
        return (f"check ({self.runtime}, {self.images}): {finite}max |logit difference| {self.max_abs_diff:.2e}, "
                f"top-1 agreement {self.top1_agreement}/{self.count}, tolerance |difference| <= {ATOL:g} + "
                f"{RTOL:g} * |logit|: {verdict}")


def torchscript_bytes(serving: ServingModel, example: torch.Tensor) -> bytes:
    with warnings.catch_warnings():
        # PyTorch marks TorchScript deprecated in favour of torch.export; it still runs anywhere libtorch does.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        # The model's input-size check reads H and W, which the preprocessing fixes: a constant is right.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(serving, example)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)  # into memory: libtorch writing a file aborts the process on a full disk
    return buffer.getvalue()


def require_onnx_exporter() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ONNX export needs the optional packages {' and '.join(ONNX_PACKAGES)} "
                        f"({', '.join(missing)} not installed): pip install -e '.[onnx]', or use --format torchscript")


def onnx_bytes(serving: ServingModel, example: torch.Tensor) -> bytes:
    program = torch.onnx.export(serving, (example,), dynamo=True, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
                                verbose=False)
    # one message, weights inside: 187 MB, far below protobuf's and ONNX's 2 GB
    return program.model_proto.SerializeToString()


def serialise(kind: str, serving: ServingModel, example: torch.Tensor) -> bytes:
    return (onnx_bytes if kind == "onnx" else torchscript_bytes)(serving, example)


def runner(kind: str, data: bytes) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """(a function running the exported model `data` on uint8 images, what runs it), or (None, why it cannot
    run)."""
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
        return loaded, "torch.jit.load"
    if importlib.util.find_spec("onnxruntime") is None:
        return None, "onnxruntime is not installed (pip install -e '.[onnx]')"
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
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
def check(serving: ServingModel, kind: str, data: bytes, images: torch.Tensor, source: str) -> Check:
    """Compare PyTorch's logits with the exported model's, on `images` as one batch and on the first alone.
    NaN-safe: a logit that is not finite, on either side, fails the check (max() would drop a NaN)."""
    run, runtime = runner(kind, data)
    if run is None:
        return Check(runtime=runtime, images=source)
    worst_ratio, max_abs_diff, agree, non_finite = 0.0, 0.0, 0, 0
    for batch in (images, images[:1]):
        expected, got = serving(batch), run(batch).float()  # (B, 10) each
        non_finite += int((~expected.isfinite()).sum()) + int((~got.isfinite()).sum())
        difference = (got - expected).abs()
        ratio = difference / (ATOL + RTOL * expected.abs())
        max_abs_diff = max(max_abs_diff, _finite_or_inf(difference.max()))
        worst_ratio = max(worst_ratio, _finite_or_inf(ratio.max()))
        if len(batch) == len(images):
            agree = int((got.argmax(dim=1) == expected.argmax(dim=1)).sum())
    return Check(runtime=runtime, images=source, count=len(images), max_abs_diff=max_abs_diff,
                 worst_ratio=worst_ratio, top1_agreement=agree, non_finite=non_finite)


def _finite_or_inf(value: torch.Tensor) -> float:
    """A tensor max as a float, NaN made infinity: the worst value, which max() then keeps."""
    number = float(value)
    return math.inf if math.isnan(number) else number


def verified(kind: str, serving: ServingModel, images: torch.Tensor, source: str, output: Path
             ) -> tuple[bytes, Check]:
    """(the exported model's bytes, their check): a UserError naming `output` when the check fails."""
    data = serialise(kind, serving, images[:2])  # a batch of two: one would let the exporters fix N at 1
    result = check(serving, kind, data, images, source)
    if result.ran and not result.passed:
        raise UserError(f"the exported model differs from PyTorch beyond tolerance, {output} not written: "
                        f"{result.summary()}")
    return data, result


def describe(kind: str, output: Path, folder: Path, preprocess: Preprocess, result: Check) -> dict[str, Any]:
    """The sidecar: what the exported file expects and returns, and how it was checked."""
    return {
        "format": kind, "file": output.name, "checkpoint": str(folder), "torch": torch.__version__,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["N", SOURCE_SIZE, SOURCE_SIZE],
                  "range": [0, 255],
                  "layout": "white digit on black, framed as MNIST's: fitted in 20x20, centred by mass in 28x28"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", NUM_CLASSES],
                   "meaning": "logits of the digits 0-9; softmax gives probabilities"},
        "inside": {"scale": "x / 255",
                   "standardise": {"mean": MNIST_MEAN, "std": MNIST_STD} if preprocess.normalize else None,
                   "resize": {"size": preprocess.image_size, "mode": "bilinear", "align_corners": False,
                              "antialias": False},
                   "precision": "fp32"},
        "preparing_any_image": inference.IMAGE_PREPARATION,
        "check": {**asdict(result), "atol": ATOL, "rtol": RTOL, "passed": result.passed if result.ran else None},
    }


def one_format(formats: list[str]) -> str:
    """The one --format given: a UsageError for several (argparse would keep the last without a word)."""
    if len(formats) > 1:
        raise UsageError(f"--format given {len(formats)} times ({', '.join(formats)}): one export per command; "
                         f"run it once per format")
    return formats[0]


def check_extension(kind: str, output: str) -> None:
    """A UsageError when `output`'s extension is the other format's: its file would lie about what it holds."""
    suffix = Path(output).suffix.lower()
    other = next((name for name, exts in EXTENSIONS.items() if name != kind and suffix in exts), None)
    if other:
        raise UsageError(f"--output {output}: {suffix} names {FORMAT_NAMES[other]} files, and --format {kind} "
                         f"writes {FORMAT_NAMES[kind]}: name it {Path(output).with_suffix(EXTENSIONS[kind][0]).name}, "
                         f"or give --format {other}")


def main(argv: list[str] | None = None) -> int:
    with exit_on_user_error(PROG), Outputs() as outputs:
        parser = build_parser("python -m toolkit.export", __doc__.splitlines()[0], keys=("data_dir", "cpu_threads"))
        parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
        parser.add_argument("--format", required=True, choices=FORMATS, action="append",
                            help="onnx (FILE.onnx) or torchscript (FILE.pt); one per command")
        parser.add_argument("--output", required=True,
                            help="file to write (replaced if it exists; missing folders are created), and FILE.json")
        parser.epilog = (f"The model takes uint8 images (N, 28, 28) and returns logits (N, 10); it is checked "
                         f"against PyTorch (|difference| <= {ATOL:g} + {RTOL:g} * |logit|) before it is written.")
        args = vars(parser.parse_args(argv))
        kind, checkpoint_path, output_raw = one_format(args.pop("format")), args.pop("checkpoint"), args.pop("output")
        check_extension(kind, output_raw)
        output = outputs.file(output_raw, "--output")
        sidecar = outputs.file(str(output.with_name(output.name + ".json")), "--output")
        if kind == "onnx":
            require_onnx_exporter()
        loaded = inference.load(Path(checkpoint_path), args)
        config = loaded.config
        inference.refuse_overwriting(outputs, loaded, inference.mnist_files(config.data_dir))
        outputs.make_ready()
        notes = devices.configure("cpu", deterministic=False, cpu_threads=config.cpu_threads, local_processes=1)
        console = Console(highlight=False, soft_wrap=True)
        for note in notes:
            console.print(f"note: {escape(note)}")

        preprocess = Preprocess(config.image_size, config.normalize)
        serving = ServingModel(loaded.model.float(), preprocess).eval()
        outputs.check_space(output, tensor_bytes(serving.state_dict()), f"the {kind} export")
        images, source = verification_images(config.data_dir)
        data, result = verified(kind, serving, images, source, output)
        outputs.write({output: data, sidecar: json.dumps(describe(kind, output, loaded.folder, preprocess, result),
                                                         indent=1) + "\n"})

        console.print(f"checkpoint: {escape(str(loaded.folder))} ({loaded.reason})")
        console.print(f"wrote {escape(str(output))} ({kind}, {len(data) / 1e6:.1f} MB) and "
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
