"""One rank's peak memory in a sharded (FSDP2) hift run on the CPU over gloo, to hold
hift.plan.fsdp.plan_placed to: the model built whole, fully_shard on each hift unit's module and
on the root (what a user does), then hift.fit (memory="manual", one full cycle, top_down). Two
runs a rank, each above what rests after sharding: torch's allocations (the allocator's running
total at torch.profiler's allocation events: what the planner predicts) and the resident set
(VmHWM; the profiler's own memory would inflate it, hence a second run). Each rank in a fresh
process with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536), as
bench/planner_measure.py.

    python bench/fsdp_peak_measure.py --ranks 2 3 [--batch 2] [--wide]   # spawns the ranks, one line each
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
# four times the weights, rows still uneven on 2 and 3 ranks: where MKL's ~10 MB (bench/results/
# fsdp_peak.md) is a small part of the resident peak
WIDE = dict(CONFIG, vocab_size=24007, hidden_size=640, intermediate_size=1728, num_attention_heads=5)
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


STEP_END = "hift::step_end"  # a profiler event fit's on_step records between two steps


def profile_events(prof):
    """Every event of a finished torch.profiler session (the tree walked, in no order)."""
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        yield ev


def allocation_timeline(prof, events=None) -> list[tuple[int, int, int, object]]:
    """(time, address, bytes: + alloc, - free, the event) of every CPU allocation event of a
    finished torch.profiler session (or of its `events`), in time order."""
    from torch._C._profiler import _EventType

    return sorted(((ev.start_time_ns, ev.typed[1].ptr, ev.typed[1].alloc_size, ev)
                   for ev in (profile_events(prof) if events is None else events)
                   if ev.typed[0] == _EventType.Allocation), key=lambda x: x[:3])


def count_every_thread() -> None:
    """Have torch's CPU allocator count what every thread allocates and frees (c10's flag
    caffe2_report_cpu_memory_usage): the profiler reports the events of the threads it profiles
    only, and gloo's worker threads free buffers (the reduce-scatter's clone) at times; each
    reported event's running total then counts those frees too."""
    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage").value = True


def allocated_peaks(prof) -> tuple[int, list[int]]:
    """Torch's CPU allocations (what the planner predicts, as torch.cuda.max_memory_allocated
    measures on a GPU): the peak of the allocator's running total above the session's start
    (each event's total_allocated, every thread counted: count_every_thread), over the whole
    session and per step."""
    events = list(profile_events(prof))
    ends = sorted(ev.start_time_ns for ev in events if ev.name == STEP_END)
    timeline = allocation_timeline(prof, events)
    if not timeline:
        return 0, [0] * len(ends)
    base = timeline[0][3].typed[1].total_allocated - timeline[0][2]
    peak, steps, k, live = 0, [0] * (len(ends) + 1), 0, 0
    for when, _, _, event in timeline:
        while k < len(ends) and when > ends[k]:
            k += 1
            steps[k] = live  # a step starts with what the last one left
        live = event.typed[1].total_allocated - base
        peak, steps[k] = max(peak, live), max(steps[k], live)
    return peak, steps[: len(ends)]


