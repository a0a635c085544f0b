"""Gradient unscaling: fp16/bf16/fp32 grads -> fp32 copies times inv_scale, and the inf/nan flag.

Multi-tensor: one launch per input dtype covers every grad of that dtype. The host writes a
chunk table with one row per program (where the chunk starts, as an offset from a base
pointer; where it goes in the flat fp32 output; its length), so 60 grads of odd sizes cost
about what one flat tensor does. A table depends only on the grads' addresses and sizes, so
it is built once per group and cached on the device; building it copies from pinned memory
without waiting on the device.
Each grad's slot in the output starts 64-byte aligned (its padding is written with zeros), so
full blocks are read and written with 16-byte vector accesses.

The flag: every program that saw an inf or nan stores 1.0 into found_inf (they all store the
same value, so no atomics are needed) and nothing here ever writes 0, so the flag collects over
calls. inv_scale is read inside the kernel; nothing here calls .item() or synchronizes.

Also home of the Triton import guard and the chunk tables, which norm.py shares.
"""
import contextlib
import os
from collections import OrderedDict
from typing import NamedTuple, Optional

import numpy as np
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

CHUNK = 16384  # elements per program: 32 KiB of bf16 read, 64 KiB of fp32 written
BLOCK = 4096  # elements per step of a program's loop over its chunk (16 per thread)
NUM_WARPS = 8


def reference_unscale(grads: list[Tensor], inv_scale: Tensor, found_inf: Tensor) -> list[Tensor]:
    """fp32 copies of `grads` times `inv_scale`; sets found_inf to 1 if any element of any
    unscaled grad is inf or nan (found_inf is never cleared here, so it can collect over calls)."""
    out = [g.float() * inv_scale for g in grads]
    for g in out:
        found_inf.copy_(torch.maximum(found_inf, (~torch.isfinite(g)).any().to(found_inf.dtype)))
    return out


# --------------------------------------------------------------------------------------------
# Chunk tables (shared with norm.py)

VECTOR_BYTES = 16  # chunks that start 16-byte aligned are read and written 16 bytes at a time
OUT_SLOT_ELEMS = 16  # each grad's slot in unscale's flat fp32 output starts 64-byte aligned


class ChunkTable(NamedTuple):
    """The chunks of one launch (all inputs of one dtype). `table` is int64 (3, n_chunks) on
    the device: row 0 each chunk's first element as an offset, in elements, from the first
    element of tensors[base_index] (the launch's base pointer; may be negative), row 1 its
    offset in the flat output (0 where there is no output), row 2 its length (<= CHUNK).
    `src_align`: every row-0 offset is a multiple of it and the base is 16-byte aligned, so
    the kernel may promise the compiler 16-byte alignment (1 when that does not hold)."""
    dtype: torch.dtype
    table: Tensor
    n_chunks: int
    base_index: int
    src_align: int


_TABLE_CACHE: "OrderedDict[tuple, list[ChunkTable]]" = OrderedDict()
_TABLE_CACHE_SIZE = 64


def output_layout(numels: list[int]) -> tuple[list[int], int]:
    """Offsets of each grad's slot in unscale's flat fp32 output, and the output's size."""
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += -(-n // OUT_SLOT_ELEMS) * OUT_SLOT_ELEMS
    return offsets, total


def chunk_tables(tensors: list[Tensor], out_offsets: Optional[list[int]] = None,
                 chunk: int = CHUNK) -> list[ChunkTable]:
    """The chunk tables of `tensors` (contiguous, on one device): one per dtype, in order of
    first appearance; `out_offsets` gives each tensor's offset in a flat output, if any
    (multiples of OUT_SLOT_ELEMS).

    Chunks never span two tensors, even ones that lie back to back in one buffer: so the
    chunks, and the order of norm.py's partial sums, depend on the tensors' sizes and dtypes
    alone, never on where the allocator put them. Zero-size tensors get none. The result is
    cached by the tensors' addresses, sizes, dtypes and out_offsets, which determine it
    entirely, so a stale entry can never be served.
    """
    assert out_offsets is None or all(o % OUT_SLOT_ELEMS == 0 for o in out_offsets), \
        "the kernels promise the compiler 64-byte aligned output slots"
    device = tensors[0].device
    key = (device, chunk, tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors),
           None if out_offsets is None else tuple(out_offsets))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit

    by_dtype: dict[torch.dtype, list[int]] = {}  # indices of the non-empty tensors
    for i, t in enumerate(tensors):
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(i)

    tables = []
    for dtype, indices in by_dtype.items():
        elsize = tensors[indices[0]].element_size()
        base = tensors[indices[0]].data_ptr()
        cols = []
        for i in indices:
            n = tensors[i].numel()
            starts = np.arange(0, n, chunk, dtype=np.int64)
            out_starts = starts + out_offsets[i] if out_offsets is not None else 0 * starts
            cols.append(np.stack([(tensors[i].data_ptr() - base) // elsize + starts, out_starts,
                                  np.minimum(chunk, n - starts)]))
        host = torch.from_numpy(np.ascontiguousarray(np.concatenate(cols, axis=1)))
        if device.type == "cuda":
            table = host.pin_memory().to(device, non_blocking=True)
        else:
            table = host.to(device)
        vector = VECTOR_BYTES // elsize
        aligned = chunk % vector == 0 and all(
            tensors[i].data_ptr() % VECTOR_BYTES == 0 for i in indices)
        tables.append(ChunkTable(dtype, table, host.shape[1], indices[0],
                                 vector if aligned else 1))

    _TABLE_CACHE[key] = tables
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return tables


