"""A LLaMA-2-7B-shaped model (random weights, bf16) trains a few hift steps on a machine without a
GPU and with less RAM than full AdamW would need, its optimizer state resting on disk
(state_store="disk"). Measures peak RSS, step times and the state's I/O.

    python bench/llama7b_disk_cpu.py --state-dir /var/tmp/hift-state [--steps 4] [--seq 64]
        [--moments fp32|bf16] [--out bench/results/llama7b_disk_cpu.md]

Full AdamW there would hold bf16 weights (13.5 GB), fp32 masters and two fp32 moments
(80.9 GB) and grads (13.5 GB): about 108 GB. hift holds the weights, one group's grads, and at
most two groups' state in staging buffers; the rest rests in sparse files under --state-dir.
The order is top_down (the head trains first), so a few steps backpropagate through few blocks:
this measures memory and I/O, not how fast a 7B model learns on two cores.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def io_bytes() -> tuple[int, int]:
    """Bytes this process has read from and written to storage (/proc/self/io)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def llama7b_bf16():
    """LLaMA-2-7B's shape with random weights, made in bf16 from the start (an fp32 copy would
    not fit): built on the meta device, then materialized and initialized tensor by tensor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                         max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norm weights
            else:
                p.normal_(0.0, 0.02, generator=generator)
    # the rotary embedding's buffers are computed, not initialized: make that module anew on the CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--state-dir", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--moments", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "llama7b_disk_cpu.md"))
    args = p.parse_args(argv)

    from hift import fit
    from hift.memory import host_peak_bytes

    start = time.perf_counter()
    model = llama7b_bf16()
    built = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"model built in {built:.0f} s: {weights / GB:.2f} GB of bf16 weights, peak RSS "
          f"{host_peak_bytes() / GB:.2f} GB", flush=True)

    ids = torch.randint(0, 32000, (1, args.seq), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "labels": ids}]
    steps, io_before = [], io_bytes()

    def on_step(event):
        now = time.perf_counter()
        read, written = io_bytes()
        steps.append(dict(step=event.step, group=event.group, seconds=now - on_step.last,
                          read=read - on_step.io[0], written=written - on_step.io[1],
                          rss_peak=host_peak_bytes()))
        on_step.last, on_step.io = now, (read, written)
        s = steps[-1]
        print(f"step {s['step']} group {s['group']}: {s['seconds']:.1f} s, read {s['read'] / GB:.2f} GB, "
              f"wrote {s['written'] / GB:.2f} GB, peak RSS {s['rss_peak'] / GB:.2f} GB", flush=True)

    on_step.last, on_step.io = time.perf_counter(), io_before
    result = fit(model, batches, max_steps=args.steps, lr=1e-5, order="top_down", progress=False,
                 state_store="disk", state_dir=args.state_dir, moment_dtype=args.moments, log_every=1,
                 on_step=on_step)
    peak = host_peak_bytes()
    state_bytes = sum(f.stat().st_size for f in Path(args.state_dir).glob("chunk-*.bin"))
    on_disk = sum(f.stat().st_blocks * 512 for f in Path(args.state_dir).glob("chunk-*.bin"))
    full_adamw = 8 * weights  # per parameter: bf16 weight and grad, fp32 master and two moments (2+2+12 B)

    lines = [
        "# LLaMA-2-7B shape, bf16, hift with its state on disk, CPU only",
        "",
        f"- date: {datetime.date.today()}, machine: {cpu_model()}, "
        f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU",
        f"- command: `{' '.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}`",
        f"- batch 1 x {args.seq} tokens, moments {args.moments}, top_down, {args.steps} steps "
        f"(of {result.num_groups} groups)",
        "",
        "| what | value |",
        "|---|---|",
        f"| bf16 weights | {weights / GB:.2f} GB |",
        f"| peak RSS (VmHWM), whole process | **{peak / GB:.2f} GB** |",
        f"| full AdamW would need (weights, grads, fp32 master and moments) | {full_adamw / GB:.1f} GB |",
        f"| optimizer state, all groups (files' size) | {state_bytes / GB:.1f} GB |",
        f"| of it on disk after the run (sparse files: groups never trained hold no blocks) | {on_disk / GB:.2f} GB |",
        "",
        "| step | group | seconds | state read (GB) | state written (GB) | peak RSS so far (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for s in steps:
        lines.append(f"| {s['step']} | {s['group']} | {s['seconds']:.1f} | {s['read'] / GB:.2f} | "
                     f"{s['written'] / GB:.2f} | {s['rss_peak'] / GB:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
