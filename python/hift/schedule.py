"""Which group trains at each step, and the learning rate of each cycle.

A cycle updates every group exactly once, in the cycle's order. The learning-rate schedule is
a function of the cycle alone, and its length is counted in cycles, so a run of C cycles over
K groups warms up and decays over C cycles (the published code counted its length in steps and
stepped once per cycle, which stretched the schedule K-fold).
"""
from __future__ import annotations

import math

import torch


class GroupOrder:
    """The rotation of K groups: bottom_up (embeddings first), top_down (head first) or random
    (a fresh permutation every cycle, seeded by (seed, cycle) so a resumed run sees the same one).

    `advance()` moves to the next group only after a completed update; a skipped update (fp16
    overflow) keeps the same group so that it trains on the next batch.
    """

    def __init__(self, num_groups: int, order: str, seed: int = 0):
        self.num_groups = num_groups
        self.order = order
        self.seed = seed
        self.cycle = 0  # cycles completed
        self.position = 0  # index into the current cycle's order
        self._current_order = self.order_of_cycle(0)

    def order_of_cycle(self, cycle: int) -> list[int]:
        k = self.num_groups
        if self.order == "bottom_up":
            return list(range(k))
        if self.order == "top_down":
            return list(range(k - 1, -1, -1))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + cycle)
        return torch.randperm(k, generator=generator).tolist()

    @property
    def current(self) -> int:
        return self._current_order[self.position]

    @property
    def following(self) -> int:
        """The group after the current one, if the current one's update is not skipped."""
        if self.position + 1 < self.num_groups:
            return self._current_order[self.position + 1]
        return self.order_of_cycle(self.cycle + 1)[0]

    def advance(self) -> bool:
        """Move past the current group; True when that completed a cycle."""
        self.position += 1
        if self.position < self.num_groups:
            return False
        self.cycle += 1
        self.position = 0
        self._current_order = self.order_of_cycle(self.cycle)
        return True

    def state_dict(self) -> dict:
        return {"cycle": self.cycle, "position": self.position, "order": self.order,
                "seed": self.seed, "num_groups": self.num_groups}

    def load_state_dict(self, state: dict) -> None:
        self.cycle, self.position = int(state["cycle"]), int(state["position"])
        self._current_order = self.order_of_cycle(self.cycle)


def lr_at_cycle(cycle: int, *, base_lr: float, schedule: str, total_cycles: int, warmup_cycles: int) -> float:
    """Learning rate during cycle `cycle` (0-based) of `total_cycles`.

    Warm-up rises linearly from base_lr/(warmup+1) to base_lr over the first warmup cycles (so
    the first cycle already trains); then constant, linear decay to 0, or cosine decay to 0 at
    the end of the last cycle.
    """
    if cycle < warmup_cycles:
        return base_lr * (cycle + 1) / (warmup_cycles + 1)
    if schedule == "constant":
        return base_lr
    decay_cycles = max(1, total_cycles - warmup_cycles)
    progress = min(1.0, (cycle - warmup_cycles) / decay_cycles)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")
