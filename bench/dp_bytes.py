"""Data parallel on 2 gloo ranks (CPU): bytes communicated per step and step time, hift against
DDP with torch.optim.AdamW on the same model and batches, one run side by side.

    PYTHONPATH=python:. python bench/dp_bytes.py [--out bench/results/dp_gloo.md]

Bytes are counted from the collectives' tensor sizes: hift's from its DataParallel (the flat
reduce-scattered gradients, the all-gathered weights, the small all-reduce of norm, flags and
reached parameters), DDP's from a comm hook that counts every bucket it all-reduces. "On the
wire" is what each rank sends under ring algorithms: (N-1)/N of a reduce-scatter's input or an
all-gather's output, 2(N-1)/N of an all-reduce. The first steps (hift: one per group, so that
every group has been the active one; DDP: as many) are warm-up and not timed.
"""
import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=4000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=128)
BATCH, SEQ, WORLD = 2, 64, 2  # per rank


def model_and_batches(rank, steps):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    g = torch.Generator().manual_seed(100 + rank)
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    return model, batches


def run_hift(rank, steps):
    """Warm-up: one cycle (every group once)."""
    from hift import HiftAdamW

    model, batches = model_and_batches(rank, 64 + steps)
    opt = HiftAdamW(model, lr=1e-4, example_batch=batches[0], max_grad_norm=1.0)
    warmup = len(opt.groups)
    batches = batches[: warmup + steps]
    times, traffic = [], []
    for i, batch in enumerate(batches):
        before = (opt.dp.traffic.reduce_scatter, opt.dp.traffic.all_gather, opt.dp.traffic.all_reduce)
        dist.barrier()
        tick = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - tick)
        after = (opt.dp.traffic.reduce_scatter, opt.dp.traffic.all_gather, opt.dp.traffic.all_reduce)
        traffic.append([a - b for a, b in zip(after, before)])
    groups = len(opt.groups)
    opt.close()
    return dict(times=times, traffic=traffic, groups=groups)


