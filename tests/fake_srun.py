"""A stand-in for SLURM's `srun` in a job of SLURM_NNODES nodes, all of them this machine: the command runs once
per node, at once, with that node's SLURM_* variables, each task in its own process group (as SLURM signals a
job step's processes: `os.killpg` on the groups listed in $FAKE_SLURM_TASKS). `--kill-on-bad-exit` as SLURM does
it: when a task exits non-zero, the others get SIGCONT and SIGTERM, then SIGKILL after $FAKE_KILL_WAIT seconds
(SLURM's KillWait, 30 by default). The exit status is the highest of the tasks'.

    python tests/fake_srun.py [--kill-on-bad-exit=1] command [args...]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def node_env(node: int, nodes: int) -> dict[str, str]:
    env = {**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node), "SLURM_LOCALID": "0",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_NUM_TASKS": str(nodes),
           "SLURMD_NODENAME": f"node{node + 1}"}
    if "SRUN_CPUS_PER_TASK" in os.environ:  # what srun itself gives a task
        env["SLURM_CPUS_PER_TASK"] = os.environ["SRUN_CPUS_PER_TASK"]
    return env


def signal_group(task: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(task.pid, signum)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    kill_on_bad_exit = False
    while argv and argv[0].startswith("-"):
        option = argv.pop(0)
        kill_on_bad_exit |= option in ("-K", "--kill-on-bad-exit", "--kill-on-bad-exit=1")
    nodes = int(os.environ["SLURM_NNODES"])
    tasks = [subprocess.Popen(argv, env=node_env(node, nodes), start_new_session=True) for node in range(nodes)]
    with open(os.environ["FAKE_SLURM_TASKS"], "w") as listing:
        listing.write("".join(f"{task.pid}\n" for task in tasks))
    kill_at = None
    while any(task.poll() is None for task in tasks):
        failed = any(task.returncode not in (None, 0) for task in tasks)
        if kill_on_bad_exit and failed and kill_at is None:
            kill_at = time.monotonic() + float(os.environ.get("FAKE_KILL_WAIT", "30"))
            for task in tasks:
                signal_group(task, signal.SIGCONT)
                signal_group(task, signal.SIGTERM)
        if kill_at is not None and time.monotonic() > kill_at:
            for task in tasks:
                signal_group(task, signal.SIGKILL)
        time.sleep(0.2)
    for task in tasks:  # what a task left behind (a launcher's workers) goes with the step
        signal_group(task, signal.SIGKILL)
    return max(task.returncode if task.returncode >= 0 else 128 - task.returncode for task in tasks)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
