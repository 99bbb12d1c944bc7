import os

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


@pytest.mark.slow
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


def _gpu(native: bool, emulated: bool):
    """A fake `torch.cuda.is_bf16_supported` for a GPU with or without native bf16 (Ampere on) and with or
    without PyTorch's emulated bf16 (a V100 or T4 says yes to the default call)."""
    return lambda including_emulation=True: native or (including_emulation and emulated)


def test_cuda_bf16_only_where_native(monkeypatch, cpu_only):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", _gpu(native=False, emulated=True))  # a V100 or T4
    assert devices.supported_precisions("cuda") == ("no", "fp16")
    assert devices.resolve_precision("cuda", "auto") == ("no", "auto for cuda")
    with pytest.raises(UsageError) as error:
        devices.resolve_precision("cuda", "bf16")
    assert str(error.value) == ("precision 'bf16' (config) is not supported on cuda: this GPU only emulates bf16 "
                                "(compute capability below 8.0): cuDNN has no bf16 convolutions there and it runs "
                                "slower than fp32; supported: no, fp16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", _gpu(native=False, emulated=False))
    with pytest.raises(UsageError, match="this GPU cannot compute in bf16"):
        devices.resolve_precision("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", _gpu(native=True, emulated=True))  # an A100 or H100
    assert devices.supported_precisions("cuda") == ("no", "fp16", "bf16")
    assert devices.resolve_precision("cuda", "auto") == ("bf16", "auto for cuda")


@pytest.mark.parametrize("version, older", [("2.7.1", True), ("2.8.0.dev20250601", True), ("2.8.0", False),
                                            ("2.8.0+cpu", False), ("2.14.1+cu130", False)])
def test_torch_versions_compare_as_accelerate_does(monkeypatch, version, older):
    monkeypatch.setattr(torch, "__version__", version)
    assert devices._torch_at_least("2.8") is not older


def test_mps_precisions_by_torch_and_macos(monkeypatch, cpu_only):
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    monkeypatch.setattr(torch, "__version__", "2.7.1")
    assert devices.supported_precisions("mps") == ("no", "bf16")
    assert devices.resolve_precision("mps", "auto") == ("no", "auto for mps")
    with pytest.raises(UsageError) as error:
        devices.resolve_precision("mps", "fp16")
    assert str(error.value) == ("precision 'fp16' (config) is not supported on mps: Accelerate's fp16 gradient "
                                "scaler needs torch >= 2.8 on MPS, this is torch 2.7.1 (upgrade torch for fp16); "
                                "supported: no, bf16")
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    assert devices.supported_precisions("mps") == ("no", "fp16", "bf16")
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: major < 14)  # macOS 13
    assert devices.supported_precisions("mps") == ("no", "fp16")
    with pytest.raises(UsageError, match="MPS computes bf16 from macOS 14 on; supported: no, fp16$"):
        devices.resolve_precision("mps", "bf16")


def test_compile_needs_metal_a_cpp_compiler_or_triton(monkeypatch):
    import importlib.util
    import shutil

    monkeypatch.setattr(torch, "__version__", "2.7.1")
    with pytest.raises(UsageError, match="compile on mps needs torch >= 2.8.*this is torch 2.7.1"):
        devices.check_compile("mps")
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    devices.check_compile("mps")

    real_which = shutil.which
    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="compile on cpu needs a C\\+\\+ compiler.* g\\+\\+ is not on PATH"):
        devices.check_compile("cpu")
    monkeypatch.setattr(shutil, "which", lambda name: real_which("sh") if name == "g++" else None)
    devices.check_compile("cpu")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "triton" else real_find_spec(name))
    with pytest.raises(UsageError, match="compile on cuda needs the triton package"):
        devices.check_compile("cuda")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "triton" else None)
    devices.check_compile("cuda")


@pytest.mark.parametrize("version, adamw, sgd", [("2.4.1", True, False), ("2.5.0", True, True),
                                                 ("2.6.0", True, True), ("2.14.1", True, True)])
def test_fused_optimizers_on_mps_by_torch_version(monkeypatch, version, adamw, sgd):
    monkeypatch.setattr(torch, "__version__", version)
    assert devices.has_fused_optimizers("mps", "adamw") is adamw
    assert devices.has_fused_optimizers("mps", "sgd", "bf16") is sgd
    # under fp16 the gradient scaler's arguments break both on MPS: SGD refuses them, Adam(W) ignores them
    assert not devices.has_fused_optimizers("mps", "adamw", "fp16")
    assert not devices.has_fused_optimizers("mps", "sgd", "fp16")


