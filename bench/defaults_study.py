"""Which lr, schedule and warm-up hift.fit should use when a user gives none, and whether the lr
should follow K (the number of groups: each group is updated once every K steps), chosen from
the quality protocol's cells on three fine-tuning tasks of different shapes (bench.quality_tasks:
genre, lines, replaced). docs/defaults.md holds the tables and the rule.

    PYTHONPATH=python:. nice -n 19 python -m bench.defaults_study --phase grid --task lines
    PYTHONPATH=python:. nice -n 19 python -m bench.defaults_study --phase default
    PYTHONPATH=python:. nice -n 19 python -m bench.defaults_study --phase baselines
    PYTHONPATH=python:. python -m bench.defaults_study --report         # tables only

Phases (each a list of cells, task x method spec x lr x seed, run in order; finished cells,
including the protocol's own, are reused; --max-minutes stops starting new ones):
  grid       seed 0: hift with one unit per group (K = the model's units) and with all units in
             one group (K = 1), linear decay, at lr 2e-5 .. 2e-3 (x3 apart)
  schedule   seed 0: hift at the default lr with one warm-up cycle, linear and cosine
  default    seeds 0-2: hift as fit runs it with no lr or schedule given (Config's defaults);
             hift tuned (the grid's pick on the validation split at K = units, then seeds 1, 2);
             AdamW at its published lr (2e-5, constant)
  baselines  seeds 0-2: LoRA, BAdam, LOMO, AdaLomo at their published lrs (what users run)
The cells live where bench.quality keeps them (bench/results/quality_runs/<task>/), under the
protocol's settings for each task, so the protocol's tables read them too.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import methods
from bench.quality import RESULTS, Protocol, select, validation_only, HIGHER_IS_BETTER, METRIC

TASKS = ("genre", "lines", "replaced")
UNITS = {"genre": 8, "replaced": 8, "lines": 7}  # hift's units: embeddings, each block, (norm,) head
GRID_LRS = {"many": (2e-4, 6e-4, 2e-3, 6e-5, 2e-5), "one": (2e-5, 6e-5, 2e-4, 6e-4)}
BASELINES = ("lora", "badam", "lomo", "adalomo")
SEEDS = (0, 1, 2)


def per_unit_spec(schedule: str = "linear", warmup: int = 0) -> str:
    return f"hift:group_size=1,lr_schedule={schedule},order=top_down" + (f",warmup_cycles={warmup}" if warmup else "")


def one_group_spec(task: str) -> str:
    return f"hift:group_size={UNITS[task]},lr_schedule=linear,order=top_down"


def default_spec() -> tuple[str, float]:
    """hift.fit with nothing given but the model and the data: Config's defaults, as a bench spec."""
    from hift.config import Config

    c = Config()
    spec = f"hift:group_size={c.group_size},lr_schedule={c.lr_schedule},order={c.order}"
    if c.warmup_cycles:
        spec += f",warmup_cycles={c.warmup_cycles}"
    return spec, c.lr


def tuned_pick(protocol: Protocol, spec: str, lrs) -> float | None:
    records = [protocol.cell(spec, lr, 0) for lr in lrs]
    if any(r is None for r in records):
        return None
    return select([validation_only(r, lr) for r, lr in zip(records, lrs)],
                  higher_is_better=METRIC[protocol.task_name] in HIGHER_IS_BETTER)


def cells(phase: str, task: str, protocol: Protocol) -> list[tuple[str, float, int]]:
    if phase == "grid":  # the two K's interleaved, the likeliest picks first
        many = [(per_unit_spec(), lr, 0) for lr in GRID_LRS["many"]]
        one = [(one_group_spec(task), lr, 0) for lr in GRID_LRS["one"]]
        return [c for pair in zip(many, one) for c in pair] + many[len(one):]
    if phase == "schedule":  # the default lr with one warm-up cycle, linear or cosine
        spec, lr = default_spec()
        return [(per_unit_spec(schedule, 1), lr, 0) for schedule in ("linear", "cosine")]
    if phase == "default":
        spec, lr = default_spec()
        out = [(spec, lr, s) for s in SEEDS] + [("adamw", methods.METHODS["adamw"].paper_lr, s) for s in SEEDS]
        pick = tuned_pick(protocol, per_unit_spec(), sorted(GRID_LRS["many"]))
        if pick is not None:
            out += [(per_unit_spec(), pick, s) for s in SEEDS[1:]]
        return out
    if phase == "baselines":
        return [(name, methods.METHODS[name].paper_lr, s) for s in SEEDS for name in BASELINES]
    raise ValueError(phase)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.defaults_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", choices=("grid", "schedule", "default", "baselines"), action="append")
    p.add_argument("--cell", action="append", default=[], metavar="TASK|SPEC|LR|SEED",
                   help="one more cell (e.g. beyond a grid's edge), run before the phases")
    p.add_argument("--task", choices=TASKS, action="append")
    p.add_argument("--run-dir", default=str(RESULTS / "quality_runs"))
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--report", action="store_true", help="write docs/defaults_tables.md from the cells")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    tasks = args.task or list(TASKS)
    if args.report:
        from bench import defaults_report

        print(defaults_report.write(tasks, Path(args.run_dir)))
        return 0
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    for item in args.cell:
        task, spec, lr, seed = item.split("|")
        protocol = Protocol(task, Path(args.run_dir))
        protocol.check_run_dir()
        protocol.ensure(spec, float(lr), int(seed))
    for phase in args.phase or ([] if args.cell else ["grid"]):
        for task in tasks:
            protocol = Protocol(task, Path(args.run_dir))
            protocol.check_run_dir()
            todo = [c for c in cells(phase, task, protocol) if protocol.cell(*c) is None]
            print(f"{phase} / {task}: {len(todo)} cells to run", flush=True)
            for spec, lr, seed in todo:
                if deadline and time.time() > deadline:
                    print("stopped at --max-minutes; the same command continues", flush=True)
                    return 0
                protocol.ensure(spec, lr, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
