"""Optimizer-state formats: what the bytes of a group's resting state hold, and the plain-torch
codecs that define them. The fused kernels (csrc/adamw.h) are held to these.

Master (the fp32 value each weight is the rounding of):
- "none": fp32 weights are their own masters.
- "fp32": an fp32 copy (fp16 weights; bf16 weights when asked).
- "remainder": bf16 weights keep only the low 16 bits of their fp32 master, signed, beside the
  weight. The weight is the master rounded to nearest with ties away from zero (a carry into the
  high half when the low half is 0x8000 or more), so the remainder is master - weight<<16 in
  [-0x8000, 0x7fff] and the master comes back bit for bit. (Ties to even would leave a tie that
  went down and one that went up with the same 16 bits.) The same numbers as an fp32 master
  in 2 bytes instead of 4; the weight differs from torch's round-to-even only on exact ties.

Moments (exp_avg, exp_avg_sq):
- "fp32".
- "bf16": rounded stochastically. With round-to-nearest a bf16 exp_avg_sq cannot decay: 0.999*v
  rounds back to v whenever v's relative spacing (2**-8) exceeds the decay (1e-3), so small
  gradients would never lower the denominator again. Stochastic rounding is unbiased: the EMA
  keeps its expected value, and its noise averages out over steps as Adam's own EMA does. The
  random bits come from a counter-based hash of (run seed, group, step, element), so a resumed
  run draws the same bits, and the result does not depend on how the state is cut into chunks.
- "int8": blocks of INT8_BLOCK (256) elements of one tensor, each with fp32 scales, as 8-bit
  Adam in bitsandbytes and torchao keep them; a tensor's last block may be short, and a block
  never spans two tensors (state chunks cut tensors at block multiples).
  - exp_avg: signed int8 q, linear in m: the block's scale s = absmax/127, q = m*(127/absmax)
    rounded to nearest (even), m = q*s. Rounding to nearest: its error is at most s/2 and m's EMA is not
    the one that stalls (bench/results/int8_moments.md: stochastic rounding of m was no better).
  - exp_avg_sq: unsigned code, logarithmic in v: code 0 is v = 0; codes 1..255 are evenly
    spaced on the fp32 bit pattern of v between the block's smallest positive v (lo, code 1) and
    its largest (hi, code ~255), kept as two fp32 scales. A positive float's bits are a
    piecewise-linear log2 of it (exponent, then mantissa), so the steps are 3-9% of v over the
    8-22 octaves a block spans, and no positive v decodes to zero or to half its value: the
    failure that sends linear codes (and, rarely, sqrt and dynamic-tree codes) to 10^2-10^16
    times lr updates (bench/results/int8_moments.md, which measured the true log2 code this
    approximates). The bit-pattern form needs no log2/exp2: encode and decode are integer and
    IEEE fp32 operations whose results every CPU, GPU and this reference agree on bit for bit.
    v is rounded stochastically between its two neighbouring codes, with probability linear in
    v (unbiased in v), from the same counter hash as bf16 (a code step is too coarse for the
    0.999 decay to move v under round-to-nearest).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

MOMENT_DTYPES = ("fp32", "bf16", "int8")
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "remainder": torch.int16}
# int8 moments: the codes' dtypes and the fp32 scales each block keeps per moment
INT8_BLOCK = 256
INT8_DTYPES = {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8}
INT8_SCALES = {"exp_avg": 1, "exp_avg_sq": 2}

_MASK32 = 0xFFFFFFFF


def master_format(weight_dtype: torch.dtype, requested: str = "auto") -> str:
    """The master a weight dtype needs: none for fp32, the remainder for bf16 unless fp32 is
    asked, an fp32 copy for fp16 (its bits are no truncation of an fp32 value)."""
    if weight_dtype == torch.float32:
        return "none"
    if weight_dtype == torch.bfloat16 and requested in ("auto", "remainder"):
        return "remainder"
    return "fp32"


def moment_bytes_per_element(moment_dtype: str) -> float:
    """Both moments' resting bytes per trained parameter (int8: codes and scales in full blocks)."""
    if moment_dtype == "int8":
        return 2 + 4 * sum(INT8_SCALES.values()) / INT8_BLOCK
    return 2 * STORAGE_DTYPES[moment_dtype].itemsize


def state_bytes_per_element(master: str, moment_dtype: str) -> float:
    """Resting optimizer state per trained parameter."""
    master_bytes = {"none": 0, "fp32": 4, "remainder": 2}[master]
    return master_bytes + moment_bytes_per_element(moment_dtype)


