"""Everything that differs between CPU, CUDA and MPS lives here: which devices exist, what precision each
does (TF32 included), which kernels each lacks (the adaptive pool, optimizers that skip a step on the device),
processes per GPU, memory format, thread count, synchronisation and clocks, timing events, memory figures and
random state."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from packaging.version import Version

from toolkit.errors import UsageError, UserError

# Preference order for `auto`.
DEVICE_ORDER = ("cuda", "mps", "cpu")
PRECISIONS = ("no", "fp16", "bf16")
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
DETERMINISTIC_CUBLAS_WORKSPACES = (":4096:8", ":16:8")  # the two values PyTorch's reproducibility notes accept
# The optimizers the trainer builds, and the first torch release with each one's fused kernel on MPS:
# AdamW in pytorch#127242 (2.4), SGD in pytorch#129350 (2.5). CUDA and the CPU have both in every allowed torch.
FUSED_ON_MPS_SINCE = {"adamw": "2.4", "sgd": "2.5"}


def _torch_at_least(version: str) -> bool:
    """Whether the running torch is `version` or newer, compared the way Accelerate compares it (packaging):
    a pre-release such as 2.8.0.dev counts as older than 2.8, and a local tag such as +cu130 is ignored."""
    return Version(str(torch.__version__)) >= Version(version)


def available() -> list[str]:
    """Devices this machine has, best first. The CPU is always there."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if torch.backends.mps.is_available():
        found.append("mps")
    found.append("cpu")
    return found


def resolve(requested: str) -> str:
    """`auto` becomes the best device; a device that is not there is a UsageError listing those that are."""
    present = available()
    if requested == "auto":
        return present[0]
    if requested not in DEVICE_ORDER:
        raise UsageError(f"unknown device '{requested}': choose auto, {', '.join(DEVICE_ORDER)}")
    if requested not in present:
        raise UsageError(f"device '{requested}' is not available on this machine; available: "
                         f"{', '.join(present)} (or --device auto)")
    return requested


def _cpu_has_native_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def precision_problem(device: str, precision: str) -> str:
    """Why `device` cannot train (or evaluate) in `precision` on this machine, or "" when it can.

    - CPU: fp16 is refused: Accelerate accepts it there and then trains in fp32, a silent switch.
    - CUDA: bf16 only where the GPU computes it natively (compute capability 8.0+, Ampere on).
      `torch.cuda.is_bf16_supported()` also says yes on a V100 or T4, where bf16 is emulated: it only checks that
      a bf16 tensor can be made there. cuDNN has no bf16 convolutions below 8.0 and emulated bf16 runs slower than
      fp32, so such a GPU is refused bf16 with that reason (fp16 is its mixed precision), not allowed with a warning.
    - MPS: fp16 needs torch 2.8: Accelerate builds a gradient scaler for fp16, and refuses to on MPS before 2.8
      (`accelerate.utils.modeling.get_grad_scaler`), so the run would fail at construction. bf16 needs macOS 14
      (MPS has no bf16 before it) and torch 2.6 (bf16 autocast on MPS; Accelerate checks it too).
    """
    if precision not in PRECISIONS:
        return f"unknown precision; choose one of {', '.join(PRECISIONS)}"
    if precision == "no":
        return ""
    if device == "cpu" and precision == "fp16":
        return "Accelerate would accept fp16 on the CPU and silently train in fp32"
    if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        if torch.cuda.is_bf16_supported(including_emulation=True):
            return ("this GPU only emulates bf16 (compute capability below 8.0): cuDNN has no bf16 convolutions "
                    "there and it runs slower than fp32")
        return "this GPU cannot compute in bf16"
    if device == "mps" and precision == "fp16" and not _torch_at_least("2.8"):
        return (f"Accelerate's fp16 gradient scaler needs torch >= 2.8 on MPS, this is torch {torch.__version__} "
                f"(upgrade torch for fp16)")
    if device == "mps" and precision == "bf16":
        if not torch.backends.mps.is_macos_or_newer(14, 0):
            return "MPS computes bf16 from macOS 14 on"
        if not _torch_at_least("2.6"):
            return f"bf16 autocast on MPS needs torch >= 2.6, this is torch {torch.__version__}"
    return ""