def test_fused_optimizers_on_cuda_and_cpu():
    assert devices.has_fused_optimizers("cuda") and devices.has_fused_optimizers("cpu")  # the device-level answer
    for device in ("cuda", "cpu"):
        assert devices.has_fused_optimizers(device, "adamw", "fp16") and devices.has_fused_optimizers(device, "sgd")
        assert not devices.has_fused_optimizers(device, "sgd", "fp16")
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        devices.has_fused_optimizers("cuda", "lion")


def _steps_through_an_overflow(fused: bool) -> torch.Tensor:
    """SGD with momentum, stepped the way a gradient scaler steps it (on the CPU, standing in for CUDA): a first
    step whose gradients overflowed, then a normal one. Returns the parameters."""
    param = torch.nn.Parameter(torch.ones(8))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9, nesterov=True, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    for weight in (1e36, 1.0):  # 1e36 x the scale overflows float32
        optimizer.zero_grad()
        scaler.scale((param * weight).sum()).backward()
        scaler.step(optimizer)  # a fused optimizer receives the overflow flag; the others are skipped
        scaler.update()
    return param.detach()


def test_fused_sgd_is_not_used_where_an_overflow_corrupts_it(monkeypatch):
    # With deterministic algorithms, torch.empty fills new memory with NaN: the uninitialised momentum shows.
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.isfinite(_steps_through_an_overflow(devices.has_fused_optimizers("cuda", "sgd", "fp16"))).all()
        # Why: fused SGD allocates its momentum buffers with empty_like and returns on the overflowed first step
        # before filling them. If this starts passing, torch has fixed it: fused SGD can come back under fp16.
        assert not torch.isfinite(_steps_through_an_overflow(fused=True)).all()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.fixture
def process_switches(monkeypatch):
    """configure() with its process-wide effects recorded instead of made: (calls, environment)."""
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms",
                        lambda mode: calls.append((mode, os.environ.get(devices.CUBLAS_WORKSPACE_ENV))))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.delenv(devices.CUBLAS_WORKSPACE_ENV, raising=False)
    return calls


def test_deterministic_cuda_sets_the_cublas_workspace_first(process_switches, monkeypatch):
    devices.configure("cuda", deterministic=False, cpu_threads=0, local_processes=1)
    assert devices.CUBLAS_WORKSPACE_ENV not in os.environ and torch.backends.cudnn.benchmark
    devices.configure("cuda", deterministic=True, cpu_threads=0, local_processes=1)
    # set by the time deterministic algorithms are switched on, before any model or batch exists
    assert process_switches == [(False, None), (True, ":4096:8")]
    assert os.environ[devices.CUBLAS_WORKSPACE_ENV] == ":4096:8" and not torch.backends.cudnn.benchmark
    monkeypatch.setenv(devices.CUBLAS_WORKSPACE_ENV, ":16:8")  # the other accepted value is kept
    devices.configure("cuda", deterministic=True, cpu_threads=0, local_processes=1)
    assert os.environ[devices.CUBLAS_WORKSPACE_ENV] == ":16:8"
    monkeypatch.setenv(devices.CUBLAS_WORKSPACE_ENV, ":0:0")
    with pytest.raises(UsageError, match="deterministic on cuda needs CUBLAS_WORKSPACE_CONFIG set to :4096:8 or "
                                         ":16:8, and the environment sets it to ':0:0'"):
        devices.configure("cuda", deterministic=True, cpu_threads=0, local_processes=1)


def test_deterministic_elsewhere_leaves_cublas_alone(process_switches):
    devices.configure("mps", deterministic=True, cpu_threads=0, local_processes=1)
    assert process_switches == [(True, None)] and devices.CUBLAS_WORKSPACE_ENV not in os.environ


def test_cuda_pools_natively_unless_deterministic_and_mps_only_where_sizes_divide(monkeypatch):
    assert devices.adaptive_pool_is_native("cuda", (3, 3), (5, 5))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not devices.adaptive_pool_is_native(torch.device("cuda", 0), (3, 3), (5, 5))
    assert devices.adaptive_pool_is_native("cpu", (3, 7), (5, 5))
    # MPS: a multiple of the output, or a divisor of it, on both axes, and both axes on the same side
    assert [devices.adaptive_pool_is_native("mps", (n, n), (5, 5)) for n in range(1, 16)] == \
        [n in (1, 5, 10, 15) for n in range(1, 16)]
    assert devices.adaptive_pool_is_native("mps", (10, 15), (5, 5))
    assert not devices.adaptive_pool_is_native("mps", (10, 12), (5, 5))
    assert devices.adaptive_pool_is_native("mps", (1, 5), (5, 5))
    assert not devices.adaptive_pool_is_native("mps", (2, 10), (5, 5))  # one axis smaller, the other larger


