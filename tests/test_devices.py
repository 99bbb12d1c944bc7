import pytest
import torch

from toolkit import devices
from toolkit.errors import UsageError


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.delenv(devices.LAUNCHER_PRECISION_ENV, raising=False)


def test_auto_is_the_best_device_present(monkeypatch, cpu_only):
    assert devices.available() == ["cpu"]
    assert devices.resolve("auto") == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.resolve("auto") == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve("auto") == "cuda"


@pytest.mark.parametrize("missing", ["cuda", "mps"])
def test_missing_device_lists_those_present(cpu_only, missing):
    with pytest.raises(UsageError) as error:
        devices.resolve(missing)
    assert str(error.value) == f"device '{missing}' is not available on this machine; available: cpu " \
                               f"(or --device auto)"
    assert error.value.exit_code == 2


def test_missing_device_from_the_command_line_exits_2_with_one_line():
    from conftest import run_module

    present = devices.available()
    absent = next(d for d in ("mps", "cuda") if d not in present)
    result = run_module("toolkit.train", "--device", absent)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"device '{absent}' is not available" in lines[0]
    assert f"available: {', '.join(present)}" in lines[0]


def test_cpu_precisions(cpu_only):
    assert devices.supported_precisions("cpu") == ("no", "bf16")
    assert devices.resolve_precision("cpu", "no") == ("no", "config")
    assert devices.resolve_precision("cpu", "bf16") == ("bf16", "config")
    # Accelerate would silently train fp16-on-CPU in fp32: here it is an error.
    with pytest.raises(UsageError, match="precision 'fp16' \\(config\\) is not supported on cpu"):
        devices.resolve_precision("cpu", "fp16")


def test_auto_precision_follows_the_launcher_then_the_hardware(monkeypatch, cpu_only):
    monkeypatch.setattr(devices, "_cpu_has_native_bf16", lambda: False)
    assert devices.resolve_precision("cpu", "auto") == ("no", "auto for cpu")
    monkeypatch.setattr(devices, "_cpu_has_native_bf16", lambda: True)
    assert devices.resolve_precision("cpu", "auto") == ("bf16", "auto for cpu")
    monkeypatch.setenv(devices.LAUNCHER_PRECISION_ENV, "bf16")
    monkeypatch.setattr(devices, "_cpu_has_native_bf16", lambda: False)
    assert devices.resolve_precision("cpu", "auto") == ("bf16", "accelerate launch")
    assert devices.resolve_precision("cpu", "no") == ("no", "config")  # an explicit setting wins
    monkeypatch.setenv(devices.LAUNCHER_PRECISION_ENV, "fp16")
    with pytest.raises(UsageError, match="accelerate launch"):
        devices.resolve_precision("cpu", "auto")


def test_cuda_precisions_depend_on_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert devices.supported_precisions("cuda") == ("no", "fp16")
    assert devices.native_precision("cuda") == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.native_precision("cuda") == "bf16"


def test_channels_last_everywhere_but_mps():
    assert devices.use_channels_last("cpu") and devices.use_channels_last("cuda")
    assert not devices.use_channels_last("mps")
    assert devices.use_channels_last("mps", "true") and not devices.use_channels_last("cpu", "false")


def test_rng_state_round_trip_on_cpu():
    state = devices.rng_state("cpu")
    first = torch.rand(3)
    devices.set_rng_state("cpu", state)
    assert torch.equal(torch.rand(3), first)
