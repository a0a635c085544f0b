"""The reference codecs and update divide as the kernels do, on every device.

torch computes `cuda_tensor / python_number` as a multiply by the fp32 reciprocal (ATen's
div_true_kernel_cuda: a CPU-scalar divisor), rounded twice, while the CPU and hift's kernels
divide, rounded once. A reference that divides by a Python number therefore decodes other int8
values on a GPU than the kernel it is the twin of. CUDAScalarDivision plays CUDA's rule on the
CPU, so the reference can be held to true division here; test_cuda_kernels.py checks the same
on a GPU.
"""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hift import formats, ops

aten = torch.ops.aten


class CUDAScalarDivision(TorchDispatchMode):
    """A float tensor divided by a Python number, computed as CUDA computes it: x * (1 / d),
    the reciprocal formed in the tensor's dtype."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in (aten.div.Tensor, aten.div_.Tensor) and isinstance(args[1], (int, float))
                and args[0].is_floating_point()):
            dtype = args[0].dtype
            reciprocal = torch.ones((), dtype=dtype) / torch.tensor(args[1], dtype=dtype)
            return args[0].mul_(reciprocal) if func is aten.div_.Tensor else args[0] * reciprocal
        return func(*args, **kwargs)


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def correctly_rounded(numerator: torch.Tensor, divisor: float) -> torch.Tensor:
    """fp32 numerator / fp32(divisor), rounded once: the fp64 quotient of two fp32 values rounds
    to the same fp32 as the exact one (53 >= 2 * 24 + 2 bits)."""
    d = float(torch.tensor(divisor, dtype=torch.float32))
    return (numerator.double() / d).float()


def bits(t):
    return t.view(torch.int32)


def wide_positive(n, gen, octaves=30):
    return torch.exp2(torch.rand(n, generator=gen) * octaves - octaves / 2) * (1 + torch.rand(n, generator=gen))


def test_int8_scales_are_correctly_rounded_quotients_under_cudas_division(gen):
    n_blocks = 4099
    v = wide_positive(n_blocks * formats.INT8_BLOCK - 77, gen)
    m = torch.randn(v.numel(), generator=gen) * v
    with CUDAScalarDivision():
        _, lo_hi = formats.encode_exp_avg_sq(v, 11, 5)
        _, span, step, _ = formats._code_steps(lo_hi)
        _, m_scales = formats.encode_exp_avg(m)
    assert torch.equal(bits(step), bits(correctly_rounded(span.float(), 254.0))), "exp_avg_sq code step"
    absmax = formats._blocks(m).abs().amax(dim=1)
    assert torch.equal(bits(m_scales), bits(correctly_rounded(absmax, 127.0))), "exp_avg scale"


def test_int8_codecs_give_the_same_bits_under_cudas_division(gen):
    v = wide_positive(37 * formats.INT8_BLOCK + 201, gen) * (torch.rand(37 * 256 + 201, generator=gen) > 0.05)
    m = torch.randn(v.numel(), generator=gen) * 1e-3
    on_cpu = (*formats.encode_exp_avg_sq(v, 23, 7), *formats.encode_exp_avg(m))
    with CUDAScalarDivision():
        as_on_cuda = (*formats.encode_exp_avg_sq(v, 23, 7), *formats.encode_exp_avg(m))
        decoded_on_cuda = formats.decode_exp_avg_sq(*on_cpu[:2])
    for name, a, b in zip(("exp_avg_sq codes", "exp_avg_sq scales", "exp_avg codes", "exp_avg scales"),
                          on_cpu, as_on_cuda):
        assert torch.equal(a, b), name
    assert torch.equal(bits(formats.decode_exp_avg_sq(*on_cpu[:2])), bits(decoded_on_cuda))


@pytest.mark.parametrize("moments", ["fp32", "int8"])
def test_reference_update_is_the_same_under_cudas_division(moments, gen):
    """denom = sqrt(v) / sqrt(1 - beta2^step): the bias correction is not a power of two."""
    sizes = [3, 257, 1025, 4099]
    masters = [torch.randn(n, generator=gen) for n in sizes]
    exp_avgs = [1e-2 * torch.randn(n, generator=gen) for n in sizes]
    exp_avg_sqs = [1e-4 * torch.rand(n, generator=gen) ** 4 for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]

    def state():
        if moments == "fp32":
            return [m.clone() for m in masters], [], [m.clone() for m in exp_avgs], [v.clone() for v in exp_avg_sqs], [], []
        m_codes, m_scales = zip(*map(formats.encode_exp_avg, exp_avgs))
        v_codes, v_scales = zip(*(formats.encode_exp_avg_sq(v, 3, 0) for v in exp_avg_sqs))
        return [m.clone() for m in masters], [], list(m_codes), list(v_codes), list(m_scales), list(v_scales)

    def update(s):
        ops.reference_adamw_(*s[:4], grads, lr=3e-3, step=3, beta1=0.8, beta2=0.95, eps=1e-6,
                             weight_decays=[0.1] * len(sizes), seed=9, offsets=[0, 3, 260, 1285],
                             exp_avg_scales=s[4], exp_avg_sq_scales=s[5])

    on_cpu, as_on_cuda = state(), state()
    update(on_cpu)
    with CUDAScalarDivision():
        update(as_on_cuda)
    for role, (ours, theirs) in enumerate(zip(on_cpu, as_on_cuda)):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(a, b), f"role {role}, tensor {i}"
