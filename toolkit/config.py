"""The training configuration: one dataclass whose defaults are the recommended recipe.

Precedence, lowest to highest: these defaults < the YAML file given with `--config` < command-line flags.
YAML keys and flags are the same words (`batch_size:` in a file, `--batch-size` or `--batch_size` on the
command line). Unknown keys and bad values stop the run with one line naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from toolkit.errors import UsageError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "no", "fp16", "bf16")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("constant", "cosine", "linear")
INITS = ("kaiming", "default")
# Keys that may differ between a checkpoint and the run resuming it: they change where things go and how
# often they are reported, not what is computed. Any other difference stops a resume.
RESUMABLE_CHANGES = frozenset({
    "data_dir", "download", "output_dir", "log_every_steps", "checkpoint_every_steps", "keep_last", "resume",
    "dist_timeout_s", "cpu_threads", "max_steps",
})


def _option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, minimum: float | None = None,
            below: float | None = None, positive: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum, "below": below,
                                            "positive": positive})


@dataclass(frozen=True)
class TrainConfig:
    # --- data ---
    data_dir: str = _option("", "MNIST root, the folder holding MNIST/raw/ ('' = $TOOLKIT_DATA_DIR, else ./data)")
    download: bool = _option(True, "download MNIST when its files are missing")
    image_size: int = _option(224, "MNIST's 28x28 images are resized to this many pixels, on the device",
                              minimum=65)
    normalize: bool = _option(True, "standardise pixels with MNIST's mean and std (false = raw [0, 1], "
                                    "as the reference)")
    shift_px: float = _option(2.0, "random translation of training images by up to this many MNIST pixels "
                                   "(0 = off)", minimum=0)
    train_samples: int = _option(0, "train on the first N training images (0 = all 60,000)", minimum=0)
    eval_samples: int = _option(0, "evaluate on the first N test images (0 = all 10,000)", minimum=0)
    validation_samples: int = _option(0, "hold out the last N training images and evaluate on them instead of the "
                                         "test set, to choose a recipe without looking at the test set (0 = evaluate "
                                         "on the test set)", minimum=0)
    # --- model ---
    init: str = _option("kaiming", "weight initialisation: kaiming, or default (PyTorch's, as the reference; "
                                   "it sits at chance for hundreds of steps)", choices=INITS)
    dropout: float = _option(0.5, "dropout before the last two linear layers", minimum=0, below=1)
    # --- optimisation ---
    epochs: int = _option(8, "passes over the training data", positive=True)
    max_steps: int = _option(0, "stop after this many optimizer steps (0 = no cap); the LR schedule still "
                                "spans `epochs`", minimum=0)
    batch_size: int = _option(128, "images per process per step; the global batch is this x processes",
                              positive=True)
    eval_batch_size: int = _option(500, "images per process per evaluation batch", positive=True)
    optimizer: str = _option("adamw", "adamw, or sgd (with `momentum`; plain SGD as the reference)",
                             choices=OPTIMIZERS)
    lr: float = _option(3e-4, "peak learning rate for the global batch (see README: scaling with the batch)",
                        positive=True)
    momentum: float = _option(0.9, "SGD momentum (0 = plain SGD, as the reference)", minimum=0, below=1)
    nesterov: bool = _option(True, "Nesterov momentum (SGD with momentum > 0 only)")
    weight_decay: float = _option(0.05, "weight decay (decoupled for adamw, L2 for sgd)", minimum=0)
    lr_schedule: str = _option("cosine", "constant, cosine or linear decay to zero over `epochs`",
                               choices=LR_SCHEDULES)
    warmup_steps: int = _option(100, "linear warm-up from 0 to `lr` over this many steps", minimum=0)
    label_smoothing: float = _option(0.0, "cross-entropy label smoothing", minimum=0, below=1)
    grad_clip: float = _option(0.0, "clip the global gradient norm at this value (0 = off)", minimum=0)
    ema_decay: float = _option(0.999, "evaluate and save an exponential moving average of the weights with this "
                                      "decay per step (0 = the weights themselves, as the reference)", minimum=0,
                              below=1)
    # --- hardware and reproducibility ---
    device: str = _option("auto", "auto (CUDA, else MPS, else CPU), cpu, cuda or mps", choices=DEVICES)
    precision: str = _option("auto", "no, fp16 or bf16; auto = `accelerate launch --mixed_precision` if given, "
                                     "else what the device does natively (bf16 on recent GPUs and CPUs)",
                             choices=PRECISIONS)
    channels_last: str = _option("auto", "channels-last memory format: auto (on for CPU and CUDA, off for MPS), "
                                         "true or false", choices=("auto", "true", "false"))
    cpu_threads: int = _option(0, "torch threads per process on the CPU (0 = the cores divided by the local "
                                  "processes)", minimum=0)
    seed: int = _option(0, "seed for initialisation, data order, augmentation and dropout", minimum=0)
    deterministic: bool = _option(False, "use deterministic algorithms only (slower on GPUs)")
    dist_timeout_s: int = _option(600, "seconds a process waits in a collective for the others before the job "
                                       "fails", positive=True)
    # --- outputs ---
    output_dir: str = _option("", "run folder ('' = runs/<timestamp>)")
    log_every_steps: int = _option(50, "log the training loss every N steps", positive=True)
    checkpoint_every_steps: int = _option(0, "also checkpoint every N steps (0 = at the end of each epoch "
                                             "only)", minimum=0)
    keep_last: int = _option(2, "keep this many recent checkpoints (the best one is kept apart)", positive=True)
    resume: str = _option("", "'' = start fresh; auto = the latest complete checkpoint in output_dir; "
                              "or a checkpoint folder")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def coerce(key: str, value: Any, source: str) -> Any:
    """Check and convert one value to its field's type; raise UsageError naming the key and its source."""
    if key not in FIELDS:
        close = _close_key(key)
        hint = f"; did you mean '{close}'?" if close else ""
        raise UsageError(f"unknown key '{key}'{hint} ({source})")
    spec = FIELDS[key]
    kind = type(spec.default)
    meta = spec.metadata

    def bad(expected: str) -> UsageError:
        return UsageError(f"{key}: expected {expected}, got {value!r} ({source})")

    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            value = value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise bad("an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string: accept any number written as text.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a finite number")
        value = float(value)
    else:
        if isinstance(value, bool) and meta["choices"] and "true" in meta["choices"]:
            value = "true" if value else "false"
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise bad("text")
        if meta["choices"] and value not in meta["choices"]:
            close = difflib.get_close_matches(value, meta["choices"], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"{key}: '{value}' is not one of {', '.join(meta['choices'])}{hint} ({source})")
    if meta["positive"] and value <= 0:
        raise UsageError(f"{key}: must be greater than 0, got {value} ({source})")
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise UsageError(f"{key}: must be at least {meta['minimum']:g}, got {value} ({source})")
    if meta["below"] is not None and value >= meta["below"]:
        raise UsageError(f"{key}: must be less than {meta['below']:g}, got {value} ({source})")
    return value


