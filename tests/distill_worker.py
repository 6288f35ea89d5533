"""Run by ``torchrun --nproc_per_node 2`` from test_trainer.py: the shared tiny distillation run under CPU
data parallelism (gloo). Rank 0 writes the training logs and a checksum of the final weights as JSON.

Usage: distill_worker.py OUTPUT_JSON PER_RANK_BATCH [--on-policy LMBDA] TEACHER [TEACHER ...]
(``--on-policy``: the chat run, a share LMBDA of its steps on-policy).
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch
from distill_util import train, training_logs


def main() -> None:
    output, batch_size, teachers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    options = {}
    if teachers[0] == "--on-policy":
        options, teachers = dict(chat=True, on_policy=float(teachers[1])), teachers[2:]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        trainer = train(folder, teachers=teachers, batch_size=batch_size, **options)
    if trainer.accelerator.num_processes != 2:
        raise SystemExit(f"expected 2 ranks, got {trainer.accelerator.num_processes}")
    if trainer.is_world_process_zero():
        weights = [p.detach().double().sum().item() for p in trainer.model.parameters()]
        with open(output, "w", encoding="utf-8") as f:
            json.dump({"logs": training_logs(trainer), "weights": weights}, f)
    # Leave together and close the process group, so no rank exits with gloo threads still running.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
