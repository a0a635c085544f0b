"""hift.TrainerShards: a 🤗 Trainer callback that makes its checkpoints hold every rank's shard of
HiftAdamW's state under data parallel (torchrun).

The Trainer saves optimizer.pt from rank 0 alone and, on resume, hands that file to every rank;
with HiftAdamW each rank holds only its own shard, so rank 0's is refused on the others (step()
says so in words). With this callback every rank also writes its own shard into the checkpoint
(on_save, which the Trainer calls on every rank), and on resume each rank loads its own from there
(on_train_begin, after the Trainer restored global_step), or, on another number of ranks (one
process included), cuts its share out of all of them (HiftAdamW.load_sharded_state_dicts). A
run of one process saves nothing more: its optimizer.pt holds the whole state, which every rank
of a later run cuts its share out of (HiftAdamW.load_state_dict)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

from hift.optim import HiftAdamW

SHARD_FILE = "hift_optimizer_rank{rank:05d}.pt"


def _hift(optimizer) -> Optional[HiftAdamW]:
    """The HiftAdamW inside the Trainer's optimizer (accelerate wraps it), if there is one."""
    for _ in range(4):
        if isinstance(optimizer, HiftAdamW):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class TrainerShards(TrainerCallback):
    def on_save(self, args, state, control, optimizer=None, **kwargs):
        opt = _hift(optimizer)
        if opt is None or opt.dp is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SHARD_FILE.format(rank=opt.dp.rank)
        partial = path.with_name(path.name + ".partial")
        torch.save(opt.state_dict(), partial)
        os.replace(partial, path)  # a kill mid-write leaves no truncated shard under the real name

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = _hift(optimizer)
        if opt is None or opt._shard_of_rank is None:  # nothing to load, or this rank's own is loaded
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        rank, world = (opt.dp.rank, opt.dp.world) if opt.dp is not None else (0, 1)
        own = folder / SHARD_FILE.format(rank=rank)
        if opt._saved_world == world and own.is_file():
            opt.load_state_dict(torch.load(own, map_location="cpu", weights_only=False))
            if opt._shard_of_rank is None:
                return
        # another number of ranks (or another state_chunk_mib): this rank's share is cut out of
        # every saving rank's shard, each file mapped, not read whole
        paths = [folder / SHARD_FILE.format(rank=r) for r in range(opt._saved_world)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"the shards of the optimizer state at {', '.join(missing)} are missing (rank {rank} of {world} "
                f"needs all {len(paths)}): resume from a checkpoint of this output_dir that was saved with "
                "callbacks=[hift.TrainerShards()]")
        opt.load_sharded_state_dicts([torch.load(p, map_location="cpu", weights_only=False, mmap=True) for p in paths])
