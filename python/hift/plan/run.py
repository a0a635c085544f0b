"""`hift plan`: the peak device memory of a hift run, and of full AdamW and LOMO, predicted from
a model config before any weight exists; and hift's host RAM, disk and PCIe traffic per state
format and store.

    hift plan                                  # LLaMA-2-7B and -13B, batch 1, seq 512, beside the papers
    hift plan --model llama-2-7b --precision bf16 --group-size 1 --no-prefetch
    hift plan --config my_llama.json --batch 4 --seq 1024
    hift plan --model ./my-model-dir                 # any causal LM family: its config.json
    hift plan --model llama-3-8b --device-memory 24 --host-memory 64   # what memory="auto" picks there
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
from hift.plan.trace import DTYPES, MODELS, block_input_bytes, meta_model, trace_units


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
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.ranks < 1:
        p.error(f"--ranks takes a number of ranks, 1 or more; got {args.ranks}")
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
    try:
        choice = auto.choose(trace, budgets, fixed, precision=args.precision, group_size=args.group_size,
                             recompute_boundary=boundary, device=device, master_format=args.master_format,
                             prefetch=args.prefetch, ranks=args.ranks, reduce_dtype=args.reduce_dtype)
    except auto.MemoryPlanError as err:
        print(err, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dict(options=choice.options, chosen=list(choice.chosen), budgets=vars(budgets),
                              plan=choice.plan.as_dict()), indent=1))
        return 0
    h = choice.plan
    print(choice.line())
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
    print("expected step-time effect: " + ("; ".join(costs) if costs else "none (no chunks, no recompute, no disk)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