def on_device(device: torch.device):
    """The context a launch on `device` needs: Triton launches on the current CUDA device and its
    stream, so tensors on cuda:1 while the current device is 0 would be read from the wrong
    device (an illegal address). Nothing to do off CUDA (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_grads(grads: list[Tensor], what: str) -> None:
    for g in grads:
        if g.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{what}: grads must be fp32, fp16 or bf16, got {g.dtype}")
        if g.device != grads[0].device:
            raise ValueError(f"{what}: all grads must be on one device, got {g.device} and "
                             f"{grads[0].device}")


# --------------------------------------------------------------------------------------------
# Kernel and launcher

if HAS_TRITON:

    @triton.jit
    def chunk_of(table_ptr, n_chunks, base_ptr, SRC_ALIGN: tl.constexpr):
        """This program's row of a ChunkTable: source pointer, output offset, length."""
        pid = tl.program_id(0)
        src_offset = tl.load(table_ptr + pid)
        if SRC_ALIGN > 1:  # lets the compiler use 16-byte loads
            src_offset = tl.multiple_of(src_offset, SRC_ALIGN)
        # output slots start on OUT_SLOT_ELEMS (16) and chunks are CHUNK long: 64-byte aligned
        out_offset = tl.multiple_of(tl.load(table_ptr + n_chunks + pid), 16)
        return base_ptr + src_offset, out_offset, tl.load(table_ptr + 2 * n_chunks + pid)

    @triton.jit
    def _unscale_block(src, dst, offs, length, inv_scale, MASKED: tl.constexpr,
                       OUT_SLOT: tl.constexpr):
        """Unscales src[offs] into dst[offs]; 1 where the result is inf or nan, else 0."""
        if MASKED:
            mask = offs < length
            x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
            x = tl.where(mask, x, 0.0)
            # zeros into the padding up to the end of the output slot, so no output is garbage
            tl.store(dst + offs, x, mask=offs < (length + OUT_SLOT - 1) // OUT_SLOT * OUT_SLOT)
            bad = ~(tl.abs(x) < float("inf"))  # nan compares false: inf and nan alike
        else:
            x = tl.load(src + offs).to(tl.float32) * inv_scale
            tl.store(dst + offs, x)
            bad = ~(tl.abs(x) < float("inf"))
        return bad.to(tl.int32)

    @triton.jit
    def _unscale_kernel(table_ptr, n_chunks, base_ptr, out_ptr, inv_scale_ptr, found_inf_ptr,
                        SRC_ALIGN: tl.constexpr, BLOCK: tl.constexpr, OUT_SLOT: tl.constexpr):
        src, out_offset, length = chunk_of(table_ptr, n_chunks, base_ptr, SRC_ALIGN)
        dst = out_ptr + out_offset
        inv_scale = tl.load(inv_scale_ptr)
        nonfinite = tl.zeros([BLOCK], dtype=tl.int32)
        # whole blocks without a mask (a mask against a loaded length would keep the compiler
        # from vectorizing), then the one partial block
        full = length // BLOCK * BLOCK
        for start in range(0, full, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            nonfinite |= _unscale_block(src, dst, offs, length, inv_scale, False, OUT_SLOT)
        if full < length:
            offs = full + tl.arange(0, BLOCK)
            nonfinite |= _unscale_block(src, dst, offs, length, inv_scale, True, OUT_SLOT)
        if tl.max(nonfinite, axis=0) > 0:
            tl.store(found_inf_ptr, 1.0)


def _unscale_flat(grads: list[Tensor], inv_scale: Tensor, found_inf: Tensor) -> Tensor:
    check_grads(grads, "unscale")
    device = grads[0].device
    grads = [g.contiguous() for g in grads]
    out_offsets, total = output_layout([g.numel() for g in grads])
    out = torch.empty(total, dtype=torch.float32, device=device)
    inv_scale = inv_scale.to(device=device, dtype=torch.float32)
    with on_device(device):
        for t in chunk_tables(grads, out_offsets):
            _unscale_kernel[(t.n_chunks,)](t.table, t.n_chunks, grads[t.base_index], out, inv_scale,
                                           found_inf, SRC_ALIGN=t.src_align, BLOCK=BLOCK,
                                           OUT_SLOT=OUT_SLOT_ELEMS, num_warps=NUM_WARPS)
    return out


def _unscale_flat_fake(grads: list[Tensor], inv_scale: Tensor, found_inf: Tensor) -> Tensor:
    return grads[0].new_empty(output_layout([g.numel() for g in grads])[1], dtype=torch.float32)


def register_op(name: str, impl, fake, mutates_args=()):
    """`impl` as torch.ops.hift_kernels.<name>, opaque to torch.compile (a chunk table holds
    raw addresses, which fake tensors do not have, so triton_op's tracing into the kernel
    cannot apply). Falls back to plain `impl` where torch.library cannot register it."""
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


unscale_flat = register_op("unscale_flat", _unscale_flat, _unscale_flat_fake,
                           mutates_args=("found_inf",)) if HAS_TRITON else None


def unscale(grads: list[Tensor], inv_scale: Tensor, found_inf: Tensor) -> list[Tensor]:
    """fp32 copies of `grads` (fp32, fp16 or bf16, any shape and strides) times `inv_scale`
    (a 0-d fp32 device tensor); sets found_inf (0-d fp32) to 1.0 if any result is inf or nan,
    never to 0. The copies are views into one flat fp32 buffer, each starting 64-byte aligned.
    No host synchronization."""
    if not grads:
        return []
    if unscale_flat is None:
        raise RuntimeError("hift_kernels.unscale needs triton; use reference_unscale")
    flat = unscale_flat(list(grads), inv_scale, found_inf)
    out_offsets, _ = output_layout([g.numel() for g in grads])
    return [flat.narrow(0, o, g.numel()).view(g.shape) for o, g in zip(out_offsets, grads)]