def sharded_model(config, seed: int):
    """The model built whole, then fully_shard on each hift unit's module and on the root."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # one FSDP module per hift unit (embeddings, each block, the final norm, the head), as
    # shard_weights makes them and as the planner models them; the root holds none of them
    for module in [model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head]:
        fully_shard(module)
    fully_shard(model)
    return model


def measure_sharded(config, batch: int, seq: int, steps: int = 5, seed: int = 0, on_step=None,
                    allocations: bool = False) -> dict:
    """One rank (the process group up): the peak above this rank's resting shards, by the resident
    set (VmHWM; reset after each step), or with `allocations` by torch's allocator (torch.profiler's
    allocation events; the profiler's own memory would inflate VmHWM, so not both in one run).
    on_step: called after each step, outside the measured peak (bench/fsdp_peak_trace.py)."""
    import hift
    from hift.memory import host_peak_bytes, host_resident_bytes, reset_host_peak
    from hift.plan.trace import llama_config

    config = llama_config(config) if isinstance(config, (str, dict)) else config
    model = sharded_model(config, seed)
    gen = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": (ids := torch.randint(0, config.vocab_size, (batch, seq), generator=gen)),
                "labels": ids} for _ in range(steps)]
    _trim()
    reset_host_peak()
    base = host_resident_bytes()
    steps_peak = []  # each step's peak above the resting shards (VmHWM reset after each)

    def record_peak(event):
        steps_peak.append(host_peak_bytes() - base)
        if on_step is not None:
            on_step(event)
        with torch.profiler.record_function(STEP_END):
            pass
        reset_host_peak()

    profiler = None
    if allocations:
        from torch.profiler import ProfilerActivity, profile

        count_every_thread()
        profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        profiler.start()
    hift.fit(model, batches, lr=1e-5, num_cycles=1, precision="fp32", memory="manual", group_size=1,
             offload=False, progress=False, order="top_down", lr_schedule="constant", log_every=steps,
             on_step=record_peak)
    if profiler is not None:
        profiler.stop()
        peak, steps_peak = allocated_peaks(profiler)
    else:
        peak = max([host_peak_bytes() - base, *steps_peak])
    shards = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return dict(peak_above_shards=peak, steps_peak=steps_peak, shards=shards, resident=base)


def predict(config, batch: int, seq: int, ranks: int):
    from hift.plan.fsdp import plan_placed
    from hift.plan.trace import meta_model, trace_units

    trace, _ = trace_units(meta_model(config, "fp32"), batch, seq)
    return plan_placed(trace, "fp32", ranks=ranks, shard_weights=True, offload=False, device="cpu")


def predicted_steps(plan) -> list[int]:
    """Per step of a top_down cycle (the head's group first), what the planner predicts above the
    resting shards: each group's step peak plus the state (the part of plan_placed's total above
    the weights, per group instead of the largest)."""
    b = plan.breakdown
    state = b.total - b.weights - b.gathered - b.gradients - b.activations
    return [p.total + state for p in plan.step_peaks][::-1]


def predicted_where(plan) -> list[str]:
    """Per step of a top_down cycle, where the planner puts its peak."""
    return [p.where for p in plan.step_peaks][::-1]


def rank_main(rank, world, store, out, config, batch, seq):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(THREADS)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    measure_sharded(WARMUP, 1, 16, steps=2)  # lazy initialisation out of the measured run
    measured = measure_sharded(config, batch, seq)
    allocated = measure_sharded(config, batch, seq, allocations=True)
    plan = predict(config, batch, seq, world)
    b = plan.breakdown
    Path(out, f"rank-{rank}.json").write_text(json.dumps(dict(
        measured, allocated=allocated["peak_above_shards"], allocated_steps=allocated["steps_peak"],
        predicted=b.total - b.weights, predicted_steps=predicted_steps(plan),
        predicted_where=predicted_where(plan), weights=b.weights, gathered=b.gathered, gradients=b.gradients,
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
    parser.add_argument("--wide", action="store_true", help="the wider model (WIDE): 4x the weights")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    for n in args.ranks:
        for r, row in enumerate(run(n, WIDE if args.wide else CONFIG, args.batch, args.seq)):
            mb = lambda xs: [round(x / 1e6, 1) for x in xs]  # noqa: E731
            print(json.dumps(dict(ranks=n, rank=r, predicted_mb=round(row["predicted"] / 1e6, 1),
                                  allocated_mb=round(row["allocated"] / 1e6, 1),
                                  ratio_allocated=round(row["predicted"] / row["allocated"], 3),
                                  resident_mb=round(row["peak_above_shards"] / 1e6, 1),
                                  ratio_resident=round(row["predicted"] / row["peak_above_shards"], 3),
                                  predicted_steps_mb=mb(row["predicted_steps"]),
                                  allocated_steps_mb=mb(row["allocated_steps"]),
                                  resident_steps_mb=mb(row["steps_peak"]), where=row["predicted_where"])))
