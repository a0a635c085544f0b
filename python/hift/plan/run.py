"""`hift plan`: the peak device memory of a hift run, and of full AdamW and LOMO, predicted from
a model config before any weight exists; and hift's host RAM, disk and PCIe traffic per state
format and store.

    hift plan                                  # LLaMA-2-7B and -13B, batch 1, seq 512, beside the papers
    hift plan --model llama-2-7b --precision bf16 --group-size 1 --no-prefetch
    hift plan --config my_llama.json --batch 4 --seq 1024
    hift plan --model ./my-model-dir                 # any causal LM family: its config.json
    hift plan --model llama-3-8b --device-memory 24 --host-memory 64   # what memory="auto" picks there
    hift plan --model llama-2-70b --ranks 8 --shard-weights --recompute   # hift on FSDP2: one GPU's share
    hift plan --model llama-3-8b --offload-weights                         # the weights in host RAM
"""
from __future__ import annotations

import argparse
import json
import sys

from hift import formats
from hift.plan.predict import GB, STATE_STORES, plans_from_trace
from hift.plan.report import (HEADER, PUBLISHED, breakdown_row, formats_notes, formats_table,
                              published_table)
from hift.plan import auto
from hift.plan.fsdp import Machine, check_placement, plan_placed
from hift.plan.peers import LABELS, PEERS, plan_peer
from hift.plan.trace import MODELS, block_input_bytes, meta_model, trace_units
from hift.precision import DTYPES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hift plan", description="Predict the peak device memory of a hift "
                                "run (and of full AdamW and LOMO) from a model config, without weights; and "
                                "hift's host RAM, disk and PCIe traffic per state format and store.")
    p.add_argument("--model", default=None, help=f"one of {sorted(MODELS)}, or a local model directory "
                   "(any causal LM family: its config.json is read, no weights); default: the published table")
    p.add_argument("--config", default=None, help="a model's config.json (any causal LM family)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--precision", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false")
    p.add_argument("--recompute", action="store_true", default=None,
                   help="predict fit(..., recompute_activations=True)")
    p.add_argument("--state-chunk-mib", type=float, default=None,
                   help="predict fit(..., state_chunk_mib=N): the state streamed in chunks of N MiB")
    p.add_argument("--moment-dtype", default=None, choices=formats.MOMENT_DTYPES,
                   help="predict fit(..., moment_dtype=...)")
    p.add_argument("--master-format", default="auto", choices=("auto", "remainder", "fp32"),
                   help="predict fit(..., master_format=...) (auto: the remainder for bf16 weights)")
    p.add_argument("--state-store", default=None, choices=STATE_STORES,
                   help="predict fit(..., state_store=...): host RAM, or files under state_dir")
    p.add_argument("--ranks", type=int, default=1,
                   help="predict data parallel on N ranks (torchrun --nproc_per_node N): one rank's share")
    p.add_argument("--reduce-dtype", default="fp32", choices=("fp32", "bf16"),
                   help="predict fit(..., reduce_dtype=...) under --ranks")
    p.add_argument("--cpu", action="store_true", help="predict a CPU run (offload off: every group's "
                   "state resident, unless it rests on disk; the total above the model is the process's growth)")
    p.add_argument("--device-memory", type=float, default=None, metavar="GB",
                   help="show what memory='auto' picks for a device with this much free (GB = 1e9 bytes), "
                   "keeping the options given here, and what it costs")
    p.add_argument("--host-memory", type=float, default=None, metavar="GB",
                   help="the host RAM available to the run, for memory='auto' (with --device-memory, or --cpu)")
    p.add_argument("--disk", type=float, default=None, metavar="GB",
                   help="free disk under state_dir, for memory='auto' (default: the disk store is not limited)")
    weights = p.add_argument_group("weights that do not fit one GPU (hift on FSDP2; hift.plan.fsdp)")
    weights.add_argument("--shard-weights", action="store_true",
                         help="predict shard_weights=True: the weights sharded over --ranks with FSDP2")
    weights.add_argument("--offload-weights", action="store_true",
                         help="predict offload_weights=True: the weights (each rank's shard) in host RAM, the update "
                         "on the host")
    weights.add_argument("--ranks-per-node", type=int, default=None,
                         help="ranks sharing one node's host RAM (default: every rank on one node)")
    weights.add_argument("--pcie-gbps", type=float, default=25.0, help="PCIe GB/s each way, for the step time")
    weights.add_argument("--network-gbps", type=float, default=25.0,
                         help="collectives' GB/s per rank, for the step time (NVLink: a few hundred)")
    weights.add_argument("--gpu-tflops", type=float, default=100.0,
                         help="the GPU's achieved dense bf16 TFLOPS, for the step time")
    weights.add_argument("--host-gbps", type=float, default=50.0,
                         help="host memory GB/s a node's update gets (offloaded weights), for the step time")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.ranks < 1:
        p.error(f"--ranks takes a number of ranks, 1 or more; got {args.ranks}")
    placed = args.shard_weights or args.offload_weights
    if placed:
        if args.cpu:
            p.error("--shard-weights and --offload-weights place the weights of a GPU run; --cpu has no device to "
                    "keep them off")
        try:
            check_placement(args.ranks, args.shard_weights, args.offload_weights)
        except ValueError as err:
            p.error(str(err))
    if args.ranks_per_node is not None and not 1 <= args.ranks_per_node <= args.ranks:
        p.error(f"--ranks-per-node takes 1 to --ranks ({args.ranks}); got {args.ranks_per_node}")
    if placed and args.model is None and args.config is None:
        p.error("--shard-weights and --offload-weights need --model or --config")
    if args.model is None and args.config is None:
        print(published_table(args.batch, args.seq, args.group_size, args.prefetch))
        return 0
    config = args.config or args.model
    device = "cpu" if args.cpu else "cuda"
    try:
        model = meta_model(config, args.precision)
    except ValueError as err:
        p.error(str(err))
    trace, _ = trace_units(model, args.batch, args.seq)
    if args.device_memory is not None or args.host_memory is not None:
        return _auto(args, p, trace, block_input_bytes(model, args.batch, args.seq, args.precision), device)
    args.moment_dtype = args.moment_dtype or "fp32"
    args.state_store = args.state_store or "host"
    boundary = block_input_bytes(model, args.batch, args.seq, args.precision) if args.recompute else None
    if placed:
        return _placed(args, config, trace, boundary)
    plans = plans_from_trace(trace, boundary, args.precision, args.group_size, args.prefetch,
                             not args.cpu, args.state_chunk_mib, moment_dtype=args.moment_dtype,
                             master_format=args.master_format, state_store=args.state_store,
                             device=device, ranks=args.ranks, reduce_dtype=args.reduce_dtype)
    if args.json:
        print(json.dumps({k: v.as_dict() for k, v in plans.items()}, indent=1))
        return 0
    print(f"{config}: batch {args.batch}, seq {args.seq}, {args.precision}, group size {args.group_size}, "
          f"prefetch {'on' if args.prefetch else 'off'}, {'CPU (offload off)' if args.cpu else 'offload on'}, "
          f"{args.state_store} store" + (f", {args.ranks} ranks (per rank)" if args.ranks > 1 else "")
          + " (GB = 1e9 bytes)\n")
    print(HEADER)
    for name, b in plans.items():
        published = None if args.cpu or args.ranks > 1 else PUBLISHED.get((args.model, name, args.precision))
        print(breakdown_row(name, b, published))
    print()
    for name, b in plans.items():
        for note in b.notes:
            print(f"{name}: {note}")
    h = plans["hift"]
    print(f"hift: host RAM {h.host_ram / GB:.2f} GB, disk {h.disk / GB:.2f} GB, per step (largest group) "
          f"PCIe {h.pcie_per_step / GB:.2f} GB ({h.pcie_per_param:.1f} B/param), disk I/O "
          f"{h.disk_io_per_step / GB:.2f} GB"
          + (f", collectives {h.network_per_step / GB:.2f} GB (DDP + AdamW: {plans['adamw'].network_per_step / GB:.2f})"
             if args.ranks > 1 else ""))
    print(f"\nhift by state format and store ({args.precision}"
          + (f", one of {args.ranks} ranks" if args.ranks > 1 else "") + "):\n")
    print(formats_table(trace, args.precision, args.group_size, args.prefetch, args.state_chunk_mib, boundary,
                        device, name=args.model, ranks=args.ranks, reduce_dtype=args.reduce_dtype))
    print("\n" + formats_notes())
    return 0


def _auto(args, p, trace, boundary: int, device: str) -> int:
    """--device-memory / --host-memory: what memory="auto" picks on that machine, and its cost."""
    if args.host_memory is None or (device == "cuda" and args.device_memory is None):
        p.error("memory='auto' needs --host-memory, and --device-memory unless --cpu")
    budgets = auto.Budgets(host=int(args.host_memory * GB),
                           device=None if device == "cpu" else int(args.device_memory * GB),
                           disk=None if args.disk is None else int(args.disk * GB))
    fixed = {name: value for name, value in (("moment_dtype", args.moment_dtype), ("state_store", args.state_store),
                                             ("recompute_activations", args.recompute),
                                             ("state_chunk_mib", args.state_chunk_mib)) if value is not None}
    # the weights placed as asked; where not asked, auto may place them when nothing else fits
    fixed.update({name: True for name in auto.WEIGHT_OPTIONS if getattr(args, name)})
    try:
        choice = auto.choose(trace, budgets, fixed, precision=args.precision, group_size=args.group_size,
                             recompute_boundary=boundary, device=device, master_format=args.master_format,
                             prefetch=args.prefetch, ranks=args.ranks, reduce_dtype=args.reduce_dtype,
                             placements=auto.WEIGHT_OPTIONS, ranks_per_node=args.ranks_per_node)
    except auto.MemoryPlanError as err:
        print(err, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dict(options=choice.options, chosen=list(choice.chosen), budgets=vars(budgets),
                              plan=choice.plan.as_dict()), indent=1))
        return 0
    h = choice.plan
    print(choice.line())
    if choice.options.get("shard_weights") or choice.options.get("offload_weights"):
        print(f"\n{PLACED_HEADER}\n{_placed_row(h, h.host)}\n")
    else:
        print(f"\n{HEADER}\n{breakdown_row('hift', h, None)}\n")
    costs = []
    if choice.options["state_chunk_mib"] is not None and device != "cpu":
        costs.append("chunks: the update of a group larger than a chunk waits on its copies (PCIe "
                     f"{h.pcie_per_step / GB:.2f} GB per step; at 25 GB/s about {h.pcie_per_step / 25e9 * 1e3:.0f} ms "
                     "not hidden behind compute for the streamed groups)")
    if choice.options["recompute_activations"]:
        costs.append("recompute: one more forward of the frozen blocks above the active group (about a third "
                     "more compute per step)")
    if choice.options["state_store"] == "disk":
        costs.append(f"disk store: {h.disk_io_per_step / GB:.2f} GB read and written per step")
    if choice.options.get("shard_weights") or choice.options.get("offload_weights"):
        costs.append("the weights placed: " + "; ".join(h.notes[:1]) + " (`hift plan --shard-weights` / "
                     "`--offload-weights` with these options shows their bytes and time per step)")
    print("expected step-time effect: " + ("; ".join(costs) if costs else "none (no chunks, no recompute, no disk)"))
    return 0