def _close_key(key: str) -> str | None:
    close = difflib.get_close_matches(key.replace("-", "_"), FIELDS, n=1)
    return close[0] if close else None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"config file {path} is not valid YAML{where}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must be a mapping of keys to values")
    return values


def from_dict(values: dict[str, Any], source: str, base: TrainConfig | None = None) -> TrainConfig:
    merged = (base or TrainConfig()).to_dict()
    for key, value in values.items():
        merged[key] = coerce(str(key), value, source)
    return TrainConfig(**merged)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one UsageError line instead of usage text, and never guesses
    a flag from its prefix."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser(prog: str, description: str, keys: Iterable[str] | None = None) -> ArgumentParser:
    """One flag per config key (all keys, or `keys`); with all keys also `--config PATH`. Flags default to
    'not given' so they only override."""
    parser = ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    if keys is None:
        parser.add_argument("--config", help="YAML file of config keys (e.g. configs/seed.yaml)")
    for name in keys or FIELDS:
        spec = FIELDS[name]
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        help_text = spec.metadata["help"] + f" [default: {spec.default!r}]"
        if type(spec.default) is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, metavar=name.upper(), help=help_text)
    return parser


def parse_args(argv: list[str] | None, prog: str = "toolkit.train",
               description: str = "Train AlexNet on MNIST.") -> TrainConfig:
    """Defaults < `--config` file < flags. Raises UsageError on any unknown key, flag or bad value."""
    parser = build_parser(prog, description)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0]
        close = _close_key(flag.lstrip("-").split("=")[0]) if flag.startswith("--") else None
        hint = f"; did you mean --{close.replace('_', '-')}?" if close else ""
        raise UsageError(f"unrecognised argument '{flag}'{hint}")
    flags = vars(args)
    config_path = flags.pop("config", None)
    config = TrainConfig()
    if config_path:
        config = from_dict(read_yaml(config_path), source=str(config_path))
    return from_dict({k: v for k, v in flags.items()}, source="command line", base=config)


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def resume_mismatches(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """Keys whose values differ between a checkpoint's config and this run, other than RESUMABLE_CHANGES."""
    now = current.to_dict()
    return [f"{key}: checkpoint {saved.get(key)!r}, this run {now[key]!r}"
            for key in now if key not in RESUMABLE_CHANGES and saved.get(key, now[key]) != now[key]]
