"""The planner against measured peaks on this machine's CPU, and its published-setting table.

    PYTHONPATH=python:. python bench/planner_check.py [--out bench/results/planner.md]

CPU: hift.fit (offload off, so every group's AdamW state is resident: what hift allocates on
a CPU), full AdamW and LOMO (fused SGD in backward) on small LLaMA configs, fp32, each
measured in a fresh process as VmHWM above the resident size once the model is loaded (glibc's
mmap threshold fixed at 64 KiB so that freed tensors leave the resident set); predicted with
hift.plan from the same config on the meta device. Then `hift plan`'s tables: the published
setting, and hift per optimizer-state format and store (device peak, host RAM, disk, PCIe).
"""
import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20

CASES = [  # config, batch, seq, method, group_size
    [dict(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688), 2, 128, "hift", 1],
    [dict(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688), 2, 128, "hift", 2],
    [dict(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688), 2, 128, "adamw", 1],
    [dict(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688), 2, 128, "lomo", 1],
    [dict(vocab_size=12007, hidden_size=320, num_hidden_layers=2, num_attention_heads=5, intermediate_size=864), 1, 200, "hift", 1],
    [dict(vocab_size=12007, hidden_size=320, num_hidden_layers=2, num_attention_heads=5, intermediate_size=864), 1, 200, "adamw", 1],
    [dict(vocab_size=5003, hidden_size=384, num_hidden_layers=3, num_attention_heads=6, intermediate_size=1000), 2, 96, "hift", 1],
    [dict(vocab_size=5003, hidden_size=384, num_hidden_layers=3, num_attention_heads=6, intermediate_size=1000), 2, 96, "hift", 4],
    [dict(vocab_size=5003, hidden_size=384, num_hidden_layers=3, num_attention_heads=6, intermediate_size=1000), 2, 96, "lomo", 1],
    [dict(vocab_size=30522, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376), 2, 256, "hift", 1],
    [dict(vocab_size=30522, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376), 2, 256, "adamw", 1],
]

WORKER = """
import json, sys
from hift.plan.predict import plan_adamw, plan_hift, plan_lomo
from hift.plan.trace import meta_model, trace_units
from bench.planner_measure import measure
cases = json.loads(sys.argv[1])
measure(cases[0][0], 1, 16, steps=2)  # warm-up: code pages and lazy buffers
out = []
for config, batch, seq, method, group_size in cases:
    config = dict(config, max_position_embeddings=max(256, seq))
    m = measure(config, batch, seq, method=method, group_size=group_size, steps=3)
    trace, _ = trace_units(meta_model(config, "fp32"), batch, seq)
    p = {"hift": lambda: plan_hift(trace, "fp32", group_size, offload=False),
         "adamw": lambda: plan_adamw(trace, "fp32"), "lomo": lambda: plan_lomo(trace, "fp32")}[method]()
    out.append(dict(predicted=p.above_model, measured=m["peak_above_model"], breakdown=p.as_dict()))
    print(json.dumps(out[-1]), flush=True)
print(json.dumps(out))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner.md"))
    p.add_argument("--quick", action="store_true", help="the first four cases only")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "python"))
    from hift.plan.report import published_table

    cases = CASES[:4] if args.quick else CASES
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", MALLOC_ARENA_MAX="2",
               PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(cases)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        print(done.stderr[-3000:])
        return 1
    results = json.loads(done.stdout.strip().splitlines()[-1])
    from bench.compare import machine

    lines = ["# hift.plan: predicted vs measured, the published setting, and the state formats", "",
             f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M}", f"- machine: {machine()}",
             f"- command: `PYTHONPATH=python:. python bench/planner_check.py {' '.join(map(shlex.quote, argv or sys.argv[1:]))}`",
             "", "## CPU: predicted vs measured peak above the loaded model (fp32)", "",
             "hift on the CPU runs with offload off (its default there), so every group's AdamW state is "
             "resident and counted. Measured: VmHWM above VmRSS after the model is loaded, 3 steps, fresh "
             "process, glibc mmap threshold 64 KiB.", "",
             "| config (V, H, layers, I) | batch x seq | method | group size | predicted MiB | measured MiB | predicted / measured |",
             "|---|---|---|---|---|---|---|"]
    worst = 0.0
    for (cfg, b, s, method, gs), r in zip(cases, results):
        ratio = r["predicted"] / r["measured"]
        worst = max(worst, abs(ratio - 1))
        lines.append(f"| {cfg['vocab_size']}, {cfg['hidden_size']}, {cfg['num_hidden_layers']}, {cfg['intermediate_size']} "
                     f"| {b} x {s} | {method} | {gs if method == 'hift' else '-'} | {r['predicted'] / MiB:.1f} "
                     f"| {r['measured'] / MiB:.1f} | {ratio:.3f} |")
    lines += ["", f"Largest deviation: {worst:.1%} (goal: within 10%).", "",
              "## The published setting and the state formats (LLaMA-2, batch 1, seq 512): `hift plan`", "",
              published_table()]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
