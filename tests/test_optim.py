"""HiftAdamW as a torch optimizer: the same method as fit, a torch state_dict that resumes bit
for bit, the learning rate held for a cycle, the grads of one group at a time."""
import copy
import io
import math

import pytest
import torch

import tiny_models as tm
from hift import HiftAdamW, fit, ops
from hift.groups import GroupingError
from hift.schedule import lr_at_cycle


@pytest.fixture
def reference_ops(monkeypatch):
    """Multi-step runs are compared bit for bit on the torch reference ops (see kernel_twins.py
    for why not on the fused kernel)."""
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)


def train(model, opt, batches, steps, accum=1, lr_of=None):
    """A plain loop: accum micro-batches per step; lr_of(opt), when given, sets every group's
    lr before each step (the optimizer reads it at the step that starts a cycle)."""
    stream = iter(batches)
    losses, groups, lrs = [], [], []
    for _ in range(steps):
        if lr_of is not None:
            for options in opt.param_groups:
                options["lr"] = lr_of(opt)
        total = torch.zeros(())
        for _ in range(accum):
            loss = model(**next(stream)).loss
            (opt.scale_loss(loss) / accum).backward()  # the loss itself outside fp16
            total += loss.detach().float()
        opt.step(loss=total / accum)
        opt.zero_grad()
        losses.append(float(total / accum))
        groups.append(opt.last_step.group)
        lrs.append(opt.last_step.lr)
    return losses, groups, lrs


def same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("options", [
    dict(order="random", seed=7, group_size=2, weight_decay=0.05, max_grad_norm=0.5),
    dict(order="top_down", precision="bf16", moment_dtype="bf16", offload=True, state_chunk_mib=0.004,
         max_grad_norm=1.0),
    dict(order="bottom_up", precision="bf16", master_format="fp32", max_grad_norm=None),
    dict(order="random", precision="fp16", loss_scale=2.0**10),
])
def test_plain_loop_equals_fit_bit_for_bit(reference_ops, options):
    model = tm.llama(layers=2)
    twin = copy.deepcopy(model)
    accum, steps = 2, 8
    batches = tm.lm_batches(steps * accum, seed=4)
    result = fit(model, batches, max_steps=steps, accum_steps=accum, lr=3e-3, lr_schedule="linear",
                 warmup_cycles=1, progress=False, **options)
    opt = HiftAdamW(twin, lr=3e-3, example_batch=batches[0], **options)
    k = len(opt.param_groups)
    schedule = dict(base_lr=3e-3, schedule="linear", total_cycles=math.ceil(steps / k), warmup_cycles=1)
    losses, groups, lrs = train(twin, opt, batches, steps, accum, lr_of=lambda o: lr_at_cycle(o.cycle, **schedule))
    opt.close()
    assert groups == result.groups and lrs == result.lrs and losses == result.losses
    same_weights(model, twin)


