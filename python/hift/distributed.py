"""Data parallel on torch.distributed, without DDP: N ranks train one group per step together,
each resting 1/N of every group's optimizer state.

DDP builds its reducer once, for the parameters that require grad when it is made, and cannot
follow a trainable set that changes every step. hift needs no reducer: per step, for the active
group only,
  1. its gradients are laid end to end in one flat buffer (GroupLayout; fp32, or bf16 with
     Config.reduce_dtype) and
     reduce-scattered (summed): rank r receives elements [r*S, (r+1)*S) of the sum;
  2. one small all-reduce sums [the group's norm blocks' sums of squares (each rank fills the
     slots of its shard's blocks), the ranks' non-finite losses, which parameters have a
     gradient]: the clip coefficient comes from the global norm of the mean gradient, with the
     bits one process computes (hift_kernels/norm.py), and the skip flag is the same on every
     rank (every rank skips together, and one loss scale stays the same everywhere);
  3. each rank updates its shard of the weights from its shard of the state (OptimizerState
     built over the rank's Pieces: the fused update works on flat pieces), with 1/N folded into
     the gradient multiplier (the mean over ranks);
  4. the group's weights are all-gathered in place into one flat buffer and copied back.
About 1/K of a DDP step's traffic (K groups), in three collectives. Gradients are reduced in
fp32 by default whatever the weights' dtype (no sum of N ranks' gradients rounded to 8 bits);
reduce_dtype="bf16" halves the reduce-scatter's bytes, rounding each partial sum as DDP does for
a bf16 model, and the update widens the bf16 shard as it widens bf16 gradients. On CUDA the all-gather (on nccl's stream) and the state's
copy-out (on the swapper's) both follow the update and run side by side, and the state's
copy-in was started before the forward. Not overlapped: the reduce-scatter waits for the whole
backward (DDP's buckets start during it), and a step reads one small tensor on the host (which
parameters any rank reached: one process knows it from its own grads) before the update.

Shards cut a parameter only at multiples of formats.INT8_BLOCK when the moments are int8 (each
parameter starts on a block in the flat layout), so every block's scales are the ones a single
process computes; stochastic rounding draws by the element's index in its group, not in the
shard. The results are a single process's on the concatenation of the ranks' batches, up to the
order of the gradient sums (and bit for bit where the sum is exact).

Failure: a rank that raises in fit posts its error to the process group's store; the others
leave their next collective when it times out (the process group's timeout: init_process_group
here bounds it) or when the raising process exits, and raise RankFailedError with that error.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hift import ops
from hift.precision import GradCheck, LossScaler, check_grads
from hift.state import Piece, chunk_pieces

# torch 2.13 renamed the flat collectives
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

DEFAULT_TIMEOUT_S = 300.0
_FAILED_KEY = "hift/failed"


class RankFailedError(RuntimeError):
    """Another rank failed (or a collective timed out); the message says which and why."""


def active() -> bool:
    """Whether a default process group of more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_process_group(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs) -> None:
    """torch.distributed.init_process_group with a bounded wait on every collective (so a rank
    that fails ends the others within timeout_s, never a hang): nccl where CUDA is, else gloo;
    under torchrun the rank, world size and address come from the environment. On CUDA, call
    torch.cuda.set_device(local rank) first."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


@dataclass
class GroupLayout:
    """A group's parameters end to end in one flat buffer of world * shard elements: parameter i
    at starts[i] (a multiple of align), rank r owning [r * shard, (r + 1) * shard)."""

    sizes: list[int]
    starts: list[int]
    shard: int
    world: int

    @classmethod
    def of(cls, sizes: list[int], world: int, block: int = 1) -> "GroupLayout":
        """Parameters start, and shards cut, on multiples of both `block` (where a state chunk may
        cut: int8 moments keep blocks whole) and ops.NORM_BLOCK (each norm block lies in one
        shard, so the ranks' block sums are a single process's)."""
        align = math.lcm(block, ops.NORM_BLOCK)
        starts, at = [], 0
        for n in sizes:
            starts.append(at)
            at += -(-n // align) * align
        shard = max(align, -(-at // (world * align)) * align)
        return cls(sizes, starts, shard, world)

    @property
    def numel(self) -> int:
        return self.world * self.shard

    def pieces(self, rank: int) -> list[Piece]:
        """The elements rank owns, as Pieces of the parameters (in parameter order)."""
        lo, hi = rank * self.shard, (rank + 1) * self.shard
        return [Piece(i, max(lo, s) - s, min(hi, s + n) - s)
                for i, (s, n) in enumerate(zip(self.starts, self.sizes)) if max(lo, s) < min(hi, s + n)]

    def at(self, piece: Piece, rank: int) -> int:
        """Where a piece of rank's shard starts in that shard."""
        return self.starts[piece.param] + piece.lo - rank * self.shard

    def gaps(self) -> list[tuple[int, int]]:
        """The flat buffer's padding: [lo, hi) ranges that hold no parameter."""
        ends = [s + n for s, n in zip(self.starts, self.sizes)]
        gaps = [(e, s) for e, s in zip(ends, self.starts[1:] + [self.numel]) if e < s]
        return gaps if self.sizes else [(0, self.numel)]


