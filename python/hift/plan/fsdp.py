"""Weights that do not fit one device: hift on FSDP2 (shard_weights), with the weights resting in
host RAM (offload_weights), or both. One rank's device peak, the host RAM per node, the bytes a
step moves over the network and over PCIe, and a step time estimated from those bytes and the
step's FLOPs. (The runtime is hift.fsdp; this module only predicts it. The peers these numbers
are set beside, FSDP2 + AdamW and DeepSpeed ZeRO-3, are in hift.plan.peers.)

FSDP2 as modelled here (torch.distributed.fsdp.fully_shard, read in torch 2.13's _fully_shard/):
- One FSDP module per hift unit (docs/fsdp2.md). Each parameter is sharded on dim 0 over the N
  ranks, its rows padded to a multiple of N: every rank rests ceil(rows/N) rows of it (`local`;
  rank 0 holds that many real rows, so its share is the largest), and an all-gather fills the
  padded whole (`padded`).
- Weights in flight: an all-gather lands in a flat buffer that is then copied out into the
  unit's parameters. In forward FSDP2 keeps that buffer until the next unit's copy-out and frees
  the parameters after the unit's forward; in backward a unit's pre-backward copies it out, frees
  the buffer and prefetches the unit below, and its parameters are freed after its backward. On
  one rank nothing is gathered: hift copies the next unit in while one computes (the same two
  units), which FSDP2 alone does not (it copies on the compute stream, serially). Offloaded
  weights are first copied to the device (staging: the shard, before its all-gather; on one rank,
  parameter by parameter, at most two parameters at once).
- The top unit and the loss: the head's output (the logits) is made beside its gathered weights;
  the loss's backward (log_softmax's saved output and two gradients of its size) runs before
  FSDP2 gathers the head again (its pre-backward hook fires on the head's output). The trace
  tells the loss's tensors apart (UnitTrace.loss_saved, loss_largest, outputs).
- Gradients: after a trained unit's backward FSDP2 copies its full gradient (the weights' dtype)
  into a padded flat buffer in the reduce dtype (the reduce-scatter's input), frees the gradient
  but its last parameter's (a loop variable holds it until the reduce returns), and reduce-
  scatters into a shard (cast to the weights' dtype where the two differ). The input buffer is
  kept until the next unit's reduce-scatter starts or backward ends (one in flight); the shard
  stays on the device, or is copied to the host with offloaded weights. The group's lowest unit
  (its input needs no gradient) is reduced after backward, from FSDP2's root callback.
- gloo (device "cpu", what the CPU tests measure): its all-gather stages a copy of the flat
  buffer, its reduce-scatter clones its input, and ATen's chunk_cat pads uneven rows through a
  copy; the previous unit's flat buffer outlives the next one's copy-out. Held to torch's
  measured allocations within 2% per step (bench/results/fsdp_peak.md).
- hift: backward reaches only the active group and the units above it (frozen there: they pass
  input gradients on, make no weight gradient and reduce nothing). The units below the group are
  all-gathered in forward only and save nothing. The plan assumes the runtime stops FSDP2's
  backward prefetch at the group's lowest unit (FSDPModule.set_modules_to_backward_prefetch([])):
  by default FSDP2 would also gather the unit below it, which backward never reaches (one more
  unit's bytes, in flight and on the network).
- The update: with the weights on the device (shard_weights), on the device from the rank's
  state shard through hift's device slots, as without FSDP; with offloaded weights, on the host
  with the fused CPU kernel, on the rank's shard in place: the state never crosses PCIe, only the
  gradient shard does (D2H). The alternative, the update on the device, is reported beside it:
  the group's state in and out and its weight shard in and out.
- Per step a rank hands to collectives (counted as hift.distributed's Traffic counts: each
  collective's whole flat buffer) the all-gathers (every unit in forward, the reached units again
  in backward), the active group's reduce-scatter, and hift's small all-reduce (the norm's block
  sums, the non-finite flag, which parameters were reached: as hift.distributed). A ring moves
  (N-1)/N of each buffer per rank (2(N-1)/N for an all-reduce): `wire`, what the time uses.

Not modelled: the CUDA caching allocator's per-stream pools (the all-gather and reduce-scatter
streams keep blocks of their own: max_memory_reserved grows beyond max_memory_allocated, which
is what this predicts), NCCL's own buffers, the CUDA context, the BLAS library's workspace
(cuBLAS's; on the CPU MKL's cached GEMM buffers, ~10 MB of resident set here). On a GPU the
plan assumes chunk_cat's CUDA kernel pads without a copy (not measured: no GPU run yet).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from hift.plan.predict import (GB, GiB, STATE_STORES, Breakdown, _place_state, describe_format,
                               make_group_ranges, saved_bytes, state_chunk_bytes, state_format,
                               update_temporaries)
from hift.plan.trace import UnitTrace
from hift.precision import DTYPES

NORM_BLOCK = 256  # hift_kernels.norm.NORM_BLOCK: the all-reduce carries one fp32 sum per block


@dataclass(frozen=True)
class Machine:
    """The assumptions behind a step time: GB/s of each link (1e9 bytes), the GPU's achieved
    (not peak) dense TFLOPS, and the host memory bandwidth the fused CPU update gets."""

    pcie_gbps: float = 25.0  # one direction; H2D and D2H run at once (PCIe is full duplex)
    network_gbps: float = 25.0  # per rank, the collectives' bus bandwidth (a PCIe-class box; NVLink is ~10x)
    gpu_tflops: float = 100.0
    host_gbps: float = 50.0  # per node: its ranks update at once and share it

    def describe(self) -> str:
        return (f"PCIe {self.pcie_gbps:g} GB/s each way, network {self.network_gbps:g} GB/s per rank, GPU "
                f"{self.gpu_tflops:g} TFLOPS achieved, the host's update at {self.host_gbps:g} GB/s a node")

    def host_seconds(self, nbytes: float, ranks_per_node: int) -> float:
        """Seconds of a host update that reads and writes `nbytes` on each of a node's ranks at once."""
        return nbytes * ranks_per_node / (self.host_gbps * GB)


