"""Memory planner: the peak device memory of a hift run, and of full AdamW and LOMO, predicted
from a model config before any weight exists.

    hift plan                                  # LLaMA-2-7B and -13B, batch 1, seq 512, beside the papers
    hift plan --model llama-2-7b --precision bf16 --group-size 1 --no-prefetch
    hift plan --config my_llama.json --batch 4 --seq 1024
    hift plan --model ./my-model-dir                 # any causal LM family: its config.json

How the prediction is made
--------------------------
The model is built on the meta device (shapes, no storage). Its units and groups are found by
hift.groups exactly as fit() finds them (a forward on meta tensors). Activations are not
estimated from a formula: the planner runs the forward on the meta device under
torch.autograd.graph.saved_tensors_hooks and adds up the storages autograd saves for backward,
attributing each to the unit whose module was running. It does so twice: with every weight
trainable (each unit in its "trainable" mode), and with only the embeddings trainable (every
unit above in its "frozen" mode: its input needs a gradient, its weights do not, so a frozen
linear layer saves nothing). Attention is traced as a fused kernel (flash / memory-efficient
SDPA, as on a GPU and on the CPU): it saves q, k, v, its output and a per-row log-sum-exp.

Peak = weights + optimizer state on the device + the largest point of the backward sweep: the
backward walks the units from the top down; passing unit u, the activations of u and of every
unit below are still alive, the gradients of the trainable units at and above u exist, and u's
own backward needs a transient of three times its largest saved tensor (the gradient arriving
for it, a temporary of its backward such as softmax's exp(output), the gradient it passes on);
after u's backward its activations are freed and its gradients exist. For hift the sweep is taken for every group and the largest wins.

What is "the device"
--------------------
- GPU, offload on (hift's default there): the weights, the active group's gradients, and the
  store's device slots, which the active group's state enters during its own forward and
  backward. Every other group's state rests off the device (reported as `host` and `disk`, not
  in the total).
- CPU (offload off, hift's default there): every group's state is resident (host and device
  are one memory), so the prediction is the process's memory above the loaded model: every
  group's state + the sweep. This is what tests/test_planner.py measures (VmHWM above the
  resident size after the model is loaded, glibc's mmap threshold fixed so that freed tensors
  leave the resident set).

The optimizer state: formats and stores
---------------------------------------
The state's bytes come from the code that allocates them: the format is the one fit() picks
(hift.formats.master_format of the weight dtype and master_format, with moment_dtype; a bf16
run's master is the int16 remainder unless master_format="fp32"), and each group's state is
cut into chunks (state_chunk_mib) and laid out as hift.state.StateFormat lays a chunk out:
[master | exp_avg | exp_avg_sq], each section 16-byte aligned. Per parameter at rest: fp32
master + fp32 moments 12 B, remainder + fp32 moments 10 B, remainder + bf16 moments 6 B, fp32
weights (no master) 8 B or 4 B. Where it rests (hift.store), on a GPU:
- host store (offload): every group's state in host RAM, pinned in place (cudaHostRegister: no
  rounding, so no overhead beyond the bytes); 1 device slot of the largest chunk, 2 when a
  group is cut into several chunks (the next one comes in while one is updated).
- disk store: every group's state in files under state_dir (`disk`); host RAM holds only the
  staging buffers, each the largest chunk: 2 (the step's chunk and the next step's, read
  ahead), 3 when groups are cut into chunks; the device holds 2 slots of the largest chunk.
On a CPU everything is one memory: the host store's slots, or the disk store's staging buffers
(the update works on them in place), count in the total, and `host_ram` is the total.
Per step the active group's state is copied in and out: 2 x its bytes over PCIe (GPU), read
from and written to its files (disk store). Reported for the largest group, and per trained
parameter (2 x the bytes per element: 24 B with the fp32 master, 20 with the remainder, 12
with bf16 moments).

Full AdamW: weights + grads of every weight + exp_avg and exp_avg_sq (and an fp32 master for
bf16/fp16: the usual mixed-precision recipe) + activations. LOMO: weights + activations + the
one gradient alive at a time (fused SGD in backward: each gradient is applied and freed when
it is complete); in bf16/fp16 the update works on an fp32 copy of that one parameter.
Not modelled: gradient checkpointing, allocator fragmentation (max_memory_reserved - allocated),
CUDA context and library workspaces (cuBLAS), which do not count in max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from hift import formats
from hift.state import Chunk, StateFormat, chunk_bytes, chunk_numel, cut_into_chunks

GB = 1e9
GiB = 2**30
MiB = 2**20

# LLaMA-2 configs, written out (Touvron et al. 2023, the released config.json files).
LLAMA2 = {
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-2-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
}

# Published peak memory (GB) at batch 1, seq 512: HiFT paper (Liu et al. 2024), its LLaMA-2 tables.
PUBLISHED = {
    ("llama-2-7b", "hift", "bf16"): 16.87,
    ("llama-2-7b", "hift", "fp32"): 29.73,
    ("llama-2-13b", "hift", "bf16"): 31.0,  # "about 31 GB"
    ("llama-2-7b", "lomo", "bf16"): 21.57,
    ("llama-2-7b", "lomo", "fp32"): 60.06,
}
GOAL_7B_BYTES = 15 * GB  # this project's goal: 7B, bf16, prefetch on, under 15 GB

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_STORES = ("host", "disk")
# Targets for LLaMA-2-7B in bf16 (the issue "Optimizer state at 6 bytes per parameter and
# below, and a disk tier"): host RAM at most this many GB, by moments and store
HOST_RAM_TARGETS_7B = {("fp32", "host"): 68, ("bf16", "host"): 41, ("int8", "host"): 28, ("fp32", "disk"): 5,
                       ("bf16", "disk"): 5, ("int8", "disk"): 5}


@dataclass
class Breakdown:
    """Predicted peak device memory of one method, in bytes, by what holds it, and what the
    run holds beside it (host RAM, disk) and moves per step."""

    method: str
    weights: int = 0
    gradients: int = 0
    optimizer_resident: int = 0  # state the update of the active group reads and writes
    # a second device slot (hift: the next chunk's state copied in while this chunk is updated,
    # or the disk store's second slot); on a CPU the store's other buffers
    optimizer_in_flight: int = 0
    activations: int = 0  # saved for backward, plus the transient of the peak's backward step
    # host RAM beside the device (not in total): the resting state or the staging buffers; 0 on
    # a CPU, where everything is in the total
    host: int = 0
    disk: int = 0  # the state's files (disk store)
    pcie_per_step: int = 0  # state copied to the device and back in the largest group's step
    disk_io_per_step: int = 0  # state read from and written to disk in that step
    step_params: int = 0  # the parameters that step trains
    device: str = "cuda"
    state_format: str = ""  # e.g. "remainder master + fp32 moments, 10 B/param" (hift only)
    notes: list[str] = field(default_factory=list)

    @property
    def optimizer(self) -> int:
        return self.optimizer_resident + self.optimizer_in_flight

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def above_model(self) -> int:
        return self.total - self.weights

    @property
    def host_ram(self) -> int:
        """Host RAM at the peak: beside the device's total on a GPU; the total itself on a CPU."""
        return self.total if self.device == "cpu" else self.host

    @property
    def pcie_per_param(self) -> float:
        return self.pcie_per_step / self.step_params if self.step_params else 0.0

    def as_dict(self) -> dict:
        return dict(method=self.method, weights=self.weights, gradients=self.gradients,
                    optimizer_resident=self.optimizer_resident,
                    optimizer_in_flight=self.optimizer_in_flight, activations=self.activations,
                    host=self.host, total=self.total, above_model=self.above_model,
                    host_ram=self.host_ram, disk=self.disk, pcie_per_step=self.pcie_per_step,
                    pcie_per_param=self.pcie_per_param, disk_io_per_step=self.disk_io_per_step,
                    device=self.device, state_format=self.state_format, notes=self.notes)


