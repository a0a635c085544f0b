"""The state swapper: the plain-torch one (hift.swap.StateSwapper) and the compiled one
(torch.classes.hift.StateSwapper), with the same tests. On the CPU both run their slot logic with
plain copies (force_slots); on a GPU the copies are asynchronous on a side stream.

Inputs are random from a fresh seed each test, printed as `seed=...` (pytest shows it when the
test fails); HIFT_TEST_SEED=<seed> replays it.
"""
import os
import warnings

import pytest
import torch

from hift import swap
from hift.groups import Group, Unit
from hift.state import OptimizerState, StateFormat
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
CUDA_IMPLS = [p for p in IMPLS if p.values[0][1] == "cuda"]
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
def gen(request):
    replay = os.environ.get("HIFT_TEST_SEED")
    seed = int(replay) if replay else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    print(f"seed={seed} (replay: HIFT_TEST_SEED={seed} pytest '{request.node.nodeid}')")
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_round_trip_through_slots(impl, gen):
    swapper = new_swapper(impl, SIZES)
    assert swapper.uses_slots() and swapper.num_slots() == 2 and swapper.num_chunks() == len(SIZES)
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
    """One slot: each chunk's copy-in queues behind the previous chunk's copy-out; on a GPU a
    long kernel before each writeback keeps that copy-out in flight when the next chunk comes."""
    sizes = [(1 << 20) + 7, (1 << 20) - 5, 12345]
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


# -- close(): copies done, memory unpinned, further use refused ---------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_close_is_idempotent_and_use_after_it_fails_in_words(impl, gen):
    sizes = [37, 1001]
    swapper = new_swapper(impl, sizes, slots=1)
    expected = fill_hosts(swapper, sizes, gen)
    kept = swapper.host(1)
    flat = swapper.acquire(1)
    flat.mul_(3.0)
    swapper.writeback(1)
    swapper.close()
    swapper.close()
    swapper.synchronize()  # nothing left to wait for: a no-op, not an error
    assert torch.equal(kept, expected[1] * 3.0)  # a buffer still held stays valid
    assert swapper.num_chunks() == 2 and swapper.num_slots() == 1 and not swapper.pinned()
    for use in (lambda: swapper.host(0), lambda: swapper.prefetch(0), lambda: swapper.acquire(0),
                lambda: swapper.writeback(0), lambda: swapper.resident(0), lambda: swapper.wait_for_host(0)):
        with pytest.raises(RuntimeError, match=r"after close\(\)"):
            use()


def test_optimizer_state_close_closes_its_swapper(gen):
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (7, 33)]
    groups = [Group(0, [Unit("unit", params[:1])]), Group(1, [Unit("unit", params[1:])])]
    state = OptimizerState(groups, torch.device("cpu"), StateFormat(), offload=True)
    state.acquire(0)
    state.release(0)
    state.close()
    state.close()
    with pytest.raises(RuntimeError, match=r"after close\(\)"):
        state.acquire(1)
    resident = OptimizerState(groups, torch.device("cpu"), StateFormat(), offload=False)
    resident.close()  # nothing to let go of; the resident state stays usable
    assert resident.acquire(1).exp_avgs[0].numel() == 33


class FakeCudart:
    """Stands in for torch.cuda.cudart() where there is no GPU: it keeps what is registered
    (pointer -> bytes) and refuses the registration number `fail_at` (0-based)."""

    class cudaError:
        success = 0

    def __init__(self, log, fail_at=None):
        self.log, self.fail_at, self.registered, self.calls = log, fail_at, {}, 0

    def cudaHostRegister(self, ptr, size, flags):
        self.calls += 1
        if self.calls - 1 == self.fail_at:
            return 2  # cudaErrorMemoryAllocation
        assert ptr not in self.registered
        self.registered[ptr] = size
        self.log.append(("register", ptr, size, flags))
        return 0

    def cudaHostUnregister(self, ptr):
        self.log.append(("unregister", ptr))
        return 0 if self.registered.pop(ptr, None) is not None else 713  # not registered

    def cudaGetErrorString(self, err):
        return f"fake error {err}"


