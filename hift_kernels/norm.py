"""Squared L2 norm of a group's gradients whose bits do not depend on how the group is cut.

The norm sets every parameter's clip coefficient, so one process, N data-parallel ranks (each
holding a contiguous shard of the group) and any chunking must agree on it to the bit, on every
machine. A floating-point sum's bits depend on its order, so the order is fixed by the group's
element numbering alone:
  1. each parameter is cut into blocks of NORM_BLOCK elements from its first element (the last
     block padded with zeros); a block's sum of squares is a fixed binary tree: square each
     element, then fold the halves together (x[:h] + x[h:]) until one value is left;
  2. the blocks' sums, in the group's order, are folded the same way (`fold_sum`; padded with
     zeros to a power of two).
Each operation is one IEEE fp32 multiply or add, which every CPU ISA, CUDA and the Triton
interpreter round alike (the kernel is compiled without fp fusion, so no multiply-add is
contracted), and adding a zero is exact: the zero blocks that pad a data-parallel layout, and
the zero halves that pad a tree, change no bit. Data parallel: a rank computes its shard's block
sums into its slots of one vector of the whole group's blocks; summed over ranks, every slot is
one rank's value plus zeros (exact), and every rank folds the same vector.

Stage 1 (`block_sq_sums`, the one pass over the gradients) is a Triton kernel on GPUs; stage 2
works on 1/NORM_BLOCK as many values and is plain torch everywhere. Everything is fp32 and stays
on the device (no .item(), no host synchronization).
"""
import contextlib

import torch
from torch import Tensor

from ._triton import HAS_TRITON, check_grads, register_op, triton, tl

NORM_BLOCK = 256  # elements per block (as int8 moments'); data-parallel shards start on multiples of it
_LOG2_BLOCK = NORM_BLOCK.bit_length() - 1
ROWS = 16  # blocks per program of the Triton kernel
NUM_WARPS = 4
_SLICE = 1 << 22  # elements the reference squares at a time (bounds its fp32 temporaries)


def norm_blocks(numel: int) -> int:
    """How many blocks (block sums) a tensor of numel elements has."""
    return -(-numel // NORM_BLOCK)


def _fold_rows(x: Tensor) -> Tensor:
    """Each row of x (width a power of two) folded to one value: halves added until one is left.
    In place (x is scratch)."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x[..., :half].add_(x[..., half:])
        x = x[..., :half]
    return x[..., 0]


def reference_block_sq_sums(t: Tensor) -> Tensor:
    """The sums of squares of t's blocks (t flattened), each a fixed tree: fp32, norm_blocks long."""
    flat = t.reshape(-1)
    n_blocks = norm_blocks(flat.numel())
    out = torch.empty(n_blocks, dtype=torch.float32, device=t.device)
    scratch = torch.empty(min(_SLICE, n_blocks * NORM_BLOCK), dtype=torch.float32, device=t.device)
    for lo in range(0, flat.numel(), _SLICE):
        piece = flat[lo : lo + _SLICE]
        rows = norm_blocks(piece.numel())
        x = scratch[: rows * NORM_BLOCK]
        x[: piece.numel()].copy_(piece)
        x[piece.numel() :].zero_()
        x.mul_(x)
        out[lo // NORM_BLOCK : lo // NORM_BLOCK + rows] = _fold_rows(x.view(rows, NORM_BLOCK))
    return out


def fold_sum(x: Tensor) -> Tensor:
    """The sum of a 1-d fp32 tensor as a fixed tree (padded with zeros to a power of two), 0-d.
    Trailing zeros change no bit of it."""
    n = x.numel()
    if n == 0:
        return x.new_zeros(())
    width = 1 << (n - 1).bit_length()
    padded = x.new_zeros(width)
    padded[:n] = x
    return _fold_rows(padded.view(1, width))[0]


def reference_grad_norm_sq(grads: list[Tensor]) -> Tensor:
    """The squared L2 norm of `grads` together (each a parameter's, in group order) as a 0-d fp32
    tensor: fold_sum of their block sums."""
    return fold_sum(torch.cat([reference_block_sq_sums(g) for g in grads]))


if HAS_TRITON:

    @triton.jit
    def _block_sq_sums_kernel(x_ptr, numel, out_ptr, n_blocks, ROWS: tl.constexpr,
                              BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
        x = x * x
        # the reference's tree: fold each row's halves together. A sum over an axis of two is
        # one add, whatever the compiler's reduction order.
        for k in tl.static_range(LOG2_BLOCK):
            x = tl.sum(tl.reshape(x, (ROWS, 2, BLOCK >> (k + 1))), axis=1)
        tl.store(out_ptr + rows, tl.reshape(x, (ROWS,)), mask=rows < n_blocks)


def _block_sq_sums(t: Tensor) -> Tensor:
    check_grads([t], "block_sq_sums")
    flat = t.contiguous().view(-1)  # (a strided 1-d view reshapes to itself)
    n_blocks = norm_blocks(flat.numel())
    out = torch.empty(n_blocks, dtype=torch.float32, device=t.device)
    if n_blocks:
        # the launch goes to the current device: make it t's (a model on cuda:1 while 0 is current)
        with torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext():
            _block_sq_sums_kernel[(triton.cdiv(n_blocks, ROWS),)](
                flat, flat.numel(), out, n_blocks, ROWS=ROWS, BLOCK=NORM_BLOCK, LOG2_BLOCK=_LOG2_BLOCK,
                num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


def _block_sq_sums_fake(t: Tensor) -> Tensor:
    return t.new_empty(norm_blocks(t.numel()), dtype=torch.float32)


_block_sq_sums_op = register_op("block_sq_sums", _block_sq_sums, _block_sq_sums_fake) \
    if HAS_TRITON else None


def block_sq_sums(t: Tensor) -> Tensor:
    """reference_block_sq_sums in one pass over t (fp32, fp16 or bf16; any shape and strides),
    the same bits. No host synchronization."""
    if _block_sq_sums_op is None:
        raise RuntimeError("hift_kernels.block_sq_sums needs triton; use reference_block_sq_sums")
    return _block_sq_sums_op(t)


def grad_norm_sq(grads: list[Tensor]) -> Tensor:
    """reference_grad_norm_sq with the Triton block sums: the same bits. No sync."""
    if not grads:
        raise ValueError("grad_norm_sq of no gradients")
    return fold_sum(torch.cat([block_sq_sums(g) for g in grads]))
