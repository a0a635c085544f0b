"""hift on FSDP2 (torch.distributed.fsdp.fully_shard): the group rotation over a model whose
weights are sharded over the ranks, for weights that do not fit one device.

fully_shard makes each parameter a DTensor sharded on dim 0: rank r holds rows
[r * ceil(R/W), (r + 1) * ceil(R/W)) of a parameter of R rows over W ranks (torch.chunk's rule;
a rank past the last row holds none). hift keeps its method and changes where it reads:
  - the rank's share of a group is one Piece per parameter, its rows in the parameter's GLOBAL
    flat numbering (lo = row0 * row_numel), cut into state chunks as a single process cuts a
    parameter (hift.state.chunk_pieces). Stochastic rounding draws by an element's index in its
    group, so a rank's bf16 moments are one process's bits at the same elements, and a saved
    layout is comparable across numbers of ranks (hift.reshard re-cuts by pieces). int8 moments:
    a block starts at each shard's first row, a valid state, not a single process's bits, and
    re-cut only onto the same rows (reshard refuses other row cuts in words);
  - every weight and gradient is read and written through local_of: a DTensor's local rows and
    where they start (OptimizerState's one mapping; a plain tensor is itself from 0);
  - per step, ShardedParallel.reduce does what DataParallel.reduce does without the
    reduce-scatter, which FSDP ran in backward (each active parameter's .grad is this rank's rows
    of the mean gradient): one all-reduce of [the group's norm blocks | the blocks a row cut
    splits, element by element | the ranks' non-finite losses | which parameters have a
    gradient]. Each rank fills the blocks that lie in its rows and its elements of the split
    ones; every slot is then one rank's value plus zeros (exact), every rank folds the norm a
    single process computes on the same gradients (hift_kernels/norm.py), and the skip flag and
    the parameters any rank reached are the same everywhere;
  - no weight moves after the update: FSDP's next forward all-gathers the new rows.

Weights offloaded by FSDP (CPUOffloadPolicy; Config.offload_weights) rest in host memory with
their gradients: FSDP copies the rows to the device for its all-gather and the reduced gradient
back. hift then runs the update where they are, on the host, with the fused CPU kernel and the
state in host memory (or on disk): no optimizer state crosses PCIe, and nothing but FSDP's own
copies does. Bringing the state to the device would move 6-12 bytes a parameter over PCIe to
update 2-4 bytes of weight that are on the host anyway.

A model sharded by the user must be in the run's dtype already (hift casts no DTensor: cast it
before fully_shard, or let hift shard it: Config.shard_weights, hift.fsdp_wrap).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without torch.distributed: no model is sharded
    DTensor = Shard = None

from hift import ops
from hift.config import ConfigError
from hift.distributed import Ranks
from hift.precision import GradCheck, LossScaler, check_grads
from hift.state import Piece, chunk_pieces

_BLOCK = ops.NORM_BLOCK


def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def sharded(params: list[nn.Parameter], names: Optional[list[str]] = None) -> bool:
    """Whether the trainable parameters are FSDP2's DTensors; refuses a mix in words."""
    kinds = [is_sharded(p) for p in params]
    if any(kinds) and not all(kinds):
        plain = [names[i] if names else f"parameter {i}" for i, k in enumerate(kinds) if not k][:3]
        raise ConfigError(f"some trainable parameters are sharded by FSDP2 and some are not (e.g. {plain}): "
                          "fully_shard the root module too, so that every parameter is sharded")
    return bool(kinds) and all(kinds)


