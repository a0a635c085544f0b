"""Optimizer state saved in one layout, read into another: a data-parallel checkpoint resumed on
another number of ranks (each rank's shard is cut elsewhere), one process's checkpoint resumed
on several ranks or the reverse, or another state_chunk_mib.

A checkpoint records the pieces of every chunk it saved (OptimizerState.layout(), per rank under
data parallel). The state of an element does not depend on the chunk it rests in: stochastic
rounding draws by the element's index in its group, and every cut falls on a multiple of an int8
block of its parameter, so each block keeps its own scales. A chunk of the new layout is then
assembled by copying, section by section (hift.state.chunk_sections), the byte ranges of the
saved chunks that hold its elements: the saved bits, nothing decoded. Saved chunks are read by
byte range (safetensors slices the file in place; state_dicts are torch.load-ed with mmap), so
memory holds one new chunk at a time.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import torch
from safetensors import safe_open

from hift import formats
from hift.state import PIECE_ALIGN, Chunk, Piece, Section, StateFormat, chunk_bytes, chunk_sections, piece_align


@dataclass
class SavedChunk:
    source: Union[Path, torch.Tensor]  # its safetensors file ("bytes"), or its bytes in memory
    group: int
    pieces: list[Piece]
    sections: list[Section]


class LayoutError(ValueError):
    """Saved chunks that do not hold every element this run's layout asks for."""


class SavedState:
    """Every chunk a checkpoint saved, indexed by the parameters its pieces hold."""

    def __init__(self, saved: list[tuple[Union[Path, torch.Tensor], list]], format: StateFormat):
        """saved: each saved chunk's source (its safetensors file, or its bytes: a uint8 tensor)
        and layout entry ([group, [[param, lo, hi], ...], piece alignment]; without the alignment,
        an older hift's, the pieces lie end to end in each section)."""
        self.format = format
        self._holders: dict[tuple[int, int], list[tuple[SavedChunk, int]]] = {}
        for source, entry in saved:
            group, pieces = entry[0], [Piece(*piece) for piece in entry[1]]
            source = source if isinstance(source, torch.Tensor) else Path(source)
            chunk = SavedChunk(source, group, pieces, chunk_sections(format, pieces, piece_align(entry)))
            for k, piece in enumerate(pieces):
                self._holders.setdefault((group, piece.param), []).append((chunk, k))

    def assemble(self, chunk: Chunk, align: int = PIECE_ALIGN) -> torch.Tensor:
        """The bytes of `chunk` (this run's layout, its pieces on `align` bytes) from the saved
        chunks that hold its elements."""
        out = torch.zeros(chunk_bytes(chunk, self.format, align), dtype=torch.uint8)
        sections = chunk_sections(self.format, chunk.pieces, align)
        # per saved chunk: (piece j of chunk, the saved chunk, its piece k, elements [lo, hi))
        reads: dict[int, list[tuple[int, SavedChunk, int, int, int]]] = {}
        for j, piece in enumerate(chunk.pieces):
            covered = 0
            for saved, k in self._holders.get((chunk.group, piece.param), []):
                theirs = saved.pieces[k]
                lo, hi = max(piece.lo, theirs.lo), min(piece.hi, theirs.hi)
                if lo < hi:
                    if self.format.int8 and not all(_on_blocks(p, lo, hi) for p in (piece, theirs)):
                        raise LayoutError(
                            f"int8 moments of parameter {piece.param} of group {chunk.group} were saved in blocks "
                            f"from element {theirs.lo}, and this run's start at {piece.lo}: a block's scales hold "
                            "for its own elements only. An FSDP2 run's blocks start at each rank's first row, so "
                            "its int8 state loads onto the same rows alone (as many ranks)")
                    reads.setdefault(id(saved), []).append((j, saved, k, lo, hi))
                    covered += hi - lo
            if covered != piece.numel:
                raise LayoutError(
                    f"the saved state holds {covered} of the {piece.numel} elements [{piece.lo}:{piece.hi}] of "
                    f"parameter {piece.param} of group {chunk.group}")
        for parts in reads.values():
            with _bytes_of(parts[0][1].source) as data:
                for j, saved, k, lo, hi in parts:
                    for mine, theirs in zip(sections, saved.sections):
                        if mine.dtype is not None:
                            first, last = mine.span(chunk.pieces[j], j, lo, hi)
                            source_first, source_last = theirs.span(saved.pieces[k], k, lo, hi)
                            out[first:last] = data[source_first:source_last]
        return out


def _on_blocks(piece: Piece, lo: int, hi: int) -> bool:
    """Whether [lo, hi) starts on an int8 block of the piece and ends on one or at its end
    (data-parallel and chunk cuts always do: they fall on multiples of the block)."""
    return (lo - piece.lo) % formats.INT8_BLOCK == 0 and ((hi - piece.lo) % formats.INT8_BLOCK == 0 or hi == piece.hi)


@contextmanager
def _bytes_of(source: Union[Path, torch.Tensor]) -> Iterator:
    """A saved chunk's bytes to slice: in memory, or read by range from its file."""
    if isinstance(source, torch.Tensor):
        yield source.view(torch.uint8).reshape(-1)
        return
    with safe_open(str(source), framework="pt") as f:
        yield f.get_slice("bytes")
