"""The quality protocol: every method goes through it the same way, on the genre task (held-out
plays, accuracy), the language-modelling task (held-out plays, perplexity) and the fine-tuning
tasks of the defaults study (lines: causal-LM completions, token accuracy; replaced: token
tagging, F1; see bench.defaults_study and docs/defaults.md).

    PYTHONPATH=python:. nice -n 19 python -m bench.quality --task genre             # main methods
    PYTHONPATH=python:. nice -n 19 python -m bench.quality --task genre --ablation  # orders x group sizes
    PYTHONPATH=python:. python -m bench.quality --task genre --report               # tables + plots only
    PYTHONPATH=python:. python -m bench.quality --quick                             # smoke test, ~1 min

Per method:
1. selection: one run per learning rate of its grid (the published value x 1/3, 1, 3, 10), seed
   0, `steps` steps; the lr whose run ends with the best *validation* metric wins (ties: lower
   validation loss; diverged runs never win). A pick at the grid's edge adds one more lr beyond
   it (x 30 or x 1/10) and the pick is made again over the five. The validation split is carved from the training
   plays; the test split is not read by the selection (select() sees validation records only).
2. final: seeds 1 and 2 at the picked lr; with seed 0's selection run, three seeds.
Every run evaluates validation and test at step 0, every `eval_every` steps and at the end, and
records the CPU seconds spent training (evaluation left out) at each point: the tables compare
at equal steps and at equal CPU time, and the plots show the whole curves.

Every cell (task x method x lr x seed) is one JSON file under --run-dir; a run that is killed
continues where it stopped, reusing finished cells, so the protocol can run in pieces
(--max-minutes stops starting new cells after that long).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from bench import methods
from bench.quality_cells import cell_path, read_cell, run_cell, write_cell

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# hift.fit's own defaults written out (top_down, group size 1, linear decay to 0 over the run), and
# what README's "Use on your own model" recommends (cosine decay, one warm-up cycle). The other
# methods run at a constant lr, as in bench.compare.
HIFT_DEFAULT = "hift:group_size=1,lr_schedule=linear,order=top_down"
HIFT_RECOMMENDED = "hift:group_size=1,lr_schedule=cosine,order=top_down,warmup_cycles=1"
MAIN = [HIFT_DEFAULT, HIFT_RECOMMENDED, "adamw", "lomo", "adalomo", "badam", "lora", "mezo"]
ABLATION = [f"hift:group_size={g},lr_schedule=linear,order={o}"
            for o in ("top_down", "bottom_up", "random") for g in (1, 2, 4)]
LABELS = {HIFT_DEFAULT: "hift (default)", HIFT_RECOMMENDED: "hift (recommended)"}

# The published (fine-tuning) learning rate each grid is built around: the method's paper value
# (bench/methods/*.paper_lr); hift (recommended): the lr hift's demo ships (hift.demo.run).
PUBLISHED = {HIFT_RECOMMENDED: 2e-4}
GRID_FACTORS = (1 / 3, 1, 3, 10)
EXTEND_UP, EXTEND_DOWN = 30, 1 / 10  # one more lr where the grid's pick is at its edge (5 at most)
SEEDS = (0, 1, 2)

SETTINGS = {
    "genre": dict(steps=200, eval_every=25,
                  task_args=dict(batch=8, max_length=64, train_per_class=400, val_per_class=40, test_per_class=40)),
    "lm": dict(steps=300, eval_every=25, task_args=dict(batch=4, seq=128, val_blocks=32, test_blocks=32)),
    "lines": dict(steps=200, eval_every=50, task_args=dict(batch=8, train_examples=4000, val_examples=400,
                                                           test_examples=400)),
    "replaced": dict(steps=200, eval_every=50, task_args=dict(batch=8, max_length=48, train_lines=1600,
                                                              val_lines=300, test_lines=300)),
    "tiny": dict(steps=30, eval_every=10, task_args={}),
}
QUICK_LM_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                      vocab_size=30522)
QUICK = {
    "genre": dict(steps=4, eval_every=2, task_args=dict(batch=4, max_length=24, train_per_class=8,
                                                         val_per_class=4, test_per_class=4)),
    "lm": dict(steps=4, eval_every=2, task_args=dict(batch=2, seq=16, val_blocks=4, test_blocks=4,
                                                      shape=QUICK_LM_SHAPE)),
    "tiny": dict(steps=6, eval_every=3, task_args={}),
}
QUICK_GRID_FACTORS = (1, 10)
METRIC = {"genre": "accuracy", "tiny": "accuracy", "lm": "perplexity", "lines": "token_accuracy",
          "replaced": "f1"}
HIGHER_IS_BETTER = ("accuracy", "token_accuracy", "f1")
QUICK_SEEDS = (0, 1)


def label(spec: str) -> str:
    return LABELS.get(spec, spec)


def published_lr(spec: str) -> float:
    return PUBLISHED.get(spec, methods.METHODS[methods.parse_spec(spec)[0]].paper_lr)


def grid(spec: str, factors=GRID_FACTORS) -> list[float]:
    return [float(f"{published_lr(spec) * f:.2g}") for f in factors]


class Protocol:
    """One task's protocol: its settings, grids and seeds, over one run directory."""

    def __init__(self, task: str, run_dir: Path, quick: bool = False, task_args: dict | None = None,
                 steps: int | None = None, eval_every: int | None = None):
        base = (QUICK if quick else SETTINGS)[task]
        self.task_name = task
        self.run_dir = Path(run_dir)
        self.quick = quick
        self.steps = steps or base["steps"]
        self.eval_every = eval_every or base["eval_every"]
        self.task_args = dict(base["task_args"], **(task_args or {}))
        self.factors = QUICK_GRID_FACTORS if quick else GRID_FACTORS
        self.seeds = QUICK_SEEDS if quick else SEEDS
        self._task = None

    def settings(self) -> dict:
        return {"task": self.task_name, "steps": self.steps, "eval_every": self.eval_every,
                "task_args": self.task_args, "seeds": list(self.seeds), "grid_factors": list(self.factors)}

    def check_run_dir(self) -> None:
        """A run directory holds one task's cells under one set of settings, never a mix."""
        path = self.run_dir / self.task_name / "settings.json"
        mine = json.loads(json.dumps(self.settings()))
        if path.exists():
            theirs = json.loads(path.read_text())
            if theirs != mine:
                raise SystemExit(f"{path} was written with other settings:\n  {theirs}\nthese are:\n  {mine}\n"
                                 "pass another --run-dir (or remove that one) to run with these settings")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(mine, indent=1))

    def task(self):
        if self._task is None:
            from bench import quality_tasks

            self._task = quality_tasks.build(self.task_name, **self.task_args)
        return self._task

    def grid(self, spec: str) -> list[float]:
        """The method's grid; once its runs are done, one more lr beyond the edge the pick is at."""
        base = grid(spec, self.factors)
        pick = self._pick(spec, base)
        if pick is not None and pick == base[-1]:
            return base + grid(spec, (EXTEND_UP,))
        if pick is not None and pick == base[0]:
            return grid(spec, (EXTEND_DOWN,)) + base
        return base

    def _pick(self, spec: str, lrs: list[float]) -> float | None:
        records = [self.cell(spec, lr, self.seeds[0]) for lr in lrs]
        if any(r is None for r in records):
            return None
        return select([validation_only(r, lr) for r, lr in zip(records, lrs)],
                      higher_is_better=METRIC[self.task_name] in HIGHER_IS_BETTER)

    def path(self, spec: str, lr: float, seed: int) -> Path:
        return cell_path(self.run_dir, self.task_name, spec, lr, seed)

    def cell(self, spec: str, lr: float, seed: int) -> dict | None:
        return read_cell(self.path(spec, lr, seed))

    def ensure(self, spec: str, lr: float, seed: int, log=print) -> dict:
        """The cell's record: read from its file, or computed now and stored."""
        path = self.path(spec, lr, seed)
        done = read_cell(path)
        if done is not None:
            return done
        started_cpu, started = time.process_time(), time.perf_counter()
        record = run_cell(self.task(), spec, lr, seed, self.steps, self.eval_every)
        record["cell_cpu_seconds"] = time.process_time() - started_cpu
        record["cell_wall_seconds"] = time.perf_counter() - started
        write_cell(path, record)
        last = record["evals"][-1] if record["evals"] else {}
        metric = self.task().metric
        log(f"  {label(spec)} lr {lr:g} seed {seed}: {record['steps_done']} steps, "
            f"{record['cpu_seconds']:.0f} CPU s training, cell {record['cell_wall_seconds']:.0f} s wall; "
            f"val {metric} {last.get('val', {}).get(metric, float('nan')):.4g}"
            + (f"; DIVERGED ({record['diverged']})" if record["diverged"] else ""), flush=True)
        return record

    def selection(self, spec: str) -> dict:
        """{"trials": [{lr, val, val_loss, diverged}], "lr": the pick or None, "complete": bool}."""
        lrs = self.grid(spec)
        records = [self.cell(spec, lr, self.seeds[0]) for lr in lrs]
        trials = [validation_only(r, lr) for r, lr in zip(records, lrs)]
        complete = all(r is not None for r in records)
        return {"trials": trials, "complete": complete,
                "lr": select(trials, higher_is_better=METRIC[self.task_name] in HIGHER_IS_BETTER) if complete else None}


