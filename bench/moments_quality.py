"""bf16 and int8 moments against fp32 moments at equal steps: tables (printed) and a loss plot from
bench.compare result files (every run the same batches, lr and steps; only moment_dtype differs).

    PYTHONPATH=python:. python -m bench.moments_quality --out bench/results/moments_quality \
        --lm bench/results/lm_moments.json bench/results/lm_moments_int8.json \
        --genre bench/results/genre_moments.json bench/results/genre_moments_int8.json

Each file holds some of the methods `hift`, `hift:moment_dtype=bf16`, `hift:moment_dtype=int8`
for one seed; runs of the same method and seed in two files are an error. The table gives, per
task and format, the final loss (mean of the last 3 steps) and the held-out accuracy (genre), as
mean and range over the seeds found, and their difference from fp32 moments on the same seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

FORMATS = {"hift": "fp32", "hift:moment_dtype=bf16": "bf16", "hift:moment_dtype=int8": "int8"}


def load(paths: list[str]) -> dict[str, dict[int, dict]]:
    """format -> seed -> the run's result, from compare's JSON files."""
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in paths:
        data = json.loads(Path(path).read_text())
        words = data.get("command", "").split()  # compare's files name the seed only in the command
        seed = int(words[words.index("--seed") + 1]) if "--seed" in words else 0
        for result in data["results"]:
            fmt = FORMATS.get(result["method"])
            if fmt is None:
                continue
            if seed in runs[fmt]:
                raise SystemExit(f"{path}: a second {fmt} run for seed {seed}")
            runs[fmt][seed] = {**result, "command": data.get("command", ""), "source": path}
    return runs


def final_loss(result: dict) -> float:
    return statistics.fmean(result["losses"][-3:])


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def table(task: str, runs: dict[str, dict[int, dict]]) -> list[str]:
    lines = [f"| {task} | moments | seeds | state (MiB) | final loss | vs fp32 (same seeds) "
             "| held-out accuracy | vs fp32 (points) |", "|---|---|---|---|---|---|---|---|"]
    base = runs.get("fp32", {})
    for fmt in ("fp32", "bf16", "int8"):
        if fmt not in runs:
            continue
        seeds = sorted(runs[fmt])
        results = [runs[fmt][s] for s in seeds]
        losses = [final_loss(r) for r in results]
        shared = [s for s in seeds if s in base]
        rel = [100 * (final_loss(runs[fmt][s]) / final_loss(base[s]) - 1) for s in shared]
        accs = [r["acc_at_steps"] for r in results if r.get("acc_at_steps") is not None]
        acc_diff = [100 * (runs[fmt][s]["acc_at_steps"] - base[s]["acc_at_steps"]) for s in shared
                    if runs[fmt][s].get("acc_at_steps") is not None]
        lines.append(
            f"| {task} | {fmt} | {', '.join(map(str, seeds))} | {results[0]['state_bytes'] / 2**20:.1f} "
            f"| {spread(losses)} | {spread(rel, '{:+.2f}%') if fmt != 'fp32' else '-'} "
            f"| {spread([100 * a for a in accs], '{:.1f}%') if accs else '-'} "
            f"| {spread(acc_diff, '{:+.1f}') if acc_diff and fmt != 'fp32' else '-'} |")
    return lines


def plot(tasks: dict[str, dict[str, dict[int, dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, (task, runs) in zip(axes[0], tasks.items()):
        for fmt, style in (("fp32", "-"), ("bf16", "--"), ("int8", ":")):
            if fmt not in runs:
                continue
            curves = [runs[fmt][s]["losses"] for s in sorted(runs[fmt])]
            steps = range(1, min(map(len, curves)) + 1)
            window = 10  # a moving mean: single batches are noisy
            smooth = [[statistics.fmean(c[max(0, i - window + 1): i + 1]) for i in range(len(steps))] for c in curves]
            mean = [statistics.fmean(col) for col in zip(*smooth)]
            ax.plot(steps, mean, style, label=f"{fmt} moments ({len(curves)} seed{'s' * (len(curves) > 1)})")
            if len(curves) > 1:
                ax.fill_between(steps, [min(col) for col in zip(*smooth)], [max(col) for col in zip(*smooth)], alpha=0.2)
        ax.set_title(f"{task}: training loss (moving mean of {window} steps)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm", nargs="*", default=[])
    parser.add_argument("--genre", nargs="*", default=[])
    parser.add_argument("--out", required=True, help="path without suffix: writes <out>_loss.png")
    args = parser.parse_args(argv)
    tasks = {name: load(paths) for name, paths in (("lm", args.lm), ("genre", args.genre)) if paths}
    lines = []
    for task, runs in tasks.items():
        lines += table(task, runs) + [""]
        lines += [f"- {task} runs: " + "; ".join(sorted({f"`{r['command']}`" for fmt in runs.values() for r in fmt.values()}))]
        lines.append("")
    out = Path(args.out)
    plot(tasks, out.with_name(out.name + "_loss.png"))
    print("\n".join(lines))  # the tables, for bench/results/moments_quality.md
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
