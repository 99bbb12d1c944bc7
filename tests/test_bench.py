"""toolkit.bench on tiny CPU configurations: the JSON it writes, its one-line errors, the out-of-memory path and
--compare. No assertion is about speed (the machine is shared and noisy): numbers need only be there, positive
and finite."""

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import mnist_root, run_module

from toolkit import bench, devices

# 65 px is the smallest input the network takes; one step per window keeps a configuration to seconds.
TINY = ["--image-size", "65", "--batch-size", "2", "--warmup", "1", "--steps", "1", "--repeats", "2"]
ROW_FIELDS = {
    "device", "device_name", "mode", "pipeline", "batch_size", "precision", "channels_last", "compile",
    "image_size", "images_per_sec", "step_ms", "peak_memory", "gflop_per_image", "achieved_tflops",
    "peak_tflops", "mfu", "status", "message", "trainer_over_model",
}
ENVIRONMENT_FIELDS = {"torch", "accelerate", "os", "cpu_model", "devices", "git_commit", "date", "command"}


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def tiny_case(**changes) -> bench.Case:
    fields = dict(device="cpu", mode="train", pipeline="model", batch_size=2, precision="no", channels_last=True,
                  compile=False, image_size=65, warmup=0, steps=1, repeats=1)
    return bench.Case(**{**fields, **changes})


@pytest.fixture
def in_process(monkeypatch):
    """Running cases in the test process: a fresh Accelerate state around each test (it holds one precision
    per process) and a small matmul for the peak."""
    monkeypatch.setitem(bench.MATMUL_SIZE, "cpu", 256)
    monkeypatch.setattr(bench, "MATMUL_SECONDS", 0.01)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if mnist_root() is None:
        pytest.skip("MNIST is not on this machine (the trainer pipeline reads it): set TOOLKIT_DATA_DIR")
    path = tmp_path_factory.mktemp("bench") / "results" / "cpu.json"
    result = run_module("toolkit.bench", "--device", "cpu", "--mode", "train", "--pipeline", "both", *TINY,
                        "--json", str(path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(path.read_text()), result


def test_json_holds_the_environment_and_a_row_per_pipeline(smoke):
    document, _ = smoke
    assert ENVIRONMENT_FIELDS <= set(document["environment"])
    assert document["environment"]["devices"]["cpu"]["torch_threads"] >= 1
    rows = document["results"]
    assert [(r["pipeline"], r["mode"]) for r in rows] == [("model", "train"), ("trainer", "train")]
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["status"] == "ok", row["message"]
        assert (row["device"], row["batch_size"], row["image_size"]) == ("cpu", 2, 65)
        assert row["precision"] in devices.supported_precisions("cpu")
        assert set(row["step_ms"]) == {"median", "p10", "p90"}
        assert row["step_ms"]["p10"] <= row["step_ms"]["median"] <= row["step_ms"]["p90"]
        assert len(row["images_per_sec_windows"]) == 2


def test_every_measured_number_is_positive_and_finite(smoke):
    document, _ = smoke
    for row in document["results"]:
        for key in ("images_per_sec", "gflop_per_image", "achieved_tflops", "peak_tflops", "mfu", "matmul_tflops"):
            assert positive_finite(row[key]), (key, row[key])
        assert all(positive_finite(v) for v in row["step_ms"].values())
        assert positive_finite(row["peak_memory"]["cpu_peak_rss"])
        assert row["mfu"] < 1
    model, trainer = document["results"]
    assert model["trainer_over_model"] is None
    assert positive_finite(trainer["trainer_over_model"])


def test_console_prints_a_table_and_where_the_json_went(smoke):
    document, result = smoke
    assert "images/s" in result.stdout and "peak memory" in result.stdout
    assert "results: " in result.stdout
    assert result.stderr.strip() == ""


def test_missing_device_exits_2_with_one_line():
    absent = next(d for d in ("mps", "cuda") if d not in devices.available())
    result = run_module("toolkit.bench", "--device", absent, *TINY)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"device '{absent}' is not available" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_trainer_pipeline_without_mnist_is_one_line(tmp_path):
    result = run_module("toolkit.bench", "--pipeline", "trainer", *TINY, env={"TOOLKIT_DATA_DIR": str(tmp_path)})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pipeline model" in lines[0], result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "2,x"], "batch_size: expected an integer"),
    (["--precision", "fp8"], "--precision: 'fp8' is not one of"),
    (["--image-size", "64"], "image_size: must be at least 65"),
    (["--steps", "0"], "--steps: must be at least 1"),
])
def test_bad_flags_are_one_line_and_exit_2(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--device", "cpu", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_out_of_memory_marks_the_row_and_the_sweep_goes_on(monkeypatch, in_process):
    from toolkit.train import Trainer

    real_forward_backward = Trainer.forward_backward

    def forward_backward(self, images, labels):
        if len(labels) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward_backward(self, images, labels)

    monkeypatch.setattr(Trainer, "forward_backward", forward_backward)
    rows = bench.run_cases([tiny_case(batch_size=3), tiny_case(batch_size=2)], known={})
    assert [r["status"] for r in rows] == ["oom", "ok"]
    assert "out of memory" in rows[0]["message"]
    assert rows[0]["images_per_sec"] is None and rows[0]["batch_size"] == 3
    assert positive_finite(rows[1]["images_per_sec"])


def test_model_pipeline_runs_on_synthetic_images_without_mnist(monkeypatch, tmp_path, in_process):
    monkeypatch.setenv("TOOLKIT_DATA_DIR", str(tmp_path / "empty"))
    row = bench.run_case(tiny_case(mode="infer"), known={})
    assert row["status"] == "ok", row["message"]
    assert row["data"] == "synthetic"
    assert positive_finite(row["images_per_sec"])


def test_each_cpu_case_gets_its_own_process_and_a_gpu_one_per_precision():
    cpu = [tiny_case(batch_size=b) for b in (2, 4)]
    cuda = [tiny_case(device="cuda", precision=p, batch_size=b) for p in ("bf16", "no") for b in (2, 4)]
    assert [len(group) for group in bench.process_groups(cpu + cuda)] == [1, 1, 2, 2]


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
    ("NVIDIA A10G", "bf16", None), ("Tesla T4", "bf16", None),
])
def test_gpu_peaks_are_dense_datasheet_values(name, precision, peak):
    found = bench.gpu_peak_tflops(name, precision)
    assert (found[0] if found else None) == peak


