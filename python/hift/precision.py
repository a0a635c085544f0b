"""Precision policies (fp32, bf16, fp16) and the dynamic loss scaler for fp16.

bf16 and fp16 keep the model's weights in half precision and an fp32 master copy per group in
the optimizer state; the fused update writes the master and the rounded weight together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def resolve_precision(requested: str, params: list[nn.Parameter]) -> str:
    """'auto' follows the dtype of the trainable weights; anything else is taken as asked."""
    if requested != "auto":
        return requested
    dtypes = {p.dtype for p in params}
    if len(dtypes) == 1 and next(iter(dtypes)) in NAMES:
        return NAMES[next(iter(dtypes))]
    return "fp32"


class LossScaler:
    """Dynamic loss scale on the device (growth, backoff, interval as torch's GradScaler).

    The scale and the overflow flag never leave the device in the update itself: the fused
    AdamW reads `found_inf` and skips, and `update()` adjusts the scale with
    torch._amp_update_scale_. Disabled (scale 1, never changes) outside fp16.
    """

    def __init__(self, device: torch.device, enabled: bool, init_scale: float = 2.0**16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.enabled = enabled
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.scale = torch.full((), init_scale if enabled else 1.0, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def inv_scale(self) -> torch.Tensor:
        return self.scale.reciprocal()

    def update(self, found_inf: torch.Tensor) -> None:
        if self.enabled:
            torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf,
                                     self.growth_factor, self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": float(self.scale), "growth_tracker": int(self.growth_tracker)}

    def load_state_dict(self, state: dict) -> None:
        self.scale.fill_(state["scale"])
        self.growth_tracker.fill_(state["growth_tracker"])


@dataclass
class GradCheck:
    """What one step's gradients allow, decided on the device (no host sync)."""

    found_inf: Tensor  # 0-d fp32, 1.0 when the update must be skipped (non-finite loss or grad)
    loss_finite: Tensor  # 0-d bool: the loss itself (unscaled) was finite
    grad_scale: Optional[Tensor]  # what the fused update multiplies every grad by, or None for 1


def check_grads(norm_sq: Tensor, loss: Optional[Tensor], scaler: LossScaler,
                max_grad_norm: Optional[float]) -> GradCheck:
    """The one non-finite flag and the one gradient multiplier of a step, for every precision
    and clipping setting, from a single read of the gradients: their squared norm `norm_sq`
    (ops.grad_norm_sq; data parallel: of the mean gradient, over every rank's shard).

    inf or nan anywhere in the grads makes their squared norm non-finite (fp16 squares cannot
    overflow an fp32 sum), so the norm pass both detects and measures. The loss is checked too:
    a non-finite loss with finite grads (a nan multiplied into a term that does not reach this
    group) is no state to train on. The multiplier folds the inverse loss scale and the clip
    coefficient into one tensor, which the fused update applies as it reads each grad. A loss of
    None (an optimizer step that was not given it) counts as finite.
    """
    device = scaler.scale.device
    loss_finite = torch.isfinite(loss) if loss is not None else torch.ones((), dtype=torch.bool, device=device)
    found_inf = (~(torch.isfinite(norm_sq) & loss_finite)).float()
    grad_scale = scaler.inv_scale() if scaler.enabled else None
    if max_grad_norm:
        inv_scale = scaler.inv_scale()
        norm = norm_sq.sqrt() * inv_scale
        grad_scale = inv_scale * (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
    return GradCheck(found_inf, loss_finite, grad_scale)
