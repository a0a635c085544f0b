"""Tables and plots of the quality protocol, from the cells in its run directory.

bench/results/quality_<task>[_ablation].md: the final table (test metric at equal steps and at
equal CPU time, mean and spread over the seeds), the learning-rate grid with each lr's
validation metric and the pick, what has not finished and how long it takes; the paragraphs
under each table are written from the numbers in it. _steps.png and _time.png: the test metric
against steps and against CPU seconds of training, the seeds' range shaded.
"""
from __future__ import annotations

import datetime
import os
import statistics
from pathlib import Path

from bench.quality import HIGHER_IS_BETTER, METRIC, Protocol, label, plan


def _fmt(metric: str, v) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if metric in HIGHER_IS_BETTER else f"{v:,.1f}"


def _unit(metric: str) -> str:
    return f"{metric.replace('_', ' ')} (%)" if metric in HIGHER_IS_BETTER else metric


def _at_budget(record: dict, budget: float) -> dict | None:
    """The last evaluation whose training CPU time is within the budget."""
    within = [e for e in record["evals"] if e["cpu_seconds"] <= budget * (1 + 1e-9)]
    return within[-1] if within else None


def _test(e: dict | None, metric: str):
    return None if e is None else e["test"][metric]


def _mean_sd(values: list) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def gather(protocol: Protocol, specs: list[str]) -> list[dict]:
    """Per method: its grid and pick (validation only), and its final cells (test too)."""
    rows = []
    for spec in specs:
        sel = protocol.selection(spec)
        finals = []
        if sel["lr"] is not None:
            finals = [c for c in (protocol.cell(spec, sel["lr"], s) for s in protocol.seeds) if c is not None]
        rows.append({"spec": spec, "selection": sel, "finals": finals,
                     "cells": [c for c in (protocol.cell(spec, lr, protocol.seeds[0]) for lr in protocol.grid(spec))
                               if c is not None] + finals[1:]})
    return rows


def equal_time_budget(rows: list[dict], steps: int) -> float | None:
    """The CPU seconds the fastest method (mean over its seeds) takes for the full step count."""
    times = [statistics.fmean(c["cpu_seconds"] for c in r["finals"]) for r in rows
             if r["finals"] and all(c["steps_done"] == steps for c in r["finals"])]
    return min(times) if times else None