def write_results(path, rates):
    rows = []
    for (pipeline, batch_size), rate in rates.items():
        row = bench.case_fields(tiny_case(pipeline=pipeline, batch_size=batch_size))
        row.update(status="ok", images_per_sec=rate, step_ms={"median": 1000 * batch_size / rate, "p10": 0, "p90": 0})
        rows.append(row)
    path.write_text(json.dumps({"environment": {}, "results": rows}))
    return str(path)


def test_compare_prints_the_ratio_of_matching_rows(tmp_path, capsys):
    a = write_results(tmp_path / "a.json", {("model", 2): 100.0, ("model", 4): 50.0})
    b = write_results(tmp_path / "b.json", {("model", 2): 250.0, ("trainer", 2): 80.0})
    assert bench.main(["--compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "2.500" in out
    # settings that vary within a file identify rows; mode, size, precision... are the same everywhere
    assert "only in A: pipeline=model, batch_size=4\n" in out
    assert "only in B: pipeline=trainer, batch_size=2\n" in out


def test_compare_leaves_out_the_setting_being_compared(tmp_path, capsys):
    a = write_results(tmp_path / "eager.json", {("model", 2): 100.0, ("model", 4): 120.0})
    b = write_results(tmp_path / "compiled.json", {("model", 2): 150.0, ("model", 4): 240.0})
    rows = json.loads((tmp_path / "compiled.json").read_text())
    for row in rows["results"]:
        row["compile"] = True
    (tmp_path / "compiled.json").write_text(json.dumps(rows))
    assert bench.main(["--compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "A: compile=False; B: compile=True" in out
    assert "1.500" in out and "2.000" in out


def test_compare_rejects_a_file_that_is_not_bench_results(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"results": [{"device": "cpu"}]}))
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--compare", str(other), str(other)])
    assert exit_.value.code == 2
    assert "is not a toolkit.bench results file" in capsys.readouterr().err
