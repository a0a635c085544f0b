"""The markdown table of a bench.compare run (bench/results/<task>.md)."""
from __future__ import annotations

MiB = 2**20


def _mib(x) -> str:
    return f"{x / MiB:,.1f}" if x is not None else "-"


def _acc(r, key) -> str:
    v = r.get(key)
    if v is None:
        return "-"
    if key == "acc_at_time" and r.get("steps_at_time"):
        return f"{v:.1%} ({r['steps_at_time']} steps)"
    return f"{v:.1%}"


def _cpu(r) -> str:
    v = r.get("median_cpu_seconds")
    return f"{v:.2f}" if v is not None else "-"


def _tail(losses, n=3) -> float:
    tail = losses[-n:]
    return sum(tail) / len(tail)


def device_equivalent_peak(r) -> int | None:
    """hift on the CPU keeps every group's state in the process (offload is off there: host and
    device are one memory). On a GPU with offload only the active group's state (the one slot)
    is on the device; this is the measured peak with the other groups' resting state taken out."""
    extra = r.get("extra") or {}
    sizes = extra.get("group_state_bytes")
    if not sizes or extra.get("offload"):
        return None
    return r["peak_bytes"] - sum(sizes) + max(sizes)


def markdown(report: dict) -> str:
    results = [r for r in report["results"] if "failed" not in r]
    failed = [r for r in report["results"] if "failed" in r]
    adamw = next((r for r in results if r["method"] == "adamw"), None)
    d = report.get("task_describe", {})
    lines = [
        f"# bench.compare: {report['task']} task",
        "",
        f"- date: {report['date']}",
        f"- machine: {report['machine']}",
        f"- command: `{report['command']}`",
        f"- model: {d.get('model', '?')}; data: {d.get('data', '?')}",
        f"- equal for every method: batch {d.get('batch')}, sequence {d.get('seq')}, {report['steps']} steps, "
        f"precision {report['precision']} (unless the method's row says otherwise), gradient checkpointing "
        f"{'on' if report['grad_checkpointing'] else 'off'}, seed {report.get('seed', 0)}, constant lr, same batches in the same order",
        f"- learning rates: {report['lr_source']}"
        + (f" (tuning runs of {report['tune_steps']} steps, lowest mean loss over their last third)"
           if report.get("tune_steps") else ""),
        f"- memory: {results[0]['memory_where'] if results else '?'}; each method in its own process",
        f"- throughput: tokens per second, median over steps {report['warmup'] + 1}..{report['steps']} "
        "(each step's own tokens over its own time); CPU s/step: the process's CPU time per step "
        "(median), less sensitive than wall time to other work on the machine",
        "- load: " + ", ".join(f"{r['method']} {r['load_average']:.1f}" for r in results if "load_average" in r)
        + " (1-minute load average when each run ended; 2 cores)",
    ]
    if report.get("time_budget"):
        lines.append(f"- equal wall-clock: accuracy after {report['time_budget']:.1f} s of training "
                     "(full AdamW's time for the step count; evaluation not counted)")
    lines += ["", "| method | lr | trainable | s/step (median) | CPU s/step | tokens/s | peak above model (MiB) | "
              "vs AdamW | optimizer state (MiB) | grads alive (MiB) | loss first -> last 3 |"
              + (" acc @ steps | acc @ time |" if any(r.get("acc_at_steps") is not None for r in results) else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|"
              + ("---|---|" if any(r.get("acc_at_steps") is not None for r in results) else "")]
    for r in results:
        ratio = f"{r['peak_bytes'] / adamw['peak_bytes']:.2f}x" if adamw and adamw["peak_bytes"] else "-"
        row = (f"| {r['method']}{'' if r['precision'] == report['precision'] else ' (' + r['precision'] + ')'} "
               f"| {r['lr']:g} | {r['trainable'] / 1e6:.2f}M | {r['median_step_seconds']:.3f} "
               f"| {_cpu(r)} "
               f"| {r['tokens_per_second']:,.0f} | {_mib(r['peak_bytes'])} | {ratio} | {_mib(r['state_bytes'])} "
               f"| {_mib(r['grad_bytes'])} | {r['losses'][0]:.3f} -> {_tail(r['losses'][:report['steps']]):.3f} |")
        if any(x.get("acc_at_steps") is not None for x in results):
            row += f" {_acc(r, 'acc_at_steps')} | {_acc(r, 'acc_at_time')} |"
        lines.append(row)
    lines.append("")
    lines.append("Notes per method: " + "; ".join(f"**{r['method']}**: {r['note']}" for r in results
                                                    if r.get("note")) + ".")
    hifts = [r for r in results if r["name"] == "hift"]
    eq = [(r, device_equivalent_peak(r)) for r in hifts]
    eq = [(r, v) for r, v in eq if v is not None]
    if eq:
        lines += ["", "hift on the CPU runs with offload off (the engine's CPU default: host and device are "
                  "one memory), so its measured peak holds every group's AdamW state. On a GPU with offload "
                  "only the active group's state (its one slot) is on the device; the "
                  "measured peak with the other groups' resting state taken out:"]
        for r, v in eq:
            ratio = f" = {v / adamw['peak_bytes']:.2f}x AdamW's" if adamw and adamw["peak_bytes"] else ""
            lines.append(f"- {r['method']}: {_mib(v)} MiB{ratio}")
    if adamw and hifts and report["task"] == "lm":
        h = hifts[0]
        t_ratio = h["median_step_seconds"] / adamw["median_step_seconds"]
        m_ratio = h["peak_bytes"] / adamw["peak_bytes"] if adamw["peak_bytes"] else float("nan")
        lines += ["", "## Targets (CPU, batch 2, seq 256)", "",
                  f"- step time, hift / full AdamW: {t_ratio:.2f} (median; mean "
                  f"{h['mean_step_seconds'] / adamw['mean_step_seconds']:.2f}); target <= 0.60: "
                  f"{'met' if t_ratio <= 0.6 else 'missed'}"
                  + (f"; by CPU time per step {h['median_cpu_seconds'] / adamw['median_cpu_seconds']:.2f}"
                     if h.get("median_cpu_seconds") and adamw.get("median_cpu_seconds") else ""),
                  f"- peak above the model, hift / full AdamW: {m_ratio:.2f} as measured (all groups' "
                  f"state resident); target <= 0.50: {'met' if m_ratio <= 0.5 else 'missed'}"]
        v = device_equivalent_peak(h)
        if v is not None and adamw["peak_bytes"]:
            lines.append(f"- the same with only the active group's state counted (what a GPU with offload holds): "
                         f"{v / adamw['peak_bytes']:.2f}")
        for other in ("lomo", "badam"):
            o = next((r for r in results if r["method"] == other), None)
            if o:
                lines.append(f"- hift vs {other}: step time {h['median_step_seconds'] / o['median_step_seconds']:.2f}x, "
                             f"peak {h['peak_bytes'] / max(1, o['peak_bytes']):.2f}x, final loss "
                             f"{_tail(h['losses'][:report['steps']]):.3f} vs {_tail(o['losses'][:report['steps']]):.3f}")
    if report.get("tuning"):
        lines += ["", "## Learning-rate tuning (mean training loss over the tuning run's last third)", "",
                  "| method | " + " | ".join(["lr / loss"] * 3) + " |", "|---|---|---|---|"]
        for m, trials in report["tuning"].items():
            cells = [f"{t['lr']:g}: {t['loss']:.3f}" if t.get("loss") is not None else f"{t['lr']:g}: failed"
                     for t in trials]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if failed:
        lines += ["", "Failed runs:"] + [f"- {r['method']} (lr {r['lr']:g}): {r['failed']}" for r in failed]
    return "\n".join(lines) + "\n"