def test_python_swapper_pins_each_buffer_in_place_and_unpins_after_its_copies(monkeypatch, gen):
    log = []
    fake = FakeCudart(log)
    monkeypatch.setattr(swap, "_cudart", lambda: fake)
    sizes = [1001, 3, 0, 4097, 77]
    swapper = StateSwapper(sizes, "cpu", slots=2, pin=True, force_slots=True)
    assert swapper.pinned()
    hosts = [swapper.host(g) for g in range(len(sizes))]
    # each buffer's own bytes, where the buffer lies: no rounding up, no second allocation
    assert log == [("register", h.data_ptr(), 4 * n, 0) for h, n in zip(hosts, sizes) if n > 0]
    assert all(h.numel() == n and h.untyped_storage().nbytes() == 4 * n for h, n in zip(hosts, sizes))
    expected = fill_hosts(swapper, sizes, gen)
    swapper.acquire(3).add_(1.0)
    swapper.writeback(3)

    synchronize = swapper.synchronize
    monkeypatch.setattr(swapper, "synchronize", lambda: (log.append(("synchronize",)), synchronize())[1])
    log.clear()
    swapper.close()
    assert log[0] == ("synchronize",), "close() unpinned a buffer before waiting for its copies"
    assert sorted(log[1:]) == sorted(("unregister", h.data_ptr()) for h, n in zip(hosts, sizes) if n > 0)
    assert not fake.registered and not swapper.pinned()
    swapper.close()
    assert len(log) == 1 + 4, "a second close() unpinned again"
    assert torch.equal(hosts[3], expected[3] + 1.0)


def test_python_swapper_that_cannot_pin_unpins_what_it_had_and_says_why(monkeypatch, gen):
    fake = FakeCudart([], fail_at=2)
    monkeypatch.setattr(swap, "_cudart", lambda: fake)
    sizes = [5, 9, 11, 13]
    with pytest.warns(UserWarning, match="pinned host memory is not available .fake error 2"):
        swapper = StateSwapper(sizes, "cpu", slots=1, pin=True, force_slots=True)
    assert not swapper.pinned() and not fake.registered
    expected = fill_hosts(swapper, sizes, gen)
    assert torch.equal(swapper.acquire(2), expected[2])
    swapper.writeback(2)
    swapper.close()


# -- on a GPU: pinned in place, and closed safely -----------------------------------------


@pytest.mark.parametrize("impl", CUDA_IMPLS)
def test_pinned_in_place_costs_exactly_the_requested_bytes(impl, gen):
    """Through the caching host allocator a 4 MiB + 28 byte chunk would take a block of 8 MiB;
    pinned in place it takes its own bytes, and the allocator makes no block at all."""
    sizes = [(1 << 20) + 7, 12347, 3]
    made_before = torch.cuda.host_memory_stats().get("num_host_alloc", 0)
    swapper = new_swapper(impl, sizes, pin=True)
    assert swapper.pinned()
    expected = fill_hosts(swapper, sizes, gen)
    for g in range(len(sizes)):  # non-blocking copies both ways, from and into the pinned buffers
        swapper.acquire(g).mul_(-2.0)
        swapper.writeback(g)
    swapper.synchronize()
    assert torch.cuda.host_memory_stats().get("num_host_alloc", 0) == made_before
    hosts = [swapper.host(g) for g in range(len(sizes))]
    for h, n, e in zip(hosts, sizes, expected):
        assert h.is_pinned() and h.untyped_storage().nbytes() == 4 * n
        assert torch.equal(h, e * -2.0)
    swapper.close()
    assert not any(h.is_pinned() for h in hosts), "close() left host memory pinned"


@pytest.mark.parametrize("impl", CUDA_IMPLS)
def test_close_with_copies_in_flight_does_not_corrupt(impl, gen):
    """close() right after a writeback queued behind a long update, and a prefetch: it waits
    for both before it unpins and lets go of the buffers, so the host holds the update."""
    sizes = [(1 << 22) + 5, 999]
    swapper = new_swapper(impl, sizes, slots=2, pin=True)
    expected = fill_hosts(swapper, sizes, gen)
    kept = swapper.host(0)
    flat = swapper.acquire(0)
    torch.cuda._sleep(100_000_000)  # the update is slow: its copy-out is still queued below
    flat.mul_(-1.0).add_(0.25)
    swapper.writeback(0)
    swapper.prefetch(1)
    swapper.close()
    assert torch.equal(kept, expected[0] * -1.0 + 0.25)
    # the slots went back to the allocator; memory handed out now must not be overwritten
    fresh = torch.full((sizes[0],), 7.0, device="cuda")
    torch.cuda.synchronize()
    assert bool((fresh == 7.0).all())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_a_failed_pin_leaves_no_cuda_error_behind():
    buffer = torch.zeros(12345)
    assert swap._pin_in_place(buffer) is None
    try:
        assert swap._pin_in_place(buffer) is not None  # registered twice: the runtime refuses
        torch.ones(7, device="cuda").add_(1.0)  # its launch check reads the runtime's last error
        torch.cuda.synchronize()
    finally:
        swap._unpin(buffer.data_ptr())
    assert not buffer.is_pinned()


