"""Per-group AdamW state: where it lives and how it moves.

A group's state is cut into chunks: by default one chunk per group, or, with a chunk size,
pieces of at most that many parameters (a large parameter is split by element ranges). Each
chunk is one flat buffer of bytes laid out as [master | exp_avg | exp_avg_sq], each section in
its format (hift.formats: an fp32 master or a bf16 weight's int16 remainder, none for fp32
weights; fp32, bf16 or int8 moments, the last followed by two sections of their blocks' fp32
scales, [exp_avg scales | exp_avg_sq (lo, hi)]). Each piece starts 16-byte aligned in each
section, and a chunk cuts a parameter only at multiples of 16 elements (of 256 with int8 moments:
blocks stay whole), so that the weight, gradient and state of every piece are where the CUDA
kernel's 16-byte vector loads can reach them. A chunk moves between host and device in one copy
whatever the formats. (The buffer is held as fp32 words, the unit the swappers move.)

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

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

from hift import formats, ops
from hift.store import DiskStore, HostStore, ResidentStore

if TYPE_CHECKING:  # (groups imports fsdp, which imports this module)
    from hift.groups import Group

_ALIGN = 16  # bytes: each section, and each piece in it, starts where a 16-byte vector load can
# Bytes each piece starts on in its sections, as layout() records it. Checkpoints of a hift
# before piece alignment record none: their pieces lie end to end (PACKED).
PIECE_ALIGN = _ALIGN
PACKED = 1
_CUT = 16  # elements: a cut at a multiple keeps 1-, 2- and 4-byte elements 16-byte aligned


def _aligned(nbytes: int, to: int = _ALIGN) -> int:
    return -(-nbytes // to) * to


@dataclass(frozen=True)
class StateFormat:
    """How one group's state is stored: the master ("none", "fp32", "remainder") and the moments
    ("fp32", "bf16"); see hift.formats."""

    master: str = "none"
    moments: str = "fp32"

    @property
    def int8(self) -> bool:
        return self.moments == "int8"

    @property
    def dtypes(self) -> list[Optional[torch.dtype]]:
        """The dtype of each section (None: the section is absent): master, exp_avg, exp_avg_sq,
        then for int8 moments their blocks' fp32 scales."""
        master = None if self.master == "none" else formats.STORAGE_DTYPES[self.master]
        if self.int8:
            return [master, *formats.INT8_DTYPES.values(), torch.float32, torch.float32]
        moment = formats.STORAGE_DTYPES[self.moments]
        return [master, moment, moment]

    @property
    def bytes_per_element(self) -> float:
        return formats.state_bytes_per_element(self.master, self.moments)

    @property
    def block(self) -> int:
        """int8 moments keep a parameter's blocks whole: a cut falls on a multiple of this."""
        return formats.INT8_BLOCK if self.int8 else 1

    @property
    def cut(self) -> int:
        """Where a chunk cuts a parameter: at multiples of this many elements (whole int8 blocks,
        and 16-byte aligned for every role's dtype)."""
        return math.lcm(self.block, _CUT)

    def section_elements(self, numel: int, blocks: int) -> list[int]:
        """Elements of each section for numel parameters in `blocks` int8 blocks."""
        scales = [blocks * k for k in formats.INT8_SCALES.values()] if self.int8 else []
        return [numel, numel, numel, *scales]

    def section_bytes(self, numel: int, blocks: Optional[int] = None) -> list[int]:
        """Each section's bytes, 16-byte aligned; `blocks` defaults to one tensor's."""
        blocks = formats.int8_blocks(numel) if blocks is None else blocks
        return [0 if d is None else _aligned(k * d.itemsize)
                for d, k in zip(self.dtypes, self.section_elements(numel, blocks))]


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

    @property
    def blocks(self) -> int:
        """int8 blocks: each piece starts on a block of its parameter."""
        return sum(formats.int8_blocks(p.numel) for p in self.pieces)


@dataclass
class StateViews:
    """Views into one chunk's flat state buffer, one flat tensor per piece, in piece order."""

    masters: list[Tensor]  # empty when the weights are fp32 (they are their own masters)
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    exp_avg_scales: list[Tensor] = field(default_factory=list)  # int8 moments only
    exp_avg_sq_scales: list[Tensor] = field(default_factory=list)


