"""launch/slurm_multi_node.sbatch without SLURM: `sbatch`'s part (the log file, the environment, a requeued job's
next attempt) is played by `submit`, `srun` and `scontrol` by stand-ins on PATH. The requeue decision is checked
against every state of run.json with an `srun` that only writes it; then two "machines" (two real `accelerate
launch`es on this CPU, one process each) train together, are preempted, requeued, and finish."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, mnist_root

from toolkit import checkpoint

SCRIPT = ROOT / "launch" / "slurm_multi_node.sbatch"
pytestmark = pytest.mark.slow  # every test runs the script in a shell


def directives() -> dict[str, str]:
    """The script's `#SBATCH --key=value` lines."""
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", SCRIPT.read_text(), re.MULTILINE))


def fake_slurm(folder: Path, srun: str) -> Path:
    """A bin folder holding `srun` (the given script), an `scontrol` that names two nodes, the first this machine,
    and records a requeue in $FAKE_SLURM_LOG, and the tests' `python`."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    scontrol = ('#!/bin/bash\nif [ "$1" = show ]; then echo 127.0.0.1; echo node2; '
                'else echo "scontrol $*" >> "$FAKE_SLURM_LOG"; fi\n')
    for name, text in (("srun", srun), ("scontrol", scontrol)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    return bin_dir


def slurm_env(bin_dir: Path, job_id: int, **extra: str) -> dict[str, str]:
    """What SLURM gives a 2-node job's batch script (no GPUs), the stand-ins' files, and `extra`."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("SLURM_") and key not in ("RUN_DIR", "MAIN_PORT", "PROCESSES_PER_NODE",
                                                           "SRUN_CPUS_PER_TASK", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}
    # the launcher installed beside the tests' Python, as `accelerate` on a node's PATH
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**env, "PATH": path, "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "node[1-2]",
            "SLURM_NNODES": "2", "SLURM_CPUS_PER_TASK": "1", "FAKE_SLURM_LOG": str(bin_dir.parent / "slurm-calls"),
            "PYTHONUNBUFFERED": "1", **extra}


def submit(env: dict[str, str], *args: str, cwd: Path, logs: Path, attempt: int = 0) -> tuple[subprocess.Popen, Path]:
    """Start the script in `cwd` as sbatch would (attempt 0) or as SLURM restarts it after a requeue (attempt n): its
    output into the file its `--output` directive names (in `logs`, not the submission folder, which may be the
    repository), appended to or replaced as its `--open-mode` says."""
    options = directives()
    log = logs / options["output"].replace("%j", env["SLURM_JOB_ID"])
    mode = "a" if options.get("open-mode") == "append" else "w"
    env = {**env, **({"SLURM_RESTART_COUNT": str(attempt)} if attempt else {})}
    with open(log, mode) as output:
        process = subprocess.Popen(["bash", str(SCRIPT), *args], cwd=cwd, env=env, stdout=output,
                                   stderr=subprocess.STDOUT, text=True)
    return process, log


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_SLURM_LOG"])
    return path.read_text().splitlines() if path.exists() else []


# ------------------------------------------------------------------ the decision, with an srun that only records

RECORDING_SRUN = """#!/bin/bash
echo "srun $1 SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-} TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT\
 MAIN_ADDR=$MAIN_ADDR MAIN_PORT=$MAIN_PORT NUM_PROCESSES=$NUM_PROCESSES LAUNCH_MODE=$LAUNCH_MODE ${@: -3}" \
>> "$FAKE_SLURM_LOG"
mkdir -p "$RUN_DIR"
if [ -n "$FAKE_STATUS" ]; then printf '{"status": "%s"}' "$FAKE_STATUS" > "$RUN_DIR/run.json"; fi
exit "$FAKE_EXIT"
"""