# ------------------------------------------------------------------------------------------
# the model, on the meta device


def llama_config(name_or_dict):
    """A model config: a LLaMA-2 name of the planner's, a local model directory or config.json
    (any transformers family, read by AutoConfig: its model_type decides), or a dict of LLaMA
    fields."""
    from transformers import AutoConfig, LlamaConfig

    if isinstance(name_or_dict, str):
        if name_or_dict in LLAMA2:
            return LlamaConfig(**LLAMA2[name_or_dict])
        path = Path(name_or_dict)
        directory = path if path.is_dir() else path.parent
        if not (directory / "config.json").is_file() or (path.is_file() and path.name != "config.json"):
            raise ValueError(f"{name_or_dict} is neither one of the planner's models ({', '.join(LLAMA2)}) nor a "
                             "model directory with a config.json (a save_pretrained directory) nor its config.json")
        return AutoConfig.from_pretrained(str(directory))
    return LlamaConfig(**name_or_dict)


def meta_model(config, precision: str = "fp32") -> nn.Module:
    """A causal LM from a transformers config, on the meta device, in the run's weight dtype."""
    from transformers import AutoModelForCausalLM

    if isinstance(config, (str, dict)):
        config = llama_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(DTYPES[precision])


class _FusedAttention(torch.autograd.Function):
    """Stands in for SDPA while tracing: the saved tensors of a fused (flash) attention."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, *args, enable_gqa=False, **kwargs):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    return _FusedAttention.apply(query, key, value)


@dataclass
class UnitTrace:
    """Per unit (in forward order): its parameter count and the bytes autograd saves."""

    kinds: list[str]
    numels: list[int]
    largest_param: int  # numel of the largest single parameter
    unit_largest_param: list[int]  # numel of each unit's largest parameter
    trainable: list[int]  # saved bytes with every unit trainable
    frozen: list[int]  # saved bytes with the unit frozen, its input needing a gradient
    transient_trainable: list[int]
    transient_frozen: list[int]
    param_numels: list[list[int]] = None  # each unit's parameters' sizes (None: one per unit)

    def __post_init__(self):
        if self.param_numels is None:
            self.param_numels = [[n] for n in self.numels]


def _trace_saved(model, units, run, trainable_units: set[int]) -> tuple[list[int], list[int]]:
    unit_of = {}
    for i, unit in enumerate(units):
        for p in unit.params:
            unit_of[id(p)] = i
    for i, unit in enumerate(units):
        for p in unit.params:
            p.requires_grad_(i in trainable_units)
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    current = [0]
    saved: dict[int, tuple[int, int]] = {}  # storage -> (unit, bytes)

    def enter(module, _inputs):
        own = list(module.parameters(recurse=False))
        if own and id(own[0]) in unit_of:
            current[0] = unit_of[id(own[0])]

    def pack(t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in param_storages and key not in saved:
            saved[key] = (current[0], storage.nbytes())
        return t

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules()
             if any(True for _ in m.parameters(recurse=False))]
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        for h in hooks:
            h.remove()
    per_unit = [0] * len(units)
    largest = [0] * len(units)
    for unit, nbytes in saved.values():
        per_unit[unit] += nbytes
        largest[unit] = max(largest[unit], nbytes)
    # A unit's backward holds, besides what was saved, about three tensors the size of its
    # largest saved one: the gradient arriving for it, a temporary of its backward (softmax's
    # exp(output)), and the gradient it passes on.
    return per_unit, [3 * x for x in largest]


def trace_units(model: nn.Module, batch: int, seq: int) -> tuple[UnitTrace, list]:
    from hift.batches import compute_loss
    from hift.groups import detect_units

    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    inputs = {"input_ids": ids, "labels": ids}
    # (the config's use_cache stays as it is: with no cache transformers inspects position ids
    # for packed sequences, which needs values that meta tensors do not have)
    run = lambda: compute_loss(model, inputs)
    for p in model.parameters():
        p.requires_grad_(True)
    units = detect_units(model, run)
    trainable, t_transient = _trace_saved(model, units, run, set(range(len(units))))
    frozen, f_transient = _trace_saved(model, units, run, {0})
    for p in model.parameters():
        p.requires_grad_(True)
    trace = UnitTrace(kinds=[u.kind for u in units], numels=[u.numel for u in units],
                      largest_param=max(p.numel() for p in model.parameters()),
                      unit_largest_param=[max(p.numel() for p in u.params) for u in units],
                      param_numels=[[p.numel() for p in u.params] for u in units],
                      trainable=trainable, frozen=frozen,
                      transient_trainable=t_transient, transient_frozen=f_transient)
    return trace, units


# ------------------------------------------------------------------------------------------
# the backward sweep


def sweep(trace: UnitTrace, trainable: list[bool], grad_bytes_of: list[int],
          first_trainable: int, recompute_boundary: Optional[int] = None) -> tuple[int, int, int]:
    """(peak, activations at the peak incl. transient, gradients at the peak) of one backward.

    Units below `first_trainable` save nothing; trainable units save in their trainable mode,
    the others in their frozen mode. Walking down from the top unit, two points per unit u:
    during u's backward (activations of units <= u, u's transient, gradients of the trainable
    units above u) and after it (u's activations freed, its gradients made)."""
    n = len(trace.numels)
    saved = [0] * n
    transient = [0] * n
    for u in range(first_trainable, n):
        if trainable[u]:
            saved[u], transient[u] = trace.trainable[u], trace.transient_trainable[u]
        else:
            saved[u], transient[u] = trace.frozen[u], trace.transient_frozen[u]
        if recompute_boundary is not None and trace.kinds[u] == "block":
            # recomputed: the block keeps its input; its activations return during its backward
            saved[u], transient[u] = recompute_boundary, saved[u] + transient[u]
    best = (0, 0, 0)
    grads = 0
    for u in range(n - 1, first_trainable - 1, -1):
        during = sum(saved[: u + 1]) + transient[u]
        if during + grads > best[0]:
            best = (during + grads, during, grads)
        if trainable[u]:
            grads += grad_bytes_of[u]
        after = sum(saved[:u])
        if after + grads > best[0]:
            best = (after + grads, after, grads)
    return best


def make_group_ranges(n_units: int, group_size: int) -> list[range]:
    return [range(i, min(i + group_size, n_units)) for i in range(0, n_units, group_size)]


def update_temporaries(trace: UnitTrace, groups: list[range]) -> list[int]:
    """Bytes the update of each group allocates for itself: none with hift's fused kernels
    (hift._C); with the plain-torch reference ops (hift._C not built), the squared norm's and
    the AdamW denominator's fp32 temporaries, about two of the group's largest parameter."""
    from hift import ops

    if ops.HAS_EXTENSION and hasattr(torch.ops.hift, "fused_adamw_"):
        return [0] * len(groups)
    return [2 * 4 * max(trace.unit_largest_param[u] for u in g) for g in groups]


def state_format(precision: str, moment_dtype: str = "fp32", master_format: str = "auto") -> StateFormat:
    """The format fit() gives the state of a run in `precision` (as hift.engine builds it)."""
    return StateFormat(formats.master_format(DTYPES[precision], master_format), moment_dtype)


def describe_format(fmt: StateFormat) -> str:
    master = {"none": "no master (fp32 weights)", "fp32": "fp32 master", "remainder": "remainder master"}
    return f"{master[fmt.master]} + {fmt.moments} moments, {fmt.bytes_per_element:.4g} B/param"


def state_chunk_bytes(group_param_numels: list[list[int]], fmt: StateFormat,
                      chunk_mib: Optional[float] = None) -> list[list[int]]:
    """Each group's state chunks, in bytes, as hift.state.OptimizerState cuts and lays them out
    from its parameters' sizes: whole groups, or chunks of chunk_mib MiB (int8 moments cut a
    parameter between blocks), each with its 16-byte aligned sections."""
    max_numel = chunk_numel(fmt, chunk_mib)
    return [[chunk_bytes(Chunk(g, pieces), fmt) for pieces in cut_into_chunks(sizes, max_numel, fmt.block)]
            for g, sizes in enumerate(group_param_numels)]


def plan_hift(trace: UnitTrace, precision: str = "bf16", group_size: int = 1, prefetch: bool = True,
              offload: bool = True, state_chunk_mib: Optional[float] = None,
              recompute_boundary: Optional[int] = None, *, moment_dtype: str = "fp32",
              master_format: str = "auto", state_store: str = "host", device: str = "cuda") -> Breakdown:
    """recompute_boundary: the bytes of one block's input (batch x seq x hidden x weight
    bytes) when recompute_activations is on, else None. moment_dtype, master_format,
    state_store and state_chunk_mib as fit() takes them; device "cuda" or "cpu"."""
    if state_store not in STATE_STORES:
        raise ValueError(f"state_store must be one of {STATE_STORES}, got {state_store!r}")
    wbytes = DTYPES[precision].itemsize
    groups = make_group_ranges(len(trace.numels), group_size)
    group_numels = [sum(trace.numels[u] for u in g) for g in groups]
    grad_of = [n * wbytes for n in trace.numels]
    temporaries = update_temporaries(trace, groups)
    best = None
    for g, units in enumerate(groups):
        trainable = [u in units for u in range(len(trace.numels))]
        peak, acts, grads = sweep(trace, trainable, grad_of, units.start, recompute_boundary)
        # the update: every gradient of the group alive (activations gone), plus what the
        # update allocates for itself
        all_grads = sum(grad_of[u] for u in units)
        if all_grads + temporaries[g] > peak:
            peak, acts, grads = all_grads + temporaries[g], temporaries[g], all_grads
        if best is None or peak > best[0]:
            best = (peak, acts, grads, g)
    _, acts, grads, g_peak = best
    fmt = state_format(precision, moment_dtype, master_format)
    out = Breakdown("hift", weights=sum(trace.numels) * wbytes, gradients=grads, activations=acts,
                    device=device, state_format=describe_format(fmt))
    group_param_numels = [[n for u in g for n in trace.param_numels[u]] for g in groups]
    _place_state(out, state_chunk_bytes(group_param_numels, fmt, state_chunk_mib), group_numels,
                 offload, state_store, prefetch)
    out.notes.append(f"peak while training group {g_peak} of {len(groups)} "
                     f"({', '.join(trace.kinds[u] for u in groups[g_peak])})")
    return out


def _place_state(out: Breakdown, chunks: list[list[int]], group_numels: list[int], offload: bool,
                 state_store: str, prefetch: bool) -> None:
    """Fill in where the state's bytes are (device slots, host RAM, disk) and what moves per
    step, as hift.state and hift.store allocate them (see the module doc)."""
    state = [sum(c) for c in chunks]  # per group
    largest = max((b for c in chunks for b in c), default=0)  # each slot or staging buffer
    chunked = any(len(c) > 1 for c in chunks)
    on_cpu = out.device == "cpu"
    big = max(range(len(state)), key=state.__getitem__)  # the group whose step moves the most
    out.step_params = group_numels[big]
    slot_of = "a chunk" if chunked else "the largest group's state"
    where = f"state: {out.state_format}; "
    slots = 2 if chunked else 1  # device slots, whichever store
    if state_store == "disk":
        buffers = 3 if chunked else 2
        staging = buffers * largest
        out.disk, out.disk_io_per_step = sum(state), 2 * state[big]
        if on_cpu:  # no device slots: the update works on a staging buffer in place
            out.optimizer_resident, out.optimizer_in_flight = largest, staging - largest
        else:
            out.optimizer_resident, out.optimizer_in_flight = largest, (slots - 1) * largest
            out.host, out.pcie_per_step = staging, 2 * state[big]
        out.notes.append(where + "disk store: every group's state in files under state_dir "
                         f"({out.disk / GB:.2f} GB); host RAM holds {buffers} staging buffers of {slot_of} "
                         f"({largest / GiB:.2f} GiB each)"
                         + ("" if on_cpu else f"; {slots} device slot{'s' * (slots > 1)}")
                         + "; the next group's state is read ahead while a step computes")
    elif offload:
        if on_cpu:  # the slot logic runs with plain copies; slots and resting state share RAM
            out.optimizer_resident, out.optimizer_in_flight = sum(state), slots * largest
        else:
            out.optimizer_resident, out.optimizer_in_flight = largest, (slots - 1) * largest
            out.host, out.pcie_per_step = sum(state), 2 * state[big]
        out.notes.append(where + f"offload: {slots} device slot{'s' * (slots > 1)} of {slot_of} "
                         f"({largest / GiB:.2f} GiB); every group's state rests in host RAM"
                         + ("; the update streams the chunks through the slots" if chunked else
                            "; with prefetch it is copied in while the group's own forward and "
                            "backward run" if prefetch else ""))
    else:
        out.optimizer_resident = sum(state)
        out.notes.append(where + "offload off: every group's state is resident")


def plan_adamw(trace: UnitTrace, precision: str = "bf16") -> Breakdown:
    wbytes = DTYPES[precision].itemsize
    n = sum(trace.numels)
    grad_of = [x * wbytes for x in trace.numels]
    # The sweep ends at the bottom unit with every gradient alive, which also covers the update.
    _, acts, grads = sweep(trace, [True] * len(trace.numels), grad_of, 0)
    masters = 0 if precision == "fp32" else 4 * n
    out = Breakdown("adamw", weights=n * wbytes, gradients=grads, activations=acts,
                    optimizer_resident=8 * n + masters)
    out.notes.append("exp_avg + exp_avg_sq fp32" + ("" if precision == "fp32" else " + fp32 master"))
    return out


def plan_lomo(trace: UnitTrace, precision: str = "bf16") -> Breakdown:
    wbytes = DTYPES[precision].itemsize
    n = sum(trace.numels)
    units = len(trace.numels)

    def one_gradient(u: int) -> int:  # the one gradient alive just after a parameter of u is done
        numel = trace.unit_largest_param[u]
        extra = 0 if precision == "fp32" else 2 * numel * 4  # fp32 copies of grad and weight
        return numel * wbytes + extra

    peak, acts, grads = sweep(trace, [True] * units, [0] * units, 0)
    for u in range(units - 1, -1, -1):
        after = sum(trace.trainable[:u]) + trace.transient_trainable[u] // 3 + one_gradient(u)
        if after > peak:
            peak, acts, grads = after, after - one_gradient(u), one_gradient(u)
    out = Breakdown("lomo", weights=n * wbytes, gradients=grads, activations=acts)
    out.notes.append("fused SGD in backward: a gradient is applied and freed as soon as it is complete")
    return out


def block_input_bytes(model: nn.Module, batch: int, seq: int, precision: str) -> int:
    return batch * seq * model.config.hidden_size * DTYPES[precision].itemsize


def plan(config, batch: int, seq: int, precision: str = "bf16", group_size: int = 1,
         prefetch: bool = True, offload: bool = True, state_chunk_mib: Optional[float] = None,
         recompute: bool = False, *, moment_dtype: str = "fp32", master_format: str = "auto",
         state_store: str = "host", device: str = "cuda") -> dict[str, Breakdown]:
    model = meta_model(config, precision)
    trace, _ = trace_units(model, batch, seq)
    boundary = block_input_bytes(model, batch, seq, precision) if recompute else None
    return _plans(trace, boundary, precision, group_size, prefetch, offload, state_chunk_mib,
                  moment_dtype=moment_dtype, master_format=master_format, state_store=state_store,
                  device=device)


def _plans(trace: UnitTrace, recompute_boundary: Optional[int], precision: str, group_size: int,
           prefetch: bool, offload: bool, state_chunk_mib: Optional[float], **state) -> dict[str, Breakdown]:
    plans = {"hift": plan_hift(trace, precision, group_size, prefetch, offload, state_chunk_mib,
                               recompute_boundary, **state),
             "adamw": plan_adamw(trace, precision), "lomo": plan_lomo(trace, precision)}
    for b in plans.values():
        b.device = state["device"]
    return plans


# ------------------------------------------------------------------------------------------
# measured peaks, for validation (tests on the CPU, bench/gpu_check.sh on a GPU)


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
    import ctypes
    import gc
    import time

    from transformers import AutoModelForCausalLM

    import hift
    from hift.memory import host_peak_bytes, host_resident_bytes, reset_host_peak

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
        result = hift.fit(model, batches, lr=1e-5, num_cycles=1, precision=precision,
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


# ------------------------------------------------------------------------------------------
# `hift plan`


def _row(name: str, b: Breakdown, published: Optional[float] = None, unit: float = GB) -> str:
    pub = f"{published:.2f}" if published is not None else "-"
    return (f"| {name} | {b.weights / unit:.2f} | {b.gradients / unit:.2f} | {b.optimizer_resident / unit:.2f} "
            f"| {b.optimizer_in_flight / unit:.2f} | {b.activations / unit:.2f} | **{b.total / unit:.2f}** "
            f"| {pub} | {b.host_ram / unit:.2f} |")


HEADER = ("| method | weights | grads | optimizer (resident) | optimizer (in flight) | activations "
          "| total | published | host RAM |\n|---|---|---|---|---|---|---|---|---|")

# (master_format, moment_dtype, state_store): the rows of the formats table; the first is the
# layout before the remainder (an fp32 master), for reference
FORMAT_ROWS = [("fp32", "fp32", "host"), ("auto", "fp32", "host"), ("auto", "fp32", "disk"),
               ("auto", "bf16", "host"), ("auto", "bf16", "disk"), ("auto", "int8", "host"),
               ("auto", "int8", "disk")]
FORMAT_HEADER = ("| master | moments | store | state B/param | state on device | device peak | host RAM "
                 "| disk | PCIe per step | PCIe B/param | disk I/O per step |\n"
                 "|---|---|---|---|---|---|---|---|---|---|---|")


def formats_table(trace: UnitTrace, precision: str = "bf16", group_size: int = 1, prefetch: bool = True,
                  state_chunk_mib: Optional[float] = None, recompute_boundary: Optional[int] = None,
                  device: str = "cuda", name: Optional[str] = None) -> str:
    """hift's prediction per state format and store (GB = 1e9 bytes; per step: the largest
    group's, its state copied in and out)."""
    lines, seen, by_row = [FORMAT_HEADER], set(), {}
    for master, moments, store in FORMAT_ROWS:
        fmt = state_format(precision, moments, master)
        if (fmt, store) in seen:  # fp32 weights: "fp32" and "auto" are both no master
            continue
        seen.add((fmt, store))
        # the host store as fit uses it by default: offload on a GPU, resident on a CPU
        h = plan_hift(trace, precision, group_size, prefetch, device != "cpu", state_chunk_mib,
                      recompute_boundary, moment_dtype=moments, master_format=master, state_store=store,
                      device=device)
        by_row[master, moments, store] = h
        lines.append(f"| {fmt.master} | {moments} | {store} | {fmt.bytes_per_element:.4g} | {h.optimizer / GB:.2f} "
                     f"| **{h.total / GB:.2f}** | **{h.host_ram / GB:.2f}** | {h.disk / GB:.2f} "
                     f"| {h.pcie_per_step / GB:.2f} | {h.pcie_per_param:.1f} | {h.disk_io_per_step / GB:.2f} |")
    if name == "llama-2-7b" and precision == "bf16" and device == "cuda":
        met = []
        for (moments, store), target in HOST_RAM_TARGETS_7B.items():
            got = by_row["auto", moments, store].host_ram / GB
            met.append(f"{moments} moments, {store} store: {got:.2f} GB (at most {target}: "
                       f"{'met' if got <= target else 'NOT met'})")
        lines += ["", "Host RAM targets (the issue, LLaMA-2-7B bf16, predicted): " + "; ".join(met) + "."]
    return "\n".join(lines)


def _formats_notes() -> str:
    return ("master: what fit(master_format=...) gives bf16 weights (auto = remainder: the low 16 bits "
            "of the fp32 master beside the weight; fp32 = a full copy, the layout before the remainder). "
            "state on device: the store's device slots, each the largest chunk (whole groups unless "
            "state_chunk_mib): 1, or 2 when groups are cut into chunks, whichever the store. host RAM: "
            "host store, every group's resting state (pinned in place: no overhead); disk store, its "
            "staging buffers only (2 of the largest chunk, 3 when groups are cut into chunks). disk: the "
            "state's files under state_dir. PCIe / disk I/O per step: the largest group's state copied in "
            "and out (2 x its bytes); per trained parameter, 2 x the bytes per element at rest. On a CPU "
            "(--cpu) host RAM is the whole total and nothing crosses PCIe.")


def published_table(batch: int = 1, seq: int = 512, group_size: int = 1, prefetch: bool = True) -> str:
    lines = [f"Predicted peak device memory (GB = 1e9 bytes), batch {batch}, seq {seq}, "
             f"group size {group_size}, prefetch {'on' if prefetch else 'off'}, offload on; "
             "published: HiFT paper (Liu et al. 2024), LLaMA-2 tables. hift's state in fit's default "
             "format: for bf16 weights the remainder master and fp32 moments (10 B/param at rest; an fp32 "
             "master was 12), for fp32 weights fp32 moments (8 B/param).", ""]
    for name in LLAMA2:
        lines += [f"### {name}", "", HEADER]
        for precision in ("bf16", "fp32"):
            model = meta_model(name, precision)
            trace, _ = trace_units(model, batch, seq)
            boundary = block_input_bytes(model, batch, seq, precision)
            plans = {"hift": plan_hift(trace, precision, group_size, prefetch),
                     "lomo": plan_lomo(trace, precision), "adamw": plan_adamw(trace, precision)}
            plans["hift-chunked"] = plan_hift(trace, precision, group_size, prefetch, state_chunk_mib=256)
            plans["hift-chunked-recompute"] = plan_hift(trace, precision, group_size, prefetch,
                                                        state_chunk_mib=256, recompute_boundary=boundary)
            for method, b in plans.items():
                label = f"{method} {'mixed (bf16)' if precision == 'bf16' else 'fp32'}"
                lines.append(_row(label, b, PUBLISHED.get((name, method, precision))))
            if precision == "bf16":
                h, lean, bf16_trace = plans["hift"], plans["hift-chunked-recompute"], trace
            del model
        lines.append("")
        lines.append("hift bf16: " + "; ".join(h.notes))
        lines.append("hift-chunked: fit(..., state_chunk_mib=256); hift-chunked-recompute: also "
                     "recompute_activations=True (the frozen blocks above the active group keep only "
                     "their inputs and run again in backward).")
        if name == "llama-2-7b":
            verdict = lambda b: "under" if b.total < GOAL_7B_BYTES else "over"
            lines.append(f"Goal, 7B bf16 with prefetch under 15 GB: {h.total / GB:.2f} GB predicted with the "
                         f"defaults ({verdict(h)}), {lean.total / GB:.2f} GB with state_chunk_mib=256 and "
                         f"recompute_activations=True ({verdict(lean)}). " + _what_it_takes(h))
        lines += ["", f"#### {name} bf16: hift by state format and store", "",
                  formats_table(bf16_trace, "bf16", group_size, prefetch, name=name), ""]
    lines.append(_formats_notes())
    return "\n".join(lines)


def _what_it_takes(h: Breakdown) -> str:
    fixed = h.weights + h.gradients + h.activations
    return (f"The bf16 weights alone are {h.weights / GB:.2f} GB; weights + gradients + activations at "
            f"the peak are {fixed / GB:.2f} GB before any optimizer state, and one slot of the largest "
            f"group's state ({h.state_format}) is {h.optimizer_resident / GB:.2f} GB. "
            "state_chunk_mib=256 streams that state through two 256 MiB slots instead, and "
            "recompute_activations=True keeps only the inputs of the frozen blocks above the active "
            f"group instead of their {h.activations / GB:.2f} GB: see the hift-chunked-recompute row.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hift plan", description="Predict the peak device memory of a hift "
                                "run (and of full AdamW and LOMO) from a model config, without weights; and "
                                "hift's host RAM, disk and PCIe traffic per state format and store.")
    p.add_argument("--model", default=None, help=f"one of {sorted(LLAMA2)}, or a local model directory "
                   "(any causal LM family: its config.json is read, no weights); default: the published table")
    p.add_argument("--config", default=None, help="a model's config.json (any causal LM family)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--precision", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false")
    p.add_argument("--recompute", action="store_true",
                   help="predict fit(..., recompute_activations=True)")
    p.add_argument("--state-chunk-mib", type=float, default=None,
                   help="predict fit(..., state_chunk_mib=N): the state streamed in chunks of N MiB")
    p.add_argument("--moment-dtype", default="fp32", choices=formats.MOMENT_DTYPES,
                   help="predict fit(..., moment_dtype=...)")
    p.add_argument("--master-format", default="auto", choices=("auto", "remainder", "fp32"),
                   help="predict fit(..., master_format=...) (auto: the remainder for bf16 weights)")
    p.add_argument("--state-store", default="host", choices=STATE_STORES,
                   help="predict fit(..., state_store=...): host RAM, or files under state_dir")
    p.add_argument("--cpu", action="store_true", help="predict a CPU run (offload off: every group's "
                   "state resident, unless it rests on disk; the total above the model is the process's growth)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.model is None and args.config is None:
        print(published_table(args.batch, args.seq, args.group_size, args.prefetch))
        return 0
    config = args.config or args.model
    device = "cpu" if args.cpu else "cuda"
    try:
        model = meta_model(config, args.precision)
    except ValueError as err:
        p.error(str(err))
    trace, _ = trace_units(model, args.batch, args.seq)
    boundary = block_input_bytes(model, args.batch, args.seq, args.precision) if args.recompute else None
    plans = _plans(trace, boundary, args.precision, args.group_size, args.prefetch, not args.cpu,
                   args.state_chunk_mib, moment_dtype=args.moment_dtype, master_format=args.master_format,
                   state_store=args.state_store, device=device)
    if args.json:
        print(json.dumps({k: v.as_dict() for k, v in plans.items()}, indent=1))
        return 0
    print(f"{config}: batch {args.batch}, seq {args.seq}, {args.precision}, group size {args.group_size}, "
          f"prefetch {'on' if args.prefetch else 'off'}, {'CPU (offload off)' if args.cpu else 'offload on'}, "
          f"{args.state_store} store (GB = 1e9 bytes)\n")
    print(HEADER)
    for name, b in plans.items():
        print(_row(name, b, None if args.cpu else PUBLISHED.get((args.model, name, args.precision))))
    print()
    for name, b in plans.items():
        for note in b.notes:
            print(f"{name}: {note}")
    h = plans["hift"]
    print(f"hift: host RAM {h.host_ram / GB:.2f} GB, disk {h.disk / GB:.2f} GB, per step (largest group) "
          f"PCIe {h.pcie_per_step / GB:.2f} GB ({h.pcie_per_param:.1f} B/param), disk I/O "
          f"{h.disk_io_per_step / GB:.2f} GB")
    print(f"\nhift by state format and store ({args.precision}):\n")
    print(formats_table(trace, args.precision, args.group_size, args.prefetch, args.state_chunk_mib, boundary,
                        device, name=args.model))
    print("\n" + _formats_notes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
