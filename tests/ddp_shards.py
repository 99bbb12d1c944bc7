"""Launched by test_distributed.py through `accelerate launch`: every process builds its training batches as
the trainer does, and the main process checks the shards of all processes are disjoint and equal in size."""

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from toolkit.data import Preprocess, TrainBatches

count, batch_size = int(sys.argv[1]), int(sys.argv[2])
accelerator = Accelerator(cpu=True)
images = torch.zeros(count, 28, 28, dtype=torch.uint8)
labels = torch.arange(count)  # each image's label is its index
batches = TrainBatches(images, labels, batch_size, Preprocess(65), seed=0, rank=accelerator.process_index,
                       world_size=accelerator.num_processes)
for epoch in (0, 1):
    mine = torch.cat([y for _, y in batches.epoch(epoch)]).tolist()
    shards = gather_object([mine])
    if accelerator.is_main_process:
        together = [i for shard in shards for i in shard]
        assert len(shards) == accelerator.num_processes
        assert len({len(s) for s in shards}) == 1, [len(s) for s in shards]
        assert len(set(together)) == len(together), "shards overlap"
        print(f"epoch {epoch}: {accelerator.num_processes} disjoint shards of {len(shards[0])} "
              f"first {[s[:3] for s in shards]}")
accelerator.wait_for_everyone()
accelerator.end_training()  # destroys the process group: a live gloo group at exit can abort
