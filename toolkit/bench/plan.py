"""The cases a command asks for, in the order they run, how long they should take, and the trainer config each one
runs under."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit import devices
from toolkit.config import TrainConfig, from_dict, read_yaml
from toolkit.data import mnist_present, require_mnist, resolve_data_dir
from toolkit.errors import UsageError

PROG = "toolkit.bench"
MODES = ("train", "infer")
PIPELINES = ("model", "trainer")
MNIST_TRAIN_IMAGES = 60_000
MNIST_TEST_IMAGES = 10_000


@dataclass(frozen=True)
class Windows:
    """How much a case measures: untimed warm-up steps, then timed windows of `steps` steps, `repeats` of them;
    with a `budget_s`, windows go on until they add up to that many seconds (`repeats` is then the least)."""

    batch_size: int
    warmup: int
    steps: int
    repeats: int
    budget_s: float = 0.0


# The default is a quick answer: windows sized by the time they take (a case's timed windows add up to about
# `budget_s`); on the CPU a batch a 2-core machine steps through in about half a second at 224 px, one step a
# window (a step there is a million times the clock's cost). `--full` is the long, fixed measurement.
QUICK = {"cpu": Windows(batch_size=32, warmup=1, steps=1, repeats=3, budget_s=6.0),
         "cuda": Windows(batch_size=TrainConfig.batch_size, warmup=5, steps=10, repeats=5, budget_s=2.0),
         "mps": Windows(batch_size=TrainConfig.batch_size, warmup=3, steps=5, repeats=5, budget_s=3.0)}
FULL = Windows(batch_size=TrainConfig.batch_size, warmup=5, steps=10, repeats=5)
# Seconds a worker process takes before its first step (imports, MNIST, building the trainer; CUDA's start-up):
# what the estimate adds per process. Measured on a quiet 2-core CPU; a busy one takes up to twice as long.
START_S = {"cpu": 10.0, "cuda": 15.0, "mps": 10.0}


@dataclass(frozen=True)
class Case:
    """One configuration, measured in one go; everything resolved (no `auto`). Its pipeline `both` is the trainer
    pipeline timed in windows paired with the model-only step's, reported as a row for each."""

    device: str  # cpu | cuda | mps
    mode: str  # train | infer
    pipeline: str  # model | trainer | both
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
    budget_s: float = 0.0  # timed windows go on until they add up to this (0: exactly `repeats`)
    compile_mode: str = "default"  # torch.compile's mode, with `compile`

    def label(self) -> str:
        pipeline = "trainer paired with model" if self.pipeline == "both" else self.pipeline
        return (f"{self.device} {self.mode} {pipeline} batch {self.batch_size} {self.precision}"
                f"{' channels_last' if self.channels_last else ''}{self.compiled()}"
                f" {self.image_size}px")

    def compiled(self) -> str:
        if not self.compile:
            return ""
        return " compiled" + (f" ({self.compile_mode})" if self.compile_mode != "default" else "")

    def pipelines(self) -> tuple[str, ...]:
        """The rows it makes, one per pipeline."""
        return PIPELINES if self.pipeline == "both" else (self.pipeline,)

    def paired(self) -> bool:
        """Whether the trainer pipeline runs, its windows paired with the model-only step's."""
        return self.pipeline != "model"


def windows_for(args: argparse.Namespace, device: str) -> Windows:
    """The windows of `device`'s cases: the quick or the full defaults, and the flags given over them. A budget
    only where the number of windows is not given."""
    base = FULL if args.full else QUICK[device]
    if args.device == "all" and not args.full:  # the devices side by side: at one batch size
        base = Windows(TrainConfig.batch_size, base.warmup, base.steps, base.repeats, base.budget_s)
    return Windows(batch_size=base.batch_size, warmup=base.warmup if args.warmup is None else args.warmup,
                   steps=base.steps if args.steps is None else args.steps,
                   repeats=base.repeats if args.repeats is None else args.repeats,
                   budget_s=base.budget_s if args.repeats is None else 0.0)


