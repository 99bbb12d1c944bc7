"""Train AlexNet on MNIST with Hugging Face Accelerate: CPU, MPS, one GPU, or many processes with DDP.

    accelerate launch toolkit/train.py [--config configs/quick.yaml] [--epochs 2 --batch-size 128 ...]
    accelerate launch -m toolkit.train ...  (the same)
    python -m toolkit.train ...            (one process, no launcher)
    toolkit-train ...                      (the installed command)

Config precedence, lowest to highest: defaults (the recommended recipe) < `--config` file < flags.

This module is the command: it reads the config, takes the run folder, assembles the parts (`toolkit.assemble`),
and runs the loop (`toolkit.trainer`). Its imports are light, and the heavy ones come inside `main`, after the
signal handling is in place: a Ctrl-C while torch loads is one line, not a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.errors import exit_on_user_error
from toolkit.stopping import Signals

if TYPE_CHECKING:
    from toolkit.assemble import Parts, Split
    from toolkit.config import TrainConfig
    from toolkit.trainer import Trainer

PROG = "toolkit.train"


def main(argv: list[str] | None = None) -> int:
    with exit_on_user_error(PROG):
        signals = Signals()  # first: until training starts, a signal ends the command with one line
        try:
            return run(argv, signals)
        finally:
            signals.close()


def run(argv: list[str] | None, signals: Signals) -> int:
    from toolkit import devices
    from toolkit.agreement import lost_peer
    from toolkit.config import parse_args

    config = parse_args(argv)
    if config.smoke:
        return smoke(config, signals)
    out_of_memory = f"--image-size {config.image_size} and --batch-size {config.batch_size}"
    with devices.out_of_memory_named(out_of_memory), training_run(config, signals=signals) as trainer:
        try:
            with devices.out_of_memory_named(out_of_memory):
                return trainer.train()
        except Exception as error:
            failure = lost_peer(error, trainer.runtime.peers, trainer.saver.newest(), trainer.folder.resume_flags) \
                or error
            trainer.folder.failed(failure, trainer.progress.step)
            if failure is error:
                raise
            raise failure from None
        except BaseException as error:
            trainer.folder.failed(error, trainer.progress.step)
            raise


def smoke(config: TrainConfig, signals: Signals) -> int:
    """`--smoke`: the run its config makes smallest (config.SMOKE), then its checkpoint read back; in a temporary
    folder unless --output-dir names one."""
    import dataclasses
    import tempfile
    import time

    from toolkit import checkpoint

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="toolkit-smoke-") as scratch:
        kept = bool(config.output_dir)
        config = config if kept else dataclasses.replace(config, output_dir=str(Path(scratch) / "run"))
        with training_run(config, signals=signals) as trainer:
            code = trainer.train()
            newest = trainer.saver.newest()
            if code or newest is None:
                return code or 1
            checkpoint.load(newest)  # every file verified against its checksum, the state read back
            if trainer.runtime.is_main:
                where = f"the run is in {config.output_dir}" if kept else "nothing kept"
                trainer.report.print(f"smoke test passed in {time.perf_counter() - started:.0f} s: "
                                     f"{trainer.progress.step} steps, an evaluation, a checkpoint written and read "
                                     f"back ({where})")
    return 0


@contextmanager
def training_run(config: TrainConfig, quiet: bool = False, signals: Signals | None = None,
                 splits: tuple[Split, Split] | None = None, source: str = "") -> Iterator[Trainer]:
    """Everything a training run holds, built once and given back on the way out, in reverse order: the runtime
    (its process group ends last), the run folder (its lock; a new one goes again if the run fails before its
    first step), the report (the console, the trackers, the files). `splits` are images handed in instead of MNIST
    (a benchmark's); `quiet` keeps the console silent on every process."""
    from toolkit import assemble, rundir, tracking
    from toolkit.agreement import end_process_group
    from toolkit.console import TrainConsole
    from toolkit.report import RunReport, facts
    from toolkit.saver import chosen_for_resume
    from toolkit.trainer import Trainer

    tracking.check_installed(config.trackers)
    run = assemble.runtime(config)
    try:
        console = TrainConsole(run.is_main and not quiet)
        with rundir.claim(config.output_dir, config.resume, run.is_main, console.print) as folder:
            chosen, resumed = chosen_for_resume(config.resume, folder, run.is_main, console.print) \
                if config.resume else (None, None)
            parts = assemble.assemble(config, run, splits, source)
            report = RunReport(config, parts, folder, console)
            try:
                trainer = Trainer(parts, folder, report, config, signals)
                if resumed:
                    trainer.resume(chosen, resumed)
                started = f"{resumed} (step {trainer.progress.step})" if resumed else None
                report.begin(trainer.progress, facts(parts, folder, trainer.saver.bytes_per_checkpoint, started,
                                                     trainer.saver.slim_bytes),
                             startup_warnings(parts, trainer), resumed is not None)
                yield trainer
            finally:
                report.close()
    finally:
        end_process_group(run.accelerator)


def startup_warnings(parts: Parts, trainer: Any) -> list[str]:
    """What the run says before its first step, rather than when it matters an epoch in."""
    config, run, data = parts.config, parts.runtime, parts.data
    said = [f"note: {line}" for line in run.notes]
    if run.is_main:
        said.append(trainer.saver.disk_warning())
    said.append(warmup_warning(config.warmup_steps, parts.training.total_steps))
    said.append(elastic_store_warning())
    said.extend(f"warning: {why}" for why in config.without_effect())
    if config.train_samples > data.available:
        said.append(f"note: train_samples {config.train_samples:,} is more than the {data.available:,} training images "
                    f"there are: all of them are used")
    if config.batch_size > data.train.images_per_rank:
        said.append(f"note: batch_size {config.batch_size} is more than the {data.train.images_per_rank:,} training "
                    f"images each process has: each step takes {data.train.images_per_rank:,}")
    if config.grad_accum_steps > len(data.train):
        said.append(f"note: grad_accum_steps {config.grad_accum_steps} is more than the {len(data.train)} batches an "
                    f"epoch has: each optimizer step takes {len(data.train)}")
    said.append(profile_warning(config, trainer.progress.step, parts.training.total_steps))
    return [line for line in said if line]


def warmup_warning(warmup_steps: int, total_steps: int) -> str | None:
    if warmup_steps < total_steps:
        return None
    return (f"warning: warmup_steps {warmup_steps} is not below the run's {total_steps} optimizer steps: the "
            f"learning rate rises for the whole run and never decays (the warm-up is squeezed into the run, reaching "
            f"the peak lr at its last step); lower --warmup-steps")


def elastic_store_warning() -> str | None:
    """torchrun --max-restarts lends the workers its agent's store and keeps it across restarts: a restarted group
    may read the dead group's addresses there and fail to connect, or hang (pytorch#135712; docs/distributed.md)."""
    if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") == "0" or \
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return ("warning: torchrun --max-restarts shares its agent's store with the workers across restarts: a restarted "
            "group may fail to connect or hang; start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "(docs/distributed.md)")


def profile_warning(config: TrainConfig, step: int, total_steps: int) -> str | None:
    """Whether `profile_steps` lies beyond the steps this run will take (from `step` to its last)."""
    if not config.profile_range:
        return None
    first, last = config.profile_range
    end = min(total_steps, config.max_steps) if config.max_steps else total_steps
    if first > end or last <= step:
        return (f"warning: profile_steps {config.profile_steps} lies outside the steps this run takes ({step + 1} to "
                f"{end}): nothing will be recorded")
    if last > end:
        return (f"note: profile_steps {config.profile_steps} ends after the run's last step: steps {first} to "
                f"{end} will be recorded")
    return None


if __name__ == "__main__":
    sys.exit(main())