def sharded_model(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def rows_of(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The rows [first, last) that rank holds of a parameter of `rows` rows (FSDP2's Shard(0))."""
    per = -(-rows // world)
    first = min(rank * per, rows)
    return first, min(first + per, rows)


def local_of(t: Tensor) -> tuple[Tensor, int]:
    """The elements of t this rank holds and where the first lies in t's flat numbering: a
    DTensor's local rows at row0 * row_numel, a plain tensor all of it at 0 (hift.state.whole)."""
    if not is_sharded(t):
        return t.detach(), 0
    held = t.to_local().detach()
    rows = t.shape[0]
    first, _ = rows_of(rows, t.device_mesh.size(), t.device_mesh.get_local_rank())
    return held, first * (t.numel() // rows if rows else 0)


def held_device(p: Tensor) -> torch.device:
    """Where the update reads a parameter: its local rows' device (the host under CPU offload)."""
    return p.to_local().device if is_sharded(p) else p.device


def mesh_device(mesh) -> torch.device:
    """The device of a mesh's collectives (FSDP's: the current one of its kind)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.accelerator.current_device_index())


def check_sharding(params: list[nn.Parameter], names: list[str]):
    """Refuse in words what hift cannot train: another placement than fully_shard's default, a
    mesh of more than one dimension (HSDP), parameters on several meshes; the one mesh
    otherwise."""
    mesh = params[0].device_mesh
    for p, name in zip(params, names):
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or p.dim() == 0:
            raise ConfigError(
                f"{name} is sharded as {tuple(p.placements)} over a {p.device_mesh.ndim}-D mesh: hift trains FSDP2 "
                "models sharded on dim 0 over a 1-D mesh (fully_shard's default; no HSDP, no shard_placement_fn)")
        if p.device_mesh != mesh:
            raise ConfigError(f"{name} is sharded over another mesh than {names[0]}: hift trains a model "
                              "sharded over one mesh")
        rows = p.to_local().shape[0]
        first, last = rows_of(p.shape[0], mesh.size(), mesh.get_local_rank())
        if rows != last - first:
            raise ConfigError(f"{name} holds {rows} rows on this rank, and fully_shard's rule gives {last - first}: "
                              "hift reads FSDP2's shards as torch.chunk cuts them")
    return mesh


def rank_pieces(shapes: list[torch.Size], world: int, rank: int) -> list[Piece]:
    """Rank's rows of each parameter as Pieces in the parameter's flat numbering (none where it
    holds no row)."""
    pieces = []
    for i, shape in enumerate(shapes):
        first, last = rows_of(shape[0], world, rank)
        row = shape.numel() // shape[0] if shape[0] else 0
        if last > first:
            pieces.append(Piece(i, first * row, last * row))
    return pieces


class NormLayout:
    """Where a group's norm blocks sit in the step's all-reduce: one slot per block of every
    parameter (a single process's order), and NORM_BLOCK slots for each block a row cut splits
    (its elements, each from the rank that holds it)."""

    def __init__(self, shapes: list[torch.Size], world: int):
        self.sizes = [s.numel() for s in shapes]
        self.bases, at = [], 0
        for n in self.sizes:
            self.bases.append(at)
            at += ops.norm_blocks(n)
        self.blocks = at
        self.split: dict[tuple[int, int], int] = {}  # (param, block) -> its index among the split blocks
        for i, shape in enumerate(shapes):
            row = self.sizes[i] // shape[0] if shape[0] else 0
            for r in range(1, world):
                cut = rows_of(shape[0], world, r)[0] * row
                if 0 < cut < self.sizes[i] and cut % _BLOCK:
                    self.split.setdefault((i, cut // _BLOCK), len(self.split))

    @property
    def numel(self) -> int:
        return self.blocks + len(self.split) * _BLOCK

    def fill(self, stats: Tensor, param: int, lo: int, grad: Tensor) -> None:
        """Write a rank's part of parameter param's gradient (flat, its elements from lo) into
        stats: its whole blocks' sums, and its elements of the blocks a cut splits."""
        n, hi = self.sizes[param], lo + grad.numel()
        first = -(-lo // _BLOCK)  # the first block that starts in [lo, hi)
        last = ops.norm_blocks(n) if hi == n else hi // _BLOCK  # past the last block that ends in it
        if first < last:
            sums = ops.block_sq_sums(grad[first * _BLOCK - lo : min(last * _BLOCK, n) - lo])
            stats[self.bases[param] + first : self.bases[param] + last] = sums
        for block in {lo // _BLOCK, (hi - 1) // _BLOCK} - set(range(first, last)):
            start = block * _BLOCK
            a, b = max(lo, start), min(hi, start + _BLOCK)
            at = self.blocks + self.split[(param, block)] * _BLOCK + a - start
            stats[at : at + b - a] = grad[a - lo : b - lo]

    def norm_sq(self, stats: Tensor) -> Tensor:
        """The group's squared norm from the summed stats: the split blocks' sums from their
        elements, then every block folded in a single process's order."""
        blocks = stats[: self.blocks].clone()
        if self.split:
            sums = ops.block_sq_sums(stats[self.blocks : self.numel])
            for (param, block), j in self.split.items():
                blocks[self.bases[param] + block] = sums[j]
        return ops.fold_sum(blocks)


class ShardedParallel(Ranks):
    """A HiftAdamW's collectives over FSDP2's mesh (see the module docstring): its `dp`."""

    def __init__(self, shapes_of_groups: list[list[torch.Size]], block: int, device: torch.device, mesh):
        """shapes_of_groups: each group's parameters' (global) shapes; block: where a state chunk
        may cut a piece (StateFormat.cut); device: the rows' (the host under CPU offload); mesh:
        FSDP's, whose process group and device the collectives use."""
        super().__init__(device, mesh.get_group(), mesh_device(mesh))
        self.block = block
        self.shapes = shapes_of_groups
        self.norms = [NormLayout(shapes, self.world) for shapes in shapes_of_groups]
        self._reduced: Optional[tuple[int, list[nn.Parameter], list[bool]]] = None

    def chunks(self, max_numel: Optional[int], rank: Optional[int] = None) -> list[list[list[Piece]]]:
        """Per group, the state chunks of rank's rows (this rank's by default)."""
        rank = self.rank if rank is None else rank
        return [chunk_pieces(rank_pieces(shapes, self.world, rank), max_numel, self.block) for shapes in self.shapes]

    def reduce(self, g: int, params: list[nn.Parameter], loss: Optional[Tensor], scaler: LossScaler,
               max_grad_norm: Optional[float]) -> tuple[GradCheck, list[bool]]:
        """Agree on group g's norm, the skip flag and which parameters any rank reached (FSDP
        reduced the gradients already: no 1/world here)."""
        norms = self.norms[g]
        has_grad = [p.grad is not None for p in params]
        stats = torch.zeros(norms.numel + 1 + len(params), dtype=torch.float32, device=self.device)
        for i, p in enumerate(params):
            if p.grad is not None:
                held, lo = local_of(p.grad)
                if held.numel():
                    norms.fill(stats, i, lo, held.reshape(-1))
        tail = stats[norms.numel :]
        if loss is not None:  # (computed on the mesh's device, where the rows may not be)
            tail[0:1].copy_((~torch.isfinite(loss.float())).float().view(1))
        tail[1:].copy_(torch.tensor(has_grad, dtype=torch.float32))
        stats = stats.to(self.comm_device)  # (offloaded rows: the backend's device; a few bytes per block)
        self._run(dist.all_reduce, stats, group=self.group)
        self.traffic.all_reduce += stats.numel() * stats.element_size()
        stats = stats.to(self.device)
        tail = stats[norms.numel :]
        reached = [bool(r) for r in (tail[1:] > 0).tolist()]  # the one host sync of a step
        agreed_loss = torch.where(tail[0] > 0, float("nan"), 0.0) if loss is not None else None
        check = check_grads(norms.norm_sq(stats), agreed_loss, scaler, max_grad_norm)
        self._reduced = (g, params, reached)
        return check, reached

    def grad_of(self, g: int) -> Callable[[Piece], Optional[Tensor]]:
        """A piece's gradient: this rank's rows of the parameter's mean gradient (zeros where
        another rank reached the parameter and this one did not); None where no rank did."""
        reduced_g, params, reached = self._reduced
        assert reduced_g == g, "reduce() the group before its update"

        def grad(piece: Piece) -> Optional[Tensor]:
            if not reached[piece.param]:
                return None
            p = params[piece.param]
            if p.grad is None:
                return torch.zeros(piece.numel, dtype=p.dtype, device=self.device)
            held, at = local_of(p.grad)
            return held.reshape(-1)[piece.lo - at : piece.hi - at]

        return grad

    def gather_weights(self, g: int, params: list[nn.Parameter]) -> None:
        """Nothing to gather: FSDP's next forward all-gathers the updated rows."""
        self._reduced = None


def reshard(model: nn.Module) -> None:
    """Every FSDP module's sharded parameters registered again: the root keeps its unsharded
    ones after a forward (for the backward), and a probe runs none."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def fsdp_module_of(model: nn.Module, name: str) -> Optional[nn.Module]:
    """The FSDP module that holds parameter `name` (the nearest FSDPModule around its module)."""
    from torch.distributed.fsdp import FSDPModule

    path = name.split(".")[:-1]
    modules = [model]
    for part in path:
        modules.append(getattr(modules[-1], part))
    return next((m for m in reversed(modules) if isinstance(m, FSDPModule)), None)


class BackwardStop:
    """FSDP2's backward all-gathers, beside each FSDP module it reaches, the one that ran before
    it in forward (its default prefetch). hift's backward stops at the active group's lowest
    unit, so that prefetch gathers a module backward never reaches: one unit's weights for
    nothing, on the network and in memory until backward ends. The active group's lowest FSDP
    module is made to prefetch itself instead (an explicit list turns the default off, and
    unsharding what is unsharded is a no-op; an empty list would restore the default, which
    every other module keeps).

    The root holds its units (embeddings, the final norm and head of a model sharded by block)
    beside the blocks: as the lowest module it keeps its default (the last block) where a unit of
    another module lies above the group's, and stops where none does."""

    def __init__(self, model: nn.Module, groups):
        units = [u for g in groups for u in g.units]  # forward order
        owners = [fsdp_module_of(model, u.names[0]) for u in units]
        self.stops: list[Optional[nn.Module]] = []
        at = 0
        for g in groups:
            owner = owners[at]
            above = owners[at + 1 :]
            reaches_below = owner is model and any(o is not model for o in above)
            self.stops.append(None if owner is None or reaches_below else owner)
            at += len(g.units)
        self._stopped: Optional[nn.Module] = None

    def arm(self, g: Optional[int]) -> None:
        """Group g trains next (None: none does; every module keeps FSDP's default)."""
        if self._stopped is not None:
            self._stopped.set_modules_to_backward_prefetch([])
        self._stopped = self.stops[g] if g is not None else None
        if self._stopped is not None:
            self._stopped.set_modules_to_backward_prefetch([self._stopped])


@contextlib.contextmanager
def leaves_in_forward(model: nn.Module) -> Iterator[dict[int, int]]:
    """FSDP2 swaps a module's sharded parameters for unsharded ones while it runs, and those
    are the leaves of the loss's graph: yields a dict that, after the block, maps the id of each
    parameter a module held during the forward to the id of the one it holds after (the
    sharded one, once reshard() ran; itself where nothing was swapped)."""
    seen: list[tuple[int, nn.Module, str]] = []

    def record(module, _inputs):
        seen.extend((id(p), module, name) for name, p in module.named_parameters(recurse=False))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if any(True for _ in m.parameters(recurse=False))]
    aliases: dict[int, int] = {}
    try:
        yield aliases
    finally:
        for h in hooks:
            h.remove()
        aliases.update({i: id(module._parameters[name]) for i, module, name in seen})
