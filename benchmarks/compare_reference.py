"""The reference loop and the toolkit's trainer at the same settings, in one run: images/s of each and the ratio.

    python benchmarks/compare_reference.py [--reference-dir ../shared/reference/seed] [--device auto]
                                           [--precision auto|no|bf16|fp16] [--warmup 3] [--steps 10] [--json PATH]

The reference is not copied into the project: its folder is an argument. Its model.py is imported as is; its
train.py runs ten epochs at import, so its loop is reproduced here step for step, with batch and learning rate
read from it: torchvision MNIST with PIL Resize(224) + ToTensor, DataLoader(shuffle, no workers), SGD, cross
entropy, the host-to-device copy in the loop. Three measurements, each in its own process (the trainer's CPU
malloc setting, thread count and Accelerate's one-precision-per-process state must not leak into the others):

- reference as written (fp32);
- reference with its forward and loss under torch.autocast in --precision, when that is not fp32: like for
  like with the toolkit (a GradScaler for fp16, as mixed-precision training needs);
- the toolkit's trainer pipeline (`toolkit.bench --pipeline trainer --mode train`) on configs/seed.yaml, the
  reference's recipe, at the same image size (224 px: the reference's network takes no other), batch and
  precision.

Each is timed end to end, data loading included, in the same windows as toolkit.bench (benchmarks/README.md,
"What is measured, and how"): images/s is the median over --repeats windows of --steps steps.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from toolkit import devices
from toolkit.bench.cli import at_least, config_value
from toolkit.bench.environment import REPO_ROOT, environment
from toolkit.bench.plan import Case
from toolkit.bench.results import default_json_path, results_dir
from toolkit.bench.tables import console_for_tables
from toolkit.bench.timing import timed
from toolkit.bench.worker import run_in_processes
from toolkit.config import PRECISIONS, ArgumentParser
from toolkit.data import require_mnist, resolve_data_dir
from toolkit.errors import UsageError, exit_on_user_error
from toolkit.files import Outputs
from toolkit.peaks import COMPUTE_DTYPES

PROG = "compare_reference.py"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT.parent / "shared" / "reference" / "seed"
SEED_RECIPE = ROOT / "configs" / "seed.yaml"
# transforms.Resize(224) in the reference's train.py; its classifier expects the 5x5 grid of this size only
REFERENCE_IMAGE_SIZE = 224


def reference_settings(reference_dir: Path) -> dict[str, Any]:
    """`batch` and `learning_rate` as the reference's train.py assigns them (read, not run: it trains at import)."""
    tree = ast.parse((reference_dir / "train.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("batch", "learning_rate"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    missing = {"batch", "learning_rate"} - set(found)
    if missing:
        raise UsageError(f"{reference_dir / 'train.py'} does not assign {', '.join(sorted(missing))}: "
                         f"not the reference's train.py")
    return found


def load_reference_model(reference_dir: Path) -> type[torch.nn.Module]:
    spec = importlib.util.spec_from_file_location("reference_model", reference_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.AlexNet


def reference_batches(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:  # epoch after epoch, as the reference's loop does
        yield from loader


def run_reference(reference_dir: Path, device_kind: str, precision: str, image_size: int, batch_size: int,
                  warmup: int, steps: int, repeats: int) -> dict[str, Any]:
    """The reference's training loop on `device_kind`, its forward and loss under autocast unless fp32."""
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import transforms

    root = resolve_data_dir()  # main() checked that MNIST is there before starting this process
    settings = reference_settings(reference_dir)
    device = torch.device(device_kind)
    transform = transforms.Compose([transforms.Resize(image_size), transforms.ToTensor()])
    dataset = datasets.MNIST(root=str(root), train=True, transform=transform, download=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
    net = load_reference_model(reference_dir)().to(device)
    loss = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=settings["learning_rate"])
    dtype = COMPUTE_DTYPES[precision]
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=precision != "no")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    batches = reference_batches(loader)
    net.train()

    def run(count: int) -> None:
        for _ in range(count):
            images, targets = next(batches)
            images, targets = images.to(device), targets.to(device)
            with autocast:
                loss_out = loss(net(images), targets)
            optimizer.zero_grad()
            scaler.scale(loss_out).backward()
            scaler.step(optimizer)
            scaler.update()

    devices.reset_peak_memory(device)
    window = timed(run, device)
    window(warmup)
    seconds = [window(steps) for _ in range(repeats)]
    rates = [steps * batch_size / s for s in seconds]
    return {"side": "reference" if precision == "no" else f"reference + {precision} autocast",
            "precision": precision, "batch_size": batch_size, "image_size": image_size,
            "learning_rate": settings["learning_rate"], "images_per_sec": statistics.median(rates),
            "images_per_sec_windows": rates, "step_ms": 1000 * statistics.median(seconds) / steps,
            "peak_memory": devices.peak_memory_bytes(device), "torch_threads": torch.get_num_threads(),
            "status": "ok", "message": ""}


def side_in_process(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    """The reference in a fresh `--_side` process; a failure becomes an error row."""
    with tempfile.TemporaryDirectory(prefix="compare-reference-") as scratch:
        out = Path(scratch) / "side.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--_side", str(out),
                   "--reference-dir", str(args.reference_dir), "--device", args.device, "--precision", precision,
                   "--batch-size", str(args.batch_size),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--repeats", str(args.repeats)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0 and out.is_file():
            return json.loads(out.read_text())
    sys.stderr.write(result.stderr[-4000:])
    lines = result.stderr.strip().splitlines()
    return {"side": "reference" if precision == "no" else f"reference + {precision} autocast",
            "precision": precision, "status": "error", "message": lines[-1] if lines else f"exit {result.returncode}"}


def toolkit_side(args: argparse.Namespace, precision: str, known: dict[str, Any],
                 workers: dict[str, Any]) -> dict[str, Any]:
    case = Case(device=args.device, mode="train", pipeline="trainer", batch_size=args.batch_size,
                      precision=precision, channels_last=devices.use_channels_last(args.device), compile=False,
                      image_size=args.image_size, warmup=args.warmup, steps=args.steps, repeats=args.repeats,
                      recipe=str(SEED_RECIPE), requested_precision=precision)
    row = run_in_processes([case], known, workers=workers)[0]
    row["side"] = "toolkit trainer"
    return row


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--reference-dir", type=Path, default=DEFAULT_REFERENCE,
                        help=f"folder holding the reference's model.py and train.py (default {DEFAULT_REFERENCE})")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="auto, cpu, cuda or mps (default auto)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="no, bf16, fp16 or auto (the trainer's choice for the device); the reference is also "
                             "measured as written, in fp32 (default auto)")
    parser.add_argument("--batch-size", default=None, type=config_value("batch_size", "--batch-size"),
                        help="both sides (default: the reference's `batch`)")
    parser.add_argument("--warmup", default=3, type=at_least(0), help="untimed steps first (default 3)")
    parser.add_argument("--steps", default=10, type=at_least(1), help="steps per timed window (default 10)")
    parser.add_argument("--repeats", default=1, type=at_least(1),
                        help="timed windows; the median is reported (default 1)")
    parser.add_argument("--json", default="", help=f"where to write the results (default: a new file "
                                                   f"reference-<device>-<date>.json in {results_dir()})")
    parser.add_argument("--_side", help=argparse.SUPPRESS)
    return parser


def check_args(args: argparse.Namespace) -> None:
    args.reference_dir = args.reference_dir.resolve()
    if not (args.reference_dir / "model.py").is_file() or not (args.reference_dir / "train.py").is_file():
        raise UsageError(f"--reference-dir {args.reference_dir} does not hold the reference's model.py and train.py")
    args.device = devices.resolve(args.device)
    args.image_size = REFERENCE_IMAGE_SIZE
    if args.batch_size is None:
        args.batch_size = config_value("batch_size", "--batch-size")(reference_settings(args.reference_dir)["batch"])
    if args.precision != "auto" and args.precision not in devices.supported_precisions(args.device):
        raise UsageError(f"--precision {args.precision} is not supported on {args.device}; supported: "
                         f"{', '.join(devices.supported_precisions(args.device))}")
    args.precision = devices.resolve_precision(args.device, args.precision)[0]


def print_results(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.table import Table

    toolkit = rows[-1]
    table = Table(title="reference loop vs toolkit trainer", title_justify="left",
                  caption=f"{args.device} ({devices.name(args.device)}), {args.image_size} px, batch "
                          f"{args.batch_size}; {args.repeats} x {args.steps} steps after {args.warmup} warm-up",
                  caption_justify="left")
    for column, justify in (("side", "left"), ("precision", "left"), ("images/s", "right"),
                            ("step ms", "right"), ("toolkit / this", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        ok = row["status"] == "ok"
        step_ms = row["step_ms"]["median"] if isinstance(row.get("step_ms"), dict) else row.get("step_ms")
        ratio = (toolkit["images_per_sec"] / row["images_per_sec"]
                 if ok and toolkit["status"] == "ok" and row is not toolkit else None)
        table.add_row(row["side"], row["precision"], f"{row['images_per_sec']:,.1f}" if ok else row["status"],
                      f"{step_ms:,.1f}" if ok else "-", f"{ratio:.2f}x" if ratio else "")
    console = console_for_tables()
    console.print(table)
    for row in rows:
        if row["status"] != "ok":
            console.print(f"{row['side']}: {row['status']}: {row['message']}", markup=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with exit_on_user_error(PROG), Outputs() as outputs:
        args = build_parser().parse_args(argv)
        check_args(args)
        if args._side:
            row = run_reference(args.reference_dir, args.device, args.precision, args.image_size, args.batch_size,
                                args.warmup, args.steps, args.repeats)
            Path(args._side).write_text(json.dumps(row))
            return 0
        require_mnist(resolve_data_dir(), reader="the comparison")
        path = outputs.file(args.json or str(default_json_path(f"reference-{args.device}")), "--json")
        outputs.make_ready()  # before the minutes of measuring, not after
        known: dict[str, Any] = {}
        workers: dict[str, Any] = {}
        precisions = ["no"] if args.precision == "no" else ["no", args.precision]
        rows = []
        for precision in precisions:
            print(f"measuring the reference loop, {precision}", flush=True)
            rows.append(side_in_process(args, precision))
        print(f"measuring the toolkit trainer, {args.precision}", flush=True)
        rows.append(toolkit_side(args, args.precision, known, workers))
        print_results(rows, args)
        toolkit = rows[-1]
        for row in rows[:-1]:
            ok = row["status"] == toolkit["status"] == "ok"
            row["toolkit_over_this"] = toolkit["images_per_sec"] / row["images_per_sec"] if ok else None
        context = environment(" ".join(["python benchmarks/compare_reference.py", *argv]), workers)
        # paths as the project sees them, not as this machine lays them out
        context["reference_dir"] = os.path.relpath(args.reference_dir, REPO_ROOT)
        rows[-1]["recipe"] = os.path.relpath(rows[-1]["recipe"], REPO_ROOT)
        outputs.write({path: json.dumps({"environment": context, "results": rows}, indent=2) + "\n"})
        print(f"results: {path}")
        return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