def test_only_the_active_group_requires_grad_from_construction_on():
    model = tm.llama(layers=2)
    opt = HiftAdamW(model, lr=1e-2, order="bottom_up")
    k = len(opt.param_groups)
    assert k == 5 and opt.active_group == 0
    batches = tm.lm_batches(k + 1)
    for step, batch in enumerate(batches):
        active = {id(p) for p in opt.param_groups[opt.active_group]["params"]}
        assert {id(p) for p in model.parameters() if p.requires_grad} == active
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(**batch).loss.backward()
        # the first backward too writes grads for the active group alone (no graph below it)
        assert {id(p) for p in model.parameters() if p.grad is not None} == active
        opt.step()
        changed = {id(p) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == active, f"step {step}"
        assert all(p.grad is None for p in model.parameters())
    assert opt.cycle == 1 and opt.active_group == 1
    opt.close()
    assert all(p.requires_grad for p in model.parameters())


def test_param_groups_are_the_groups_in_order_with_torch_keys():
    model = tm.llama(layers=2)
    opt = HiftAdamW(model, lr=1e-3, weight_decay=0.1, group_size=2)
    assert len(opt.param_groups) == 3
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    for options in opt.param_groups:
        assert options["lr"] == 1e-3 and options["weight_decay"] == 0.1 and options["betas"] == (0.9, 0.999)
    with pytest.raises(NotImplementedError, match="fixed"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    opt.close()


def round_trip(state_dict):
    """What a trainer does with it: torch.save, then torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("options", [
    dict(order="random", seed=3, max_grad_norm=1.0),
    dict(order="top_down", precision="bf16", moment_dtype="bf16", offload=True, state_chunk_mib=0.004),
    dict(order="random", precision="bf16", state_store="disk"),
])
def test_state_dict_resumes_bit_for_bit(tmp_path, options):
    """Stop mid-cycle, save the model and the optimizer's state_dict as a trainer would, load
    both into a fresh model and HiftAdamW, and go on: the same weights and state as a run that
    went straight; the lr held for the interrupted cycle comes back with it."""
    disk = options.get("state_store") == "disk"
    where = lambda run: dict(options, state_dir=str(tmp_path / run)) if disk else options
    model = tm.llama(layers=2)
    fresh = copy.deepcopy(model)
    batches = tm.lm_batches(13, seed=8)
    lr_of = lambda o: 1e-2 / (1 + o.steps_taken)  # changes every step: only cycle starts count
    opt = HiftAdamW(model, lr=1e-2, **where("straight"))
    straight = train(model, opt, batches, 13, lr_of=lr_of)

    model2 = copy.deepcopy(fresh)
    opt2 = HiftAdamW(model2, lr=1e-2, **where("first"))
    first = train(model2, opt2, batches[:7], 7, lr_of=lr_of)
    saved_model, saved_opt = round_trip(model2.state_dict()), round_trip(opt2.state_dict())
    opt2.close()

    resumed = copy.deepcopy(fresh)  # as a trainer makes it before it loads the checkpoint
    opt3 = HiftAdamW(resumed, lr=1e-2, **where("resumed"))
    resumed.load_state_dict(saved_model)
    opt3.load_state_dict(saved_opt)
    assert opt3.steps_taken == 7 and opt3.active_group == opt2.active_group
    rest = train(resumed, opt3, batches[7:], 6, lr_of=lr_of)
    assert [a + b for a, b in zip(first, rest)] == list(straight)
    same_weights(model, resumed)
    ours, theirs = opt.state_dict()["hift"], opt3.state_dict()["hift"]
    assert len(ours["chunks"]) == len(theirs["chunks"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(ours["chunks"], theirs["chunks"], strict=True))
    assert ours["steps"] == theirs["steps"] and ours["order"] == theirs["order"]
    opt.close()
    opt3.close()


def test_state_dict_before_the_first_step_carries_no_state():
    """accelerate's prepare() round-trips the optimizer's state_dict (to the device, for
    optimizers whose state lives there): before the first step it is small, and loading it
    changes nothing."""
    model = tm.llama(layers=2)
    opt = HiftAdamW(model, lr=1e-2)
    state = opt.state_dict()
    assert state["hift"]["chunks"] is None and state["state"] == {}
    opt.load_state_dict(round_trip(state))
    train(model, opt, tm.lm_batches(2), 2)
    with pytest.raises(ValueError, match="before its first step"):
        opt.load_state_dict(state)
    opt.close()


def test_state_dict_of_another_run_is_refused():
    opt = HiftAdamW(tm.llama(layers=2), lr=1e-2)
    other = HiftAdamW(tm.llama(layers=2), lr=1e-2, group_size=2)
    with pytest.raises(ValueError, match=r"another run \(groups: 5 entries there, 3 entries here"):
        other.load_state_dict(opt.state_dict())
    opt.close()
    other.close()


def test_lr_is_read_at_the_step_that_starts_a_cycle():
    """A scheduler that changes the lr every step: each cycle trains at its value at the
    cycle's first step."""
    model = tm.llama(layers=2)
    opt = HiftAdamW(model, lr=1.0)
    k = len(opt.param_groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    lrs, expected = [], []
    for step, batch in enumerate(tm.lm_batches(3 * k)):
        expected.append(1.0 / (step - step % k + 1))
        model(**batch).loss.backward()
        opt.step()
        scheduler.step()
        opt.zero_grad()
        lrs.append(opt.last_step.lr)
    assert lrs == expected
    opt.close()


def test_non_finite_gradient_skips_the_update_and_moves_on():
    model = tm.llama(layers=2)
    opt = HiftAdamW(model, lr=1e-2, order="bottom_up")
    batches = tm.lm_batches(3)
    train(model, opt, batches[:1], 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(**batches[1]).loss.backward()
    for options in opt.param_groups[1:2]:
        options["params"][0].grad.fill_(math.nan)
    opt.step()
    opt.zero_grad()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert opt.skipped_updates == 1 and opt.active_group == 2
    assert bool(opt.last_step.skipped)
    opt.close()


def test_fp16_needs_the_loss_scaled():
    model = tm.llama(layers=2).half()
    opt = HiftAdamW(model, lr=1e-3)
    batch = tm.lm_batches(2)
    model(**batch[0]).loss.backward()
    with pytest.raises(RuntimeError, match="scale_loss"):
        opt.step()
    opt.zero_grad()
    opt.scale_loss(model(**batch[1]).loss).backward()
    opt.step()
    assert opt.last_step.retried is False and opt.steps_taken == 1
    opt.close()


def test_a_plain_module_needs_an_example_batch_or_units():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x.square().mean()

    model = Plain()
    with pytest.raises(GroupingError, match="example_batch"):
        HiftAdamW(model)
    by_batch = HiftAdamW(model, example_batch=torch.randn(2, 4))
    assert len(by_batch.param_groups) == 3
    by_batch.close()
    by_units = HiftAdamW(model, units=list(model.blocks), group_size=3)
    assert len(by_units.param_groups) == 1
    by_units.close()


@pytest.mark.parametrize("store", [
    dict(offload=True),  # one device slot: the prefetched chunk must come back out before the next
    dict(offload=True, precision="bf16", state_chunk_mib=0.004),  # chunks: two slots
    dict(state_store="disk"),
    dict(state_store="disk", precision="bf16", moment_dtype="int8", state_chunk_mib=0.003),
], ids=["host", "host-chunks", "disk", "disk-chunks"])
def test_steps_that_reach_none_of_the_group_release_its_prefetched_chunk(reference_ops, tmp_path, store):
    """Batches that reach none of the active group (here: no backward at all) leave the state as
    it was and move the rotation on. A whole cycle of them, then normal steps, trains exactly as
    if they had never been given (the rotation is sequential and the lr constant)."""
    if store.get("state_store") == "disk":
        store = dict(store, state_dir=str(tmp_path / "state"))
    model = tm.llama(layers=2)
    twin = copy.deepcopy(model)
    batches = tm.lm_batches(7, seed=5)
    options = dict(lr=3e-3, order="bottom_up", **store)
    opt = HiftAdamW(model, example_batch=batches[0], **options)
    k = len(opt.param_groups)
    for _ in range(2 * k):  # two cycles of steps whose batch reaches nothing
        opt.step()
    assert opt.active_group == 0 and opt.steps_taken == 2 * k
    train(model, opt, batches, len(batches))
    opt.close()
    reference = HiftAdamW(twin, example_batch=batches[0], **dict(options, state_dir=str(tmp_path / "ref")))
    train(twin, reference, batches, len(batches))
    reference.close()
    same_weights(model, twin)


def test_every_option_is_a_config_field_once_in_signature_and_docstring():
    """The options are listed once, in hift.Config: HiftAdamW's keyword options, its signature and
    its docstring follow it (a Config field fit's loop does not read is an option here too)."""
    import dataclasses
    import inspect

    from hift.config import LOOP_FIELDS, Config
    from hift.optim import OPTIONS

    fields = [f.name for f in dataclasses.fields(Config)]
    assert set(OPTIONS) | set(LOOP_FIELDS) == set(fields) and not set(OPTIONS) & set(LOOP_FIELDS)
    signature = inspect.signature(HiftAdamW)
    assert set(OPTIONS) < set(signature.parameters)
    assert signature.parameters["max_grad_norm"].default is None  # a trainer clips already
    for name in OPTIONS:
        assert f" {name}" in HiftAdamW.__doc__, f"HiftAdamW's docstring does not list {name}"
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['num_cycles'\].*belong to hift.fit"):
        HiftAdamW(tm.llama(layers=2), num_cycles=3)


def test_config_and_keyword_options_make_the_same_optimizer():
    from hift import Config

    a = HiftAdamW(tm.llama(layers=2), lr=1e-2, order="random", seed=4, group_size=2)
    b = HiftAdamW(tm.llama(layers=2), config=Config(lr=1e-3, order="random", seed=4, num_cycles=2), group_size=2,
                  lr=1e-2)
    assert a.fingerprint() == b.fingerprint() and [pg["lr"] for pg in b.param_groups] == [1e-2] * len(b.groups)
    assert a.max_grad_norm is None and b.max_grad_norm == 1.0  # the Config's default where one is given
    a.close()
    b.close()


def test_state_dict_of_another_format_is_refused_naming_it():
    model = tm.llama(layers=2)
    opt = HiftAdamW(model, lr=1e-2)
    train(model, opt, tm.lm_batches(2), 2)
    state = round_trip(opt.state_dict())
    state["hift"]["format"] = 3
    with pytest.raises(ValueError, match="written in format 3 of hift's optimizer state.*reads format 4"):
        opt.load_state_dict(state)
    del state["hift"]["format"]
    with pytest.raises(ValueError, match="a format before 4"):
        opt.load_state_dict(state)
    opt.close()


def test_a_fit_checkpoint_and_a_state_dict_hold_the_same_method_state(reference_ops, tmp_path):
    """fit's checkpoint (state/method.json and its chunk files) and HiftAdamW.state_dict()["hift"]
    of the same run hold one MethodState, key for key, and the same chunks' bytes; each loads
    into the other's optimizer."""
    import json

    from hift import checkpoint
    from hift.resume import MethodState

    options = dict(lr=3e-3, order="random", seed=2, max_grad_norm=1.0, state_chunk_mib=0.004)
    model = tm.llama(layers=2)
    twin = copy.deepcopy(model)
    batches = tm.lm_batches(5, seed=4)
    fit(model, batches, max_steps=5, lr_schedule="constant", progress=False, save_dir=str(tmp_path), **options)
    saved = checkpoint.latest(tmp_path)
    opt = HiftAdamW(twin, example_batch=batches[0], **options)
    train(twin, opt, batches, 5)
    ours = opt.state_dict()
    method = json.loads((saved / checkpoint.method_file()).read_text())
    assert method == {k: v for k, v in ours["hift"].items() if k != "chunks"}
    assert MethodState.from_dict(method) == opt.method_state()
    chunks = [checkpoint.load_chunk(saved, c) for c in range(len(ours["hift"]["chunks"]))]
    assert all(torch.equal(a, b) for a, b in zip(chunks, ours["hift"]["chunks"]))
    # the checkpoint's MethodState and chunks as a state_dict load into a fresh HiftAdamW
    fresh = HiftAdamW(tm.llama(layers=2), example_batch=batches[0], **options)
    fresh.load_state_dict({"state": {}, "param_groups": ours["param_groups"], "hift": {**method, "chunks": chunks}})
    assert fresh.method_state() == opt.method_state()
    opt.close()
    fresh.close()
