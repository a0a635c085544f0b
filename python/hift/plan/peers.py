"""The peers hift on FSDP2 is set beside (bench/fsdp_plan.py): full fine-tuning with AdamW on
FSDP2 (as torchtune's full_finetune_distributed runs it) and DeepSpeed ZeRO-3, each with its CPU
offload, from the same trace, the same FSDP2 model (hift.plan.fsdp) and the same Machine.

Every unit trains every step, so every unit's weights are all-gathered in forward and again in
backward, and every gradient is reduce-scattered; the optimizer updates every parameter's shard.
- FSDP2 + AdamW, bf16 (torchtune's default, dtype: bf16): bf16 weights and gradients, and
  torch.optim.AdamW's moments in the parameters' dtype: 2 + 2 + 4 B per parameter, sharded.
- FSDP2 + AdamW, fp32 master: fp32 sharded parameters, gathered in bf16 (MixedPrecisionPolicy
  param_dtype bf16, reduce_dtype fp32): 4 + 4 (fp32 gradient shards) + 8 (fp32 moments) = 16 B.
- Their CPU offload (torchtune's fsdp_cpu_offload, FSDP2's CPUOffloadPolicy): the shards, their
  gradients and the state rest on the host and the whole optimizer step runs there; every step
  copies every shard to the device in forward and in backward, and every gradient shard back.
- DeepSpeed ZeRO-3, from its own estimator of model states
  (deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs): 18 B per parameter over
  the ranks (bf16 weights, fp32 gradients, fp32 master and moments) plus 4 B per parameter of the
  largest layer (its bf16 weights and gradient gathered). offload_optimizer (ZeRO-Offload): 2 B
  per parameter on the device, 16 on the host; with offload_param too (ZeRO-Infinity): only the
  largest layer on the device, 18 B on the host. Its estimator's 1.5x host buffer factor is not
  applied. Per step: all-gathers forward and backward and a reduce-scatter of every gradient in
  bf16; offloaded, every gradient shard D2H and every weight shard H2D (once after the CPU update
  with offload_optimizer; in forward and in backward with offload_param).
Activations are the trace's, every unit trainable (recompute: activation checkpointing per
block, as recompute_activations does for hift), the same for every method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hift.plan.fsdp import Geometry, LossTrace, Machine, StepBytes, StepTime, fsdp_sweep
from hift.plan.predict import GB, saved_bytes, sweep
from hift.plan.trace import UnitTrace

PEERS = ("fsdp2-adamw-bf16", "fsdp2-adamw-bf16+offload", "fsdp2-adamw-fp32", "fsdp2-adamw-fp32+offload",
         "zero3", "zero3+offload-optimizer", "zero3+offload-all")
LABELS = {
    "fsdp2-adamw-bf16": "FSDP2 + AdamW, bf16 (torchtune)",
    "fsdp2-adamw-bf16+offload": "FSDP2 + AdamW, bf16, CPU offload (torchtune fsdp_cpu_offload)",
    "fsdp2-adamw-fp32": "FSDP2 + AdamW, fp32 master and moments",
    "fsdp2-adamw-fp32+offload": "FSDP2 + AdamW, fp32 master and moments, CPU offload",
    "zero3": "DeepSpeed ZeRO-3",
    "zero3+offload-optimizer": "DeepSpeed ZeRO-3, offload_optimizer (ZeRO-Offload)",
    "zero3+offload-all": "DeepSpeed ZeRO-3, offload_param + offload_optimizer (ZeRO-Infinity, CPU)",
}


@dataclass
class PeerPlan:
    """One peer's step on `ranks` GPUs: one rank's device peak, the host RAM per node, the bytes it
    moves, its FLOPs and time."""

    method: str
    ranks: int
    device_peak: int
    host_per_node: int
    step: StepBytes
    flops: float
    time: StepTime
    tokens: int

    def hide_tokens(self, link: str = "pcie") -> Optional[float]:
        moved = getattr(self.time, link)
        return moved / (self.time.compute / self.tokens) if moved and self.time.compute else None


def plan_peer(method: str, trace: UnitTrace, tokens: int, ranks: int = 1, *, ranks_per_node: Optional[int] = None,
              recompute_boundary: Optional[int] = None, machine: Machine = Machine()) -> PeerPlan:
    """One of PEERS on `ranks` GPUs (ranks_per_node: None, every rank on one node); a bf16 model."""
    if method not in PEERS:
        raise ValueError(f"method must be one of {PEERS}, got {method!r}")
    per_node = ranks if ranks_per_node is None else ranks_per_node
    geo = Geometry.of(trace, ranks)
    n_units = len(trace.numels)
    everything = set(range(n_units))
    saved, transient = saved_bytes(trace, [True] * n_units, 0, recompute_boundary)
    local, padded = sum(geo.local), sum(geo.padded)
    offload = "+offload" in method
    step = StepBytes(group=0, ranks=ranks)
    if ranks > 1:
        step.all_gather_forward = step.all_gather_backward = 2 * padded
    matmul = sum(n for kind, n in zip(trace.kinds, trace.numels) if kind != "embeddings")
    flops = 6.0 * matmul * tokens + (2.0 * matmul * tokens if recompute_boundary is not None else 0.0)
    if method.startswith("fsdp2"):
        fp32 = "fp32" in method
        shard, state = (4, 8) if fp32 else (2, 4)  # the sharded parameter's bytes; AdamW's moments
        reduce = 4 if fp32 and ranks > 1 else 2
        peak = fsdp_sweep(geo, 2, reduce, everything, 0, saved, transient, ranks=ranks, offload_weights=offload,
                          shard_bytes=shard, loss=LossTrace.of(trace)).total
        if ranks > 1:
            step.reduce_scatter = reduce * padded
        if offload:
            device, host = peak, (2 * shard + state) * local  # shards, their gradients, the state
            step.weights_h2d_forward = step.weights_h2d_backward = shard * local
            step.grads_d2h = shard * local
            update = (2 * state + 3 * shard) * local
        else:
            device, host, update = peak + (shard + state) * local, 0, 0
    else:
        acts = sweep(trace, [True] * n_units, [0] * n_units, 0, recompute_boundary)[1]
        largest_layer = 4 * trace.largest_param
        total = sum(trace.numels)
        if ranks > 1:
            step.reduce_scatter = 2 * padded
        if method == "zero3":
            device, host, update = 18 * total // ranks + largest_layer + acts, 0, 0
        elif method == "zero3+offload-optimizer":
            device, host = 2 * total // ranks + largest_layer + acts, 16 * total // ranks
            step.grads_d2h, step.weights_h2d_forward = 2 * local, 2 * local  # the updated weights come back once
            update = (2 * 12 + 4 + 2) * local  # fp32 master and moments read and written, fp32 gradient, bf16 out
        else:
            device, host = largest_layer + acts, 18 * total // ranks
            step.weights_h2d_forward = step.weights_h2d_backward = step.grads_d2h = 2 * local
            update = (2 * 12 + 4 + 2) * local
    time = StepTime(compute=flops / (machine.gpu_tflops * 1e12),
                    pcie=max(step.h2d, step.d2h) / (machine.pcie_gbps * GB),
                    network=step.wire / (machine.network_gbps * GB), host_update=machine.host_seconds(update, per_node))
    return PeerPlan(method, ranks, device, per_node * host, step, flops, time, tokens)
