"""The state swapper: the plain-torch one (hift.swap.StateSwapper) and the compiled one
(torch.classes.hift.StateSwapper), with the same tests. On the CPU both run their slot logic with
plain copies (force_slots); on a GPU the copies are asynchronous on a side stream.
"""
import os
import warnings

import pytest
import torch

from hift.swap import StateSwapper, make_swapper

try:
    from hift import _C  # noqa: F401
    HAS_COMPILED = hasattr(torch.classes.hift, "StateSwapper")
except ImportError:
    HAS_COMPILED = False
cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]
compiled = pytest.mark.skipif(not HAS_COMPILED, reason="hift._C is not built")

IMPLS = [
    pytest.param(("python", "cpu"), id="python-cpu"),
    pytest.param(("compiled", "cpu"), id="compiled-cpu", marks=compiled),
    pytest.param(("python", "cuda"), id="python-cuda", marks=cuda),
    pytest.param(("compiled", "cuda"), id="compiled-cuda", marks=[compiled] + cuda),
]
SIZES = [1001, 3, 0, 4097, 77]


def new_swapper(impl, sizes, slots=2, pin=False):
    kind, device = impl
    if kind == "python":
        return StateSwapper(sizes, device, slots=slots, pin=pin, force_slots=True)
    return torch.classes.hift.StateSwapper(sizes, torch.device(device), slots, pin, True)


def fill_hosts(swapper, sizes, gen):
    expected = []
    for g, n in enumerate(sizes):
        values = torch.randn(n, generator=gen)
        swapper.host(g).copy_(values)
        expected.append(values)
    return expected


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


@pytest.mark.parametrize("impl", IMPLS)
def test_round_trip_through_slots(impl, gen):
    swapper = new_swapper(impl, SIZES)
    assert swapper.uses_slots() and swapper.num_slots() == 2 and swapper.num_groups() == len(SIZES)
    expected = fill_hosts(swapper, SIZES, gen)
    for g in range(len(SIZES)):
        swapper.prefetch(g)
        flat = swapper.acquire(g)
        assert flat.device.type == impl[1] and flat.numel() == SIZES[g] and flat.dtype == torch.float32
        torch.testing.assert_close(flat.cpu(), expected[g], rtol=0, atol=0)
        delta = torch.randn(SIZES[g], generator=gen)
        flat.add_(delta.to(flat.device))  # the "update", on the compute stream
        expected[g] = expected[g] + delta
        swapper.writeback(g)
        assert not swapper.resident(g)
    swapper.synchronize()
    for g in range(len(SIZES)):
        assert torch.equal(swapper.host(g), expected[g])


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_order_prefetch(impl, gen):
    swapper = new_swapper(impl, SIZES, slots=3)
    expected = fill_hosts(swapper, SIZES, gen)
    swapper.prefetch(3)
    swapper.prefetch(0)
    swapper.prefetch(3)  # already resident: a no-op
    a = swapper.acquire(0)
    b = swapper.acquire(3)
    c = swapper.acquire(1)  # not prefetched: acquire does it
    assert all(swapper.resident(g) for g in (0, 1, 3))
    for g, flat in ((0, a), (3, b), (1, c)):
        assert torch.equal(flat.cpu(), expected[g])
        flat.mul_(2.0)
    for g in (3, 1, 0):
        swapper.writeback(g)
    swapper.prefetch(4)
    swapper.prefetch(2)
    for g in (4, 2):
        assert torch.equal(swapper.acquire(g).cpu(), expected[g])
        swapper.writeback(g)
    for g in (0, 1, 3):
        assert torch.equal(swapper.host(g), expected[g] * 2.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_slot_reused_while_its_copy_out_is_in_flight(impl, gen):
    """One slot: each group's copy-in queues behind the previous group's copy-out; on a GPU a
    long kernel before each writeback keeps that copy-out in flight when the next group comes."""
    sizes = [1 << 20, (1 << 20) - 5, 12345]
    swapper = new_swapper(impl, sizes, slots=1)
    expected = fill_hosts(swapper, sizes, gen)
    on_gpu = impl[1] == "cuda"
    for cycle in range(3):
        for g in range(len(sizes)):
            flat = swapper.acquire(g)
            if on_gpu:
                torch.cuda._sleep(2_000_000)  # the update takes a while on the compute stream
            flat.mul_(0.5).add_(float(cycle + g))
            expected[g] = expected[g] * 0.5 + float(cycle + g)
            swapper.writeback(g)
    for g in range(len(sizes)):
        torch.testing.assert_close(swapper.host(g), expected[g], rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_engine_cycle_prefetches_next_while_current_updates(impl, gen):
    sizes = [513, 2049, 7, 999]
    swapper = new_swapper(impl, sizes)
    expected = fill_hosts(swapper, sizes, gen)
    order = [0, 1, 2, 3] * 3
    swapper.prefetch(order[0])
    for k, g in enumerate(order):
        flat = swapper.acquire(g)
        if k + 1 < len(order):
            swapper.prefetch(order[k + 1])
        flat.add_(1.0)
        expected[g] += 1.0
        swapper.writeback(g)
    swapper.synchronize()
    for g in range(len(sizes)):
        assert torch.equal(swapper.host(g), expected[g])


@pytest.mark.parametrize("impl", IMPLS)
def test_misuse_fails_in_words(impl):
    swapper = new_swapper(impl, [4, 5, 6])
    swapper.prefetch(0)
    swapper.prefetch(1)
    with pytest.raises(RuntimeError, match="not written back"):
        swapper.prefetch(2)
    with pytest.raises(RuntimeError, match="not on the device"):
        swapper.writeback(2)
    with pytest.raises((IndexError, RuntimeError), match="out of range"):
        swapper.acquire(3)


@pytest.mark.parametrize("kind", ["python", pytest.param("compiled", marks=compiled)])
def test_pinning_that_cannot_be_had_falls_back_with_a_warning(kind, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        swapper = new_swapper((kind, "cpu"), [10, 20], pin=True)
    if not swapper.pinned():  # no CUDA here (or a memlock limit): pageable, and said so
        # A TORCH_WARN from a custom class's constructor reaches stderr, not Python's warnings.
        said = [str(w.message) for w in caught] + [capfd.readouterr().err]
        assert any("pinned host memory is not available" in text for text in said)
    swapper.host(1).fill_(3.0)
    assert torch.equal(swapper.acquire(1).cpu(), torch.full((20,), 3.0))


def test_make_swapper_on_cpu_hands_out_the_host_buffers():
    swapper = make_swapper([3, 8], "cpu")
    assert isinstance(swapper, StateSwapper) and not swapper.uses_slots()
    assert swapper.acquire(1).data_ptr() == swapper.host(1).data_ptr()
    swapper.prefetch(0)
    swapper.writeback(0)
    swapper.synchronize()
    assert swapper.resident(0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_make_swapper_on_cuda_is_compiled_when_built():
    swapper = make_swapper([3, 8], "cuda")
    from hift import ops

    assert isinstance(swapper, torch.ScriptObject) == (HAS_COMPILED and ops.HAS_EXTENSION)
    assert swapper.pinned()
