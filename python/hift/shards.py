"""Every rank's shard of HiftAdamW's state beside a checkpoint that a framework writes from rank 0
alone (🤗 Trainer's optimizer.pt, accelerate's save_state): each rank saves its own
state_dict() as a file of its own, and on resume each rank loads its own, or, on another
number of ranks (one process included), cuts its share out of all of them.

    accelerator.save_state(folder); hift.save_shard(opt, folder)     # on every rank
    accelerator.load_state(folder); hift.load_shards(opt, folder)    # on every rank

hift.TrainerShards does this for the Trainer."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from hift.optim import HiftAdamW
from hift.resume import MethodState

SHARD_FILE = "hift_optimizer_rank{rank:05d}.pt"


def unwrap(optimizer) -> Optional[HiftAdamW]:
    """The HiftAdamW inside a framework's optimizer (accelerate wraps it), if there is one."""
    for _ in range(4):
        if isinstance(optimizer, HiftAdamW):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _of(optimizer) -> HiftAdamW:
    opt = unwrap(optimizer)
    if opt is None:
        raise TypeError(f"{type(optimizer).__name__} is not a HiftAdamW (nor wraps one)")
    return opt


def save_shard(optimizer, folder) -> Path:
    """Write this rank's state_dict() into folder (every rank calls it); returns the file."""
    opt = _of(optimizer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SHARD_FILE.format(rank=opt.rank_and_world[0])
    partial = path.with_name(path.name + ".partial")
    torch.save(opt.state_dict(), partial)
    os.replace(partial, path)  # a kill mid-write leaves no truncated shard under the real name
    return path


def load_shards(optimizer, folder) -> None:
    """Load this rank's share of the state that save_shard wrote into folder: its own file where
    as many ranks saved it, else cut out of every rank's file (each mapped, not read whole)."""
    opt = _of(optimizer)
    folder = Path(folder)
    rank, world = opt.rank_and_world
    saved = sorted(folder.glob(SHARD_FILE.replace("{rank:05d}", "*")))
    if not saved:
        raise FileNotFoundError(f"no shard of the optimizer state in {folder} (no {SHARD_FILE.format(rank=0)}): "
                                "resume from a checkpoint that every rank saved its shard into (hift.save_shard, "
                                "or callbacks=[hift.TrainerShards()] with a Trainer)")
    first = torch.load(saved[0], map_location="cpu", weights_only=True, mmap=True)
    saved_world = MethodState.from_dict(first["hift"], str(saved[0])).world
    paths = [folder / SHARD_FILE.format(rank=r) for r in range(saved_world)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the shards of the optimizer state at {', '.join(missing)} are missing (it was "
                                f"saved by {saved_world} rank(s), and rank {rank} of {world} needs all of them)")
    if saved_world == world:
        opt.load_state_dict(torch.load(paths[rank], map_location="cpu", weights_only=True))
        if not opt.awaiting_own_shard:
            return
    # another number of ranks (or another state_chunk_mib)
    opt.load_sharded_state_dicts([torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in paths])
