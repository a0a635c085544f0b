"""The fused CUDA update against the CPU kernel, bit for bit, where a read of the code cannot
tell: every state format; grid-stride loops that go round more than once (more elements than
one wave of blocks; more int8 blocks than one wave); more tensors in one call than one launch
table holds; zero-size tensors and misaligned views among aligned ones. And the reference int8
codecs on CUDA tensors against themselves on the CPU (torch divides differently on CUDA).

Both kernels are integer and single IEEE fp32 operations with the same explicit fused
multiply-adds (csrc/adamw.h; the build forbids contraction), so they agree to the bit.
Skipped where there is no GPU or hift._C is not built."""
import os

import pytest
import torch

from hift import formats, ops
from test_adamw_kernel import INT8, MOMENTS, WEIGHT_MASTERS, State, bits, format_id, fused_update

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"),
              pytest.mark.skipif(not ops.HAS_EXTENSION, reason="hift._C is not built")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TABLE_ROWS = 320  # csrc/adamw_cuda.cu kMaxTensors
THREADS, PER_THREAD, BLOCKS_PER_SM = 256, 8, 2048 // 256  # csrc/adamw_cuda.cu launch shape


def fresh_gen():
    seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed), seed


def one_wave_of_elements():
    """Elements one launch covers before its grid-stride loop goes round again."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return sms * BLOCKS_PER_SM * THREADS * PER_THREAD


def one_wave_of_int8_blocks():
    return torch.cuda.get_device_properties(0).multi_processor_count * BLOCKS_PER_SM


def to_cuda(state: State) -> State:
    moved = State([[t.cuda() for t in role] for role in state.roles()], state.offsets,
                  ([t.cuda() for t in state.exp_avg_scales], [t.cuda() for t in state.exp_avg_sq_scales]))
    return moved


def assert_cuda_matches_cpu(cpu_state: State, sizes, grad_dtype, gen, note, steps=(1, 2, 3), decays=None):
    gpu_state = to_cuda(cpu_state)
    decays = decays or [0.1 if i % 2 == 0 else 0.0 for i in range(len(sizes))]
    for step in steps:
        grads = [torch.randn(n, generator=gen).to(grad_dtype) for n in sizes]
        fused_update(cpu_state, grads, decays, 77, step)
        fused_update(gpu_state, [g.cuda() for g in grads], decays, 77, step)
    torch.cuda.synchronize()
    for k, (ours, theirs) in enumerate(zip(gpu_state.buffers(), cpu_state.buffers())):
        if ours.numel():
            assert torch.equal(bits(ours.cpu()), bits(theirs)), f"{note}: buffer {k} differs from the CPU kernel"


@pytest.mark.parametrize("moments", MOMENTS, ids=lambda m: "m_{}-v_{}".format(*map(format_id, m)))
@pytest.mark.parametrize("grad_dtype", DTYPES, ids=format_id)
@pytest.mark.parametrize("weight_dtype,master", WEIGHT_MASTERS, ids=format_id)
def test_cuda_kernel_is_the_cpu_kernel_bit_for_bit(weight_dtype, master, grad_dtype, moments):
    gen, seed = fresh_gen()
    sizes = [1, 3, 17, 255, 257, 1025, 2049, 4099, 40961]
    state = State.random(sizes, weight_dtype, master, moments, "cpu", gen)
    assert_cuda_matches_cpu(state, sizes, grad_dtype, gen, f"seed={seed}")


@pytest.mark.parametrize("moments", [MOMENTS[0], MOMENTS[1], INT8], ids=["fp32", "bf16", "int8"])
def test_grid_stride_loops_that_go_round_more_than_once(moments):
    gen, seed = fresh_gen()
    # past two waves of 2048-element chunks, and (int8) of 256-element blocks, with odd tails
    n = max(2 * one_wave_of_elements(), 2 * one_wave_of_int8_blocks() * formats.INT8_BLOCK) + 12_347
    sizes = [n, 3 * formats.INT8_BLOCK + 5]
    state = State.random(sizes, torch.bfloat16, "remainder", moments, "cpu", gen)
    assert_cuda_matches_cpu(state, sizes, torch.bfloat16, gen, f"seed={seed} n={n}", steps=(1, 2))


@pytest.mark.parametrize("moments", [MOMENTS[0], INT8], ids=["fp32", "int8"])
def test_more_tensors_than_one_launch_table_holds(moments):
    gen, seed = fresh_gen()
    count = 2 * TABLE_ROWS + 37
    sizes = torch.randint(1, 700, (count,), generator=gen).tolist()
    state = State.random(sizes, torch.bfloat16, "fp32", moments, "cpu", gen)
    assert_cuda_matches_cpu(state, sizes, torch.float32, gen, f"seed={seed} tensors={count}", steps=(1, 2))


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view that starts one element into its buffer (not 16-byte aligned)."""
    view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    return view.copy_(t.reshape(-1)).view(t.shape)


