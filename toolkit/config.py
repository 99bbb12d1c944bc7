"""The training configuration: one dataclass whose defaults are the recommended recipe.

Precedence, lowest to highest: these defaults < the YAML file given with `--config` < command-line flags.
YAML keys and flags are the same words (`batch_size:` in a file, `--batch-size` or `--batch_size` on the
command line). Unknown keys and bad values stop the run with one line naming the key.

Every TrainConfig is checked when it is built, however it is built (`TrainConfig(...)`, `dataclasses.replace`,
`from_dict`, `parse_args`): the rules of a key sit in its field, and `_checked` is the one place that applies them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import reprlib
import stat
import sys
from collections.abc import Callable, Iterable
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
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive")
# The trainer seeds numpy with seed + rank (numpy takes < 2**32) and torch with seed * 1_000_003 + epoch
# (< 2**64): at most 2**31 - 1 leaves both valid for any number of processes.
MAX_SEED = 2**31 - 1
# A longer wait overflows timers (threading takes at most ~292 years) and is no limit anyway.
MAX_TIME_LIMIT_S = 365 * 86400
# Upper bounds of the number keys: past them a value is a typo, or overflows where it is used.
MAX_COUNT = 10**9  # steps, samples, evaluations: more than any run here takes
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_IMAGE_SIZE = 4096  # 18x the recipe's 224 px; a batch of 128 there needs about 80 GB of activations
MAX_SHIFT_PX = 14.0  # half of MNIST's 28 pixels
MAX_LR = 10.0
MAX_THREADS = 4096
MAX_DIST_TIMEOUT_S = 7 * 86400  # torch keeps it in milliseconds: far larger values overflow
# Keys that may differ between a checkpoint and the run resuming it: they change where things go, how often
# they are reported or evaluated, when the run stops and how fast it runs, not what a step computes. Any other
# difference stops a resume.
RESUMABLE_CHANGES = frozenset({
    "data_dir", "download", "output_dir", "log_every_steps", "checkpoint_every_steps", "keep_last", "resume",
    "dist_timeout_s", "cpu_threads", "max_steps", "compile", "eval_every_steps", "target_accuracy",
    "early_stop_patience", "time_limit", "profile_steps", "log_with", "eval_batch_size", "deterministic",
    "save_checkpoints", "tf32", "compile_mode", "slim_checkpoints", "smoke",
    # where it runs: another device continues the same recipe (its random state re-seeded, said so)
    "device",
    # compared as resolved by the trainer (auto may be the checkpoint's bf16): listed once, there
    "precision",
})


def parse_duration(text: str) -> float:
    """Seconds in a `time_limit` such as 90m, 3h, 1h30m, 45s or 2d (units in that order: d, h, m, s); '' (no
    limit) is math.inf, so `elapsed > parse_duration(...)` needs no branch. UsageError if it is not a duration,
    or not in (0, 365d]."""
    if text == "":
        return math.inf
    match = re.fullmatch(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?", text)
    if not match or not any(match.groups()):
        raise UsageError(f"time_limit: {_shown(text)} is not a duration: write it like 90m, 3h, 1h30m, 45s or 2d")
    # float(), not int(): a number of any length converts (to inf at worst) and is then refused as too long
    units = (86400, 3600, 60, 1)  # d, h, m, s
    seconds = sum(float(count) * unit for count, unit in zip(match.groups(), units, strict=True) if count)
    if seconds <= 0:
        raise UsageError(f"time_limit: must be greater than 0, got {_shown(text)}")
    if seconds > MAX_TIME_LIMIT_S:
        raise UsageError(f"time_limit: must be at most 365d, got {_shown(text)}")
    return seconds


def parse_step_range(text: str) -> tuple[int, int] | None:
    """(A, B) of a `profile_steps` 'A:B', optimizer steps counted from 1, both included; None for '' (off).
    UsageError unless 1 <= A <= B."""
    if text == "":
        return None
    match = re.fullmatch(r"([0-9]{1,18}):([0-9]{1,18})", text)
    if not match:
        raise UsageError(f"profile_steps: {_shown(text)} is not a step range: write A:B, e.g. 10:20")
    first, last = int(match[1]), int(match[2])
    if first < 1:
        raise UsageError(f"profile_steps: steps count from 1, got {_shown(text)}")
    if first > last:
        raise UsageError(f"profile_steps: the first step must not come after the last, got {_shown(text)}")
    return first, last


def parse_trackers(text: str) -> list[str]:
    """The trackers named in a `log_with` ('tensorboard,wandb'), in order, each once; [] for 'none'."""
    names = [name.strip() for name in text.split(",")]
    if names == ["none"]:
        return []
    for name in names:
        if name == "none":
            raise UsageError(f"log_with: none stands alone, got {_shown(text)}")
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"log_with: {_shown(name)} is not one of {', '.join(TRACKERS)}, or none{hint}")
    return list(dict.fromkeys(names))


def _option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, minimum: float | None = None,
            maximum: float | None = None, below: float | None = None, positive: bool = False,
            parse: Callable[[str], Any] | None = None) -> Any:
    """A field and its rules: `choices`, bounds (`minimum` and `maximum` included, `below` excluded, `positive`:
    above 0), or `parse`, a function that raises UsageError on text the key does not take."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum, "maximum": maximum,
                                            "below": below, "positive": positive, "parse": parse})