def plan(args: argparse.Namespace, announce: Callable[[str], None]) -> tuple[list[str], list[Case]]:
    """The devices and the cases to run, in order; a UsageError for anything that cannot run. `args` are the
    parsed flags (lists and numbers already checked by the parser)."""
    device_list = devices.available() if args.device == "all" else [devices.resolve(args.device)]
    modes = list(MODES) if args.mode == "both" else [args.mode]
    if args.config:  # a missing or broken file, or a bad key or value in it, is one line now, not an error row
        from_dict(read_yaml(args.config), source=args.config)

    cases = []
    for device in device_list:
        if args.compile and not compiles(device, skip=args.device == "all", announce=announce):
            continue
        windows = windows_for(args, device)
        batch_sizes = sorted(set(args.batch_size or [windows.batch_size]))  # small first: an OOM comes last
        check_windows_fit(modes, args.pipeline != "model", windows.steps, max(batch_sizes))
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
        for (precision, wanted), mode, batch_size in itertools.product(precisions, modes, batch_sizes):
            cases.append(Case(device=device, mode=mode, pipeline=args.pipeline, batch_size=batch_size,
                              precision=precision, channels_last=channels_last, compile=args.compile,
                              image_size=args.image_size, warmup=windows.warmup, steps=windows.steps,
                              repeats=windows.repeats, recipe=args.config, requested_precision=wanted,
                              budget_s=windows.budget_s, compile_mode=getattr(args, "compile_mode", "default")))
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
    batch, trainer_pipeline = case.batch_size, case.paired()
    # the trainer pipeline reads a new batch every step (on into the next epoch where it needs more: a budget
    # sets no number of windows); the model pipeline reuses one
    train_batches = case.warmup + case.steps * case.repeats if trainer_pipeline and case.mode == "train" else 1
    # an inference window of the trainer pipeline is one evaluation: `steps` batches (plan checks they fit)
    eval_batches = case.steps if trainer_pipeline and case.mode == "infer" else 1
    overrides = {
        "device": case.device, "precision": case.precision, "channels_last": str(case.channels_last).lower(),
        "compile": case.compile, "compile_mode": case.compile_mode, "image_size": case.image_size,
        "batch_size": batch, "eval_batch_size": batch,
        # whole batches only: the windows may run on into the next epoch, and a short last batch in one would
        # change the shapes (cuDNN autotuning, recompilation) and the images a window is counted for
        "train_samples": min(train_batches, MNIST_TRAIN_IMAGES // batch) * batch,
        "eval_samples": min(eval_batches * batch, MNIST_TEST_IMAGES),
        "data_dir": str(data_dir), "download": False, "output_dir": str(output_dir), "resume": "",
        "max_steps": 0, "checkpoint_every_steps": 0,
    }
    return from_dict(overrides, source=PROG, base=base)


def data_for(case: Case, scratch: Path) -> tuple[Path, Any, str]:
    """(the folder holding MNIST/raw/, the images to train on instead (None: MNIST), "mnist" or "synthetic")."""
    root = resolve_data_dir()
    if mnist_present(root):
        return root, None, "mnist"
    if case.paired():
        require_mnist_for_trainer(root)
    config = trainer_config(case, root, scratch)
    return root, synthetic_splits(config.train_samples, config.eval_samples), "synthetic"


def synthetic_splits(train_images: int, test_images: int) -> tuple[Any, Any]:
    """Random uint8 images and labels, a training and a test split, handed to the trainer in place of MNIST where
    it is absent: the model pipeline's timing of a fixed batch does not depend on its pixels."""
    generator = torch.Generator().manual_seed(0)
    return tuple((torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator),
                  torch.randint(0, 10, (count,), generator=generator)) for count in (train_images, test_images))


def require_mnist_for_trainer(root: Path) -> None:
    require_mnist(root, reader="--pipeline trainer", alternative=", or use --pipeline model (synthetic images)")
