"""hift_kernels on a GPU: the squared grad norm over one large group of grads,
against what torch offers for the same job, and against the device's copy bandwidth.

    python bench/bench_triton_kernels.py [--numel 200e6] [--tensors 60] [--runs 15]
                                         [--out bench/results/triton_kernels_gpu.md]

For each grad dtype (bf16, fp16) the group is --tensors grads of odd random sizes adding up
to about --numel elements. Each round times every contender once, in an order that rotates
from round to round (so clocks and caches favour none), with CUDA events; the table gives
the median over rounds. Bandwidth counts the bytes a contender must read and write at least;
"of copy" compares it with a plain device copy of a buffer that moves as many bytes.
On a machine without CUDA it says so and exits 0.
"""
import argparse
import datetime
import math
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def odd_sizes(total: int, count: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(count, generator=gen, dtype=torch.float64) + 0.5
    sizes = [int(w) | 1 for w in (weights / weights.sum() * total)]  # odd: never a whole block
    return sizes


def time_rounds(contenders: dict, runs: int) -> dict[str, float]:
    """Median milliseconds per contender over `runs` rounds, the order rotating each round."""
    names = list(contenders)
    times = {name: [] for name in names}
    for fn in contenders.values():  # warm-up: compile, build tables, fill the allocator
        fn()
        fn()
    torch.cuda.synchronize()
    for r in range(runs):
        order = names[r % len(names):] + names[:r % len(names)]
        events = []
        for name in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            contenders[name]()
            end.record()
            events.append((name, start, end))
        torch.cuda.synchronize()
        for name, start, end in events:
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)


def bench_dtype(dtype: torch.dtype, numel: int, count: int, runs: int, device="cuda"):
    """Rows (dtype, what, ms, GB/s, fraction of copy bandwidth) and the group's size."""
    import hift_kernels
    from hift_kernels.norm import reference_grad_norm_sq

    sizes = odd_sizes(numel, count, seed=0)
    n = sum(sizes)
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(s, device=device, generator=gen).to(dtype) for s in sizes]
    fp32_grads = [g.float() for g in grads]
    elsize = grads[0].element_size()

    # sanity before timing: the kernel agrees with its twin on these very tensors
    ours, theirs = hift_kernels.grad_norm_sq(grads).item(), reference_grad_norm_sq(grads).item()
    assert math.isclose(ours, theirs, rel_tol=1e-5), (ours, theirs)

    copy_src = torch.empty(n * elsize, dtype=torch.uint8, device=device)
    copy_dst = torch.empty_like(copy_src)

    contenders = {
        f"hift grad_norm_sq ({str(dtype)[6:]})": (lambda: hift_kernels.grad_norm_sq(grads),
                                                  n * elsize),
        f"torch get_total_norm ({str(dtype)[6:]})": (lambda: total_norm(grads), n * elsize),
        "hift grad_norm_sq (fp32)": (lambda: hift_kernels.grad_norm_sq(fp32_grads), n * 4),
        "torch get_total_norm (fp32, same tensors)": (lambda: total_norm(fp32_grads), n * 4),
        "copy (bandwidth yardstick)": (lambda: copy_dst.copy_(copy_src), 2 * n * elsize),
    }
    ms = time_rounds({name: fn for name, (fn, _) in contenders.items()}, runs)
    copy_gbs = contenders["copy (bandwidth yardstick)"][1] / ms["copy (bandwidth yardstick)"] / 1e6
    rows = []
    for name, (_, nbytes) in contenders.items():
        gbs = nbytes / ms[name] / 1e6
        rows.append((str(dtype)[6:], name, ms[name], gbs, gbs / copy_gbs))
    return rows, n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=float, default=200e6, help="elements in the group")
    parser.add_argument("--tensors", type=int, default=60, help="grads in the group")
    parser.add_argument("--runs", type=int, default=15, help="timed rounds (median reported)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/triton_kernels_gpu.md"))
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_triton_kernels needs a CUDA device; none here, nothing measured.")
        return 0
    os.environ.setdefault("TRITON_INTERPRET", "0")
    import hift_kernels

    if not hift_kernels.runs_on("cuda"):
        print("bench_triton_kernels: triton cannot run on this CUDA device "
              f"(HAS_TRITON={hift_kernels.HAS_TRITON}, INTERPRETER={hift_kernels.INTERPRETER}).")
        return 0

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
    import triton

    lines = [
        "# hift_kernels on the GPU: grad norm",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"triton {triton.__version__}",
        f"- group: {args.tensors} grads of odd sizes, about {args.numel:.3g} elements; "
        f"median of {args.runs} interleaved rounds (CUDA events, host overhead included)",
        "- GB/s counts the bytes each must move at least (read + write); `of copy` divides it "
        "by a device copy of the same number of bytes",
        "",
        "| grads | what | ms | GB/s | of copy |",
        "|---|---|---:|---:|---:|",
    ]
    for dtype in (torch.bfloat16, torch.float16):
        rows, n = bench_dtype(dtype, int(args.numel), args.tensors, args.runs)
        for dt, name, ms, gbs, frac in rows:
            lines.append(f"| {dt} ({n / 1e6:.1f}M) | {name} | {ms:.3f} | {gbs:.0f} | "
                         f"{frac:.0%} |")
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
