"""Launched by test_machines.py on 2 processes: `toolkit.train` resuming, with the reads of a checkpoint counted on
each process. The main process chooses, reads and checks the checkpoint; the other receives it through the process
group, and reads nothing."""

import os
import sys

from toolkit import checkpoint, saver, train

counts = {"checkpoint": 0, "verified": 0}
real_load, real_verify = checkpoint.load, checkpoint.verify


def load(path):
    counts["checkpoint"] += 1
    return real_load(path)


def verify(path, files=None):
    counts["verified"] += 1
    return real_verify(path, files)


checkpoint.load = saver.load = load
checkpoint.verify = verify
code = train.main(sys.argv[1:])
print(f"reads on rank {os.environ['RANK']}: {counts['checkpoint']} checkpoint, {counts['verified']} verified",
      flush=True)
sys.exit(code)
