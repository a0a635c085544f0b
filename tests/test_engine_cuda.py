"""The engine on a GPU: compiled swapper, Triton norm, fused CUDA update (skipped without one)."""
import copy
import math

import pytest
import torch

import tiny_models as tm
from hift import fit

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]
QUIET = dict(progress=False, lr=1e-2, order="random")


def on_gpu(model):
    return model.to("cuda")


def gpu_batches(n, **kw):
    return [{k: v.cuda() for k, v in b.items()} for b in tm.lm_batches(n, **kw)]


@pytest.mark.parametrize("chunk_mib", [None, 0.004])
def test_offloaded_bf16_trains_like_resident_and_weights_follow_masters(chunk_mib):
    model = on_gpu(tm.llama(layers=2))
    twin = copy.deepcopy(model)

    def check(event):
        event.state.synchronize()
        group = event.groups[event.group]
        for p, master in zip(group.params, event.state.param_state(event.group).masters):
            assert torch.equal(p.detach(), master.to(torch.bfloat16).cuda())

    result = fit(model, gpu_batches(8), max_steps=8, precision="bf16", offload=True,
                 state_chunk_mib=chunk_mib, on_step=check, **QUIET)
    fit(twin, gpu_batches(8), max_steps=8, precision="bf16", offload=False, **QUIET)
    assert all(math.isfinite(x) for x in result.losses)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


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
