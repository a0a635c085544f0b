"""metrics.jsonl, one JSON object per line, and loss.png drawn from it.

Rows of training steps: {"step", "loss", "lr", "group"} (step counts steps done, as the
checkpoints step-N do). Rows of evaluations: {"step", "eval_loss"[, "eval_accuracy"]}; step 0 is
the model before training.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional


class MetricsLog:
    def __init__(self, path: Path, resume_step: Optional[int] = None):
        """A fresh file, or on resume the rows up to the checkpoint's step (the steps after it
        are taken again)."""
        self.path = Path(path)
        kept = [r for r in read(self.path) if r.get("step", 0) <= resume_step] if resume_step is not None else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, rows: list[dict]) -> None:
        if rows:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)


def read(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(metrics_path: Path, png_path: Path) -> Optional[Path]:
    """The training loss by step (and its running mean), the held-out loss and accuracy where
    there are any. None (with a warning) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed, so no loss plot was drawn: pip install matplotlib",
                      stacklevel=2)
        return None
    rows = read(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    accuracy = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train loss")
        window = max(1, len(losses) // 20)
        mean = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                for i in range(len(losses))]
        ax.plot(steps, mean, color="tab:blue", linewidth=2, label=f"train loss, mean of {window}")
    if held:
        ax.plot(*zip(*held), "o-", color="tab:orange", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if accuracy:
        right = ax.twinx()
        right.plot(*zip(*accuracy), "s--", color="tab:green", label="held-out accuracy")
        right.set_ylabel("accuracy")
        right.set_ylim(0, 1)
        more = right.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    if handles:
        ax.legend(handles, names, loc="upper right")
    ax.set_title("hift train")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
