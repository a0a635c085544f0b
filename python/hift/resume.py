"""The method's state as plain data, and the one way back from it: what a fit checkpoint and
HiftAdamW.state_dict() both hold.

MethodState is everything of HiftAdamW that is not the chunks' bytes: the run's fingerprint, the
step counts, the rotation, the cycle's learning rates, the loss scale, the skips, and whose shard
of which layout the chunks are. It is JSON as it stands (numbers, strings, lists, dicts), so a
checkpoint stores it as state/method.json beside the chunk files and a state_dict as
state_dict["hift"] beside the chunks' bytes: both load with weights_only=True or as JSON, and
neither can run code. FORMAT is its version; a state of another version is refused in words
that name it (no older format is read).

One check (differences) says whether a saved state belongs to this run; one reader
(chunk_reader) brings a run's chunks in from what one or every saving rank wrote, re-cut where
the layout differs (hift.reshard); ShardGate holds back the first step after another rank's
shard was loaded until this rank's own arrives.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from safetensors import safe_open
from torch import Tensor

from hift import reshard

# 4: one MethodState in fit checkpoints and state_dicts, every layout recorded
FORMAT = 4

Source = Union[Path, Tensor]  # a saved chunk: its safetensors file ("bytes"), or its bytes


class FormatError(ValueError):
    """A saved state written by another version of hift's format."""


@dataclass
class MethodState:
    run: dict  # the fingerprint: what a resumed run must share (groups, formats, precision, order, seed)
    steps: list[float]  # per group, the updates it took (AdamW's bias correction)
    order: dict  # the rotation's position (GroupOrder.state_dict)
    cycle_lrs: Optional[list[float]]  # the current cycle's learning rates (None: read at the next step)
    scaler: dict  # the loss scale (LossScaler.state_dict)
    steps_taken: int  # step() calls, skipped ones included
    skipped: float  # updates skipped on a non-finite gradient or loss
    rank: int  # whose shard the chunks are
    world: int  # how many ranks saved the run
    layout: list  # how the chunks are cut (OptimizerState.layout)
    format: int = FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict, where: str = "this state") -> "MethodState":
        """The MethodState of a to_dict(); refuses another format in words that name it."""
        version = saved.get("format")
        if version != FORMAT:
            wrote = f"format {version}" if version is not None else "a format before 4 (it records none)"
            raise FormatError(f"{where} was written in {wrote} of hift's optimizer state, and this hift reads "
                              f"format {FORMAT} only: resume it with the hift that wrote it, or start the run again")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


def differences(ours: dict, theirs: dict) -> Optional[str]:
    """How a saved run's fingerprint differs from this run's, in words (None: it does not). The
    number of ranks and the chunking are no difference: the state is re-cut as it loads."""
    differ = [k for k in sorted(set(ours) | set(theirs)) if theirs.get(k) != ours.get(k)]
    if not differ:
        return None

    def shown(run, key):
        value = run.get(key)
        return f"{len(value)} entries" if isinstance(value, list) else repr(value)

    return "; ".join(f"{k}: {shown(theirs, k)} there, {shown(ours, k)} here" for k in differ)


def _pieces(layout: list) -> list:
    """A layout's chunks and pieces, without how the pieces lie in the chunk buffers."""
    return [entry[:2] for entry in layout]


def covers(saved: Sequence[MethodState], rank: int, world: int, layout: list) -> bool:
    """Whether the saved shards hold every element of this rank's chunks: every saving rank's,
    one process's, or this rank's own of a run of as many ranks cut the same way."""
    if sorted(m.rank for m in saved) == list(range(saved[0].world)):
        return True
    return any(m.world == world and m.rank == rank and _pieces(m.layout) == _pieces(layout) for m in saved)


def _read(source: Source) -> Tensor:
    if isinstance(source, Tensor):
        return source
    with safe_open(str(source), framework="pt") as f:
        return f.get_tensor("bytes")


def chunk_reader(state, saved: Sequence[tuple[MethodState, Sequence[Source]]], rank: int,
                 world: int) -> Callable[[int], Tensor]:
    """read(c): chunk c of `state` (an OptimizerState) from the saving ranks' chunks: the saved
    chunk itself where this rank saved it cut as here, else assembled from the saved chunks
    (hift.reshard; a reshard.LayoutError where they miss some of its elements)."""
    layout = state.layout()
    for method, sources in saved:
        if method.world == world and method.rank == rank and method.layout == layout:
            return lambda c: _read(sources[c])
    source = reshard.SavedState([(chunk, entry) for method, sources in saved
                                 for chunk, entry in zip(sources, method.layout)], state.format)
    return lambda c: source.assemble(state.chunks[c])


class ShardGate:
    """After another rank's shard was loaded (a 🤗 Trainer hands every rank rank 0's optimizer.pt),
    the first step refuses on every rank until each has its own (agreed in one all-reduce, so
    that no rank goes on alone)."""

    def __init__(self):
        self.foreign_rank: Optional[int] = None  # whose shard was loaded in place of this rank's
        self.saved_world = 1
        self._check = False  # a load happened since the last step

    @property
    def waiting(self) -> bool:
        """This rank was given another rank's shard and not yet its own."""
        return self.foreign_rank is not None

    def loaded(self, foreign_rank: Optional[int], saved_world: int) -> None:
        self.foreign_rank, self.saved_world, self._check = foreign_rank, saved_world, True

    def check(self, dp) -> None:
        """Before the first step after a load (dp: hift.distributed.DataParallel, or None)."""
        if not self._check:
            return
        self._check = False
        rank = dp.rank if dp is not None else 0
        missing = [self.waiting]
        if dp is not None:
            flags = torch.zeros(dp.world)
            flags[rank] = float(missing[0])
            missing = [bool(f) for f in dp.mean(flags) > 0]
        if any(missing):
            ranks = ", ".join(str(r) for r, m in enumerate(missing) if m)
            raise ValueError(
                f"rank(s) {ranks} were given another rank's shard of the optimizer state to load, and never their "
                f"own (this is rank {rank}; the state was saved by {self.saved_world} rank(s)): each rank holds its "
                "own shard. A 🤗 Trainer saves optimizer.pt from rank 0 alone; pass callbacks=[hift.TrainerShards()] "
                "to the Trainer, which saves every rank's shard in each checkpoint and loads this rank's share on "
                "resume, on any number of ranks. Elsewhere (accelerate's save_state, your own loop), call "
                "hift.save_shard(opt, folder) on every rank when you save and hift.load_shards(opt, folder) when "
                "you load")
