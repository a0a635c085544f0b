"""The training loop against references written here: full AdamW, per-group AdamW, schedules,
accumulation, precision."""
import copy
import math

import pytest
import torch

import tiny_models as tm
from hift import fit, formats, ops
from kernel_twins import CheckedFusedAdamW
from hift.groups import detect_units, make_groups
from hift.schedule import GroupOrder, lr_at_cycle

QUIET = dict(progress=False, max_grad_norm=None)
# hift keeps the LR in a 0-d fp32 tensor on the device (no host sync, graph-capturable), so the
# references use LRs that fp32 represents exactly
FP32_LR = float(torch.tensor(1e-3, dtype=torch.float32))


@pytest.fixture(params=["reference", "fused"])
def kernel(request, monkeypatch):
    """Run the engine on the torch reference ops (which must match torch.optim.AdamW bit for
    bit: same ops, same order), and on the fused extension kernel with every one of its calls
    held to the reference on the same inputs (kernel_twins.py says why not to a torch run)."""
    if request.param == "reference":
        monkeypatch.setattr(ops, "HAS_EXTENSION", False)
        return None
    if not ops.HAS_EXTENSION:
        pytest.skip("hift._C is not built")
    checked = CheckedFusedAdamW(ops.adamw_)
    monkeypatch.setattr(ops, "adamw_", checked)
    return checked


def assert_matches_adamw(model, reference, kernel, steps):
    """On the reference ops the run equals torch's AdamW bit for bit; on the fused kernel each
    of its `steps` updates was held to the reference as it ran."""
    if kernel is None:
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p, q), name
    else:
        assert kernel.calls == steps