def run_ddp(rank, steps, warmup):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    model, batches = model_and_batches(rank, warmup + steps)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    counted = [0]

    def counting_hook(state, bucket):
        counted[0] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, traffic = [], []
    for i, batch in enumerate(batches):
        before = counted[0]
        dist.barrier()
        tick = time.perf_counter()
        ddp(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if i >= warmup:
            times.append(time.perf_counter() - tick)
        traffic.append(counted[0] - before)
    return dict(times=times, traffic=traffic, params=sum(p.numel() for p in model.parameters()))


def worker(rank, world, store, steps, out):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    hift = run_hift(rank, steps)
    ddp = run_ddp(rank, steps, warmup=hift["groups"])
    if rank == 0:
        torch.save(dict(hift=hift, ddp=ddp), out)
    dist.destroy_process_group()


def llama7b_bytes(world: int = 8) -> str:
    """Bytes per step on the wire per rank (ring) for LLaMA-2-7B in bf16 on `world` ranks, from
    its units' sizes (a meta-device model): hift (group_size=1; gradients reduced in fp32 or, with
    reduce_dtype="bf16", in bf16; weights gathered in bf16; over a whole cycle) against DDP (bf16
    gradients all-reduced)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hift.distributed import GroupLayout

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    units = [model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head]
    sizes = [[p.numel() for p in unit.parameters()] for unit in units]
    ring = (world - 1) / world
    hift = statistics.mean(ring * GroupLayout.of(s, world).numel * (4 + 2) for s in sizes)
    hift_bf16 = statistics.mean(ring * GroupLayout.of(s, world).numel * (2 + 2) for s in sizes)
    total = sum(map(sum, sizes))
    ddp = 2 * ring * total * 2
    return (f"LLaMA-2-7B ({total / 1e9:.2f}B parameters, bf16) on {world} ranks, from its units' sizes "
            f"(K={len(units)}): per step and rank on the wire (ring), DDP {ddp / 1e9:.1f} GB (bf16 gradients "
            f"all-reduced), hift {hift / 1e9:.2f} GB (fp32 gradients reduce-scattered, bf16 weights "
            f"all-gathered; mean over a cycle): {hift / ddp:.3f} of DDP's; with reduce_dtype=\"bf16\" "
            f"{hift_bf16 / 1e9:.2f} GB, {hift_bf16 / ddp:.3f} of DDP's.")


def llama7b_per_gpu(world: int = 8) -> str:
    """The planner's LLaMA-2-7B (bf16, batch 1, seq 512, group_size=1, host store) on one GPU,
    turned into one of `world` data-parallel ranks by what distributed.py changes on the device:
    the state's device slot holds the rank's 1/world of the group's state; after backward the
    group's gradients are copied into one fp32 flat buffer with its 1/world shard beside it (the
    reduce-scatter's in and out), and later a bf16 flat buffer is all-gathered (the weights). The
    resting state is sharded: a node holds one copy in all, as one process does."""
    from hift.plan.predict import make_group_ranges, plan_hift
    from hift.plan.trace import llama_config, meta_model, trace_units

    model = meta_model(llama_config("llama-2-7b"), "bf16")
    trace, _ = trace_units(model, 1, 512)
    one = plan_hift(trace, "bf16")
    largest = max(sum(trace.numels[u] for u in g) for g in make_group_ranges(len(trace.numels), 1))
    slot = one.optimizer // world
    backward_peak = one.total - one.optimizer + slot  # the sweep's peak, the slot shrunk
    reduce_peak = one.weights + 2 * largest + slot + 4 * largest * (1 + 1 / world)  # grads, fp32 flat + shard
    gather_peak = one.weights + slot + 2 * largest  # the bf16 flat buffer of weights
    per_gpu = max(backward_peak, reduce_peak, gather_peak)
    return (f"LLaMA-2-7B bf16 on {world} GPUs of one node (planner, batch 1 x 512 per rank, group_size=1, "
            f"fp32 moments, host store), per GPU: device peak {per_gpu / 1e9:.2f} GB (one GPU alone: "
            f"{one.total / 1e9:.2f} GB; the state slot {one.optimizer / 1e9:.2f} -> {slot / 1e9:.2f} GB, "
            f"the reduce-scatter's fp32 buffers {4 * largest * (1 + 1 / world) / 1e9:.2f} GB after backward); "
            f"host RAM per node {one.host_ram / 1e9:.1f} GB (each rank rests 1/{world}: "
            f"{one.host_ram / world / 1e9:.1f} GB), where {world} unsharded processes would need "
            f"{world * one.host_ram / 1e9:.0f} GB. An estimate from the planner's single-GPU breakdown and "
            "the buffers distributed.py allocates, not a measurement.")


def report(results, steps, command) -> str:
    hift, ddp = results["hift"], results["ddp"]
    w = WORLD
    ring = (w - 1) / w
    per_step = [sum(t) for t in hift["traffic"]]
    cycles = hift["traffic"][: len(per_step) // hift["groups"] * hift["groups"]]  # whole cycles: every group as often
    rs = statistics.mean(t[0] for t in cycles)
    ag = statistics.mean(t[1] for t in cycles)
    ar = statistics.mean(t[2] for t in cycles)
    hift_wire = ring * (rs + ag) + 2 * ring * ar
    ddp_bytes = statistics.mean(ddp["traffic"])
    ddp_wire = 2 * ring * ddp_bytes
    med = lambda xs: statistics.median(xs) * 1000
    lines = [
        "# Data parallel, 2 gloo ranks on the CPU: hift against DDP + AdamW",
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared with other work: times are indicative), torch {torch.__version__}.",
        "",
        f"Model: LLaMA-shaped, {ddp['params'] / 1e6:.2f}M parameters ({CONFIG}), fp32; per rank "
        f"batch {BATCH} x seq {SEQ}; hift K={hift['groups']} groups (group_size=1), max_grad_norm=1 "
        f"for both; {steps} timed steps after {hift['groups']} warm-up steps.",
        "",
        "| | bytes handed to collectives per step (mean; hift over whole cycles) | on the wire per rank (ring) | median step |",
        "|---|---|---|---|",
        f"| DDP + torch AdamW | {ddp_bytes / 2**20:.2f} MiB (all-reduce) | {ddp_wire / 2**20:.2f} MiB "
        f"| {med(ddp['times']):.0f} ms |",
        f"| hift data parallel | {(rs + ag + ar) / 2**20:.2f} MiB (reduce-scatter {rs / 2**20:.2f}, all-gather "
        f"{ag / 2**20:.2f}, all-reduce {ar / 2**10:.2f} KiB) | {hift_wire / 2**20:.2f} MiB "
        f"| {med(hift['times']):.0f} ms |",
        "",
        f"hift moves {hift_wire / ddp_wire:.2f} of DDP's bytes per step (1/K = {1 / hift['groups']:.2f}; "
        "groups differ in size: the embedding's and the head's steps move more than a block's, the "
        "final norm's next to nothing). Every step, warm-up included (bytes handed to collectives, MiB): " + ", ".join(f"{b / 2**20:.2f}" for b in per_step) + ".",
        "",
        "Step time covers forward, backward, the collectives and the update. hift's backward stops at "
        "the active group, so its step is shorter before any communication counts; on gloo over "
        "loopback the collectives are memory copies, so the bytes, not these times, are what carries "
        "to a network.",
        "",
        llama7b_bytes(),
        "",
        llama7b_per_gpu(),
        "",
        f"Command: `{command}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.pt"
        mp.spawn(worker, args=(WORLD, str(Path(tmp) / "store"), args.steps, str(out)), nprocs=WORLD)
        results = torch.load(out, weights_only=False)
    command = "PYTHONPATH=python:. python " + " ".join(shlex.quote(a) for a in ["bench/dp_bytes.py", *sys.argv[1:]])
    text = report(results, args.steps, command)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
