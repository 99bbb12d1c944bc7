import dataclasses
import math
import os
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_module

from toolkit.config import (
    FIELDS,
    MAX_SEED,
    RESUMABLE_CHANGES,
    TrainConfig,
    build_parser,
    coerce,
    from_dict,
    parse_args,
    parse_duration,
    parse_step_range,
    parse_trackers,
    read_yaml,
    resume_mismatches,
    to_yaml,
)
from toolkit.errors import UsageError

CONFIGS = ROOT / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_flags_beat_file_beat_defaults(tmp_path):
    path = write(tmp_path, "batch_size: 32\nlr: 0.5\n")
    config = parse_args(["--config", str(path), "--lr", "0.25"])
    assert config.batch_size == 32  # file over default
    assert config.lr == 0.25  # flag over file
    assert config.epochs == TrainConfig().epochs  # default where neither speaks


def test_flags_take_hyphens_or_underscores_and_booleans():
    config = parse_args(["--batch-size", "7", "--eval_samples", "3", "--no-normalize", "--deterministic"])
    assert (config.batch_size, config.eval_samples, config.normalize, config.deterministic) == (7, 3, False, True)


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path):
    assert parse_args(["--config", str(write(tmp_path, "lr: 1e-3\n"))]).lr == 0.001


@pytest.mark.parametrize("text, message", [
    ("bach_size: 32\n", "unknown key 'bach_size'; did you mean 'batch_size'?"),
    ("batch_size: 0\n", "batch_size: must be greater than 0, got 0"),
    ("lr: -0.1\n", "lr: must be greater than 0, got -0.1"),
    ("precision: fp8\n", "precision: 'fp8' is not one of auto, no, fp16, bf16"),
    ("precision: bf61\n", "did you mean 'bf16'?"),
    ("epochs: two\n", "epochs: expected an integer, got 'two'"),
    ("image_size: 28\n", "image_size: must be at least 65, got 28"),
    ("ema_decay: 1.0\n", "ema_decay: must be less than 1, got 1.0"),
    ("normalize: maybe\n", "normalize: expected true or false"),
    ("- a\n- b\n", "must be a mapping of keys to values (batch_size: 64, one a line), not a list"),
    ("lr: [0.1\n", "is not valid YAML"),
])
def test_bad_config_file_names_the_key(tmp_path, text, message):
    with pytest.raises(UsageError, match=None) as error:
        parse_args(["--config", str(write(tmp_path, text))])
    assert message in str(error.value)
    assert error.value.exit_code == 2


def test_bad_flags():
    with pytest.raises(UsageError, match="did you mean --batch-size"):
        parse_args(["--batchsize", "3"])
    with pytest.raises(UsageError, match="batch_size: must be greater than 0"):
        parse_args(["--batch-size", "0"])
    with pytest.raises(UsageError, match="expected one argument"):
        parse_args(["--lr"])
    with pytest.raises(UsageError, match="does not exist"):
        parse_args(["--config", "no/such/file.yaml"])


def test_recommended_config_file_is_the_default():
    assert parse_args(["--config", str(CONFIGS / "alexnet_mnist.yaml")]) == TrainConfig()


def test_seed_config_is_the_reference_recipe():
    config = parse_args(["--config", str(CONFIGS / "seed.yaml")])
    assert (config.optimizer, config.lr, config.momentum, config.weight_decay, config.lr_schedule) == \
        ("sgd", 0.01, 0.0, 0.0, "constant")
    assert (config.batch_size, config.epochs, config.image_size, config.normalize, config.shift_px) == \
        (64, 10, 224, False, 0.0)
    assert (config.init, config.precision, config.label_smoothing, config.warmup_steps, config.ema_decay) == \
        ("default", "no", 0.0, 0, 0.0)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert read_yaml(path)
    parse_args(["--config", str(path)])


def test_resume_mismatch_lists_only_keys_that_change_the_computation():
    saved = TrainConfig().to_dict()
    current = parse_args(["--lr", "0.5", "--output-dir", "elsewhere", "--log-every-steps", "7"])
    assert resume_mismatches(saved, current) == [f"lr: checkpoint {TrainConfig().lr!r}, this run 0.5"]