PLACED_HEADER = ("| method | weights resting | weights in flight | grads | optimizer (resident) "
                 "| optimizer (in flight) | activations | total | host RAM per node |\n"
                 "|---|---|---|---|---|---|---|---|---|")


def _placed_row(b, host_per_node: int) -> str:
    return (f"| hift | {b.weights / GB:.2f} | {b.gathered / GB:.2f} | {b.gradients / GB:.2f} | "
            f"{b.optimizer_resident / GB:.2f} | {b.optimizer_in_flight / GB:.2f} | {b.activations / GB:.2f} | "
            f"**{b.total / GB:.2f}** | {host_per_node / GB:.2f} |")


def _placed(args, config, trace, boundary) -> int:
    """--shard-weights / --offload-weights: one GPU's peak, the host RAM per node, the bytes a step
    moves and its time, beside the peers (hift.plan.peers) on the same GPUs."""
    machine = Machine(args.pcie_gbps, args.network_gbps, args.gpu_tflops, args.host_gbps)
    tokens = args.batch * args.seq
    try:
        plan = plan_placed(trace, args.precision, args.group_size, args.prefetch, True, args.state_chunk_mib, boundary,
                           moment_dtype=args.moment_dtype, master_format=args.master_format,
                           state_store=args.state_store, ranks=args.ranks, reduce_dtype=args.reduce_dtype,
                           shard_weights=args.shard_weights, offload_weights=args.offload_weights,
                           ranks_per_node=args.ranks_per_node, tokens=tokens, machine=machine)
    except ValueError as err:
        print(f"hift plan: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"hift": plan.as_dict()}, indent=1))
        return 0
    b, s, cycle = plan.breakdown, plan.largest_step, plan.cycle_time()
    print(f"{config}: batch {args.batch}, seq {args.seq}, {args.precision}, group size {args.group_size}, "
          f"{args.ranks} rank{'s' * (args.ranks > 1)} ({plan.ranks_per_node} a node), "
          f"shard_weights={args.shard_weights}, offload_weights={args.offload_weights}, {args.state_store} store"
          + (", recompute" if boundary is not None else "") + " (GB = 1e9 bytes; one GPU's share)\n")
    print(PLACED_HEADER)
    print(_placed_row(b, plan.host_per_node) + "\n")
    for note in b.notes:
        print(f"hift: {note}")
    print(f"\nper step, one rank, the largest (group {s.group}) and the mean of a cycle:")
    mean = lambda key: sum(getattr(x, key) for x in plan.steps) / len(plan.steps)  # noqa: E731
    print(f"  network handed {s.network / GB:.2f} GB (mean {mean('network') / GB:.2f}), on the wire "
          f"{s.wire / GB:.2f} GB (mean {mean('wire') / GB:.2f})")
    print(f"  PCIe {s.pcie / GB:.2f} GB (mean {mean('pcie') / GB:.2f}): H2D {s.h2d / GB:.2f}, D2H {s.d2h / GB:.3f}"
          + (f"; with the update on the device {plan.pcie_update_on_device[s.group] / GB:.2f} GB"
             if plan.offload_weights else ""))
    print(f"  step time, the mean of a cycle at {tokens} tokens ({machine.describe()}): compute "
          f"{cycle.compute * 1e3:.0f} ms, PCIe {cycle.pcie * 1e3:.0f} ms, network {cycle.network * 1e3:.0f} ms, host "
          f"update {cycle.host_update * 1e3:.0f} ms: {cycle.overlapped * 1e3:.0f} ms overlapped, "
          f"{cycle.serial * 1e3:.0f} ms serial")
    for link in ("pcie", "network"):
        hide = plan.hide_tokens(link)
        if hide is not None:
            print(f"  the weights' stream over {'PCIe' if link == 'pcie' else 'the network'} hides under compute from "
                  f"about {hide:,.0f} tokens a step (batch x seq)")
    print(f"\nbeside it, full fine-tuning on the same {args.ranks} GPU{'s' * (args.ranks > 1)} "
          "(hift.plan.peers: per GPU peak, host RAM per node, network and PCIe per step):\n")
    print("| method | device peak | host RAM per node | network | PCIe | step (overlapped) |\n"
          "|---|---|---|---|---|---|")
    for method in PEERS:
        peer = plan_peer(method, trace, tokens, args.ranks, ranks_per_node=args.ranks_per_node,
                         recompute_boundary=boundary, machine=machine)
        print(f"| {LABELS[method]} | {peer.device_peak / GB:.2f} | {peer.host_per_node / GB:.1f} | "
              f"{peer.step.network / GB:.1f} | {peer.step.pcie / GB:.1f} | {peer.time.overlapped * 1e3:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
