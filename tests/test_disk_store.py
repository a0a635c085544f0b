"""state_store="disk": every group's state rests in files under state_dir and is staged through
a few host buffers. It changes where the bytes rest, never what training computes."""
import copy
import shutil
import time
from collections import namedtuple

import pytest
import torch

import tiny_models as tm
from hift import checkpoint, fit
from hift.groups import Group, Unit
from hift.state import OptimizerState, StateFormat
from hift.plan.auto import MemoryPlanError
from hift.store import DiskStore, StateStoreError

QUIET = dict(progress=False, lr=1e-2, order="random", seed=4, max_grad_norm=1.0)


def same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("options", [
    dict(),  # fp32 weights, whole-group chunks
    dict(group_size=5),  # K=1: the same chunk every step
    dict(precision="bf16", moment_dtype="bf16", state_chunk_mib=0.003),  # chunks that split parameters
    dict(precision="bf16", master_format="fp32", group_size=2),
    dict(precision="bf16", moment_dtype="int8", state_chunk_mib=0.003),  # int8 blocks and their scales
])
def test_disk_store_trains_exactly_like_the_host_store(tmp_path, options):
    model = tm.llama(layers=2)
    twin = copy.deepcopy(model)
    fit(model, tm.lm_batches(9), max_steps=9, offload=True, **options, **QUIET)
    fit(twin, tm.lm_batches(9), max_steps=9, state_store="disk", state_dir=str(tmp_path / "state"), **options, **QUIET)
    same_weights(model, twin)


def test_disk_store_resumes_exactly(tmp_path):
    model = tm.llama(layers=2)
    resumed = copy.deepcopy(model)
    options = dict(max_steps=10, precision="bf16", moment_dtype="bf16", state_store="disk", **QUIET)
    fit(model, tm.lm_batches(10), save_dir=str(tmp_path / "a"), save_every=4, keep_last=5,
        state_dir=str(tmp_path / "state-a"), **options)
    fit(resumed, tm.lm_batches(10), resume_from=str(tmp_path / "a" / "step-00000004"),
        state_dir=str(tmp_path / "state-b"), **options)
    same_weights(model, resumed)
    # the checkpoint holds every chunk's bytes, one file each
    last = checkpoint.latest(tmp_path / "a")
    assert len(list((last / checkpoint.STATE).glob("chunk-*"))) == 5  # whole-group chunks: one per group


def tiny_groups(sizes):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n).to(torch.bfloat16)) for n in sizes]
    return [Group(i, [Unit("block", [p], [f"p{i}"])]) for i, p in enumerate(params)]


def test_a_fresh_state_writes_no_zeros_and_stages_at_most_two_groups(tmp_path):
    """bf16 weights are their own masters at the start (remainder 0) and the moments are 0:
    the files are sparse. Host memory holds two staging buffers of the largest group."""
    sizes = [300_001, 200_003, 250_007]
    state = OptimizerState(tiny_groups(sizes), torch.device("cpu"), StateFormat("remainder", "fp32"),
                           offload=True, state_dir=str(tmp_path))
    store = state.store
    apparent = sum(p.stat().st_size for p in store.paths)
    assert apparent == sum(state.numels) * 4 >= 10 * max(sizes)
    assert store.disk_bytes() < apparent / 100
    staging = [store.swapper.host(s) for s in range(store.swapper.num_chunks())]
    assert len(staging) == 2 and all(b.numel() == max(state.numels) for b in staging)
    state.close()


def test_disk_store_round_trips_every_chunk_through_a_few_slots(tmp_path):
    """Chunks visit the staging slots in any order (a read ahead, a write chained behind the
    read of another chunk) and come back as they were written."""
    sizes = [1001, 2003, 57, 999]
    store = DiskStore([n for n in sizes], torch.device("cpu"), tmp_path, slots=2, pin=False)
    for c, n in enumerate(sizes):
        store.prefetch(c)
        store.acquire(c).copy_(torch.arange(n, dtype=torch.float32) + 1000 * c)
        store.release(c)
    for c in (2, 0, 3, 1, 1, 2):
        store.read_ahead((c + 1) % len(sizes))
        store.prefetch(c)
        flat = store.acquire(c)
        assert torch.equal(flat, torch.arange(sizes[c], dtype=torch.float32) + 1000 * c), c
        flat.add_(0)  # an update that changes nothing
        store.release(c)
    store.synchronize()
    for c, n in enumerate(sizes):
        assert torch.equal(store.resting(c), torch.arange(n, dtype=torch.float32) + 1000 * c)
    store.close()