def run_recorded(tmp_path: Path, status: str = "", launcher_exit: int = 0, job_id: int = 42, attempt: int = 0,
                 **extra: str) -> tuple[int, str, dict[str, str]]:
    """(exit status, the log, the environment) of one attempt with the recording srun."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        fake_slurm(tmp_path, RECORDING_SRUN)
    env = slurm_env(bin_dir, job_id, FAKE_STATUS=status, FAKE_EXIT=str(launcher_exit), **extra)
    process, log = submit(env, "--epochs", "3", cwd=tmp_path, logs=tmp_path, attempt=attempt)
    process.wait(timeout=60)
    return process.returncode, log.read_text(), env


@pytest.mark.parametrize("status, launcher_exit, exit_code, requeued", [
    ("stopped", 143, 0, True),  # what accelerate launch returns after its workers saved and exited 143
    ("stopping", 143, 0, True),  # a signal arrived and the save was cut short: the last checkpoint stands
    ("finished", 0, 0, False),
    ("failed", 1, 1, False),
    ("running", 137, 1, False),  # killed before it could record: not requeued blindly
    ("", 1, 1, False),  # no run.json at all
])
def test_the_script_requeues_from_run_json_not_the_launchers_exit(tmp_path, status, launcher_exit, exit_code,
                                                                 requeued):
    code, log, env = run_recorded(tmp_path, status, launcher_exit)
    assert code == exit_code, log
    srun, *rest = calls(env)
    assert srun.startswith("srun --kill-on-bad-exit=1 SRUN_CPUS_PER_TASK=1 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110 ")
    assert srun.endswith(" toolkit --epochs 3")
    assert rest == (["scontrol requeue 42"] if requeued else [])
    assert f"launcher exit status {launcher_exit}; runs/slurm-42/run.json: {status or 'unknown'}" in log


def test_each_attempt_is_appended_to_the_log_and_says_which_it_is(tmp_path):
    _, first, _ = run_recorded(tmp_path, "stopped", 143)
    (tmp_path / "runs" / "slurm-42" / "run.json").unlink()
    code, log, _ = run_recorded(tmp_path, "finished", 0, attempt=1)
    assert code == 0 and log.startswith(first)  # the first attempt's log is still there
    attempts = re.findall(r"^=== job 42 attempt (\d) \(SLURM_RESTART_COUNT=(\d)\) started ", log, re.MULTILINE)
    assert attempts == [("1", "0"), ("2", "1")]
    assert log.count("requeueing job 42") == 1


def test_the_port_is_the_jobs_own_and_processes_follow_the_nodes_gpus(tmp_path):
    ports = []
    for job_id in (1234567, 1234568):
        _, _, env = run_recorded(tmp_path, "finished", job_id=job_id)
        ports.append(int(re.search(r"MAIN_PORT=(\d+)", calls(env)[-1])[1]))
    assert ports[0] != ports[1] and all(20000 <= port < 30000 for port in ports)
    _, _, env = run_recorded(tmp_path, "finished", SLURM_GPUS_ON_NODE="8")
    assert "MAIN_ADDR=127.0.0.1 MAIN_PORT=20042 NUM_PROCESSES=16 LAUNCH_MODE=--multi_gpu" in calls(env)[-1]
    _, _, env = run_recorded(tmp_path, "finished", SLURM_NNODES="1")  # one CPU node: one process, no torchrun
    assert "NUM_PROCESSES=1 LAUNCH_MODE= " in calls(env)[-1]
    _, _, env = run_recorded(tmp_path, "finished", SLURM_GPUS_ON_NODE="8", MAIN_PORT="29999", PROCESSES_PER_NODE="2")
    assert "MAIN_PORT=29999 NUM_PROCESSES=4 LAUNCH_MODE=--multi_gpu" in calls(env)[-1]


# ------------------------------------------------------------------ two machines on this CPU, the real launcher

TINY = ["--device", "cpu", "--image-size", "65", "--train-samples", "256", "--eval-samples", "100",
        "--batch-size", "32", "--epochs", "1", "--warmup-steps", "2", "--log-every-steps", "1", "--cpu-threads", "1",
        "--ema-decay", "0"]  # 4 steps of 2 x 32 images


def free_job_id() -> int:
    """A job id whose port (20000 + id % 10000, the script's) is free on this machine now."""
    for job_id in range(4000 + os.getpid() % 5000, 10000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", 20000 + job_id))
                return job_id
            except OSError:
                continue
    raise AssertionError("no free port in 24000-29999")


def wait_for_text(process: subprocess.Popen, log: Path, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


@pytest.mark.skipif(mnist_root() is None, reason="MNIST is not on this machine: set TOOLKIT_DATA_DIR to a folder "
                                                 "holding MNIST/raw/")
def test_two_machines_train_are_preempted_requeued_and_finish(tmp_path):
    bin_dir = fake_slurm(tmp_path, f'#!/bin/bash\nexec "{sys.executable}" "{ROOT / "tests" / "fake_srun.py"}" "$@"\n')
    out = tmp_path / "run"
    env = slurm_env(bin_dir, free_job_id(), RUN_DIR=str(out), FAKE_SLURM_TASKS=str(tmp_path / "tasks"))
    job = env["SLURM_JOB_ID"]

    first, log = submit(env, *TINY, cwd=ROOT, logs=tmp_path)
    wait_for_text(first, log, "step 2/4")
    for task in (tmp_path / "tasks").read_text().split():  # --signal=TERM@120: every process of the job step
        os.killpg(int(task), signal.SIGTERM)
    assert first.wait(timeout=240) == 0, log.read_text()
    stopped = json.loads((out / "run.json").read_text())
    assert (stopped["status"], stopped["reason"]) == ("stopped", "SIGTERM"), log.read_text()
    assert calls(env) == [f"scontrol requeue {job}"]

    second, log = submit(env, *TINY, cwd=ROOT, logs=tmp_path, attempt=1)
    assert second.wait(timeout=240) == 0, log.read_text()
    text = log.read_text()
    assert json.loads((out / "run.json").read_text())["status"] == "finished", text
    assert calls(env) == [f"scontrol requeue {job}"]  # not again
    attempts = text.split(f"=== job {job} attempt ")
    assert [a[:1] for a in attempts[1:]] == ["1", "2"], text  # both attempts, in one log, in order
    port = 20000 + int(job) % 10000
    for attempt in attempts[1:]:
        for rank in (0, 1):  # the command each node ran (bash -x), and the launchers trained as one job
            assert (f"+ accelerate launch --multi_gpu --num_machines 2 --num_processes 2 --machine_rank {rank} "
                    f"--main_process_ip 127.0.0.1 --main_process_port {port} ") in attempt, attempt
        assert "--mixed_precision bf16" not in attempt and "processes: 2 (MULTI_CPU)" in attempt, attempt
    assert "stopped at step" in attempts[1] and f"requeueing job {job}" in attempts[1]
    assert f"resumed: {out / 'checkpoints'}" in attempts[2] and "not requeued" not in attempts[2]
    assert "Traceback" not in text, text
    last = checkpoint.load(checkpoint.step_dir(out / "checkpoints", 4))
    assert last.meta["world_size"] == 2 and last.progress.step == 4