# -- bytes copied: what the benchmark reads -----------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_bytes_copied_counts_each_copy_in_and_out(impl, gen):
    sizes = [1001, 3, 0, 4097, 77]
    swapper = new_swapper(impl, sizes)
    fill_hosts(swapper, sizes, gen)
    assert list(swapper.bytes_copied()) == [0, 0]
    for step, g in enumerate([3, 0, 4, 3]):
        swapper.acquire(g).add_(1.0)
        assert list(swapper.bytes_copied()) == [4 * sizes[g], 0]
        swapper.writeback(g)
        assert list(swapper.bytes_copied()) == [4 * sizes[g]] * 2, step
        swapper.reset_bytes_copied()
    swapper.prefetch(1)
    swapper.acquire(1)  # already in its slot: nothing more is copied
    assert list(swapper.bytes_copied()) == [4 * sizes[1], 0]
    swapper.close()


# -- construction: device slots before pinned memory, under the swapper's device -----------


def test_python_swapper_out_of_device_memory_for_its_slots_pins_nothing(monkeypatch):
    """The slots are allocated before any host buffer is pinned: the constructor that runs out
    of device memory leaves nothing registered (not even until garbage collection)."""
    fake = FakeCudart([])
    monkeypatch.setattr(swap, "_cudart", lambda: fake)

    def out_of_memory(numel, device):
        raise torch.OutOfMemoryError("injected: no room for a slot")

    monkeypatch.setattr(swap, "_slot_buffer", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        StateSwapper([1001, 77], "cpu", slots=2, pin=True, force_slots=True)
    assert fake.calls == 0 and not fake.registered


@pytest.mark.parametrize("impl", CUDA_IMPLS)
def test_out_of_device_memory_for_the_slots_leaves_no_host_memory_pinned(impl):
    """Slots that cannot be had (the process may use little of the device) raise, and no host
    buffer stays registered: buffers of the same sizes, which the allocator hands the same
    address ranges again, pin afresh (cudaHostRegister refuses a range already registered)."""
    sizes = [(16 << 20) + 3, (8 << 20) + 1]
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (32 << 20) / total))
    try:
        with pytest.raises((torch.OutOfMemoryError, RuntimeError), match="out of memory|OutOfMemory"):
            new_swapper(impl, sizes, slots=3, pin=True)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    for n in sizes:
        fresh = torch.zeros(n)
        assert swap._pin_in_place(fresh) is None, "a range of a failed swapper stayed registered"
        swap._unpin(fresh.data_ptr())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="fewer than 2 GPUs")
@pytest.mark.parametrize("kind", ["python", pytest.param("compiled", marks=compiled)])
def test_a_swapper_on_the_second_gpu_makes_no_context_on_the_first(kind):
    """Pinning makes a CUDA context on the current device: the swapper pins under its own. In a
    fresh process (no context yet), the driver says whether GPU 0's primary context is active."""
    import subprocess
    import sys

    script = f"""
import ctypes, torch
from hift.swap import StateSwapper
if {kind!r} == "python":
    swapper = StateSwapper([4097, 33], "cuda:1", slots=2, pin=True)
else:
    from hift import _C
    swapper = torch.classes.hift.StateSwapper([4097, 33], torch.device("cuda:1"), 2, True, False)
assert swapper.pinned() and torch.cuda.current_device() == 0
swapper.acquire(0).add_(1.0)
swapper.writeback(0)
swapper.synchronize()
cuda = ctypes.CDLL("libcuda.so.1")
device, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
assert cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
assert cuda.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active)) == 0
print("gpu0-context-active", active.value)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert "gpu0-context-active 0" in out.stdout


@pytest.mark.parametrize("impl", CUDA_IMPLS)
def test_copy_in_and_copy_out_on_their_own_streams_keep_their_order(impl, gen):
    """Chunks of one group through two slots (the next chunk comes in while one is updated), K=1
    (the same group each step: its copy-in must wait for its own copy-out into host(g)), with
    long kernels on the compute stream and, for the plain-torch swapper, on each copy stream:
    the result is the arithmetic's, bit for bit."""
    sizes = [(1 << 20) + 7, (1 << 19) - 5, 12345]
    swapper = new_swapper(impl, sizes, slots=2, pin=True)
    expected = fill_hosts(swapper, sizes, gen)
    streams = [getattr(swapper, name, None) for name in ("_copy_in_stream", "_copy_out_stream")]
    for step in range(4):
        for stream in (s for s in streams if s is not None):
            with torch.cuda.stream(stream):
                torch.cuda._sleep(1_000_000)
        swapper.prefetch(0)
        for k in range(len(sizes)):
            flat = swapper.acquire(k)
            if k + 1 < len(sizes):
                swapper.prefetch(k + 1)
            torch.cuda._sleep(2_000_000)
            flat.mul_(0.5).add_(float(step - k))
            expected[k] = expected[k] * 0.5 + float(step - k)
            swapper.writeback(k)
    for k in range(len(sizes)):
        torch.testing.assert_close(swapper.host(k), expected[k], rtol=0, atol=0)
    swapper.close()
