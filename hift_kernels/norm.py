"""Deterministic squared L2 norm of a list of grads, for gradient clipping.

Two stages and no atomics, so the same grads give the same bits on every run: stage 1 gives
each chunk of CHUNK elements (the chunk table of unscale.py: one launch per input dtype) its
own fp32 sum of squares in a partials buffer; stage 2, one program, adds the partials in a
fixed order. Chunks follow the grads' sizes and dtypes alone, so equal grads give equal bits
wherever they lie in memory. Everything accumulates in fp32. The result stays on the device
(0-d fp32): no .item(), no host synchronization.
"""
import torch
from torch import Tensor

from .unscale import HAS_TRITON, NUM_WARPS, check_grads, chunk_tables, register_op, triton, tl

if HAS_TRITON:
    from .unscale import chunk_of  # the same table row reader as unscale's kernel

BLOCK = 4096  # stage 1: elements per loop step
SUM_BLOCK = 1024  # stage 2: partials per loop step


def reference_grad_norm_sq(grads: list[Tensor]) -> Tensor:
    """The squared L2 norm of all `grads` together, accumulated in fp32, as a 0-d tensor."""
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for g in grads:
        g = g.float()
        total += torch.dot(g.reshape(-1), g.reshape(-1))
    return total


if HAS_TRITON:

    @triton.jit
    def _sum_squares_partials_kernel(table_ptr, n_chunks, base_ptr, partials_ptr,
                                     SRC_ALIGN: tl.constexpr, BLOCK: tl.constexpr):
        src, _, length = chunk_of(table_ptr, n_chunks, base_ptr, SRC_ALIGN)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        full = length // BLOCK * BLOCK  # whole blocks unmasked, so loads can be vectorized
        for start in range(0, full, BLOCK):
            x = tl.load(src + start + tl.arange(0, BLOCK)).to(tl.float32)
            acc += x * x
        if full < length:
            offs = full + tl.arange(0, BLOCK)
            x = tl.load(src + offs, mask=offs < length, other=0.0).to(tl.float32)
            acc += x * x
        tl.store(partials_ptr + tl.program_id(0), tl.sum(acc, axis=0))

    @triton.jit
    def _sum_partials_kernel(partials_ptr, n_partials, out_ptr, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_partials, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(partials_ptr + offs, mask=offs < n_partials, other=0.0)
        tl.store(out_ptr, tl.sum(acc, axis=0))


def _grad_norm_sq(grads: list[Tensor]) -> Tensor:
    check_grads(grads, "grad_norm_sq")
    device = grads[0].device
    grads = [g.contiguous() for g in grads]
    out = torch.empty((), dtype=torch.float32, device=device)
    tables = chunk_tables(grads)
    n_partials = sum(t.n_chunks for t in tables)
    if n_partials == 0:
        return out.zero_()
    partials = torch.empty(n_partials, dtype=torch.float32, device=device)
    base = 0
    for t in tables:
        _sum_squares_partials_kernel[(t.n_chunks,)](t.table, t.n_chunks, grads[t.base_index],
                                                    partials[base:], SRC_ALIGN=t.src_align,
                                                    BLOCK=BLOCK, num_warps=NUM_WARPS)
        base += t.n_chunks
    _sum_partials_kernel[(1,)](partials, n_partials, out, BLOCK=SUM_BLOCK, num_warps=4)
    return out


def _grad_norm_sq_fake(grads: list[Tensor]) -> Tensor:
    return grads[0].new_empty((), dtype=torch.float32)


_grad_norm_sq_op = register_op("grad_norm_sq", _grad_norm_sq, _grad_norm_sq_fake) \
    if HAS_TRITON else None


def grad_norm_sq(grads: list[Tensor]) -> Tensor:
    """The squared L2 norm of all `grads` (fp32, fp16 or bf16, any shapes) together, as a 0-d
    fp32 tensor on their device; the same bits on every run for the same grads. No sync."""
    if _grad_norm_sq_op is None:
        raise RuntimeError("hift_kernels.grad_norm_sq needs triton; use reference_grad_norm_sq")
    return _grad_norm_sq_op(list(grads))
