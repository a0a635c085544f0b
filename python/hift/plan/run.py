"""`hift plan`: the peak device memory of a hift run, and of full AdamW and LOMO, predicted from
a model config before any weight exists; and hift's host RAM, disk and PCIe traffic per state
format and store.

    hift plan                                  # LLaMA-2-7B and -13B, batch 1, seq 512, beside the papers
    hift plan --model llama-2-7b --precision bf16 --group-size 1 --no-prefetch
    hift plan --config my_llama.json --batch 4 --seq 1024
    hift plan --model ./my-model-dir                 # any causal LM family: its config.json
"""
from __future__ import annotations

import argparse
import json
import sys

from hift import formats
from hift.plan.predict import GB, STATE_STORES, plans_from_trace
from hift.plan.report import (HEADER, PUBLISHED, breakdown_row, formats_notes, formats_table,
                              published_table)
from hift.plan.trace import LLAMA2, block_input_bytes, meta_model, trace_units
from hift.precision import DTYPES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hift plan", description="Predict the peak device memory of a hift "
                                "run (and of full AdamW and LOMO) from a model config, without weights; and "
                                "hift's host RAM, disk and PCIe traffic per state format and store.")
    p.add_argument("--model", default=None, help=f"one of {sorted(LLAMA2)}, or a local model directory "
                   "(any causal LM family: its config.json is read, no weights); default: the published table")
    p.add_argument("--config", default=None, help="a model's config.json (any causal LM family)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--precision", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false")
    p.add_argument("--recompute", action="store_true",
                   help="predict fit(..., recompute_activations=True)")
    p.add_argument("--state-chunk-mib", type=float, default=None,
                   help="predict fit(..., state_chunk_mib=N): the state streamed in chunks of N MiB")
    p.add_argument("--moment-dtype", default="fp32", choices=formats.MOMENT_DTYPES,
                   help="predict fit(..., moment_dtype=...)")
    p.add_argument("--master-format", default="auto", choices=("auto", "remainder", "fp32"),
                   help="predict fit(..., master_format=...) (auto: the remainder for bf16 weights)")
    p.add_argument("--state-store", default="host", choices=STATE_STORES,
                   help="predict fit(..., state_store=...): host RAM, or files under state_dir")
    p.add_argument("--ranks", type=int, default=1,
                   help="predict data parallel on N ranks (torchrun --nproc_per_node N): one rank's share")
    p.add_argument("--reduce-dtype", default="fp32", choices=("fp32", "bf16"),
                   help="predict fit(..., reduce_dtype=...) under --ranks")
    p.add_argument("--cpu", action="store_true", help="predict a CPU run (offload off: every group's "
                   "state resident, unless it rests on disk; the total above the model is the process's growth)")
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


if __name__ == "__main__":
    sys.exit(main())