@pytest.mark.slow
def test_command_line_error_is_one_line_and_exit_2():
    result = run_module("toolkit.train", "--batch-size", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "toolkit.train: error: batch_size: must be greater than 0, got 0 (command line)"]
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ every way of building a config is checked
@pytest.mark.parametrize("build, message", [
    (lambda: TrainConfig(batch_size=0), "batch_size: must be greater than 0, got 0"),
    (lambda: dataclasses.replace(TrainConfig(), lr=-1), "lr: must be greater than 0, got -1.0"),
    (lambda: TrainConfig(lr="x"), "lr: expected a finite number, got 'x'"),
    (lambda: TrainConfig(lr=float("nan")), "lr: expected a finite number, got nan"),
    (lambda: TrainConfig(epochs=True), "epochs: expected an integer, got True"),
    (lambda: TrainConfig(epochs=2.0), "epochs: expected an integer, got 2.0"),
    (lambda: TrainConfig(normalize=1), "normalize: expected true or false, got 1"),
    (lambda: TrainConfig(resume=None), "resume: has no value; expected text (e.g. resume: '')"),
    (lambda: TrainConfig(precision="fp8"), "precision: 'fp8' is not one of auto, no, fp16, bf16"),
    (lambda: TrainConfig(ema_decay=1), "ema_decay: must be less than 1, got 1.0"),
    (lambda: dataclasses.replace(TrainConfig(), image_size=28), "image_size: must be at least 65, got 28"),
    (lambda: from_dict({"batch_size": 0}, source="test"), "batch_size: must be greater than 0, got 0 (test)"),
    (lambda: from_dict({1: 2}, source="test"), "key 1 is not a config name (test)"),
])
def test_every_way_of_building_a_config_is_checked(build, message):
    with pytest.raises(UsageError) as error:
        build()
    assert str(error.value) == message
    assert error.value.exit_code == 2


def test_a_float_key_takes_an_int_as_a_float():
    config = TrainConfig(lr=1, grad_clip=2)
    assert (config.lr, config.grad_clip) == (1.0, 2.0)
    assert type(config.lr) is float and type(config.grad_clip) is float
    assert config == TrainConfig(lr=1.0, grad_clip=2.0)


@pytest.mark.parametrize("key, text, value", [
    ("batch_size", "0", 0), ("lr", "-0.1", -0.1), ("seed", "4294967296", 4294967296), ("precision", "fp8", "fp8"),
    ("target_accuracy", "1.5", 1.5), ("time_limit", "0m", "0m"), ("log_with", "none,aim", "none,aim"),
])
def test_the_parser_and_the_dataclass_share_one_rule(key, text, value):
    """The same bad value says the same thing typed on the command line and given in Python."""
    with pytest.raises(UsageError) as from_python:
        TrainConfig(**{key: value})
    with pytest.raises(UsageError) as from_flags:
        parse_args([f"--{key}", text])
    assert str(from_flags.value) == f"{from_python.value} (command line)"


def test_coerce_converts_text_then_checks():
    assert coerce("batch_size", "7", "x") == 7
    assert coerce("lr", "1e-3", "x") == 0.001
    assert coerce("normalize", "off", "x") is False
    assert coerce("channels_last", True, "x") == "true"  # YAML's `true` for a key whose choices are words
    assert coerce("time_limit", None, "x") == ""  # `time_limit:` with nothing after it
    with pytest.raises(UsageError, match=r"^unknown key 'bach_size'; did you mean 'batch_size'\? \(x\)$"):
        coerce("bach_size", 1, "x")


# ------------------------------------------------------------------ config files a user can hand over
def bad_file(path: Path | str) -> UsageError:
    with pytest.raises(UsageError) as error:
        parse_args(["--config", str(path)])
    assert error.value.exit_code == 2
    assert "\n" not in str(error.value)
    return error.value


