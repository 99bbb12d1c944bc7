"""Data vs step time from timing events, and TFLOP/s and MFU from the FLOPs per image and the device's peak."""

import time

import pytest
import torch

from toolkit import peaks
from toolkit.throughput import Efficiency, StepTimer


def test_step_timer_splits_each_step_into_data_and_step_time():
    timer = StepTimer(torch.device("cpu"))
    for _ in range(3):
        time.sleep(0.02)  # preparing the batch
        timer.data_ready()
        time.sleep(0.01)  # the step
        timer.step_done()
    data_ms, step_ms = timer.read()
    assert 18 <= data_ms < 200 and 9 <= step_ms < 200 and data_ms > step_ms
    assert timer.read() is None  # a read starts a new window


def test_efficiency_is_images_per_second_times_flops_over_the_peak(monkeypatch):
    monkeypatch.setattr(peaks, "device_peak", lambda device, name, precision, tf32: {
        "peak_tflops": 2.0, "peak_source": "test", "matmul_tflops": 2.0})
    efficiency = Efficiency(torch.device("cpu"), "no", image_size=65)
    result = efficiency(1000.0)
    assert efficiency.flops_per_image == pytest.approx(0.616e9, rel=0.01)  # 65 px: 0.616 GFLOP per training image
    assert result["tflops"] == pytest.approx(1000 * efficiency.flops_per_image / 1e12)
    assert result["mfu"] == pytest.approx(result["tflops"] / 2.0)


def test_measuring_the_peak_leaves_the_random_state_alone():
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    assert peaks.measure_matmul_tflops(torch.device("cpu"), "no") > 0
    assert torch.equal(torch.rand(2), expected)