def shard_chunks(layout: GroupLayout, rank: int, max_numel: Optional[int], block: int) -> list[list[Piece]]:
    """Rank's shard of a group cut into state chunks of at most max_numel elements (one chunk
    when None; one empty chunk where the rank owns none of the group)."""
    return chunk_pieces(layout.pieces(rank), max_numel, block)


@dataclass
class Traffic:
    """Bytes handed to collectives (each counted once, as its flat tensor's size), for the bench."""

    reduce_scatter: int = 0
    all_gather: int = 0
    all_reduce: int = 0

    @property
    def total(self) -> int:
        return self.reduce_scatter + self.all_gather + self.all_reduce


class Ranks:
    """What every multi-rank HiftAdamW shares (its `dp`): this rank, the number of ranks and the
    small collectives the loop and the checkpoints use, on one process group (None: the default).
    DataParallel and hift.fsdp.ShardedParallel add a step's reduction to it. comm_device: where
    the group's backend takes tensors, when not the training device (FSDP's rows offloaded to the
    host, nccl on the GPU)."""

    def __init__(self, device: torch.device, group=None, comm_device: Optional[torch.device] = None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.device = device
        self.comm_device = device if comm_device is None else comm_device
        self.traffic = Traffic()

    def _run(self, collective: Callable, *args, **kwargs):
        try:
            return collective(*args, **kwargs)
        except Exception as err:  # gloo and nccl raise RuntimeError subclasses on timeout or a lost peer
            raise RankFailedError(f"rank {self.rank}: a collective failed ({type(err).__name__}: {err})"
                                  + peer_failure()) from err

    def barrier(self) -> None:
        self._run(dist.barrier, group=self.group)

    def mean(self, values: Tensor) -> Tensor:
        """The mean over ranks of a small tensor (fit's pending losses: the global batch's)."""
        total = values.to(self.comm_device, torch.float32, copy=True).contiguous()  # a fresh, dense buffer
        self._run(dist.all_reduce, total, group=self.group)
        self.traffic.all_reduce += total.numel() * total.element_size()
        return total / self.world

    def all_gather_object(self, value) -> list:
        out = [None] * self.world
        self._run(dist.all_gather_object, out, value, group=self.group)
        return out


class DataParallel(Ranks):
    """The collectives of one HiftAdamW on the default process group (see the module docstring)."""

    def __init__(self, sizes_of_groups: list[list[int]], block: int, device: torch.device,
                 reduce_dtype: torch.dtype = torch.float32):
        """block: where a state chunk may cut a parameter (StateFormat.cut: whole int8 blocks,
        16-byte aligned pieces)."""
        super().__init__(device)
        self.reduce_dtype = reduce_dtype  # of the gradients' reduce-scatter (Config.reduce_dtype)
        self.block = block
        self.layouts = [GroupLayout.of(sizes, self.world, block) for sizes in sizes_of_groups]
        self._reduced: Optional[tuple[int, Tensor, list[bool]]] = None

    # -------------------------------------------------------------------- the rank's shards

    def chunks(self, max_numel: Optional[int], rank: Optional[int] = None) -> list[list[list[Piece]]]:
        """Per group, the state chunks of rank's shard (this rank's by default)."""
        rank = self.rank if rank is None else rank
        return [shard_chunks(layout, rank, max_numel, self.block) for layout in self.layouts]

    # ------------------------------------------------------------------------ collectives

    def broadcast_model(self, model: nn.Module) -> None:
        """Every rank starts from rank 0's parameters and buffers (as DDP does when it is made)."""
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                self._run(dist.broadcast, t.data, src=0)

    def reduce(self, g: int, params: list[nn.Parameter], loss: Optional[Tensor], scaler: LossScaler,
               max_grad_norm: Optional[float]) -> tuple[GradCheck, list[bool]]:
        """Reduce-scatter group g's gradients (their local grads are freed) and agree on the
        norm, the skip flag and which parameters any rank reached. Returns the check (its
        grad_scale folds in 1/world: the mean) and, per parameter, whether it has a gradient."""
        layout = self.layouts[g]
        flat = torch.empty(layout.numel, dtype=self.reduce_dtype, device=self.device)
        for lo, hi in layout.gaps():
            flat[lo:hi].zero_()
        has_grad = [p.grad is not None for p in params]
        for p, start, n in zip(params, layout.starts, layout.sizes):
            if p.grad is None:
                flat[start : start + n].zero_()
            else:
                flat[start : start + n].copy_(p.grad.reshape(-1))
                p.grad = None
        has_grad = torch.tensor(has_grad, dtype=torch.float32).to(self.device, non_blocking=True)
        shard = torch.empty(layout.shard, dtype=self.reduce_dtype, device=self.device)
        self._run(_reduce_scatter, shard, flat)
        self.traffic.reduce_scatter += flat.numel() * flat.element_size()
        del flat
        bad_loss = (~torch.isfinite(loss.float())).float().view(1) if loss is not None else has_grad.new_zeros(1)
        # [the group's block sums | bad loss | has grad]: the rank fills its own blocks' slots,
        # so the sum over ranks is exact and every rank folds the norm a single process would
        blocks, own = layout.numel // ops.NORM_BLOCK, layout.shard // ops.NORM_BLOCK
        stats = torch.zeros(blocks + 1 + len(params), dtype=torch.float32, device=self.device)
        stats[self.rank * own : (self.rank + 1) * own] = ops.block_sq_sums(shard)
        stats[blocks:].copy_(torch.cat([bad_loss, has_grad]))
        self._run(dist.all_reduce, stats)
        self.traffic.all_reduce += stats.numel() * stats.element_size()
        reached = [bool(r) for r in (stats[blocks + 1 :] > 0).tolist()]  # the one host sync of a step
        # the sum's squared norm over world**2: the mean gradient's
        agreed_loss = torch.where(stats[blocks] > 0, float("nan"), 0.0) if loss is not None else None
        check = check_grads(ops.fold_sum(stats[:blocks]) / self.world**2, agreed_loss, scaler, max_grad_norm)
        mean = torch.full((), 1.0 / self.world, dtype=torch.float32, device=self.device)
        check.grad_scale = mean if check.grad_scale is None else check.grad_scale * mean
        self._reduced = (g, shard, reached)
        return check, reached

    def grad_of(self, g: int) -> Callable[[Piece], Optional[Tensor]]:
        """The reduced (summed) gradient of a piece of this rank's shard of group g; None for a
        parameter no rank reached."""
        reduced_g, shard, reached = self._reduced
        assert reduced_g == g, "reduce() the group before its update"
        layout = self.layouts[g]

        def grad(piece: Piece) -> Optional[Tensor]:
            if not reached[piece.param]:
                return None
            at = layout.at(piece, self.rank)
            return shard[at : at + piece.numel]

        return grad

    def gather_weights(self, g: int, params: list[nn.Parameter]) -> None:
        """After the update of this rank's shard: every rank gets the group's updated weights."""
        self._reduced = None
        layout = self.layouts[g]
        dtype = params[0].dtype
        flat = torch.empty(layout.numel, dtype=dtype, device=self.device)
        own = flat[self.rank * layout.shard : (self.rank + 1) * layout.shard]
        for piece in layout.pieces(self.rank):
            at = layout.at(piece, self.rank)
            own[at : at + piece.numel].copy_(params[piece.param].detach().reshape(-1)[piece.lo : piece.hi])
        self._run(_all_gather, flat, own)  # in place: own is rank's part of flat
        self.traffic.all_gather += flat.numel() * flat.element_size()
        with torch.no_grad():
            for p, start, n in zip(params, layout.starts, layout.sizes):
                p.view(-1).copy_(flat[start : start + n])


# ----------------------------------------------------------------------------------- failure


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # private API: without it, ranks still stop on the timeout, without the cause
        return None


def report_failure(err: BaseException) -> None:
    """Tell the other ranks why this one stops (fit calls it when it raises)."""
    if not active() or isinstance(err, RankFailedError):
        return
    store = _store()
    if store is not None:
        try:
            store.set(_FAILED_KEY, f"rank {dist.get_rank()} (pid {os.getpid()}) raised {type(err).__name__}: {err}")
        except Exception:
            pass


def peer_failure() -> str:
    """'; rank r raised ...' where another rank reported its failure, else ''."""
    store = _store()
    try:
        if store is not None and store.check([_FAILED_KEY]):
            return "; " + store.get(_FAILED_KEY).decode(errors="replace")
    except Exception:
        pass
    return ""
