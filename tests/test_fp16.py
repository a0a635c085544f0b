"""fp16: dynamic loss scale, and an overflow that skips the update without touching anything."""
import math

import pytest
import torch

import tiny_models as tm
from hift import fit


def snapshot(event):
    event.state.synchronize()
    return {
        "weights": [p.detach().clone() for p in event.model.parameters()],
        "states": [[t.clone() for t in (*v.masters, *v.exp_avgs, *v.exp_avg_sqs)]
                   for v in (event.state.host_views(g) for g in range(len(event.groups)))],
        "steps": event.state.steps.clone(),
        "scale": float(event.scaler.scale),
    }


@pytest.mark.parametrize("offload", [False, True])
def test_overflow_skips_the_step_halves_the_scale_and_retries_the_group(offload):
    model = tm.llama(layers=2)
    planted = 3
    events = []

    def poison(grad):
        return grad * math.inf if len(events) == planted else grad

    for p in model.parameters():
        p.register_hook(poison)

    def record(event):
        events.append((event.step, event.group, event.skipped, snapshot(event)))

    result = fit(model, tm.lm_batches(8), precision="fp16", max_steps=8, lr=1e-3, progress=False,
                 order="bottom_up", on_step=record, offload=offload)
    assert result.precision == "fp16" and result.skipped_steps == 1
    step, group, skipped, after = events[planted]
    _, _, _, before = events[planted - 1]
    assert skipped and step == planted
    for a, b in zip(after["weights"], before["weights"]):
        assert torch.equal(a, b)
    for group_a, group_b in zip(after["states"], before["states"]):
        assert all(torch.equal(a, b) for a, b in zip(group_a, group_b))
    assert torch.equal(after["steps"], before["steps"])
    assert after["scale"] == before["scale"] / 2
    # the same group trains on the next batch, and the rotation then goes on
    assert result.groups[planted + 1] == result.groups[planted] == group
    assert result.groups == [0, 1, 2, 3, 3, 4, 0, 1]
    assert not any(e[2] for i, e in enumerate(events) if i != planted)
    assert all(math.isfinite(x) for x in result.losses)


def test_fp16_weights_follow_their_masters():
    model = tm.llama(layers=2)

    def check(event):
        event.state.synchronize()
        group = event.groups[event.group]
        for p, master in zip(group.params, event.state.param_state(event.group).masters):
            assert p.dtype == torch.float16
            assert torch.equal(p.detach(), master.half())

    result = fit(model, tm.lm_batches(3), precision="fp16", max_steps=5, lr=1e-3, progress=False,
                 on_step=check)
    assert result.skipped_steps == 0
