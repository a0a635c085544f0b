"""`hift train` under torchrun: the ranks it was started as.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK for every process it starts. With more than one,
`hift train` joins them into a process group (fit then trains data-parallel: hift.distributed),
gives each rank its share of every pass (a DistributedSampler), and lets rank 0 alone write what
is written once: metrics.jsonl, loss.png, final/, and what is printed. The checkpoints are fit's
own, sharded by rank."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from hift import distributed


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    started: bool = False  # whether the process group is ours to end

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks (every rank calls it at the same point)."""
        if self.world == 1:
            return values
        total = values.float().clone().contiguous()
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)
        return (total / self.world).cpu()

    def close(self) -> None:
        if self.started and dist.is_initialized():
            dist.destroy_process_group()


def join(device_name: Optional[str]) -> tuple[Ranks, Optional[str]]:
    """The ranks torchrun started (one when it did not), the process group joined, and the device
    this rank trains on (its own GPU, cuda:LOCAL_RANK, unless --device names one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device_name
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name is None and torch.cuda.is_available():
        device_name = f"cuda:{local}"
    if device_name is not None and device_name.startswith("cuda"):
        torch.cuda.set_device(torch.device(device_name))
    started = not dist.is_initialized()
    if started:
        distributed.init_process_group()
    return Ranks(dist.get_rank(), dist.get_world_size(), started), device_name
