"""Non-finite losses and gradients: one flag from the gradient-norm pass, for every precision
and clipping setting. The update that sees inf or nan is skipped and counted; outside fp16 the
run then stops in words (after saving), in fp16 a non-finite unscaled loss or too many
overflows in a row does. No inf or nan is ever written into a weight, a master or a moment."""
import copy
import math

import pytest
import torch
from safetensors.torch import load_file

import tiny_models as tm
from hift import NonFiniteError, checkpoint, fit

QUIET = dict(progress=False, lr=3e-3, log_every=3, order="bottom_up")


def poison_grads_at(model, events, step, value=math.nan):
    """Every gradient of the step with index `step` becomes `value`; the loss stays finite."""
    def hook(grad):
        return grad * value if len(events) == step else grad

    for p in model.parameters():
        p.register_hook(hook)


def all_finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors)


def state_tensors(event):
    """Every group's state as fp32 values (compact formats decoded)."""
    event.state.synchronize()
    views = [event.state.param_state(g) for g in range(len(event.groups))]
    return [t for v in views for t in (*v.masters, *v.exp_avgs, *v.exp_avg_sqs)]


def state_bytes(event):
    event.state.synchronize()
    return [event.state.storage(c).view(torch.uint8).clone() for c in range(len(event.state.chunks))]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_nan_gradient_with_a_finite_loss_is_skipped_counted_and_stops_the_run(tmp_path, precision, max_grad_norm):
    model = tm.llama(layers=2)
    events, weights, states = [], [], []
    poison_grads_at(model, events, step=4)

    def record(event):
        events.append((event.step, event.group, event.skipped))
        weights.append({n: p.detach().clone() for n, p in event.model.named_parameters()})
        states.append(state_bytes(event))
        assert all_finite(weights[-1].values()) and all_finite(state_tensors(event)), f"step {event.step}"

    with pytest.raises(NonFiniteError, match=r"gradient became inf or nan at step 4 while training group 4") as info:
        fit(model, tm.lm_batches(8), max_steps=8, precision=precision, max_grad_norm=max_grad_norm,
            save_dir=str(tmp_path), on_step=record, **QUIET)
    message = str(info.value)
    assert "skipped" in message and "saved its state in" in message, message
    # log_every=3: the flag is read with the losses after step 5, and the run stops there
    assert [skipped for _, _, skipped in events] == [False] * 4 + [True, False]
    assert info.value.result.skipped_steps == 1 and info.value.result.steps == 6
    assert all(math.isfinite(x) for x in info.value.result.losses)
    # the skipped step changed nothing, and the checkpoint holds the state after step 5
    assert all(torch.equal(weights[4][n], weights[3][n]) for n in weights[3])
    saved = checkpoint.latest(tmp_path)
    assert saved.name == "step-00000006"
    assert all_finite(load_file(str(saved / "model.safetensors")).values())
    assert all(torch.equal(checkpoint.load_chunk(saved, c), t) for c, t in enumerate(states[-1]))  # finite, as checked above
    assert all(torch.equal(t, weights[-1][n].to(t.dtype)) for n, t in model.state_dict().items() if n in weights[-1])


class NaNLossAt(torch.nn.Module):
    """Wraps a model; its loss is nan on the calls in `bad_calls` (call 1 is fit's probe)."""

    def __init__(self, inner, bad_calls):
        super().__init__()
        self.inner, self.bad_calls, self.calls = inner, bad_calls, 0

    def forward(self, **batch):
        loss = self.inner(**batch).loss
        self.calls += 1
        return loss * math.nan if self.calls in self.bad_calls else loss


def test_non_finite_loss_stops_with_the_step_and_group_after_saving(tmp_path):
    model = NaNLossAt(tm.llama(layers=2), bad_calls={4 + 1})
    snapshots = []
    with pytest.raises(NonFiniteError, match=r"loss became inf or nan at step 3 while training group \d") as info:
        fit(model, tm.lm_batches(6), max_steps=6, save_dir=str(tmp_path), max_grad_norm=1.0,
            on_step=lambda e: snapshots.append(copy.deepcopy(e.model.state_dict())), **QUIET)
    assert "saved its state in" in str(info.value)
    saved = load_file(str(checkpoint.latest(tmp_path) / "model.safetensors"))
    # step 3 changed nothing: the checkpoint holds the weights after step 2 plus steps 4 and 5
    assert all(torch.equal(snapshots[3][n], snapshots[2][n]) for n in snapshots[2])
    assert all(torch.equal(saved[n], snapshots[-1][n]) for n in saved)


def test_fp16_nan_loss_on_every_batch_stops_at_once():
    """Every step would be an "overflow" and the same group retried forever, the scale heading
    to zero: a non-finite *unscaled* loss is no overflow, and the run stops on the first."""
    model = NaNLossAt(tm.llama(layers=2), bad_calls=set(range(2, 10_000)))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteError, match=r"loss became inf or nan at step 0") as info:
        fit(model, tm.lm_batches(4), precision="fp16", max_steps=200, **QUIET)
    result = info.value.result
    assert result.steps == 1 and result.skipped_steps == 1 and math.isnan(result.losses[0])
    # fit cast the model to fp16 and then wrote nothing into it
    assert all(torch.equal(before[n].half(), t) for n, t in model.state_dict().items())


def test_fp16_overflows_in_a_row_end_the_run_after_max_consecutive_skips():
    model = tm.llama(layers=2)
    model.half()
    before = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.register_hook(lambda grad: grad * math.inf)
    with pytest.raises(NonFiniteError, match=r"fp16 overflowed 5 times in a row from step 0") as info:
        fit(model, tm.lm_batches(4), max_steps=200, max_consecutive_skips=5, **QUIET)
    result = info.value.result
    assert result.precision == "fp16" and result.steps == 5 and result.skipped_steps == 5
    assert result.groups == [result.groups[0]] * 5  # the same group retried each time
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_fp16_overflow_streak_resets_on_a_good_step():
    """Overflows that are not in a row never end the run, however many there are."""
    model = tm.llama(layers=2)
    events = []

    def every_other(grad):
        return grad * math.inf if len(events) % 2 == 0 else grad

    for p in model.parameters():
        p.register_hook(every_other)
    result = fit(model, tm.lm_batches(4), precision="fp16", max_steps=12, max_consecutive_skips=2,
                 on_step=lambda e: events.append(e.skipped), **QUIET)
    assert events == [True, False] * 6 and result.skipped_steps == 6
