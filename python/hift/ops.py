"""One entry per kernel. This module is the only place that chooses, for a kernel, between the
compiled extension (hift._C), the Triton kernels (hift_kernels) and the plain-torch references;
the one other such choice is the state swapper's (hift.swap.make_swapper).

Each public op has a `reference_*` twin here or in hift_kernels that defines its meaning; the
fast paths are held to those twins by the tests. Set HIFT_KERNELS=reference to force the twins
everywhere (to bisect a numerical difference).
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from hift import formats

_FORCE_REFERENCE = os.environ.get("HIFT_KERNELS", "auto") == "reference"


def _load_extension():
    try:
        from hift import _C  # noqa: F401  (registers torch.ops.hift.*)
    except ImportError as err:
        warnings.warn(
            f"hift._C is not built ({err}); hift runs on its plain-torch reference ops, which are "
            "correct but slower. Rebuild with `pip install --no-build-isolation -e .`.",
            stacklevel=3,
        )
        return False
    return True


HAS_EXTENSION = False if _FORCE_REFERENCE else _load_extension()


def _load_triton():
    try:
        import hift_kernels  # noqa: F401
    except Exception:  # no triton, or a triton that cannot start here: references still work
        return None
    return hift_kernels


_TRITON = None if _FORCE_REFERENCE else _load_triton()


def _triton_runs_on(tensors: Sequence[Tensor]) -> bool:
    # Only GPU tensors go to Triton: on the CPU its interpreter is a test vehicle, far slower
    # than the torch reference (tests call hift_kernels directly to exercise it there).
    return (_TRITON is not None and len(tensors) > 0 and tensors[0].device.type == "cuda"
            and _TRITON.runs_on(tensors[0].device))


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


# --------------------------------------------------------------------------------------------
# AdamW with fp32 master weights


@torch.no_grad()
def reference_adamw_(
    params: list[Tensor],
    masters: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    grads: list[Tensor],
    *,
    lr,
    step,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decays: Sequence[float],
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    seed: int = 0,
    offsets: Sequence[int] = (),
    exp_avg_scales: Sequence[Tensor] = (),
    exp_avg_sq_scales: Sequence[Tensor] = (),
) -> None:
    """AdamW (decoupled weight decay), the same arithmetic as torch.optim.AdamW, on fp32 values
    of a state kept in any of hift.formats' formats.

    params: the model's weights (fp32, bf16 or fp16). masters: empty when the params are fp32
    (their own masters), else one per param: an fp32 master, or for bf16 params the int16
    remainder of one. exp_avgs, exp_avg_sqs: fp32, or bf16 written back with stochastic
    rounding drawn from (seed, step, offsets[i] + element), where offsets[i] is where tensor i
    starts in its group; or int8 / uint8 codes with their blocks' fp32 scales in exp_avg_scales
    and exp_avg_sq_scales (formats.encode_exp_avg, encode_exp_avg_sq). grads may be any float dtype; each is multiplied by `grad_scale`
    (unscale and clip folded in) before use. `step` is this update's 1-based step count (bias
    correction). A nonzero `found_inf` leaves every buffer untouched. lr and step may be Python
    numbers or 0-d tensors.
    """
    if found_inf is not None and _scalar(found_inf) != 0.0:
        return
    lr, step = _scalar(lr), _scalar(step)
    scale = None if grad_scale is None else _scalar(grad_scale)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    step_size = lr / bias_correction1
    keys = {name: formats.rounding_key(seed, int(step), stream) for name, stream in formats.MOMENT_STREAMS.items()}
    for i, (m_store, v_store, g) in enumerate(zip(exp_avgs, exp_avg_sqs, grads)):
        remainder = masters[i] if masters and masters[i].dtype == torch.int16 else None
        if remainder is not None:
            master = formats.join_master(params[i], remainder)
        else:
            master = masters[i] if masters else params[i]
        # fp32 state is updated in place, with exactly torch's ops; compact state is decoded
        # to fp32, updated the same way and encoded back
        int8 = m_store.dtype == torch.int8
        if int8:
            m = formats.decode_exp_avg(m_store, exp_avg_scales[i])
            v = formats.decode_exp_avg_sq(v_store, exp_avg_sq_scales[i])
        else:
            m, v = m_store.float(), v_store.float()
        g = g.float()
        if scale is not None:
            g = g * scale
        master.mul_(1.0 - lr * weight_decays[i])
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = formats.divide(v.sqrt(), bias_correction2_sqrt).add_(eps)
        master.addcdiv_(m, denom, value=-step_size)
        if remainder is not None:
            weight, low = formats.split_master(master)
            params[i].copy_(weight)
            remainder.copy_(low)
        elif masters:
            params[i].copy_(master)
        offset = offsets[i] if offsets else 0
        if int8:
            for store, scales, (codes, new_scales) in (
                    (m_store, exp_avg_scales[i], formats.encode_exp_avg(m)),
                    (v_store, exp_avg_sq_scales[i], formats.encode_exp_avg_sq(v, keys["exp_avg_sq"], offset))):
                store.copy_(codes)
                scales.copy_(new_scales)
            continue
        for store, value, name in ((m_store, m, "exp_avg"), (v_store, v, "exp_avg_sq")):
            if store is not value:
                formats.store_moment(store, value, keys[name], offset)


@torch.no_grad()
def adamw_(params, masters, exp_avgs, exp_avg_sqs, grads, *, lr, step, beta1, beta2, eps,
           weight_decays, grad_scale=None, found_inf=None, seed: int = 0, offsets=(),
           exp_avg_scales=(), exp_avg_sq_scales=()) -> None:
    """Fused AdamW over one group, in one pass over memory where the extension is built.
    Arguments as in `reference_adamw_`."""
    if not params:
        return
    if HAS_EXTENSION and hasattr(torch.ops.hift, "fused_adamw_"):
        device = params[0].device
        torch.ops.hift.fused_adamw_(
            params, masters, exp_avgs, exp_avg_sqs, grads, list(map(float, weight_decays)),
            _as_tensor(lr, device), _as_tensor(step, device), float(beta1), float(beta2),
            float(eps), grad_scale, found_inf, list(exp_avg_scales), list(exp_avg_sq_scales),
            int(seed), [int(o) for o in offsets],
        )
        return
    reference_adamw_(params, masters, exp_avgs, exp_avg_sqs, grads, lr=lr, step=step,
                     beta1=beta1, beta2=beta2, eps=eps, weight_decays=weight_decays,
                     grad_scale=grad_scale, found_inf=found_inf, seed=seed, offsets=offsets,
                     exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales)


def cpu_kernel_isa() -> str:
    """The instruction set of the CPU AdamW kernel `adamw_` runs in this process: "avx512", "avx2"
    or "portable" (ATen's choice for the machine, capped by ATEN_CPU_CAPABILITY as ATen's own
    kernels are), or "reference" where hift._C is not in use."""
    return torch.ops.hift.cpu_kernel_isa() if HAS_EXTENSION else "reference"


def _as_tensor(x, device) -> Tensor:
    # A fill on the device, whose value travels as a kernel argument: torch.tensor(x, device=cuda)
    # copies from pageable host memory and waits for the device, a hidden sync per call.
    if isinstance(x, Tensor):
        return x
    return torch.full((), float(x), dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------------
# Gradient norm (Triton on GPUs, references elsewhere). fp16 grads are not unscaled into copies:
# the norm is of the scaled grads, and precision.check_grads folds the inverse scale and the clip
# into `grad_scale`, which adamw_ applies as it reads each grad.


# The twins live beside their kernels; they import without triton.
from hift_kernels.norm import NORM_BLOCK, fold_sum, norm_blocks, reference_block_sq_sums  # noqa: E402,F401


def block_sq_sums(t: Tensor) -> Tensor:
    """The sums of squares of t's blocks of NORM_BLOCK elements, each a fixed tree (fp32, on t's
    device, no sync): the first stage of the gradient norm (hift_kernels/norm.py)."""
    if _triton_runs_on([t]):
        return _TRITON.block_sq_sums(t)
    return reference_block_sq_sums(t)


def grad_norm_sq(grads: Sequence[Optional[Tensor]], numels: Optional[Sequence[int]] = None) -> Tensor:
    """Squared L2 norm of a group's gradients (0-d fp32 on their device, no sync), with the same
    bits however the group is cut (one process, data-parallel shards: hift_kernels/norm.py).
    grads in the group's parameter order; None for a parameter without a gradient, which counts
    as zeros of numels[i] elements (numels is needed only then)."""
    device = next(g.device for g in grads if g is not None)
    sums = [block_sq_sums(g) if g is not None else torch.zeros(norm_blocks(numels[i]), device=device)
            for i, g in enumerate(grads)]
    return fold_sum(torch.cat(sums))
