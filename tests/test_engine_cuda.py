"""The engine on a GPU: compiled swapper, Triton norm, fused CUDA update (skipped without one).
The check that weights follow their masters runs on the CPU too: it needs no GPU to be wrong."""
import copy
import math

import pytest
import torch

import tiny_models as tm
from hift import fit, formats

needs_gpu = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_gpu)]
QUIET = dict(progress=False, lr=1e-2, order="random")


def on_gpu(model):
    return model.to("cuda")


def batches_on(device, n, **kw):
    return [{k: v.to(device) for k, v in b.items()} for b in tm.lm_batches(n, **kw)]


def gpu_batches(n, **kw):
    return batches_on("cuda", n, **kw)


def check_weights_follow_masters(event):
    """Each trained bf16 weight is its master under the remainder format: to nearest, ties away
    from zero (not .to(bfloat16)'s ties to even, which differs on exact ties)."""
    event.state.synchronize()
    group = event.groups[event.group]
    for p, master in zip(group.params, event.state.param_state(event.group).masters):
        assert torch.equal(p.detach(), formats.round_to_bf16_weight(master.to(p.device)).view(p.shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_mib", [None, 0.004])
def test_offloaded_bf16_trains_like_resident_and_weights_follow_masters(chunk_mib, device):
    model = tm.llama(layers=2).to(device)
    twin = copy.deepcopy(model)
    result = fit(model, batches_on(device, 8), max_steps=8, precision="bf16", offload=True,
                 state_chunk_mib=chunk_mib, on_step=check_weights_follow_masters, **QUIET)
    fit(twin, batches_on(device, 8), max_steps=8, precision="bf16", offload=False, **QUIET)
    assert all(math.isfinite(x) for x in result.losses)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("device", DEVICES)
def test_weights_follow_masters_on_exact_ties(device):
    """Random training almost never makes an exact bf16 tie, so they are made: an fp32 model whose
    every weight is a tie (low 16 bits 0x8000) keeps them as masters, and lr = 0 keeps them so."""
    model = tm.llama(layers=2)
    with torch.no_grad():
        for p in model.parameters():
            bits = p.view(torch.int32)
            bits.copy_((bits & ~0xFFFF) | 0x8000)
    model.to(device)
    fit(model, batches_on(device, 3), max_steps=3, precision="bf16", offload=True,
        on_step=check_weights_follow_masters, **{**QUIET, "lr": 0.0})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_fp16_overflow_skips_and_retries_on_gpu():
    model = on_gpu(tm.llama(layers=2))
    calls = []

    def poison(grad):
        return grad * math.inf if len(calls) == 2 else grad

    for p in model.parameters():
        p.register_hook(poison)
    result = fit(model, gpu_batches(6), max_steps=6, precision="fp16", offload=True, order="bottom_up",
                 on_step=lambda e: calls.append(e.skipped), progress=False, lr=1e-3)
    assert calls[2] and result.skipped_steps == 1
    assert result.groups[2] == result.groups[3]
