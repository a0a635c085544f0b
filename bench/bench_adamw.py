"""Fused AdamW (hift._C) against torch's best ways to do the same update.

    python bench/bench_adamw.py                  # CPU, 20M parameters in 30 odd-sized tensors
    python bench/bench_adamw.py --device cuda    # the same on a GPU, plus GB/s vs a D2D copy

Variants, timed interleaved and reported as medians over --repeats:
  hift        torch.ops.hift.fused_adamw_: bf16 weights, fp32 master/exp_avg/exp_avg_sq, bf16
              grads; one pass (28 bytes per parameter)
  hift <fmt>  the same op on the compact state formats (hift.formats), bf16 grads: the bf16
              weight's int16 remainder for a master, and/or bf16 moments (stochastic rounding)
              or int8 moments (codes + block scales, counted in the bytes)
  torch+copy  what torch offers for the same job: bf16 grads copied into fp32 grads, fused AdamW
              (torch._fused_adamw_, i.e. AdamW(fused=True); foreach AdamW where there is none)
              on the fp32 master, then the master copied into the bf16 weight
  torch fp32  torch._fused_adamw_ on fp32 weights and fp32 grads: no master, the same 28 bytes
              per parameter, the speed of light for torch
Each variant's bytes moved per parameter (read + write) over its time, against this machine's
device-to-device copy bandwidth (read + write counted), says how close it runs to memory speed.
Targets: hift >= 2.5x torch+copy and >= 0.9x torch fp32; every hift format >= 0.85 of copy
bandwidth. Each hift row is also timed on a state small enough to stay in cache (--cache-numel):
where ns/param streamed is about ns/param in cache, the update is bound by its arithmetic, not by
memory, and fewer bytes cannot make it faster. Writes bench/results/adamw_<device>.md (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

import torch

BYTES_PER_PARAM = 28  # grad 2 + master 4+4 + exp_avg 4+4 + exp_avg_sq 4+4 + weight 2 (bf16)
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01
COPY_TARGET = 0.85  # of copy bandwidth, for every hift format

# The compact state formats timed beside the fp32-master `hift` row: (label, weight dtype,
# master format, exp_avg and exp_avg_sq dtype). Grads are bf16 throughout.
FORMATS = {
    "hift remainder": ("hift fused_adamw_ (bf16 weight + int16 remainder, fp32 moments)",
                       torch.bfloat16, "remainder", torch.float32),
    "hift bf16 moments": ("hift fused_adamw_ (bf16 weight + fp32 master, bf16 moments)",
                          torch.bfloat16, "fp32", torch.bfloat16),
    "hift remainder + bf16 moments": ("hift fused_adamw_ (bf16 weight + int16 remainder, bf16 moments)",
                                      torch.bfloat16, "remainder", torch.bfloat16),
    "hift fp32 weight + bf16 moments": ("hift fused_adamw_ (fp32 weight, its own master; bf16 moments)",
                                        torch.float32, "none", torch.bfloat16),
    "hift remainder + int8 moments": ("hift fused_adamw_ (bf16 weight + int16 remainder, int8 moments)",
                                      torch.bfloat16, "remainder", torch.int8),
    "hift fp32 weight + int8 moments": ("hift fused_adamw_ (fp32 weight, its own master; int8 moments)",
                                        torch.float32, "none", torch.int8),
}


def odd_sizes(total: int, count: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(count, generator=gen) + 0.5
    sizes = [int(w) | 1 for w in (weights / weights.sum() * total)]
    return sizes


def has_torch_fused(device: torch.device) -> bool:
    try:
        p, g = torch.zeros(3, device=device), torch.zeros(3, device=device)
        s = [torch.zeros((), device=device)]
        torch._fused_adamw_([p], [g], [p.clone()], [p.clone()], [], s, lr=LR, beta1=0.9,
                            beta2=0.999, weight_decay=WD, eps=EPS, amsgrad=False, maximize=False)
        return True
    except (RuntimeError, NotImplementedError):
        return False


class Variants:
    def __init__(self, sizes: list[int], device: torch.device):
        from hift import ops  # noqa: F401  (loads hift._C)

        assert hasattr(torch.ops.hift, "fused_adamw_"), "hift._C is not built"
        dev = device
        randn = lambda n, dt=torch.float32: torch.randn(n, device=dev).to(dt)  # noqa: E731
        n_tensors = len(sizes)
        self.device = device
        self.fused_available = has_torch_fused(device)
        # hift: bf16 weights and grads, fp32 state.
        self.masters = [randn(n) for n in sizes]
        self.weights = [m.to(torch.bfloat16) for m in self.masters]
        self.grads_bf16 = [randn(n, torch.bfloat16) for n in sizes]
        self.exp_avgs = [torch.zeros(n, device=dev) for n in sizes]
        self.exp_avg_sqs = [torch.zeros(n, device=dev) for n in sizes]
        self.lr = torch.tensor(LR, device=dev)
        self.step = torch.zeros((), device=dev)
        self.wds = [WD] * n_tensors
        # torch+copy: its own fp32 master and state, fp32 grad buffers to copy the bf16 grads into.
        self.t_masters = [m.clone() for m in self.masters]
        self.t_weights = [w.clone() for w in self.weights]
        self.t_grads = [torch.zeros(n, device=dev) for n in sizes]
        self.t_exp_avgs = [torch.zeros(n, device=dev) for n in sizes]
        self.t_exp_avg_sqs = [torch.zeros(n, device=dev) for n in sizes]
        self.t_steps = [torch.zeros((), device=dev) for _ in sizes]
        if not self.fused_available:
            params = [torch.nn.Parameter(m) for m in self.t_masters]
            for p, g in zip(params, self.t_grads):
                p.grad = g
            self.t_optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS,
                                                 weight_decay=WD, foreach=True)
        # torch fp32: fp32 weights and grads, no master.
        self.f_params = [m.clone() for m in self.masters]
        self.f_grads = [g.float() for g in self.grads_bf16]
        self.f_exp_avgs = [torch.zeros(n, device=dev) for n in sizes]
        self.f_exp_avg_sqs = [torch.zeros(n, device=dev) for n in sizes]
        self.f_steps = [torch.zeros((), device=dev) for _ in sizes]

    def formats(self, sizes: list[int]) -> dict[str, "FormatState"]:
        """One state per compact format, on the same master values and grads."""
        return {name: FormatState(self, sizes, *spec[1:]) for name, spec in FORMATS.items()}

    def hift(self):
        self.step.add_(1.0)
        torch.ops.hift.fused_adamw_(self.weights, self.masters, self.exp_avgs, self.exp_avg_sqs,
                                    self.grads_bf16, self.wds, self.lr, self.step, BETAS[0],
                                    BETAS[1], EPS, None, None, [], [])

    def torch_copy(self):
        torch._foreach_copy_(self.t_grads, self.grads_bf16)
        if self.fused_available:
            torch._foreach_add_(self.t_steps, 1.0)
            torch._fused_adamw_(self.t_masters, self.t_grads, self.t_exp_avgs, self.t_exp_avg_sqs,
                                [], self.t_steps, lr=LR, beta1=BETAS[0], beta2=BETAS[1],
                                weight_decay=WD, eps=EPS, amsgrad=False, maximize=False)
        else:
            self.t_optimizer.step()
        torch._foreach_copy_(self.t_weights, self.t_masters)

    def torch_fp32(self):
        torch._foreach_add_(self.f_steps, 1.0)
        torch._fused_adamw_(self.f_params, self.f_grads, self.f_exp_avgs, self.f_exp_avg_sqs, [],
                            self.f_steps, lr=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD,
                            eps=EPS, amsgrad=False, maximize=False)


class FormatState:
    """fused_adamw_ on one compact state format (hift.formats)."""

    def __init__(self, v: Variants, sizes: list[int], weight_dtype, master: str, moment_dtype):
        from hift import formats

        if master == "remainder":
            self.params, self.masters = map(list, zip(*(formats.split_master(m) for m in v.masters)))
        elif master == "fp32":
            self.params, self.masters = [m.to(weight_dtype) for m in v.masters], [m.clone() for m in v.masters]
        else:
            self.params, self.masters = [m.clone() for m in v.masters], []
        int8 = moment_dtype == torch.int8
        self.exp_avgs = [torch.zeros(n, device=v.device, dtype=moment_dtype) for n in sizes]
        self.exp_avg_sqs = [torch.zeros(n, device=v.device, dtype=torch.uint8 if int8 else moment_dtype)
                            for n in sizes]
        # int8 moments: the blocks' fp32 scales (one for exp_avg, two for exp_avg_sq per 256)
        self.scales = ([[torch.zeros(formats.int8_blocks(n) * k, device=v.device) for n in sizes]
                        for k in formats.INT8_SCALES.values()] if int8 else [[], []])
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.seed = formats.group_seed(0, 0)
        self.v = v
        # Read and written once each: moments and masters; the weight is read when it holds the
        # master (its own, or the remainder's high half) and written unless it is the master
        # itself; the grad is read.
        weight = self.params[0].element_size()
        moments = 2 * formats.moment_bytes_per_element("int8") if int8 else 2 * self.exp_avgs[0].element_size() * 2
        self.bytes_per_param = (moments + v.grads_bf16[0].element_size()
                                + (2 * self.masters[0].element_size() if self.masters else 0)
                                + weight * (2 if master in ("remainder", "none") else 1))

    def __call__(self):
        v = self.v
        torch.ops.hift.fused_adamw_(self.params, self.masters, self.exp_avgs, self.exp_avg_sqs,
                                    v.grads_bf16, v.wds, v.lr, v.step, BETAS[0], BETAS[1], EPS,
                                    None, None, *self.scales, self.seed, self.offsets)


def timer(device: torch.device, inner: int):
    """Seconds per call of fn, averaged over `inner` back-to-back calls."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
    else:
        def run(fn):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - start) / inner
    return run


