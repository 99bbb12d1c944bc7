"""Train AlexNet on MNIST with Hugging Face Accelerate: CPU, MPS, one GPU, or many processes with DDP.

    accelerate launch toolkit/train.py [--config configs/quick.yaml] [--epochs 2 --batch-size 128 ...]
    accelerate launch -m toolkit.train ...  (the same)
    python -m toolkit.train ...            (one process, no launcher)
    toolkit-train ...                      (the installed command)

Config precedence, lowest to highest: defaults (the recommended recipe) < `--config` file < flags.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from toolkit import checkpoint, devices, rundir
from toolkit.averaging import WeightAverage
from toolkit.checkpoint import Checkpoint, TrainProgress
from toolkit.config import TrainConfig, parse_args, resume_mismatches, to_yaml
from toolkit.console import TrainConsole
from toolkit.data import EvalBatches, Preprocess, TrainBatches, first, load_mnist, resolve_data_dir
from toolkit.errors import UsageError, exit_on_user_error
from toolkit.files import write_atomic
from toolkit.metrics import EvalResult, evaluate
from toolkit.model import build_model, count_parameters
from toolkit.stopping import NonFiniteLoss, StopControl, first_signal
from toolkit.tally import StepTally
from toolkit.tracking import JsonlSink, TensorBoardSink


class Trainer:
    """The training run: `train()` runs it to the end. Its state is one symmetric pair, `state_dict()` and
    `load_state_dict()`, which checkpoints save and resume. Benchmarks drive it through `train_steps`,
    `train_step`, `example_batch`, `evaluate` and `infer`. `quiet` keeps the console silent on every process."""

    def __init__(self, config: TrainConfig, quiet: bool = False) -> None:
        self.config = config
        # --- device, precision and processes ---
        self.device_kind = devices.resolve(config.device)
        self.precision, precision_source = devices.resolve_precision(self.device_kind, config.precision)
        if config.compile:
            devices.check_compile(self.device_kind)
        self.accelerator = acc = devices.build_accelerator(self.device_kind, self.precision, config.dist_timeout_s)
        self.rank, self.world_size = acc.process_index, acc.num_processes
        devices.configure(self.device_kind, config.deterministic, config.cpu_threads,
                          int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        self.console = TrainConsole(acc.is_main_process and not quiet)
        # The run folder is this run's alone from here (rundir): a refusal comes before anything is written.
        self.run_folder = rundir.claim(config.output_dir, config.resume, acc.is_main_process, self.console.print)
        self.output_dir = self.run_folder.path
        self.checkpoints_dir = self.output_dir / "checkpoints"

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
        self.steps_per_epoch = len(self.train_batches)

        # --- model, optimizer, schedule: the same initial weights on every process ---
        torch.manual_seed(config.seed)
        # `network` is the module itself: its weights are what checkpoints hold, never a wrapper's (no "module."
        # or "_orig_mod." prefixes); `model` is what training calls (DDP-wrapped under several processes).
        self.network = build_model(config.init, config.dropout)
        if channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.parameters = count_parameters(self.network)
        optimizer = build_optimizer(self.network, config, self.device_kind, self.precision)
        # Not passed to prepare(): Accelerate would step it once per process. It steps once per optimizer step.
        self.scheduler = build_schedule(optimizer, config, self.steps_per_epoch * config.epochs)
        self.model, self.optimizer = acc.prepare(self.network, optimizer)
        if config.compile:  # around the DDP wrapper, whose hooks it then keeps (DDPOptimizer)
            self.model = torch.compile(self.model)
        # A fused optimizer skips an update on the device when told the loss was not finite; under fp16 the
        # gradient scaler does that itself (and sets the flag for each step).
        self._skip_on_device = getattr(optimizer, "_step_supports_amp_scaling", False) and acc.scaler is None
        self.ema = WeightAverage(self.network, config.ema_decay) if config.ema_decay else None
        set_seed(config.seed + self.rank)  # each process its own dropout and augmentation stream

        # --- state: what checkpoints hold, and this session's counters ---
        self.progress = TrainProgress()
        self.last_saved_step = -1
        self.epoch_seconds = 0.0  # training time of the last epoch (or part of one), saving excluded
        self.epoch_rate = 0.0  # its images/s over all processes
        self.session = {"images": 0, "seconds": 0.0, "steps": 0}  # this process, this session, training only
        self.agreed_signal: int | None = None  # the stop signal the processes agreed on at a sync point
        self.stop = StopControl(announce=self.console.print)
        self.resumed_from = self._resume() if config.resume else None
        self.tally = StepTally(acc.device, self.progress.step)

        # --- outputs: only the main process writes ---
        self.tensorboard = self.jsonl = None
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.output_dir / "config.yaml", to_yaml(config))
            # A resumed run drops what a killed attempt logged past its checkpoint (or everything, when no
            # checkpoint was complete), so curves and records continue without repeats.
            self.tensorboard = TensorBoardSink(self.output_dir / "tensorboard",
                                               purge_step=self.progress.step + 1 if config.resume else None)
            self.tensorboard.log_text("config", to_yaml(config))
            self.jsonl = JsonlSink(self.output_dir / "metrics.jsonl", records=self.progress.history)
        facts = self._facts(precision_source)
        self.console.header(facts, config.to_dict())
        if acc.is_main_process:  # now, not when the first save fails an epoch in
            size = checkpoint.expected_bytes(self.network, config.optimizer, config.momentum,
                                             averaged=self.ema is not None)
            warning = checkpoint.disk_warning(self.checkpoints_dir, size, config.keep_last)
            if warning:
                self.console.print(warning)
        if self.tensorboard:
            self.tensorboard.log_text("run", "\n".join(f"{k}: {v}" for k, v in facts.items()))

    # ------------------------------------------------------------------ the loop
    def train(self) -> int:
        """Run to the end (exit status 0), or until a signal (128 + its number, after saving)."""
        config, progress = self.config, self.progress
        while progress.epoch < config.epochs and not self._reached_max_steps():
            signum = self.train_epoch()
            epoch_done = progress.batch >= self.steps_per_epoch
            if not signum or epoch_done:  # a signal mid-epoch saves at once; at an epoch's end, after evaluating
                self.evaluate_and_record(epoch_done)
            self.save_checkpoint()
            if signum:
                self.console.print(f"stopped at step {progress.step}; resume with --resume auto "
                                   f"--output-dir {self.output_dir}")
                return 128 + signum
        self.console.ranks(self._rank_rows())
        best = max(progress.history, key=lambda r: r["eval_accuracy"], default=None)
        if best:
            self.console.print(f"best eval accuracy {best['eval_accuracy']:.2%} (epoch {best['epoch']}); "
                               f"run folder {self.output_dir}")
        self.accelerator.wait_for_everyone()
        return 0

    def train_epoch(self) -> int | None:
        """Train from the saved position to the end of the epoch, or to `max_steps` if that comes first, or until
        the processes agree to stop. Returns the signal that stopped it, if one did."""
        config, progress = self.config, self.progress
        self.console.epoch_started(progress.epoch, config.epochs, self.steps_per_epoch, progress.batch)
        self.model.train()
        devices.synchronize(self.accelerator.device)
        started = self._window_started = time.perf_counter()
        saving_seconds = 0.0
        local_images = local_steps = 0
        epoch_images_before = progress.epoch_images
        for images, labels in self.train_batches.epoch(progress.epoch, start_batch=progress.batch):
            self._step(images, labels)
            local_images += len(labels)
            local_steps += 1
            if self._stop_signal() or self._reached_max_steps():
                break
            if config.checkpoint_every_steps and progress.step % config.checkpoint_every_steps == 0:
                saving_started = time.perf_counter()
                self.save_checkpoint()
                saving_seconds += time.perf_counter() - saving_started
                self._window_started += time.perf_counter() - saving_started
        self._sync()  # the epoch's last loss sums, and a last word on stopping
        seconds = time.perf_counter() - started - saving_seconds
        self.session["images"] += local_images
        self.session["seconds"] += seconds
        self.session["steps"] += local_steps
        self.epoch_seconds = seconds
        self.epoch_rate = (progress.epoch_images - epoch_images_before) / max(self._slowest(seconds), 1e-9)
        return self._stop_signal()

    def train_steps(self, count: int) -> None:
        """Run `count` steps of the loop exactly as `train()` runs them (the data path, the step, the sync points
        at log steps), from the current position and on into the next epoch as needed, without evaluating or
        saving. For benchmarks: the caller times it."""
        self.model.train()
        progress, done = self.progress, 0
        self._window_started = time.perf_counter()
        while done < count:
            if progress.batch >= self.steps_per_epoch:
                progress.epoch, progress.batch = progress.epoch + 1, 0
            for images, labels in self.train_batches.epoch(progress.epoch, start_batch=progress.batch):
                self._step(images, labels)
                done += 1
                if done == count:
                    break

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One step of the loop: the optimizer step, the position, the live bar, and at log steps the logs."""
        self.train_step(images, labels)
        progress = self.progress
        progress.step += 1
        progress.batch += 1
        self.console.advance(progress.batch)
        if progress.step % self.config.log_every_steps == 0:
            self._log()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One optimizer step on this process's batch. It only queues work on the device: the loss is added to
        the tally there, and a non-finite one makes the optimizer skip the update there; both are read at the
        next sync point."""
        loss = self.forward_backward(images, labels)
        not_finite = self.tally.add(loss, len(labels))
        self.optimizer_step(not_finite)

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)  # (B, 10); autocast to `precision` by Accelerate, outputs in fp32
        loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
        self.accelerator.backward(loss)  # DDP averages the gradients across processes here
        return loss.detach()

    def optimizer_step(self, not_finite: torch.Tensor | None = None) -> None:
        if self.config.grad_clip:
            self.accelerator.clip_grad_norm_(self.network.parameters(), self.config.grad_clip)
        if self._skip_on_device and not_finite is not None:
            self.optimizer.optimizer.found_inf = not_finite  # read by the fused kernel: 1.0 skips the update
        scaler = self.accelerator.scaler
        scale = scaler._scale.clone() if scaler is not None else None  # noqa: SLF001 - no sync, unlike get_scale()
        self.optimizer.step()
        if scaler is not None:
            # the scaler lowers its scale exactly when it skips a step for inf/NaN gradients (Accelerate's
            # step_was_skipped is always False with fused optimizers)
            self.tally.add_skipped(scaler._scale < scale)  # noqa: SLF001
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.network, self.progress.step + 1)

    # ------------------------------------------------------------------ sync points
    def _sync(self) -> float | None:
        """A sync point, reached at the same step by every process: read the tally (the one host sync), add every
        process's sums into the epoch's, stop if any loss was not finite, and agree on a stop signal. Returns the
        mean training loss of all processes since the last sync point (None if no step ran)."""
        reading, signum = self.tally.read(), self.stop.signum
        every = gather_object([(reading, signum)]) if self.world_size > 1 else [(reading, signum)]
        bad = [(rank, r.first_bad_step) for rank, (r, _) in enumerate(every) if r.first_bad_step]
        if bad:
            raise NonFiniteLoss(f"loss is not finite at step {min(step for _, step in bad)} (rank "
                                f"{', '.join(str(rank) for rank, _ in bad)}): training stopped and nothing from "
                                f"that step on was saved; the last checkpoint in {self.checkpoints_dir} holds "
                                f"finite weights")
        loss_sum, images = sum(r.loss_sum for r, _ in every), sum(r.images for r, _ in every)
        self.progress.epoch_loss_sum += loss_sum
        self.progress.epoch_images += images
        skipped = max(r.skipped_steps for r, _ in every)  # the same on every process: gradients are all-reduced
        if skipped > self.progress.skipped_steps and self.tensorboard:
            self.tensorboard.log({"train/skipped_steps": skipped}, self.progress.step)
        self.progress.skipped_steps = max(self.progress.skipped_steps, skipped)
        self.agreed_signal = self.agreed_signal or first_signal([s for _, s in every])
        self._window_images = images
        return loss_sum / images if images else None

    def _log(self) -> None:
        """At a log step: the loss and throughput of all processes since the last log, on the console and in
        the trackers."""
        loss = self._sync()
        now = time.perf_counter()  # after the sync: the device has done all the work queued so far
        rate = self._window_images / max(now - self._window_started, 1e-9)
        self._window_started = now
        self.console.log(self.progress.batch, loss, rate)
        if self.tensorboard and loss is not None:
            self.tensorboard.log({"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                                  "perf/images_per_sec": rate}, self.progress.step)

    def _stop_signal(self) -> int | None:
        """One process reads its own flag after every step; several act on what they agreed at a sync point."""
        return self.stop.signum if self.world_size == 1 else self.agreed_signal

    # ------------------------------------------------------------------ evaluation
    def evaluate_and_record(self, epoch_done: bool) -> None:
        """Evaluate on the whole evaluation set (exact across processes), log, and close the epoch if done."""
        progress = self.progress
        result = self.evaluate()
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

    def evaluate(self) -> EvalResult:
        """The weights in use (`evaluated_model`) on the whole evaluation set, exact across processes."""
        return evaluate(self.evaluated_model(), self.eval_batches, self.accelerator,
                        expected_count=self.eval_batches.total)

    @torch.no_grad()
    def infer(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, 10) of the weights in use for a prepared batch, as evaluation computes them."""
        model = self.evaluated_model()
        was_training = model.training
        model.eval()
        with self.accelerator.autocast():
            logits = model(images)
        model.train(was_training)
        return logits

    def example_batch(self, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch prepared as the loop prepares it: (images (B, 1, S, S), labels (B,)) on the device."""
        return next(iter(self.train_batches.epoch(0) if train else self.eval_batches))

    def evaluated_model(self) -> torch.nn.Module:
        """The weights evaluated and saved: their moving average if enabled, else the trained ones (never the
        DDP wrapper: evaluation runs no collectives)."""
        return self.ema.module if self.ema else self.network

    # ------------------------------------------------------------------ state and checkpoints
    def state_dict(self) -> Checkpoint:
        """The whole state of the run, for a checkpoint. Every process calls it: each contributes its random
        state."""
        rng = gather_object([{"python": random.getstate(), "torch": devices.rng_state(self.accelerator.device)}])
        scaler = self.accelerator.scaler
        return Checkpoint(
            weights=self.evaluated_model().state_dict(),  # what evaluation saw: for use and export
            train_weights=self.network.state_dict() if self.ema else None,  # where training goes on from
            trainer_state={"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                           "scaler": scaler.state_dict() if scaler else None, "rng": rng,
                           "ema_updates": self.ema.updates if self.ema else 0},
            progress=self.progress, config=self.config.to_dict(),
            meta={"world_size": self.world_size, "device": self.device_kind, "precision": self.precision})

    def load_state_dict(self, state: Checkpoint) -> None:
        """Continue from `state` (a loaded checkpoint); a UsageError if it is not a state of this run's recipe,
        or stopped mid-epoch with another number of processes."""
        source = state.path or "the checkpoint"
        mismatches = resume_mismatches(state.config, self.config)
        if state.meta.get("precision") != self.precision:
            mismatches.append(f"precision: checkpoint {state.meta.get('precision')!r}, this run {self.precision!r}")
        if mismatches:
            raise UsageError(f"cannot resume from {source}: the config differs ({'; '.join(mismatches)}); "
                             f"use the same values or start a new --output-dir")
        same_world = state.meta.get("world_size") == self.world_size
        if not same_world and state.progress.batch > 0:
            raise UsageError(f"cannot resume {source} with {self.world_size} processes: it stopped mid-epoch "
                             f"with {state.meta.get('world_size')}; use that many, or an end-of-epoch checkpoint")
        trainer_state = state.trainer_state
        if self.ema:
            checkpoint.load_weights_into(self.ema.module, state.weights, Path(source) / checkpoint.WEIGHTS)
            checkpoint.load_weights_into(self.network, state.train_weights, Path(source) / checkpoint.TRAIN_WEIGHTS)
            self.ema.updates = trainer_state["ema_updates"]
        else:
            checkpoint.load_weights_into(self.network, state.weights, Path(source) / checkpoint.WEIGHTS)
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        if self.accelerator.scaler is not None and trainer_state.get("scaler"):
            self.accelerator.scaler.load_state_dict(trainer_state["scaler"])
        if same_world and state.meta.get("device") == self.device_kind:
            rng = trainer_state["rng"][self.rank]
            random.setstate(rng["python"])
            devices.set_rng_state(self.accelerator.device, rng["torch"])
        else:
            self.console.print(f"note: {source} was saved by {state.meta.get('world_size')} process(es) on "
                               f"{state.meta.get('device')}; random state re-seeded for this run's processes")
        self.progress = state.progress
        self.last_saved_step = self.progress.step

    def save_checkpoint(self) -> None:
        """A sync point first (no non-finite step is ever saved); then every process contributes its state, the
        main process writes, and all wait for it."""
        if self.progress.step == self.last_saved_step:
            return
        self._sync()
        state = self.state_dict()
        if self.accelerator.is_main_process:
            if self.tensorboard:
                # on disk before the checkpoint: a resume purges what comes after it, and must find all before it
                self.tensorboard.flush()
            saved = checkpoint.save(self.checkpoints_dir, state)
            self.run_folder.saved(self.progress.step, saved)
            best = checkpoint.step_dir(self.checkpoints_dir, self.progress.best_step)
            checkpoint.prune(self.checkpoints_dir, self.config.keep_last, keep=best,
                             sole_writer=self.run_folder.locked)
        self.last_saved_step = self.progress.step
        self.accelerator.wait_for_everyone()

    def _resume(self) -> Path | None:
        """Load the checkpoint `resume` names (auto: the newest complete one that loads): the main process chooses
        (and has loaded it in choosing), the others load the one it chose."""
        chosen: Checkpoint | None = None
        path: list[Any] = [None]
        if self.accelerator.is_main_process:
            chosen = checkpoint.choose_for_resume(self.checkpoints_dir, self.config.resume, self.console.print)
            path[0] = str(chosen.path) if chosen else None
        broadcast_object_list(path)
        if path[0] is None:
            return None
        self.load_state_dict(chosen or checkpoint.load(Path(path[0])))
        self.run_folder.starts_at(self.progress.step)
        return Path(path[0])

    # ------------------------------------------------------------------ helpers
    def _reached_max_steps(self) -> bool:
        return bool(self.config.max_steps) and self.progress.step >= self.config.max_steps

    def _slowest(self, seconds: float) -> float:
        """The longest of every process's `seconds`: throughput is all processes' images over the slowest time."""
        return max(gather_object([seconds])) if self.world_size > 1 else seconds

    def _rank_rows(self) -> list[dict[str, Any]]:
        rows = gather_object([self.session]) if self.world_size > 1 else [self.session]
        return [{"rank": rank, "images": row["images"], "seconds": row["seconds"],
                 "images_per_sec": row["images"] / max(row["seconds"], 1e-9),
                 "step_ms": 1000 * row["seconds"] / max(row["steps"], 1)}
                for rank, row in enumerate(rows)]

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
        self.run_folder.release()
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


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: str,
                    precision: str = "no") -> torch.optim.Optimizer:
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


def main(argv: list[str] | None = None) -> int:
    with exit_on_user_error("toolkit.train"):
        config = parse_args(argv)
        try:
            trainer = Trainer(config)
        except BaseException as error:
            rundir.release_held(error)  # a run that could not start: its new folder removed, or the failure recorded
            raise
        try:
            code = trainer.train()
            # recorded before exiting: a launcher may kill this process soon after
            trainer.run_folder.ended(code)
            return code
        except BaseException as error:
            trainer.run_folder.failed(error, trainer.progress.step)
            raise
        finally:
            trainer.close()


if __name__ == "__main__":
    sys.exit(main())