def test_a_chunk_read_again_waits_for_its_own_write_from_another_slot(tmp_path):
    """Chunk 0 is written back slowly from one slot, evicted there by a read ahead, and staged
    again in the other slot: its read must wait for its own write, not only for that slot's."""
    store = DiskStore([1000, 1000, 1000], torch.device("cpu"), tmp_path, slots=2, pin=False)
    write = store._write_file
    store._write_file = lambda c, slot: (time.sleep(0.5 if c == 0 else 0.0), write(c, slot))
    store.prefetch(0)
    store.acquire(0).fill_(1.0)
    store.release(0)  # the slow write
    store.prefetch(1)
    store.read_ahead(2)  # evicts chunk 0 from its slot, behind its write
    store.acquire(1).fill_(2.0)
    store.release(1)
    store.prefetch(0)  # back into chunk 1's slot, while chunk 0's own write may still run
    assert torch.equal(store.acquire(0), torch.ones(1000))
    store.release(0)
    store.close()


def test_state_dir_that_cannot_be_written_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    model = tm.llama(layers=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(StateStoreError, match="not a directory hift can write to"):
        fit(model, tm.lm_batches(2), max_steps=2, state_store="disk", state_dir=str(blocker / "state"), **QUIET)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


@pytest.mark.parametrize("memory,error,says", [
    ("manual", StateStoreError, r"free; the optimizer state needs .* GiB there"),  # the store's own check
    ("auto", MemoryPlanError, r"nothing fits .*disk 1e-06 GB.*Without your state_store, state_store=host"),
])
def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch, memory, error, says):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**6, 10**6 - 1000, 1000))
    model = tm.llama(layers=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=says):
        fit(model, tm.lm_batches(2), max_steps=2, state_store="disk", state_dir=str(tmp_path), memory=memory, **QUIET)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_disk_store_needs_a_state_dir():
    from hift.config import ConfigError

    with pytest.raises(ConfigError, match="state_store='disk' needs state_dir"):
        fit(tm.llama(layers=2), tm.lm_batches(2), state_store="disk", **QUIET)


# -- the device path (forced on the CPU): order, slots, waits ------------------------------


def test_a_worker_waiting_for_a_copy_out_does_not_hold_up_the_main_thread(tmp_path):
    """The write of a chunk waits for its copy back from the device (slow here: the fake copy
    takes 0.6 s); meanwhile the main thread must go on queueing the next chunk's copies, so that
    the host runs ahead of the device."""
    store = DiskStore([1000, 1000, 1000], torch.device("cpu"), tmp_path, slots=3, pin=False,
                      device_slots=2, force_slots=True)
    swapper, done_at = store.swapper, {}
    real_writeback, real_wait, real_host = swapper.writeback, swapper.wait_for_host, swapper.host

    def writeback(slot):  # the copy out "lands" 0.6 s from now
        real_writeback(slot)
        done_at[slot] = time.monotonic() + 0.6

    def wait_until_landed(slot):
        time.sleep(max(0.0, done_at.pop(slot, 0.0) - time.monotonic()))

    swapper.writeback = writeback
    swapper.wait_for_host = lambda slot: (wait_until_landed(slot), real_wait(slot))[1]
    swapper.host = lambda slot: (wait_until_landed(slot), real_host(slot))[1]
    store.prefetch(1)  # staged before the clock starts
    store.acquire(0).fill_(1.0)
    store.release(0)  # a worker now waits 0.6 s for the copy-out before it writes the file
    time.sleep(0.1)  # ... and is waiting
    start = time.monotonic()
    store.acquire(1).fill_(2.0)
    store.release(1)
    queued = time.monotonic() - start
    store.synchronize()
    assert queued < 0.3, f"the main thread waited {queued:.2f} s for another chunk's copy-out"
    assert torch.equal(store.resting(0), torch.ones(1000)) and torch.equal(store.resting(1), torch.full((1000,), 2.0))
    store.close()


