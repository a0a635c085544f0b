"""Where a sharded (FSDP2) hift step's bytes go on the CPU: per step of bench/fsdp_peak_measure.py's
run, torch's allocations (torch.profiler's allocation events, rank 0) at the step's peak, each
alive tensor named by the op that made it and the FSDP2 or autograd phase around that op. What
bench/results/fsdp_peak.md's diagnosis and hift.plan.fsdp's FSDP2 model are read from.

    PYTHONPATH=python:tests:. python bench/fsdp_peak_trace.py --ranks 2 --batch 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.fsdp_peak_measure import CONFIG, WARMUP, allocation_timeline, environment  # noqa: E402

MB = 1e6


CHAINS = os.environ.get("HIFT_TRACE_CHAINS") == "1"  # --chains: each op's whole ancestry


def _phase(event) -> str:
    """The op that allocated and the nearest FSDP2 or autograd phase above it."""
    names, node = [], event.parent
    while node is not None:
        names.append(node.name)
        node = node.parent
    if CHAINS:
        return " < ".join(names[:8])
    op = names[0] if names else "?"
    phase = next((n for n in names if n.startswith(("FSDP::", "autograd::engine::evaluate_function"))), "")
    phase = phase.replace("autograd::engine::evaluate_function: ", "bw ")
    return f"{phase} / {op}" if phase else op


def labelled_timeline(prof) -> list[tuple[int, int, int, str]]:
    """(time, address, bytes (+ alloc, - free), where) of every CPU allocation event, in time order."""
    return [(when, ptr, size, _phase(event)) for when, ptr, size, event in allocation_timeline(prof)]


def peak_report(timeline) -> dict:
    """The peak of the bytes allocated within the step (net of the step's start) and what is alive
    there, by where it was made (allocations from before the step appear only as frees)."""
    live, alive, peak, at = 0, {}, 0, {}
    for _, ptr, size, where in timeline:
        live += size
        if size > 0:
            alive[ptr] = (size, where)
        else:
            alive.pop(ptr, None)
        if live > peak:
            peak, at = live, dict(alive)
    by_where = Counter()
    for size, where in at.values():
        by_where[where] += size
    phases = {}  # the most alive in each phase, in the order the phases first allocate
    live = 0
    for _, _, size, where in timeline:
        live += size
        phase = where.split(" / ")[0]
        phases[phase] = max(phases.get(phase, live), live)
    return dict(peak=peak, end=live, alive=[(w, b) for w, b in by_where.most_common(12)],
                phases=list(phases.items()))


def rank_main(rank, world, store, out, batch, seq):
    import datetime

    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    import bench.fsdp_peak_measure as measure

    torch.set_num_threads(measure.THREADS)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    measure.measure_sharded(WARMUP, 1, 16, steps=2)
    reports, current = [], []

    def start():
        current[:] = [profile(activities=[ProfilerActivity.CPU], profile_memory=True)]
        current[0].start()

    def on_step(_):
        current[0].stop()
        timeline = labelled_timeline(current[0])
        reports.append(peak_report(timeline))
        if os.environ.get("HIFT_TRACE_DUMP") == str(len(reports) - 1) and rank == 0:
            live = 0
            for _, ptr, size, where in timeline:
                live += size
                if abs(size) > 1e6:
                    print(f"DUMP {live / MB:7.1f} {size / MB:+7.2f} {ptr % 10**6:06d} {where}")
        start()

    start()
    measure.measure_sharded(CONFIG, batch, seq, on_step=on_step)
    current[0].stop()
    if rank == 0:
        Path(out, "trace.json").write_text(json.dumps(reports))
    dist.destroy_process_group()


def main():
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=200)
    parser.add_argument("--chains", action="store_true", help="name each tensor by its op's whole ancestry")
    parser.add_argument("--dump", type=int, default=-1, help="print this step's allocations over 1 MB in order")
    args = parser.parse_args()
    os.environ.update(environment(), HIFT_TRACE_CHAINS="1" if args.chains else "0", HIFT_TRACE_DUMP=str(args.dump))
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rank_main, args=(args.ranks, str(Path(tmp, "store")), tmp, args.batch, args.seq),
                 nprocs=args.ranks, join=True)
        reports = json.loads(Path(tmp, "trace.json").read_text())
    for i, r in enumerate(reports):
        print(f"step {i}: peak {r['peak'] / MB:.1f} MB above the step's start, {r['end'] / MB:+.1f} MB at its end"
              + (" (with the model's build, its sharding and the state's allocation)" if i == 0 else ""))
        for where, nbytes in r["alive"]:
            print(f"    {nbytes / MB:7.2f}  {where}")
        print("  most alive by phase: " + ", ".join(f"{p} {b / MB:.1f}" for p, b in r["phases"] if " " in p))


if __name__ == "__main__":
    main()
