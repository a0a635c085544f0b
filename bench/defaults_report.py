"""bench/results/defaults.md and defaults_<task>_{steps,time}.png: the tables docs/defaults.md
quotes, written from the cells of bench.defaults_study (and the protocol's own, where the same).

Per task: the lr x K grid on the validation split (seed 0), then hift with no lr or schedule
given, hift tuned, and the baselines at their published lrs (and, on genre, tuned by the
protocol), on the test split at equal steps, at equal CPU time (the CPU seconds hift's defaults
need for the whole run, their slowest seed) and with the memory each method holds besides activations.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
from pathlib import Path

import torch

from bench import methods
from bench.defaults_study import (BASELINES, GRID_LRS, SEEDS, UNITS, default_spec, one_group_spec, per_unit_spec,
                                  tuned_pick)
from bench.quality import HIGHER_IS_BETTER, METRIC, RESULTS, Protocol, validation_only

GENRE_K_SPECS = {4: "hift:group_size=2,lr_schedule=linear,order=top_down",  # the protocol's ablation cells
                 2: "hift:group_size=4,lr_schedule=linear,order=top_down"}
ALL_LRS = (6.7e-6, 2e-5, 6e-5, 2e-4, 6e-4, 2e-3)


def _pct(metric: str, v) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if metric in HIGHER_IS_BETTER else f"{v:.3g}"


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _at(record: dict, budget: float):
    within = [e for e in record["evals"] if e["cpu_seconds"] <= budget * (1 + 1e-9)]
    return within[-1] if within else None


def memory(protocol: Protocol, spec: str, cache: dict) -> dict:
    """Bytes a method holds besides activations, measured over 3 steps: weights (with any
    adapters), the most gradient bytes alive at once, optimizer state (and masters)."""
    if spec in cache:
        return cache[spec]
    method, options = methods.make(spec)
    options.pop("precision", None)
    options["total_steps"] = 3
    task = protocol.task()
    model = task.make_model(0)
    run = methods.RunSpec(lr=1e-6, max_steps=3, options=options)
    kept = {"model": model}
    prepare = method.prepare_model
    method.prepare_model = lambda m, s: kept.__setitem__("model", prepare(m, s)) or kept["model"]
    steps = []
    method.train(model, task.train_batches(0, 3), run, lambda loss: steps.append(loss) or len(steps) >= 3,
                 torch.device("cpu"))
    weights = sum(p.numel() * p.element_size() for p in kept["model"].parameters())
    cache[spec] = {"weights": weights, "grads": method.grad_bytes, "state": method.state_bytes}
    return cache[spec]


def _grid_rows(protocol: Protocol, task: str) -> list[tuple[str, int, str]]:
    rows = [(f"K = {UNITS[task]} (group_size 1)", UNITS[task], per_unit_spec())]
    if task == "genre":
        rows += [(f"K = {k} (group_size {8 // k})", k, spec) for k, spec in GENRE_K_SPECS.items()]
    rows.append((f"K = 1 (group_size {UNITS[task]})", 1, one_group_spec(task)))
    rows.append((f"K = {UNITS[task]}, linear, 1 warm-up cycle", UNITS[task], per_unit_spec("linear", 1)))
    rows.append((f"K = {UNITS[task]}, cosine, 1 warm-up cycle", UNITS[task], per_unit_spec("cosine", 1)))
    rows.append(("adamw (constant lr; K = 1)", 1, "adamw"))
    return rows


def grid_section(protocol: Protocol, task: str) -> list[str]:
    metric = METRIC[task]
    lines = [f"| hift (linear decay unless named) | " + " | ".join(f"{lr:g}" for lr in ALL_LRS) + " | best lr |",
             "|---" * (len(ALL_LRS) + 2) + "|"]
    for name, k, spec in _grid_rows(protocol, task):
        trials = {lr: protocol.cell(spec, lr, 0) for lr in ALL_LRS}
        done = {lr: validation_only(r, lr) for lr, r in trials.items() if r is not None}
        if not done:
            continue
        ok = [t for t in done.values() if t["val"] is not None]
        sign = -1 if metric in HIGHER_IS_BETTER else 1
        best = min(ok, key=lambda t: (sign * t["val"], t["val_loss"]))["lr"] if ok else None
        cells = []
        for lr in ALL_LRS:
            t = done.get(lr)
            text = "" if t is None else ("div." if t["val"] is None else
                                         f"{_pct(metric, t['val'])} ({t['val_loss']:.3f})")
            cells.append(f"**{text}**" if lr == best and text else text)
        lines.append(f"| {name} | " + " | ".join(cells) + (f" | {best:g} |" if best else " | - |"))
    return lines


def final_rows(protocol: Protocol, task: str) -> list[tuple[str, str, float]]:
    spec, lr = default_spec()
    rows = [("hift, no lr or schedule given", spec, lr)]
    pick = tuned_pick(protocol, per_unit_spec(), sorted(GRID_LRS["many"]))
    if pick is not None:
        rows.append(("hift tuned (lr picked on validation, linear)", per_unit_spec(), pick))
    rows.append(("adamw, published lr", "adamw", methods.METHODS["adamw"].paper_lr))
    rows += [(f"{name}, published lr", name, methods.METHODS[name].paper_lr) for name in BASELINES]
    if task == "genre":  # the protocol's tuned baselines (bench/results/quality_genre.md)
        for name in ("adamw",) + BASELINES:
            sel = protocol.selection(name)
            if sel["lr"] is not None and sel["lr"] != methods.METHODS[name].paper_lr:
                rows.append((f"{name}, tuned by the protocol", name, sel["lr"]))
    return rows


def final_section(protocol: Protocol, task: str, mem_cache: dict) -> tuple[list[str], dict]:
    metric = METRIC[task]
    rows = []
    for name, spec, lr in final_rows(protocol, task):
        cells = [c for c in (protocol.cell(spec, lr, s) for s in SEEDS) if c is not None]
        rows.append({"name": name, "spec": spec, "lr": lr, "cells": cells})
    default = rows[0]
    full = [c for c in default["cells"] if c["steps_done"] == protocol.steps]
    budget = max(c["cpu_seconds"] for c in full) if full else None  # its slowest seed: all of its seeds finish
    lines = [f"| run | lr | seeds | test {metric.replace('_', ' ')} @ {protocol.steps} steps, mean ± sd | "
             f"test @ {budget or 0:.0f} CPU s (steps reached) | CPU s/step | memory besides activations, MB "
             "(weights + grads + state) |", "|---|---|---|---|---|---|---|"]
    facts = {"budget": budget, "rows": rows}
    for r in rows:
        if not r["cells"]:
            lines.append(f"| {r['name']} | {r['lr']:g} | 0 | not run | | | |")
            continue
        ends = [None if c["diverged"] else c["evals"][-1]["test"][metric] for c in r["cells"]]
        r["mean"], r["sd"] = _mean_sd(ends)
        at = [_at(c, budget) for c in r["cells"]] if budget else []
        r["t_mean"], r["t_sd"] = _mean_sd([e["test"][metric] if e else None for e in at])
        steps = sorted({e["step"] for e in at if e})
        per_step = statistics.fmean(c["cpu_seconds"] / max(1, c["steps_done"]) for c in r["cells"])
        try:
            m = memory(protocol, r["spec"], mem_cache)
            r["memory"] = sum(m.values())
            mem = f"{r['memory'] / 2**20:.0f} ({m['weights'] / 2**20:.0f} + {m['grads'] / 2**20:.0f} + {m['state'] / 2**20:.0f})"
        except Exception as err:  # noqa: BLE001 - the table says what failed
            mem = f"not measured ({type(err).__name__})"
        sd = f" ± {_pct(metric, r['sd'])}" if r["sd"] is not None else ""
        tsd = f" ± {_pct(metric, r['t_sd'])}" if r["t_sd"] is not None else ""
        lines.append(f"| {r['name']} | {r['lr']:g} | {len(r['cells'])} | {_pct(metric, r['mean'])}{sd} "
                     f"| {_pct(metric, r['t_mean'])}{tsd} ({'/'.join(map(str, steps)) or '-'}) | {per_step:.2f} "
                     f"| {mem} |")
    return lines, facts


def verdicts(task: str, facts: dict) -> list[str]:
    metric = METRIC[task]
    rows = {r["name"]: r for r in facts["rows"]}
    d = rows["hift, no lr or schedule given"]
    t = next((r for r in facts["rows"] if r["name"].startswith("hift tuned")), None)
    a = rows["adamw, published lr"]
    out = []
    sign = 1 if metric in HIGHER_IS_BETTER else -1
    if d.get("mean") is not None and t and t.get("mean") is not None and len(d["cells"]) == len(t["cells"]) == 3:
        gap = sign * (t["mean"] - d["mean"])
        sd = t["sd"] or 0.0
        ok = gap <= sd
        out.append(f"- defaults vs tuned (test, {len(d['cells'])} seeds each): {_pct(metric, d['mean'])} vs "
                   f"{_pct(metric, t['mean'])} ± {_pct(metric, sd)}: **{'met' if ok else 'not met'}** "
                   f"(within one sd of tuned{'' if ok else ': short by ' + _pct(metric, gap - sd)})")
    else:
        out.append(f"- defaults vs tuned: not decided (seeds: defaults {len(d['cells'])}, tuned "
                   f"{len(t['cells']) if t else 0} of 3)")
    if d.get("t_mean") is not None and a.get("t_mean") is not None:
        ok = sign * (d["t_mean"] - a["t_mean"]) >= 0
        out.append(f"- defaults vs AdamW at its published lr, equal CPU time ({facts['budget']:.0f} s): "
                   f"{_pct(metric, d['t_mean'])} vs {_pct(metric, a['t_mean'])} ({len(d['cells'])} and "
                   f"{len(a['cells'])} seeds): **{'met' if ok else 'not met'}**")
    else:
        out.append("- defaults vs AdamW at equal CPU time: not decided (cells missing)")
    return out


def plots(task: str, protocol: Protocol, facts: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = METRIC[task]
    scale = 100 if metric in HIGHER_IS_BETTER else 1
    written = []
    for axis, xlabel in (("steps", "steps"), ("time", "CPU seconds of training")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in facts["rows"]:
            cells = [c for c in r["cells"] if not c["diverged"]]
            if not cells:
                continue
            n = min(len(c["evals"]) for c in cells)
            xs = [statistics.fmean(c["evals"][i]["step" if axis == "steps" else "cpu_seconds"] for c in cells)
                  for i in range(n)]
            ys = [statistics.fmean(c["evals"][i]["test"][metric] for c in cells) * scale for i in range(n)]
            style = "-" if r["name"].startswith("hift") else "--"
            ax.plot(xs, ys, style, marker=".", label=f"{r['name']} ({r['lr']:g}, {len(cells)} seeds)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {metric.replace('_', ' ')}" + (" (%)" if scale == 100 else ""))
        ax.set_title(f"{task}: test {metric.replace('_', ' ')} (mean of seeds)", fontsize=10)
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = out / f"defaults_{task}_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(tasks, run_dir: Path, out: Path = RESULTS) -> Path:
    spec, lr = default_spec()
    lines = ["# Defaults study: the tables behind docs/defaults.md", "",
             f"- written: {datetime.datetime.now():%Y-%m-%dT%H:%M}; load average now {os.getloadavg()[0]:.1f} "
             "(2 cores shared with other work: compare CPU seconds, not wall time)",
             "- commands: `PYTHONPATH=python:. nice -n 19 python -m bench.defaults_study --phase grid --phase "
             "default --phase baselines` (continues where it stopped), then `... --report`",
             f"- hift with nothing given (Config's defaults): `{spec}`, lr {lr:g}, max_grad_norm 1 per group",
             "- cells: `bench/results/quality_runs/<task>/`; the protocol's settings per task (bench/quality.py "
             "SETTINGS); the grid reads only the validation split; the test split is read once per finished run "
             "(every evaluation of a run logs both, and only these final tables read test)", ""]
    for task in tasks:
        protocol = Protocol(task, run_dir)
        mem_path = run_dir / task / "memory.json"
        mem_cache = json.loads(mem_path.read_text()) if mem_path.exists() else {}
        d = protocol.task().describe if any((run_dir / task).glob("*/lr*_seed0.json")) else {}
        lines += [f"## {task}", "", f"- model: {d.get('model', '?')}", f"- data: {d.get('data', '?')}",
                  f"- {protocol.steps} steps, evaluation every {protocol.eval_every}", "",
                  f"### lr x K on the validation split (seed 0): {METRIC[task].replace('_', ' ')}"
                  " % (loss), at the end of the run", ""]
        lines += grid_section(protocol, task)
        table, facts = final_section(protocol, task, mem_cache)
        mem_path.write_text(json.dumps(mem_cache, indent=1))
        lines += ["", "### Test split: defaults, tuned and baselines", ""] + table + [""] + verdicts(task, facts) + [""]
        for p in plots(task, protocol, facts, out):
            lines.append(f"![{p.stem}]({p.name})")
        lines.append("")
    path = out / "defaults.md"
    path.write_text("\n".join(lines) + "\n")
    return path