@pytest.mark.parametrize("moments", [MOMENTS[0], MOMENTS[2], INT8], ids=["fp32", "m_fp32-v_bf16", "int8"])
@pytest.mark.parametrize("weight_dtype,master", [(torch.float32, "none"), (torch.bfloat16, "remainder")],
                         ids=format_id)
def test_zero_size_and_misaligned_views_among_aligned_ones(weight_dtype, master, moments):
    gen, seed = fresh_gen()
    sizes = [0, 4099, 0, 33, 2048 + 7, 1, 0, 40961]
    state = State.random(sizes, weight_dtype, master, moments, "cpu", gen)
    for role in (*state.roles(), state.exp_avg_scales, state.exp_avg_sq_scales):
        for i in range(1, len(role), 3):  # every third tensor of every role
            role[i] = misaligned(role[i])
    assert_cuda_matches_cpu(state, sizes, torch.bfloat16, gen, f"seed={seed}")


def test_reference_int8_codecs_give_the_same_bits_on_cuda_as_on_the_cpu():
    """A Python-number divisor is a multiply by its reciprocal on CUDA (formats.divide)."""
    gen, seed = fresh_gen()
    n = 97 * formats.INT8_BLOCK + 131
    v = torch.exp2(torch.rand(n, generator=gen) * 40 - 30) * (torch.rand(n, generator=gen) > 0.05)
    m = 1e-2 * torch.randn(n, generator=gen)
    on_cpu = (*formats.encode_exp_avg(m), *formats.encode_exp_avg_sq(v, 5, 9))
    on_cuda = (*formats.encode_exp_avg(m.cuda()), *formats.encode_exp_avg_sq(v.cuda(), 5, 9))
    for name, a, b in zip(("exp_avg codes", "exp_avg scales", "exp_avg_sq codes", "exp_avg_sq scales"),
                          on_cpu, on_cuda):
        assert torch.equal(a, b.cpu()), f"seed={seed}: {name}"
    decoded = formats.decode_exp_avg_sq(on_cpu[2].cuda(), on_cpu[3].cuda()).cpu()
    assert torch.equal(bits(decoded), bits(formats.decode_exp_avg_sq(on_cpu[2], on_cpu[3]))), f"seed={seed}"


@pytest.mark.parametrize("moments", [MOMENTS[0], INT8], ids=["fp32", "int8"])
def test_reference_update_gives_the_same_bits_on_cuda_as_on_the_cpu(moments):
    gen, seed = fresh_gen()
    sizes = [3, 257, 1025, 4099]
    cpu_state = State.random(sizes, torch.bfloat16, "remainder", moments, "cpu", gen)
    gpu_state = to_cuda(cpu_state)
    args = dict(lr=3e-3, step=3, beta1=0.8, beta2=0.95, eps=1e-6, weight_decays=[0.1] * len(sizes), seed=4)
    grads = [torch.randn(n, generator=gen) for n in sizes]
    for state, gs in ((cpu_state, grads), (gpu_state, [g.cuda() for g in grads])):
        ops.reference_adamw_(*state.roles(), gs, offsets=state.offsets, exp_avg_scales=state.exp_avg_scales,
                             exp_avg_sq_scales=state.exp_avg_sq_scales, **args)
    for k, (a, b) in enumerate(zip(gpu_state.buffers(), cpu_state.buffers())):
        assert torch.equal(bits(a.cpu()), bits(b)), f"seed={seed}: buffer {k}"