def chunk_numel(format: StateFormat, chunk_mib: Optional[float]) -> Optional[int]:
    """Parameters per state chunk for a chunk size in MiB (None: whole groups): a multiple of
    format.cut, at least one."""
    if chunk_mib is None:
        return None
    numel = int(chunk_mib * 2**20 / format.bytes_per_element)
    return max(format.cut, numel - numel % format.cut)


def cut_into_chunks(sizes: list[int], max_numel: Optional[int], block: int = 1) -> list[list[Piece]]:
    """Parameters of these sizes, in order, cut into chunks of at most max_numel elements (one
    chunk holding them all when max_numel is None); a parameter is cut only at multiples of
    `block` (max_numel is at least one block)."""
    if max_numel is None:
        return [[Piece(i, 0, n) for i, n in enumerate(sizes)]]
    chunks, pieces, room = [], [], max_numel
    for i, n in enumerate(sizes):
        lo = 0
        while lo < n:
            take = min(room, n - lo)
            if lo + take < n:
                take -= take % block
                if take == 0:  # not a whole block left in this chunk: start the next
                    chunks.append(pieces)
                    pieces, room = [], max_numel
                    continue
            pieces.append(Piece(i, lo, lo + take))
            lo += take
            room -= take
            if room == 0:
                chunks.append(pieces)
                pieces, room = [], max_numel
    if pieces:
        chunks.append(pieces)
    return chunks


def chunk_pieces(shard: list[Piece], max_numel: Optional[int], block: int) -> list[list[Piece]]:
    """A rank's pieces (of several parameters, in parameter order) cut into state chunks of at
    most max_numel elements (one chunk when None; one empty chunk where the rank holds nothing);
    each piece is cut at multiples of `block` counted from its own first element."""
    if not shard:
        return [[]]
    cuts = cut_into_chunks([p.numel for p in shard], max_numel, block)
    return [[Piece(shard[c.param].param, shard[c.param].lo + c.lo, shard[c.param].lo + c.hi) for c in chunk]
            for chunk in cuts]


def whole(t: Tensor) -> tuple[Tensor, int]:
    """The elements of t this process holds and where the first lies in t's flat numbering: for
    a plain tensor, all of it from element 0 (hift.fsdp.local_of: an FSDP2 DTensor's rows)."""
    return t.detach(), 0


def split_into_chunks(group: Group, max_numel: Optional[int], block: int = 1) -> list[Chunk]:
    """The group's parameters cut into chunks (cut_into_chunks)."""
    return [Chunk(group.index, pieces) for pieces in cut_into_chunks([p.numel() for p in group.params], max_numel, block)]


def piece_align(entry: list) -> int:
    """The bytes a layout() entry's pieces start on in their sections (PACKED where an older
    hift saved it without saying)."""
    return entry[2] if len(entry) > 2 else PACKED


@dataclass
class Section:
    """One section of a chunk's buffer (hift.state's byte layout): where it starts and its bytes,
    its dtype (None: absent in this format), and where each piece's elements start in it and how
    many there are (scales: so many per int8 block of the piece)."""

    start: int
    nbytes: int
    dtype: Optional[torch.dtype]
    per_block: Optional[int]  # None: one element per parameter element
    starts: list[int]
    sizes: list[int]

    def span(self, piece: Piece, j: int, lo: int, hi: int) -> tuple[int, int]:
        """The bytes [first, last) that hold elements [lo, hi) of piece j (its parameter's
        numbering); with scales, lo is a block boundary of the piece and hi one or its end."""
        if self.per_block is None:
            at, n = self.starts[j] + lo - piece.lo, hi - lo
        else:
            at, n = self.starts[j] + (lo - piece.lo) // formats.INT8_BLOCK * self.per_block, \
                formats.int8_blocks(hi - lo) * self.per_block
        size = self.dtype.itemsize
        return self.start + at * size, self.start + (at + n) * size


