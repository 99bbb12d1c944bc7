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
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, set_seed

from toolkit import checkpoint, devices, plots, rundir, tracking
from toolkit.averaging import WeightAverage
from toolkit.checkpoint import Checkpoint, TrainProgress
from toolkit.config import (
    TrainConfig,
    parse_args,
    parse_duration,
    parse_step_range,
    resume_mismatches,
    to_yaml,
    trackers,
)
from toolkit.console import TrainConsole
from toolkit.data import EvalBatches, Preprocess, TrainBatches, first, load_mnist, resolve_data_dir
from toolkit.errors import UsageError, decided_on_main, exit_on_user_error, main_first
from toolkit.files import write_atomic
from toolkit.metrics import EvalResult, evaluate
from toolkit.model import build_model, count_parameters
from toolkit.profiling import StepProfiler
from toolkit.stopping import NonFiniteLoss, StopControl
from toolkit.tally import StepTally
from toolkit.throughput import Efficiency, StepTimer
from toolkit.tracking import JsonlSink


class Trainer:
    """The training run: `train()` runs it to the end. Its state is one symmetric pair, `state_dict()` and
    `load_state_dict()`, which checkpoints save and resume. Benchmarks drive it through `train_steps`,
    `train_step`, `example_batch`, `evaluate` and `infer`. `quiet` keeps the console silent on every process."""

    def __init__(self, config: TrainConfig, quiet: bool = False) -> None:
        self.config = config
        self.session_started = time.perf_counter()
        # --- device, precision and processes ---
        self.device_kind = devices.resolve(config.device)
        self.precision, precision_source = devices.resolve_precision(self.device_kind, config.precision)
        if config.compile:
            devices.check_compile(self.device_kind)
        tracking.check_installed(trackers(config))
        self.accelerator = acc = devices.build_accelerator(self.device_kind, self.precision, config.dist_timeout_s)
        self.rank, self.world_size = acc.process_index, acc.num_processes
        devices.configure(self.device_kind, config.deterministic, config.cpu_threads,
                          int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        self.console = TrainConsole(acc.is_main_process and not quiet)
        # The run folder is this run's alone from here (rundir): a refusal comes before anything is written.
        self.run_folder = rundir.claim(config.output_dir, config.resume, acc.is_main_process, self.console.print)
        self.output_dir = self.run_folder.path
        self.checkpoints_dir = self.output_dir / "checkpoints"

        # --- data: uint8 on the device; one process per machine reads (or downloads) first ---
        root = resolve_data_dir(config.data_dir)
        train_split, eval_split = main_first(acc, lambda: (load_mnist(root, train=True, download=config.download),
                                                           load_mnist(root, train=False, download=config.download)))
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
        # an optimizer step takes grad_accum_steps batches; the epoch's last one may take fewer
        self.steps_per_epoch = -(-len(self.train_batches) // config.grad_accum_steps)
        total_steps = self.steps_per_epoch * config.epochs

        # --- model, optimizer, schedule: the same initial weights on every process ---
        torch.manual_seed(config.seed)
        # `network` is the module itself: its weights are what checkpoints hold, never a wrapper's (no "module."
        # or "_orig_mod." prefixes); `model` is what training calls (DDP-wrapped under several processes, and
        # compiled with `compile`).
        self.network = build_model(config.init, config.dropout)
        if channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.parameters = count_parameters(self.network)
        optimizer = build_optimizer(self.network, config, self.device_kind, self.precision)
        # Not passed to prepare(): Accelerate would step it once per process. It steps once per optimizer step.
        self.scheduler = build_schedule(optimizer, config, total_steps)
        self.wrapped, self.optimizer = acc.prepare(self.network, optimizer)
        # around the DDP wrapper, whose hooks it then keeps (DDPOptimizer)
        self.model = torch.compile(self.wrapped) if config.compile else self.wrapped
        # A fused optimizer skips an update on the device when told the loss was not finite; under fp16 the
        # gradient scaler does that itself (and sets the flag for each step).
        self._skip_on_device = getattr(optimizer, "_step_supports_amp_scaling", False) and acc.scaler is None
        self.ema = WeightAverage(self.network, config.ema_decay) if config.ema_decay else None
        self.checkpoint_bytes = checkpoint.expected_bytes(self.network, config.optimizer, config.momentum,
                                                          averaged=self.ema is not None)
        set_seed(config.seed + self.rank)  # each process its own dropout and augmentation stream

        # --- state: what checkpoints hold, and this session's counters ---
        self.progress = TrainProgress()
        self.last_saved_step = -1
        self.last_evaluated_step = -1
        self.last_save_seconds = 0.0
        self.stop_reason: str | None = None  # why the run stops early: a signal, the time limit, a target...
        self.epoch_start = (0.0, 0)  # the run's training seconds and the epoch's images when this epoch started
        self.epoch_seconds = 0.0  # training time of the epoch so far (this session), evaluation and saving excluded
        self.epoch_rate = 0.0  # its images/s over all processes
        self.session = {"images": 0, "seconds": 0.0, "steps": 0}  # this process, this session, training only
        self.time_limit_s = parse_duration(config.time_limit)
        self.stop = StopControl(announce=self.console.print)
        self.resumed_from = self._resume() if config.resume else None
        self.tally = StepTally(acc.device, self.progress.step)
        self.timer = StepTimer(acc.device)
        self.efficiency = Efficiency(acc.device, self.precision, config.image_size)
        # every process keeps its first misclassified examples (the selection gathers them), to draw them
        self.keep_misclassified = plots.MISCLASSIFIED_SHOWN
        self.profiler = StepProfiler(parse_step_range(config.profile_steps) if acc.is_main_process else None,
                                     self.output_dir / "profile", acc.device)
        self.checked_at = self.clock_started = time.perf_counter()
        self.train_seconds_before = self.progress.train_seconds  # earlier sessions' share
        self.wall_seconds_before = self.progress.wall_seconds

        # --- outputs: only the main process writes ---
        self.jsonl = None
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.output_dir / "config.yaml", to_yaml(config))
            self.jsonl = JsonlSink(self.output_dir / "metrics.jsonl", records=self.progress.history)
        # A resumed run drops what a killed attempt logged past its checkpoint (or everything, when no checkpoint
        # was complete), so curves and records continue without repeats.
        self.trackers = tracking.Trackers(acc, trackers(config), self.output_dir,
                                          purge_step=self.progress.step + 1 if config.resume else None)
        self.trackers.log_config(to_yaml(config), config.to_dict())
        facts = self._facts(precision_source)
        self.console.header(facts, config.to_dict())
        self.trackers.log_text("run", "\n".join(f"{k}: {v}" for k, v in facts.items()))
        if acc.is_main_process:  # now, not when the first save fails an epoch in
            for warning in (checkpoint.disk_warning(self.checkpoints_dir, self.checkpoint_bytes, config.keep_last),
                            warmup_warning(config.warmup_steps, total_steps)):
                if warning:
                    self.console.print(warning)

    # ------------------------------------------------------------------ the loop
    def train(self) -> int:
        """Run to the end or to an early stop (exit status 0), or until a signal (128 + its number, after
        saving)."""
        config, progress = self.config, self.progress
        if config.max_steps and progress.step >= config.max_steps:  # resumed at or past it: nothing to train
            self.stop_reason = "max_steps"
        while progress.epoch < config.epochs and not self.stop_reason:
            self.train_epoch()
            epoch_done = progress.batch >= len(self.train_batches)
            # evaluate at an epoch's end and at max_steps; a signal or the time limit saves at once (a resume
            # evaluates the epoch it ended, if it did)
            if (epoch_done or self.stop_reason == "max_steps") and progress.step != self.last_evaluated_step:
                self.evaluate_and_record()
            if epoch_done:
                self._close_epoch()
            self.save_checkpoint()
        return self._finish()

    def train_epoch(self) -> None:
        """Train from the saved position to the end of the epoch, or until the run stops: a signal, the time
        limit, max_steps, or an evaluation reaching the target or ending the patience (`eval_every_steps`)."""
        config, progress = self.config, self.progress
        self.console.epoch_started(progress.epoch, config.epochs, self.steps_per_epoch, self._epoch_step())
        self.model.train()
        self.epoch_start = (progress.train_seconds, progress.epoch_images)
        self._resume_clock()
        for batches in self._step_batches(progress.epoch):
            self._step(batches)
            self.session["images"] += sum(len(labels) for _, labels in batches)
            self.session["steps"] += 1
            if self._check_stop():
                break
            evaluate_now = config.eval_every_steps and progress.step % config.eval_every_steps == 0 \
                and progress.batch < len(self.train_batches)  # the epoch's end evaluates anyway
            save_now = config.checkpoint_every_steps and progress.step % config.checkpoint_every_steps == 0
            if evaluate_now or save_now:
                self._pause_clock()
                if evaluate_now:
                    self.evaluate_and_record()
                if save_now:
                    self.save_checkpoint()
                self._resume_clock()
            if self.stop_reason:  # the evaluation reached the target, or the patience ran out
                break
        self._pause_clock()  # the epoch's last loss sums, a last word on stopping, and the clock

    def train_steps(self, count: int) -> None:
        """Run `count` steps of the loop exactly as `train()` runs them (the data path, the step, the sync points
        at log steps), from the current position and on into the next epoch as needed, without evaluating or
        saving. For benchmarks: the caller times it."""
        self.model.train()
        progress, done = self.progress, 0
        self._resume_clock()
        while done < count:
            if progress.batch >= len(self.train_batches):
                progress.epoch, progress.batch = progress.epoch + 1, 0
            for batches in self._step_batches(progress.epoch):
                self._step(batches)
                done += 1
                if done == count:
                    break

    def _step_batches(self, epoch: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The batches of each optimizer step from the saved position to the end of `epoch`: `grad_accum_steps`
        of them (fewer for the epoch's last step if they do not divide it), prepared on the device."""
        group = []
        for batch in self.train_batches.epoch(epoch, start_batch=self.progress.batch):
            group.append(batch)
            if len(group) == self.config.grad_accum_steps:
                yield group
                group = []
        if group:
            yield group

    def _step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One step of the loop: the optimizer step, the position, the live bar, and at log steps the logs."""
        progress = self.progress
        self.timer.data_ready()
        self.profiler.before_step(progress.step + 1)
        self._optimizer_step_on(batches)
        self.timer.step_done()
        progress.step += 1
        progress.batch += len(batches)
        self.profiler.after_step(progress.step)
        self.console.advance(self._epoch_step())
        if progress.step % self.config.log_every_steps == 0:
            self._log()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One optimizer step on one batch of this process's (no accumulation). It only queues work on the
        device; see `_optimizer_step_on`."""
        self._optimizer_step_on([(images, labels)])

    def _optimizer_step_on(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One optimizer step over `batches` (micro-batches whose gradients add up, each weighted by its share of
        the images, so the step equals one on all of them at once). It only queues work on the device: the
        losses are added to the tally there, and a non-finite one makes the optimizer skip the update there;
        both are read at the next sync point. Under DDP the gradients are all-reduced once, on the last."""
        total = sum(len(labels) for _, labels in batches)
        for index, (images, labels) in enumerate(batches):
            last = index == len(batches) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.wrapped):
                loss = self.forward_backward(images, labels, weight=len(labels) / total)
            self.tally.add(loss, len(labels))
        self.optimizer_step(self.tally.end_step())

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """The batch's mean loss (detached); its gradients, times `weight`, are added to the parameters'."""
        logits = self.model(images)  # (B, 10); autocast to `precision` by Accelerate, outputs in fp32
        loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
        self.accelerator.backward(loss * weight if weight != 1.0 else loss)  # DDP all-reduces gradients here
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

    # ------------------------------------------------------------------ sync points and stopping
    def _sync(self) -> float | None:
        """A sync point, reached at the same step by every process: read the tally (the one host sync), add every
        process's sums into the run's, stop if any loss was not finite, and agree on stopping. Returns the mean
        training loss of all processes since the last sync point (None if no step ran)."""
        mine = (self.tally.read(), self._local_stop_request())
        every = gather_object([mine]) if self.world_size > 1 else [mine]
        bad = [(rank, r.first_bad_step) for rank, (r, _) in enumerate(every) if r.first_bad_step]
        if bad:
            raise NonFiniteLoss(f"loss is not finite at step {min(step for _, step in bad)} (rank "
                                f"{', '.join(str(rank) for rank, _ in bad)}): training stopped and nothing from "
                                f"that step on was saved; the last checkpoint in {self.checkpoints_dir} holds "
                                f"finite weights")
        progress = self.progress
        loss_sum, images = sum(r.loss_sum for r, _ in every), sum(r.images for r, _ in every)
        progress.epoch_loss_sum += loss_sum
        progress.epoch_images += images
        progress.images_seen += images
        skipped = max(r.skipped_steps for r, _ in every)  # the same on every process: gradients are all-reduced
        if skipped > progress.skipped_steps:
            self.trackers.log({"train/skipped_steps": skipped}, progress.step)
        progress.skipped_steps = max(progress.skipped_steps, skipped)
        self.stop_reason = self.stop_reason or first_request([request for _, request in every])
        self._window_images = images
        return loss_sum / images if images else None

    def _local_stop_request(self) -> str | None:
        """This process's reason to stop now: a signal it received, or the time limit coming up (room left for
        twice the time between checks and a save)."""
        if self.stop.signum:
            return signal.Signals(self.stop.signum).name
        now = time.perf_counter()
        interval, self.checked_at = now - self.checked_at, now
        needed = 2 * interval + (self.last_save_seconds or self._save_estimate())
        if now - self.session_started + needed >= self.time_limit_s:
            return "time_limit"
        return None

    def _check_stop(self) -> bool:
        """After a step: one process acts on its own reasons at once; several on what they agreed at the last
        sync point (so all stop at the same step)."""
        if self.world_size == 1 and not self.stop_reason:
            self.stop_reason = self._local_stop_request()
        if not self.stop_reason and self.config.max_steps and self.progress.step >= self.config.max_steps:
            self.stop_reason = "max_steps"
        return self.stop_reason is not None

    def _save_estimate(self) -> float:
        """Seconds a checkpoint takes, before one was timed: its size at a slow disk's 100 MB/s, plus a second."""
        return 1 + self.checkpoint_bytes / 100e6

    def _log(self) -> None:
        """At a log step: the loss and speed of all processes since the last log, on the console and in the
        trackers."""
        loss = self._sync()
        devices.synchronize(self.accelerator.device)  # the events of the window are recorded: read them
        now = time.perf_counter()
        rate = self._window_images / max(now - self.window_started, 1e-9)
        split = self.timer.read()
        metrics = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0], "perf/images_per_sec": rate}
        if split:
            metrics["perf/data_ms_per_step"], metrics["perf/step_ms"] = split
        memory = devices.main_memory_bytes(devices.peak_memory_bytes(self.accelerator.device))
        if memory:
            metrics["memory/peak_gib"] = memory / 2**30
        if self.accelerator.is_main_process:
            efficiency = self.efficiency(rate)
            metrics["perf/tflops"], metrics["perf/mfu"] = efficiency["tflops"], efficiency["mfu"]
        self.console.log(self._epoch_step(), metrics)
        if loss is not None:
            self.trackers.log(metrics, self.progress.step)
        self.window_started = time.perf_counter()  # what the logging took is not the next window's
        self.timer.restart()

    def _pause_clock(self) -> None:
        """Stop the training clock (before an evaluation, a checkpoint, the epoch's end): a sync point, then the
        time since the clock last started counts as training, and the epoch's time and speed so far are noted."""
        self._sync()
        devices.synchronize(self.accelerator.device)
        now = time.perf_counter()
        progress = self.progress
        self.session["seconds"] += now - self.clock_started
        progress.train_seconds += now - self.clock_started
        self.clock_started = now
        seconds, images = progress.train_seconds - self.epoch_start[0], progress.epoch_images - self.epoch_start[1]
        self.epoch_seconds = seconds
        self.epoch_rate = images / max(self._slowest(seconds), 1e-9)  # all processes' images, the slowest's time

    def _resume_clock(self) -> None:
        self.clock_started = self.window_started = time.perf_counter()
        self.timer.restart()

    def _wall_seconds(self) -> float:
        """The run's wall time so far: earlier sessions' and this one's."""
        return self.wall_seconds_before + time.perf_counter() - self.session_started

    def _epoch_step(self) -> int:
        """Optimizer steps done in this epoch."""
        return -(-self.progress.batch // self.config.grad_accum_steps)

    # ------------------------------------------------------------------ evaluation
    def evaluate_and_record(self) -> None:
        """Evaluate on the whole evaluation set (exact across processes), log it, note the accuracies reached,
        and decide whether the run has reached its target or run out of patience."""
        progress, config = self.progress, self.config
        result = self.evaluate()
        self.last_evaluated_step = progress.step
        progress.wall_seconds = self._wall_seconds()
        record = {"epoch": progress.epoch + 1, "step": progress.step,
                  "train_loss": progress.epoch_loss_sum / max(progress.epoch_images, 1),
                  "eval_loss": result.loss, "eval_accuracy": result.accuracy, "eval_correct": result.correct,
                  "eval_count": result.count, "lr": self.scheduler.get_last_lr()[0],
                  "epoch_s": self.epoch_seconds, "images_per_sec": self.epoch_rate,
                  "global_batch_size": config.batch_size * self.world_size * config.grad_accum_steps,
                  "complete": progress.batch >= len(self.train_batches),
                  "eval_weights": "average" if self.ema else "trained",
                  "eval_split": "validation" if config.validation_samples else "test",
                  "images_seen": progress.images_seen, "train_seconds": progress.train_seconds,
                  "wall_seconds": progress.wall_seconds}
        if result.accuracy > progress.best_accuracy:
            progress.best_accuracy, progress.best_step = result.accuracy, progress.step
            progress.evaluations_since_best = 0
        else:
            progress.evaluations_since_best += 1
        for threshold in self._milestones():
            if result.accuracy >= threshold and f"{threshold:g}" not in progress.reached:
                progress.reached[f"{threshold:g}"] = {k: record[k] for k in ("step", "images_seen", "train_seconds",
                                                                              "wall_seconds")}
        if config.target_accuracy and result.accuracy >= config.target_accuracy:
            reached = progress.reached[f"{config.target_accuracy:g}"]
            record.update(time_to_target_s=reached["train_seconds"], wall_time_to_target_s=reached["wall_seconds"],
                          images_to_target=reached["images_seen"])
            self.stop_reason = "target_accuracy"
        elif config.early_stop_patience and progress.evaluations_since_best >= config.early_stop_patience:
            self.stop_reason = "early_stop"
        progress.history.append(record)
        self.trackers.log({"eval/loss": result.loss, "eval/accuracy": result.accuracy,
                           "train/epoch_loss": record["train_loss"],
                           "perf/epoch_images_per_sec": self.epoch_rate}, progress.step)
        if self.accelerator.is_main_process:  # the confusion matrix and the digits it got wrong, as pictures
            self.trackers.log_images(plots.evaluation_images(result, self.eval_batches.images), progress.step)
        if self.jsonl:
            self.jsonl.log(record)
        self.console.evaluated(record)

    def _milestones(self) -> tuple[float, ...]:
        """The accuracies whose time and images the run notes: MILESTONES, and the target if there is one."""
        return MILESTONES + ((self.config.target_accuracy,) if self.config.target_accuracy else ())

    def _close_epoch(self) -> None:
        progress = self.progress
        progress.epoch += 1
        progress.batch = 0
        progress.epoch_loss_sum, progress.epoch_images = 0.0, 0

    def evaluate(self) -> EvalResult:
        """The weights in use (`evaluated_model`) on the whole evaluation set, exact across processes."""
        return evaluate(self.evaluated_model(), self.eval_batches, self.accelerator,
                        expected_count=self.eval_batches.total, keep_misclassified=self.keep_misclassified)

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
        self.progress.wall_seconds = self._wall_seconds()
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
        missing = sorted({"optimizer", "scheduler", "rng", "ema_updates"} - set(trainer_state))
        if missing:
            raise checkpoint.CheckpointError(f"{Path(source) / checkpoint.TRAINER_STATE} lacks {', '.join(missing)}: "
                                             f"it was not saved by this trainer")
        if self.ema:
            checkpoint.load_weights_into(self.ema.module, state.weights, Path(source) / checkpoint.WEIGHTS)
            checkpoint.load_weights_into(self.network, state.train_weights, Path(source) / checkpoint.TRAIN_WEIGHTS)
            self.ema.updates = trainer_state["ema_updates"]
        else:
            checkpoint.load_weights_into(self.network, state.weights, Path(source) / checkpoint.WEIGHTS)
        try:
            self.optimizer.load_state_dict(trainer_state["optimizer"])
            self.scheduler.load_state_dict(trainer_state["scheduler"])
        except (ValueError, KeyError, TypeError) as error:
            raise checkpoint.CheckpointError(f"{Path(source) / checkpoint.TRAINER_STATE} does not hold this run's "
                                             f"optimizer or schedule ({error})") from None
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
        started = time.perf_counter()
        state = self.state_dict()
        if self.accelerator.is_main_process:
            self.trackers.flush()
            saved = checkpoint.save(self.checkpoints_dir, state)
            self.run_folder.saved(self.progress.step, saved)
            best = checkpoint.step_dir(self.checkpoints_dir, self.progress.best_step)
            checkpoint.prune(self.checkpoints_dir, self.config.keep_last, keep=best,
                             sole_writer=self.run_folder.locked)
        self.last_saved_step = self.progress.step
        self.accelerator.wait_for_everyone()
        self.last_save_seconds = time.perf_counter() - started

    def _resume(self) -> Path | None:
        """Load the checkpoint `resume` names (auto: the newest complete one that loads): the main process chooses
        (and has loaded it in choosing), the others load the one it chose."""
        chosen: Checkpoint | None = None

        def choose() -> str | None:
            nonlocal chosen
            chosen = checkpoint.choose_for_resume(self.checkpoints_dir, self.config.resume, self.console.print)
            return str(chosen.path) if chosen else None

        path = decided_on_main(choose, self.accelerator.is_main_process)
        if path is None:
            return None
        self.load_state_dict(chosen or checkpoint.load(Path(path)))
        self.run_folder.starts_at(self.progress.step)
        return Path(path)

    # ------------------------------------------------------------------ helpers
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
            "global batch": f"{self.config.batch_size * self.world_size * self.config.grad_accum_steps} "
                            f"({self.config.batch_size} x {self.world_size}"
                            + (f" x {self.config.grad_accum_steps} accumulated)" if self.config.grad_accum_steps > 1
                               else ")"),
            "parameters": f"{self.parameters:,}",
            "steps/epoch": self.steps_per_epoch,
            "evaluated on": (f"the last {self.eval_batches.total:,} training images (held out)"
                             if self.config.validation_samples else f"{self.eval_batches.total:,} test images"),
            "run folder": str(self.output_dir),
        }
        if self.resumed_from:
            facts["resumed"] = f"{self.resumed_from} (step {self.progress.step})"
        return facts

    def _finish(self) -> int:
        """The end of the run, to its end or an early stop: the summary, and the exit status."""
        progress, reason = self.progress, self.stop_reason
        self.profiler.stop()
        self.console.ranks(self._rank_rows())
        resume = f"resume with --resume auto --output-dir {self.output_dir}"
        if reason in ("SIGTERM", "SIGINT"):
            self.console.print(f"stopped at step {progress.step}; {resume}")
        elif reason == "time_limit":
            self.console.print(f"stopped at step {progress.step} before the time limit ({self.config.time_limit}); "
                               f"{resume}")
        elif reason == "early_stop":
            self.console.print(f"stopped early at step {progress.step}: no better accuracy in the last "
                               f"{self.config.early_stop_patience} evaluations")
        elif reason == "target_accuracy":
            self.console.print(f"reached the target accuracy {self.config.target_accuracy:.2%} at step "
                               f"{progress.step}")
        self.console.summary(self._summary())
        if self.profiler.trace:
            self.console.print(f"profile of steps {self.config.profile_steps}: {self.profiler.trace} (open in "
                               f"https://ui.perfetto.dev); top operators by self time:\n{self.profiler.table}")
        self.accelerator.wait_for_everyone()
        return 128 + signal.Signals[reason].value if reason in ("SIGTERM", "SIGINT") else 0

    def _summary(self) -> dict[str, str]:
        progress = self.progress
        wall = self._wall_seconds()
        rows = {}
        if progress.best_step >= 0:
            best = checkpoint.step_dir(self.checkpoints_dir, progress.best_step)
            rows["best eval accuracy"] = (f"{progress.best_accuracy:.2%} at step {progress.best_step}"
                                          + (f" ({best})" if checkpoint.is_complete(best) else ""))
        for threshold in self._milestones():
            reached = progress.reached.get(f"{threshold:g}")
            if reached:
                rows[f"time to {threshold:.1%}"] = (f"{reached['train_seconds']:.1f} s training, "
                                                    f"{reached['wall_seconds']:.1f} s wall, "
                                                    f"{reached['images_seen']:,} images (step {reached['step']})")
        rows["training time"] = f"{progress.train_seconds:.1f} s ({progress.images_seen:,} images, " \
                                f"{progress.images_seen / max(progress.train_seconds, 1e-9):,.0f} images/s)"
        rows["wall time"] = f"{wall:.1f} s"
        rows["run folder"] = str(self.output_dir)
        return rows

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        self.console.close()
        if hasattr(self, "stop"):
            self.stop.close()
        self.run_folder.release()
        self.accelerator.end_training()


MILESTONES = (0.98, 0.99, 0.995)  # accuracies whose time and images the run notes, reached or not


def first_request(requests: list[str | None]) -> str | None:
    """The reason to act on when processes give theirs: a scheduler's SIGTERM first, then Ctrl-C, then the
    time limit."""
    for reason in ("SIGTERM", "SIGINT", "time_limit"):
        if reason in requests:
            return reason
    return None


def warmup_warning(warmup_steps: int, total_steps: int) -> str | None:
    if warmup_steps < total_steps:
        return None
    return (f"warning: warmup_steps {warmup_steps} is not below the run's {total_steps} optimizer steps: the "
            f"learning rate rises for the whole run and never decays (the warm-up is squeezed into the run, reaching "
            f"the peak lr at its last step); lower --warmup-steps")


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
        def out_of_memory_named():  # the device's out-of-memory error as one line naming the sizes asked for
            return devices.out_of_memory_named(f"--image-size {config.image_size} and --batch-size "
                                               f"{config.batch_size}")

        try:
            with out_of_memory_named():
                trainer = Trainer(config)
        except BaseException as error:
            rundir.release_held(error)  # a run that could not start: its new folder removed, or the failure recorded
            raise
        try:
            with out_of_memory_named():
                code = trainer.train()
            # recorded before exiting: a launcher may kill this process soon after
            trainer.run_folder.ended(code, trainer.stop_reason)
            return code
        except BaseException as error:
            trainer.run_folder.failed(error, trainer.progress.step)
            raise
        finally:
            trainer.close()


if __name__ == "__main__":
    sys.exit(main())
