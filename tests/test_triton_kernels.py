"""hift_kernels (Triton) held to their plain-torch twins on random inputs of odd sizes.

On the CPU the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported). On a GPU machine run
`TRITON_INTERPRET=0 pytest tests/test_triton_kernels.py` to test the compiled kernels on CUDA.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # hift_kernels is a top-level package of the repository
    sys.path.insert(0, str(ROOT))

pytest.importorskip("triton")
import hift_kernels  # noqa: E402
from hift_kernels.norm import NORM_BLOCK, ROWS, reference_block_sq_sums, reference_grad_norm_sq  # noqa: E402

DEVICES = [d for d in ("cpu", "cuda") if hift_kernels.runs_on(d)]
if not DEVICES:
    pytest.skip("no device runs the Triton kernels here (set TRITON_INTERPRET=1 for the CPU)",
                allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCK = ROWS * NORM_BLOCK  # elements one program of the norm kernel covers
CHUNK = 4 * BLOCK
# odd sizes: a single element, less than a block, one short of a program's elements, two
# programs and a tail, a 2-D tensor, and one that spills past four programs
SHAPES = [(1,), (7,), (BLOCK - 1,), (2 * BLOCK + 1,), (3, 333), (CHUNK + 5,)]


def random_grads(dtype, device, seed, shapes=SHAPES, scale=64.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(dtype).to(device) for s in shapes]


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


# --------------------------------------------------------------------------------------------
# registration, import without triton


def test_runs_on():
    assert hift_kernels.runs_on("cpu") == hift_kernels.INTERPRETER
    if hift_kernels.INTERPRETER:
        assert not hift_kernels.runs_on("cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_ops_registered_and_traceable(device):
    grads = random_grads(torch.bfloat16, device, seed=13, shapes=[(7,), (3, 33)])
    torch.library.opcheck(torch.ops.hift_kernels.block_sq_sums.default, (grads[1],))
    norm_sq = torch.compile(hift_kernels.grad_norm_sq, backend="aot_eager", fullgraph=True)(grads)
    assert_norm_sq(norm_sq, grads)


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None  # as if triton were not installed\n"
            "import torch, hift_kernels as hk\n"
            "assert not hk.HAS_TRITON and not hk.runs_on('cpu') and not hk.runs_on('cuda')\n"
            "assert hk.reference_grad_norm_sq([torch.ones(3)]).item() == 3.0\n"
            "assert hk.fold_sum(hk.reference_block_sq_sums(torch.ones(2049))).item() == 2049.0\n")
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=120)
