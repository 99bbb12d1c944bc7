"""toolkit.bench on tiny CPU configurations: the JSON and chart it writes, its one-line errors, the out-of-memory
path, synthetic data, process groups and GPU peaks. No assertion is about speed (the machine is shared and noisy):
numbers need only be there, positive and finite. --compare: test_bench_compare.py; the chart:
test_bench_chart.py; timing windows: test_bench_timing.py; the plan, the results file as cases finish, and
stopping: test_bench_run.py."""

import json
import math

import pytest
import torch
from conftest import accelerate_state, mnist_root, run_module

from toolkit import devices, peaks
from toolkit.bench import cli, environment, measure, worker
from toolkit.bench.plan import Case

# 65 px is the smallest input the network takes; one step per window keeps a configuration to seconds.
TINY = ["--image-size", "65", "--batch-size", "2", "--warmup", "1", "--steps", "1", "--repeats", "2"]
ROW_FIELDS = {
    "device", "device_name", "mode", "pipeline", "batch_size", "precision", "channels_last", "compile",
    "image_size", "images_per_sec", "step_ms", "peak_memory", "gflop_per_image", "achieved_tflops",
    "peak_tflops", "mfu", "status", "message", "trainer_over_model", "paired_model_images_per_sec", "paired",
    "steps", "repeats", "warmup", "budget_s",
}
ENVIRONMENT_FIELDS = {"torch", "accelerate", "torchvision", "python", "os", "cpu_model", "cpu_cores", "devices",
                      "git_commit", "git_dirty", "date", "command", "method", "collect_env"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# FLOPs an image at 65 px (forward, training step), as toolkit.model.count_flops counts them, handed to the
# in-process cases as an earlier worker hands them on: counting takes seconds, and these tests check rows
KNOWN_FLOPS = {"flops:65": [207_241_920, 616_498_560]}


def tiny_case(**changes) -> Case:
    fields = dict(device="cpu", mode="train", pipeline="model", batch_size=2, precision="no", channels_last=True,
                  compile=False, image_size=65, warmup=0, steps=1, repeats=1)
    return Case(**{**fields, **changes})


@pytest.fixture
def in_process(monkeypatch):
    """Running cases in the test process: a fresh Accelerate state around each test (it holds one precision
    per process) and a small matmul for the peak."""
    monkeypatch.setitem(peaks.MATMUL_SIZE, "cpu", 256)
    monkeypatch.setattr(peaks, "MATMUL_SECONDS", 0.01)
    with accelerate_state():
        yield


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The one run of the real command: both pipelines paired, training, in a worker process."""
    if mnist_root() is None:
        pytest.skip("MNIST is not on this machine (the trainer pipeline reads it): set TOOLKIT_DATA_DIR")
    path = tmp_path_factory.mktemp("bench") / "results" / "cpu.json"
    result = run_module("toolkit.bench", "--device", "cpu", "--mode", "train", "--pipeline", "both", *TINY,
                        "--json", str(path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(path.read_text()), result, path


@pytest.mark.slow
def test_json_holds_the_environment_and_a_row_per_pipeline(smoke):
    document, _, _ = smoke
    environment_ = document["environment"]
    assert ENVIRONMENT_FIELDS <= set(environment_), ENVIRONMENT_FIELDS - set(environment_)
    assert environment_["devices"]["cpu"]["torch_threads"] >= 1
    assert environment_["method"].startswith("benchmarks/README.md")
    assert environment_["command"].startswith("python -m toolkit.bench --device cpu")
    assert "pip_packages" in environment_["collect_env"] and "cpu_info" not in environment_["collect_env"]
    assert document["run"] == {"cases": 1, "finished": 1, "stopped_by": None}
    rows = document["results"]
    assert [(r["pipeline"], r["mode"], r["paired"]) for r in rows] == [("model", "train", True),
                                                                      ("trainer", "train", True)]
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["status"] == "ok", row["message"]
        assert (row["device"], row["batch_size"], row["image_size"]) == ("cpu", 2, 65)
        assert (row["warmup"], row["steps"], row["repeats"], row["budget_s"]) == (1, 1, 2, 0)  # as the flags said
        assert row["precision"] in devices.supported_precisions("cpu")
        assert set(row["step_ms"]) == {"median", "p10", "p90"}
        assert row["step_ms"]["p10"] <= row["step_ms"]["median"] <= row["step_ms"]["p90"]
        assert len(row["images_per_sec_windows"]) == 2


@pytest.mark.slow
def test_every_measured_number_is_positive_and_finite(smoke):
    document, _, _ = smoke
    for row in document["results"]:
        for key in ("images_per_sec", "gflop_per_image", "achieved_tflops", "peak_tflops", "mfu", "matmul_tflops"):
            assert positive_finite(row[key]), (key, row[key])
        assert all(positive_finite(v) for v in row["step_ms"].values())
        assert positive_finite(row["peak_memory"]["cpu_peak_rss"])
        assert row["mfu"] < 1
        # images/s is the median of the windows' rates, and the step time is its inverse per batch
        assert row["images_per_sec"] == pytest.approx(sorted(row["images_per_sec_windows"])[0] / 2
                                                      + sorted(row["images_per_sec_windows"])[1] / 2)
    model, trainer = document["results"]
    assert model["trainer_over_model"] is None and model["paired_model_images_per_sec"] is None
    assert positive_finite(trainer["trainer_over_model"])
    # both rows come from the same pairs: the model row is the model's windows the trainer's ratio is taken against
    assert trainer["paired_model_images_per_sec"] == pytest.approx(model["images_per_sec"])
    assert model["peak_memory"] == trainer["peak_memory"]  # one process


@pytest.mark.slow
def test_console_prints_a_table_where_the_json_went_and_the_chart(smoke):
    _, result, path = smoke
    assert "images/s" in result.stdout and "trainer/model" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines() if str(path) not in line) <= 100
    assert f"results: {path}" in result.stdout
    chart = path.with_suffix(".png")
    assert f"chart: {chart}" in result.stdout
    assert chart.read_bytes().startswith(PNG_SIGNATURE)
    assert result.stderr.strip() == ""


def test_missing_device_exits_2_with_one_line(capsys):
    absent = next(d for d in ("mps", "cuda") if d not in devices.available())
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--device", absent, *TINY])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"device '{absent}' is not available" in lines[0], lines


def test_trainer_pipeline_without_mnist_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOOLKIT_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--device", "cpu", "--pipeline", "trainer", *TINY])
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--pipeline model" in lines[0], lines


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "2,x"], "batch_size: expected an integer, got 'x' (--batch-size)"),
    (["--batch-size", ","], "argument --batch-size: expected one value or a comma-separated list"),
    (["--precision", "fp8"], "argument --precision: 'fp8' is not one of"),
    (["--image-size", "64"], "image_size: must be at least 65"),
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
    (["--repeats", "two"], "argument --repeats: invalid integer value: 'two'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--mode", "infer", "--batch-size", "10001", "--pipeline", "model"], "more than the MNIST test set"),
    (["--config", "no-such.yaml"], "no-such.yaml"),
])
def test_bad_flags_are_one_line_and_exit_2(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--device", "cpu", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_a_trainer_inference_window_must_fit_in_the_test_set(capsys):
    if mnist_root() is None:
        pytest.skip("MNIST is not on this machine: set TOOLKIT_DATA_DIR")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--device", "cpu", "--mode", "infer", "--pipeline", "trainer", "--batch-size", "512",
                  "--steps", "20"])
    assert exit_.value.code == 2
    assert "--steps 20 x --batch-size 512 is more than the MNIST test set" in capsys.readouterr().err


def test_flags_arrive_typed_and_in_order():
    args = cli.build_parser().parse_args(["--batch-size", "64, 16,64", "--precision", "bf16,no", "--steps", "3"])
    assert (args.batch_size, args.precision, args.steps, args.warmup, args.image_size) == ([64, 16], ["bf16", "no"],
                                                                                         3, None, 224)
    defaults = cli.build_parser().parse_args([])
    # None: the device's defaults (plan.QUICK), or plan.FULL with --full
    assert (defaults.batch_size, defaults.warmup, defaults.steps, defaults.repeats, defaults.full) == \
        (None, None, None, None, False)


def test_out_of_memory_marks_the_row_and_the_sweep_goes_on(monkeypatch, in_process):
    from toolkit.trainer import Trainer

    real_train_step = Trainer.train_step

    def train_step(self, images, labels):
        if len(labels) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_train_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    rows = measure.run_cases([tiny_case(batch_size=3), tiny_case(batch_size=2)], known=dict(KNOWN_FLOPS))
    assert [r["status"] for r in rows] == ["oom", "ok"]
    assert rows[1]["paired"] is False and rows[1]["steps"] == 1 and rows[1]["repeats"] == 1
    assert "out of memory" in rows[0]["message"]
    assert rows[0]["images_per_sec"] is None and rows[0]["batch_size"] == 3
    assert positive_finite(rows[1]["images_per_sec"])


def test_model_pipeline_runs_on_synthetic_images_without_mnist(monkeypatch, tmp_path, in_process):
    monkeypatch.setenv("TOOLKIT_DATA_DIR", str(tmp_path / "empty"))
    [row] = measure.run_case(tiny_case(mode="infer"), known=dict(KNOWN_FLOPS))
    assert row["status"] == "ok", row["message"]
    assert row["data"] == "synthetic"
    assert positive_finite(row["images_per_sec"]) and positive_finite(row["matmul_tflops"])


def test_each_cpu_case_gets_its_own_process_and_a_gpu_one_per_precision():
    cpu = [tiny_case(batch_size=b) for b in (2, 4)]
    cuda = [tiny_case(device="cuda", precision=p, batch_size=b) for p in ("bf16", "no") for b in (2, 4)]
    compiled = [tiny_case(device="cuda", precision="bf16", compile=True)]
    assert [len(group) for group in worker.process_groups(cpu + cuda + compiled)] == [1, 1, 2, 2, 1]


class Died:
    """A worker process that was killed before it wrote anything."""

    returncode = -9

    def __init__(self, *args, **kwargs):
        pass

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        return self.returncode


def test_a_worker_that_dies_leaves_an_error_row_per_unfinished_case(monkeypatch):
    monkeypatch.setattr(worker.subprocess, "Popen", Died)
    rows = worker.run_in_processes([tiny_case(), tiny_case(pipeline="both", batch_size=4)], known={})
    assert [(r["pipeline"], r["status"]) for r in rows] == [("model", "error"), ("model", "error"),
                                                            ("trainer", "error")]
    assert all("killed (SIGKILL" in r["message"] for r in rows)


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
    ("NVIDIA A10G", "bf16", None), ("Tesla T4", "bf16", None),
])
def test_gpu_peaks_are_dense_datasheet_values(name, precision, peak):
    found = peaks.gpu_peak_tflops(name, precision)
    assert (found[0] if found else None) == peak


def test_environment_survives_collect_env_failing(monkeypatch):
    import torch.utils.collect_env

    def broken():
        raise OSError("lscpu: not found")

    monkeypatch.setattr(torch.utils.collect_env, "get_env_info", broken)
    found = environment.environment("python -m toolkit.bench", {})
    assert found["collect_env"] == {"error": "OSError: lscpu: not found"}
    assert found["os"] and found["torch"] == torch.__version__


@pytest.mark.parametrize("batch_size, steps, repeats, expected", [
    (512, 50, 10, 117 * 512),  # more than an epoch: the whole batches of one
    (16, 2, 2, 5 * 16),  # warm-up 1 + 2 x 2 steps
])
def test_the_trainer_pipeline_reads_whole_batches_only(tmp_path, batch_size, steps, repeats, expected):
    from toolkit.bench.plan import trainer_config

    case = tiny_case(pipeline="trainer", batch_size=batch_size, warmup=1, steps=steps, repeats=repeats)
    config = trainer_config(case, tmp_path, tmp_path / "run")
    assert config.train_samples == expected and config.train_samples % batch_size == 0
    infer = trainer_config(tiny_case(pipeline="trainer", mode="infer", batch_size=500, steps=20), tmp_path, tmp_path)
    assert infer.eval_samples == 10_000  # a window is one evaluation of exactly `steps` whole batches
