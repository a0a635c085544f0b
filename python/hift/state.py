"""Per-group AdamW state: where it lives and how it moves.

A group's state is cut into chunks: by default one chunk per group, or, with a chunk size,
pieces of at most that many parameters (a large parameter is split by element ranges). Each
chunk is one flat fp32 buffer laid out as [master | exp_avg | exp_avg_sq] (the master only
when the weights are bf16/fp16), so it moves between host and device in one copy.

With offload on, every chunk rests on the host (pinned when the device is CUDA) and a
StateSwapper brings it into a device slot on a side stream:
- whole-group chunks: one slot; the group's state is copied in while its own forward and
  backward run (the update is the only thing that needs it);
- smaller chunks: two slots, double-buffered through the update (chunk i+1 comes in while
  chunk i is updated), so the device holds two chunks instead of the largest group; the update
  then waits on its copies, which is the price of the memory.
Without offload every chunk stays on the device. The per-group step counters (bias
correction) are tiny and always on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from hift.groups import Group


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
    def __init__(self, groups: list[Group], device: torch.device, with_master: bool,
                 offload: bool, pin_memory: bool = True, chunk_mib: Optional[float] = None):
        self.groups = groups
        self.device = torch.device(device)
        self.with_master = with_master
        self.offload = offload
        self.parts = 3 if with_master else 2
        chunk_numel = None if chunk_mib is None else max(1, int(chunk_mib * 2**20) // (4 * self.parts))
        self.chunks: list[Chunk] = []
        self.chunks_of: list[list[int]] = []
        for group in groups:
            pieces = split_into_chunks(group, chunk_numel)
            self.chunks_of.append(list(range(len(self.chunks), len(self.chunks) + len(pieces))))
            self.chunks.extend(pieces)
        self.numels = [c.numel * self.parts for c in self.chunks]
        self.steps = torch.zeros(len(groups), dtype=torch.float32, device=self.device)
        if offload:
            from hift.swap import make_swapper

            # On a CPU device, offload asks for the same slot logic with plain copies.
            slots = 1 if chunk_numel is None else 2
            self.swapper = make_swapper(self.numels, self.device, slots=slots,
                                        pin=pin_memory and self.device.type == "cuda", force_slots=True)
            self._resident = None
        else:
            self.swapper = None
            self._resident = [torch.zeros(n, dtype=torch.float32, device=self.device) for n in self.numels]
        for c in range(len(self.chunks)):
            self._initialize(c)

    def _initialize(self, c: int) -> None:
        flat = self.storage(c)
        flat.zero_()
        if self.with_master:
            params = self.groups[self.chunks[c].group].params
            with torch.no_grad():
                for master, piece in zip(self._views(c, flat).masters, self.chunks[c].pieces):
                    master.copy_(params[piece.param].detach().reshape(-1)[piece.lo:piece.hi])

    def storage(self, c: int) -> Tensor:
        """Where chunk c's state rests: its host buffer with offload, else its device buffer."""
        return self.swapper.host(c) if self.offload else self._resident[c]

    def _views(self, c: int, flat: Tensor) -> StateViews:
        n = self.chunks[c].numel
        per_part = []
        for section in (flat[i * n : (i + 1) * n] for i in range(self.parts)):
            views, offset = [], 0
            for piece in self.chunks[c].pieces:
                views.append(section[offset : offset + piece.numel])
                offset += piece.numel
            per_part.append(views)
        return StateViews(*per_part) if self.with_master else StateViews([], *per_part)

    def prefetch(self, c: int) -> None:
        if self.offload:
            self.swapper.prefetch(c)

    def acquire(self, c: int) -> StateViews:
        """Chunk c's state on the device, ready for the update on the current stream."""
        flat = self.swapper.acquire(c) if self.offload else self._resident[c]
        return self._views(c, flat)

    def release(self, c: int) -> None:
        """The update of chunk c is enqueued: copy it back out (offload) and free its slot."""
        if self.offload:
            self.swapper.writeback(c)

    def synchronize(self) -> None:
        """Wait for every copy in flight, so host buffers can be read (checkpoints)."""
        if self.offload:
            self.swapper.synchronize()

    def host_views(self, g: int) -> StateViews:
        """Group g's resting state, one flat tensor per piece of its chunks in order (call
        synchronize() first when offloading)."""
        views = [self._views(c, self.storage(c)) for c in self.chunks_of[g]]
        return StateViews(*([t for v in views for t in getattr(v, part)]
                            for part in ("masters", "exp_avgs", "exp_avg_sqs")))

    def param_state(self, g: int) -> StateViews:
        """Group g's resting state per parameter, shaped like it (a copy where a parameter is
        split over chunks): e.g. the fp32 masters of a bf16 run. Call synchronize() first."""
        params = self.groups[g].params
        pieces = [piece for c in self.chunks_of[g] for piece in self.chunks[c].pieces]
        flat = self.host_views(g)

        def per_param(tensors: list[Tensor]) -> list[Tensor]:
            parts: list[list[Tensor]] = [[] for _ in params]
            for piece, t in zip(pieces, tensors):
                parts[piece.param].append(t)
            return [(ts[0] if len(ts) == 1 else torch.cat(ts)).view(p.shape) for ts, p in zip(parts, params)]

        return StateViews(*(per_param(getattr(flat, part)) if getattr(flat, part) else []
                            for part in ("masters", "exp_avgs", "exp_avg_sqs")))
