"""What memory="auto" picks on common machines, for common models, with no option set.

    python bench/auto_memory.py [--out bench/results/auto_memory.md]

Each row: a model (bf16, batch 1 x 512) on a machine (GPU memory free, host RAM available, both
in GB = 1e9 bytes), what hift.plan.auto chose, and the planner's device peak, host RAM and PCIe
bytes per step for it, beside the defaults of memory="manual". No weights, no GPU: the planner
traces each model on the meta device.
"""
import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from hift.plan import auto  # noqa: E402
from hift.plan.predict import GB  # noqa: E402
from hift.plan.trace import block_input_bytes, meta_model, trace_units  # noqa: E402

MACHINES = [("24 GB GPU, 64 GB RAM", 24, 64), ("24 GB GPU, 32 GB RAM", 24, 32), ("16 GB GPU, 32 GB RAM", 16, 32),
            ("80 GB GPU, 256 GB RAM", 80, 256)]
MODELS = ["llama-2-7b", "llama-3-8b", "qwen2.5-7b", "llama-2-13b"]
MANUAL = dict(offload=True, state_chunk_mib=None, moment_dtype="fp32", recompute_activations=False,
              state_store="host")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "auto_memory.md"))
    args = parser.parse_args(argv)
    rows = ["| model | machine | memory=auto picks | device peak | host RAM | PCIe per step | manual defaults: device, host |",
            "|---|---|---|---|---|---|---|"]
    for name in MODELS:
        model = meta_model(name, "bf16")
        trace, _ = trace_units(model, 1, 512)
        boundary = block_input_bytes(model, 1, 512, "bf16")
        common = dict(precision="bf16", group_size=1, recompute_boundary=boundary, device="cuda")
        manual = auto.predict(trace, MANUAL, **common)
        for machine, device, host in MACHINES:
            budgets = auto.Budgets(host=host * GB, device=device * GB)
            try:
                choice = auto.choose(trace, budgets, {}, **common)
            except auto.MemoryPlanError:
                rows.append(f"| {name} | {machine} | nothing fits | - | - | - | {manual.total / GB:.2f}, {manual.host / GB:.2f} |")
                continue
            o, p = choice.options, choice.plan
            picks = ", ".join([f"{o['moment_dtype']} moments", "offload" if o["offload"] else "resident"]
                              + ([f"chunks of {o['state_chunk_mib']:.0f} MiB"] if o["state_chunk_mib"] else [])
                              + (["recompute"] if o["recompute_activations"] else [])
                              + (["disk store"] if o["state_store"] == "disk" else []))
            rows.append(f"| {name} | {machine} | {picks} | {p.total / GB:.2f} | {p.host_ram / GB:.2f} | "
                        f"{p.pcie_per_step / GB:.2f} | {manual.total / GB:.2f}, {manual.host / GB:.2f} |")
        print(name, "done", flush=True)
    text = "\n".join([
        "# memory=\"auto\" on common machines",
        "",
        f"`python bench/auto_memory.py` ({datetime.date.today()}; the planner, no GPU): bf16 weights, batch 1 x 512,",
        f"group size 1, no option set. A plan fits when its device peak and host RAM are at most "
        f"{1 - auto.MARGIN:.0%} of the machine's (GB = 1e9 bytes). The order auto prefers is in hift/plan/auto.py.",
        "",
        *rows,
        "",
        "Predictions, not measurements: the planner's device peaks were measured within 10% on the CPU",
        "(tests/test_planner.py); no GPU has measured them yet (bench/gpu_check.sh does, when one is lent).",
    ]) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
