"""Per-group AdamW state: where it lives and how it moves.

A group's state is cut into chunks: by default one chunk per group, or, with a chunk size,
pieces of at most that many parameters (a large parameter is split by element ranges). Each
chunk is one flat buffer of bytes laid out as [master | exp_avg | exp_avg_sq], each section in
its format (hift.formats: an fp32 master or a bf16 weight's int16 remainder, none for fp32
weights; fp32 or bf16 moments) and 16-byte aligned, so it moves between host and device in one
copy whatever the formats. (The buffer is held as fp32 words, the unit the swappers move.)

Where a chunk rests and how it reaches the update is its store's business (hift.store): on the
device (no offload), in host memory through a swapper's device slots (offload), or in files
under state_dir (the disk store).
- whole-group chunks: one device slot; the group's state is copied in while its own forward and
  backward run (the update is the only thing that needs it);
- smaller chunks: two slots, double-buffered through the update (chunk i+1 comes in while
  chunk i is updated), so the device holds two chunks instead of the largest group; the update
  then waits on its copies, which is the price of the memory.
The per-group step counters (bias correction) are tiny and always on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from hift import formats, ops
from hift.groups import Group
from hift.store import DiskStore, HostStore, ResidentStore

_ALIGN = 16  # bytes: each section starts where a 16-byte vector load can


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class StateFormat:
    """How one group's state is stored: the master ("none", "fp32", "remainder") and the moments
    ("fp32", "bf16"); see hift.formats."""

    master: str = "none"
    moments: str = "fp32"

    @property
    def dtypes(self) -> list[Optional[torch.dtype]]:
        """The dtype of each section (None: the section is absent)."""
        master = None if self.master == "none" else formats.STORAGE_DTYPES[self.master]
        moment = formats.STORAGE_DTYPES[self.moments]
        return [master, moment, moment]

    @property
    def bytes_per_element(self) -> int:
        return formats.state_bytes_per_element(self.master, self.moments)

    def section_bytes(self, numel: int) -> list[int]:
        return [0 if d is None else _aligned(numel * d.itemsize) for d in self.dtypes]


@dataclass
class Piece:
    """Elements [lo, hi) of parameter `param` (an index into its group's params), flattened."""

    param: int
    lo: int
    hi: int

    @property
    def numel(self) -> int:
        return self.hi - self.lo


@dataclass
class Chunk:
    group: int
    pieces: list[Piece]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.pieces)


@dataclass
class StateViews:
    """Views into one chunk's flat state buffer, one flat tensor per piece, in piece order."""

    masters: list[Tensor]  # empty when the weights are fp32 (they are their own masters)
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]


def split_into_chunks(group: Group, max_numel: Optional[int]) -> list[Chunk]:
    """The group's parameters in order, cut into chunks of at most max_numel elements (one
    chunk holding the whole group when max_numel is None)."""
    if max_numel is None:
        return [Chunk(group.index, [Piece(i, 0, p.numel()) for i, p in enumerate(group.params)])]
    chunks, pieces, room = [], [], max_numel
    for i, p in enumerate(group.params):
        lo = 0
        while lo < p.numel():
            take = min(room, p.numel() - lo)
            pieces.append(Piece(i, lo, lo + take))
            lo += take
            room -= take
            if room == 0:
                chunks.append(Chunk(group.index, pieces))
                pieces, room = [], max_numel
    if pieces:
        chunks.append(Chunk(group.index, pieces))
    return chunks


