"""The text of `hift plan`: the breakdown table, hift per state format and store, and the
published setting (LLaMA-2-7B and -13B, batch 1, seq 512) beside the HiFT paper's figures.
"""
from __future__ import annotations

from typing import Optional

from hift.plan.predict import GB, Breakdown, plan_adamw, plan_hift, plan_lomo, state_format
from hift.plan.trace import LLAMA2, UnitTrace, block_input_bytes, meta_model, trace_units

# Published peak memory (GB) at batch 1, seq 512: HiFT paper (Liu et al. 2024), its LLaMA-2 tables.
PUBLISHED = {
    ("llama-2-7b", "hift", "bf16"): 16.87,
    ("llama-2-7b", "hift", "fp32"): 29.73,
    ("llama-2-13b", "hift", "bf16"): 31.0,  # "about 31 GB"
    ("llama-2-7b", "lomo", "bf16"): 21.57,
    ("llama-2-7b", "lomo", "fp32"): 60.06,
}
GOAL_7B_BYTES = 15 * GB  # this project's goal: 7B, bf16, prefetch on, under 15 GB
# Targets for LLaMA-2-7B in bf16 (the issue "Optimizer state at 6 bytes per parameter and
# below, and a disk tier"): host RAM at most this many GB, by moments and store
HOST_RAM_TARGETS_7B = {("fp32", "host"): 68, ("bf16", "host"): 41, ("int8", "host"): 28, ("fp32", "disk"): 5,
                       ("bf16", "disk"): 5, ("int8", "disk"): 5}


def breakdown_row(name: str, b: Breakdown, published: Optional[float] = None, unit: float = GB) -> str:
    pub = f"{published:.2f}" if published is not None else "-"
    return (f"| {name} | {b.weights / unit:.2f} | {b.gradients / unit:.2f} | {b.optimizer_resident / unit:.2f} "
            f"| {b.optimizer_in_flight / unit:.2f} | {b.activations / unit:.2f} | **{b.total / unit:.2f}** "
            f"| {pub} | {b.host_ram / unit:.2f} |")


HEADER = ("| method | weights | grads | optimizer (resident) | optimizer (in flight) | activations "
          "| total | published | host RAM |\n|---|---|---|---|---|---|---|---|---|")

# (master_format, moment_dtype, state_store): the rows of the formats table; the first is the
# layout before the remainder (an fp32 master), for reference
FORMAT_ROWS = [("fp32", "fp32", "host"), ("auto", "fp32", "host"), ("auto", "fp32", "disk"),
               ("auto", "bf16", "host"), ("auto", "bf16", "disk"), ("auto", "int8", "host"),
               ("auto", "int8", "disk")]
FORMAT_HEADER = ("| master | moments | store | state B/param | state on device | device peak | host RAM "
                 "| disk | PCIe per step | PCIe B/param | disk I/O per step |\n"
                 "|---|---|---|---|---|---|---|---|---|---|---|")


def formats_table(trace: UnitTrace, precision: str = "bf16", group_size: int = 1, prefetch: bool = True,
                  state_chunk_mib: Optional[float] = None, recompute_boundary: Optional[int] = None,
                  device: str = "cuda", name: Optional[str] = None, ranks: int = 1, reduce_dtype: str = "fp32") -> str:
    """hift's prediction per state format and store (GB = 1e9 bytes; per step: the largest
    group's, its state copied in and out)."""
    lines, seen, by_row = [FORMAT_HEADER], set(), {}
    for master, moments, store in FORMAT_ROWS:
        fmt = state_format(precision, moments, master)
        if (fmt, store) in seen:  # fp32 weights: "fp32" and "auto" are both no master
            continue
        seen.add((fmt, store))
        # the host store as fit uses it by default: offload on a GPU, resident on a CPU
        h = plan_hift(trace, precision, group_size, prefetch, device != "cpu", state_chunk_mib,
                      recompute_boundary, moment_dtype=moments, master_format=master, state_store=store,
                      device=device, ranks=ranks, reduce_dtype=reduce_dtype)
        by_row[master, moments, store] = h
        lines.append(f"| {fmt.master} | {moments} | {store} | {fmt.bytes_per_element:.4g} | {h.optimizer / GB:.2f} "
                     f"| **{h.total / GB:.2f}** | **{h.host_ram / GB:.2f}** | {h.disk / GB:.2f} "
                     f"| {h.pcie_per_step / GB:.2f} | {h.pcie_per_param:.1f} | {h.disk_io_per_step / GB:.2f} |")
    if name == "llama-2-7b" and precision == "bf16" and device == "cuda" and ranks == 1:
        met = []
        for (moments, store), target in HOST_RAM_TARGETS_7B.items():
            got = by_row["auto", moments, store].host_ram / GB
            met.append(f"{moments} moments, {store} store: {got:.2f} GB (at most {target}: "
                       f"{'met' if got <= target else 'NOT met'})")
        lines += ["", "Host RAM targets (the issue, LLaMA-2-7B bf16, predicted): " + "; ".join(met) + "."]
    return "\n".join(lines)


