"""The peak memory of a real training run, to hold hift's planner (hift.plan) to: hift.fit, full
AdamW or LOMO (fused SGD in backward) on a randomly initialized model built from a config.

Used by tests/test_planner.py (CPU, predicted vs measured within 10%), bench/planner_check.py
(CPU, the table in bench/results/planner.md) and bench/llama7b_gpu.py (LLaMA-2-7B on a GPU).
"""
from __future__ import annotations

import ctypes
import gc
import time
from typing import Optional

import torch
from transformers import AutoModelForCausalLM

import hift
from hift.memory import host_peak_bytes, host_resident_bytes, reset_host_peak
from hift.plan.trace import DTYPES, llama_config


def measure(config, batch: int, seq: int, method: str = "hift", precision: str = "fp32",
            group_size: int = 1, prefetch: bool = True, offload: Optional[bool] = None,
            steps: int = 3, device: str = "cpu", seed: int = 0, recompute: bool = False,
            state_chunk_mib: Optional[float] = None, moment_dtype: str = "fp32",
            master_format: str = "auto", state_store: str = "host", state_dir: Optional[str] = None) -> dict:
    """Train a randomly initialized model built from `config` for `steps` steps (hift: one cycle,
    every group once; the state options as fit() takes them) and return the
    peak memory above the loaded model (CPU: VmHWM above VmRSS; CUDA: max_memory_allocated
    above memory_allocated) and the median step time. Run it in a fresh process on the CPU,
    with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536), for a clean number."""
    if isinstance(config, (str, dict)):
        config = llama_config(config)
    dev = torch.device(device)
    torch.manual_seed(seed)
    dtype = DTYPES[precision]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the run's dtype: no fp32 copy of a 7B model first
    try:
        with dev:
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": (ids := torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(dev)),
                "labels": ids} for _ in range(steps)]
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        reset_host_peak()
        base = host_resident_bytes()
    times = []
    if method == "hift":
        # one full cycle, so that the group the planner names as the peak does train
        result = hift.fit(model, batches, lr=1e-5, num_cycles=1, precision=precision, memory="manual",
                          group_size=group_size, prefetch=prefetch, offload=offload, progress=False,
                          order="top_down", lr_schedule="constant", log_every=steps,
                          recompute_activations=recompute, state_chunk_mib=state_chunk_mib,
                          moment_dtype=moment_dtype, master_format=master_format,
                          state_store=state_store, state_dir=state_dir)
        times = result.step_seconds
    else:
        params = list(model.parameters())
        if method == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        elif method == "lomo":
            def apply(p):
                p.data.add_(p.grad.to(p.dtype), alpha=-1e-3)
                p.grad = None
            for p in params:
                p.register_post_accumulate_grad_hook(apply)
        else:
            raise ValueError(f"unknown method {method!r}")
        for b in batches:
            tick = time.perf_counter()
            loss = model(**b).loss
            loss.backward()
            if method == "adamw":
                opt.step()
                opt.zero_grad(set_to_none=True)
            del loss
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - tick)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        reserved = torch.cuda.max_memory_reserved(dev)
    else:
        peak = host_peak_bytes() - base
        reserved = 0
    times = sorted(times[1:] or times)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(method=method, peak_above_model=peak, weights=weights, reserved=reserved,
                median_step_seconds=times[len(times) // 2] if times else 0.0)
