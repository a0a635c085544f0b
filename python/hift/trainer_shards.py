"""hift.TrainerShards: a 🤗 Trainer callback that makes its checkpoints hold every rank's shard of
HiftAdamW's state under data parallel (torchrun).

The Trainer saves optimizer.pt from rank 0 alone and, on resume, hands that file to every rank;
with HiftAdamW each rank holds only its own shard, so rank 0's is refused on the others (step()
says so in words). With this callback every rank also writes its own shard into the checkpoint
(on_save, which the Trainer calls on every rank), and on resume each rank loads its own from there
(on_train_begin, after the Trainer restored global_step). Without data parallel it does nothing."""
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
        if opt is None or opt.dp is None or opt._shard_of_rank is None:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / SHARD_FILE.format(rank=opt.dp.rank)
        if not path.is_file():
            raise FileNotFoundError(
                f"rank {opt.dp.rank}'s shard of the optimizer state is not at {path}: resume from a checkpoint "
                "of this output_dir that was saved with callbacks=[hift.TrainerShards()]")
        opt.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