def supported_precisions(device: str) -> tuple[str, ...]:
    """Precisions Accelerate can really run on this device, in PRECISIONS order (see `precision_problem`)."""
    return tuple(p for p in PRECISIONS if not precision_problem(device, p))


def native_precision(device: str) -> str:
    """What `precision: auto` means without a launcher setting: bf16 where the hardware computes it natively
    (never emulated bf16 on an older GPU); fp32 on MPS."""
    if device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    if device == "cpu" and _cpu_has_native_bf16():
        return "bf16"
    return "no"


def resolve_precision(device: str, requested: str) -> tuple[str, str]:
    """(precision, where it came from). An explicit setting wins over `accelerate launch --mixed_precision`,
    which wins over the device's native choice. A precision the device cannot do is a UsageError that says why
    and what the device can do instead."""
    launcher = os.environ.get(LAUNCHER_PRECISION_ENV, "no")
    if requested != "auto":
        precision, source = requested, "config"
    elif launcher != "no":
        precision, source = launcher, "accelerate launch"
    else:
        precision, source = native_precision(device), f"auto for {device}"
    problem = precision_problem(device, precision)
    if problem:
        raise UsageError(f"precision '{precision}' ({source}) is not supported on {device}: {problem}; "
                         f"supported: {', '.join(supported_precisions(device))}")
    return precision, source


def use_channels_last(device: str, setting: str = "auto") -> bool:
    """Channels-last speeds convolutions on CPU and CUDA; on MPS its convolution backward is far slower."""
    if setting != "auto":
        return setting == "true"
    return device != "mps"