def divide(x: Tensor, divisor: float) -> Tensor:
    """x / divisor, correctly rounded on every device, as the kernels (and the CPU) divide.
    torch turns `cuda_tensor / number` (a divisor that is a CPU scalar) into x * (1 / divisor),
    two roundings (ATen's div_true_kernel_cuda); a 0-d divisor on x's own device is divided by
    everywhere. new_full fills on the device, so this makes no host-to-device copy."""
    return x / x.new_full((), divisor)


def int8_blocks(numel: int) -> int:
    """How many int8 blocks a tensor of numel elements has (its last one may be short)."""
    return -(-numel // INT8_BLOCK)


# ------------------------------------------------------------------------- the bf16 remainder


def _bits(x: Tensor) -> Tensor:
    """An fp32 tensor's bit patterns as int64 in [0, 2**32)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & _MASK32


def _from_bits16(u: Tensor, dtype: torch.dtype) -> Tensor:
    """Int64 values in [0, 2**16) as a 16-bit dtype with those bits."""
    return torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16).view(dtype)


_SLICE = 1 << 22  # elements per slice: the int64 arithmetic's temporaries stay ~100 MB


def split_master(master: Tensor) -> tuple[Tensor, Tensor]:
    """An fp32 master as (bf16 weight, int16 remainder); join_master undoes it exactly."""
    flat = master.reshape(-1)
    weight = torch.empty(flat.shape, dtype=torch.bfloat16, device=master.device)
    remainder = torch.empty(flat.shape, dtype=torch.int16, device=master.device)
    for lo in range(0, flat.numel(), _SLICE):
        u = _bits(flat[lo : lo + _SLICE])
        high = (u + 0x8000) >> 16
        weight[lo : lo + _SLICE] = _from_bits16(high & 0xFFFF, torch.bfloat16)
        remainder[lo : lo + _SLICE] = (u - (high << 16)).to(torch.int16)  # in [-0x8000, 0x7fff]
    return weight.view(master.shape), remainder.view(master.shape)


def join_master(weight: Tensor, remainder: Tensor) -> Tensor:
    """The fp32 master of a bf16 weight and its int16 remainder."""
    high = weight.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    u = ((high << 16) + remainder.to(torch.int64)) & _MASK32
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).view(torch.float32)


def round_to_bf16_weight(master: Tensor) -> Tensor:
    """The bf16 weight of an fp32 master under the remainder format (ties away from zero)."""
    return split_master(master)[0]


# ------------------------------------------------------------------- stochastic rounding bits


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), without overflowing int64."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def lowbias32(x):
    """A 32-bit integer hash with strong avalanche (Wellons' lowbias32); on Python ints or int64
    tensors holding values in [0, 2**32). csrc/adamw.h has the same function."""
    if isinstance(x, int):
        x &= _MASK32
        x ^= x >> 16
        x = (x * 0x7FEB352D) & _MASK32
        x ^= x >> 15
        x = (x * 0x846CA68B) & _MASK32
        return x ^ (x >> 16)
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def group_seed(run_seed: int, group: int) -> int:
    """The seed a group's stochastic rounding draws from (passed to the fused update)."""
    return lowbias32(lowbias32(run_seed & _MASK32) ^ (group & _MASK32))


MOMENT_STREAMS = {"exp_avg": 0, "exp_avg_sq": 1}


def rounding_key(seed: int, step: int, stream: int) -> int:
    """One update's key for one moment: every (seed, step, moment) draws fresh bits."""
    return lowbias32(seed ^ lowbias32((2 * step + stream) & _MASK32))


def random_bits(key: int, offset: int, numel: int, device=None) -> Tensor:
    """32 random bits per element for elements [offset, offset + numel) of a group."""
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device) & _MASK32
    return lowbias32(index ^ key)


def to_bf16_stochastic(x: Tensor, key: int, offset: int) -> Tensor:
    """fp32 -> bf16, rounding the magnitude up with probability equal to the fraction of a bf16
    step it lies above the value below (unbiased): add 16 random bits below the cut, truncate."""
    u = _bits(x.reshape(-1))
    r = random_bits(key, offset, u.numel(), u.device) & 0xFFFF
    return _from_bits16(((u + r) >> 16) & 0xFFFF, torch.bfloat16).view(x.shape)


# --------------------------------------------------------------------------------- int8 moments


def _blocks(x: Tensor, fill: float = 0.0) -> Tensor:
    """A flat fp32 tensor as (blocks, INT8_BLOCK) rows, its short last block padded with fill."""
    flat = x.reshape(-1).float()
    pad = int8_blocks(flat.numel()) * INT8_BLOCK - flat.numel()
    return torch.cat([flat, flat.new_full((pad,), fill)]).view(-1, INT8_BLOCK)


def encode_exp_avg(m: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 exp_avg -> (int8 codes, fp32 scale per block): s = absmax/127 (m = q*s), and
    q = m * (127/absmax) to nearest even (0 in an all-zero block)."""
    rows = _blocks(m)
    absmax = rows.abs().amax(dim=1)
    # (a tensor numerator: `127.0 / t` is t.reciprocal() * 127 in torch, rounded twice)
    inv_scale = torch.where(absmax > 0, torch.full_like(absmax, 127.0) / torch.where(absmax > 0, absmax, 1.0), 0.0)
    q = torch.round(rows * inv_scale[:, None])
    return q.clamp_(-127, 127).to(torch.int8).reshape(-1)[: m.numel()].view(m.shape), divide(absmax, 127.0)


def decode_exp_avg(q: Tensor, scales: Tensor) -> Tensor:
    """int8 exp_avg codes and their blocks' scales -> fp32."""
    rows = _blocks(q)
    return (rows * scales[:, None]).reshape(-1)[: q.numel()].view(q.shape)


def _code_steps(lo_hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per block: the bits of lo, the bit range hi - lo, the fp32 step of one code and its
    reciprocal (0 when the range is; only a first guess is made with it)."""
    bits = lo_hi.contiguous().view(torch.int32).to(torch.int64).view(-1, 2)
    lo, span = bits[:, 0], bits[:, 1] - bits[:, 0]
    step = divide(span.to(torch.float32), 254.0)
    inv_step = torch.where(span > 0, torch.ones_like(step) / torch.where(span > 0, step, 1.0), 0.0)
    return lo, span, step, inv_step


def _code_bits(j: Tensor, lo: Tensor, span: Tensor, step: Tensor) -> Tensor:
    """The bits of positive code j + 1 (j in 0..254): lo + min(span, trunc(j * step))."""
    return lo + torch.minimum(span, (j.to(torch.float32) * step).to(torch.int32).to(torch.int64))


def _as_float(bits: Tensor) -> Tensor:
    return bits.to(torch.int32).view(torch.float32)


def decode_exp_avg_sq(codes: Tensor, lo_hi: Tensor) -> Tensor:
    """uint8 exp_avg_sq codes and their blocks' (lo, hi) scales -> fp32."""
    rows = _blocks(codes).to(torch.int64)
    lo, span, step, _ = (t[:, None] for t in _code_steps(lo_hi))
    value = _as_float(_code_bits((rows - 1).clamp_(min=0), lo, span, step))
    return torch.where(rows > 0, value, 0.0).reshape(-1)[: codes.numel()].view(codes.shape)


def encode_exp_avg_sq(v: Tensor, key: int, offset: int) -> tuple[Tensor, Tensor]:
    """fp32 exp_avg_sq (>= 0) -> (uint8 codes, fp32 (lo, hi) per block), rounded stochastically
    between the two codes around v with bits from (key, offset + element)."""
    rows = _blocks(v)
    positive = rows > 0
    lo_value = torch.where(positive, rows, float("inf")).amin(dim=1)
    lo_value = torch.where(torch.isinf(lo_value), 0.0, lo_value)
    lo_hi = torch.stack([lo_value, rows.amax(dim=1)], dim=1).reshape(-1)
    lo, span, step, inv_step = (t[:, None] for t in _code_steps(lo_hi))
    u = rows.view(torch.int32).to(torch.int64)
    # j: the last code at or below v. The scaled quotient is within a code of it; one look each
    # way makes it exact (the codes' bits are monotone in j).
    t = ((u - lo).to(torch.float32) * inv_step).clamp_(0.0, 254.0)
    j = t.to(torch.int64)
    j = torch.where((j < 254) & (_code_bits((j + 1).clamp(max=254), lo, span, step) <= u), j + 1, j)
    j = torch.where((j > 0) & (_code_bits(j, lo, span, step) > u), j - 1, j)
    below = _as_float(_code_bits(j, lo, span, step))
    above = _as_float(_code_bits((j + 1).clamp(max=254), lo, span, step))
    r = (random_bits(key, offset, rows.numel(), v.device).view(rows.shape) >> 8).to(torch.float32) * 2.0**-24
    up = (j < 254) & (r * (above - below) < rows - below)  # with probability (v - below) / (above - below)
    code = torch.where(positive, j + 1 + up.to(torch.int64), 0)
    return code.to(torch.uint8).reshape(-1)[: v.numel()].view(v.shape), lo_hi


def store_moment(target: Tensor, value: Tensor, key: Optional[int], offset: int) -> None:
    """Write an fp32 moment into its storage (fp32 as is, bf16 rounded stochastically)."""
    if target.dtype == torch.float32:
        target.copy_(value)
    elif target.dtype == torch.bfloat16:
        target.copy_(to_bf16_stochastic(value, key, offset))
    else:
        raise TypeError(f"no moment format stores {target.dtype}")
