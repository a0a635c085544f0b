"""What every kernel file here shares: the Triton import guard, the argument check, and the
registration as a torch op."""
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except Exception:  # no triton here, or one that cannot start: the reference twins still work
    triton = None
    tl = None

HAS_TRITON = triton is not None
# Triton reads TRITON_INTERPRET when it is first imported; so do we.
INTERPRETER = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_grads(grads: list[Tensor], what: str) -> None:
    for g in grads:
        if g.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{what}: grads must be fp32, fp16 or bf16, got {g.dtype}")
        if g.device != grads[0].device:
            raise ValueError(f"{what}: all grads must be on one device, got {g.device} and "
                             f"{grads[0].device}")


def register_op(name: str, impl, fake, mutates_args=()):
    """`impl` as torch.ops.hift_kernels.<name>, opaque to torch.compile (its fake gives the
    output's shape). Falls back to plain `impl` where torch.library cannot register it."""
    qualname = f"hift_kernels::{name}"
    try:
        op = torch.library.custom_op(qualname, mutates_args=mutates_args)(impl)
        op.register_fake(fake)
        return op
    except Exception:
        try:  # registered already (the module was imported twice)
            return getattr(torch.ops.hift_kernels, name)
        except Exception:
            return impl