def chunk_sections(format: StateFormat, pieces: list[Piece], align: int = PIECE_ALIGN) -> list[Section]:
    """The sections of a chunk of these pieces, in buffer order; each section starts 16-byte
    aligned, each piece in it on `align` bytes (PACKED: end to end, as hift saved before)."""
    per_block = [None, None, None, *formats.INT8_SCALES.values()]
    sections, start = [], 0
    for dtype, k in zip(format.dtypes, per_block):
        sizes = [p.numel if k is None else formats.int8_blocks(p.numel) * k for p in pieces]
        if dtype is None:
            sections.append(Section(start, 0, None, k, [0] * len(pieces), sizes))
            continue
        step = max(1, align // dtype.itemsize)  # elements per alignment unit
        starts, end = [], 0
        for n in sizes:
            starts.append(_aligned(end, step))
            end = starts[-1] + n
        nbytes = _aligned(end * dtype.itemsize)
        sections.append(Section(start, nbytes, dtype, k, starts, sizes))
        start += nbytes
    return sections


def chunk_bytes(chunk: Chunk, format: StateFormat, align: int = PIECE_ALIGN) -> int:
    """The bytes of one chunk's buffer."""
    return sum(section.nbytes for section in chunk_sections(format, chunk.pieces, align))


class OptimizerState:
    def __init__(self, groups: list[Group], device: torch.device, format: StateFormat,
                 offload: bool, pin_memory: bool = True, chunk_mib: Optional[float] = None,
                 seed: int = 0, state_dir: Optional[str] = None,
                 shard: Optional[list[list[list[Piece]]]] = None,
                 local: Callable[[Tensor], tuple[Tensor, int]] = whole):
        """shard: per group, the pieces of each chunk this state holds (a data-parallel rank's
        share, hift.distributed; an FSDP2 rank's rows, hift.fsdp); None: every element of every
        group, chunked by chunk_mib. Pieces number a parameter's elements globally; local(t)
        gives the elements of a weight or gradient this process holds and where they start in
        that numbering (whole: all, from 0), and every read or write of one goes through it."""
        self.groups = groups
        self.local = local
        self.device = torch.device(device)
        self.format = format
        self.seed = seed
        # where each parameter starts in its group's element numbering (stochastic rounding
        # draws by it, so the bits do not depend on how the state is chunked)
        self.param_starts = [[sum(p.numel() for p in g.params[:i]) for i in range(len(g.params))] for g in groups]
        max_numel = chunk_numel(format, chunk_mib)
        self.chunks: list[Chunk] = []
        self.chunks_of: list[list[int]] = []
        for index, group in enumerate(groups):
            if shard is None:
                pieces = split_into_chunks(group, max_numel, format.cut)
            else:
                pieces = [Chunk(group.index, chunk) for chunk in shard[index]]
            self.chunks_of.append(list(range(len(self.chunks), len(self.chunks) + len(pieces))))
            self.chunks.extend(pieces)
        # fp32 words per chunk buffer
        self.numels = [chunk_bytes(c, format) // 4 for c in self.chunks]
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
                value = self.piece_of(params[piece.param], piece)
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

    def piece_of(self, t: Tensor, piece: Piece) -> Tensor:
        """Elements [lo, hi) of a weight or gradient (its flat numbering), as a flat view of what
        this process holds that the update writes through."""
        held, at = self.local(t)
        return held.view(-1)[piece.lo - at : piece.hi - at]

    def offsets(self, c: int) -> list[int]:
        """Where each piece of chunk c starts in its group's element numbering."""
        starts = self.param_starts[self.chunks[c].group]
        return [starts[piece.param] + piece.lo for piece in self.chunks[c].pieces]

    def storage(self, c: int) -> Tensor:
        """Chunk c's buffer where it rests in memory: on the host with offload, else on the
        device (call synchronize() first; the disk store reads a copy from its file)."""
        return self.store.resting(c)

    def _views(self, c: int, flat: Tensor) -> StateViews:
        raw = flat.view(torch.uint8)
        per_part = []
        for section in chunk_sections(self.format, self.chunks[c].pieces):
            if section.dtype is None:
                per_part.append([])
                continue
            data = raw[section.start : section.start + section.nbytes].view(section.dtype)
            per_part.append([data[at : at + n] for at, n in zip(section.starts, section.sizes)])
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
                     weight_decays: list[float], grad_scale: Optional[Tensor], found_inf: Tensor,
                     grad_of: Optional[Callable[[Piece], Optional[Tensor]]] = None) -> None:
        """The fused AdamW over group g from its parameters' grads, one state chunk at a time:
        acquire k, launch its update, release k, then prefetch k+1 (its copy-in overlaps
        update k, which no wait for k+1 delays). grad_of(piece): a piece's flat
        gradient, None where its parameter has none (data parallel: the reduced shard); by
        default the piece of its parameter's .grad."""
        params = self.groups[g].params
        if grad_of is None:
            grad_of = lambda pc: None if params[pc.param].grad is None else self.piece_of(params[pc.param].grad, pc)
        chunks = self.chunks_of[g]
        seed = formats.group_seed(self.seed, g)
        for k, c in enumerate(chunks):
            views = self.acquire(c)  # (its copy-in began during the previous chunk's update)
            # A parameter the loss did not reach has no grad: like torch's AdamW, it is not updated.
            grads = [grad_of(piece) for piece in self.chunks[c].pieces]
            keep = [j for j, grad in enumerate(grads) if grad is not None]
            pieces = [self.chunks[c].pieces[j] for j in keep]
            offsets = self.offsets(c)
            pick = lambda views: [views[j] for j in keep]
            ops.adamw_(
                [self.piece_of(params[pc.param], pc) for pc in pieces],
                pick(views.masters) if views.masters else [], pick(views.exp_avgs), pick(views.exp_avg_sqs),
                pick(grads),
                lr=lr, step=step, beta1=betas[0], beta2=betas[1], eps=eps,
                weight_decays=[weight_decays[pc.param] for pc in pieces],
                grad_scale=grad_scale, found_inf=found_inf, seed=seed, offsets=pick(offsets),
                exp_avg_scales=pick(views.exp_avg_scales) if views.exp_avg_scales else [],
                exp_avg_sq_scales=pick(views.exp_avg_sq_scales) if views.exp_avg_sq_scales else [],
            )
            self.release(c)
            # Only now, with update k launched: the next chunk's copy-in runs beside it, and the
            # disk store's wait for the next chunk's file cannot hold the update back.
            if k + 1 < len(chunks):
                self.prefetch(chunks[k + 1])

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

    def layout(self) -> list:
        """Each chunk's group, pieces and the bytes each piece starts on in its sections, as JSON
        ([group, [[param, lo, hi], ...], PIECE_ALIGN]): what a checkpoint records so that another
        layout can read it (hift.reshard)."""
        return [[chunk.group, [[p.param, p.lo, p.hi] for p in chunk.pieces], PIECE_ALIGN] for chunk in self.chunks]

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
        return StateViews(*([t for v in views for t in getattr(v, part)] for part in _PARTS))

    def param_state(self, g: int) -> StateViews:
        """Group g's resting state per parameter as fp32 values, shaped like what this process
        holds of it (the parameter, or an FSDP2 rank's rows; a copy where a
        parameter is split over chunks or its format is compact): e.g. the fp32 masters of a
        bf16 run, rebuilt from the weights where only their remainders are kept. Call
        synchronize() first."""
        params = self.groups[g].params
        pieces = [piece for c in self.chunks_of[g] for piece in self.chunks[c].pieces]
        flat = self.host_views(g)
        if self.format.int8:
            flat.exp_avgs = [formats.decode_exp_avg(q, s) for q, s in zip(flat.exp_avgs, flat.exp_avg_scales)]
            flat.exp_avg_sqs = [formats.decode_exp_avg_sq(q, s) for q, s in zip(flat.exp_avg_sqs, flat.exp_avg_sq_scales)]

        held = [self.local(p)[0] for p in params]  # the whole weight, or this rank's rows of it

        def per_param(tensors: list[Tensor]) -> list[Tensor]:
            parts: list[list[Tensor]] = [[] for _ in params]
            for piece, t in zip(pieces, tensors):
                parts[piece.param].append(t)
            return [(ts[0] if len(ts) == 1 else torch.cat(ts) if ts else torch.empty(0)).view(h.shape)
                    for ts, h in zip(parts, held)]

        masters, exp_avgs, exp_avg_sqs = (per_param(getattr(flat, part)) if getattr(flat, part) else []
                                          for part in ("masters", "exp_avgs", "exp_avg_sqs"))
        if self.format.master == "remainder":
            masters = [formats.join_master(h.to(r.device), r) for h, r in zip(held, masters)]
        return StateViews(masters, [m.float() for m in exp_avgs], [v.float() for v in exp_avg_sqs])


_PARTS = ("masters", "exp_avgs", "exp_avg_sqs", "exp_avg_scales", "exp_avg_sq_scales")