def validation_only(record: dict | None, lr: float) -> dict:
    """What the selection may read of a cell: its validation results at the last step, no more."""
    if record is None:
        return {"lr": lr, "val": None, "val_loss": None, "diverged": None, "missing": True}
    last = record["evals"][-1] if record["evals"] else None
    ok = last is not None and not record["diverged"] and last["step"] == record["steps"]
    val = last["val"] if ok else {}
    value = next((v for k, v in val.items() if k != "loss"), None)
    return {"lr": lr, "val": value, "val_loss": val.get("loss"), "diverged": record["diverged"]}


def select(trials: list[dict], higher_is_better: bool) -> float | None:
    """The lr of the best validation metric at the end of the run; ties: lower validation loss."""
    ok = [t for t in trials if t.get("val") is not None and t["val"] == t["val"]
          and t.get("val_loss") is not None and t["val_loss"] == t["val_loss"]]
    if not ok:
        return None
    sign = -1 if higher_is_better else 1
    return min(ok, key=lambda t: (sign * t["val"], t["val_loss"]))["lr"]


def run(protocol: Protocol, specs: list[str], deadline: float | None = None, log=print) -> bool:
    """Every cell of `specs`, method by method (its grid, then its other seeds); True when all done."""
    protocol.check_run_dir()
    for spec in specs:
        while missing := [lr for lr in protocol.grid(spec) if protocol.cell(spec, lr, protocol.seeds[0]) is None]:
            if deadline and time.time() > deadline:  # (the grid grows by one lr where the pick is at an edge)
                return False
            protocol.ensure(spec, missing[0], protocol.seeds[0], log)
        pick = protocol.selection(spec)["lr"]
        if pick is None:
            log(f"  {label(spec)}: every lr of the grid diverged; no final seeds", flush=True)
            continue
        for seed in protocol.seeds[1:]:
            if deadline and time.time() > deadline and protocol.cell(spec, pick, seed) is None:
                return False
            protocol.ensure(spec, pick, seed, log)
    return True