def table(protocol: Protocol, rows: list[dict]) -> tuple[list[str], dict]:
    metric = METRIC[protocol.task_name]
    n_seeds = len(protocol.seeds)
    budget = equal_time_budget(rows, protocol.steps)
    facts = {"budget": budget, "complete": [], "partial": [], "missing": []}
    lines = [f"| method | lr (picked) | seeds | test {_unit(metric)} @ {protocol.steps} steps, mean ± sd | "
             f"min - max | test {_unit(metric)} @ {budget or 0:.0f} CPU s (steps reached) | CPU s/step | "
             f"val @ {protocol.steps} steps (seed 0) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        finals, sel = r["finals"], r["selection"]
        if not finals:
            facts["missing"].append(r["spec"])
            done = sum(t.get("missing") is None for t in sel["trials"])
            lines.append(f"| {label(r['spec'])} | - | 0 | not run yet ({done}/{len(sel['trials'])} grid cells) "
                         "| | | | |")
            continue
        (facts["complete"] if len(finals) == n_seeds else facts["partial"]).append(r["spec"])
        ends = [_test(c["evals"][-1], metric) if not c["diverged"] else None for c in finals]
        mean, sd = _mean_sd(ends)
        r["final_mean"], r["final_sd"] = mean, sd
        valid = [v for v in ends if v is not None]
        at_t = [_at_budget(c, budget) for c in finals] if budget else []
        t_mean, t_sd = _mean_sd([_test(e, metric) for e in at_t])
        t_steps = sorted({e["step"] for e in at_t if e})
        r["time_mean"] = t_mean
        per_step = statistics.fmean(c["cpu_seconds"] / max(1, c["steps_done"]) for c in finals)
        edge = " (grid edge)" if sel["lr"] in (protocol.grid(r["spec"])[0], protocol.grid(r["spec"])[-1]) else ""
        val = next((t["val"] for t in sel["trials"] if t["lr"] == sel["lr"]), None)
        lines.append(
            f"| {label(r['spec'])} | {sel['lr']:g}{edge} | {len(finals)}/{n_seeds} "
            f"| {_fmt(metric, mean)}{' ± ' + _fmt(metric, sd) if sd is not None else ''} "
            f"| {_fmt(metric, min(valid)) if valid else '-'} - {_fmt(metric, max(valid)) if valid else '-'} "
            f"| {_fmt(metric, t_mean)}{' ± ' + _fmt(metric, t_sd) if t_sd is not None else ''}"
            f" ({'/'.join(map(str, t_steps)) or '-'}) "
            f"| {per_step:.2f} | {_fmt(metric, val)} |")
    return lines, facts


def grid_table(protocol: Protocol, rows: list[dict]) -> list[str]:
    metric = METRIC[protocol.task_name]
    lines = [f"| method | published lr | grid: lr -> validation {_unit(metric)} at {protocol.steps} steps "
             "(seed 0; **picked**) |", "|---|---|---|"]
    from bench.quality import published_lr

    for r in rows:
        sel = r["selection"]
        cells = []
        for t in sel["trials"]:
            if t.get("missing"):
                text = f"{t['lr']:g}: not run"
            elif t["diverged"]:
                text = f"{t['lr']:g}: diverged"
            else:
                text = f"{t['lr']:g}: {_fmt(metric, t['val'])}"
            cells.append(f"**{text}**" if t["lr"] == sel["lr"] else text)
        lines.append(f"| {label(r['spec'])} | {published_lr(r['spec']):g} | {', '.join(cells)} |")
    return lines


def timing(protocol: Protocol, specs: list[str], rows: list[dict]) -> list[str]:
    """Measured seconds per cell by method, and the time the unfinished cells need. CPU seconds
    (training, evaluation and loading the model) estimate what an idle core takes; wall seconds
    also carry the other work on the machine."""
    done = [c for r in rows for c in r["cells"]]
    if not done:
        return ["No cell has finished yet."]
    overall = statistics.fmean(c["cell_cpu_seconds"] for c in done)
    lines = ["| method | cells done / planned | CPU s per cell | of it training | wall s per cell | "
             "left (est. CPU s) |", "|---|---|---|---|---|---|"]
    cpu_done = wall_done = left_total = 0.0
    for r in rows:
        ok = r["cells"]
        planned = len(plan(protocol, [r["spec"]]))
        per = statistics.fmean(c["cell_cpu_seconds"] for c in ok) if ok else overall
        left = max(0, planned - len(ok)) * per
        cpu_done += sum(c["cell_cpu_seconds"] for c in ok)
        wall_done += sum(c["cell_wall_seconds"] for c in ok)
        left_total += left
        if ok:
            lines.append(f"| {label(r['spec'])} | {len(ok)}/{planned} | {per:.0f} | "
                         f"{statistics.fmean(c['cpu_seconds'] for c in ok):.0f} | "
                         f"{statistics.fmean(c['cell_wall_seconds'] for c in ok):.0f} | {left:.0f} |")
        else:
            lines.append(f"| {label(r['spec'])} | 0/{planned} | {per:.0f} (est.: mean of all cells) | - | - | "
                         f"{left:.0f} |")
    lines += ["", f"Done: {cpu_done / 3600:.2f} CPU h ({wall_done / 3600:.2f} h wall at the load above). Left: about "
              f"{left_total / 3600:.2f} CPU h (each unfinished cell at its method's mean, or the mean of all cells; "
              "a grid whose pick lands on an edge adds a cell). The whole table: about "
              f"{(cpu_done + left_total) / 3600:.2f} h of one idle core; one cell runs at a time, on one thread."]
    return lines


def _describe(protocol: Protocol, rows: list[dict], facts: dict) -> list[str]:
    metric = METRIC[protocol.task_name]
    better = max if metric in HIGHER_IS_BETTER else min
    ranked = [r for r in rows if r.get("final_mean") is not None]
    out = []
    if ranked:
        best = better(ranked, key=lambda r: r["final_mean"])
        close = [r for r in ranked if r is not best and r.get("final_sd") is not None and best.get("final_sd") is not None
                 and abs(r["final_mean"] - best["final_mean"]) <= r["final_sd"] + best["final_sd"]]
        out.append(f"At equal steps the best mean test {metric} is {label(best['spec'])}'s "
                   f"({_fmt(metric, best['final_mean'])})"
                   + (f"; the mean ± sd ranges of {', '.join(label(r['spec']) for r in close)} overlap its"
                      if close else "")
                   + ".")
        timed = [r for r in ranked if r.get("time_mean") is not None]
        if timed and facts["budget"]:
            tb = better(timed, key=lambda r: r["time_mean"])
            out.append(f"At equal CPU time ({facts['budget']:.0f} s of training: what the fastest method needs "
                       f"for {protocol.steps} steps) the best is {label(tb['spec'])}'s ({_fmt(metric, tb['time_mean'])}).")
    gains = []
    for r in ranked:
        finals = [c for c in r["finals"] if not c["diverged"]]
        quarter = [next((e for e in c["evals"] if e["step"] >= 0.75 * protocol.steps), None) for c in finals]
        if finals and all(quarter):
            before = statistics.fmean(_test(e, metric) for e in quarter)
            change = (r["final_mean"] - before) * (100 if metric in HIGHER_IS_BETTER else 1)
            gains.append(f"{label(r['spec'])} {change:+.1f}")
    if gains:
        out.append(f"Change of the mean test {metric} over the last quarter of the run (steps "
                   f"{quarter[0]['step']}-{protocol.steps}; near zero: the curve has flattened): {', '.join(gains)}.")
    if facts["partial"]:
        out.append("Fewer seeds than planned (their spread is not yet measured): "
                   + ", ".join(label(s) for s in facts["partial"]) + ".")
    if facts["missing"]:
        out.append("Not finished: " + ", ".join(label(s) for s in facts["missing"]) + " (no final row yet).")
    return [" ".join(out)] if out else []


CAVEATS = {
    "genre": ("What it does not show: other tasks, models or batch sizes; runs longer than {steps} steps (about "
              "{epochs:.1f} passes over the training passages); learning-rate schedules other than the one named per "
              "row (the baselines at a constant lr); a finer grid than its 4-5 points; differences smaller than the "
              "seeds' spread, which on a 120-passage test set is a few points (one passage is 0.8 points). "
              "Memory and speed on a GPU are not measured here (see bench.compare's tables)."),
    "lm": ("What it does not show: a pretrained model (this one starts from random weights, so the task is "
           "closer to pre-training than to fine-tuning); runs longer than {steps} steps; other model sizes."),
    "tiny": "",
}


def _plots(protocol: Protocol, rows: list[dict], stem: Path, budget: float | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = METRIC[protocol.task_name]
    scale = 100 if metric in HIGHER_IS_BETTER else 1
    out = []
    for axis, xlabel in (("steps", "step"), ("time", "CPU seconds of training (evaluation not counted)")):
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for r in rows:
            finals = [c for c in r["finals"] if not c["diverged"]]
            if not finals:
                continue
            n = min(len(c["evals"]) for c in finals)
            ys = [[c["evals"][i]["test"][metric] * scale for c in finals] for i in range(n)]
            if axis == "steps":
                xs = [finals[0]["evals"][i]["step"] for i in range(n)]
            else:
                xs = [statistics.fmean(c["evals"][i]["cpu_seconds"] for c in finals) for i in range(n)]
            mean = [statistics.fmean(y) for y in ys]
            name = f"{label(r['spec'])} (lr {r['selection']['lr']:g}, {len(finals)} seed{'s' if len(finals) > 1 else ''})"
            line, = ax.plot(xs, mean, lw=1.4, label=name, ls="-" if len(finals) > 1 else "--")
            if len(finals) > 1:
                ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15)
        if axis == "time" and budget:
            ax.axvline(budget, color="grey", lw=0.8, ls=":", label=f"equal-time budget ({budget:.0f} CPU s)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {_unit(metric)}")
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_title(f"{protocol.task_name}: test {metric} at the picked lr (mean of seeds; shaded: min-max)",
                     fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def write(protocol: Protocol, specs: list[str], out: Path, command: str, ablation: bool = False) -> list[Path]:
    from bench.compare import machine

    rows = gather(protocol, specs)
    stem = Path(out) / (f"quality_{protocol.task_name}" + ("_ablation" if ablation else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    done = [c for r in rows for c in r["cells"]]
    loads = sorted(c["load_average"] for c in done)
    task_describe = protocol.task().describe if done else {}
    main_table, facts = table(protocol, rows)
    epochs = protocol.steps * protocol.task_args.get("batch", 8) / max(1, 3 * protocol.task_args.get("train_per_class", 400))
    first = min((c["finished"] for c in done), default="-")
    last = max((c["finished"] for c in done), default="-")
    lines = [
        f"# Quality protocol: {protocol.task_name}{' (hift ablation: orders x group sizes)' if ablation else ''}",
        "",
        f"- written: {datetime.datetime.now().isoformat(timespec='minutes')}; cells finished between {first} and {last}",
        f"- machine: {machine()}; {done[0]['threads'] if done else 1} torch thread, one cell at a time, `nice -n 19`",
        f"- load average (1 min) when each cell ended: min {loads[0]:.1f}, median {statistics.median(loads):.1f}, "
        f"max {loads[-1]:.1f}; now {os.getloadavg()[0]:.1f} (2 cores shared with other work: compare CPU seconds, "
        "not wall time)" if loads else "- no cell finished yet",
        f"- command: `{command}` (cells in `{protocol.run_dir}`; the same command continues an unfinished run)",
        f"- model: {task_describe.get('model', '?')}",
        f"- data: {task_describe.get('data', '?')}",
        f"- protocol: each method's lr picked from its grid (published lr x 1/3, 1, 3, 10; one more, x 30 or "
        f"x 1/10, where the pick was at an edge) by the validation "
        f"{METRIC[protocol.task_name]} after {protocol.steps} steps (seed 0; the test split is not read); then "
        f"seeds {', '.join(map(str, protocol.seeds[1:]))} at that lr; batches, init of the new weights and the method's "
        f"draws follow the seed, the data split does not. Evaluation every {protocol.eval_every} steps; "
        "fp32; max grad norm 1 where the method clips (hift: per group; LOMO, AdaLomo, MeZO: no clipping)",
        "",
        main_table[0], main_table[1], *main_table[2:],
        "",
    ]
    lines += _describe(protocol, rows, facts)
    caveat = CAVEATS.get(protocol.task_name, "").format(steps=protocol.steps, epochs=epochs)
    if caveat:
        lines += ["", caveat]
    lines += ["", f"Equal CPU time: each run's last evaluation within the budget; the steps it had reached are "
              "in brackets (evaluations are every "
              f"{protocol.eval_every} steps, so a run is credited with its last evaluation before the budget).",
              "", "## Learning-rate grid (validation split)", "", *grid_table(protocol, rows), "",
              "A pick at the grid's edge (flagged in the table) means the best lr may lie outside the grid.",
              "", "## Time", "", *timing(protocol, specs, rows), "",
              "Notes per method: " + "; ".join(sorted({f"**{label(r['spec'])}**"
                                                       + (f" (`{r['spec']}`)" if label(r["spec"]) != r["spec"] else "")
                                                       + f": {c['note']}" for r in rows
                                                       for c in r['cells'][:1]})) + "."]
    paths = [stem.with_suffix(".md")]
    paths[0].write_text("\n".join(lines) + "\n")
    if any(r["finals"] for r in rows):
        try:
            paths += _plots(protocol, rows, stem, facts["budget"])
        except Exception as err:  # plots are a convenience; the table is the result
            print(f"plots failed: {err}")
    return paths
