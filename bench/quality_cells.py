"""One cell of the quality protocol (task x method x lr x seed): train, evaluate along the way,
store the record as one JSON file. A cell file that exists is a finished cell and is never
recomputed; files are written to a temporary name and renamed, so a killed run leaves either a
whole cell or none.

Time is the process's CPU time (time.process_time) spent training, evaluation left out: on a
machine shared with other work it moves much less than wall time (which is stored too).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from bench import methods
from bench.quality_tasks import QualityTask


def slug(spec: str) -> str:
    """A file-name form of a method spec, with its options sorted: one spec, one directory."""
    name, options = methods.parse_spec(spec)
    return name + "".join(f"_{k}-{options[k]}" for k in sorted(options))


def cell_path(run_dir: Path, task: str, spec: str, lr: float, seed: int) -> Path:
    return Path(run_dir) / task / slug(spec) / f"lr{lr:.3g}_seed{seed}.json"


def read_cell(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def write_cell(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


class _Clock:
    """CPU and wall seconds spent training: evaluation is paused out."""

    def __init__(self):
        self.cpu = self.wall = 0.0
        self.resume()

    def resume(self):
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def pause(self):
        self.cpu += time.process_time() - self._cpu
        self.wall += time.perf_counter() - self._wall


def run_cell(task: QualityTask, spec: str, lr: float, seed: int, steps: int, eval_every: int) -> dict:
    """Train `spec` at `lr` for `steps` steps; evaluate on val and test at step 0, every
    `eval_every` steps and at the end. A non-finite loss ends the cell early (diverged)."""
    import hift

    torch.manual_seed(seed)
    method, options = methods.make(spec)
    precision = options.pop("precision", "fp32")
    options["total_steps"] = steps
    model = task.make_model(seed)
    batches = task.train_batches(seed, steps)
    run = methods.RunSpec(lr=lr, max_steps=steps, precision=precision, seed=seed, options=options)
    trained = {"model": model}
    prepare = method.prepare_model

    def prepare_and_keep(m, s):  # LoRA returns a wrapper: evaluation must see that one
        trained["model"] = prepare(m, s)
        return trained["model"]

    method.prepare_model = prepare_and_keep
    losses, evals = [], []
    clock = _Clock()

    def evaluate(step: int):
        clock.pause()
        evals.append({"step": step, "cpu_seconds": clock.cpu, "wall_seconds": clock.wall,
                      "val": task.evaluate(trained["model"], "val"),
                      "test": task.evaluate(trained["model"], "test")})
        clock.resume()

    def on_step(loss: float) -> bool:
        losses.append(loss)
        if len(losses) % eval_every == 0 or len(losses) == steps:
            evaluate(len(losses))
        return len(losses) >= steps

    evaluate(0)
    clock.cpu = clock.wall = 0.0  # building the model and step 0's evaluation are not training
    diverged = None
    try:
        method.train(model, batches, run, on_step, torch.device("cpu"))
    except (FloatingPointError, hift.NonFiniteError) as err:
        diverged = f"step {len(losses)}: {err}"
    if diverged is None and (not losses or not math.isfinite(losses[-1])):
        diverged = f"step {len(losses)}: loss {losses[-1] if losses else None}"
    if diverged is None and (not evals or evals[-1]["step"] != len(losses)):
        evaluate(len(losses))
    clock.pause()
    return {"task": task.name, "method": spec, "lr": lr, "seed": seed, "steps": steps,
            "eval_every": eval_every, "steps_done": len(losses), "diverged": diverged,
            "losses": losses, "evals": evals, "cpu_seconds": clock.cpu, "wall_seconds": clock.wall,
            "note": method.note, "trainable": method.trainable, "load_average": os.getloadavg()[0],
            "threads": torch.get_num_threads(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