@dataclass(frozen=True)
class TrainConfig:
    # --- data ---
    data_dir: str = _option("", "MNIST root, the folder holding MNIST/raw/ ('' = $TOOLKIT_DATA_DIR, else ./data)")
    download: bool = _option(True, "download MNIST when its files are missing")
    image_size: int = _option(224, "MNIST's 28x28 images are resized to this many pixels, on the device",
                              minimum=65, maximum=MAX_IMAGE_SIZE)
    normalize: bool = _option(True, "standardise pixels with MNIST's mean and std (false = raw [0, 1], "
                                    "as the reference)")
    shift_px: float = _option(2.0, f"random translation of training images by up to this many MNIST pixels, at most "
                                   f"{MAX_SHIFT_PX} (half the 28-pixel image: further, the digit leaves it) (0 = off)",
                              minimum=0, maximum=MAX_SHIFT_PX)
    train_samples: int = _option(0, "train on the first N training images (0 = all 60,000)", minimum=0,
                                 maximum=MAX_COUNT)
    eval_samples: int = _option(0, "evaluate on the first N images of the evaluation set (0 = all: the 10,000 test "
                                   "images, or the held-out ones)", minimum=0, maximum=MAX_COUNT)
    validation_samples: int = _option(0, "hold out the last N training images and evaluate on them instead of the "
                                         "test set, to choose a recipe without looking at the test set (0 = evaluate "
                                         "on the test set)", minimum=0, maximum=MAX_COUNT)
    # --- model ---
    init: str = _option("kaiming", "weight initialisation: kaiming, or default (PyTorch's, as the reference; "
                                   "it sits at chance for hundreds of steps)", choices=INITS)
    dropout: float = _option(0.5, "dropout before the last two linear layers", minimum=0, below=1)
    # --- optimisation ---
    epochs: int = _option(8, "passes over the training data", positive=True, maximum=MAX_EPOCHS)
    max_steps: int = _option(0, "stop after this many optimizer steps (0 = no cap); the LR schedule still "
                                "spans `epochs`", minimum=0, maximum=MAX_COUNT)
    batch_size: int = _option(128, "images per process per micro-batch; the global batch is this x processes x "
                                   "grad_accum_steps", positive=True, maximum=MAX_BATCH)
    grad_accum_steps: int = _option(1, "micro-batches per optimizer step: gradients accumulate over this many "
                                       "batches (1 = a step per batch)", positive=True, maximum=MAX_BATCH)
    eval_batch_size: int = _option(500, "images per process per evaluation batch", positive=True,
                                   maximum=MAX_BATCH)
    optimizer: str = _option("adamw", "adamw, or sgd (with `momentum`; plain SGD as the reference)",
                             choices=OPTIMIZERS)
    lr: float = _option(3e-4, f"peak learning rate for the global batch (see README: scaling with the batch), at most "
                              f"{MAX_LR:g} (beyond it every optimizer here diverges at once)", positive=True,
                        maximum=MAX_LR)
    momentum: float = _option(0.9, "SGD momentum (0 = plain SGD, as the reference)", minimum=0, below=1)
    nesterov: bool = _option(True, "Nesterov momentum (SGD with momentum > 0 only)")
    weight_decay: float = _option(0.05, "weight decay (decoupled for adamw, L2 for sgd), at most 1", minimum=0,
                                  maximum=1)
    lr_schedule: str = _option("cosine", "constant, cosine or linear decay to zero over `epochs`",
                               choices=LR_SCHEDULES)
    warmup_steps: int = _option(100, "linear warm-up from 0 to `lr` over this many steps", minimum=0,
                                maximum=MAX_COUNT)
    label_smoothing: float = _option(0.0, "cross-entropy label smoothing", minimum=0, below=1)
    grad_clip: float = _option(0.0, "clip the global gradient norm at this value (0 = off)", minimum=0,
                               maximum=MAX_COUNT)
    ema_decay: float = _option(0.999, "evaluate and save an exponential moving average of the weights with this "
                                      "decay per step, reached after a warm-up of about 9 / (1 - decay) steps "
                                      "(0 = the weights themselves, as the reference)", minimum=0, below=1)
    # --- evaluation and stopping ---
    eval_every_steps: int = _option(0, "evaluate every N optimizer steps (0 = once per epoch, at its end)",
                                    minimum=0, maximum=MAX_COUNT)
    target_accuracy: float = _option(0.0, "stop with a checkpoint once an evaluation reaches this accuracy, a "
                                          "fraction (0.99 = 99%; 0 = off)", minimum=0, maximum=1)
    early_stop_patience: int = _option(0, "stop after N evaluations in a row without a new best accuracy "
                                          "(0 = off)", minimum=0, maximum=MAX_COUNT)
    time_limit: str = _option("", "wall-clock limit of this run's process: 90m, 3h, 1h30m, 45s or 2d, at most 365d "
                                  "('' = none)", parse=parse_duration)
    # --- hardware and reproducibility ---
    device: str = _option("auto", "auto (CUDA, else MPS, else CPU), cpu, cuda or mps", choices=DEVICES)
    precision: str = _option("auto", "no, fp16 or bf16; auto = `accelerate launch --mixed_precision` if given, "
                                     "else what the device does natively (bf16 on recent GPUs and CPUs)",
                             choices=PRECISIONS)
    tf32: bool = _option(True, "fp32 convolutions and matmuls on TF32 tensor cores (10-bit mantissa inputs, fp32 "
                               "sums; several times faster); only matters on CUDA GPUs from Ampere on, in fp32 "
                               "(precision no)")
    channels_last: str = _option("auto", "channels-last memory format: auto (on for CPU and CUDA, off for MPS), "
                                         "true or false", choices=("auto", "true", "false"))
    compile: bool = _option(False, "torch.compile the model: a slower first step, faster steps after (a run "
                                   "resumes from a checkpoint saved with or without it)")
    compile_mode: str = _option("default", "torch.compile's mode with compile on: default, reduce-overhead (CUDA "
                                           "graphs: the GPU replays each step's host work, for small batches on fast "
                                           "GPUs; elsewhere as default) or max-autotune",
                                choices=COMPILE_MODES)
    cpu_threads: int = _option(0, "torch threads per process on the CPU (0 = the cores divided by the local "
                                  "processes; more than the cores is lowered to them, saying so)", minimum=0,
                               maximum=MAX_THREADS)
    seed: int = _option(0, f"seed for initialisation, data order, augmentation and dropout, 0 to {MAX_SEED} "
                           f"(2**31 - 1: seed + rank must suit numpy)", minimum=0, maximum=MAX_SEED)
    deterministic: bool = _option(False, "use deterministic algorithms only (slower on GPUs)")
    dist_timeout_s: int = _option(600, "seconds a process waits in a collective for the others before the job "
                                       "fails, at most 7 days", positive=True, maximum=MAX_DIST_TIMEOUT_S)
    # --- outputs ---
    output_dir: str = _option("", "run folder ('' = runs/<timestamp>)")
    log_every_steps: int = _option(50, "log the training loss every N steps (under several processes, also how "
                                       "often they agree to stop on a signal)", positive=True, maximum=MAX_COUNT)
    log_with: str = _option("tensorboard", f"trackers to log to, comma-separated: {', '.join(TRACKERS)}; "
                                           f"or none", parse=parse_trackers)
    checkpoint_every_steps: int = _option(0, "also checkpoint every N steps (0 = at the end of each epoch "
                                             "only)", minimum=0, maximum=MAX_COUNT)
    keep_last: int = _option(1, "keep this many recent checkpoints (the best one is kept apart)", positive=True,
                             maximum=MAX_COUNT)
    slim_checkpoints: bool = _option(True, "the best checkpoint, kept apart from the newest keep_last, keeps what "
                                           "using the model needs, not what continuing the training does (the "
                                           "optimizer state): about a quarter of the size with adamw")
    save_checkpoints: bool = _option(True, "write checkpoints (false: nothing to resume from or to use afterwards; "
                                           "for benchmarks and trials)")
    resume: str = _option("", "'' = start fresh; auto = the latest complete checkpoint in output_dir; "
                              "or a checkpoint folder")
    profile_steps: str = _option("", "A:B = record optimizer steps A to B, both included (counted from 1, as "
                                     "logged), with torch.profiler ('' = off)", parse=parse_step_range)
    smoke: bool = _option(False, "a trial of the whole pipeline in seconds: 4 steps at 65 px on 256 images, an "
                                 "evaluation on 200, a checkpoint written and read back; in a temporary folder, gone "
                                 "afterwards, unless --output-dir is given (other keys as given)")

    def __post_init__(self) -> None:
        for key in FIELDS:
            # frozen: the checked value (an int given for a float key becomes a float) goes in past __setattr__
            object.__setattr__(self, key, _checked(key, getattr(self, key)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # the text keys as the code uses them, parsed here once
    @property
    def time_limit_s(self) -> float:
        """`time_limit` in seconds; math.inf without one."""
        return parse_duration(self.time_limit)

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """`profile_steps` as (first, last), both included; None when off."""
        return parse_step_range(self.profile_steps)

    @property
    def trackers(self) -> list[str]:
        """The trackers of `log_with`, in order, each once; [] for none."""
        return parse_trackers(self.log_with)

    def without_effect(self) -> list[str]:
        """Keys set away from their defaults that this config ignores, each with why."""
        ignored = []
        if self.optimizer == "adamw":
            for key in ("momentum", "nesterov"):
                if getattr(self, key) != FIELDS[key].default:
                    ignored.append(f"{key} has no effect: it is SGD's, and the optimizer is adamw")
        return ignored


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60


def _shown(value: Any) -> str:
    """A value as Python writes it, cut short: an error stays one readable line."""
    return _repr.repr(value)


def _number(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _checked(key: str, value: Any) -> Any:
    """The value if it is a valid `key` (as a float for a float key), else UsageError naming the key. The one
    place the rules of a key are applied, wherever its value comes from."""
    spec = FIELDS[key]
    kind = type(spec.default)
    rule = spec.metadata

    def bad(expected: str) -> UsageError:
        if value is None:  # `key:` with nothing after it in a YAML file
            return UsageError(f"{key}: has no value; expected {expected} (e.g. {key}: {_shown(spec.default)})")
        return UsageError(f"{key}: expected {expected}, got {_shown(value)}")

    if kind is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a finite number")
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            raise bad("a finite number") from None
        if not math.isfinite(value):
            raise bad("a finite number")
    else:
        if not isinstance(value, str):
            raise bad("text")
        if rule["choices"] and value not in rule["choices"]:
            close = difflib.get_close_matches(value, rule["choices"], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"{key}: {_shown(value)} is not one of {', '.join(rule['choices'])}{hint}")
        if rule["parse"]:
            rule["parse"](value)
        return value
    if rule["positive"] and value <= 0:
        raise UsageError(f"{key}: must be greater than 0, got {_shown(value)}")
    if rule["minimum"] is not None and value < rule["minimum"]:
        raise UsageError(f"{key}: must be at least {_number(rule['minimum'])}, got {_shown(value)}")
    if rule["maximum"] is not None and value > rule["maximum"]:
        raise UsageError(f"{key}: must be at most {_number(rule['maximum'])}, got {_shown(value)}")
    if rule["below"] is not None and value >= rule["below"]:
        raise UsageError(f"{key}: must be less than {_number(rule['below'])}, got {_shown(value)}")
    return value


def _from_text(key: str, value: Any) -> Any:
    """What a flag or a YAML file gives, as its key's type where the text says one clearly; anything else is left
    for `_checked` to refuse."""
    spec = FIELDS[key]
    kind = type(spec.default)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off",
                                                                     "1", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    if kind in (int, float) and isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as text: any number written as text is taken
        try:
            return kind(value)
        except ValueError:
            return value
    if kind is str:
        if isinstance(value, bool) and spec.metadata["choices"] and "true" in spec.metadata["choices"]:
            return "true" if value else "false"
        if value is None:  # `key:` with nothing after it in YAML
            return ""
        if spec.metadata["parse"] and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `time_limit: 90` in YAML: refused by the key's own rule, which says why
    return value


def coerce(key: str, value: Any, source: str) -> Any:
    """Convert one value from text (a flag, a YAML file) to its key's type and check it; raise UsageError naming
    the key and its source."""
    if key not in FIELDS:
        close = _close_key(key)
        hint = f"; did you mean '{close}'?" if close else ""
        raise UsageError(f"unknown key {_shown(key)}{hint} ({source})")
    try:
        return _checked(key, _from_text(key, value))
    except UsageError as error:
        raise UsageError(f"{error} ({source})") from None


def _close_key(key: str) -> str | None:
    close = difflib.get_close_matches(key.replace("-", "_"), FIELDS, n=1)
    return close[0] if close else None


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that `10:20` stays text: YAML 1.1 reads it as the base-60 number 620, which
    would turn `profile_steps: 10:20` into a number."""

    def resolve(self, kind: type, value: Any, implicit: Any) -> str:  # type: ignore[override]
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and ":" in value and tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
            return "tag:yaml.org,2002:str"
        return tag

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A mapping, refusing a key written twice: YAML would keep the last silently."""
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = lines.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class says what is wrong with it
                continue
            if first != key_node.start_mark.line + 1:
                raise DuplicateKey(key, first, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


class DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


MAX_CONFIG_BYTES = 1 << 20  # a config is a few lines: anything larger is the wrong file
_NOT_REGULAR = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def _config_bytes(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_CONFIG_BYTES; a device, FIFO or socket is refused before it is
    opened, as opening or reading one can block or never end (/dev/stdin, /dev/zero)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"config file {path} does not exist") from None
    except OSError as error:
        raise UsageError(f"config file {path} cannot be read ({error.strerror})") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"config file {path} is a folder: give a YAML file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a file")
        raise UsageError(f"config file {path} is {kind}, not a regular file: give a YAML file")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise UsageError(f"config file {path} cannot be read ({error.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UsageError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: give a YAML config file")
    return data


def _yaml_text(value: Any) -> str:
    """A key as the file wrote it (`null`, `1`, `true`), for messages."""
    return _shown(value) if isinstance(value, (list, dict)) else yaml.safe_dump(value).splitlines()[0]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The keys and values of a YAML config file; UsageError, one line, for anything else a user may hand over: a
    folder, a device, a FIFO, a binary or non-UTF-8 file, invalid YAML, a document that is not a mapping of names
    to single values. An empty file holds no keys."""
    path = Path(path)
    data = _config_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UsageError(f"config file {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at position "
                         f"{error.start}, line {line})") from None
    if "\0" in text:
        raise UsageError(f"config file {path} is binary, not YAML text (a NUL byte at position {text.index(chr(0))})")
    try:
        values = yaml.load(text, Loader=_YamlLoader)
    except DuplicateKey as error:
        raise UsageError(f"config file {path}: {_yaml_text(error.key)} is set twice (lines {error.first} and "
                         f"{error.again}): keep one") from None
    except yaml.composer.ComposerError as error:
        if "expected a single document" not in str(error):
            raise UsageError(f"config file {path} is not valid YAML") from None
        try:
            documents = str(sum(1 for _ in yaml.safe_load_all(text)))
        except yaml.YAMLError:
            documents = "several"
        raise UsageError(f"config file {path} holds {documents} YAML documents (separated by ---): a config is one "
                         f"document") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None)
        raise UsageError(f"config file {path} is not valid YAML{where}" + (f": {problem}" if problem else "")) \
            from None
    except RecursionError:
        raise UsageError(f"config file {path} is nested too deeply to be a config") from None
    except ValueError as error:  # PyYAML's constructors: a date like 2024-13-45, an integer of 5,000 digits
        raise UsageError(f"config file {path} holds a value YAML cannot read ({str(error).split(';')[0]})") from None
    if values is None:  # empty, or only comments
        return {}
    if not isinstance(values, dict):
        held = "a list" if isinstance(values, list) else f"the single value {_yaml_text(values)}"
        raise UsageError(f"config file {path} must be a mapping of keys to values (batch_size: 64, one a line), "
                         f"not {held}")
    for key, value in values.items():
        if not isinstance(key, str):
            raise UsageError(f"config file {path}: key {_yaml_text(key)} is not a name: keys are config names such "
                             f"as batch_size")
        if isinstance(value, (dict, list)):
            kind = "a mapping" if isinstance(value, dict) else "a list"
            raise UsageError(f"config file {path}: {key} holds {kind}; each key takes one value "
                             f"(e.g. {key}: {_yaml_text(FIELDS[key].default) if key in FIELDS else '...'})")
    return values


def from_dict(values: dict[str, Any], source: str, base: TrainConfig | None = None) -> TrainConfig:
    merged = (base or TrainConfig()).to_dict()
    for key, value in values.items():
        if not isinstance(key, str):
            raise UsageError(f"key {_shown(key)} is not a config name ({source})")
        merged[key] = coerce(key, value, source)
    return TrainConfig(**merged)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one UsageError line instead of usage text, and never guesses
    a flag from its prefix."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        return super().parse_known_args(self.values_attached(sys.argv[1:] if args is None else list(args)),
                                        namespace)

    def values_attached(self, args: list[str]) -> list[str]:
        """`--flag VALUE` as `--flag=VALUE` where VALUE starts with '-' and is no flag: argparse would take
        `--time-limit -5s` or `--lr -inf` for two flags and say "expected one argument", where the key's own
        rule has a better word for the value."""
        takes_value = {flag for action in self._actions if action.nargs is None for flag in action.option_strings}
        attached: list[str] = []
        index = 0
        while index < len(args):
            arg = args[index]
            value = args[index + 1] if index + 1 < len(args) else None
            if arg in takes_value and value is not None and value.startswith("-") \
                    and value.split("=")[0] not in self._option_string_actions:
                attached.append(f"{arg}={value}")
                index += 2
            else:
                attached.append(arg)
                index += 1
        return attached


class _Once(argparse.Action):
    """A flag that may be given once: a second `--config` would silently replace the first."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            raise UsageError(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}): give one "
                             f"file (copy the keys of both into it; flags override it)")
        setattr(namespace, self.dest, values)


def build_parser(prog: str, description: str, keys: Iterable[str] | None = None) -> ArgumentParser:
    """One flag per config key (all keys, or `keys`); with all keys also `--config PATH`. Flags default to
    'not given' so they only override."""
    parser = ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    if keys is None:
        parser.add_argument("--config", action=_Once, help="YAML file of config keys (e.g. configs/seed.yaml)")
    for name in keys or FIELDS:
        spec = FIELDS[name]
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        help_text = (spec.metadata["help"] + f" [default: {spec.default!r}]").replace("%", "%%")  # argparse formats it
        if type(spec.default) is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, metavar=name.upper(), help=help_text)
    return parser


# What `smoke` sets: the smallest run that still goes through every part (the network takes 65 px and up).
SMOKE = {"image_size": 65, "train_samples": 256, "eval_samples": 200, "validation_samples": 0, "batch_size": 64,
         "eval_batch_size": 100, "epochs": 1, "max_steps": 4, "warmup_steps": 2, "log_every_steps": 1,
         "eval_every_steps": 0, "checkpoint_every_steps": 0, "save_checkpoints": True, "grad_accum_steps": 1,
         "profile_steps": "", "time_limit": "", "target_accuracy": 0.0}


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
    if config_path == "":
        raise UsageError("--config: give the path of a YAML file, got ''")
    if config_path is not None:
        config = from_dict(read_yaml(config_path), source=str(config_path))
    config = from_dict(flags, source="command line", base=config)
    return dataclasses.replace(config, **SMOKE) if config.smoke else config


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def resume_mismatches(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """Keys whose values differ between a checkpoint's config and this run, other than RESUMABLE_CHANGES. A key
    the checkpoint does not hold (saved before the key existed) had its default."""
    now = current.to_dict()
    return [f"{key}: checkpoint {saved.get(key, FIELDS[key].default)!r}, this run {now[key]!r}"
            for key in now if key not in RESUMABLE_CHANGES and saved.get(key, FIELDS[key].default) != now[key]]