class OptimizerState:
    def __init__(self, groups: list[Group], device: torch.device, format: StateFormat,
                 offload: bool, pin_memory: bool = True, chunk_mib: Optional[float] = None,
                 seed: int = 0, state_dir: Optional[str] = None):
        self.groups = groups
        self.device = torch.device(device)
        self.format = format
        self.seed = seed
        # where each parameter starts in its group's element numbering (stochastic rounding
        # draws by it, so the bits do not depend on how the state is chunked)
        self.param_starts = [[sum(p.numel() for p in g.params[:i]) for i in range(len(g.params))] for g in groups]
        chunk_numel = None if chunk_mib is None else max(1, int(chunk_mib * 2**20) // format.bytes_per_element)
        self.chunks: list[Chunk] = []
        self.chunks_of: list[list[int]] = []
        for group in groups:
            pieces = split_into_chunks(group, chunk_numel)
            self.chunks_of.append(list(range(len(self.chunks), len(self.chunks) + len(pieces))))
            self.chunks.extend(pieces)
        # fp32 words per chunk buffer
        self.numels = [sum(format.section_bytes(c.numel)) // 4 for c in self.chunks]
        self.steps = torch.zeros(len(groups), dtype=torch.float32, device=self.device)
        # Where the state rests (hift.store). A second device slot only pays where a group has a
        # next chunk to bring in during its update; the disk store stages one more chunk: the
        # next step's, read ahead.
        chunked = any(len(chunks) > 1 for chunks in self.chunks_of)
        if state_dir is not None:
            self.store = DiskStore(self.numels, self.device, state_dir, slots=3 if chunked else 2, pin=pin_memory,
                                   device_slots=2 if chunked else 1)
        elif offload:
            self.store = HostStore(self.numels, self.device, slots=2 if chunked else 1, pin=pin_memory)
        else:
            self.store = ResidentStore(self.numels, self.device)
        self.offload = offload or state_dir is not None
        for c in range(len(self.chunks)):
            self.store.initialize(c, (lambda flat, c=c: self._initialize(c, flat)) if self._has_masters(c) else None)

    @property
    def with_master(self) -> bool:
        return self.format.master != "none"

    @property
    def swapper(self):
        """The StateSwapper that moves chunks to the device, where the store has one."""
        return getattr(self.store, "swapper", None)

    def _has_masters(self, c: int) -> bool:
        """Whether chunk c starts with anything but zeros: its masters, unless they are the
        remainders of weights that are bf16 already (the masters are then the weights)."""
        if self.format.master == "remainder":
            params = self.groups[self.chunks[c].group].params
            return any(params[piece.param].dtype != torch.bfloat16 for piece in self.chunks[c].pieces)
        return self.with_master

    def _initialize(self, c: int, flat: Tensor) -> None:
        """Zero moments; the masters from the weights as they are now (before any cast, so an
        fp32 model's masters keep every bit it had)."""
        flat.zero_()
        params = self.groups[self.chunks[c].group].params
        with torch.no_grad():
            for master, piece in zip(self._views(c, flat).masters, self.chunks[c].pieces):
                value = params[piece.param].detach().reshape(-1)[piece.lo:piece.hi]
                if self.format.master == "remainder":
                    master.copy_(formats.split_master(value.float())[1])
                else:
                    master.copy_(value)

    def cast_weights(self, dtype: torch.dtype) -> None:
        """Cast the trained weights to `dtype` as the master format rounds them (a remainder's
        weight rounds ties away from zero), so that each weight and its master agree."""
        with torch.no_grad():
            for group in self.groups:
                for p in group.params:
                    if p.dtype == dtype:
                        continue
                    if self.format.master == "remainder":
                        p.data = formats.round_to_bf16_weight(p.data.float())
                    else:
                        p.data = p.data.to(dtype)

    def offsets(self, c: int) -> list[int]:
        """Where each piece of chunk c starts in its group's element numbering."""
        starts = self.param_starts[self.chunks[c].group]
        return [starts[piece.param] + piece.lo for piece in self.chunks[c].pieces]

    def storage(self, c: int) -> Tensor:
        """Chunk c's buffer where it rests in memory: on the host with offload, else on the
        device (call synchronize() first; the disk store reads a copy from its file)."""
        return self.store.resting(c)

    def _views(self, c: int, flat: Tensor) -> StateViews:
        n = self.chunks[c].numel
        raw = flat.view(torch.uint8)
        per_part, start = [], 0
        for dtype, nbytes in zip(self.format.dtypes, self.format.section_bytes(n)):
            section = raw[start : start + nbytes].view(dtype)[:n] if dtype is not None else None
            start += nbytes
            views, offset = [], 0
            for piece in self.chunks[c].pieces if section is not None else []:
                views.append(section[offset : offset + piece.numel])
                offset += piece.numel
            per_part.append(views)
        return StateViews(*per_part)

    def read_ahead(self, g: int) -> None:
        """Group g trains next: start bringing its first chunk nearer (the disk store reads it
        into host memory while the current step computes)."""
        self.store.read_ahead(self.chunks_of[g][0])

    def prefetch(self, c: int) -> None:
        self.store.prefetch(c)

    def acquire(self, c: int) -> StateViews:
        """Chunk c's state on the device, ready for the update on the current stream."""
        return self._views(c, self.store.acquire(c))

    def release(self, c: int) -> None:
        """The update of chunk c is enqueued: copy it back out (offload) and free its slot."""
        self.store.release(c)

    def update_group(self, g: int, *, lr: Tensor, step: Tensor, betas: tuple[float, float], eps: float,
                     weight_decays: list[float], grad_scale: Optional[Tensor], found_inf: Tensor) -> None:
        """The fused AdamW over group g from its parameters' grads, one state chunk at a time
        (the next chunk's copy-in overlaps this one's update)."""
        params = self.groups[g].params
        chunks = self.chunks_of[g]
        seed = formats.group_seed(self.seed, g)
        for k, c in enumerate(chunks):
            if k + 1 < len(chunks):
                self.prefetch(chunks[k + 1])
            views = self.acquire(c)
            # A parameter the loss did not reach has no grad: like torch's AdamW, it is not updated.
            keep = [j for j, piece in enumerate(self.chunks[c].pieces) if params[piece.param].grad is not None]
            pieces = [self.chunks[c].pieces[j] for j in keep]
            offsets = self.offsets(c)
            pick = lambda views: [views[j] for j in keep]
            ops.adamw_(
                [_flat_piece(params[pc.param], pc) for pc in pieces],
                pick(views.masters) if views.masters else [], pick(views.exp_avgs), pick(views.exp_avg_sqs),
                [_flat_piece(params[pc.param].grad, pc) for pc in pieces],
                lr=lr, step=step, beta1=betas[0], beta2=betas[1], eps=eps,
                weight_decays=[weight_decays[pc.param] for pc in pieces],
                grad_scale=grad_scale, found_inf=found_inf, seed=seed, offsets=pick(offsets),
            )
            self.release(c)

    def synchronize(self) -> None:
        """Wait for every copy and write in flight, so resting state can be read (checkpoints)."""
        self.store.synchronize()

    def close(self) -> None:
        """Wait for every copy in flight, then unpin and let go of the store's buffers (fit
        calls it on the way out, also when it raises). Idempotent."""
        self.store.close()

    def save_chunks(self, write: Callable[[int, Tensor], None]) -> None:
        """Hand each chunk's resting bytes to write(c, bytes), one chunk in memory at a time."""
        self.synchronize()
        for c in range(len(self.chunks)):
            write(c, self.store.resting(c).cpu().view(torch.uint8))

    def load_chunks(self, read: Callable[[int], Tensor]) -> None:
        """Overwrite each chunk's resting bytes with read(c)."""
        self.synchronize()
        for c in range(len(self.chunks)):
            data = read(c)
            if data.numel() != self.numels[c] * 4:
                raise ValueError(f"chunk {c} has {data.numel()} bytes, this run's has {self.numels[c] * 4}")
            self.store.load_chunk(c, data)

    def host_views(self, g: int) -> StateViews:
        """Group g's resting state, one flat tensor per piece of its chunks in order (call
        synchronize() first when offloading)."""
        views = [self._views(c, self.storage(c)) for c in self.chunks_of[g]]
        return StateViews(*([t for v in views for t in getattr(v, part)]
                            for part in ("masters", "exp_avgs", "exp_avg_sqs")))

    def param_state(self, g: int) -> StateViews:
        """Group g's resting state per parameter as fp32 values, shaped like it (a copy where a
        parameter is split over chunks or its format is compact): e.g. the fp32 masters of a
        bf16 run, rebuilt from the weights where only their remainders are kept. Call
        synchronize() first."""
        params = self.groups[g].params
        pieces = [piece for c in self.chunks_of[g] for piece in self.chunks[c].pieces]
        flat = self.host_views(g)

        def per_param(tensors: list[Tensor]) -> list[Tensor]:
            parts: list[list[Tensor]] = [[] for _ in params]
            for piece, t in zip(pieces, tensors):
                parts[piece.param].append(t)
            return [(ts[0] if len(ts) == 1 else torch.cat(ts)).view(p.shape) for ts, p in zip(parts, params)]

        masters, exp_avgs, exp_avg_sqs = (per_param(getattr(flat, part)) if getattr(flat, part) else []
                                          for part in ("masters", "exp_avgs", "exp_avg_sqs"))
        if self.format.master == "remainder":
            masters = [formats.join_master(p.detach().to(r.device), r) for p, r in zip(params, masters)]
        return StateViews(masters, [m.float() for m in exp_avgs], [v.float() for v in exp_avg_sqs])


def _flat_piece(t: Tensor, piece: Piece) -> Tensor:
    """Elements [lo, hi) of a contiguous tensor, as a flat view the update writes through."""
    return t.detach().view(-1)[piece.lo : piece.hi]
