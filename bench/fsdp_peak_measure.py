"""One rank's peak memory in a sharded (FSDP2) hift run on the CPU over gloo, to hold
hift.plan.fsdp.plan_placed to: the model built whole, fully_shard per decoder layer and on the
root (what a user does; here one FSDP module per hift unit), then the peak reset, then hift.fit (memory="manual", one full cycle,
top_down). The peak is VmHWM above the resident set after sharding: what a rank holds beyond
its resting shards. Run each rank in a fresh process with glibc's mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_=65536), as bench/planner_measure.py.

    python bench/fsdp_peak_measure.py --ranks 2     # spawns the ranks, prints the table
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

# a small LLaMA whose rows do not divide by 3 (hidden 320, vocab 12007, intermediate 864 / 3 does,
# 12007 and 320 do not): FSDP2 pads them
CONFIG = dict(vocab_size=12007, hidden_size=320, num_hidden_layers=2, num_attention_heads=5,
              intermediate_size=864, max_position_embeddings=256)
BATCH, SEQ = 1, 200
WARMUP = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=40, max_position_embeddings=64)
THREADS = 2


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure_sharded(config, batch: int, seq: int, steps: int = 5, seed: int = 0) -> dict:
    """One rank (the process group up): the peak above this rank's resting shards."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    import hift
    from hift.memory import host_peak_bytes, host_resident_bytes, reset_host_peak
    from hift.plan.trace import llama_config

    config = llama_config(config) if isinstance(config, (str, dict)) else config
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # one FSDP module per hift unit (embeddings, each block, the final norm, the head), as
    # shard_weights makes them and as the planner models them; the root holds none of them
    for module in [model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head]:
        fully_shard(module)
    fully_shard(model)
    gen = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": (ids := torch.randint(0, config.vocab_size, (batch, seq), generator=gen)),
                "labels": ids} for _ in range(steps)]
    _trim()
    reset_host_peak()
    base = host_resident_bytes()
    steps_peak = []  # each step's peak above the resting shards (VmHWM reset after each)

    def on_step(_):
        steps_peak.append(host_peak_bytes() - base)
        reset_host_peak()

    hift.fit(model, batches, lr=1e-5, num_cycles=1, precision="fp32", memory="manual", group_size=1,
             offload=False, progress=False, order="top_down", lr_schedule="constant", log_every=steps,
             on_step=on_step)
    peak = max([host_peak_bytes() - base, *steps_peak])
    shards = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return dict(peak_above_shards=peak, steps_peak=steps_peak, shards=shards, resident=base)


def predict(config, batch: int, seq: int, ranks: int):
    from hift.plan.fsdp import plan_placed
    from hift.plan.trace import meta_model, trace_units

    trace, _ = trace_units(meta_model(config, "fp32"), batch, seq)
    return plan_placed(trace, "fp32", ranks=ranks, shard_weights=True, offload=False)


def predicted_steps(config, batch: int, seq: int, ranks: int) -> list[int]:
    """Per step of a top_down cycle (the head's group first), what the planner predicts above the
    resting shards: fsdp_sweep's peak of that group plus the state (the part of plan_placed's
    total above the weights, per group instead of the largest)."""
    from hift.plan import fsdp
    from hift.plan.predict import make_group_ranges, saved_bytes
    from hift.plan.trace import meta_model, trace_units

    trace, _ = trace_units(meta_model(config, "fp32"), batch, seq)
    b = predict(config, batch, seq, ranks).breakdown
    state = b.total - b.weights - b.gathered - b.gradients - b.activations
    geo = fsdp.Geometry.of(trace, ranks)
    out = []
    for units in make_group_ranges(len(trace.numels), 1):
        trainable = [u in units for u in range(len(trace.numels))]
        saved, transient = saved_bytes(trace, trainable, units.start, None)
        out.append(fsdp.fsdp_sweep(geo, 4, 4, set(units), units.start, saved, transient, ranks=ranks,
                                   offload_weights=False)[0] + state)
    return out[::-1]


def rank_main(rank, world, store, out, config, batch, seq):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(THREADS)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    measure_sharded(WARMUP, 1, 16, steps=2)  # lazy initialisation out of the measured run
    measured = measure_sharded(config, batch, seq)
    plan = predict(config, batch, seq, world)
    b = plan.breakdown
    Path(out, f"rank-{rank}.json").write_text(json.dumps(dict(
        measured, predicted=b.total - b.weights, predicted_steps=predicted_steps(config, batch, seq, world), weights=b.weights, gathered=b.gathered, gradients=b.gradients,
        activations=b.activations, optimizer=b.total - b.weights - b.gathered - b.gradients - b.activations)))
    dist.destroy_process_group()


def environment() -> dict:
    root = Path(__file__).resolve().parents[1]
    return dict(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", MALLOC_ARENA_MAX="2",
                PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(THREADS),
                PYTHONPATH=os.pathsep.join([str(root / "python"), str(root), os.environ.get("PYTHONPATH", "")]))


def run(ranks: int, config=CONFIG, batch=BATCH, seq=SEQ) -> list[dict]:
    import torch.multiprocessing as mp

    saved = dict(os.environ)
    os.environ.update(environment())  # read by each spawned rank's interpreter as it starts
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(rank_main, args=(ranks, str(Path(tmp, "store")), tmp, config, batch, seq), nprocs=ranks,
                     join=True)
            return [json.loads(Path(tmp, f"rank-{r}.json").read_text()) for r in range(ranks)]
    finally:
        os.environ.clear()
        os.environ.update(saved)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--seq", type=int, default=SEQ)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    for n in args.ranks:
        for r, row in enumerate(run(n, CONFIG, args.batch, args.seq)):
            print(json.dumps(dict(ranks=n, rank=r, **row, ratio=row["predicted"] / row["peak_above_shards"])))
