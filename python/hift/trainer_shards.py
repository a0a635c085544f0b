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

from pathlib import Path

from transformers import TrainerCallback

from hift.shards import load_shards, save_shard, unwrap


class TrainerShards(TrainerCallback):
    def on_save(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap(optimizer)
        if opt is None or opt.dp is None:  # one process: optimizer.pt holds the whole state
            return
        save_shard(opt, Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap(optimizer)
        if opt is None or not opt.awaiting_own_shard:  # nothing to load, or this rank's own is loaded
            return
        load_shards(opt, Path(args.output_dir) / f"checkpoint-{state.global_step}")
