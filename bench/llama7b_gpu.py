"""LLaMA-2-7B config (random weights), batch 1, seq 512, bf16, on a GPU: hift and LOMO, measured
peak memory and step time against the planner's prediction. Each method in its own process.

    python bench/llama7b_gpu.py --out $OUT/llama7b_gpu.md [--steps 36] [--methods hift lomo]

hift: hift.fit, group size 1, top_down, offload and prefetch on (the GPU defaults); --steps 36
covers one cycle of its 35 groups, so the group the planner names as the peak does train.
hift-lean: the same with state_chunk_mib=256 and recompute_activations=True (the 15 GB goal).
hift-bf16m: hift with moment_dtype="bf16" (6 bytes of state per parameter: half the PCIe traffic
of fp32 moments with the remainder master; the step time shows what that buys).
LOMO: fused SGD in backward (a post-accumulate-grad hook applies each gradient and frees it),
the memory behaviour of lomo-optim's Lomo, which the GPU image does not have.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
LEAN_CHUNK_MIB = 256
# hift's variants: options for fit (measured) and the planner (predicted)
VARIANTS = {"hift-lean": dict(recompute=True, state_chunk_mib=LEAN_CHUNK_MIB),
            "hift-bf16m": dict(moment_dtype="bf16")}


def one(model: str, method: str, steps: int, batch: int, seq: int, device: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from bench.planner_measure import measure

    m = measure(model, batch, seq, method=method.split("-")[0], precision="bf16", steps=steps,
                device=device, **VARIANTS.get(method, {}))
    # on a GPU, "total" is max_memory_allocated: the model's bytes plus the peak above them
    m["total"] = m["peak_above_model"] + m["weights"]
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "llama7b_gpu.md"))
    p.add_argument("--steps", type=int, default=36)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--methods", nargs="*", default=["hift", "hift-lean", "hift-bf16m", "lomo"])
    p.add_argument("--model", default="llama-2-7b", help="a planner model name or a config.json (dry runs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=int, default=110, help="seconds per method")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.model, args.one, args.steps, args.batch, args.seq, args.device)))
        return 0

    sys.path.insert(0, str(ROOT / "python"))
    from hift.plan import predict
    from hift.plan.report import HEADER, PUBLISHED, breakdown_row

    plans = predict.plan(args.model, args.batch, args.seq, "bf16", group_size=1, prefetch=True,
                         offload=args.device != "cpu")  # on a CPU dry run hift keeps all state resident
    for variant, options in VARIANTS.items():
        plans[variant] = predict.plan(args.model, args.batch, args.seq, "bf16", group_size=1, prefetch=True,
                                      offload=args.device != "cpu", **options)["hift"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]),
               PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"))
    rows = []
    for method in args.methods:
        try:
            done = subprocess.run([sys.executable, __file__, "--one", method, "--steps", str(args.steps),
                                   "--batch", str(args.batch), "--seq", str(args.seq),
                                   "--model", args.model, "--device", args.device],
                                  env=env, capture_output=True, text=True, timeout=args.timeout)
            measured = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
            error = None if measured else (done.stderr.strip().splitlines() or ["no output"])[-1]
        except subprocess.TimeoutExpired:
            measured, error = None, f"timed out after {args.timeout} s"
        rows.append((method, plans[method], measured, error))

    lines = [f"# {args.model} on {args.device}: measured vs planned ({datetime.datetime.now():%Y-%m-%d %H:%M})", "",
             f"batch {args.batch}, seq {args.seq}, bf16, random weights, {args.steps} steps; "
             "GB = 1e9 bytes; measured = torch.cuda.max_memory_allocated", "",
             "| method | predicted total | measured total | measured / predicted | max reserved | median step (s) | published |",
             "|---|---|---|---|---|---|---|"]
    for method, plan, m, error in rows:
        pub = PUBLISHED.get((args.model, method.split("-")[0], "bf16"))
        if m is None:
            lines.append(f"| {method} | {plan.total / GB:.2f} | failed: {error} | | | | {pub or '-'} |")
            continue
        lines.append(f"| {method} | {plan.total / GB:.2f} | {m['total'] / GB:.2f} | {m['total'] / plan.total:.3f} "
                     f"| {m['reserved'] / GB:.2f} | {m['median_step_seconds']:.3f} | {pub or '-'} |")
    lines += ["", "Planner breakdown (GB):", "", HEADER]
    lines += [breakdown_row(method, plan, PUBLISHED.get((args.model, method.split("-")[0], "bf16")))
              for method, plan, _, _ in rows]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    ok = all(m is not None and abs(m["total"] / plan.total - 1) <= 0.10 for _, plan, m, _ in rows)
    print("7B planner check:", "within 10%" if ok else "NOT within 10% (or a run failed)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
