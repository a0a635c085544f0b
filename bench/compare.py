"""Compare hift with full AdamW, LOMO, AdaLomo, MeZO, BAdam and LoRA under equal settings.

    PYTHONPATH=python:. python -m bench.compare --task lm --steps 24 \
        --methods adamw lomo adalomo mezo badam lora hift hift:precision=bf16
    PYTHONPATH=python:. python -m bench.compare --task genre --steps 48 --tune --time-budget adamw
    PYTHONPATH=python:. python -m bench.compare --task genre --steps 48 --ablation

Every method runs in its own process (`--worker`), on the same model, batches, batch size,
sequence length, number of steps, gradient-checkpointing setting and precision; only the
learning rate differs, and it is either the method's paper value (the default) or the best of
the method's 3-point grid on a short tuning run (--tune: lowest mean training loss over the
tuning run's last third; the test set is never looked at). Per method, one run measures:
peak memory above the loaded model, tokens per second (median over the steps after
--warmup), the training loss per step and, on the genre task, held-out accuracy after --steps
steps and after --time-budget seconds of training (evaluation time is not counted).
Results: bench/results/<task>[_<tag>].md and .json, plots by bench/plots.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_METHODS = ["adamw", "lomo", "adalomo", "mezo", "badam", "lora", "hift"]
ABLATION = ["hift:order=top_down,group_size=1", "hift:order=bottom_up,group_size=1",
            "hift:order=random,group_size=1", "hift:order=top_down,group_size=2",
            "hift:order=top_down,group_size=4"]


# ------------------------------------------------------------------------------------------
# one method, in this process


def run_one(a) -> dict:
    import torch

    from bench import methods, tasks
    from bench.measure import PeakMeter, release_free_memory
    from hift.batches import compute_loss, to_device

    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    cap = a.max_steps or a.steps
    task_kwargs = json.loads(a.task_args)
    task = tasks.build(a.task, steps=cap, seed=a.seed, **task_kwargs)
    if getattr(a, "no_eval", False):
        task.evaluate = None
    method, options = methods.make(a.method)
    precision = options.pop("precision", a.precision)
    options["total_steps"] = a.steps
    spec = methods.RunSpec(lr=a.lr, max_steps=cap, precision=precision,
                           grad_checkpointing=a.grad_checkpointing, seed=a.seed, options=options)
    model = task.make_model().to(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    # Warm-up outside the measurement: one forward and backward loads the kernels' code and
    # libraries' buffers, which would otherwise count as the first method's memory.
    loss = compute_loss(model, to_device(task.batches[0], device))
    loss.backward()
    for p in model.parameters():
        p.grad = None
    del loss
    release_free_memory()

    meter = PeakMeter(device)
    record = {"losses": [], "step_seconds": [], "cpu_seconds": [], "tokens": [], "acc_at_steps": None,
              "acc_at_time": None, "steps_at_time": None}
    clock = {"train": 0.0, "mark": 0.0, "cpu": 0.0}
    budget = a.time_budget

    trained = {}

    def evaluate(key):
        meter.pause()
        if task.evaluate is not None:
            record[key] = task.evaluate(trained.get("model", model))
        meter.resume()

    def on_step(loss: float) -> bool:
        now = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            now = time.perf_counter()
        seconds = now - clock["mark"]
        record["cpu_seconds"].append(time.process_time() - clock["cpu"])
        clock["train"] += seconds
        i = len(record["losses"])
        record["losses"].append(loss)
        record["step_seconds"].append(seconds)
        record["tokens"].append(task.tokens(task.batches[i % len(task.batches)]))
        steps = i + 1
        if steps == a.steps:
            record["seconds_at_steps"] = clock["train"]
            evaluate("acc_at_steps")
        if budget and record["acc_at_time"] is None and clock["train"] >= budget:
            record["steps_at_time"] = steps
            evaluate("acc_at_time")
        clock["mark"] = time.perf_counter()
        clock["cpu"] = time.process_time()
        return steps >= a.steps and (not budget or record["acc_at_time"] is not None)

    # The model the method trains may be a wrapper (peft); evaluation must see that one.
    original_make = method.prepare_model

    def prepare(m, s):
        wrapped = original_make(m, s)
        trained["model"] = wrapped
        return wrapped

    method.prepare_model = prepare
    meter.start()
    clock["mark"] = time.perf_counter()
    clock["cpu"] = time.process_time()
    method.train(model, task.batches, spec, on_step, device)
    meter.pause()
    if budget and record["acc_at_time"] is None:  # the cap came first
        record["steps_at_time"] = len(record["losses"])
        evaluate("acc_at_time")
    if record["acc_at_steps"] is None and len(record["losses"]) < a.steps:
        evaluate("acc_at_steps")

    times = record["step_seconds"][a.warmup:a.steps] or record["step_seconds"]
    rates = [n / t for n, t in zip(record["tokens"][a.warmup:a.steps], times)]
    out = dict(
        method=a.method, name=method.name, note=method.note, lr=a.lr, precision=precision,
        steps=min(a.steps, len(record["losses"])), total_steps=len(record["losses"]),
        params=params, trainable=method.trainable, weights_bytes=weights,
        peak_bytes=meter.peak, peak_reserved_bytes=meter.peak_reserved, memory_where=meter.where(),
        state_bytes=method.state_bytes, grad_bytes=method.grad_bytes, extra=method.extra,
        task_describe=task.describe,
        median_step_seconds=statistics.median(times) if times else 0.0,
        mean_step_seconds=statistics.fmean(times) if times else 0.0,
        median_cpu_seconds=statistics.median(record["cpu_seconds"][a.warmup:a.steps] or record["cpu_seconds"]),
        load_average=os.getloadavg()[0],
        tokens_per_second=statistics.median(rates) if rates else 0.0,
        **record,
    )
    return out


# ------------------------------------------------------------------------------------------
# the harness


def worker_command(args, method: str, lr: float, steps: int, max_steps: int, budget, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "bench.compare", "--worker", "--task", args.task, "--method", method,
           "--lr", repr(lr), "--steps", str(steps), "--max-steps", str(max_steps),
           "--warmup", str(args.warmup), "--precision", args.precision, "--device", args.device,
           "--seed", str(args.seed), "--task-args", args.task_args, "--out", str(out)]
    if budget:
        cmd += ["--time-budget", repr(budget)]
    if args.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    return cmd


def launch(args, method, lr, steps, max_steps, budget, scratch: Path, evaluate: bool = True) -> dict:
    from bench.measure import malloc_env

    out = scratch / f"{method.replace(':', '_').replace(',', '_').replace('=', '-')}_{lr:g}_{steps}.json"
    env = malloc_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")])
    cmd = worker_command(args, method, lr, steps, max_steps, budget, out)
    if not evaluate:
        cmd.append("--no-eval")
    started = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    if done.returncode != 0 or not out.exists():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        print(f"  {method} lr {lr:g}: FAILED ({done.returncode})\n{tail}", flush=True)
        return {"method": method, "lr": lr, "failed": tail.splitlines()[-1] if tail else str(done.returncode)}
    result = json.loads(out.read_text())
    print(f"  {method:<36} lr {lr:<8g} {result['median_step_seconds']:.3f} s/step  "
          f"{result['tokens_per_second']:8.0f} tok/s  peak {result['peak_bytes'] / 2**20:8.1f} MiB  "
          f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}"
          + (f"  acc {result['acc_at_steps']:.3f}" if result.get("acc_at_steps") is not None else "")
          + f"  ({time.time() - started:.0f} s)", flush=True)
    return result


def tune(args, method: str, scratch: Path) -> tuple[float, list[dict]]:
    from bench import methods

    cls = methods.METHODS[methods.parse_spec(method)[0]]
    trials = []
    for lr in cls.lr_grid:
        r = launch(args, method, lr, args.tune_steps, args.tune_steps, None, scratch, evaluate=False)
        if "failed" not in r:
            tail = r["losses"][-max(1, len(r["losses"]) // 3):]
            r["tune_loss"] = sum(tail) / len(tail)
        trials.append(r)
    ok = [t for t in trials if "tune_loss" in t and t["tune_loss"] == t["tune_loss"]]
    best = min(ok, key=lambda t: t["tune_loss"])["lr"] if ok else cls.paper_lr
    return best, trials


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {gpu}; torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="lm", choices=("lm", "genre", "tiny"))
    p.add_argument("--task-args", default="{}", help="JSON keyword arguments for the task builder "
                   "(lm: batch, seq, shape; genre: batch, max_length, train_per_class, test_per_class)")
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--ablation", action="store_true", help="the paper's ablation: three orders, group sizes 1, 2, 4")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--max-steps", type=int, default=None, help="cap when running to the time budget")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="one lr for every method (else paper or tuned)")
    p.add_argument("--lrs", default=None, help="JSON {method: lr}, e.g. from an earlier --tune")
    p.add_argument("--tune", action="store_true", help="pick each lr from its 3-point grid first")
    p.add_argument("--tune-steps", type=int, default=12)
    p.add_argument("--tune-only", action="store_true", help="tune, write <results>/<task>_lrs.json, stop")
    p.add_argument("--time-budget", default=None,
                   help="seconds of training for the equal wall-clock accuracy, or 'adamw': what "
                        "full AdamW takes for --steps (run first)")
    p.add_argument("--tag", default="")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tune = args.tune or args.tune_only

    if args.worker:
        budget = float(args.time_budget) if args.time_budget else None
        args.time_budget = budget
        result = run_one(args)
        Path(args.out).write_text(json.dumps(result))
        return 0

    method_list = args.methods or (ABLATION if args.ablation else DEFAULT_METHODS)
    name = args.task + (f"_{args.tag}" if args.tag else "")
    scratch = RESULTS / f".runs_{name}"
    scratch.mkdir(parents=True, exist_ok=True)
    fixed, tuned_before, tuned_steps = {}, None, None
    if args.lrs:
        given = json.loads(Path(args.lrs).read_text()) if Path(args.lrs).is_file() else json.loads(args.lrs)
        fixed = given.get("lrs", given)
        tuned_before, tuned_steps = given.get("tuning"), given.get("tune_steps")
    command = "PYTHONPATH=python:. python -m bench.compare " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    print(f"{command}\n{machine()}", flush=True)

    from bench import methods as registry

    lrs, tuning = {}, {}
    for m in method_list:
        base = registry.parse_spec(m)[0]
        if args.lr is not None:
            lrs[m] = args.lr
        elif m in fixed or base in fixed:
            lrs[m] = fixed.get(m, fixed.get(base))
        elif args.tune:
            print(f"tuning {m} on {registry.METHODS[base].lr_grid} ({args.tune_steps} steps)", flush=True)
            lrs[m], tuning[m] = tune(args, m, scratch)
        else:
            lrs[m] = registry.METHODS[base].paper_lr
    if args.tune_only:
        (RESULTS / f"{name}_lrs.json").write_text(json.dumps(
            {"lrs": lrs, "tune_steps": args.tune_steps, "command": command, "date": datetime.datetime.now().isoformat(timespec="minutes"),
             "tuning": {m: [{"lr": t["lr"], "loss": t.get("tune_loss")} for t in ts] for m, ts in tuning.items()}}, indent=1))
        print(json.dumps(lrs))
        return 0
    budget = None
    results = []
    order = list(method_list)
    if args.time_budget == "adamw":
        if "adamw" not in order:
            order.insert(0, "adamw")
            lrs["adamw"] = fixed.get("adamw", registry.METHODS["adamw"].paper_lr if args.lr is None else args.lr)
        order.remove("adamw")
        order.insert(0, "adamw")
    elif args.time_budget:
        budget = float(args.time_budget)
    max_steps = args.max_steps or (args.steps * 3 if args.time_budget else args.steps)
    print("running", flush=True)
    for m in order:
        r = launch(args, m, lrs[m], args.steps, max_steps, budget, scratch)
        results.append(r)
        if args.time_budget == "adamw" and m == "adamw" and "failed" not in r:
            budget = r["seconds_at_steps"]
            print(f"  time budget: {budget:.1f} s (full AdamW's {args.steps} steps)", flush=True)
    for r in results:
        if m := r.get("method"):
            r.setdefault("lr", lrs.get(m))
    report = dict(task=args.task, command=command, machine=machine(),
                  date=datetime.datetime.now().isoformat(timespec="minutes"), steps=args.steps,
                  warmup=args.warmup, precision=args.precision, device=args.device,
                  grad_checkpointing=args.grad_checkpointing, time_budget=budget,
                  lr_source=("one lr for all" if args.lr is not None else
                             "tuned on each method's 3-point grid" if args.tune else
                             "tuned on each method's 3-point grid (bench.compare --tune-only)" if tuned_before else
                             "given" if fixed else "paper values"),
                  tune_steps=args.tune_steps if args.tune else tuned_steps,
                  tuning=({m: [{"lr": t["lr"], "loss": t.get("tune_loss")} for t in ts] for m, ts in tuning.items()}
                          or tuned_before or {}),
                  results=results)
    from bench import report as reporting

    described = next((r["task_describe"] for r in results if "task_describe" in r), {})
    report["task_describe"] = described
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1))
    md = reporting.markdown(report)
    (RESULTS / f"{name}.md").write_text(md)
    try:
        from bench import plots

        plots.plot_report(report, RESULTS / name)
    except Exception as err:  # plots are a convenience; the table is the result
        print(f"plots failed: {err}", file=sys.stderr)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
