"""The training loop over assembled parts (`toolkit.assemble`): epochs of optimizer steps, evaluations, checkpoints,
and a stop when the run is done or asked to.

The loop asks its collaborators when to act, each keeping its own time: the report when to log
(`report.should_log`), the saver when to save (`saver.due`), the stop policy whether to stop (`stops.after_step`,
`stops.after_evaluation`), the clock what the time is. The trainer's own state is one symmetric pair,
`state_dict()` and `load_state_dict()`, which checkpoints save and resume. Benchmarks drive it through
`train_steps`, `train_step`, `example_batch`, `evaluate` and `infer`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object

from toolkit import checkpoint, devices, plots, report
from toolkit.agreement import from_main
from toolkit.assemble import Parts
from toolkit.checkpoint import Checkpoint, TrainProgress, tensor_bytes
from toolkit.clock import RunClock
from toolkit.config import TrainConfig, resume_mismatches
from toolkit.errors import UsageError
from toolkit.metrics import EvalResult, evaluate
from toolkit.profiling import StepProfiler
from toolkit.report import RunReport
from toolkit.rundir import RunFolder
from toolkit.saver import CheckpointSaver, expected_bytes
from toolkit.stopping import NonFiniteLoss, Signals, Stop, StopPolicy
from toolkit.tally import StepTally
from toolkit.throughput import Efficiency, StepTimer

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, 1, S, S) and labels (B,), prepared on the device


class Trainer:
    # what it trains (toolkit.assemble)
    config: TrainConfig
    parts: Parts  # runtime (accelerator, device, precision), data (batches), training (network, optimizer...)
    # the parts that keep their own time
    report: RunReport  # when to log, and where: console, trackers, metrics.jsonl
    clock: RunClock  # training time vs wall time, the logging window
    stops: StopPolicy  # signals, the time limit, max_steps, a target, patience
    saver: CheckpointSaver  # when to save, and what to keep
    folder: RunFolder  # run.json: how the run stands
    # its own state: what checkpoints hold (progress), and what a step leaves on the device until a sync point
    progress: TrainProgress
    tally: StepTally  # loss sums, the first non-finite step, skipped steps: read at sync points only
    timer: StepTimer  # events around the data path and the step
    efficiency: Efficiency  # FLOPs per image and the device's peak, measured before the clock starts
    profiler: StepProfiler
    last_evaluated_step: int

    def __init__(self, parts: Parts, folder: RunFolder, report: RunReport, config: TrainConfig,
                 signals: Signals | None = None) -> None:
        device = parts.runtime.torch_device
        self.config, self.parts, self.report, self.folder = config, parts, report, folder
        net = parts.training
        self.saver = CheckpointSaver(folder, expected_bytes(net.network, config.optimizer, config.momentum,
                                                            averaged=net.average is not None),
                                     config.keep_last, config.checkpoint_every_steps, config.save_checkpoints,
                                     slim_bytes=tensor_bytes(net.network.state_dict()) if config.slim_checkpoints
                                     else None)
        self.stops = StopPolicy(config, signals, self.saver.seconds_to_save)
        self.progress = TrainProgress()
        self.clock = RunClock(device)
        self.tally = StepTally(device)
        self.timer = StepTimer(device)
        self.efficiency = Efficiency(device, parts.runtime.precision, config.image_size, config.tf32)
        self.profiler = StepProfiler(config.profile_range if parts.runtime.is_main else None, folder.profile, device)
        self.last_evaluated_step = -1

    # ------------------------------------------------------------------ the loop
    def train(self) -> int:
        """Run to the end or to an early stop; the exit status: 0, or 128 + a signal's number (after saving)."""
        config, progress = self.config, self.progress
        self._measure_efficiency()
        self.folder.training_starts()
        if self.stops.signals is not None:  # from here a signal asks the loop to stop, and one process says so
            self.stops.signals.training(self.report.print if self.world_size == 1 else None)
        if config.max_steps and progress.step >= config.max_steps:  # resumed at or past it: nothing to train
            self.stops.stop = Stop("max_steps", progress.step)
        if progress.epoch >= config.epochs or self.stops.stop:
            self.report.print(f"nothing left to train: the run is at step {progress.step} "
                              f"(epoch {min(progress.epoch, config.epochs)} of {config.epochs})")
        while progress.epoch < config.epochs and not self.stops.stop:
            self.train_epoch()
            epoch_done = progress.batch >= len(self.data.train)
            # evaluate at an epoch's end and at max_steps; a signal or the time limit saves at once (a resume
            # evaluates the epoch it ended, if it did)
            stop = self.stops.stop
            if (epoch_done or (stop and stop.reason == "max_steps")) and progress.step != self.last_evaluated_step:
                self.evaluate_and_record()
            if epoch_done:
                self._close_epoch()
            self.save_checkpoint()
        return self._finish()

    def train_epoch(self) -> None:
        """Train from the saved position to the end of the epoch, or until the run stops."""
        progress, main = self.progress, self.runtime.is_main
        self.report.epoch_started(progress.epoch, self._epoch_step(), progress.step)
        self.net.model.train()
        self.clock.epoch_begins(progress.train_seconds, progress.epoch_images)
        self._start_clock()
        for batches in self._step_batches(progress.epoch):
            self._step(batches)
            if main and self.stops.signals is not None and self.stops.signals.name:
                self.folder.stopping(self.stops.signals.name)
            if self.stops.after_step(progress.step, alone=self.world_size == 1):
                break
            evaluate_now = self.config.eval_every_steps and progress.step % self.config.eval_every_steps == 0 \
                and progress.batch < len(self.data.train)  # the epoch's end evaluates anyway
            save_now = self.saver.due(progress.step)
            if evaluate_now or save_now:
                self._pause_clock()
                if evaluate_now:
                    self.evaluate_and_record()
                if save_now:
                    self.save_checkpoint()
                self._start_clock()
            if self.stops.stop:  # the evaluation reached the target, or the patience ran out
                break
        self._pause_clock()  # the epoch's last loss sums, a last word on stopping, and the clock

    def train_steps(self, count: int) -> None:
        """Run `count` steps of the loop exactly as `train()` runs them (the data path, the step, the sync points
        at log steps), from the current position and on into the next epoch as needed, without evaluating or
        saving. For benchmarks: the caller times it."""
        self.net.model.train()
        progress, done = self.progress, 0
        self._measure_efficiency()
        self._start_clock()
        while done < count:
            if progress.batch >= len(self.data.train):
                progress.epoch, progress.batch = progress.epoch + 1, 0
            for batches in self._step_batches(progress.epoch):
                self._step(batches)
                done += 1
                if done == count:
                    break

    def _measure_efficiency(self) -> None:
        """FLOPs per image and the device's peak (a matmul), once, before the training clock starts; the main
        process alone reports them."""
        if self.runtime.is_main:
            self.efficiency.measure()

    def _step_batches(self, epoch: int) -> Iterator[list[Batch]]:
        """The batches of each optimizer step from the saved position to the end of `epoch`: `grad_accum_steps`
        of them (fewer for the epoch's last step if they do not divide it), prepared on the device."""
        group = []
        for batch in self.data.train.epoch(epoch, start_batch=self.progress.batch):
            group.append(batch)
            if len(group) == self.config.grad_accum_steps:
                yield group
                group = []
        if group:
            yield group

    def _step(self, batches: list[Batch]) -> None:
        """One step of the loop: the optimizer step, the position, the live bar, and at log steps the logs."""
        progress = self.progress
        self.timer.data_ready()
        self.profiler.before_step(progress.step + 1)
        self._optimizer_step_on(batches)
        self.timer.step_done()
        progress.step += 1
        progress.batch += len(batches)
        self.clock.stepped(sum(len(labels) for _, labels in batches))
        self.profiler.after_step(progress.step)
        self.report.advanced(self._epoch_step(), progress.step)
        if self.report.should_log(progress.step):
            self._log()
        elif self.report.should_peek(self.clock.session_steps):
            self._peek()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One optimizer step on one batch of this process's (no accumulation), counted as the loop counts its
        steps for the weight average. It only queues work on the device; see `_optimizer_step_on`."""
        self._optimizer_step_on([(images, labels)])
        self.progress.step += 1

    def _optimizer_step_on(self, batches: list[Batch]) -> None:
        """One optimizer step over `batches` (micro-batches whose gradients add up, each weighted by its share of
        the images, so the step equals one on all of them at once). It only queues work on the device: the
        losses are added to the tally there, and a non-finite one makes the optimizer skip the update there;
        both are read at the next sync point. Under DDP the gradients are all-reduced once, on the last."""
        total = sum(len(labels) for _, labels in batches)
        for index, (images, labels) in enumerate(batches):
            last = index == len(batches) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.net.model):
                loss = self.forward_backward(images, labels, weight=len(labels) / total)
            self.tally.add(loss, len(labels))
        self.optimizer_step(self.tally.end_step())

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """The batch's mean loss (detached); its gradients, times `weight`, are added to the parameters'."""
        logits = self.net.model(images)  # (B, 10); autocast to `precision` by Accelerate, outputs in fp32
        loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
        self.accelerator.backward(loss * weight if weight != 1.0 else loss)  # DDP all-reduces gradients here
        return loss.detach()

    def optimizer_step(self, not_finite: torch.Tensor | None = None) -> None:
        net = self.net
        if self.config.grad_clip:
            self.accelerator.clip_grad_norm_(net.network.parameters(), self.config.grad_clip)
        if net.skip_on_device and not_finite is not None:
            net.optimizer.optimizer.found_inf = not_finite  # read by the fused kernel: 1.0 skips the update
        scaler = self.accelerator.scaler
        scale = scaler._scale.clone() if scaler is not None else None  # noqa: SLF001 - no sync, unlike get_scale()
        net.optimizer.step()
        if scaler is not None:
            # the scaler lowers its scale exactly when it skips a step for inf/NaN gradients (Accelerate's
            # step_was_skipped is always False with fused optimizers)
            self.tally.add_skipped(scaler._scale < scale)  # noqa: SLF001
        net.schedule.step()
        net.optimizer.zero_grad(set_to_none=True)
        if net.average:
            net.average.update(net.network, self.progress.step + 1)

    # ------------------------------------------------------------------ sync points
    def _sync(self) -> float | None:
        """A sync point, reached at the same step by every process: read the tally (the one host sync), add every
        process's sums into the run's, stop if any loss was not finite, and agree on stopping. Returns the mean
        training loss of all processes since the last sync point (None if no step ran)."""
        mine = (self.tally.read(), self.stops.request())
        every = gather_object([mine]) if self.world_size > 1 else [mine]
        bad = [(rank, r.first_bad_step) for rank, (r, _) in enumerate(every) if r.first_bad_step]
        if bad:
            newest = self.saver.newest()
            kept = (f"the last checkpoint, {newest}, holds finite weights" if newest else
                    "no checkpoint had been saved")
            raise NonFiniteLoss(f"loss is not finite at step {min(step for _, step in bad)} (rank "
                                f"{', '.join(str(rank) for rank, _ in bad)}): training stopped and nothing from that "
                                f"step on was saved; {kept} (a smaller --lr, or --grad-clip, may help)")
        progress = self.progress
        loss_sum, images = sum(r.loss_sum for r, _ in every), sum(r.images for r, _ in every)
        progress.epoch_loss_sum += loss_sum
        progress.epoch_images += images
        progress.images_seen += images
        skipped = max(r.skipped_steps for r, _ in every)  # the same on every process: gradients are all-reduced
        if skipped > progress.skipped_steps:
            self.report.skipped(skipped, progress.step)
        progress.skipped_steps = max(progress.skipped_steps, skipped)
        if self.stops.agree([request for _, request in every], progress.step) and \
                self.stops.stop.reason.startswith("SIG"):
            if self.world_size > 1:  # one process says it at once; several, here, where they agreed
                self.report.print(f"{self.stops.stop.reason} received: every process stops at step {progress.step}, "
                                  f"saves a checkpoint, then exits")
            # until the save is done, and if a launcher kills this process first, the run is one to continue
            self.folder.stopping(self.stops.stop.reason)
        return loss_sum / images if images else None

    def _log(self) -> None:
        """At a log step: the loss and speed of all processes since the last log, on the console and in the
        trackers."""
        images_before = self.progress.images_seen
        loss = self._sync()
        seconds, first = self.clock.read_window()
        rate = (self.progress.images_seen - images_before) / max(seconds, 1e-9)
        metrics: dict[str, Any] = {"train/loss": loss, "train/lr": self.net.schedule.get_last_lr()[0],
                                   "perf/images_per_sec": rate}
        split = self.timer.read()
        if split:
            metrics["perf/data_ms_per_step"], metrics["perf/step_ms"] = split
        memory = devices.main_memory_bytes(devices.peak_memory_bytes(self.runtime.torch_device))
        if memory:
            metrics["memory/peak_gib"] = memory / 2**30
        if self.runtime.is_main:
            efficiency = self.efficiency(rate)
            metrics["perf/tflops"], metrics["perf/mfu"] = efficiency["tflops"], efficiency["mfu"]
        self.report.logged(self.progress.step, self._epoch_step(), metrics, first_window=first, run=self._run_time())
        self.clock.restart_window()  # what the logging took is not the next window's
        self.timer.restart()

    def _peek(self) -> None:
        """The live bar's first values, before the first log step: this process's loss and speed so far (its
        images times the processes), on the bar only; the window stays open."""
        loss_sum, images = self.tally.peek()
        seconds = self.clock.window_so_far()
        metrics = {"train/loss": loss_sum / images if images else None,
                   "perf/images_per_sec": images * self.world_size / max(seconds, 1e-9)}
        self.report.logged(self.progress.step, self._epoch_step(), metrics, run=self._run_time(), peek=True)

    def _run_time(self) -> dict[str, float | None]:
        """The run's wall time so far, and its time left: the steps left at the smoothed time a step, and the
        evaluations left at the last one's time."""
        config, step = self.config, self.progress.step
        steps_left = max(0, self.report.run_steps() - step)
        evaluations_left = config.epochs - self.progress.epoch + (steps_left // config.eval_every_steps
                                                                  if config.eval_every_steps else 0)
        return {"elapsed_s": self.clock.wall_seconds(), "eta_s": self.clock.run_eta(steps_left, evaluations_left)}

    def _start_clock(self) -> None:
        self.clock.start()
        self.timer.restart()

    def _pause_clock(self) -> None:
        """Stop the training clock (before an evaluation, a checkpoint, the epoch's end): a sync point, then the
        time since the clock last started counts as training, and the epoch's time and speed so far are noted."""
        self._sync()
        progress = self.progress
        progress.train_seconds += self.clock.pause()
        self.clock.epoch_so_far(progress.train_seconds, progress.epoch_images, self._slowest)

    def _epoch_step(self) -> int:
        """Optimizer steps done in this epoch."""
        return -(-self.progress.batch // self.config.grad_accum_steps)

    # ------------------------------------------------------------------ evaluation
    def evaluate_and_record(self) -> None:
        """Evaluate on the whole evaluation set (exact across processes), log it, note the accuracies reached,
        and ask the stop policy whether the run has reached its target or run out of patience."""
        progress, config = self.progress, self.config
        started = time.perf_counter()
        result = self.evaluate(on_batch=self.report.evaluating(len(self.data.eval)))
        self.clock.evaluation_seconds = time.perf_counter() - started
        self.last_evaluated_step = progress.step
        progress.wall_seconds = self.clock.wall_seconds()
        record = {"epoch": progress.epoch + 1, "step": progress.step,
                  "train_loss": progress.epoch_loss_sum / max(progress.epoch_images, 1),
                  "eval_loss": result.loss, "eval_accuracy": result.accuracy, "eval_correct": result.correct,
                  "eval_count": result.count, "lr": self.net.schedule.get_last_lr()[0],
                  "epoch_s": self.clock.epoch_seconds, "images_per_sec": self.clock.epoch_rate,
                  "global_batch_size": self.parts.global_batch_size,
                  "complete": progress.batch >= len(self.data.train),
                  "eval_weights": "average" if self.net.average else "trained",
                  "eval_split": "validation" if config.validation_samples else "test",
                  "images_seen": progress.images_seen, "train_seconds": progress.train_seconds,
                  "wall_seconds": progress.wall_seconds}
        if result.accuracy > progress.best_accuracy:
            progress.best_accuracy, progress.best_step = result.accuracy, progress.step
            progress.evaluations_since_best = 0
        else:
            progress.evaluations_since_best += 1
        for threshold in report.milestones(config):
            if result.accuracy >= threshold and f"{threshold:g}" not in progress.reached:
                progress.reached[f"{threshold:g}"] = {k: record[k] for k in ("step", "images_seen", "train_seconds",
                                                                              "wall_seconds")}
        self.stops.after_evaluation(progress.step, result.accuracy, progress.evaluations_since_best)
        if self.stops.stop and self.stops.stop.reason == "target_accuracy":
            reached = progress.reached[f"{config.target_accuracy:g}"]
            record.update(time_to_target_s=reached["train_seconds"], wall_time_to_target_s=reached["wall_seconds"],
                          images_to_target=reached["images_seen"])
        progress.history.append(record)
        # the confusion matrix and the digits it got wrong, as pictures (main process: it writes the trackers)
        pictures = plots.evaluation_images(result, self.data.eval.images) if self.runtime.is_main else None
        self.report.evaluated(record, pictures)

    def _close_epoch(self) -> None:
        progress = self.progress
        progress.epoch += 1
        progress.batch = 0
        progress.epoch_loss_sum, progress.epoch_images = 0.0, 0

    def evaluate(self, on_batch: Any = None) -> EvalResult:
        """The weights in use (`evaluated_model`) on the whole evaluation set, exact across processes; every
        process keeps its first misclassified examples (the selection gathers them), to draw them."""
        return evaluate(self.evaluated_model(), self.data.eval, self.accelerator, expected_count=self.data.eval.total,
                        keep_misclassified=plots.MISCLASSIFIED_SHOWN, on_batch=on_batch)

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

    def example_batch(self, train: bool = True) -> Batch:
        """A batch prepared as the loop prepares it: (images (B, 1, S, S), labels (B,)) on the device."""
        return next(iter(self.data.train.epoch(0) if train else self.data.eval))

    def evaluated_model(self) -> torch.nn.Module:
        """The weights evaluated and saved: their moving average if enabled, else the trained ones (never the
        DDP wrapper: evaluation runs no collectives)."""
        return self.net.average.module if self.net.average else self.net.network

    # ------------------------------------------------------------------ state and checkpoints
    def state_dict(self) -> Checkpoint:
        """The whole state of the run, for a checkpoint. Every process calls it: each contributes its random
        state."""
        net = self.net
        self.progress.wall_seconds = self.clock.wall_seconds()
        rng = gather_object([{"python": random.getstate(), "torch": devices.rng_state(self.runtime.torch_device)}])
        scaler = self.accelerator.scaler
        return Checkpoint(
            weights=self.evaluated_model().state_dict(),  # what evaluation saw: for use and export
            train_weights=net.network.state_dict() if net.average else None,  # where training goes on from
            trainer_state={"optimizer": net.optimizer.state_dict(), "scheduler": net.schedule.state_dict(),
                           "scaler": scaler.state_dict() if scaler else None, "rng": rng,
                           "ema_updates": net.average.updates if net.average else 0},
            progress=self.progress, config=self.config.to_dict(),
            meta={"world_size": self.world_size, "device": self.runtime.device,
                  "precision": self.runtime.precision})

    def load_state_dict(self, state: Checkpoint) -> None:
        """Continue from `state` (a loaded checkpoint); a UsageError if it is not a state of this run's recipe,
        or stopped mid-epoch with another number of processes."""
        source, net, run = state.path or "the checkpoint", self.net, self.runtime
        mismatches = resume_mismatches(state.config, self.config)
        if state.meta.get("precision", run.precision) != run.precision:
            mismatches.append(f"precision: checkpoint {state.meta.get('precision')!r}, this run {run.precision!r}")
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
        if net.average:
            checkpoint.load_weights_into(net.average.module, state.weights, Path(source) / checkpoint.WEIGHTS)
            checkpoint.load_weights_into(net.network, state.train_weights, Path(source) / checkpoint.TRAIN_WEIGHTS)
            net.average.updates = trainer_state["ema_updates"]
        else:
            checkpoint.load_weights_into(net.network, state.weights, Path(source) / checkpoint.WEIGHTS)
        try:
            net.optimizer.load_state_dict(trainer_state["optimizer"])
            net.schedule.load_state_dict(trainer_state["scheduler"])
        except (ValueError, KeyError, TypeError) as error:
            raise checkpoint.CheckpointError(f"{Path(source) / checkpoint.TRAINER_STATE} does not hold this run's "
                                             f"optimizer or schedule ({error})") from None
        if self.accelerator.scaler is not None and trainer_state.get("scaler"):
            self.accelerator.scaler.load_state_dict(trainer_state["scaler"])
        if same_world and state.meta.get("device") == run.device:
            rng = trainer_state["rng"][self.runtime.rank]
            random.setstate(rng["python"])
            devices.set_rng_state(run.torch_device, rng["torch"])
        else:
            self.report.print(f"note: {source} was saved by {state.meta.get('world_size')} process(es) on "
                              f"{state.meta.get('device')}; random state re-seeded for this run's processes")
        self.progress = state.progress
        self.saver.mark_saved(self.progress)
        self.tally = StepTally(run.torch_device, self.progress.step)
        self.clock.wall_before = self.progress.wall_seconds

    def resume(self, chosen: Checkpoint | None, path: Path) -> None:
        """Continue from the checkpoint at `path`, which the main process has loaded and checked (`chosen`,
        `saver.chosen_for_resume`): the other processes receive it from it rather than read it again (at 64
        processes, 64 reads of 0.75 GB from shared storage at once)."""
        state = chosen if self.world_size == 1 else from_main(chosen, self.runtime.torch_device)
        self.load_state_dict(state)
        self.folder.starts_at(self.progress.step)

    def save_checkpoint(self) -> None:
        """A sync point first (no non-finite step is ever saved); then every process contributes its state, the
        main process writes, and all wait for it."""
        if self.saver.saved(self.progress):
            return
        self._sync()
        state = self.state_dict()
        if self.runtime.is_main:
            self.report.flush()
        self.saver.save(state, self.progress.best_step)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ the end
    def _finish(self) -> int:
        """The end of the run, to its end or an early stop: the summary, the record of how it ended (before the
        last barrier: a launcher may end this process as soon as another has left), and the exit status."""
        progress, stop = self.progress, self.stops.stop
        self.profiler.stop()
        profile = (self.profiler.trace, self.profiler.table) if self.profiler.trace else None
        best = self.saver.best(progress.best_step)
        evaluations = (f"one evaluation every {self.config.eval_every_steps} steps" if self.config.eval_every_steps
                       else "one evaluation an epoch")
        rows = report.summary(progress, self.config, self.clock.wall_seconds(), best, self.folder.path,
                              f"{evaluations}: each time is that of the first evaluation at or above it")
        line = stop.message(self.config, self.folder.resume_flags) if stop else None
        self.report.finished(self._rank_rows(), line, rows, profile)
        status, reason = (stop.status, stop.reason) if stop else ("finished", None)
        self.folder.ended(status, reason)
        self.accelerator.wait_for_everyone()
        return stop.exit_code if stop else 0

    def _slowest(self, seconds: float) -> float:
        """The longest of every process's `seconds`: throughput is all processes' images over the slowest time."""
        return max(gather_object([seconds])) if self.world_size > 1 else seconds

    def _rank_rows(self) -> list[dict[str, Any]]:
        clock = self.clock
        mine = {"images": clock.session_images, "seconds": clock.session_seconds, "steps": clock.session_steps}
        rows = gather_object([mine]) if self.world_size > 1 else [mine]
        return [{"rank": rank, "images": row["images"], "seconds": row["seconds"],
                 "images_per_sec": row["images"] / max(row["seconds"], 1e-9),
                 "step_ms": 1000 * row["seconds"] / max(row["steps"], 1)}
                for rank, row in enumerate(rows)]

    # ------------------------------------------------------------------ short names for the parts
    @property
    def runtime(self) -> Any:
        return self.parts.runtime

    @property
    def data(self) -> Any:
        return self.parts.data

    @property
    def net(self) -> Any:
        return self.parts.training

    @property
    def accelerator(self) -> Any:
        return self.parts.runtime.accelerator

    @property
    def world_size(self) -> int:
        return self.parts.runtime.world_size
