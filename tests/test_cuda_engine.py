"""The engine on one GPU, where a read of the code cannot tell: no hidden host sync in a step;
compact moments and the disk store offloaded against resident, bit for bit; a step that reaches
none of its group with offload on; a checkpoint taken while the next chunk is being prefetched.
Skipped without a GPU (the reached-none step also runs on the CPU)."""
import copy

import pytest
import torch

import tiny_models as tm
from hift import HiftAdamW, fit

needs_gpu = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]
METHOD = dict(lr=1e-2, order="random", seed=7)  # HiftAdamW's options; fit's add progress
QUIET = dict(METHOD, progress=False)


def gpu_batches(n, batch=2, seed=1):
    return [{k: v.cuda() for k, v in b.items()} for b in tm.lm_batches(n, batch=batch, seed=seed)]


def same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("options", [dict(precision="bf16", moment_dtype="int8", state_chunk_mib=0.003),
                                     dict(precision="fp16"), dict(precision="fp32", max_grad_norm=0.5)],
                         ids=["bf16-int8-chunks", "fp16", "fp32-clip"])
def test_optimizer_steps_make_no_hidden_host_sync(options):
    model = tm.llama(layers=3).cuda()
    opt = HiftAdamW(model, offload=True, **{**METHOD, **options})
    for i, batch in enumerate(gpu_batches(8)):
        loss = model(**batch).loss  # the model's own forward may sync (masks); hift's step may not
        opt.scale_loss(loss).backward()
        if i >= 2:  # after the first steps: Triton compiled, chunk tables and slots made
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(loss=loss.detach())
            opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("options", [dict(moment_dtype="bf16"), dict(moment_dtype="int8", state_chunk_mib=0.003),
                                     dict(moment_dtype="int8", state_store="disk"),
                                     dict(moment_dtype="fp32", state_store="disk", state_chunk_mib=0.004)],
                         ids=["bf16", "int8-chunks", "int8-disk", "fp32-disk-chunks"])
def test_offloaded_state_trains_as_resident_bit_for_bit(options, tmp_path):
    model = tm.llama(layers=3).cuda()
    twin = copy.deepcopy(model)
    offloaded = dict(options, offload=True)
    if options.get("state_store") == "disk":
        offloaded["state_dir"] = str(tmp_path / "state")
    resident = {k: v for k, v in options.items() if k != "state_store"}
    a = fit(model, gpu_batches(9), max_steps=9, precision="bf16", **QUIET, **offloaded)
    b = fit(twin, gpu_batches(9), max_steps=9, precision="bf16", offload=False, **QUIET, **resident)
    assert a.groups == b.groups and a.losses == b.losses
    same_weights(model, twin)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_a_step_that_reaches_none_of_its_group_with_offload_on(device):
    """Step 2's loss does not reach the active group: its grads stay None, and the offloaded
    run goes on exactly as the resident one does."""
    runs = []
    for offload in (True, False):
        model = tm.llama(layers=2).to(device)
        opt = HiftAdamW(model, offload=offload, state_chunk_mib=0.004, **{**METHOD, "order": "bottom_up"},
                        precision="bf16", moment_dtype="int8")
        for i, batch in enumerate(tm.lm_batches(6, seed=1)):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            if i != 2:  # step 2: no backward, nothing of the group is reached
                loss.backward()
            opt.step(loss=loss.detach())
            opt.zero_grad()
        runs.append(model)
    same_weights(*runs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_a_checkpoint_taken_while_a_chunk_is_prefetched_resumes_exactly(tmp_path):
    """Each step ends by prefetching the next group's first chunk (host to device, on the copy
    stream); save_every=1 writes a checkpoint right then, so it must not read a slot in flight."""
    options = dict(QUIET, precision="bf16", moment_dtype="bf16", offload=True, state_chunk_mib=0.004,
                   num_cycles=3, keep_last=10)
    model = tm.llama(layers=3).cuda()
    resumed_model = copy.deepcopy(model)
    straight = fit(model, gpu_batches(4), save_dir=str(tmp_path / "a"), save_every=1, **options)
    k = straight.steps // 2
    resumed = fit(resumed_model, gpu_batches(4), save_dir=str(tmp_path / "b"),
                  resume_from=str(tmp_path / "a" / f"step-{k:08d}"), **options)
    assert resumed.losses == straight.losses and resumed.groups == straight.groups
    same_weights(model, resumed_model)
