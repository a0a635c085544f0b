"""What the cut-invariant gradient norm costs per step on the CPU, against the norm it replaced.

    python bench/bench_grad_norm_cpu.py [--model-dim 4096] [--ffn-dim 11008] [--runs 5]
                                        [--out bench/results/grad_norm_cpu.md]

The group is one LLaMA-2-7B block's gradients (bf16, as a bf16 model has them; 202M elements).
"dot per tensor" is the norm before hift_kernels/norm.py's fixed tree (torch.dot of each fp32
gradient, summed): fast, but its bits depend on how the group is cut and on the machine.
"fixed tree" is ops.grad_norm_sq on the CPU (the torch twin; GPUs run the Triton kernel, which
gpu_check times). Each round times both, in alternating order; the table gives medians.
Data parallel also hands each step's block sums to the all-reduce: 4 bytes per 256 elements,
1/256 of an fp32 reduce-scatter's bytes.
"""
import argparse
import datetime
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT))

from hift import ops  # noqa: E402


def dot_per_tensor(grads):
    total = torch.zeros((), dtype=torch.float32)
    for g in grads:
        g = g.float().reshape(-1)
        total += torch.dot(g, g)
    return total


def block_grads(dim: int, ffn: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(dim, dim)] * 4 + [(ffn, dim)] * 3 + [(dim,)] * 2
    return [(torch.randn(s, generator=gen) * 1e-3).to(dtype) for s in shapes]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dim", type=int, default=4096)
    parser.add_argument("--ffn-dim", type=int, default=11008)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "grad_norm_cpu.md"))
    args = parser.parse_args(argv)

    grads = block_grads(args.model_dim, args.ffn_dim, torch.bfloat16)
    numel = sum(g.numel() for g in grads)
    contenders = {"dot per tensor (before)": lambda: dot_per_tensor(grads),
                  "fixed tree (ops.grad_norm_sq)": lambda: ops.grad_norm_sq(grads)}
    times = {name: [] for name in contenders}
    for r in range(args.runs + 1):  # round 0 warms up
        order = list(contenders) if r % 2 else list(reversed(contenders))
        for name in order:
            t0 = time.perf_counter()
            contenders[name]()
            if r:
                times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    before = medians["dot per tensor (before)"]
    exact = sum(float(g.double().pow(2).sum()) for g in grads)
    errors = {name: abs(float(fn()) - exact) / exact for name, fn in contenders.items()}

    lines = [f"# Gradient norm on the CPU: fixed tree against dot per tensor",
             "",
             f"`{' '.join(shlex.quote(a) for a in ['python', 'bench/bench_grad_norm_cpu.py', *(argv or sys.argv[1:])])}`"
             f" ({datetime.date.today()}, {torch.get_num_threads()} threads, "
             f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__})",
             "",
             f"One LLaMA-2-7B block's gradients in bf16: {numel / 1e6:.0f}M elements, {args.runs} rounds, medians.",
             "",
             "| norm | ms per step | GB/s of bf16 read | x before | relative error (float64 sum) |",
             "|---|---|---|---|---|"]
    for name, t in medians.items():
        lines.append(f"| {name} | {t * 1e3:.0f} | {numel * 2 / t / 1e9:.2f} | {t / before:.2f} | {errors[name]:.1e} |")
    lines += ["",
              "The fixed tree's bits are the same for every cut; a tree's rounding error also grows with the",
              "logarithm of the count, a long running sum's with the count.",
              f"Data parallel adds the block sums to the step's all-reduce: {numel // ops.NORM_BLOCK * 4 / 1e6:.2f} MB "
              f"for this group, against {numel * 4 / 1e6:.0f} MB of fp32 reduce-scatter."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
