"""Train AlexNet on MNIST with Hugging Face Accelerate: CPU, MPS, one GPU, or many processes with DDP.

    accelerate launch toolkit/train.py [--config configs/quick.yaml] [--epochs 2 --batch-size 128 ...]
    python -m toolkit.train ...            (one process, no launcher)
    toolkit-train ...                      (the installed command)

Config precedence, lowest to highest: defaults (the recommended recipe) < `--config` file < flags.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (`accelerate launch toolkit/train.py`), Python puts toolkit/ first on sys.path; put the
    # folder that holds the package there instead, so `toolkit.*` imports resolve and nothing is shadowed.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import math
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from toolkit import checkpoint, devices
from toolkit.averaging import WeightAverage
from toolkit.checkpoint import CheckpointError, Progress
from toolkit.config import TrainConfig, parse_args, resume_mismatches, to_yaml
from toolkit.console import TrainConsole
from toolkit.data import EvalBatches, Preprocess, TrainBatches, first, load_mnist, resolve_data_dir
from toolkit.errors import UsageError, exit_on_user_error
from toolkit.metrics import evaluate
from toolkit.model import build_model, count_parameters
from toolkit.stopping import NonFiniteLoss, StopControl
from toolkit.tracking import JsonlSink, TensorBoardSink


class Trainer:
    """The training run: `train()` runs it to the end; `train_epoch` and `train_step` are its parts (the
    benchmark times them). `quiet` keeps the console silent on every process."""

    def __init__(self, config: TrainConfig, quiet: bool = False) -> None:
        self.config = config
        # --- device, precision and processes ---
        self.device_kind = devices.resolve(config.device)
        self.precision, precision_source = devices.resolve_precision(self.device_kind, config.precision)
        self.accelerator = acc = devices.build_accelerator(self.device_kind, self.precision, config.dist_timeout_s)
        self.rank, self.world_size = acc.process_index, acc.num_processes
        devices.configure(self.device_kind, config.deterministic, config.cpu_threads,
                          int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        self.console = TrainConsole(acc.is_main_process and not quiet, config.log_every_steps)
        self.output_dir = self._output_dir()
        self.checkpoints_dir = self.output_dir / "checkpoints"
        if not config.resume and (self.output_dir / "metrics.jsonl").exists():
            raise UsageError(f"{self.output_dir} already holds a run: pass --resume auto to continue it, or "
                             f"choose another --output-dir")

        # --- data: uint8 on the device; the main process reads (or downloads) first ---
        root = resolve_data_dir(config.data_dir)
        with acc.main_process_first():
            train_split = load_mnist(root, train=True, download=config.download)
            eval_split = load_mnist(root, train=False, download=config.download)
        train_split, eval_split = split_for_evaluation(train_split, eval_split, config.validation_samples)
        train_split = first(*train_split, config.train_samples)
        eval_split = first(*eval_split, config.eval_samples)
        channels_last = devices.use_channels_last(self.device_kind, config.channels_last)
        preprocess = Preprocess(config.image_size, config.normalize, config.shift_px, channels_last)
        self.train_batches = TrainBatches(*(t.to(acc.device) for t in train_split), config.batch_size, preprocess,
                                          config.seed, self.rank, self.world_size)
        self.eval_batches = EvalBatches(*(t.to(acc.device) for t in eval_split), config.eval_batch_size,
                                        preprocess, self.rank, self.world_size)
        if len(self.train_batches) == 0:
            raise UsageError(f"train_samples: {len(train_split[1])} images cannot be split across "
                             f"{self.world_size} processes")

        # --- model, optimizer, schedule: the same initial weights on every process ---
        torch.manual_seed(config.seed)
        model = build_model(config.init, config.dropout)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.parameters = count_parameters(model)
        self.steps_per_epoch = len(self.train_batches)
        optimizer = build_optimizer(model, config, self.device_kind)
        # Not passed to prepare(): Accelerate would step it once per process. It steps once per optimizer step.
        self.scheduler = build_schedule(optimizer, config, self.steps_per_epoch * config.epochs)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.ema = WeightAverage(acc.unwrap_model(self.model), config.ema_decay) if config.ema_decay else None
        set_seed(config.seed + self.rank)  # each process its own dropout and augmentation stream

        # --- state, resume, outputs ---
        self.progress = Progress()
        self.last_saved_step = -1
        self.skipped_steps = 0
        self.resumed_from = self._resume() if config.resume else None
        self.stop = StopControl(self.rank, self.world_size, announce=self.console.print)
        self.session = {"images": 0, "seconds": 0.0, "steps": 0}  # this process, this session, training only
        self.tensorboard = self.jsonl = None
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.write_atomic(self.output_dir / "config.yaml", to_yaml(config))
            # A resumed run drops what a killed attempt logged past its checkpoint (or everything, when no
            # checkpoint was complete), so curves and records continue without repeats.
            self.tensorboard = TensorBoardSink(self.output_dir / "tensorboard",
                                               purge_step=self.progress.step + 1 if config.resume else None)
            self.tensorboard.log_text("config", to_yaml(config))
            self.jsonl = JsonlSink(self.output_dir / "metrics.jsonl", records=self.progress.history)
        facts = self._facts(precision_source)
        self.console.header(facts, config.to_dict())
        if acc.is_main_process:  # now, not when the first save fails an epoch in
            size = checkpoint.expected_bytes(model, config.optimizer, config.momentum, averaged=self.ema is not None)
            warning = checkpoint.disk_warning(self.checkpoints_dir, size, config.keep_last)
            if warning:
                self.console.print(warning)
        if self.tensorboard:
            self.tensorboard.log_text("run", "\n".join(f"{k}: {v}" for k, v in facts.items()))

    # ------------------------------------------------------------------ the loop
    def train(self) -> int:
        """Run to the end (exit status 0), or until a signal (128 + its number, after saving)."""
        config, progress = self.config, self.progress
        while progress.epoch < config.epochs:
            signum = self.train_epoch(progress.epoch)
            if signum:
                self.save_checkpoint()
                self.console.print(f"stopped at step {progress.step}; resume with --resume auto "
                                   f"--output-dir {self.output_dir}")
                return 128 + signum
            if self._reached_max_steps() and progress.batch < self.steps_per_epoch:
                self.evaluate_and_record(epoch_done=False)
                self.save_checkpoint()
                break
            self.evaluate_and_record(epoch_done=True)
            self.save_checkpoint()
            signum = self.stop.agree()
            if signum:
                return 128 + signum
            if self._reached_max_steps():
                break
        self.console.ranks(self._rank_rows())
        best = max(progress.history, key=lambda r: r["eval_accuracy"], default=None)
        if best:
            self.console.print(f"best eval accuracy {best['eval_accuracy']:.2%} (epoch {best['epoch']}); "
                               f"run folder {self.output_dir}")
        self.accelerator.wait_for_everyone()
        return 0

    def train_epoch(self, epoch: int, until_step: int = 0) -> int | None:
        """Train from the saved position to the end of `epoch`, or to global step `until_step` (else
        `max_steps`) if that comes first. Returns the signal number if one arrived."""
        config, progress = self.config, self.progress
        until_step = until_step or config.max_steps
        self.console.epoch_started(epoch, config.epochs, self.steps_per_epoch, progress.batch)
        self.model.train()
        devices.synchronize(self.accelerator.device)
        started = time.perf_counter()
        saving_seconds = 0.0
        epoch_images = local_images = local_steps = 0
        signum = None
        for images, labels in self.train_batches.epoch(epoch, start_batch=progress.batch):
            signum, loss_sum, count = self.train_step(images, labels)
            progress.step += 1
            progress.batch += 1
            progress.epoch_loss_sum += loss_sum
            progress.epoch_images += count
            epoch_images += count
            local_images += len(labels)
            local_steps += 1

            # --- report: the live bar every step, the logs every log_every_steps ---
            at_log_step = progress.step % config.log_every_steps == 0
            rate = epoch_images / (time.perf_counter() - started - saving_seconds) if at_log_step else None
            self.console.step(progress.batch, loss_sum / count, rate)
            if at_log_step and self.tensorboard:
                self.tensorboard.log({"train/loss": loss_sum / count, "train/lr": self.scheduler.get_last_lr()[0],
                                      "perf/images_per_sec": rate}, progress.step)
            if signum or (until_step and progress.step >= until_step):
                break
            if config.checkpoint_every_steps and progress.step % config.checkpoint_every_steps == 0:
                saving_started = time.perf_counter()
                self.save_checkpoint()
                saving_seconds += time.perf_counter() - saving_started
        devices.synchronize(self.accelerator.device)
        seconds = time.perf_counter() - started - saving_seconds
        self.session["images"] += local_images
        self.session["seconds"] += seconds
        self.session["steps"] += local_steps
        self.epoch_rate = self._global_rate(local_images, seconds)
        self.epoch_seconds = seconds
        return signum

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[int | None, float, int]:
        """One optimizer step on this process's batch. Returns, agreed by all processes: the signal any of
        them received (or None), and the step's loss summed over all processes' images, and their count."""
        loss = self.forward_backward(images, labels)
        loss_value = loss.item()  # CPU-GPU sync: the finiteness check must precede the optimizer step
        bad_ranks, signum, loss_sum, count = self.stop.agree_step(math.isfinite(loss_value),
                                                                  loss_value * len(labels), len(labels))
        if bad_ranks:
            raise NonFiniteLoss(f"loss is not finite at step {self.progress.step + 1} (rank "
                                f"{', '.join(map(str, bad_ranks))}): stopped before the optimizer step; the "
                                f"last checkpoint in {self.checkpoints_dir} holds finite weights")
        self.optimizer_step()
        return signum, loss_sum, count

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)  # (B, 10); autocast to `precision` by Accelerate, outputs in fp32
        loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
        self.accelerator.backward(loss)  # DDP averages the gradients across processes here
        return loss.detach()

    def optimizer_step(self) -> None:
        if self.config.grad_clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        if self.optimizer.step_was_skipped:  # fp16: the gradient scaler found inf/NaN gradients
            self.skipped_steps += 1
            if self.tensorboard:
                self.tensorboard.log({"train/skipped_steps": self.skipped_steps}, self.progress.step + 1)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.accelerator.unwrap_model(self.model), self.progress.step + 1)

    def evaluate_and_record(self, epoch_done: bool) -> None:
        """Evaluate on the whole test set (exact across processes), log, and close the epoch if done."""
        progress = self.progress
        result = evaluate(self.evaluated_model(), self.eval_batches, self.accelerator,
                          expected_count=self.eval_batches.total)
        record = {"epoch": progress.epoch + 1, "step": progress.step,
                  "train_loss": progress.epoch_loss_sum / max(progress.epoch_images, 1),
                  "eval_loss": result.loss, "eval_accuracy": result.accuracy, "eval_correct": result.correct,
                  "eval_count": result.count, "lr": self.scheduler.get_last_lr()[0],
                  "epoch_s": self.epoch_seconds, "images_per_sec": self.epoch_rate,
                  "global_batch_size": self.config.batch_size * self.world_size, "complete": epoch_done,
                  "eval_weights": "average" if self.ema else "trained",
                  "eval_split": "validation" if self.config.validation_samples else "test"}
        progress.history.append(record)
        if result.accuracy > progress.best_accuracy:
            progress.best_accuracy, progress.best_step = result.accuracy, progress.step
        if self.tensorboard:
            self.tensorboard.log({"eval/loss": result.loss, "eval/accuracy": result.accuracy,
                                  "train/epoch_loss": record["train_loss"],
                                  "perf/epoch_images_per_sec": self.epoch_rate}, progress.step)
            self.jsonl.log({k: v for k, v in record.items() if k != "step"}, progress.step)
        if epoch_done:
            progress.epoch += 1
            progress.batch = 0
            progress.epoch_loss_sum, progress.epoch_images = 0.0, 0
        self.console.epoch_finished(record)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Every process contributes its random state; the main process writes; all wait for it."""
        if self.progress.step == self.last_saved_step:
            return
        rng = gather_object([{"python": random.getstate(), "torch": devices.rng_state(self.accelerator.device)}])
        if self.accelerator.is_main_process:
            if self.tensorboard:
                # on disk before the checkpoint: a resume purges what comes after it, and must find all before it
                self.tensorboard.flush()
            scaler = self.accelerator.scaler
            trained = self.accelerator.unwrap_model(self.model).state_dict()
            checkpoint.save(
                self.checkpoints_dir,
                weights=self.evaluated_model().state_dict(),  # what evaluation saw: for use and export
                train_weights=trained if self.ema else None,  # where training goes on from, when they differ
                trainer_state={"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                               "scaler": scaler.state_dict() if scaler else None, "rng": rng,
                               "ema_updates": self.ema.updates if self.ema else 0},
                progress=self.progress, config=self.config.to_dict(),
                meta={"world_size": self.world_size, "device": self.device_kind, "precision": self.precision})
            best = checkpoint.step_dir(self.checkpoints_dir, self.progress.best_step)
            checkpoint.prune(self.checkpoints_dir, self.config.keep_last, keep=best)
        self.last_saved_step = self.progress.step
        self.accelerator.wait_for_everyone()

    def _resume(self) -> Path | None:
        """Load the checkpoint named by `resume` (auto: the newest complete one that loads) on every process."""
        config, acc = self.config, self.accelerator
        chosen: list[Any] = [None]
        if acc.is_main_process:
            chosen[0] = self._pick_checkpoint()
        broadcast_object_list(chosen)
        if chosen[0] is None:
            return None
        loaded = checkpoint.load(Path(chosen[0]))
        mismatches = resume_mismatches(loaded.config, config)
        if loaded.meta.get("precision") != self.precision:
            mismatches.append(f"precision: checkpoint {loaded.meta.get('precision')!r}, this run {self.precision!r}")
        if mismatches:
            raise UsageError(f"cannot resume from {loaded.path}: the config differs ({'; '.join(mismatches)}); "
                             f"use the same values or start a new --output-dir")
        same_world = loaded.meta.get("world_size") == self.world_size
        if not same_world and loaded.progress.batch > 0:
            raise UsageError(f"cannot resume {loaded.path} with {self.world_size} processes: it stopped mid-epoch "
                             f"with {loaded.meta.get('world_size')}; use that many, or an end-of-epoch checkpoint")
        state = loaded.trainer_state
        model = acc.unwrap_model(self.model)
        if self.ema:
            checkpoint.load_weights_into(self.ema.module, loaded.weights, loaded.path / checkpoint.WEIGHTS)
            checkpoint.load_weights_into(model, loaded.train_weights, loaded.path / checkpoint.TRAIN_WEIGHTS)
            self.ema.updates = state["ema_updates"]
        else:
            checkpoint.load_weights_into(model, loaded.weights, loaded.path / checkpoint.WEIGHTS)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        if same_world and loaded.meta.get("device") == self.device_kind:
            rng = state["rng"][self.rank]
            random.setstate(rng["python"])
            devices.set_rng_state(acc.device, rng["torch"])
        else:
            self.console.print(f"note: {loaded.path} was saved by {loaded.meta.get('world_size')} process(es) on "
                               f"{loaded.meta.get('device')}; random state re-seeded for this run's processes")
        self.progress = loaded.progress
        self.last_saved_step = self.progress.step
        return loaded.path

    def evaluated_model(self) -> torch.nn.Module:
        """The weights evaluated and saved: their moving average if enabled, else the trained ones (never the
        DDP wrapper: evaluation runs no collectives)."""
        return self.ema.module if self.ema else self.accelerator.unwrap_model(self.model)

    def _pick_checkpoint(self) -> str | None:
        config = self.config
        if config.resume != "auto":
            path = Path(config.resume)
            checkpoint.load(path)  # raises CheckpointError naming the file
            return str(path)
        for path in checkpoint.latest(self.checkpoints_dir):
            try:
                checkpoint.load(path)
                return str(path)
            except CheckpointError as error:
                self.console.print(f"warning: {error}; trying the previous checkpoint")
        self.console.print(f"no complete checkpoint in {self.checkpoints_dir}: starting from scratch")
        return None

    # ------------------------------------------------------------------ helpers
    def _output_dir(self) -> Path:
        if self.config.output_dir:
            return Path(self.config.output_dir)
        if self.config.resume == "auto":
            raise UsageError("--resume auto needs --output-dir: the run folder to continue")
        name = [f"runs/{datetime.now():%Y%m%d-%H%M%S}"]
        broadcast_object_list(name)  # the main process's clock names the folder for all
        return Path(name[0])

    def _reached_max_steps(self) -> bool:
        return bool(self.config.max_steps) and self.progress.step >= self.config.max_steps

    def _global_rate(self, images: int, seconds: float) -> float:
        """All processes' images over the slowest process's time."""
        both = self.accelerator.gather(torch.tensor([[float(images), seconds]], device=self.accelerator.device))
        return float(both[:, 0].sum() / both[:, 1].max().clamp(min=1e-9))

    def _rank_rows(self) -> list[dict[str, Any]]:
        mine = torch.tensor([[self.session["images"], self.session["seconds"], self.session["steps"]]],
                            dtype=torch.float64 if self.accelerator.device.type != "mps" else torch.float32,
                            device=self.accelerator.device)
        rows = self.accelerator.gather(mine).cpu().tolist()
        return [{"rank": rank, "images": int(images), "seconds": seconds,
                 "images_per_sec": images / max(seconds, 1e-9), "step_ms": 1000 * seconds / max(steps, 1)}
                for rank, (images, seconds, steps) in enumerate(rows)]

    def _facts(self, precision_source: str) -> dict[str, Any]:
        acc = self.accelerator
        facts = {
            "device": f"{self.device_kind} ({devices.name(acc.device)})",
            "precision": f"{self.precision} ({precision_source})",
            "processes": f"{self.world_size} ({acc.distributed_type.value})",
            "global batch": f"{self.config.batch_size * self.world_size} "
                            f"({self.config.batch_size} x {self.world_size})",
            "parameters": f"{self.parameters:,}",
            "steps/epoch": self.steps_per_epoch,
            "evaluated on": (f"the last {self.eval_batches.total:,} training images (held out)"
                             if self.config.validation_samples else f"{self.eval_batches.total:,} test images"),
            "run folder": str(self.output_dir),
        }
        if self.resumed_from:
            facts["resumed"] = f"{self.resumed_from} (step {self.progress.step})"
        return facts

    def close(self) -> None:
        for sink in (self.tensorboard, self.jsonl):
            if sink:
                sink.close()
        self.console.close()
        if hasattr(self, "stop"):
            self.stop.close()
        self.accelerator.end_training()


def split_for_evaluation(train_split: tuple[torch.Tensor, torch.Tensor], test_split: tuple[torch.Tensor, torch.Tensor],
                         validation_samples: int) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                           tuple[torch.Tensor, torch.Tensor]]:
    """(training images, evaluation images): the test set, or with `validation_samples` the last N training images,
    held out from training."""
    if not validation_samples:
        return train_split, test_split
    images, labels = train_split
    if validation_samples >= len(labels):
        raise UsageError(f"validation_samples: {validation_samples} would leave no training images "
                         f"(the training set has {len(labels)})")
    return (images[:-validation_samples], labels[:-validation_samples]), \
        (images[-validation_samples:], labels[-validation_samples:])


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: str) -> torch.optim.Optimizer:
    fused = devices.has_fused_optimizers(device)  # one kernel over all parameters instead of one per tensor
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


def main(argv: list[str] | None = None) -> int:
    with exit_on_user_error("toolkit.train"):
        config = parse_args(argv)
        trainer = Trainer(config)
        try:
            return trainer.train()
        finally:
            trainer.close()


if __name__ == "__main__":
    sys.exit(main())
