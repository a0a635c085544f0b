"""hift_kernels (Triton) held to their plain-torch twins on random inputs of odd sizes.

On the CPU the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported). On a GPU machine run
`TRITON_INTERPRET=0 pytest tests/test_triton_kernels.py` to test the compiled kernels on CUDA.
"""
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # hift_kernels is a top-level package of the repository
    sys.path.insert(0, str(ROOT))

pytest.importorskip("triton")
import hift_kernels  # noqa: E402
from hift_kernels.norm import NORM_BLOCK, reference_block_sq_sums, reference_grad_norm_sq  # noqa: E402
from hift_kernels.unscale import (BLOCK, CHUNK, OUT_SLOT_ELEMS, chunk_tables,  # noqa: E402
                                  output_layout, reference_unscale)

DEVICES = [d for d in ("cpu", "cuda") if hift_kernels.runs_on(d)]
if not DEVICES:
    pytest.skip("no device runs the Triton kernels here (set TRITON_INTERPRET=1 for the CPU)",
                allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd sizes: a single element, less than a block, one short of a block, a block and a tail,
# a 2-D tensor, and one that spills past a chunk (a second program for one tensor)
SHAPES = [(1,), (7,), (BLOCK - 1,), (2 * BLOCK + 1,), (3, 333), (CHUNK + 5,)]


def random_grads(dtype, device, seed, shapes=SHAPES, scale=64.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(dtype).to(device) for s in shapes]


def zero(device):
    return torch.zeros((), dtype=torch.float32, device=device)


def assert_unscaled(out, grads, inv_scale):
    assert len(out) == len(grads)
    for o, g in zip(out, grads):
        assert o.dtype == torch.float32 and o.shape == g.shape and o.device == g.device
        # one fp32 multiply, as in the twin: equal to within 1 ulp (bitwise on the interpreter)
        torch.testing.assert_close(o, g.float() * inv_scale, rtol=2.0**-23, atol=0.0)


# --------------------------------------------------------------------------------------------
# unscale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inv_scale", [2.0**-10, 0.37])
def test_unscale_matches_reference(device, dtype, inv_scale):
    grads = random_grads(dtype, device, seed=1)
    inv = torch.tensor(inv_scale, device=device)
    found_inf = zero(device)
    out = hift_kernels.unscale(grads, inv, found_inf)
    assert_unscaled(out, grads, inv)
    ref_found_inf = zero(device)
    for o, r in zip(out, reference_unscale(grads, inv, ref_found_inf)):
        torch.testing.assert_close(o, r, rtol=2.0**-23, atol=0.0)
    assert found_inf.item() == ref_found_inf.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_unscale_mixed_dtypes_and_empty(device):
    grads = [g for i, dtype in enumerate(DTYPES)
             for g in random_grads(dtype, device, seed=10 + i, shapes=[(5, 3), (0,), (BLOCK + 3,)])]
    inv = torch.tensor(0.25, device=device)
    found_inf = zero(device)
    out = hift_kernels.unscale(grads, inv, found_inf)
    assert_unscaled(out, grads, inv)
    assert found_inf.item() == 0.0
    # the flat buffer behind the views: each slot padded to OUT_SLOT_ELEMS, with zeros
    flat = torch.ops.hift_kernels.unscale_flat(grads, inv, found_inf)
    offsets, total = output_layout([g.numel() for g in grads])
    assert flat.numel() == total and all(o % OUT_SLOT_ELEMS == 0 for o in offsets)
    padding = torch.ones(total, dtype=torch.bool, device=device)
    for o, g in zip(offsets, grads):
        padding[o:o + g.numel()] = False
    assert padding.any() and (flat[padding] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["first", "last", "tail", "past_chunk"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_unscale_finds_planted_inf_nan(device, dtype, where, value):
    shapes = [(7,), (2 * BLOCK + 5,), (3, 333), (CHUNK + 9,)]
    grads = random_grads(dtype, device, seed=2, shapes=shapes)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype} {where} {value}".encode()))
    victim = int(torch.randint(len(grads), (1,), generator=gen))
    if where == "past_chunk":
        victim = len(grads) - 1
    flat = grads[victim].view(-1)
    n = flat.numel()
    if where == "first":
        index = 0
    elif where == "last":
        index = n - 1
    elif where == "tail":  # in the partial block at the end of the tensor
        index = int(torch.randint(n // BLOCK * BLOCK, n, (1,), generator=gen))
    else:  # in the second chunk (a second program) of the tensor longer than a chunk
        index = int(torch.randint(CHUNK, n, (1,), generator=gen))
    flat[index] = value
    inv = torch.tensor(2.0**-7, device=device)
    found_inf = zero(device)
    out = hift_kernels.unscale(grads, inv, found_inf)
    assert found_inf.item() == 1.0
    ref_found_inf = zero(device)
    reference_unscale(grads, inv, ref_found_inf)
    assert ref_found_inf.item() == 1.0
    for o, r in zip(out, reference_unscale(grads, inv, zero(device))):
        torch.testing.assert_close(o, r, rtol=2.0**-23, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_unscale_never_clears_found_inf(device):
    grads = random_grads(torch.bfloat16, device, seed=3, shapes=[(7,), (300,)])
    found_inf = torch.ones((), dtype=torch.float32, device=device)
    hift_kernels.unscale(grads, torch.tensor(0.5, device=device), found_inf)
    assert found_inf.item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unscale_non_contiguous(device, dtype):
    base = random_grads(dtype, device, seed=4, shapes=[(333, 3), (2 * BLOCK + 7,), (4, 5, 6)])
    grads = [base[0].t(), base[1][::2], base[2].permute(2, 0, 1)[:, 1:]]
    assert not any(g.is_contiguous() for g in grads)
    inv = torch.tensor(0.37, device=device)
    found_inf = zero(device)
    out = hift_kernels.unscale(grads, inv, found_inf)
    assert_unscaled(out, grads, inv)
    assert found_inf.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1])
def test_unscale_views_of_one_buffer(device, offset):
    """Grads that are back-to-back views of one flat buffer, aligned or starting one element
    off a 16-byte boundary."""
    sizes = [7, 1023, 4097, 1, 999]
    flat = random_grads(torch.float16, device, seed=5, shapes=[(offset + sum(sizes),)])[0]
    grads = list(flat[offset:].split(sizes))
    grads[2].view(-1)[-1] = float("nan")
    inv = torch.tensor(0.37, device=device)
    found_inf = zero(device)
    out = hift_kernels.unscale(grads, inv, found_inf)
    assert found_inf.item() == 1.0
    for o, r in zip(out, reference_unscale(grads, inv, zero(device))):
        torch.testing.assert_close(o, r, rtol=2.0**-23, atol=0.0, equal_nan=True)


# --------------------------------------------------------------------------------------------
# grad_norm_sq


def float64_norm_sq(grads):
    return sum(float(g.double().pow(2).sum()) for g in grads)


def assert_norm_sq(result, grads):
    """Near the float64 norm (fp32 sums of about 1e4 terms), and the twin's bits exactly: the
    kernel rounds the same single operations in the same tree (hift_kernels/norm.py)."""
    assert result.dtype == torch.float32 and result.dim() == 0
    expected = float64_norm_sq(grads)
    assert abs(result.item() - expected) <= 1e-5 * expected
    reference = reference_grad_norm_sq([g.cpu() for g in grads]).to(result.device)
    assert torch.equal(result.view(torch.int32), reference.view(torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_sq_sums_equal_their_twin_bit_for_bit(device, dtype):
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    for n in [1, 7, NORM_BLOCK - 1, NORM_BLOCK, NORM_BLOCK + 1,
              int(torch.randint(2, 40 * NORM_BLOCK, (), generator=gen))]:
        # a spread of magnitudes, so that the order of the sums shows in the bits
        t = (torch.randn(n, generator=gen) * torch.exp(4 * torch.randn(n, generator=gen))).to(dtype)
        got = hift_kernels.block_sq_sums(t.to(device)).cpu()
        assert torch.equal(got.view(torch.int32), reference_block_sq_sums(t).view(torch.int32)), n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_norm_sq_matches_float64_and_is_deterministic(device, dtype):
    grads = random_grads(dtype, device, seed=6)
    first = hift_kernels.grad_norm_sq(grads)
    assert_norm_sq(first, grads)
    for _ in range(2):
        again = hift_kernels.grad_norm_sq(grads)
        assert torch.equal(again.view(torch.int32), first.view(torch.int32))  # bitwise


@pytest.mark.parametrize("device", DEVICES)
def test_grad_norm_sq_mixed_dtypes_non_contiguous_and_empty(device):
    grads = [random_grads(torch.bfloat16, device, seed=7, shapes=[(333, 3)])[0].t(),
             torch.zeros(0, device=device),
             random_grads(torch.float16, device, seed=8, shapes=[(2 * BLOCK + 9,)])[0][1::3],
             random_grads(torch.float32, device, seed=9, shapes=[(CHUNK + 1,)])[0]]
    assert_norm_sq(hift_kernels.grad_norm_sq(grads), grads)
    assert hift_kernels.grad_norm_sq([torch.zeros(0, 3, device=device)]).item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1])
def test_grad_norm_sq_views_of_one_buffer(device, offset):
    sizes = [7, 1023, 4097, 1, 999]
    flat = random_grads(torch.bfloat16, device, seed=11, shapes=[(offset + sum(sizes),)])[0]
    grads = list(flat[offset:].split(sizes))
    assert_norm_sq(hift_kernels.grad_norm_sq(grads), grads)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_norm_sq_bits_do_not_depend_on_memory_layout(device):
    sizes = [7, CHUNK + 3, 1023]
    flat = random_grads(torch.bfloat16, device, seed=14, shapes=[(sum(sizes),)])[0]
    views = list(flat.split(sizes))
    separate = [v.clone() for v in views]
    assert torch.equal(hift_kernels.grad_norm_sq(views).view(torch.int32),
                       hift_kernels.grad_norm_sq(separate).view(torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_grad_norm_sq_of_unscaled_grads(device):
    """The path the engine takes: unscale, then the norm of unscale's fp32 output."""
    grads = random_grads(torch.float16, device, seed=12, shapes=[(7,), (1023,), (3, 333)])
    out = hift_kernels.unscale(grads, torch.tensor(2.0**-6, device=device), zero(device))
    assert_norm_sq(hift_kernels.grad_norm_sq(out), out)


# --------------------------------------------------------------------------------------------
# chunk tables, registration, import without triton


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_tables_rows_and_alignment(device):
    flat = torch.zeros(64 + 2 * CHUNK, dtype=torch.bfloat16, device=device)
    (table,) = chunk_tables([flat[:16], flat[16:16 + CHUNK + 3]], out_offsets=[0, 16])
    assert table.src_align == 8 and table.n_chunks == 3 and table.base_index == 0
    assert table.table.cpu().tolist() == [[0, 16, 16 + CHUNK], [0, 16, 16 + CHUNK],
                                          [16, CHUNK, 3]]
    (table,) = chunk_tables([flat[1:9], flat[9:30]])  # 2 bytes past a 16-byte boundary
    assert table.src_align == 1
    (table,) = chunk_tables([flat[40:45], flat[8:16]])  # a base above a later tensor
    assert table.table.cpu().tolist() == [[0, -32], [0, 0], [5, 8]]
    f32, f16 = torch.zeros(9, device=device), torch.zeros(5, dtype=torch.float16, device=device)
    tables = chunk_tables([f16, f32, torch.zeros(0, device=device), f16])
    assert [(t.dtype, t.n_chunks, t.base_index) for t in tables] == [
        (torch.float16, 2, 0), (torch.float32, 1, 1)]


def test_runs_on():
    assert hift_kernels.runs_on("cpu") == hift_kernels.INTERPRETER
    if hift_kernels.INTERPRETER:
        assert not hift_kernels.runs_on("cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_ops_registered_and_traceable(device):
    grads = random_grads(torch.bfloat16, device, seed=13, shapes=[(7,), (3, 33)])
    inv = torch.tensor(0.5, device=device)
    torch.library.opcheck(torch.ops.hift_kernels.unscale_flat.default, (grads, inv, zero(device)))
    torch.library.opcheck(torch.ops.hift_kernels.block_sq_sums.default, (grads[1],))

    def step(grads, inv, found_inf):
        out = hift_kernels.unscale(grads, inv, found_inf)
        return out, hift_kernels.grad_norm_sq(out)

    found_inf = zero(device)
    out, norm_sq = torch.compile(step, backend="aot_eager", fullgraph=True)(grads, inv, found_inf)
    assert_unscaled(out, grads, inv)
    assert_norm_sq(norm_sq, out)
    assert found_inf.item() == 0.0


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None  # as if triton were not installed\n"
            "import torch, hift_kernels as hk\n"
            "assert not hk.HAS_TRITON and not hk.runs_on('cpu') and not hk.runs_on('cuda')\n"
            "f = torch.zeros(())\n"
            "grads = [torch.tensor([2.0, float('inf')])]\n"
            "out = hk.reference_unscale(grads, torch.tensor(0.5), f)\n"
            "assert out[0][0].item() == 1.0 and f.item() == 1.0\n"
            "assert hk.reference_grad_norm_sq([torch.ones(3)]).item() == 3.0\n"
            "assert hk.fold_sum(hk.reference_block_sq_sums(torch.ones(2049))).item() == 2049.0\n")
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=120)