@dataclass
class Geometry:
    """Per unit, in elements: what a rank rests (its shard, rank 0's: the largest), what an
    all-gather fills (every parameter's rows padded to a multiple of the ranks), and the unit
    itself; and each unit's parameters' shards and largest parameter."""

    local: list[int]
    padded: list[int]
    numel: list[int]
    local_params: list[list[int]]
    largest_param: list[int]
    # per unit: its last parameter (FSDP2 holds that one's gradient through the reduce-scatter) and
    # the padded size of the parameters whose rows the ranks do not divide (their padded copies)
    last_param: list[int] = None
    uneven_padded: list[int] = None

    @classmethod
    def of(cls, trace: UnitTrace, ranks: int) -> "Geometry":
        local_params, padded, uneven = [], [], []
        for shapes in trace.param_shapes:
            rows_each = [((s[0] if s else 1), -(-s[0] // ranks) if s else 1, math.prod(s[1:])) for s in shapes]
            local_params.append([rows * row for _, rows, row in rows_each])
            padded.append(sum(rows * ranks * row for _, rows, row in rows_each))
            uneven.append(sum(rows * ranks * row for whole, rows, row in rows_each if whole != rows * ranks))
        return cls(local=[sum(p) for p in local_params], padded=padded, numel=list(trace.numels),
                   local_params=local_params, largest_param=list(trace.unit_largest_param),
                   last_param=[sizes[-1] for sizes in trace.param_numels], uneven_padded=uneven)


@dataclass
class StepBytes:
    """What one step moves for one rank, in bytes, by what it is."""

    group: int
    all_gather_forward: int = 0
    all_gather_backward: int = 0
    reduce_scatter: int = 0
    all_reduce: int = 0
    weights_h2d_forward: int = 0  # offloaded weights: every unit's shard
    weights_h2d_backward: int = 0  # again for the units backward reaches
    grads_d2h: int = 0  # offloaded weights: the active group's gradient shard
    state_h2d: int = 0  # the update on the device: the group's state in...
    state_d2h: int = 0  # ...and out
    ranks: int = 1

    @property
    def network(self) -> int:
        """Bytes handed to collectives (each one's flat buffer), as hift.distributed.Traffic counts."""
        return self.all_gather_forward + self.all_gather_backward + self.reduce_scatter + self.all_reduce

    @property
    def wire(self) -> float:
        """Bytes a rank sends (and receives) in ring collectives: (N-1)/N of an all-gather's or a
        reduce-scatter's buffer, 2(N-1)/N of an all-reduce's."""
        share = (self.ranks - 1) / self.ranks
        return share * (self.network - self.all_reduce) + 2 * share * self.all_reduce

    @property
    def h2d(self) -> int:
        return self.weights_h2d_forward + self.weights_h2d_backward + self.state_h2d

    @property
    def d2h(self) -> int:
        return self.grads_d2h + self.state_d2h

    @property
    def pcie(self) -> int:
        return self.h2d + self.d2h


@dataclass
class StepTime:
    """Seconds of one step by what bounds it: compute, PCIe (the busier direction), the network,
    the host's update. Overlapped, the step takes the largest; serially, their sum."""

    compute: float
    pcie: float
    network: float
    host_update: float = 0.0

    @property
    def overlapped(self) -> float:
        return max(self.compute, self.pcie, self.network, self.host_update)

    @property
    def serial(self) -> float:
        return self.compute + self.pcie + self.network + self.host_update


@dataclass
class WeightsPlan:
    """hift with its weights placed: one rank's device Breakdown (the largest rank's; `weights`
    is what rests on the device, `gathered` what is in flight at the peak, `host` the host RAM
    the node needs), and per group of a cycle its bytes, FLOPs and time."""

    breakdown: Breakdown
    shard_weights: bool
    offload_weights: bool
    ranks: int
    ranks_per_node: int
    host_per_rank: int
    disk_per_rank: int
    steps: list[StepBytes]
    flops: list[float]  # per group: the step's FLOPs (None where tokens were not given)
    tokens: Optional[int]
    machine: Machine
    update_on_host: bool
    pcie_update_on_device: list[int]  # per group, the alternative: the update on the device
    host_update_bytes: list[int]  # per group: what the host's update reads and writes
    step_peaks: list["SweepPeak"]  # per group: its step's peak past what rests, and where it is
    notes: list[str] = field(default_factory=list)

    @property
    def host_per_node(self) -> int:
        return self.ranks_per_node * self.host_per_rank

    @property
    def largest_step(self) -> StepBytes:
        """The step that moves the most (the bottom group's: backward reaches every unit)."""
        return max(self.steps, key=lambda s: (s.pcie + s.network, -s.group))

    def time(self, g: int) -> StepTime:
        s, m = self.steps[g], self.machine
        compute = self.flops[g] / (m.gpu_tflops * 1e12) if self.flops[g] is not None else 0.0
        return StepTime(compute=compute, pcie=max(s.h2d, s.d2h) / (m.pcie_gbps * GB),
                        network=s.wire / (m.network_gbps * GB),
                        host_update=m.host_seconds(self.host_update_bytes[g], self.ranks_per_node)
                        if self.update_on_host else 0.0)

    def cycle_time(self) -> StepTime:
        """The mean step of a cycle (every group once)."""
        times = [self.time(g) for g in range(len(self.steps))]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return StepTime(*(mean([getattr(t, k) for t in times]) for k in ("compute", "pcie", "network",
                                                                          "host_update")))

    def hide_tokens(self, link: str = "pcie") -> Optional[float]:
        """Tokens per step from which the weights' stream over `link` ("pcie" or "network") takes no
        longer than the step's compute, over a cycle (the stream does not grow with the batch;
        the compute does). None where nothing moves or no tokens were given."""
        if self.tokens is None or not any(self.flops):
            return None
        times = [self.time(g) for g in range(len(self.steps))]
        moved = sum(getattr(t, link) for t in times)
        per_token = sum(t.compute for t in times) / self.tokens
        return moved / per_token if moved else None

    def as_dict(self) -> dict:
        cycle = self.cycle_time()
        return dict(self.breakdown.as_dict(), gathered=self.breakdown.gathered,
                    shard_weights=self.shard_weights, offload_weights=self.offload_weights,
                    ranks_per_node=self.ranks_per_node, host_per_rank=self.host_per_rank,
                    host_per_node=self.host_per_node, disk_per_node=self.ranks_per_node * self.disk_per_rank,
                    update_on_host=self.update_on_host, tokens=self.tokens, machine=vars(self.machine),
                    steps=[dict(vars(s), network=s.network, wire=s.wire, pcie=s.pcie) for s in self.steps],
                    flops=self.flops, pcie_update_on_device=self.pcie_update_on_device,
                    cycle_seconds=dict(vars(cycle), overlapped=cycle.overlapped, serial=cycle.serial),
                    hide_tokens_pcie=self.hide_tokens("pcie"), hide_tokens_network=self.hide_tokens("network"))


def check_placement(ranks: int, shard_weights: bool, offload_weights: bool) -> None:
    """Refuse, in words, what FSDP2 cannot mean."""
    if shard_weights and ranks < 2:
        raise ValueError("shard_weights shards the weights over the ranks: it needs 2 or more (one rank "
                         "holds them whole); on one GPU offload_weights keeps them in host RAM")
    if offload_weights and ranks > 1 and not shard_weights:
        raise ValueError("offload_weights on several ranks: FSDP2 offloads each rank's shard, so it needs "
                         "shard_weights too (unsharded, every rank would pin the whole model in host RAM)")


class SweepPeak(NamedTuple):
    """A step's peak past what rests on the device, by what it is, and where in the step it is."""

    total: int
    gathered: int
    gradients: int
    activations: int
    where: str


@dataclass(frozen=True)
class LossTrace:
    """The top unit's output (the logits) and what the loss saves (UnitTrace's fields); zeros where
    the trace did not tell them apart: the top unit's backward is then the trace's transient rule."""

    output: int = 0
    saved: int = 0
    largest: int = 0

    @classmethod
    def of(cls, trace: UnitTrace) -> "LossTrace":
        return cls(trace.outputs[-1], trace.loss_saved, trace.loss_largest)


def fsdp_sweep(*args, **kwargs) -> SweepPeak:
    """One step under FSDP2: its peak past what rests on the device (fsdp_points' largest)."""
    return max(fsdp_points(*args, **kwargs), key=lambda p: p.total)


def fsdp_points(geo: Geometry, wbytes: int, rbytes: int, trained: set[int], first: int,
                saved: list[int], transient: list[int], *, ranks: int, offload_weights: bool,
                update_temporaries: int = 0, shard_bytes: Optional[int] = None, loss: LossTrace = LossTrace(),
                gloo: bool = False) -> list[SweepPeak]:
    """One step under FSDP2, point by point: what it holds past what rests on the device for the
    whole step (the weight shards, the state's slots). Forward runs every unit; backward runs from
    the top unit down to `first`; units in `trained` make gradients. wbytes: the gathered weights'
    and their gradients' element size; rbytes: the reduce-scatter's; shard_bytes: the sharded
    gradient's (the sharded parameter's dtype; default wbytes). loss: the top unit's output and the loss's
    saved tensors. gloo: the collectives are gloo's on the CPU (each stages a copy of its buffer;
    the reduce-scatter's copy-in pads uneven rows through a copy). Gradients count the reduce-
    scatter's buffers; with offloaded weights a shard leaves for the host as soon as it is made.
    (The one-rank path, offload_weights on one GPU, is _one_rank_points.)"""
    shard_bytes = wbytes if shard_bytes is None else shard_bytes
    if ranks == 1:
        return _one_rank_points(geo, wbytes, trained, first, saved, transient, offload_weights=offload_weights,
                                update_temporaries=update_temporaries, shard_bytes=shard_bytes)
    n, top = len(geo.numel), len(geo.numel) - 1
    flat = lambda u: geo.padded[u] * wbytes if 0 <= u < n else 0  # noqa: E731
    staged = lambda u: flat(u) if gloo else 0  # noqa: E731  gloo's all-gather stages a copy
    shard_h2d = lambda u: geo.local[u] * wbytes if offload_weights and 0 <= u < n else 0  # noqa: E731
    below = lambda u: u - 1 if u - 1 >= first else None  # noqa: E731  what backward prefetches
    acts_upto = lambda u: sum(saved[:u])  # noqa: E731  saved by the units below u
    split = loss.largest > 0  # the loss's backward is a point of its own
    points: list[SweepPeak] = []

    def point(where, gathered, grads, acts):
        points.append(SweepPeak(gathered + grads + acts, gathered, grads, acts, where))

    # Forward. A unit's all-gather lands in a flat buffer (gloo: through a staged copy) that is
    # copied out into the parameters; the unit's parameters are freed after its forward, its flat
    # buffer kept until the next unit's copy-out (FSDP2 frees it just before that copy-out on a
    # GPU; on the CPU, measured, just after). The top unit's output (the logits) is made beside.
    for u in range(n):
        point(f"forward: unit {u}'s all-gather", flat(u - 1) + flat(u) + max(staged(u), shard_h2d(u)), 0,
              acts_upto(u))
        point(f"forward: unit {u}'s copy-out", (flat(u - 1) if gloo else 0) + 2 * flat(u), 0, acts_upto(u))
        out = loss.output if u == top else 0
        own = saved[u] - (loss.saved if u == top else 0)
        point(f"forward: unit {u}", 2 * flat(u), 0, acts_upto(u) + own + out)
    if split:  # the loss's forward: the head's flat buffer and the logits still alive
        point("forward: the loss", flat(top), 0, acts_upto(n) + loss.output)
        # its backward, before FSDP2 gathers the head (the pre-backward hook fires on the head's
        # output): log_softmax's output, the gradient nll passes on and the one it makes
        point("backward: the loss", 0, 0, acts_upto(n) + 2 * loss.largest)

    # Backward, from the top unit down. In a unit's pre-backward its parameters are copied out
    # of the flat buffer (prefetched by the unit above; the top unit's gathered there), the flat
    # buffer freed, the unit below prefetched; after its backward its parameters are freed and
    # a trained unit's gradient reduce-scattered: copied (uneven rows through a padded copy, on
    # gloo) into the reduce-scatter's input, freed but for the last parameter's (FSDP2 keeps a
    # reference until the reduce returns), the shard made beside the input (gloo clones the
    # input). The input is kept until the next reduce-scatter starts or backward ends. The
    # group's lowest unit (its input needs no gradient) is reduced after backward has ended.
    done, held = 0, 0  # gradient shards made (on the device); the last reduce-scatter's input

    def reduce(u, acts, gathered, when):
        nonlocal done, held
        held = 0  # FSDP2 frees the previous input (one in flight) before this one is made
        rs_in = geo.padded[u] * rbytes
        copy = geo.uneven_padded[u] * wbytes if gloo else 0
        grad, last = geo.numel[u] * wbytes, geo.last_param[u] * wbytes
        rs_out = geo.local[u] * rbytes
        cast = geo.local[u] * shard_bytes if rbytes != shard_bytes else 0
        point(f"{when}: unit {u}'s reduce-scatter input", gathered, done + grad + rs_in + copy, acts)
        point(f"{when}: unit {u}'s reduce-scatter", gathered,
              done + last + rs_in + rs_out + max(rs_in if gloo else 0, cast), acts)
        held = rs_in
        if not offload_weights:
            done += geo.local[u] * shard_bytes

    for u in range(n - 1, first - 1, -1):
        top_unit = u == top
        grad_in = loss.output if top_unit and split else 0  # the gradient arriving (the logits')
        acts = acts_upto(u + 1) - (loss.saved if top_unit and split else 0)
        if top_unit:  # nothing above prefetched it
            point(f"backward: unit {u}'s all-gather", flat(u) + max(staged(u), shard_h2d(u)), done + held,
                  acts + grad_in)
        point(f"backward: unit {u}'s copy-out", 2 * flat(u), done + held, acts + grad_in)
        b = below(u)
        if b is not None:
            point(f"backward: unit {b}'s prefetch", flat(u) + flat(b) + max(staged(b), shard_h2d(b)), done + held,
                  acts + grad_in)
        prefetched = flat(b) if b is not None else 0
        grad = geo.numel[u] * wbytes if u in trained else 0
        if top_unit and split:  # the head's own backward: its input gradient is small
            point(f"backward: unit {u}", flat(u) + prefetched, done + held + grad, acts + grad_in)
        else:
            point(f"backward: unit {u}", flat(u) + prefetched, done + held, acts + transient[u])
            point(f"backward: unit {u}'s end", flat(u) + prefetched, done + held + grad, acts_upto(u))
        if u in trained and u != first:
            reduce(u, acts_upto(u), prefetched, "backward")
    for u in sorted(trained, reverse=True):
        if u == first:
            reduce(u, 0, 0, "after backward")
    held = 0  # backward's end frees the last input
    point("the update", 0, done + update_temporaries, 0)
    return points


def _one_rank_points(geo: Geometry, wbytes: int, trained: set[int], first: int, saved: list[int],
                     transient: list[int], *, offload_weights: bool, update_temporaries: int,
                     shard_bytes: int) -> list[SweepPeak]:
    """One rank (offload_weights on one GPU): nothing gathered; hift copies the next unit in while
    one computes (FSDP2 alone copies on the compute stream, serially), each parameter staged (at
    most two at once). FSDP2 still copies a gradient into a flat buffer and from it into the shard
    (a reduce-scatter of one rank); the buffer is kept until the next unit's copy."""
    n = len(geo.numel)
    gather = lambda u: geo.padded[u] * wbytes if u is not None else 0  # noqa: E731
    staging = lambda u: 2 * geo.largest_param[u] * wbytes if u is not None and offload_weights else 0  # noqa: E731
    points = []

    def point(where, gathered, grads, acts):
        points.append(SweepPeak(gathered + grads + acts, gathered, grads, acts, where))

    for u in range(n):
        nxt = u + 1 if u + 1 < n else None
        point(f"forward: unit {u}", gather(u) + gather(nxt) + staging(nxt), 0, sum(saved[: u + 1]))
    done, held = 0, 0
    for u in range(n - 1, first - 1, -1):
        b = u - 1 if u - 1 >= first else None
        point(f"backward: unit {u}", gather(u) + gather(b) + staging(b), done + held,
              sum(saved[: u + 1]) + transient[u])
        if u in trained:
            flat_in = geo.padded[u] * wbytes
            shard = geo.local[u] * wbytes + (geo.local[u] * shard_bytes if wbytes != shard_bytes else 0)
            point(f"backward: unit {u}'s gradient", gather(b), done + flat_in + max(geo.numel[u] * wbytes, shard),
                  sum(saved[:u]))
            held = flat_in
            if not offload_weights:
                done += geo.local[u] * shard_bytes
    point("the update", 0, done + update_temporaries, 0)
    return points


def group_flops(trace: UnitTrace, group: range, tokens: int, recompute: bool) -> float:
    """FLOPs of one hift step: 2 per weight and token forward, for every unit; backward 2 per
    weight and token for the input gradients of the units above the group's lowest (frozen or
    not; the lowest's input needs none) and 2 for the weight gradients of the group; with
    recompute the frozen blocks above run forward again. Embeddings are a lookup (no FLOPs);
    attention's own (4 x seq x hidden per token and layer, 1% at seq 512 for LLaMA-2-70B) is not
    counted. Where every unit trains this is the usual 6 x weights x tokens."""
    matmul = [0 if kind == "embeddings" else n for kind, n in zip(trace.kinds, trace.numels)]
    above = range(group.stop, len(matmul))
    forward = 2 * sum(matmul)
    backward = 2 * sum(matmul[group.start + 1:]) + 2 * sum(matmul[u] for u in group)
    again = 2 * sum(matmul[u] for u in above if trace.kinds[u] == "block") if recompute else 0
    return float(tokens * (forward + backward + again))


def plan_placed(trace: UnitTrace, precision: str = "bf16", group_size: int = 1, prefetch: bool = True,
                offload: bool = True, state_chunk_mib: Optional[float] = None,
                recompute_boundary: Optional[int] = None, *, moment_dtype: str = "fp32",
                master_format: str = "auto", state_store: str = "host", ranks: int = 1,
                reduce_dtype: str = "fp32", shard_weights: bool = False, offload_weights: bool = False,
                ranks_per_node: Optional[int] = None, tokens: Optional[int] = None,
                machine: Machine = Machine(), device: str = "cuda") -> WeightsPlan:
    """hift on FSDP2 (shard_weights over `ranks`) and/or with the weights in host RAM
    (offload_weights), on GPUs; the other options as plan_hift takes them. ranks_per_node: ranks
    that share a node's host RAM (None: every rank on one node). tokens (batch x seq): for the
    FLOPs and the step time. device "cpu": FSDP2 over gloo, everything in host RAM (the total;
    no state offload, no offload_weights: the weights are in host memory already)."""
    check_placement(ranks, shard_weights, offload_weights)
    if device == "cpu":
        if offload_weights:
            raise ValueError("offload_weights on a CPU: the weights are in host memory already")
        offload = False
    if state_store not in STATE_STORES:
        raise ValueError(f"state_store must be one of {STATE_STORES}, got {state_store!r}")
    if offload_weights and not offload:
        raise ValueError("offload_weights updates each group on the host, where its state rests: "
                         "offload=False (the state on the device) contradicts it")
    per_node = ranks if ranks_per_node is None else ranks_per_node
    if not 1 <= per_node <= ranks:
        raise ValueError(f"ranks_per_node must be between 1 and the ranks ({ranks}), got {ranks_per_node}")
    wbytes = DTYPES[precision].itemsize
    # one rank reduces nothing: its gradients stay in the weights' dtype
    rbytes = DTYPES[reduce_dtype].itemsize if ranks > 1 else wbytes
    geo = Geometry.of(trace, ranks)
    fmt = state_format(precision, moment_dtype, master_format)
    groups = make_group_ranges(len(trace.numels), group_size)
    local_sizes = [[n for u in g for n in geo.local_params[u]] for g in groups]
    chunks = state_chunk_bytes(local_sizes, fmt, state_chunk_mib)  # the rank's rows, chunked
    state = [sum(c) for c in chunks]
    update_on_host = offload_weights

    # the update's own temporaries (the reference ops only: hift._C's fused kernel has none), of
    # the group's largest shard; none on the device where the host updates
    temporaries = [0 if update_on_host or not t else 2 * 4 * max(n for u in g for n in geo.local_params[u])
                   for t, g in zip(update_temporaries(trace, groups), groups)]
    best, steps, flops, alternative, host_update, peaks = None, [], [], [], [], []
    loss = LossTrace.of(trace)
    for g, units in enumerate(groups):
        trainable = [u in units for u in range(len(trace.numels))]
        saved, transient = saved_bytes(trace, trainable, units.start, recompute_boundary)
        peak = fsdp_sweep(geo, wbytes, rbytes, set(units), units.start, saved, transient, ranks=ranks,
                          offload_weights=offload_weights, update_temporaries=temporaries[g], loss=loss,
                          gloo=device == "cpu")
        peaks.append(peak)
        if best is None or peak.total > best[0].total:
            best = (peak, g)
        reached = range(units.start, len(trace.numels))
        group_local = sum(geo.local[u] for u in units)
        step = StepBytes(group=g, ranks=ranks)
        if ranks > 1:
            step.all_gather_forward = sum(geo.padded) * wbytes
            step.all_gather_backward = sum(geo.padded[u] for u in reached) * wbytes
            step.reduce_scatter = sum(geo.padded[u] for u in units) * rbytes
            params = sum(len(trace.param_numels[u]) for u in units)
            step.all_reduce = (-(-sum(geo.padded[u] for u in units) // NORM_BLOCK) + 1 + params) * 4
        if offload_weights:
            step.weights_h2d_forward = sum(geo.local) * wbytes
            step.weights_h2d_backward = sum(geo.local[u] for u in reached) * wbytes
            step.grads_d2h = group_local * wbytes
        elif offload:  # the state through the device slots, as without FSDP
            step.state_h2d = step.state_d2h = state[g]
        steps.append(step)
        # the update on the device instead: the group's state in and out, its weight shard in and out
        alternative.append(step.weights_h2d_forward + step.weights_h2d_backward + 2 * state[g]
                           + 2 * group_local * wbytes)
        # the fused update reads and writes the state and the weights, and reads the gradient
        host_update.append(2 * state[g] + 3 * group_local * wbytes)
        flops.append(group_flops(trace, units, tokens, recompute_boundary is not None) if tokens else None)

    (_, gathered, grads, acts, _), g_peak = best
    out = Breakdown("hift", weights=0 if offload_weights else sum(geo.local) * wbytes, gathered=gathered,
                    gradients=grads, activations=acts, device=device, state_format=describe_format(fmt),
                    ranks=ranks)
    host_per_rank, disk = _place(out, chunks, [sum(geo.local[u] for u in g) for g in groups], offload, state_store,
                                 prefetch, update_on_host)
    if offload_weights:
        # the weight shards, pinned, and the active group's gradient shard, which FSDP2 copies to the host
        host_per_rank += sum(geo.local) * wbytes + max(sum(geo.local[u] for u in g) for g in groups) * wbytes
    largest = max(steps, key=lambda s: (s.pcie + s.network, -s.group))
    out.pcie_per_step, out.network_per_step = largest.pcie, largest.network
    out.step_params = sum(trace.numels[u] for u in groups[largest.group])
    out.host = per_node * host_per_rank
    out.disk = per_node * disk
    plan = WeightsPlan(out, shard_weights, offload_weights, ranks, per_node, host_per_rank, disk, steps, flops,
                       tokens, machine, update_on_host, alternative, host_update, peaks)
    _notes(plan, trace, groups, g_peak)
    return plan


def _place(out: Breakdown, chunks: list[list[int]], group_numels: list[int], offload: bool, state_store: str,
           prefetch: bool, update_on_host: bool) -> tuple[int, int]:
    """The state's device slots and its host RAM and disk per rank: as without FSDP where the
    update runs on the device; on the host, no slots: the host store's chunks are updated in
    place, the disk store's staging buffers as on a CPU."""
    if not update_on_host:
        _place_state(out, chunks, group_numels, offload, state_store, prefetch)
        return out.host, out.disk
    state = [sum(c) for c in chunks]
    largest = max((b for c in chunks for b in c), default=0)
    chunked = any(len(c) > 1 for c in chunks)
    if state_store == "disk":
        buffers = 3 if chunked else 2
        out.disk_io_per_step = 2 * max(state)
        out.notes.append(f"state: {out.state_format}; disk store: each rank's share in files ({sum(state) / GB:.2f} GB "
                         f"a rank), {buffers} staging buffers of {largest / GiB:.2f} GiB in host RAM, where the "
                         "fused CPU kernel updates it; the next group's read ahead")
        return buffers * largest, sum(state)
    out.notes.append(f"state: {out.state_format}; every group's share rests in host RAM ({sum(state) / GB:.2f} GB a "
                     "rank) and is updated there by the fused CPU kernel: no device slot, nothing over PCIe")
    return sum(state), 0


def _notes(plan: WeightsPlan, trace: UnitTrace, groups: list[range], g_peak: int) -> None:
    b, n = plan.breakdown, plan.ranks
    both = plan.shard_weights and plan.offload_weights
    where = (f"sharded over {n} ranks (FSDP2) and offloaded to host RAM" if both
             else f"sharded over {n} ranks (FSDP2)" if plan.shard_weights else "offloaded to host RAM (one rank)")
    b.notes.insert(0, f"weights {where}: {b.weights / GB:.2f} GB rest on the device, {b.gathered / GB:.2f} GB in "
                      f"flight at the peak (training group {g_peak} of {len(groups)}: "
                      f"{', '.join(trace.kinds[u] for u in groups[g_peak])})")
    s = plan.largest_step
    if n > 1:
        b.notes.append(f"network, the largest step (group {s.group}): all-gather {s.all_gather_forward / GB:.2f} GB "
                       f"forward + {s.all_gather_backward / GB:.2f} GB backward, reduce-scatter "
                       f"{s.reduce_scatter / GB:.3f} GB, "
                       f"all-reduce {s.all_reduce / 1e6:.3f} MB: {s.network / GB:.2f} GB handed, "
                       f"{s.wire / GB:.2f} GB on the wire")
    if plan.offload_weights:
        b.notes.append(f"PCIe, the largest step: weights H2D {s.weights_h2d_forward / GB:.2f} GB forward + "
                       f"{s.weights_h2d_backward / GB:.2f} GB backward, gradient shard D2H {s.grads_d2h / GB:.3f} GB "
                       f"(the update on the host); updating on the device instead would move "
                       f"{plan.pcie_update_on_device[s.group] / GB:.2f} GB (the state and the weight shard in and out, "
                       "the gradient kept)")
    b.notes.append(f"host RAM per node: {plan.ranks_per_node} rank{'s' * (plan.ranks_per_node > 1)} x "
                   f"{plan.host_per_rank / GB:.2f} GB" + (" (--ranks-per-node not given: every rank on one node)"
                                                          if plan.ranks_per_node == n and n > 1 else ""))
    b.notes.append("FSDP2's backward prefetch stopped at the active group's lowest unit (else one more unit is "
                   "gathered per step)" if n > 1 else "one rank: hift copies the next unit's weights in while one "
                   "computes (FSDP2 alone copies on the compute stream, not overlapped)")
