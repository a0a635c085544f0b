"""PNG plots of a bench.compare report: loss curves, and memory bars split into weights,
gradients, optimizer state and activations (the rest of the measured peak).

    PYTHONPATH=python:. python -m bench.plots bench/results/lm.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MiB = 2**20


def plot_report(report: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if "failed" not in r]
    out = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{r['method']} (lr {r['lr']:g})", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{report['task']}: training loss ({report['precision']}, {report['device']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = stem.with_name(stem.name + "_loss.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    out.append(path)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["method"] for r in results]
    weights = [r["weights_bytes"] / MiB for r in results]
    grads = [r["grad_bytes"] / MiB for r in results]
    state = [r["state_bytes"] / MiB for r in results]
    acts = [max(0.0, (r["peak_bytes"] - r["grad_bytes"] - r["state_bytes"]) / MiB) for r in results]
    bottom = [0.0] * len(results)
    for values, label, color in ((weights, "weights (the loaded model, as loaded)", "#bbbbbb"),
                                 (grads, "gradients, most alive at once (MeZO: one z)", "#4c72b0"),
                                 (state, "optimizer state", "#dd8452"),
                                 (acts, "activations and temporaries (rest of the peak)", "#55a868")):
        ax.bar(names, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("MiB")
    ax.set_title(f"{report['task']}: peak memory ({results[0]['memory_where'] if results else ''})", fontsize=9)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = stem.with_name(stem.name + "_memory.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    out.append(path)
    return out


def main(argv=None) -> int:
    for name in (argv or sys.argv[1:]):
        path = Path(name)
        print(plot_report(json.loads(path.read_text()), path.with_suffix("")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
