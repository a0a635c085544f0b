"""Prediction: the peak device memory of a hift run, and of full AdamW and LOMO, from a
trace (hift.plan.trace), and where hift's optimizer state rests and what it moves per step.

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
  leave the resident set; bench/planner_measure.py).

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

Data parallel (ranks > 1, hift.distributed): one rank's share, the largest: its
shard of every group's state, cut as GroupLayout and shard_chunks cut it, and the bytes it hands
to the active group's reduce-scatter and all-gather (both held to what ranks have, to the byte,
in tests/test_distributed.py). The update's extra device buffers (the flat gradient buffer, the
reduced shard, the flat buffer the weights are gathered into) come from that code's
allocations; on a CPU, gloo also stages a copy of the flat buffer in each collective. Measured on
the CPU with 2 gloo ranks (tests/test_planner.py, within 10% as the one-process cases).
AdamW under DDP: all of the state on every rank, and an
all-reduce of every gradient per step.

Full AdamW: weights + grads of every weight + exp_avg and exp_avg_sq (and an fp32 master for
bf16/fp16: the usual mixed-precision recipe) + activations. LOMO: weights + activations + the
one gradient alive at a time (fused SGD in backward: each gradient is applied and freed when
it is complete); in bf16/fp16 the update works on an fp32 copy of that one parameter.
Not modelled: gradient checkpointing, allocator fragmentation (max_memory_reserved - allocated),
CUDA context and library workspaces (cuBLAS), which do not count in max_memory_allocated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from hift import formats
from hift.distributed import GroupLayout, shard_chunks
from hift.plan.trace import UnitTrace, block_input_bytes, meta_model, trace_units
from hift.precision import DTYPES
from hift.state import Chunk, StateFormat, chunk_bytes, chunk_numel, cut_into_chunks

GB = 1e9
GiB = 2**30
STATE_STORES = ("host", "disk")


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
    # weights in flight at the peak where they are placed (hift.plan.fsdp): units all-gathered by
    # FSDP2, or copied in from the host; `weights` is then what rests on the device (the local
    # shards, or nothing with the weights offloaded)
    gathered: int = 0
    # host RAM beside the device (not in total): the resting state or the staging buffers; 0 on
    # a CPU, where everything is in the total
    host: int = 0
    disk: int = 0  # the state's files (disk store)
    pcie_per_step: int = 0  # state copied to the device and back in the largest group's step
    # data parallel: bytes this rank hands to collectives in that step (hift: the group's
    # reduce-scatter and all-gather; DDP: the all-reduce of every gradient), as Traffic counts them
    network_per_step: int = 0
    ranks: int = 1
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
        return self.weights + self.gathered + self.gradients + self.optimizer + self.activations

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
                    network_per_step=self.network_per_step, ranks=self.ranks,
                    device=self.device, state_format=self.state_format, notes=self.notes,
                    **({"gathered": self.gathered} if self.gathered else {}))


# ------------------------------------------------------------------------------------------
# the backward sweep


def saved_bytes(trace: UnitTrace, trainable: list[bool], first_trainable: int,
                recompute_boundary: Optional[int] = None) -> tuple[list[int], list[int]]:
    """Per unit: (bytes it saves for backward, its backward's transient). Units below
    `first_trainable` save nothing; trainable units save in their trainable mode, the others in
    their frozen mode; with recompute (recompute_boundary: one block's input bytes) a block keeps
    its input, and its activations return during its own backward."""
    n = len(trace.numels)
    saved = [0] * n
    transient = [0] * n
    for u in range(first_trainable, n):
        if trainable[u]:
            saved[u], transient[u] = trace.trainable[u], trace.transient_trainable[u]
        else:
            saved[u], transient[u] = trace.frozen[u], trace.transient_frozen[u]
        if recompute_boundary is not None and trace.kinds[u] == "block":
            saved[u], transient[u] = recompute_boundary, saved[u] + transient[u]
    return saved, transient


def sweep(trace: UnitTrace, trainable: list[bool], grad_bytes_of: list[int],
          first_trainable: int, recompute_boundary: Optional[int] = None) -> tuple[int, int, int]:
    """(peak, activations at the peak incl. transient, gradients at the peak) of one backward.

    Units below `first_trainable` save nothing; trainable units save in their trainable mode,
    the others in their frozen mode. Walking down from the top unit, two points per unit u:
    during u's backward (activations of units <= u, u's transient, gradients of the trainable
    units above u) and after it (u's activations freed, its gradients made)."""
    n = len(trace.numels)
    saved, transient = saved_bytes(trace, trainable, first_trainable, recompute_boundary)
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
                      chunk_mib: Optional[float] = None, ranks: int = 1) -> list[list[int]]:
    """Each group's state chunks, in bytes, as hift.state.OptimizerState cuts and lays them out
    from its parameters' sizes: whole groups, or chunks of chunk_mib MiB (a parameter cut at
    multiples of fmt.cut), each piece 16-byte aligned in its sections. With ranks > 1, the shard
    of the rank that rests the most, as hift.distributed cuts it (shards are equal up to the
    padding that starts each parameter on a norm block, so that may be any rank)."""
    max_numel = chunk_numel(fmt, chunk_mib)
    if ranks == 1:
        return [[chunk_bytes(Chunk(g, pieces), fmt) for pieces in cut_into_chunks(sizes, max_numel, fmt.cut)]
                for g, sizes in enumerate(group_param_numels)]
    layouts = [GroupLayout.of(sizes, ranks, fmt.cut) for sizes in group_param_numels]
    shares = [[[chunk_bytes(Chunk(g, pieces), fmt) for pieces in shard_chunks(layout, rank, max_numel, fmt.cut)]
               for g, layout in enumerate(layouts)] for rank in range(ranks)]
    return max(shares, key=lambda share: sum(map(sum, share)))


def plan_hift(trace: UnitTrace, precision: str = "bf16", group_size: int = 1, prefetch: bool = True,
              offload: bool = True, state_chunk_mib: Optional[float] = None,
              recompute_boundary: Optional[int] = None, *, moment_dtype: str = "fp32",
              master_format: str = "auto", state_store: str = "host", device: str = "cuda", ranks: int = 1,
              reduce_dtype: str = "fp32") -> Breakdown:
    """recompute_boundary: the bytes of one block's input (batch x seq x hidden x weight
    bytes) when recompute_activations is on, else None. moment_dtype, master_format,
    state_store, state_chunk_mib and reduce_dtype as fit() takes them; device "cuda" or "cpu";
    ranks: data parallel (hift.distributed), one rank's share (the largest)."""
    if state_store not in STATE_STORES:
        raise ValueError(f"state_store must be one of {STATE_STORES}, got {state_store!r}")
    wbytes = DTYPES[precision].itemsize
    fmt = state_format(precision, moment_dtype, master_format)
    groups = make_group_ranges(len(trace.numels), group_size)
    group_numels = [sum(trace.numels[u] for u in g) for g in groups]
    group_param_numels = [[n for u in g for n in trace.param_numels[u]] for g in groups]
    grad_of = [n * wbytes for n in trace.numels]
    temporaries = update_temporaries(trace, groups)
    best, network = None, [0] * len(groups)
    for g, units in enumerate(groups):
        trainable = [u in units for u in range(len(trace.numels))]
        peak, acts, grads = sweep(trace, trainable, grad_of, units.start, recompute_boundary)
        # the update: every gradient of the group alive (activations gone), plus what the
        # update allocates for itself
        all_grads = sum(grad_of[u] for u in units)
        update = [(all_grads + temporaries[g], temporaries[g], all_grads)]
        if ranks > 1:
            # hift.distributed: the flat buffer the gradients are copied into (each freed as
            # it is copied), the rank's reduced shard through the update, then the flat buffer
            # the weights are all-gathered into (counted as gradients: they are the reduction's)
            layout = GroupLayout.of(group_param_numels[g], ranks, fmt.cut)
            flat, shard = layout.numel * DTYPES[reduce_dtype].itemsize, layout.shard * DTYPES[reduce_dtype].itemsize
            gathered = layout.numel * wbytes
            network[g] = flat + gathered
            # gloo (the CPU's backend) stages a whole copy of the flat buffer in each of the two
            # collectives (measured: tests/test_planner.py); nccl's buffers are its own, outside
            # the caching allocator
            staged = 2 if device == "cpu" else 1
            held = [all_grads + flat, staged * flat + shard, shard + temporaries[g], shard + staged * gathered]
            update = [(b, temporaries[g] if k == 2 else 0, b - (temporaries[g] if k == 2 else 0))
                      for k, b in enumerate(held)]
        for total, update_acts, update_grads in update:
            if total > peak:
                peak, acts, grads = total, update_acts, update_grads
        if best is None or peak > best[0]:
            best = (peak, acts, grads, g)
    _, acts, grads, g_peak = best
    out = Breakdown("hift", weights=sum(trace.numels) * wbytes, gradients=grads, activations=acts,
                    device=device, state_format=describe_format(fmt), ranks=ranks)
    chunks = state_chunk_bytes(group_param_numels, fmt, state_chunk_mib, ranks)
    _place_state(out, chunks, group_numels, offload, state_store, prefetch)
    out.network_per_step = max(network)
    out.notes.append(f"peak while training group {g_peak} of {len(groups)} "
                     f"({', '.join(trace.kinds[u] for u in groups[g_peak])})")
    if ranks > 1:
        everyone = sum(map(sum, chunks)) * ranks
        out.notes.append(f"data parallel, {ranks} ranks (the largest rank's share shown): each rests "
                         f"1/{ranks} of every group's state, {everyone / GB:.2f} GB on all ranks together; in the "
                         f"largest group's step a rank hands {out.network_per_step / GB:.2f} GB to its "
                         f"reduce-scatter ({reduce_dtype} gradients) and all-gather (the weights)")
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


def plan_adamw(trace: UnitTrace, precision: str = "bf16", ranks: int = 1) -> Breakdown:
    wbytes = DTYPES[precision].itemsize
    n = sum(trace.numels)
    grad_of = [x * wbytes for x in trace.numels]
    # The sweep ends at the bottom unit with every gradient alive, which also covers the update.
    _, acts, grads = sweep(trace, [True] * len(trace.numels), grad_of, 0)
    masters = 0 if precision == "fp32" else 4 * n
    out = Breakdown("adamw", weights=n * wbytes, gradients=grads, activations=acts,
                    optimizer_resident=8 * n + masters)
    out.notes.append("exp_avg + exp_avg_sq fp32" + ("" if precision == "fp32" else " + fp32 master"))
    if ranks > 1:
        out.ranks, out.network_per_step = ranks, n * wbytes
        out.notes.append(f"DDP, {ranks} ranks: every rank holds all of the state; per step it all-reduces every "
                         f"gradient ({out.network_per_step / GB:.2f} GB); DDP's buckets (not in this total) "
                         "hold one more copy of the gradients")
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


def plan(config, batch: int, seq: int, precision: str = "bf16", group_size: int = 1,
         prefetch: bool = True, offload: bool = True, state_chunk_mib: Optional[float] = None,
         recompute: bool = False, *, moment_dtype: str = "fp32", master_format: str = "auto",
         state_store: str = "host", device: str = "cuda", ranks: int = 1,
         reduce_dtype: str = "fp32") -> dict[str, Breakdown]:
    model = meta_model(config, precision)
    trace, _ = trace_units(model, batch, seq)
    boundary = block_input_bytes(model, batch, seq, precision) if recompute else None
    return plans_from_trace(trace, boundary, precision, group_size, prefetch, offload, state_chunk_mib,
                            moment_dtype=moment_dtype, master_format=master_format,
                            state_store=state_store, device=device, ranks=ranks, reduce_dtype=reduce_dtype)


def plans_from_trace(trace: UnitTrace, recompute_boundary: Optional[int], precision: str,
                     group_size: int, prefetch: bool, offload: bool, state_chunk_mib: Optional[float],
                     **state) -> dict[str, Breakdown]:
    """hift, full AdamW and LOMO from one trace; `state`: hift's state options, the device and
    the ranks (data parallel: AdamW under DDP; LOMO has no data parallel of its own and is left
    out)."""
    ranks = state.get("ranks", 1)
    plans = {"hift": plan_hift(trace, precision, group_size, prefetch, offload, state_chunk_mib,
                               recompute_boundary, **state),
             "adamw": plan_adamw(trace, precision, ranks)}
    if ranks == 1:
        plans["lomo"] = plan_lomo(trace, precision)
    for b in plans.values():
        b.device = state["device"]
    return plans