def test_config_folder(tmp_path):
    assert str(bad_file(tmp_path)) == f"config file {tmp_path} is a folder: give a YAML file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_config_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    outcome: dict[str, str] = {}

    def attempt() -> None:
        try:
            read_yaml(fifo)
        except UsageError as error:
            outcome["error"] = str(error)

    started = time.monotonic()
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # blocked opening or reading it: give it a writer that closes at once, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail("read_yaml blocked on a FIFO")
    assert time.monotonic() - started < 5
    assert outcome["error"] == f"config file {fifo} is a FIFO (named pipe), not a regular file: give a YAML file"


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="no /dev/null")
def test_config_device_is_refused():
    # /dev/null would read as an empty config; /dev/zero and a terminal's /dev/stdin would never end
    assert str(bad_file("/dev/null")) == \
        "config file /dev/null is a character device, not a regular file: give a YAML file"


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_config_fifo_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    result = run_module("toolkit.train", "--config", str(fifo), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"toolkit.train: error: config file {fifo} is a FIFO (named pipe), not a regular file: give a YAML file"]


def test_empty_config_string_is_refused():
    assert str(bad_file("")) == "--config: give the path of a YAML file, got ''"


@pytest.mark.parametrize("data, message", [
    (b"lr: 0.1\nname: caf\xe9\n", "is not UTF-8 text (byte 0xe9 at position 17, line 2)"),
    (b"\xff\xfeb\x00a\x00", "is not UTF-8 text (byte 0xff at position 0, line 1)"),  # UTF-16
    (b"\x7fELF\x02\x01\x01\x00\x00\x00", "is binary, not YAML text (a NUL byte at position 7)"),
    (b"- a\n- b\n", "must be a mapping of keys to values (batch_size: 64, one a line), not a list"),
    (b"[]\n", "not a list"),
    (b"0\n", "not the single value 0"),
    (b"hello\n", "not the single value hello"),
    (b"1: 2\n", ": key 1 is not a name: keys are config names such as batch_size"),
    (b"null: 3\n", ": key null is not a name"),
    (b"true: 3\n", ": key true is not a name"),
    (b"lr: {a: 1}\n", ": lr holds a mapping; each key takes one value (e.g. lr: 0.0003)"),
    (b"lr:\n  a: 1\n", ": lr holds a mapping"),
    (b"epochs: [1, 2]\n", ": epochs holds a list; each key takes one value (e.g. epochs: 8)"),
    (b"a: 1\n---\nb: 2\n", "holds 2 YAML documents (separated by ---): a config is one document"),
    (b"lr: 0.1\nepochs: 2\nlr: 0.5\n", ": lr is set twice (lines 1 and 3): keep one"),
    (b"a: [1\n---\nb: 2\n", "is not valid YAML at line 2"),
    (b"[" * 100_000, "is nested too deeply to be a config"),
    (b"seed: " + b"1" * 5000 + b"\n", "holds a value YAML cannot read (Exceeds the limit (4300 digits)"),
    (b"output_dir: 2024-13-45\n", "holds a value YAML cannot read (month must be in 1..12)"),
    (b"# " + b"x" * (1 << 20) + b"\n", "is larger than 1 MiB"),
])
def test_bad_config_files(tmp_path, data, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    assert message in str(bad_file(path))


@pytest.mark.parametrize("data", [b"", b"\n\n", b"# only a comment\n", b"~\n"])
def test_empty_config_file_holds_no_keys(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    assert read_yaml(path) == {}
    assert parse_args(["--config", str(path)]) == TrainConfig()


def test_config_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbfepochs: 3\n")
    assert parse_args(["--config", str(path)]).epochs == 3


def test_yaml_colon_numbers_stay_text(tmp_path):
    # YAML 1.1 reads 10:20 as the base-60 number 620
    config = parse_args(["--config", str(write(tmp_path, "profile_steps: 10:20\n"))])
    assert config.profile_steps == "10:20"
    assert str(bad_file(write(tmp_path, "batch_size: 1:04\n"))) == \
        f"batch_size: expected an integer, got '1:04' ({tmp_path / 'c.yaml'})"


def test_number_for_a_key_with_a_syntax_gets_that_keys_message(tmp_path):
    assert str(bad_file(write(tmp_path, "time_limit: 90\n"))) == \
        f"time_limit: '90' is not a duration: write it like 90m, 3h, 1h30m, 45s or 2d ({tmp_path / 'c.yaml'})"


def test_saved_config_reads_back_as_the_same_config(tmp_path):
    config = TrainConfig(profile_steps="10:20", time_limit="1h30m", log_with="wandb,aim", seed=MAX_SEED,
                         channels_last="false", precision="no")
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(config))
    assert from_dict(read_yaml(path), source=str(path)) == config
    assert from_dict(yaml.safe_load(path.read_text()), source=str(path)) == config  # as checkpoints read it


# ------------------------------------------------------------------ seed
def test_seed_is_bounded_for_every_generator():
    assert MAX_SEED == 2**31 - 1
    assert parse_args(["--seed", str(MAX_SEED)]).seed == MAX_SEED
    with pytest.raises(UsageError) as error:
        parse_args(["--seed", "4294967296"])
    assert str(error.value) == "seed: must be at most 2147483647, got 4294967296 (command line)"
    with pytest.raises(UsageError, match="seed: must be at least 0, got -1"):
        TrainConfig(seed=-1)
    assert "0 to 2147483647" in FIELDS["seed"].metadata["help"]


def test_largest_seed_suits_the_generators_the_trainer_seeds():
    """The code that seeds, called with the largest seed: the per-process seed of the 1024th process
    (accelerate's set_seed, which seeds Python, numpy and torch) and the data order of epoch 10,000."""
    from accelerate.utils import set_seed

    from toolkit.data import epoch_permutation

    ranks = 1024
    set_seed(MAX_SEED + ranks - 1)  # assemble.training: set_seed(seed + rank)
    assert len(epoch_permutation(10, MAX_SEED, 10_000)) == 10
    with pytest.raises(ValueError):  # one past it fails numpy, whose seeds stop at 2**32 - 1
        set_seed(2**32)


# ------------------------------------------------------------------ new keys
def test_new_keys_defaults():
    config = TrainConfig()
    assert (config.compile, config.grad_accum_steps, config.target_accuracy, config.eval_every_steps,
            config.early_stop_patience, config.time_limit, config.profile_steps, config.log_with) == \
        (False, 1, 0.0, 0, 0, "", "", "tensorboard")
    assert config.trackers == ["tensorboard"]
    assert parse_duration(config.time_limit) == math.inf
    assert parse_step_range(config.profile_steps) is None


@pytest.mark.parametrize("flags, key, value", [
    (["--compile"], "compile", True),
    (["--no-compile"], "compile", False),
    (["--grad-accum-steps", "4"], "grad_accum_steps", 4),
    (["--target-accuracy", "0.99"], "target_accuracy", 0.99),
    (["--target-accuracy", "1"], "target_accuracy", 1.0),
    (["--eval-every-steps", "200"], "eval_every_steps", 200),
    (["--early-stop-patience", "3"], "early_stop_patience", 3),
    (["--time-limit", "1h30m"], "time_limit", "1h30m"),
    (["--profile-steps", "10:20"], "profile_steps", "10:20"),
    (["--log-with", "wandb, mlflow"], "log_with", "wandb, mlflow"),
    (["--log-with", "none"], "log_with", "none"),
])
def test_new_keys_take_good_values(flags, key, value):
    assert getattr(parse_args(flags), key) == value


@pytest.mark.parametrize("flags, message", [
    (["--grad-accum-steps", "0"], "grad_accum_steps: must be greater than 0, got 0"),
    (["--grad-accum-steps", "1.5"], "grad_accum_steps: expected an integer, got '1.5'"),
    (["--target-accuracy", "99"], "target_accuracy: must be at most 1, got 99.0"),
    (["--target-accuracy", "-0.1"], "target_accuracy: must be at least 0, got -0.1"),
    (["--eval-every-steps", "-1"], "eval_every_steps: must be at least 0, got -1"),
    (["--early-stop-patience", "-1"], "early_stop_patience: must be at least 0, got -1"),
    (["--time-limit", "90"], "time_limit: '90' is not a duration: write it like 90m, 3h, 1h30m, 45s or 2d"),
    (["--time-limit", "30m1h"], "time_limit: '30m1h' is not a duration"),
    (["--time-limit", "1.5h"], "time_limit: '1.5h' is not a duration"),
    (["--time-limit", "0h0m"], "time_limit: must be greater than 0, got '0h0m'"),
    (["--time-limit", "366d"], "time_limit: must be at most 365d, got '366d'"),
    (["--time-limit", "9" * 400 + "s"], "time_limit: must be at most 365d"),
    (["--profile-steps", "10-20"], "profile_steps: '10-20' is not a step range: write A:B, e.g. 10:20"),
    (["--profile-steps", "10"], "profile_steps: '10' is not a step range"),
    (["--profile-steps", "0:5"], "profile_steps: steps count from 1, got '0:5'"),
    (["--profile-steps", "9:5"], "profile_steps: the first step must not come after the last, got '9:5'"),
    (["--log-with", "tensorbord"], "log_with: 'tensorbord' is not one of tensorboard, wandb, mlflow, aim, comet_ml, "
                                   "clearml, dvclive, or none; did you mean 'tensorboard'?"),
    (["--log-with", "none,wandb"], "log_with: none stands alone, got 'none,wandb'"),
    (["--log-with", ""], "log_with: '' is not one of"),
    (["--log-with", "wandb,"], "log_with: '' is not one of"),
])
def test_new_keys_refuse_bad_values(flags, message):
    with pytest.raises(UsageError) as error:
        parse_args(flags)
    assert message in str(error.value)
    assert str(error.value).endswith(" (command line)")


@pytest.mark.parametrize("text, seconds", [
    ("45s", 45), ("90m", 5400), ("3h", 10800), ("1h30m", 5400), ("2d", 172800), ("1d2h3m4s", 93784),
    ("365d", 365 * 86400), ("", math.inf),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds
    assert type(parse_duration(text)) is float


def test_parse_step_range():
    assert parse_step_range("10:20") == (10, 20)
    assert parse_step_range("1:1") == (1, 1)
    assert parse_step_range("") is None
    with pytest.raises(UsageError, match="profile_steps: steps count from 1"):
        parse_step_range("0:0")


def test_trackers_are_in_order_each_once():
    assert parse_trackers("wandb, tensorboard,wandb") == ["wandb", "tensorboard"]
    assert TrainConfig(log_with="aim,comet_ml,aim").trackers == ["aim", "comet_ml"]
    assert TrainConfig(log_with="none").trackers == []


def test_help_lists_every_key_with_its_default():
    # argparse wraps lines at hyphens too ("reduce-" / "overhead"): joined back without the space
    text = " ".join(build_parser("toolkit.train", "Train.").format_help().split()).replace("- ", "-")
    for name, spec in FIELDS.items():
        flag = f"--{name.replace('_', '-')}"
        if type(spec.default) is bool:
            assert f"{flag}, --no-{name.replace('_', '-')}" in text
        else:
            assert flag in text
        assert f"{spec.metadata['help']} [default: {spec.default!r}]".replace("- ", "-") in text, name


# ------------------------------------------------------------------ resuming
def test_resumable_keys_are_config_keys():
    assert RESUMABLE_CHANGES <= set(FIELDS)


def test_resume_ignores_the_new_keys_that_do_not_change_the_computation():
    saved = TrainConfig().to_dict()
    current = parse_args(["--compile", "--target-accuracy", "0.99", "--eval-every-steps", "100",
                          "--early-stop-patience", "3", "--time-limit", "3h", "--profile-steps", "5:10",
                          "--log-with", "none"])
    assert resume_mismatches(saved, current) == []
    assert resume_mismatches(current.to_dict(), TrainConfig()) == []
    assert resume_mismatches(saved, parse_args(["--grad-accum-steps", "2"])) == \
        ["grad_accum_steps: checkpoint 1, this run 2"]


def test_checkpoint_from_before_a_key_existed_had_its_default():
    saved = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("grad_accum_steps", "validation_samples")}
    assert resume_mismatches(saved, TrainConfig()) == []
    assert resume_mismatches(saved, TrainConfig(grad_accum_steps=4, validation_samples=100)) == [
        "validation_samples: checkpoint 0, this run 100", "grad_accum_steps: checkpoint 1, this run 4"]


def test_keys_that_have_no_effect_are_named():
    assert TrainConfig(momentum=0.5).without_effect() == [
        "momentum has no effect: it is SGD's, and the optimizer is adamw"]
    assert TrainConfig(nesterov=False).without_effect() == [
        "nesterov has no effect: it is SGD's, and the optimizer is adamw"]
    assert TrainConfig(optimizer="sgd", momentum=0.5).without_effect() == []
    assert TrainConfig().without_effect() == []
