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
    assert len(list((last / checkpoint.STATE).iterdir())) == 5  # whole-group chunks: one per group


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
    staging = [store.swapper.host(s) for s in range(store.swapper.num_groups())]
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


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**6, 10**6 - 1000, 1000))
    model = tm.llama(layers=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(StateStoreError, match=r"free; the optimizer state needs .* GiB there"):
        fit(model, tm.lm_batches(2), max_steps=2, state_store="disk", state_dir=str(tmp_path), **QUIET)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_disk_store_needs_a_state_dir():
    from hift.config import ConfigError

    with pytest.raises(ConfigError, match="state_store='disk' needs state_dir"):
        fit(tm.llama(layers=2), tm.lm_batches(2), state_store="disk", **QUIET)