def formats_notes() -> str:
    return ("master: what fit(master_format=...) gives bf16 weights (auto = remainder: the low 16 bits "
            "of the fp32 master beside the weight; fp32 = a full copy, the layout before the remainder). "
            "state on device: the store's device slots, each the largest chunk (whole groups unless "
            "state_chunk_mib): 1, or 2 when groups are cut into chunks, whichever the store. host RAM: "
            "host store, every group's resting state (pinned in place: no overhead); disk store, its "
            "staging buffers only (2 of the largest chunk, 3 when groups are cut into chunks). disk: the "
            "state's files under state_dir. PCIe / disk I/O per step: the largest group's state copied in "
            "and out (2 x its bytes); per trained parameter, 2 x the bytes per element at rest. On a CPU "
            "(--cpu) host RAM is the whole total and nothing crosses PCIe.")


def published_table(batch: int = 1, seq: int = 512, group_size: int = 1, prefetch: bool = True) -> str:
    lines = [f"Predicted peak device memory (GB = 1e9 bytes), batch {batch}, seq {seq}, "
             f"group size {group_size}, prefetch {'on' if prefetch else 'off'}, offload on; "
             "published: HiFT paper (Liu et al. 2024), LLaMA-2 tables. hift's state in fit's default "
             "format: for bf16 weights the remainder master and fp32 moments (10 B/param at rest; an fp32 "
             "master was 12), for fp32 weights fp32 moments (8 B/param).", ""]
    for name in LLAMA2:
        lines += [f"### {name}", "", HEADER]
        for precision in ("bf16", "fp32"):
            model = meta_model(name, precision)
            trace, _ = trace_units(model, batch, seq)
            boundary = block_input_bytes(model, batch, seq, precision)
            plans = {"hift": plan_hift(trace, precision, group_size, prefetch),
                     "lomo": plan_lomo(trace, precision), "adamw": plan_adamw(trace, precision)}
            plans["hift-chunked"] = plan_hift(trace, precision, group_size, prefetch, state_chunk_mib=256)
            plans["hift-chunked-recompute"] = plan_hift(trace, precision, group_size, prefetch,
                                                        state_chunk_mib=256, recompute_boundary=boundary)
            for method, b in plans.items():
                label = f"{method} {'mixed (bf16)' if precision == 'bf16' else 'fp32'}"
                lines.append(breakdown_row(label, b, PUBLISHED.get((name, method, precision))))
            if precision == "bf16":
                h, lean, bf16_trace = plans["hift"], plans["hift-chunked-recompute"], trace
            del model
        lines.append("")
        lines.append("hift bf16: " + "; ".join(h.notes))
        lines.append("hift-chunked: fit(..., state_chunk_mib=256); hift-chunked-recompute: also "
                     "recompute_activations=True (the frozen blocks above the active group keep only "
                     "their inputs and run again in backward).")
        if name == "llama-2-7b":
            verdict = lambda b: "under" if b.total < GOAL_7B_BYTES else "over"
            lines.append(f"Goal, 7B bf16 with prefetch under 15 GB: {h.total / GB:.2f} GB predicted with the "
                         f"defaults ({verdict(h)}), {lean.total / GB:.2f} GB with state_chunk_mib=256 and "
                         f"recompute_activations=True ({verdict(lean)}). " + _what_it_takes(h))
        lines += ["", f"#### {name} bf16: hift by state format and store", "",
                  formats_table(bf16_trace, "bf16", group_size, prefetch, name=name), ""]
    lines.append(formats_notes())
    return "\n".join(lines)


def _what_it_takes(h: Breakdown) -> str:
    fixed = h.weights + h.gradients + h.activations
    return (f"The bf16 weights alone are {h.weights / GB:.2f} GB; weights + gradients + activations at "
            f"the peak are {fixed / GB:.2f} GB before any optimizer state, and one slot of the largest "
            f"group's state ({h.state_format}) is {h.optimizer_resident / GB:.2f} GB. "
            "state_chunk_mib=256 streams that state through two 256 MiB slots instead, and "
            "recompute_activations=True keeps only the inputs of the frozen blocks above the active "
            f"group instead of their {h.activations / GB:.2f} GB: see the hift-chunked-recompute row.")