def plan(protocol: Protocol, specs: list[str]) -> list[tuple[str, float | None, int]]:
    """Every cell the protocol needs (the final seeds' lr is None until the grid has picked)."""
    cells = []
    for spec in specs:
        cells += [(spec, lr, protocol.seeds[0]) for lr in protocol.grid(spec)]
        pick = protocol.selection(spec)["lr"]
        cells += [(spec, pick, seed) for seed in protocol.seeds[1:]]
    return cells


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", action="append", choices=("genre", "lm", "lines", "replaced", "tiny"),
                   help="genre, lm, lines, replaced (repeatable; default genre then lm)")
    p.add_argument("--ablation", action="store_true", help="hift's orders x group sizes instead of the main methods")
    p.add_argument("--methods", nargs="*", default=None, help="method specs instead of the main list")
    p.add_argument("--quick", action="store_true", help="tiny data, 4 steps, 2 lrs, 2 seeds: a smoke test")
    p.add_argument("--run-dir", default=None, help="where the cells are (default bench/results/quality_runs; "
                   "--quick: runs/quality_quick)")
    p.add_argument("--out", default=None, help="where the tables and plots go (default bench/results; --quick: the run dir)")
    p.add_argument("--report", action="store_true", help="only write the tables and plots from the cells there")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new cell after this long")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: one core, so runs can share a machine)")
    p.add_argument("--poison-test", action="store_true", help=argparse.SUPPRESS)  # tests: selection must not move
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    tasks = args.task or ["genre", "lm"]
    run_dir = Path(args.run_dir or (ROOT / "runs" / "quality_quick" if args.quick else RESULTS / "quality_runs"))
    out = Path(args.out or (run_dir if args.quick else RESULTS))
    specs = args.methods or (ABLATION if args.ablation else MAIN)
    # The command that makes (or continues) these cells, whichever command wrote the report.
    given = list(argv if argv is not None else sys.argv[1:])
    kept = [x for i, x in enumerate(given) if x not in ("--report", "--poison-test", "--out")
            and not (i and given[i - 1] == "--out")]
    command = "PYTHONPATH=python:. python -m bench.quality " + " ".join(shlex.quote(x) for x in kept)
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    finished = True
    for name in tasks:
        protocol = Protocol(name, run_dir, quick=args.quick,
                            task_args={"poison_test": True} if args.poison_test else None)
        if not args.report:
            print(f"{name}: {len(specs)} methods, {protocol.steps} steps, seeds {list(protocol.seeds)}, "
                  f"cells in {run_dir / name}", flush=True)
            finished = run(protocol, specs, deadline) and finished
        from bench import quality_report

        for path in quality_report.write(protocol, specs, out, command, ablation=args.ablation):
            print(f"wrote {path}")
    if not finished:
        print("stopped at --max-minutes; the same command continues where this one stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
