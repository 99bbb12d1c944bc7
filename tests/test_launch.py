"""The launch files and the ways of starting the trainer that the README gives."""

import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from conftest import ROOT, mnist_root, run

from toolkit import devices

LAUNCH = sorted((ROOT / "launch").glob("*.yaml"))


@pytest.mark.parametrize("path", LAUNCH, ids=lambda p: p.name)
def test_accelerate_reads_every_launch_config(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.num_machines >= 1


def test_multi_node_template_and_slurm_script_agree_on_the_launcher():
    template = load_config_from_file(str(ROOT / "launch" / "multi_node.yaml"))
    assert template.distributed_type.value == "MULTI_GPU" and template.num_machines == 2
    assert template.main_process_ip == "10.0.0.1"  # the placeholder the README tells users to replace
    slurm = (ROOT / "launch" / "slurm_multi_node.sbatch").read_text()
    for flag in ("--multi_gpu", "--num_machines", "--machine_rank \"$SLURM_NODEID\"", "--main_process_ip",
                 "--resume auto", "#SBATCH --signal=TERM@"):
        assert flag in slurm


@pytest.mark.slow
def test_installed_command_reports_bad_flags():
    command = Path(sys.executable).parent / "toolkit-train"  # installed beside the interpreter running the tests
    if not command.exists():
        pytest.skip("the package is not installed in this environment (pip install -e .): no toolkit-train")
    result = run([str(command), "--epochs", "0"])
    assert result.returncode == 2 and "epochs: must be greater than 0" in result.stderr


@pytest.mark.slow
def test_launcher_passes_on_the_one_line_error():
    absent = next(d for d in ("mps", "cuda") if d not in devices.available())
    result = run([sys.executable, "-m", "accelerate.commands.launch", "toolkit/train.py", "--device", absent])
    assert result.returncode != 0
    assert f"toolkit.train: error: device '{absent}' is not available on this machine" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(mnist_root() is None, reason="MNIST is not on this machine: set TOOLKIT_DATA_DIR to a "
                                                 "folder holding MNIST/raw/")
def test_one_cpu_process_through_launch_cpu_yaml_as_a_module(tmp_path):
    # `accelerate launch -m toolkit.train`; the script form, toolkit/train.py, is what test_distributed launches
    result = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "launch" / "cpu.yaml"), "-m", "toolkit.train", "--device", "cpu", "--image-size", "65",
                  "--max-steps", "2", "--batch-size", "8", "--eval-samples", "50", "--log-every-steps", "1",
                  "--output-dir", str(tmp_path / "run")], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "processes: 1 (NO)" in result.stdout and "step 2/" in result.stdout
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "COMPLETE").is_file()


def _resolved_launch(monkeypatch, gpus: int, *flags: str):
    """What `accelerate launch --config_file launch/multi_gpu.yaml FLAGS` resolves to on a machine with `gpus`."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.setattr("torch.cuda.device_count", lambda: gpus)
    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "launch" / "multi_gpu.yaml"), *flags,
                                               "toolkit/train.py"])
    return _validate_launch_command(args)[0]


def test_multi_gpu_yaml_on_fewer_gpus_is_refused_with_the_count_to_use(monkeypatch):
    from toolkit.errors import UsageError

    # Accelerate takes the file's count as it is (and refuses a file without one), whatever the machine has
    launch = _resolved_launch(monkeypatch, 2)
    assert launch.multi_gpu and launch.num_processes == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(launch.num_processes // launch.num_machines))
    with pytest.raises(UsageError, match=r"8 processes were started on this machine and it has 2 GPUs visible: "
                                         r"start at most one per GPU \(accelerate launch --num_processes 2 ...\)"):
        devices.check_gpus_for_processes("cuda")
    launch = _resolved_launch(monkeypatch, 2, "--num_processes", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(launch.num_processes))
    devices.check_gpus_for_processes("cuda")