CACHE_TENSORS, CACHE_CALLS = 3, 200


def cache_ns_per_param(numel: int, device: torch.device, repeats: int) -> dict[str, float]:
    """ns per parameter of each hift row, on one thread, on a state that stays in that core's L2
    between calls: the update's arithmetic alone, memory bandwidth (and threading) left out."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _cache_ns_per_param(numel, device, repeats)
    finally:
        torch.set_num_threads(threads)


def _cache_ns_per_param(numel: int, device: torch.device, repeats: int) -> dict[str, float]:
    sizes = odd_sizes(numel, CACHE_TENSORS)
    v = Variants(sizes, device)
    variants = {"hift": v.hift, **v.formats(sizes)}
    run = timer(device, CACHE_CALLS)
    for fn in variants.values():
        run(fn)
    times = {name: statistics.median(run(fn) for _ in range(repeats)) for name, fn in variants.items()}
    return {name: t / sum(sizes) * 1e9 for name, t in times.items()}


def copy_bandwidth(device: torch.device, numel: int, run) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(numel, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    for _ in range(3):
        fn()
    return 2 * numel / statistics.median(run(fn) for _ in range(10))


def machine(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"{cpu}, nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}, "
            f"ATen CPU capability={torch.backends.cpu.get_cpu_capability()}")
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text + f"; torch {torch.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--numel", type=int, default=20_000_000)
    parser.add_argument("--tensors", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--inner", type=int, default=0, help="calls per timing (default: 1 CPU, 20 CUDA)")
    parser.add_argument("--cache-numel", type=int, default=65_536,
                        help="parameters of the in-cache timing (its state fits in L2)")
    parser.add_argument("--out", default=None, help="markdown file (default bench/results/adamw_<device>.md)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    inner = args.inner or (20 if device.type == "cuda" else 1)
    sizes = odd_sizes(args.numel, args.tensors)
    numel = sum(sizes)
    v = Variants(sizes, device)
    run = timer(device, inner)
    compact = v.formats(sizes)
    variants = {"hift": v.hift, **compact, "torch+copy": v.torch_copy, "torch fp32": v.torch_fp32}
    # grad 2+4 and weight 4+2 for the copies around torch's fused fp32 update (28)
    bytes_per_param = {"hift": BYTES_PER_PARAM, "torch+copy": BYTES_PER_PARAM + 12,
                       "torch fp32": BYTES_PER_PARAM,
                       **{name: state.bytes_per_param for name, state in compact.items()}}
    for fn in variants.values():  # warm-up (first touch of memory, lazy init)
        fn()
        fn()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(run(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    # (CPU only: a GPU's in-cache timing of so small a state would be its launch latency)
    in_cache = cache_ns_per_param(args.cache_numel, device, args.repeats) if device.type == "cpu" else {}

    torch_copy_label = ("torch+copy (bf16 grad -> fp32, `_fused_adamw_` on fp32 master, copy to bf16)"
                        if v.fused_available else
                        "torch+copy (bf16 grad -> fp32, foreach AdamW on fp32 master, copy to bf16)")
    labels = {"hift": "hift fused_adamw_ (bf16 weight + fp32 master, fp32 moments)",
              **{name: spec[0] for name, spec in FORMATS.items()},
              "torch+copy": torch_copy_label,
              "torch fp32": "torch `_fused_adamw_` fp32 (no master, same 28 B/param)"}
    if not v.fused_available:
        labels["torch fp32"] = "torch fp32: no fused AdamW on this device (foreach timing not run)"
    lines = [
        f"# Fused AdamW benchmark ({device.type})", "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%a %b %d %H:%M:%S %Z %Y')}",
        f"- machine: {machine(device)}",
        f"- command: `{' '.join(shlex.quote(a) for a in [sys.executable.rsplit('/', 1)[-1], *sys.argv])}`",
        f"- {numel:,} parameters in {len(sizes)} tensors of odd sizes ({min(sizes):,} .. {max(sizes):,}); "
        f"median of {args.repeats} interleaved repeats, {inner} call(s) each", "",
    ]
    bandwidth = copy_bandwidth(device, BYTES_PER_PARAM * numel // 2, run)
    lines += ["| variant | B/param | time (ms) | GB/s | of copy bandwidth | time / hift time "
              "| thread-ns/param streamed | ns/param in cache, 1 thread |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    achieved = {name: bytes_per_param[name] * numel / median[name] for name in variants}
    for name in variants:
        cached = f"{in_cache[name]:.2f}" if name in in_cache else "-"
        lines.append(f"| {labels[name]} | {bytes_per_param[name]:.4g} | {median[name] * 1e3:.3f} | "
                     f"{achieved[name] / 1e9:.1f} | {achieved[name] / bandwidth:.2f} | "
                     f"{median[name] / median['hift']:.2f}x | {median[name] * threads / numel * 1e9:.2f} | {cached} |")
    lines.append("")
    if in_cache:
        lines.append(f"- in cache: {args.cache_numel:,} parameters in {CACHE_TENSORS} tensors, {CACHE_CALLS} calls "
                     f"per timing, 1 thread; streamed: time x {threads} thread(s) / parameters. A row whose "
                     "two are about equal is bound by its arithmetic, not by memory")
    lines.append(f"- {device.type} copy (`dst.copy_(src)`, {BYTES_PER_PARAM * numel // 2 / 1e6:.0f} MB): "
                 f"{bandwidth / 1e9:.1f} GB/s, read + write counted; grads are bf16 in every row")
    hift_rows = ["hift", *compact]
    slowest = min(hift_rows, key=lambda name: achieved[name] / bandwidth)
    worst = achieved[slowest] / bandwidth
    lines.append(f"- every hift format at >= {COPY_TARGET} of copy bandwidth: "
                 f"{'met' if worst >= COPY_TARGET else 'NOT met'} (lowest {worst:.2f}, {slowest})")
    speedup_copy = median["torch+copy"] / median["hift"]
    speedup_fp32 = median["torch fp32"] / median["hift"]
    lines.append(f"- hift vs torch+copy: **{speedup_copy:.2f}x** (target >= 2.5x: "
                 f"{'met' if speedup_copy >= 2.5 else 'NOT met'})")
    lines.append(f"- hift vs torch fp32 fused: **{speedup_fp32:.2f}x** (target >= 0.9x: "
                 f"{'met' if speedup_fp32 >= 0.9 else 'NOT met'})")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"adamw_{device.type}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
