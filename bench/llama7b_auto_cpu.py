"""LLaMA-2-7B shape in bf16 on this CPU machine with no memory option at all: memory="auto" picks.

    python bench/llama7b_auto_cpu.py [--steps 4] [--seq 64] [--out bench/results/llama7b_auto_cpu.md]

What auto chose (its one line), the run's steps, and the claim check: the planner's predicted
growth of the process against the measured one (VmHWM over the resident size before fit). Where
auto puts the state on disk without a state_dir, its folder must be gone after the run.
"""
import argparse
import contextlib
import datetime
import io
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT)]

from bench.llama7b_disk_cpu import GB, cpu_model, llama7b_bf16  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "llama7b_auto_cpu.md"))
    args = p.parse_args(argv)

    from hift import fit
    from hift.memory_plan import default_state_dir

    model = llama7b_bf16()
    ids = torch.randint(0, 32000, (1, args.seq), generator=torch.Generator().manual_seed(1))
    seconds = []
    last = [time.perf_counter()]

    def on_step(event):
        now = time.perf_counter()
        seconds.append(now - last[0])
        last[0] = now
        print(f"step {event.step} group {event.group}: {seconds[-1]:.1f} s", flush=True)

    state_root = Path(default_state_dir()).parent
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = fit(model, [{"input_ids": ids, "labels": ids}], max_steps=args.steps, lr=1e-5, progress=False,
                     log_every=1, on_step=on_step)
    print(printed.getvalue())
    chosen = [line for line in printed.getvalue().splitlines() if line.startswith("hift memory=auto")]
    m = result.memory
    left = sorted(p.name for p in state_root.glob("run-*")) if state_root.is_dir() else []
    lines = [
        "# LLaMA-2-7B shape, bf16, on the CPU with no memory option: memory=\"auto\"",
        "",
        f"- date: {datetime.date.today()}, machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU",
        f"- command: `python bench/llama7b_auto_cpu.py {' '.join(sys.argv[1:])}`",
        f"- `fit(model, batches, max_steps={args.steps}, lr=1e-5)`: batch 1 x {args.seq}, no other option",
        "",
        "What auto chose (its line, as printed):",
        "",
        *[f"    {line}" for line in printed.getvalue().splitlines() if line.startswith(("hift memory=auto", "the state"))],
        "",
        "| what | value |",
        "|---|---|",
        f"| steps | {result.steps} (losses {', '.join(f'{x:.3f}' for x in result.losses)}) |",
        f"| seconds per step (median) | {sorted(seconds)[len(seconds) // 2]:.1f} |",
        f"| predicted growth of the process above the weights | {m['predicted_host_peak'] / GB:.2f} GB |",
        f"| measured (VmHWM over the resident size before fit) | {m['measured_host_peak'] / GB:.2f} GB |",
        f"| measured / predicted | {m['host_ratio']:.3f} |",
        f"| auto's state folders left under {state_root} | {', '.join(left) or 'none'} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if chosen:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
