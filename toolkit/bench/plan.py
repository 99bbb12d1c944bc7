"""The cases a command asks for, in the order they run, and the trainer config each one runs under."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from toolkit import devices
from toolkit.config import TrainConfig, from_dict, read_yaml
from toolkit.data import mnist_present, require_mnist, resolve_data_dir, write_idx
from toolkit.errors import UsageError

PROG = "toolkit.bench"
MODES = ("train", "infer")
PIPELINES = ("model", "trainer")
MNIST_TRAIN_IMAGES = 60_000
MNIST_TEST_IMAGES = 10_000


@dataclass(frozen=True)
class Case:
    """One configuration, one row of results; everything resolved (no `auto`)."""

    device: str  # cpu | cuda | mps
    mode: str  # train | infer
    pipeline: str  # model | trainer
    batch_size: int  # per process
    precision: str  # no | bf16 | fp16
    channels_last: bool
    compile: bool
    image_size: int
    warmup: int
    steps: int
    repeats: int
    recipe: str = ""  # trainer config YAML the run starts from ('' = the trainer's defaults)
    requested_precision: str = ""  # as asked for (`auto` included): lines devices up side by side

    def label(self) -> str:
        return (f"{self.device} {self.mode} {self.pipeline} batch {self.batch_size} {self.precision}"
                f"{' channels_last' if self.channels_last else ''}{' compiled' if self.compile else ''}"
                f" {self.image_size}px")


def plan(args: argparse.Namespace, announce: Callable[[str], None]) -> tuple[list[str], list[Case]]:
    """The devices and the cases to run, in order; a UsageError for anything that cannot run. `args` are the
    parsed flags (lists and numbers already checked by the parser)."""
    device_list = devices.available() if args.device == "all" else [devices.resolve(args.device)]
    batch_sizes = sorted(set(args.batch_size))  # small first: an out-of-memory error comes last
    modes = list(MODES) if args.mode == "both" else [args.mode]
    pipelines = list(PIPELINES) if args.pipeline == "both" else [args.pipeline]
    if args.config:
        read_yaml(args.config)  # a missing or broken file is one line now, not one error row per case
    check_windows_fit(modes, "trainer" in pipelines, args.steps, max(batch_sizes))

    cases = []
    for device in device_list:
        if args.compile and not compiles(device, skip=args.device == "all", announce=announce):
            continue
        precisions = []
        for wanted in args.precision:
            if wanted != "auto" and wanted not in devices.supported_precisions(device):
                message = (f"--precision {wanted} is not supported on {device}; supported: "
                           f"{', '.join(devices.supported_precisions(device))}")
                if args.device != "all":
                    raise UsageError(message)
                announce(f"skipped: {message}")
                continue
            precision = devices.resolve_precision(device, wanted)[0]
            if precision not in (p for p, _ in precisions):
                precisions.append((precision, wanted))
        channels_last = devices.use_channels_last(device, "auto" if args.channels_last is None
                                                  else str(args.channels_last).lower())
        for (precision, wanted), mode, pipeline, batch_size in itertools.product(precisions, modes, pipelines,
                                                                                 batch_sizes):
            cases.append(Case(device=device, mode=mode, pipeline=pipeline, batch_size=batch_size,
                              precision=precision, channels_last=channels_last, compile=args.compile,
                              image_size=args.image_size, warmup=args.warmup, steps=args.steps,
                              repeats=args.repeats, recipe=args.config, requested_precision=wanted))
    if args.compile and "infer" in modes and cases:
        announce("note: --compile compiles the training step; infer rows run the trainer's evaluated weights, "
                 "which it does not compile")
    return device_list, cases


def compiles(device: str, skip: bool, announce: Callable[[str], None]) -> bool:
    """Whether `device` can compile here; a UsageError saying why not, or with `skip` (--device all) a note."""
    try:
        devices.check_compile(device)
    except UsageError as error:
        if not skip:
            raise
        announce(f"skipped {device}: {error}")
        return False
    return True


def check_windows_fit(modes: list[str], reads_mnist: bool, steps: int, batch_size: int) -> None:
    """A batch must fit in its MNIST split. The trainer pipeline reads MNIST, and one timed window must fit in one
    pass over its split: a training window in an epoch, an inference window (one evaluation) in the test set."""
    splits = {"train": ("one MNIST epoch", MNIST_TRAIN_IMAGES), "infer": ("the MNIST test set", MNIST_TEST_IMAGES)}
    for mode in modes:
        name, images = splits[mode]
        if batch_size > images:
            raise UsageError(f"--batch-size {batch_size} is more than {name} ({images} images)")
    if not reads_mnist:
        return
    require_mnist_for_trainer(resolve_data_dir())
    for mode in modes:
        name, images = splits[mode]
        if steps * batch_size > images:
            raise UsageError(f"--steps {steps} x --batch-size {batch_size} is more than {name} ({images} images): "
                             f"a timed window of the trainer pipeline must fit in one pass")


def trainer_config(case: Case, data_dir: Path, output_dir: Path) -> TrainConfig:
    """The trainer's config for one case: the recipe, with just enough data on the device for the windows."""
    base = from_dict(read_yaml(case.recipe), source=case.recipe) if case.recipe else TrainConfig()
    batch, trainer_pipeline = case.batch_size, case.pipeline == "trainer"
    # the trainer pipeline reads a new batch every step; the model pipeline reuses one
    train_batches = case.warmup + case.steps * case.repeats if trainer_pipeline and case.mode == "train" else 1
    # an inference window of the trainer pipeline is one evaluation: `steps` batches (plan checks they fit)
    eval_batches = case.steps if trainer_pipeline and case.mode == "infer" else 1
    overrides = {
        "device": case.device, "precision": case.precision, "channels_last": str(case.channels_last).lower(),
        "compile": case.compile, "image_size": case.image_size, "batch_size": batch, "eval_batch_size": batch,
        # whole batches only: the windows may run on into the next epoch, and a short last batch in one would
        # change the shapes (cuDNN autotuning, recompilation) and the images a window is counted for
        "train_samples": min(train_batches, MNIST_TRAIN_IMAGES // batch) * batch,
        "eval_samples": min(eval_batches * batch, MNIST_TEST_IMAGES),
        "data_dir": str(data_dir), "download": False, "output_dir": str(output_dir), "resume": "",
        "max_steps": 0, "checkpoint_every_steps": 0,
    }
    return from_dict(overrides, source=PROG, base=base)


def data_for(case: Case, scratch: Path) -> tuple[Path, str]:
    """(folder holding MNIST/raw/, "mnist" or "synthetic")."""
    root = resolve_data_dir()
    if mnist_present(root):
        return root, "mnist"
    if case.pipeline == "trainer":
        require_mnist_for_trainer(root)
    config = trainer_config(case, root, scratch)
    return write_synthetic_mnist(scratch / "data", config.train_samples, config.eval_samples), "synthetic"


def write_synthetic_mnist(root: Path, train_images: int, test_images: int) -> Path:
    """Random uint8 images in MNIST's own file format under root/MNIST/raw/, so the model pipeline runs the real
    Trainer where MNIST is absent (the timing of a fixed batch does not depend on its pixels)."""
    generator = torch.Generator().manual_seed(0)
    for train, count in ((True, train_images), (False, test_images)):
        images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
        write_idx(root, train, images, torch.randint(0, 10, (count,), generator=generator))
    return root


def require_mnist_for_trainer(root: Path) -> None:
    require_mnist(root, reader="--pipeline trainer", alternative=", or use --pipeline model (synthetic images)")