@pytest.mark.parametrize("device, optimizer, precision, honours", [
    ("cpu", "adamw", "no", True), ("cpu", "sgd", "bf16", True), ("cuda", "adamw", "bf16", True),
    ("cuda", "sgd", "no", True),
    ("cuda", "sgd", "fp16", False),  # not fused under fp16 (see has_fused_optimizers): nothing reads found_inf
    ("mps", "adamw", "no", False), ("mps", "sgd", "bf16", False),  # fused, but MPS's kernels ignore or refuse it
])
def test_which_optimizers_skip_an_update_on_the_device(device, optimizer, precision, honours):
    assert devices.honours_found_inf(device, optimizer, precision) is honours


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_cpu_fused_optimizers_skip_the_update_when_told_found_inf(optimizer):
    param = torch.nn.Parameter(torch.ones(4))
    kind = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    step = kind([param], lr=0.1, fused=devices.honours_found_inf("cpu", optimizer))
    param.grad = torch.ones(4)
    step.found_inf = torch.ones(())  # as the trainer sets it after a non-finite loss
    step.step()
    assert torch.equal(param.detach(), torch.ones(4))
    step.found_inf = torch.zeros(())
    step.step()
    assert (param.detach() < 1).all()
    # only fused kernels read it: the others assert it is unset
    unfused = kind([param], lr=0.1, foreach=False)
    unfused.found_inf = torch.ones(())
    with pytest.raises(AssertionError, match="found_inf"):
        unfused.step()


@pytest.fixture
def thread_count(monkeypatch):
    """configure("cpu", ...) with 2 usable cores, recording the thread count it sets."""
    counts = []
    monkeypatch.setattr(devices, "_usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", counts.append)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode: None)
    monkeypatch.setattr(devices, "_keep_freed_memory", lambda: None)
    return counts


def test_cpu_threads_are_bounded_by_the_cores_with_a_note(thread_count):
    assert devices.configure("cpu", deterministic=False, cpu_threads=0, local_processes=1) == []
    assert devices.configure("cpu", deterministic=False, cpu_threads=0, local_processes=2) == []
    assert devices.configure("cpu", deterministic=False, cpu_threads=2, local_processes=1) == []
    notes = devices.configure("cpu", deterministic=False, cpu_threads=100_000, local_processes=1)
    assert notes == ["cpu_threads: 100000 is more than the 2 cores this process may run on; using 2"]
    assert thread_count == [2, 1, 2, 2]


@pytest.fixture
def tf32_flags(monkeypatch):
    """The two process-wide TF32 flags, restored after the test (through the same flags configure sets)."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode: None)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_tf32_is_set_for_matmuls_and_convolutions_on_cuda(tf32_flags):
    assert devices.configure("cuda", deterministic=False, cpu_threads=0, local_processes=1) == []
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # on by default
    assert torch.get_float32_matmul_precision() == "high"  # still readable: inductor reads it when compiling
    devices.configure("cuda", deterministic=False, cpu_threads=0, local_processes=1, tf32=False)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"


def test_the_header_and_the_peak_follow_the_tf32_setting(monkeypatch):
    from toolkit import peaks

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert devices.describe_precision("cuda", "no", tf32=True) == "fp32 on TF32 tensor cores"
    assert devices.describe_precision("cuda", "no", tf32=False) == "fp32"
    assert peaks.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "no", tf32=True) == (494.7, "H100 SXM datasheet, tf32 dense")
    assert peaks.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "no", tf32=False) == (66.9, "H100 SXM datasheet, fp32 dense")
    assert devices.describe_precision("cuda", "bf16", tf32=True) == "bf16 autocast, fp32 weights"
    assert devices.describe_precision("mps", "no") == devices.describe_precision("cpu", "no") == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: no TF32
    assert devices.describe_precision("cuda", "no", tf32=True) == "fp32"
    assert peaks.gpu_peak_tflops("Tesla T4", "no", tf32=True) == (8.1, "T4 datasheet, fp32 dense")


def test_more_processes_than_gpus_are_refused_before_accelerate_starts(monkeypatch):
    from toolkit.errors import UserError

    monkeypatch.setattr(devices, "Accelerator", lambda **kwargs: pytest.fail("reached Accelerate"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # launch/multi_gpu.yaml on a 2-GPU machine
    with pytest.raises(UserError) as error:
        devices.build_accelerator("cuda", "bf16")
    assert str(error.value) == ("8 processes were started on this machine and it has 2 GPUs visible: start at most "
                                "one per GPU (accelerate launch --num_processes 2 ...)")
    assert error.value.exit_code == 2 and error.value.same_on_every_machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    devices.check_gpus_for_processes("cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    devices.check_gpus_for_processes("cpu")  # processes share the CPU (gloo)