def test_a_chunk_read_ahead_frees_its_staging_slot_once_read(tmp_path):
    """Three staging slots hold three chunks in use; a chunk read ahead earlier, whose read is
    done, gives its slot up rather than leaving two usable (it is read again when asked for)."""
    sizes = [1000, 1001, 999, 1002]
    store = DiskStore(sizes, torch.device("cpu"), tmp_path, slots=3, pin=False, device_slots=3,
                      force_slots=True)
    for c, n in enumerate(sizes):
        store.initialize(c, lambda t, c=c: t.copy_(torch.arange(t.numel(), dtype=torch.float32) + 10_000 * c))
    store.read_ahead(3)
    store._reading[3].result()  # its read is done
    flats = []
    for c in range(3):
        store.prefetch(c)
        flats.append(store.acquire(c))
    for c, flat in enumerate(flats):
        assert torch.equal(flat, torch.arange(sizes[c], dtype=torch.float32) + 10_000 * c)
        store.release(c)
    store.prefetch(3)
    assert torch.equal(store.acquire(3), torch.arange(sizes[3], dtype=torch.float32) + 30_000)
    store.release(3)
    store.close()


def test_chunked_update_launches_each_update_before_waiting_for_the_next_chunk(tmp_path, monkeypatch):
    """Update k is launched before anything waits for chunk k+1 (its file read, its copy in):
    on a GPU the device then computes while the host waits for the disk."""
    import hift.state as state_module
    from hift import ops

    monkeypatch.setattr(state_module, "DiskStore",
                        lambda *args, **kwargs: DiskStore(*args, **kwargs, force_slots=True))
    groups = tiny_groups([3000, 1000])
    state = OptimizerState(groups, torch.device("cpu"), StateFormat("remainder", "bf16"), offload=True,
                           chunk_mib=0.002, state_dir=str(tmp_path))
    chunks = state.chunks_of[0]
    assert len(chunks) >= 3
    log = []
    store, adamw = state.store, ops.adamw_
    staged, acquire = store._staged, store.acquire
    store._staged = lambda c: (log.append(("wait", c)), staged(c))[1]
    store.acquire = lambda c: (log.append(("acquire", c)), acquire(c))[1]
    monkeypatch.setattr(ops, "adamw_", lambda *a, **k: (log.append(("update",)), adamw(*a, **k))[1])
    for p in groups[0].params:
        p.grad = torch.randn(p.shape).to(p.dtype)
    state.prefetch(chunks[0])
    state.update_group(0, lr=torch.tensor(1e-3), step=torch.tensor(1.0), betas=(0.9, 0.999), eps=1e-8,
                       weight_decays=[0.0], grad_scale=None, found_inf=torch.zeros(()))
    for k, c in enumerate(chunks[1:]):
        updated = [i for i, entry in enumerate(log) if entry == ("update",)][k]
        waited = log.index(("wait", c))
        assert updated < waited, f"chunk {c} was waited for before the update of chunk {chunks[k]}: {log}"
    state.close()


@pytest.mark.parametrize("where", ["host", "disk", "resident"])
def test_bytes_copied_are_the_state_bytes_of_each_step(tmp_path, where):
    """What the benchmark reads: per step, each chunk of the group in and out once (the disk
    store copies whole staging buffers, the largest chunk's bytes); nothing for the resident."""
    model = tm.llama(layers=2)
    options = dict(lr=1e-2, order="bottom_up", precision="bf16", moment_dtype="bf16", state_chunk_mib=0.004)
    if where == "host":
        options["offload"] = True
    elif where == "disk":
        options.update(state_store="disk", state_dir=str(tmp_path))
    else:
        options["offload"] = False
    import hift.state as state_module
    from hift import HiftAdamW

    real_disk_store = state_module.DiskStore
    state_module.DiskStore = lambda *args, **kwargs: real_disk_store(*args, **kwargs, force_slots=True)
    try:
        opt = HiftAdamW(model, **options)
    finally:
        state_module.DiskStore = real_disk_store
    state = opt.group_state
    store = state.store
    size = (lambda c: max(state.numels) * 4) if where == "disk" else (lambda c: state.numels[c] * 4)
    for batch in tm.lm_batches(6, seed=3):
        g = opt.active_group
        store.reset_bytes_copied()  # g's first chunk came in already, at the end of the last step
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        store.synchronize()
        if where == "resident":
            assert store.bytes_copied() == [0, 0]
            continue
        ours = [size(c) for c in state.chunks_of[g]]
        next_first = size(state.chunks_of[opt.active_group][0])  # prefetched for the next step
        assert store.bytes_copied() == [sum(ours) - ours[0] + next_first, sum(ours)], g
    opt.close()
