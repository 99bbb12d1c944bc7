"""What a device could do: its peak TFLOP/s, from a datasheet for known NVIDIA GPUs, else from a matmul measured in
this process. MFU (the fraction of the peak a run achieves) is measured against it, by `toolkit.bench` and by the
trainer's logs alike."""

from __future__ import annotations

import re
from typing import Any

import torch

from toolkit import devices

# Square matmul that measures a CPU's or MPS's own peak in the same process as the configuration, right after
# its windows (a busy machine slows both alike): compute-bound, and on a 2-core CPU about 0.1 s in fp32.
MATMUL_SIZE = {"cpu": 2048, "cuda": 4096, "mps": 4096}
MATMUL_SECONDS = 0.1  # each timing lasts at least this long; the best of MATMUL_TRIALS is the peak
MATMUL_TRIALS = 3
COMPUTE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets and architecture whitepapers, matched against
# torch.cuda.get_device_name() in order (more specific names first). `tf32` is what fp32 training runs at with
# the `tf32` setting on (the default; `devices.set_tf32` turns it on for convolutions and matmuls alike), `fp32`
# with it off. GPUs without TF32 (before Ampere) have no `tf32` entry: fp32 is their peak either way.
# GeForce cards: fp16/bf16 tensor cores with fp32 accumulation (what autocast does), half their fp16-accumulate
# rate. A GPU not listed gets its measured matmul rate as the peak, marked as such.
GPU_PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"B200", "B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1125.0, "fp32": 75.0}),
    (r"H200 NVL", "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H100 PCIe", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100 NVL", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100|GH200", "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", "L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"L40\b", "L40", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX A6000", "RTX A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"RTX 4090", "RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090", "RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"V100.*PCIE", "V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
    (r"V100", "V100 SXM2", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", "T4", {"fp16": 65.0, "fp32": 8.1}),
)


def gpu_peak_tflops(device_name: str, precision: str, tf32: bool = True) -> tuple[float, str] | None:
    """(dense peak TFLOP/s, where it comes from) for a known NVIDIA GPU, else None. fp32 (`precision` "no")
    counts at the TF32 peak when the run's `tf32` setting is on."""
    for pattern, label, peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            if precision in ("bf16", "fp16"):
                kind = precision
            else:
                kind = "tf32" if tf32 and "tf32" in peaks else "fp32"
            if kind not in peaks:
                return None
            return peaks[kind], f"{label} datasheet, {kind} dense"
    return None


def measure_matmul_tflops(device: torch.device, precision: str) -> float:
    """The device's own dense matmul rate in the precision's compute dtype (the CPU's and MPS's peak for MFU):
    the best of a few timings, each long enough to swamp the synchronisation. Random inputs are drawn under a
    forked RNG: a training run's random state is untouched."""
    size, dtype = MATMUL_SIZE[device.type], COMPUTE_DTYPES[precision]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty_like(a)
    now = devices.clock(device)

    def seconds(count: int) -> float:
        started = now()
        for _ in range(count):
            torch.mm(a, b, out=out)
        return now() - started

    seconds(1)  # warm-up: library initialisation and kernel choice
    count = 1
    while (took := seconds(count)) < MATMUL_SECONDS:
        count *= 2
    best = min([took] + [seconds(count) for _ in range(MATMUL_TRIALS - 1)])
    return 2 * size ** 3 * count / best / 1e12


def device_peak(device: torch.device, device_name: str, precision: str, tf32: bool = True) -> dict[str, Any]:
    """The peak that MFU is a fraction of, where it comes from, and the matmul measured here either way (on CUDA
    in fp32 under the same TF32 setting as the run, which `devices.configure` has applied)."""
    measured = measure_matmul_tflops(device, precision)
    listed = gpu_peak_tflops(device_name, precision, tf32) if device.type == "cuda" else None
    size = MATMUL_SIZE[device.type]
    peak, source = listed or (measured, f"measured {size}x{size} matmul, {precision}")
    return {"peak_tflops": peak, "peak_source": source, "matmul_tflops": measured}
