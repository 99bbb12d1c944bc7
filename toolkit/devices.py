"""Everything that differs between CPU, CUDA and MPS lives here: which devices exist, what precision each
does, memory format, thread count, synchronisation, memory figures and random state."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import resource
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from toolkit.errors import UsageError

# Preference order for `auto`.
DEVICE_ORDER = ("cuda", "mps", "cpu")
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"


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


def supported_precisions(device: str) -> tuple[str, ...]:
    """Precisions Accelerate can really run on this device. fp16 on the CPU is not among them: Accelerate
    accepts it there and then trains in fp32, which would be a silent switch."""
    if device == "cuda":
        return ("no", "fp16", "bf16") if torch.cuda.is_bf16_supported() else ("no", "fp16")
    if device == "mps":
        return ("no", "fp16", "bf16") if torch.backends.mps.is_macos_or_newer(14, 0) else ("no", "fp16")
    return ("no", "bf16")


def native_precision(device: str) -> str:
    """What `precision: auto` means without a launcher setting: bf16 where the hardware computes it natively."""
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    if device == "cpu" and _cpu_has_native_bf16():
        return "bf16"
    return "no"


def resolve_precision(device: str, requested: str) -> tuple[str, str]:
    """(precision, where it came from). An explicit setting wins over `accelerate launch --mixed_precision`,
    which wins over the device's native choice. A precision the device cannot do is a UsageError."""
    launcher = os.environ.get(LAUNCHER_PRECISION_ENV, "no")
    if requested != "auto":
        precision, source = requested, "config"
    elif launcher != "no":
        precision, source = launcher, "accelerate launch"
    else:
        precision, source = native_precision(device), f"auto for {device}"
    if precision not in supported_precisions(device):
        raise UsageError(f"precision '{precision}' ({source}) is not supported on {device}; supported: "
                         f"{', '.join(supported_precisions(device))}")
    return precision, source


def use_channels_last(device: str, setting: str = "auto") -> bool:
    """Channels-last speeds convolutions on CPU and CUDA; on MPS its convolution backward is far slower."""
    if setting != "auto":
        return setting == "true"
    return device != "mps"


def has_fused_optimizers(device: str) -> bool:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return device in _get_fused_kernels_supported_devices()


def build_accelerator(device: str, precision: str, timeout_s: int = 600) -> Accelerator:
    """An Accelerator on `device` (already resolved) in `precision`; the process-group timeout bounds how
    long a rank waits for a dead peer."""
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))])
    if accelerator.device.type != device:
        raise UsageError(f"Accelerate placed this process on {accelerator.device.type}, not {device}: "
                         f"check CUDA_VISIBLE_DEVICES and the launch config")
    return accelerator


def configure(device: str, deterministic: bool, cpu_threads: int, local_processes: int) -> None:
    """Process-wide switches: determinism, cuDNN autotuning and the CPU thread count.

    `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, which halves CPU training speed on a
    2-core machine: on the CPU the thread count is set here explicitly."""
    torch.use_deterministic_algorithms(deterministic)
    if device == "cuda":
        torch.backends.cudnn.benchmark = not deterministic  # fixed shapes: autotuning pays off
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if device == "cpu":
        torch.set_num_threads(cpu_threads or max(1, _usable_cores() // max(1, local_processes)))
        _keep_freed_memory()


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
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


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