def adaptive_pool_is_native(device: torch.device | str, in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Whether `F.adaptive_avg_pool2d` from `in_size` (h, w) to `out_size` runs forward and backward on `device`;
    where it does not, the model computes the same averages by matrix products.

    - CUDA with deterministic algorithms: its backward adds with atomics and raises.
    - MPS: see `_mps_pools`.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return not torch.are_deterministic_algorithms_enabled()
    if kind == "mps":
        return _mps_pools(in_size, out_size)
    return True


def _mps_pools(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """MPS's rule, from `set_kernel_params` in aten/src/ATen/native/mps/operations/AdaptivePooling.mm (every torch
    release to 2.14; pytorch#96056 is open, pytorch#192413 would lift it). MPS pools with one stride and kernel
    size through avg_pool2d, so it raises (NotImplementedError; a RuntimeError in older releases), in forward and
    in backward, unless either the input is at least the output on both axes and each input size is a multiple of
    the output size, or the input is at most the output on both axes and each output size is a multiple of the
    input size. The op has an MPS kernel, so PYTORCH_ENABLE_MPS_FALLBACK does not send it to the CPU."""
    (in_h, in_w), (out_h, out_w) = in_size, out_size
    if in_h >= out_h and in_w >= out_w:
        return in_h % out_h == 0 and in_w % out_w == 0
    if in_h <= out_h and in_w <= out_w:
        return out_h % in_h == 0 and out_w % in_w == 0
    return False


def has_fused_optimizers(device: str, optimizer: str = "", precision: str = "no") -> bool:
    """Whether `optimizer` ("adamw" or "sgd") can update all parameters in one fused kernel on `device` when
    training in `precision`. Without an optimizer: whether the device has fused optimizer kernels at all.

    fp16 is where fused kernels go wrong, because the gradient scaler hands them its scale and overflow flag
    instead of skipping the step itself:
    - fused SGD with momentum on an overflowing step returns before it fills the momentum buffers that it has
      just allocated with `torch.empty_like`, so the next step uses uninitialised memory (torch 2.6 to 2.14;
      tests/test_devices.py shows it on the CPU). Plain SGD is used under fp16 everywhere.
    - on MPS, fused SGD refuses the scaler's arguments ("grad_scale and found_inf are not supported on MPS") and
      fused Adam/AdamW ignore them, stepping on overflowed gradients (fixed only by pytorch#186360, 2026). No
      fused optimizer under fp16 on MPS.
    """
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    if device not in _get_fused_kernels_supported_devices():
        return False
    if not optimizer:
        return True
    if optimizer not in FUSED_ON_MPS_SINCE:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(FUSED_ON_MPS_SINCE)}")
    if device == "mps":
        return precision != "fp16" and _torch_at_least(FUSED_ON_MPS_SINCE[optimizer])
    return not (optimizer == "sgd" and precision == "fp16")


def honours_found_inf(device: str, optimizer: str, precision: str = "no") -> bool:
    """Whether the optimizer `build_optimizer` makes for (`device`, `optimizer`, `precision`) skips its update on
    the device when its `found_inf` attribute holds 1.0: then a step whose loss was not finite can be skipped
    without a host sync. Where it is False the update is applied, and the run stops at its next sync point,
    which comes before any checkpoint.

    Only fused kernels read `found_inf` (the for-loop and foreach paths assert it is None, torch/optim/adam.py
    and sgd.py). Of those:
    - CPU: `_fused_adam_kernel_cpu_` and `_fused_sgd_kernel_cpu_` return before touching anything
      (aten/src/ATen/native/FusedAdam.cpp, FusedSGD.cpp); tests/test_devices.py runs them.
    - CUDA: each block of the fused Adam(W) and SGD functors returns first
      (aten/src/ATen/native/cuda/fused_adam_utils.cuh, FusedSgdKernel.cu).
    - MPS: fused Adam(W) passes neither `grad_scale` nor `found_inf` to its Metal kernel
      (aten/src/ATen/native/mps/operations/FusedAdamWKernelImpl.mm: `multi_tensor_apply_for_fused_adam(...)`
      without them), so it updates anyway, and then torch/optim/adam.py's `_fused_adam` subtracts `found_inf`
      from the step counts, which leaves them behind the applied updates; fused SGD refuses both ("grad_scale and
      found_inf are not supported on MPS", FusedSgdKernel.mm), so setting it would fail every step.
      pytorch#186360 (2026) makes both read them; not relied on here, as the release that has it is not pinned.
    """
    return device != "mps" and has_fused_optimizers(device, optimizer, precision)


def check_compile(device: str) -> None:
    """Raise a UsageError saying why `torch.compile` cannot work on `device` here; return if it can.

    MPS: inductor's Metal backend arrived in torch 2.8. CPU: inductor writes C++ and builds it with the compiler
    named by `torch._inductor.config.cpp.cxx` ($CXX, else g++; clang++ on macOS). CUDA: inductor writes
    its kernels in Triton, so the `triton` package must be importable."""
    if device == "mps" and not _torch_at_least("2.8"):
        raise UsageError(f"compile on mps needs torch >= 2.8, whose inductor has a Metal backend; this is torch "
                         f"{torch.__version__}: upgrade torch, or turn compile off")
    if device == "cpu":
        import torch._inductor.config as inductor_config

        search = inductor_config.cpp.cxx if isinstance(inductor_config.cpp.cxx, (list, tuple)) \
            else (inductor_config.cpp.cxx,)
        compilers = [c for c in search if c]
        # None in the list: inductor may install g++ from conda-forge, when TORCH_INDUCTOR_INSTALL_GXX asks it to
        conda_gxx = None in search and os.environ.get("TORCH_INDUCTOR_INSTALL_GXX")
        if not conda_gxx and not any(shutil.which(c) for c in compilers):
            raise UsageError(f"compile on cpu needs a C++ compiler for the code inductor generates, and "
                             f"{' / '.join(compilers) or 'none'} is not on PATH: install one (or set $CXX to "
                             f"one), or turn compile off")
    if device == "cuda" and importlib.util.find_spec("triton") is None:
        raise UsageError("compile on cuda needs the triton package, in which inductor writes its GPU kernels: "
                         "install the triton version your torch names, or turn compile off")


class TooFewGPUs(UsageError):
    """Every process of the machine meets it alike; each machine's first process reports it (machines may differ)."""

    same_on_every_rank = False
    same_on_every_machine = True


def check_gpus_for_processes(device: str) -> None:
    """Refuse, in every process of this machine, to start more processes on it than it has GPUs.

    `launch/multi_gpu.yaml` has to name a process count (Accelerate refuses a config file without one: "You need
    to manually pass in `--num_processes`"); on a machine with fewer GPUs, the processes past the last GPU would
    die in Accelerate's `torch.cuda.set_device` with "CUDA error: invalid device ordinal" and a traceback each."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device != "cuda" or processes <= 1:
        return
    gpus = torch.cuda.device_count()
    if processes > gpus:
        raise TooFewGPUs(f"{processes} processes were started on this machine and it has {gpus} GPU"
                         f"{'' if gpus == 1 else 's'} visible: start at most one per GPU "
                         f"(accelerate launch --num_processes {gpus} ...)")


def build_accelerator(device: str, precision: str, timeout_s: int = 600) -> Accelerator:
    """An Accelerator on `device` (already resolved) in `precision`; the process-group timeout bounds how
    long a rank waits for a dead peer."""
    check_gpus_for_processes(device)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))])
    if accelerator.device.type != device:
        raise UsageError(f"Accelerate placed this process on {accelerator.device.type}, not {device}: "
                         f"check CUDA_VISIBLE_DEVICES and the launch config")
    return accelerator


def configure(device: str, deterministic: bool, cpu_threads: int, local_processes: int,
              tf32: bool = True) -> list[str]:
    """Process-wide switches: determinism, cuDNN autotuning, TF32 and the CPU thread count. Returns notes for
    the user, one line each (a thread count lowered to the cores there are), for the caller to print.

    Deterministic on CUDA sets CUBLAS_WORKSPACE_CONFIG (PyTorch raises on a cuBLAS call without it). It must be
    set before the process's first cuBLAS call: PyTorch reads it once, when it allocates the first cuBLAS
    workspace (`getChosenWorkspaceSize` in CublasHandlePool.cpp keeps it in a static). Call this right after
    `build_accelerator` and before the model is built: building the Accelerator only sets the device and joins
    the process group, which makes no cuBLAS call.

    `tf32` on CUDA (see `set_tf32`). `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, which
    halves CPU training speed on a 2-core machine: on the CPU the thread count is set here explicitly, at most
    the cores this process may run on (far more threads than cores crashed torch at 100,000 and took minutes
    a step at 1,000)."""
    if device == "cuda" and deterministic:
        workspace = os.environ.setdefault(CUBLAS_WORKSPACE_ENV, DETERMINISTIC_CUBLAS_WORKSPACES[0])
        if workspace not in DETERMINISTIC_CUBLAS_WORKSPACES:
            raise UsageError(f"deterministic on cuda needs {CUBLAS_WORKSPACE_ENV} set to "
                             f"{' or '.join(DETERMINISTIC_CUBLAS_WORKSPACES)}, and the environment sets it to "
                             f"'{workspace}': unset it, or turn deterministic off")
    torch.use_deterministic_algorithms(deterministic)
    notes = []
    if device == "cuda":
        torch.backends.cudnn.benchmark = not deterministic  # fixed shapes: autotuning pays off
        set_tf32(tf32)
    if device == "cpu":
        cores = _usable_cores()
        threads = cpu_threads or max(1, cores // max(1, local_processes))
        if threads > cores:
            notes.append(f"cpu_threads: {cpu_threads} is more than the {cores} cores this process may run on; "
                         f"using {cores}")
            threads = cores
        torch.set_num_threads(threads)
        _keep_freed_memory()
    return notes


def set_tf32(enabled: bool) -> None:
    """fp32 matmuls and convolutions on CUDA in TF32 (10-bit mantissa inputs, fp32 accumulation) on Ampere and
    newer, or in full fp32. PyTorch's defaults differ: TF32 for cuDNN convolutions, full fp32 for cuBLAS matmuls.

    Set through the `allow_tf32` flags, which keep both APIs readable: once the newer per-backend
    `fp32_precision` settings are written, torch (2.14 checked) raises on reading the flags and on
    `torch.get_float32_matmul_precision()`, which inductor calls when compiling ("mix of the legacy and new
    APIs")."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def uses_tf32(device: torch.device | str, precision: str, tf32: bool) -> bool:
    """Whether training computes on TF32 tensor cores: fp32 (`precision` "no") on a CUDA GPU that has them
    (Ampere, compute capability 8.0, and newer) with `tf32` on."""
    if torch.device(device).type != "cuda" or precision != "no" or not tf32:
        return False
    return torch.cuda.get_device_capability(torch.device(device))[0] >= 8


def describe_precision(device: torch.device | str, precision: str, tf32: bool = True) -> str:
    """The compute precision in words, for a run's header."""
    if precision == "bf16":
        return "bf16 autocast, fp32 weights"
    if precision == "fp16":
        return "fp16 autocast, fp32 weights, loss scaling"
    return "fp32 on TF32 tensor cores" if uses_tf32(device, precision, tf32) else "fp32"


def _keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS after every step.

    Each training step allocates and frees hundreds of MB (activations, the classifier's gradients); by
    default glibc returns those blocks to the kernel, and the next step pays for faulting in fresh zeroed
    pages. Keeping them roughly halves the step time of this network on a 2-core CPU (see benchmarks/)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)  # blocks up to 1 GiB come from the heap, not a fresh mmap
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)  # never shrink the heap
    libc.mallopt(m_top_pad, 1 << 30)  # grow it in 1 GiB steps (address space, not memory)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def clock(device: torch.device | str) -> Callable[[], float]:
    """`time.perf_counter` read once the device has done all the work queued so far, on CUDA and MPS alike: the
    one clock every timed window uses."""
    def now() -> float:
        synchronize(device)
        return time.perf_counter()

    return now


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work, so a timestamp taken next covers it."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


def name(device: torch.device | str) -> str:
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    if kind == "mps":
        return f"Apple {platform.machine()} GPU (MPS)"
    return cpu_model()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(device: torch.device | str) -> dict[str, int]:
    """CUDA: the allocator's peak since the last reset. MPS: memory allocated now and the driver's total.
    CPU: the process's peak resident set (it cannot be reset)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return {"cuda_peak_allocated": torch.cuda.max_memory_allocated()}
    if kind == "mps":
        return {"mps_allocated": torch.mps.current_allocated_memory(),
                "mps_driver_allocated": torch.mps.driver_allocated_memory()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"cpu_peak_rss": peak if sys.platform == "darwin" else peak * 1024}


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's and MPS's out-of-memory errors, and the CPU allocator's refusal ("can't allocate memory")."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class OutOfMemory(UserError):
    pass


@contextlib.contextmanager
def out_of_memory_named(what: str) -> Iterator[None]:
    """Turn the device's out-of-memory error (CUDA's, MPS's, the CPU allocator's) into one line saying what was
    asked for and what to lower."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise OutOfMemory(f"out of memory with {what}: lower them ({reason[:200]})") from None


def main_memory_bytes(peak: dict[str, int]) -> int | None:
    """The one figure of `peak_memory_bytes` to show: CUDA's peak, MPS's driver memory, the CPU's peak RSS."""
    for key in ("cuda_peak_allocated", "mps_driver_allocated", "cpu_peak_rss"):
        if key in peak:
            return peak[key]
    return None


class _HostEvent:
    """A CPU stand-in for a CUDA/MPS timing event: on the CPU the work is done when the host gets here."""

    def record(self) -> None:
        self.time = time.perf_counter()

    def elapsed_time(self, end: _HostEvent) -> float:
        return 1000 * (end.time - self.time)


def timing_event(device: torch.device | str) -> Any:
    """An event to `record()` in the device's stream of work, and later (after a sync) to ask for the
    `elapsed_time(end)` in milliseconds to another: the device's own clock, with no sync when recorded."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.Event(enable_timing=True)
    if kind == "mps":
        return torch.mps.Event(enable_timing=True)
    return _HostEvent()


def widest_float(device: torch.device | str) -> torch.dtype:
    """float64 for sums of many values, except on MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def empty_cache(device: torch.device | str) -> None:
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.empty_cache()
    elif kind == "mps":
        torch.mps.empty_cache()


def rng_state(device: torch.device | str) -> dict[str, torch.Tensor]:
    """The torch generators this process draws from: the CPU's and its accelerator's (Accelerate's own
    checkpoints leave MPS's out)."""
    kind = torch.device(device).type
    state = {"cpu": torch.get_rng_state()}
    if kind == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    elif kind == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(device: torch.device | str, state: dict[str, torch.Tensor]) -> None:
    kind = torch.device(device).type
    torch.set_rng_state(state["cpu"])
    if kind == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))
    elif kind == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])