def assert_params_close(model, reference, rtol=1e-6):
    """Within rtol of the reference, relative to each element or, for elements near zero, to
    the tensor's scale (torch's CPU sqrt is MKL's, at times 1 ulp off the exact one that the
    fused kernel takes, and a few ulps of a weight of size 0.05 dwarf an element near 0)."""
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        atol = rtol * q.detach().abs().max().item()
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def adamw_param_groups(params, weight_decay):
    """torch's AdamW with hift's rule: no decay on 1-D parameters (biases, norm weights)."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def test_one_group_equals_full_adamw(kernel):
    model = tm.llama(layers=2)
    reference = copy.deepcopy(model)
    batches = tm.lm_batches(10)
    fit(model, batches, group_size=5, max_steps=10, lr=FP32_LR, weight_decay=0.1,
        lr_schedule="constant", **QUIET)
    optimizer = torch.optim.AdamW(adamw_param_groups(list(reference.parameters()), 0.1), lr=FP32_LR)
    for batch in batches:
        reference(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_matches_adamw(model, reference, kernel, steps=10)


@pytest.mark.parametrize("master_format", ["auto", "fp32"])
def test_bf16_one_group_equals_full_adamw_on_an_fp32_master(kernel, master_format):
    """The bf16 weights' masters, as 16-bit remainders (the default) or fp32 copies, are the
    parameters of torch's AdamW run on an fp32 copy of the model, bit for bit; the weights are
    those masters rounded."""
    model = tm.llama(layers=2)
    reference = copy.deepcopy(model)
    batches = tm.lm_batches(8)
    masters = {}

    def keep_masters(event):
        event.state.synchronize()
        masters.update(zip((id(p) for p in event.groups[0].params), event.state.param_state(0).masters))

    fit(model, batches, group_size=5, max_steps=8, lr=FP32_LR, weight_decay=0.1, lr_schedule="constant",
        precision="bf16", master_format=master_format, on_step=keep_masters, **QUIET)
    optimizer = torch.optim.AdamW(adamw_param_groups(list(reference.parameters()), 0.1), lr=FP32_LR)
    for batch in batches:
        # the forward and backward run on the bf16 weights, the update on the fp32 masters
        weights = copy.deepcopy(reference).to(torch.bfloat16)
        for p, q in zip(weights.parameters(), reference.parameters()):
            p.data = rounded_to_weight(q.detach(), master_format)
        weights(**batch).loss.backward()
        for p, q in zip(weights.parameters(), reference.parameters()):
            q.grad = p.grad.float()
        optimizer.step()
    if kernel is not None:
        assert kernel.calls == 8
        return
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(masters[id(p)], q.detach()), name
        assert torch.equal(p.detach(), rounded_to_weight(q.detach(), master_format)), name


def reference_lr(cycle, base, total, warmup):
    """Linear warm-up then linear decay, by cycle, as documented for lr_schedule='linear'."""
    if cycle < warmup:
        return base * (cycle + 1) / (warmup + 1)
    return base * (1 - (cycle - warmup) / (total - warmup))


@pytest.mark.parametrize("order", ["bottom_up", "top_down", "random"])
def test_k_groups_equal_one_adamw_per_group(order, kernel):
    model = tm.llama(layers=3)
    reference = copy.deepcopy(model)
    batch0 = tm.lm_batches(1)[0]
    groups = make_groups(detect_units(reference, lambda: reference(**batch0)), 2)
    k, cycles, base_lr = len(groups), 2, 3e-3
    batches = tm.lm_batches(k * cycles, seed=5)
    result = fit(model, batches, group_size=2, num_cycles=cycles, order=order, lr=base_lr,
                 weight_decay=0.05, lr_schedule="linear", warmup_cycles=1, seed=7, **QUIET)

    if order == "bottom_up":
        expected = [0, 1, 2] * cycles
    elif order == "top_down":
        expected = [2, 1, 0] * cycles
    else:
        expected = result.groups
        cycle_orders = [expected[i * k:(i + 1) * k] for i in range(cycles)]
        assert all(sorted(o) == list(range(k)) for o in cycle_orders)
    assert result.groups == expected

    optimizers = [torch.optim.AdamW(adamw_param_groups(g.params, 0.05), lr=base_lr) for g in groups]
    for step, (g, batch) in enumerate(zip(expected, batches)):
        lr = float(torch.tensor(reference_lr(step // k, base_lr, cycles, 1), dtype=torch.float32))
        for pg in optimizers[g].param_groups:
            pg["lr"] = lr
        reference.zero_grad()
        reference(**batch).loss.backward()
        optimizers[g].step()
    assert_matches_adamw(model, reference, kernel, steps=k * cycles)


def test_random_order_is_fresh_each_cycle_and_seeded():
    a, b = GroupOrder(8, "random", seed=3), GroupOrder(8, "random", seed=3)
    orders = [a.order_of_cycle(c) for c in range(6)]
    assert orders == [b.order_of_cycle(c) for c in range(6)]
    assert len({tuple(o) for o in orders}) > 1
    assert all(sorted(o) == list(range(8)) for o in orders)
    assert GroupOrder(8, "random", seed=4).order_of_cycle(0) != orders[0] or \
        GroupOrder(8, "random", seed=4).order_of_cycle(1) != orders[1]


def test_step_changes_only_the_active_group():
    model = tm.llama(layers=3)
    batches = tm.lm_batches(6)
    seen = []

    def check(event):
        after = {id(p): p.detach().clone() for p in event.model.parameters()}
        active = {id(p) for p in event.groups[event.group].params}
        changed = {pid for pid, value in after.items() if not torch.equal(value, before[pid])}
        assert changed == active, f"step {event.step}: group {event.group}"
        seen.append(event.group)
        before.clear()
        before.update(after)

    before = {id(p): p.detach().clone() for p in model.parameters()}
    fit(model, batches, max_steps=6, lr=1e-2, on_step=check, order="random", **QUIET)
    assert sorted(seen) == list(range(6))


def rounded_to_weight(master, master_format):
    """The bf16 weight of an fp32 master: ties away from zero with a remainder (so that 16 bits
    give the master back), to even with an fp32 master (as torch rounds)."""
    return formats.round_to_bf16_weight(master) if master_format != "fp32" else master.to(torch.bfloat16)


@pytest.mark.parametrize("master_format", ["auto", "fp32"])
@pytest.mark.parametrize("offload,chunk_mib,moments", [(False, None, "fp32"), (True, None, "fp32"),
                                                      (True, 0.004, "fp32"), (True, 0.004, "bf16"),
                                                      (True, 0.004, "int8")])
def test_bf16_weight_is_master_rounded(offload, chunk_mib, moments, master_format):
    model = tm.llama(layers=2)
    checked = []

    def check(event):
        event.state.synchronize()
        group = event.groups[event.group]
        masters = event.state.param_state(event.group).masters
        assert len(masters) == len(group.params)
        for p, master in zip(group.params, masters):
            assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
            assert torch.equal(p.detach(), rounded_to_weight(master, master_format).to(p.device))
        checked.append(event.step)

    result = fit(model, tm.lm_batches(5), precision="bf16", max_steps=10, lr=1e-2, on_step=check,
                 offload=offload, state_chunk_mib=chunk_mib, moment_dtype=moments,
                 master_format=master_format, **QUIET)
    assert checked == list(range(10)) and result.precision == "bf16"
    assert all(math.isfinite(x) for x in result.losses)


def test_bf16_masters_start_from_the_fp32_weights():
    model = tm.llama(layers=2)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    firsts = {}

    def grab(event):
        # before its first update a group's master must equal the fp32 weight it was made from
        if event.step == 0:
            event.state.synchronize()
            for g in range(len(event.groups)):
                if g == event.group:
                    continue
                for p, master in zip(event.groups[g].params, event.state.param_state(g).masters):
                    firsts[names[id(p)]] = master.clone()

    fit(model, tm.lm_batches(1), precision="bf16", max_steps=1, on_step=grab, **QUIET)
    assert firsts
    for name, master in firsts.items():
        assert torch.equal(master, original[name])


def test_lr_at_every_step_is_the_schedule_of_its_cycle():
    model = tm.llama(layers=2)
    k = 5
    for schedule in ("constant", "linear", "cosine"):
        result = fit(copy.deepcopy(model), tm.lm_batches(4), num_cycles=6, lr=1e-3, lr_schedule=schedule,
                     warmup_cycles=2, **QUIET)
        assert result.steps == 6 * k and result.cycles == 6
        expected = [lr_at_cycle(s // k, base_lr=1e-3, schedule=schedule, total_cycles=6, warmup_cycles=2)
                    for s in range(result.steps)]
        assert result.lrs == expected
        # the LR changes only between cycles
        assert all(len(set(result.lrs[c * k:(c + 1) * k])) == 1 for c in range(6))
    cosine = [lr_at_cycle(c, base_lr=1.0, schedule="cosine", total_cycles=6, warmup_cycles=2) for c in range(6)]
    assert cosine[:3] == [1 / 3, 2 / 3, 1.0] and cosine[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_max_steps_counts_the_schedule_in_cycles():
    result = fit(tm.llama(layers=2), tm.lm_batches(3), max_steps=12, lr=1.0, lr_schedule="linear", **QUIET)
    # 5 groups: 12 steps span ceil(12 / 5) = 3 cycles, so the LR falls 1, 2/3, 1/3 by cycle
    assert result.lrs == pytest.approx([1.0] * 5 + [2 / 3] * 5 + [1 / 3] * 2, rel=1e-15)


def test_epochs_default_is_one_pass_over_the_loader():
    result = fit(tm.llama(layers=2), tm.lm_batches(7), accum_steps=2, **QUIET)
    assert result.steps == 3


@pytest.mark.parametrize("micro", [2, 3])
def test_accumulation_equals_one_step_on_the_concatenation(micro):
    model = tm.llama(layers=2)
    reference = copy.deepcopy(model)
    small = tm.lm_batches(4 * micro, batch=2, seed=9)
    joined = [{key: torch.cat([b[key] for b in small[i:i + micro]]) for key in small[0]}
              for i in range(0, len(small), micro)]
    # A sum over micro-batches and one over their concatenation round differently; eps well
    # above the rounding keeps Adam from magnifying it on near-zero gradients (m/sqrt(v) ~ +-1).
    options = dict(max_steps=4, lr=1e-2, eps=1e-4, order="bottom_up", **QUIET)
    a = fit(model, small, accum_steps=micro, **options)
    b = fit(reference, joined, **options)
    assert a.groups == b.groups
    assert a.losses == pytest.approx(b.losses, rel=1e-6)
    assert_params_close(model, reference, rtol=1e-5)


class ScaledLoss(torch.nn.Module):
    """A model whose loss is multiplied by `factor`: the same minimum, gradients `factor` times larger."""

    def __init__(self, inner, factor):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, **batch):
        return self.inner(**batch).loss * self.factor


def test_clipping_bounds_the_update_of_a_huge_gradient(kernel):
    """A gradient ~1e4 times the clip norm is cut to it, exactly as clip_grad_norm_ does. eps is
    set near the clipped gradients' size so that the cut shows in the update (Adam divides the
    scale of the gradient out otherwise), and the unclipped run is shown to differ."""
    model = ScaledLoss(tm.llama(layers=2), factor=1e4)
    clipped, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    batches = tm.lm_batches(2)
    options = dict(lr=1e-3, eps=1e-2, weight_decay=0.0)
    fit(model, batches, group_size=5, max_steps=2, max_grad_norm=0.5, progress=False,
        lr_schedule="constant", **options)
    norms = []
    for reference, clip in ((clipped, True), (unclipped, False)):
        optimizer = torch.optim.AdamW(reference.parameters(), **options)
        for batch in batches:
            reference(**batch).backward()
            if clip:
                norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)))
            optimizer.step()
            optimizer.zero_grad()
    assert min(norms) > 1e3  # the gradient really was huge
    assert_params_close(model, clipped, rtol=1e-5)
    with pytest.raises(AssertionError):
        assert_params_close(model, unclipped, rtol=1e-2)
    if kernel is not None:
        assert kernel.calls == 2


def test_requires_grad_and_mode_are_restored():
    model = tm.llama(layers=2)
    model.eval()
    frozen = model.model.embed_tokens.weight
    frozen.requires_grad_(False)
    fit(model, tm.lm_batches(2), max_steps=2, **QUIET)
    assert not model.training
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not frozen)


@pytest.mark.parametrize("group_size,chunk_mib,moments", [(1, None, "fp32"), (2, None, "fp32"), (5, None, "fp32"),
                                                          (1, 0.004, "fp32"), (2, 0.01, "fp32"),
                                                          (2, None, "bf16"), (1, 0.003, "bf16"),
                                                          (2, None, "int8"), (1, 0.003, "int8")])
def test_offloaded_state_trains_exactly_like_resident_state(group_size, chunk_mib, moments):
    """Host buffers and device slots (plain copies on the CPU) change nothing but placement,
    including K=1 (the group after the current one is itself) and state streamed in chunks
    that split parameters (stochastically rounded moments draw by element, not by chunk)."""
    model = tm.llama(layers=2)
    twin = copy.deepcopy(model)
    options = dict(group_size=group_size, max_steps=7, lr=1e-2, precision="bf16", order="random",
                   moment_dtype=moments, **QUIET)
    fit(model, tm.lm_batches(7), offload=True, state_chunk_mib=chunk_mib, **options)
    fit(twin, tm.lm_batches(7), offload=False, **options)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


class PlainLM(torch.nn.Module):
    """A hand-written model (no transformers): its forward returns the loss."""

    def __init__(self, vocab=37, width=16, depth=3):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU()) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens, targets):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return torch.nn.functional.cross_entropy(self.head(self.norm(h)).flatten(0, 1), targets.flatten())


def plain_model_and_batches(n):
    """A PlainLM, a copy of it, and n (tokens, targets) batches."""
    torch.manual_seed(0)
    model = PlainLM()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 37, (3, 5), generator=g), torch.randint(0, 37, (3, 5), generator=g))
               for _ in range(n)]
    return model, copy.deepcopy(model), batches


def test_plain_module_trains_and_matches_per_group_adamw(kernel):
    model, reference, batches = plain_model_and_batches(12)
    result = fit(model, batches, num_cycles=2, lr=FP32_LR, lr_schedule="constant", order="bottom_up", **QUIET)
    assert result.num_groups == 6 and result.groups == list(range(6)) * 2
    units = [[reference.embed.weight], *[list(b.parameters()) for b in reference.blocks],
             list(reference.norm.parameters()), list(reference.head.parameters())]
    optimizers = [torch.optim.AdamW(adamw_param_groups(u, 0.0), lr=FP32_LR) for u in units]
    for step, (tokens, targets) in enumerate(batches):
        reference.zero_grad()
        reference(tokens, targets).backward()
        optimizers[step % 6].step()
    assert_matches_adamw(model, reference, kernel, steps=12)


@pytest.mark.parametrize("how", ["user", "recompute_activations"])
def test_recomputed_activations_change_memory_not_results(how):
    """The frozen blocks above the active group keep only their inputs and recompute the rest
    in backward (transformers' own checkpointing, turned on by the user or by hift): same
    weights, and the model is left as it was."""
    model = tm.llama(layers=3)
    twin = copy.deepcopy(model)
    options = dict(max_steps=6, lr=1e-2, order="top_down", **QUIET)
    if how == "user":
        twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fit(model, tm.lm_batches(6), **options)
    fit(twin, tm.lm_batches(6), recompute_activations=how != "user", **options)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    assert twin.model.gradient_checkpointing == (how == "user")


def test_recompute_wraps_a_plain_models_blocks_and_unwraps_them():
    model, twin, batches = plain_model_and_batches(6)
    calls = {"plain": 0, "recompute": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1
        return hook

    model.blocks[0][0].register_forward_hook(counter("plain"))
    twin.blocks[0][0].register_forward_hook(counter("recompute"))
    options = dict(max_steps=6, lr=FP32_LR, order="bottom_up", **QUIET)
    fit(model, batches, **options)
    fit(twin, batches, recompute_activations=True, **options)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    # bottom_up: the embeddings' step backpropagates through block 0 frozen (recomputed), block
    # 0's own step recomputes it too; the steps above block 0 never reach it in backward
    assert calls["recompute"] == calls["plain"] + 2
    assert all("forward" not in vars(block) for block in twin.blocks)


@pytest.mark.parametrize("precision,chunk_mib", [("bf16", None), ("fp32", 0.003)])
def test_int8_moments_train_and_each_fused_update_is_its_reference(kernel, precision, chunk_mib):
    """int8 moments through the engine: on the fused kernel every call (codes and block scales,
    chunks cut between blocks) is held to the reference codec; on either, the loss falls as
    with fp32 moments (24 steps: an int8 step is within a few percent of fp32's, so the losses
    agree to well under 1%)."""
    model = tm.llama(layers=2)
    twin = copy.deepcopy(model)
    batches = tm.lm_batches(4) * 6
    options = dict(max_steps=24, lr=1e-2, precision=precision, offload=True, state_chunk_mib=chunk_mib, **QUIET)
    result = fit(model, batches, moment_dtype="int8", **options)
    if kernel is not None:
        assert kernel.calls >= 24
    full = fit(twin, batches, moment_dtype="fp32", **options)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(result.losses[-4:]) < mean(result.losses[:4]) - 0.2
    assert abs(mean(result.losses[-4:]) / mean(full.losses[-4:]) - 1) < 0.01
    assert not torch.equal(next(model.parameters()), next(twin.parameters()))  # not the same run


def test_on_step_sees_one_step_event_with_the_loss_fit_records():
    """fit hands on_step the optimizer's own record of the step (HiftAdamW.last_step): its loss is
    the value fit flushes into FitResult.losses, its skip flag a 0-d device tensor (no host read)."""
    from hift import StepEvent

    events = []
    result = fit(tm.llama(layers=2), tm.lm_batches(10), max_steps=5, accum_steps=2, log_every=2, lr=3e-3,
                 on_step=events.append, **QUIET)
    assert all(isinstance(e, StepEvent) for e in events) and [e.step for e in events] == list(range(5))
    assert [float(e.loss) for e in events] == result.losses
    assert [e.group for e in events] == result.groups and [e.lr for e in events] == result.lrs
    assert all(e.skipped.dim() == 0 and not bool(e.skipped) and e.retried is False for e in events)
