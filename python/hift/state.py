"""Per-group AdamW state: where it lives and how it moves.

Each group's state is one flat fp32 buffer laid out as [master | exp_avg | exp_avg_sq] (the
master only when the weights are bf16/fp16), so a group moves between host and device in one
copy. With offload on, every group's buffer rests on the host (pinned when the device is CUDA)
and a StateSwapper brings the active group into a device slot on a side stream, while the
group's copy-in overlaps its own forward and backward (the update is the only thing that
needs it), so one device slot suffices; without offload every buffer stays on the device. The per-group step counters (bias correction) are tiny and always on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hift.groups import Group


@dataclass
class GroupBuffers:
    """Views into one group's flat state buffer, one tensor per parameter, in group order."""

    masters: list[Tensor]  # empty when the weights are fp32 (they are their own masters)
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]


class OptimizerState:
    def __init__(self, groups: list[Group], device: torch.device, with_master: bool,
                 offload: bool, pin_memory: bool = True):
        self.groups = groups
        self.device = torch.device(device)
        self.with_master = with_master
        self.offload = offload
        self.parts = 3 if with_master else 2
        self.numels = [g.numel * self.parts for g in groups]
        self.steps = torch.zeros(len(groups), dtype=torch.float32, device=self.device)
        if offload:
            from hift.swap import make_swapper

            # On a CPU device, offload asks for the same slot logic with plain copies.
            self.swapper = make_swapper(self.numels, self.device, slots=1,
                                        pin=pin_memory and self.device.type == "cuda", force_slots=True)
            self._resident = None
        else:
            self.swapper = None
            self._resident = [torch.zeros(n, dtype=torch.float32, device=self.device) for n in self.numels]
        for group in groups:
            self._initialize(group)

    def _initialize(self, group: Group) -> None:
        flat = self.storage(group.index)
        flat.zero_()
        if self.with_master:
            masters = self._views(group, flat).masters
            with torch.no_grad():
                for master, p in zip(masters, group.params):
                    master.copy_(p.detach().reshape(master.shape))

    def storage(self, g: int) -> Tensor:
        """Where group g's state rests: its host buffer with offload, else its device buffer."""
        return self.swapper.host(g) if self.offload else self._resident[g]

    def _views(self, group: Group, flat: Tensor) -> GroupBuffers:
        n = group.numel
        sections = [flat[i * n : (i + 1) * n] for i in range(self.parts)]
        per_part = []
        for section in sections:
            views, offset = [], 0
            for p in group.params:
                views.append(section[offset : offset + p.numel()].view(p.shape))
                offset += p.numel()
            per_part.append(views)
        if self.with_master:
            return GroupBuffers(*per_part)
        return GroupBuffers([], *per_part)

    def prefetch(self, g: int) -> None:
        if self.offload:
            self.swapper.prefetch(g)

    def acquire(self, g: int) -> GroupBuffers:
        """Group g's state on the device, ready for the update on the current stream."""
        flat = self.swapper.acquire(g) if self.offload else self._resident[g]
        return self._views(self.groups[g], flat)

    def release(self, g: int) -> None:
        """The update of g is enqueued: copy its state back out (offload) and free the slot."""
        if self.offload:
            self.swapper.writeback(g)

    def synchronize(self) -> None:
        """Wait for every copy in flight, so host buffers can be read (checkpoints)."""
        if self.offload:
            self.swapper.synchronize()

    def host_views(self, g: int) -> GroupBuffers:
        """Group g's resting state (call synchronize() first when offloading)."""
        return self._views(self.groups[g], self.storage(g))
