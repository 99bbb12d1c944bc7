"""The parts of a run, built once from its config, in the order they depend on each other:

- `runtime`: where it runs: the device, the precision, the accelerator and its processes, the process-wide
  switches (threads, determinism);
- `read_data` and `batches`: MNIST (or the tensors a benchmark hands in) on the device, split for evaluation, in
  batches per process;
- `training`: the network (whose weights checkpoints hold), the form training calls (DDP-wrapped, compiled), the
  optimizer, the learning-rate schedule and the weight average.

`toolkit.train` assembles all of them for a run; evaluate, predict and export take the runtime; the benchmark
takes everything, with synthetic images where MNIST is absent.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from toolkit import devices
from toolkit.agreement import decided_on_main, main_first, peers
from toolkit.averaging import WeightAverage
from toolkit.config import TrainConfig
from toolkit.data import EvalBatches, Preprocess, TrainBatches, download_mnist, first, load_mnist, resolve_data_dir
from toolkit.errors import UsageError
from toolkit.model import build_model

Split = tuple[torch.Tensor, torch.Tensor]  # uint8 images (N, 28, 28), int64 labels (N,)


# ------------------------------------------------------------------ where it runs
@dataclass(frozen=True)
class Runtime:
    accelerator: Accelerator
    device: str  # cpu | cuda | mps
    precision: str  # no | fp16 | bf16
    precision_source: str  # why: "config", "accelerate launch", "auto for cpu", a checkpoint's...
    notes: tuple[str, ...] = ()  # what set-up changed and must say (threads lowered, a precision replaced)
    peers: tuple[tuple[str, int], ...] = ()  # (host, pid) of every process, by rank: who died, if one does

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def torch_device(self) -> torch.device:
        return self.accelerator.device


def local_processes() -> int:
    """The processes of this run on this machine (a launcher says how many; one without)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def runtime(config: TrainConfig, precision: tuple[str, str] | None = None, note: str = "") -> Runtime:
    """The device `config.device` resolves to, in `precision` ((precision, where it came from); by default the
    config's, resolved for the device), with the accelerator and the process-wide switches set up."""
    device = devices.resolve(config.device)
    chosen, source = precision or devices.resolve_precision(device, config.precision)
    if config.compile:
        devices.check_compile(device)
    accelerator = devices.build_accelerator(device, chosen, config.dist_timeout_s)
    notes = devices.configure(device, config.deterministic, config.cpu_threads, local_processes(), tf32=config.tf32)
    return Runtime(accelerator=accelerator, device=device, precision=chosen, precision_source=source,
                   notes=tuple([note] if note else []) + tuple(notes), peers=peers())


# ------------------------------------------------------------------ the data
@dataclass(frozen=True)
class Data:
    train: TrainBatches
    eval: EvalBatches
    description: str  # what evaluation is on, for the header
    source: str  # where the images came from: the MNIST folder read, or what was handed in
    available: int  # training images there were to take `train_samples` from

    @property
    def train_images(self) -> int:
        return len(self.train.labels)


def read_data(config: TrainConfig, run: Runtime) -> tuple[Split, Split, str]:
    """MNIST's training and test splits, on the CPU, and the folder read. Only the main process downloads (all
    machines may share the data folder), then each machine's first process reads and checks the files before the
    others on it do; a failure any process meets stops them all."""
    root = resolve_data_dir(config.data_dir)
    if config.download:
        decided_on_main(lambda: download_mnist(root), run.is_main)
    train, test = main_first(run.accelerator, lambda: (load_mnist(root, train=True, download=False),
                                                       load_mnist(root, train=False, download=False)))
    return train, test, str(root.resolve() / "MNIST" / "raw")


def split_for_evaluation(train: Split, test: Split, validation_samples: int) -> tuple[Split, Split]:
    """(training images, evaluation images): the test set, or with `validation_samples` the last N training images,
    held out from training."""
    if not validation_samples:
        return train, test
    images, labels = train
    if validation_samples >= len(labels):
        raise UsageError(f"validation_samples: {validation_samples} would leave no training images "
                         f"(the training set has {len(labels)})")
    return (images[:-validation_samples], labels[:-validation_samples]), \
        (images[-validation_samples:], labels[-validation_samples:])


