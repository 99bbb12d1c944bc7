from pathlib import Path

import pytest
from conftest import ROOT, run_module

from toolkit.config import TrainConfig, parse_args, read_yaml, resume_mismatches
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
    ("- a\n- b\n", "must be a mapping"),
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


def test_command_line_error_is_one_line_and_exit_2():
    result = run_module("toolkit.train", "--batch-size", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "toolkit.train: error: batch_size: must be greater than 0, got 0 (command line)"]
    assert "Traceback" not in result.stderr
