"""Triton kernels for the gradient path, each with a plain-torch reference twin in its file.

    grad_norm_sq(grads) -> 0-d fp32                          (norm.py)

fp16 gradients are never unscaled into a copy: the norm is taken of the scaled grads, and
hift.precision.check_grads folds the inverse scale and the clip into the one multiplier that the
fused AdamW update applies as it reads each grad.

The package imports without triton (the `reference_*` twins are plain torch); `runs_on`
then says False for every device. hift/ops.py is the only caller that chooses between
these kernels and the twins.
"""
import torch

from .norm import (NORM_BLOCK, block_sq_sums, fold_sum, grad_norm_sq, norm_blocks,
                   reference_block_sq_sums, reference_grad_norm_sq)
from ._triton import HAS_TRITON, INTERPRETER

__all__ = ["runs_on", "grad_norm_sq", "reference_grad_norm_sq", "HAS_TRITON", "INTERPRETER"]


def runs_on(device) -> bool:
    """True when these kernels can run on tensors of `device`: a CUDA device with triton, or
    the CPU when triton runs as its interpreter (TRITON_INTERPRET=1 before triton's import).
    Not CUDA under the interpreter: it copies only a kernel's arguments to the host, and a
    chunk table reaches grads that are not arguments."""
    if not HAS_TRITON:
        return False
    device = torch.device(device)
    if INTERPRETER:
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.is_available()