def batches(config: TrainConfig, run: Runtime, train: Split, test: Split, source: str) -> Data:
    """The batches of each process, on the device: training (this process's shard of each epoch, in a seeded
    order) and evaluation (its contiguous slice of the set)."""
    train, evaluated = split_for_evaluation(train, test, config.validation_samples)
    held_out, available = len(evaluated[1]), len(train[1])
    train, evaluated = first(*train, config.train_samples), first(*evaluated, config.eval_samples)
    preprocess = Preprocess.for_config(config, run.device)
    on = run.torch_device
    train_batches = TrainBatches(train[0].to(on), train[1].to(on), config.batch_size, preprocess, config.seed,
                                 run.rank, run.world_size)
    eval_batches = EvalBatches(evaluated[0].to(on), evaluated[1].to(on), config.eval_batch_size, preprocess,
                               run.rank, run.world_size)
    if len(train_batches) == 0:
        raise UsageError(f"train_samples: {len(train[1])} images cannot be split across {run.world_size} processes")
    count = len(evaluated[1])
    if config.validation_samples:
        whose = f"of the last {held_out:,} training images (held out)"
        description = (f"the first {count:,} {whose}" if count < held_out else f"the last {count:,} training images "
                       f"(held out)")
    else:
        description = f"{count:,} test images"
    return Data(train=train_batches, eval=eval_batches, description=description, source=source, available=available)


# ------------------------------------------------------------------ what trains
@dataclass
class Training:
    network: nn.Module  # the module itself: checkpoints hold its weights, never a wrapper's (no "module." prefix)
    model: nn.Module  # what training calls: DDP-wrapped under several processes, compiled with `compile`
    optimizer: torch.optim.Optimizer  # Accelerate's wrapper of it
    schedule: torch.optim.lr_scheduler.LambdaLR
    average: WeightAverage | None  # the weights evaluated and saved, when `ema_decay` is set
    steps_per_epoch: int  # optimizer steps: grad_accum_steps batches each, the epoch's last maybe fewer
    total_steps: int
    skip_on_device: bool  # a non-finite step is skipped by the optimizer's kernel, on the device


def training(config: TrainConfig, run: Runtime, data: Data) -> Training:
    """The network with the same initial weights on every process, and what trains it."""
    steps_per_epoch = -(-len(data.train) // config.grad_accum_steps)
    total_steps = steps_per_epoch * config.epochs
    torch.manual_seed(config.seed)
    network = build_model(config.init, config.dropout)
    if devices.use_channels_last(run.device, config.channels_last):
        network = network.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(network, config, run.device, run.precision)
    # Not passed to prepare(): Accelerate would step it once per process. It steps once per optimizer step.
    schedule = build_schedule(optimizer, config, total_steps)
    wrapped, optimizer = run.accelerator.prepare(network, optimizer)
    # compiled around the DDP wrapper, whose hooks it then keeps (DDPOptimizer)
    model = torch.compile(wrapped, mode=config.compile_mode) if config.compile else wrapped
    # A fused optimizer skips an update on the device when told the loss was not finite (where its kernel reads
    # the flag: not on MPS, see devices.honours_found_inf); under fp16 the gradient scaler does that itself.
    skip_on_device = devices.honours_found_inf(run.device, config.optimizer, run.precision) \
        and run.accelerator.scaler is None
    average = WeightAverage(network, config.ema_decay) if config.ema_decay else None
    set_seed(config.seed + run.rank)  # each process its own dropout and augmentation stream
    return Training(network=network, model=model, optimizer=optimizer, schedule=schedule, average=average,
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps, skip_on_device=skip_on_device)


def build_optimizer(model: nn.Module, config: TrainConfig, device: str, precision: str = "no") -> torch.optim.Optimizer:
    # one kernel over all parameters instead of one per tensor, where it is right for this device and precision
    fused = devices.has_fused_optimizers(device, config.optimizer, precision)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay,
                           fused=fused)


def build_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then constant, cosine or linear decay to zero at `total_steps`."""
    warmup = min(config.warmup_steps, total_steps)

    def factor(step: int) -> float:  # step = optimizer steps done; the factor applies to the next one
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if config.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if config.lr_schedule == "linear":
            return 1 - progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------ all of them
@dataclass
class Parts:
    config: TrainConfig
    runtime: Runtime
    data: Data
    training: Training

    @property
    def images_per_step(self) -> int:
        """Images in one process's micro-batch, as the data has them: a batch size beyond a process's share of
        the data takes all of it."""
        return min(self.config.batch_size, self.data.train.images_per_rank)

    @property
    def global_batch_size(self) -> int:
        """Images in one optimizer step across all processes (the epoch's last step may have fewer)."""
        accumulated = min(self.config.grad_accum_steps, len(self.data.train))
        return self.images_per_step * self.runtime.world_size * accumulated


def assemble(config: TrainConfig, run: Runtime, splits: tuple[Split, Split] | None = None,
             source: str = "") -> Parts:
    """Every part of a training run on `run`: MNIST read as `read_data` does, or `splits` (training and test
    images) handed in, as a benchmark does."""
    if splits is None:
        train, test, source = read_data(config, run)
    else:
        train, test = splits
    data = batches(config, run, train, test, source or "images handed in")
    return Parts(config=config, runtime=run, data=data, training=training(config, run, data))
