"""The profiler records exactly the steps asked for and writes a trace Perfetto opens (JSON naming the ops)."""

import json

import torch

from toolkit.profiling import StepProfiler


def test_records_the_steps_asked_for_and_writes_a_trace(tmp_path):
    model = torch.nn.Conv2d(1, 4, 3)
    profiler = StepProfiler((2, 3), tmp_path / "profile", torch.device("cpu"))
    for step in range(1, 6):
        profiler.before_step(step)
        model(torch.randn(2, 1, 8, 8)).sum().backward()
        profiler.after_step(step)
        assert (profiler.profile is not None) == (step == 2)  # on for steps 2 and 3 only
    assert profiler.trace == tmp_path / "profile" / "trace-steps-2-3.json"
    names = {event.get("name", "") for event in json.loads(profiler.trace.read_text())["traceEvents"]}
    assert any("convolution" in name for name in names)
    assert "aten::convolution_backward" in profiler.table


def test_off_records_nothing(tmp_path):
    profiler = StepProfiler(None, tmp_path, torch.device("cpu"))
    for step in range(1, 4):
        profiler.before_step(step)
        profiler.after_step(step)
    profiler.stop()
    assert profiler.trace is None and not list(tmp_path.iterdir())


def test_a_recording_cut_short_is_named_for_the_steps_it_holds(tmp_path):
    import torch

    from toolkit.profiling import StepProfiler

    profiler = StepProfiler((1, 3), tmp_path, torch.device("cpu"))
    profiler.before_step(1)
    torch.ones(4).sum()
    profiler.after_step(1)
    profiler.stop()  # the run ended at step 1
    assert profiler.trace == tmp_path / "trace-steps-1-1.json" and profiler.trace.is_file()
