"""hift on FSDP2 (hift.fsdp, hift.fsdp_wrap), on gloo with 1, 2 and 3 spawned ranks: a model the
user sharded with fully_shard and one hift shards (shard_weights), against one process on the
global batch; every state format and store, CPU offload, random order, accumulation, clipping
that clips; empty shards; a state_dict saved on 2 ranks loaded on 3; the refusals.

Where every rank gets the same batch, FSDP's mean over 1 or 2 ranks is exact ((g + g) / 2 = g),
so the run must be one process's bit for bit; over 3 ranks it is not ((g + g + g) / 3 rounds),
nor where the ranks' batches differ (the gradient is summed over ranks, not over the batch):
there the weights are held to fp32's tolerance (bf16 weights: one bf16 rounding apart), except
where Adam magnifies the last bits of a nearly cancelling gradient (assert_close_as_adam).

Each world size is spawned once (module fixtures): every rank runs all cases and writes what it
ends with; the tests compare in this process."""
import datetime
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import tiny_models as tm
from test_distributed import resting_shard  # per group: (piece, master, exp_avg, exp_avg_sq)
from torchrun_like import reference_threads
from hift import HiftAdamW, fit, ops
from hift.batches import compute_loss
from hift.config import ConfigError
from hift.fsdp import NormLayout, rank_pieces, rows_of
from hift.state import OptimizerState, chunk_numel, chunk_pieces

LR = 3e-3
PER_RANK = 2  # rows of each rank's micro-batch
STEPS, ACCUM = 6, 2
CLIP = 0.05  # below every step's gradient norm here: it clips (test_the_clip_clips)
QUIET = dict(progress=False, lr=LR, log_every=3, memory="manual")
FP32 = dict(rtol=1e-5, atol=1e-6)
SEED = 4
print(f"test_fsdp: batches from seed {SEED}")


class Tiny(nn.Module):
    """Embeddings (61 x 10), three blocks, a norm and a head of 2 rows: over 3 ranks the last
    holds no row of the head's weight or bias, and every row cut splits a norm block."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(tm.VOCAB, 10)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(10, 13), nn.GELU(), nn.Linear(13, 10)) for _ in range(3))
        self.norm = nn.LayerNorm(10)
        self.head = nn.Linear(10, 2)

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        return F.cross_entropy(self.head(self.norm(h).mean(1)), labels)


def tiny_batches(n, batch, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, tm.VOCAB, (batch, 7), generator=g),
             "labels": torch.randint(0, 2, (batch,), generator=g)} for _ in range(n)]


def global_batches(world, model="llama", seed=SEED):
    if model == "tiny":
        return tiny_batches(STEPS * ACCUM, world * PER_RANK, seed)
    return tm.lm_batches(STEPS * ACCUM, batch=world * PER_RANK, seed=seed)


def rank_share(batches, rank):
    return [{k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in b.items()} for b in batches]


def make_model(kind):
    if kind == "qwen2":  # its LM head is its embedding: one FSDP module holds both
        torch.manual_seed(0)
        return tm.qwen2(layers=2)
    return Tiny() if kind == "tiny" else tm.llama(layers=2)


def shard_yourself(model, offload=False, dtype=None):
    """What a user does: cast first (hift casts no DTensor), then fully_shard each block and the root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if dtype is not None:
        model.to(dtype)
    policy = CPUOffloadPolicy(pin_memory=False) if offload else OffloadPolicy()
    for block in model.model.layers:
        fully_shard(block, offload_policy=policy)
    fully_shard(model, offload_policy=policy)
    return model


def full_weights(model):
    """Every weight whole (a DTensor all-gathered: every rank calls this in the same order)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


# name -> (model, how it is sharded, fit's options, every rank the same batch). "you": the user
# shards it with fully_shard (bf16: cast first; offload: CPUOffloadPolicy); "hift": shard_weights.
CASES = {
    "you_fp32": ("llama", "you", dict(order="top_down", weight_decay=0.05, max_grad_norm=CLIP), False),
    "hift_random": ("llama", "hift", dict(order="random", seed=5, group_size=2, max_grad_norm=CLIP), False),
    "hift_bf16_chunks": ("llama", "hift", dict(order="random", seed=3, precision="bf16", moment_dtype="bf16",
                                               state_chunk_mib=0.002, max_grad_norm=CLIP), True),
    "you_bf16_offload_disk": ("llama", "you-bf16-offload", dict(order="bottom_up", weight_decay=0.1, state_store="disk",
                                                                max_grad_norm=CLIP), True),
    "hift_offload_weights": ("llama", "hift-offload", dict(order="random", seed=2, precision="bf16",
                                                           max_grad_norm=CLIP), True),
    "tiny_empty_shards": ("tiny", "hift", dict(order="random", seed=1, weight_decay=0.05, max_grad_norm=CLIP), True),
    "hift_tied": ("qwen2", "hift", dict(order="bottom_up", max_grad_norm=CLIP), True),
}


def in_fp32_over_three(options, world):
    """3 ranks train bf16 cases with fp32 weights: FSDP sums bf16 gradients in bf16, so 3 ranks'
    (g + g + g) / 3 is g rounded twice, and a bf16 forward of weights a rounding apart turns the
    gradients of near-zero elements into noise: after a few steps some elements (4%) stand one
    or two updates apart from one process's, which says nothing of hift. Their bf16 weights are
    held to one process bit for bit over 1 and 2 ranks."""
    return {k: v for k, v in options.items() if k != "precision"} if world == 3 else options


def case_model(case, world):
    kind, how, options, _ = CASES[case]
    options = in_fp32_over_three(options, world)
    model = make_model(kind)
    if how.startswith("you"):
        bf16 = "bf16" in how and world != 3
        shard_yourself(model, offload="offload" in how, dtype=torch.bfloat16 if bf16 else None)
    else:  # (offload on one rank alone: FSDP2 over that rank, no shard_weights needed)
        offload = "offload" in how
        options = dict(options, shard_weights=not offload or world > 1, offload_weights=offload)
    return model, options


# ------------------------------------------------------------------------------ the workers


def _init(rank, world, store_file):
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)


def _run_cases(rank, world, root, saved_by_two):
    root = Path(root)
    _init(rank, world, root / "store")
    try:
        out = {}
        for name, (kind, _, options, same) in CASES.items():
            model, options = case_model(name, world)
            if options.get("state_store") == "disk":
                options = dict(options, state_dir=str(root / f"disk-{name}"))
            batches = rank_share(global_batches(1 if same else world, kind), 0 if same else rank)
            result = fit(model, batches, max_steps=STEPS, accum_steps=ACCUM, **QUIET, **options)
            out[name] = dict(weights=full_weights(model), groups=result.groups, losses=result.losses)
        for moments in ("int8", "bf16"):
            out[moments] = _hift_adamw(rank, world, root, moments)
        if saved_by_two is not None:
            out["from_two"] = _load_two_ranks_state_dicts(saved_by_two)
        if world == 2:
            out["backward"] = _what_backward_gathers(rank)
            out["refusals"] = _refusals(rank)
            out["skip"] = _one_rank_skips(rank)
        torch.save(out, root / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


OPT = dict(lr=LR, precision="bf16", order="random", seed=6, weight_decay=0.05, max_grad_norm=CLIP,
           state_chunk_mib=0.003, memory="manual")


def train(opt, model, batches):
    """The loop fit runs at a constant lr: ACCUM micro-batches, then one step with their mean loss."""
    for at in range(0, len(batches), ACCUM):
        total = 0.0
        for batch in batches[at : at + ACCUM]:
            loss = compute_loss(model, batch)
            (loss / ACCUM).backward()
            total = total + loss.detach()
        opt.step(loss=total / ACCUM)


def _hift_adamw(rank, world, root, moments):
    """HiftAdamW itself (no fit) with shard_weights, every rank on the same batch; its state_dict
    is kept for the 3-rank load."""
    model = tm.llama(layers=2)
    batches = rank_share(global_batches(1), 0)
    opt = HiftAdamW(model, example_batch=batches[0], shard_weights=True, moment_dtype=moments,
                    **in_fp32_over_three(OPT, world))
    train(opt, model, batches)
    torch.save(opt.state_dict(), root / f"state_dict-{moments}-{rank}.pt")
    out = dict(weights=full_weights(model), resting=resting_shard(opt), dp=type(opt.dp).__name__,
               traffic=vars(opt.dp.traffic).copy(), device=str(opt.device))
    opt.close()
    return out


def _load_two_ranks_state_dicts(saved_by_two):
    """Every rank of 3 loads the state_dicts the 2 ranks saved (load_sharded_state_dicts):
    bf16 moments are re-cut to its rows; int8 blocks start at the 2 ranks' rows: refused."""
    out = {}
    for moments in ("bf16", "int8"):
        model = tm.llama(layers=2)
        opt = HiftAdamW(model, example_batch=rank_share(global_batches(1), 0)[0], shard_weights=True,
                        moment_dtype=moments, **OPT)
        saved = [torch.load(Path(saved_by_two) / f"state_dict-{moments}-{r}.pt", weights_only=True, mmap=True)
                 for r in range(2)]
        try:
            opt.load_sharded_state_dicts(saved)
            out[moments] = resting_shard(opt)
        except ValueError as err:
            out[moments] = str(err)
        opt.close()
    return out


def _what_backward_gathers(rank):
    """Per step of a cycle (bottom up): the FSDP modules whose backward ran and those FSDP
    prefetched in backward, read from its record_function labels."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for how in ("you", "hift"):
        model = tm.llama(layers=2)
        batches = rank_share(global_batches(2), rank)
        if how == "you":
            shard_yourself(model)
        opt = HiftAdamW(model, lr=LR, example_batch=batches[0], memory="manual", order="bottom_up",
                        shard_weights=how == "hift")
        steps = []
        for batch in batches[: len(opt.groups)]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                compute_loss(model, batch).backward()
            names = [e.name for e in prof.events()]
            ran = {n[len("FSDP::pre_backward") :].strip(" ()") for n in names if n.startswith("FSDP::pre_backward")}
            gathered = {n[len("FSDP::backward_prefetch for ") :] for n in names
                        if n.startswith("FSDP::backward_prefetch for ")}
            steps.append((opt.active_group, ran, gathered))
            opt.step()
        opt.close()
        out[how] = steps
    return out


def _one_rank_skips(rank):
    """Rank 1's loss is nan at the second step (its gradients finite): every rank skips it."""
    model = shard_yourself(tm.llama(layers=2))
    batches = rank_share(global_batches(2), rank)
    opt = HiftAdamW(model, lr=LR, example_batch=batches[0], memory="manual", max_grad_norm=CLIP)
    unchanged = None
    for step, batch in enumerate(batches[:3]):
        loss = compute_loss(model, batch)
        loss.backward()
        if step == 1:
            before = full_weights(model)
            if rank == 1:
                loss = loss * float("nan")
        opt.step(loss=loss.detach())
        if step == 1:
            unchanged = all(torch.equal(v, before[k]) for k, v in full_weights(model).items())
    out = dict(unchanged=unchanged, skipped=opt.skipped_updates)
    opt.close()
    return out


def _refusals(rank):
    """Each in words, before any weight changes."""
    out = {}

    def refused(make):
        try:
            make()
        except ConfigError as err:
            return str(err)
        return None

    model = shard_yourself(tm.llama(layers=2))  # fp32
    before = full_weights(model)
    batch = tm.lm_batches(1)[0]
    out["cast"] = refused(lambda: HiftAdamW(model, lr=LR, precision="bf16", example_batch=batch, memory="manual"))
    out["twice"] = refused(lambda: HiftAdamW(model, lr=LR, shard_weights=True, example_batch=batch, memory="manual"))
    plain = tm.llama(layers=2)
    out["offload_alone"] = refused(lambda: HiftAdamW(plain, lr=LR, offload_weights=True, example_batch=batch,
                                                     memory="manual"))
    out["cast_unchanged"] = all(torch.equal(v, before[k]) for k, v in full_weights(model).items())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = fit(model, [batch], max_steps=1, progress=False, lr=LR)  # memory="auto": planned, no warning
    out["auto_note"] = [str(w.message) for w in caught if "FSDP" in str(w.message) or "planner" in str(w.message)]
    out["auto_predicted"] = auto.memory["predicted_host_peak"]
    tiny = Tiny()
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    loose = [tiny.embed, *tiny.blocks, tiny.norm, [tiny.head.weight], [tiny.head.bias]]  # the head's two halves
    out["loose"] = refused(lambda: HiftAdamW(tiny, lr=LR, units=loose, shard_weights=True,
                                             example_batch=tiny_batches(1, 2)[0], memory="manual"))
    out["loose_unchanged"] = (all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())
                              and not any(hasattr(p, "device_mesh") for p in tiny.parameters()))
    return out


def _spawn(world, root, saved_by_two=None):
    mp.spawn(_run_cases, args=(world, str(root), saved_by_two), nprocs=world, join=True)
    return [torch.load(Path(root) / f"rank-{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp1")
    return 1, root, _spawn(1, root)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    return 2, root, _spawn(2, root)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory, two_ranks):
    root = tmp_path_factory.mktemp("fsdp3")
    return 3, root, _spawn(3, root, saved_by_two=str(two_ranks[1]))


@pytest.fixture(params=[1, 2, pytest.param(3, marks=pytest.mark.slow)], ids=["1 rank", "2 ranks", "3 ranks"])
def ranks(request):
    return request.getfixturevalue({1: "one_rank", 2: "two_ranks", 3: "three_ranks"}[request.param])


# ------------------------------------------------------------------------------ one process


def single_process(case, world, tmp_path):
    kind, how, options, same = CASES[case]
    options = in_fp32_over_three(options, world)
    model = make_model(kind)
    if "bf16" in how and world != 3:
        model.to(torch.bfloat16)  # the user cast it before fully_shard
    if options.get("state_store") == "disk":
        options = dict(options, state_dir=str(tmp_path / "disk"))
    # Tiny's own backward (torch's matmuls at its shapes) depends on the number of threads, which
    # is no business of this test: its one process runs on the ranks' one thread
    with reference_threads() if kind != "tiny" else reference_threads(1):
        result = fit(model, global_batches(1 if same else world, kind), max_steps=STEPS, accum_steps=ACCUM,
                     **QUIET, **options)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, result


def single_hift_adamw(moments, world):
    """One process on the same batch, its state cut where the ranks' rows cut it (int8 blocks
    start at each rank's first row)."""
    model = tm.llama(layers=2)
    batches = rank_share(global_batches(1), 0)
    opt = HiftAdamW(model, example_batch=batches[0], moment_dtype=moments, cast=False, prefetch=False,
                    **in_fp32_over_three(OPT, world))
    old = opt.group_state  # (prefetch off: nothing of it is held when it is replaced)
    max_numel = chunk_numel(old.format, OPT["state_chunk_mib"])
    shard = [[chunk for rank in range(world) for chunk in
              chunk_pieces(rank_pieces([p.shape for p in g.params], world, rank), max_numel, old.format.cut)]
             for g in opt.groups]
    old.close()
    opt.group_state = OptimizerState(opt.groups, torch.device("cpu"), old.format, offload=False,
                                     chunk_mib=OPT["state_chunk_mib"], seed=OPT["seed"], shard=shard)
    opt.cast_model()
    with reference_threads():
        train(opt, model, batches)
    return model, opt


def assert_close_as_adam(actual, expected, where):
    """fp32 tolerance, except where Adam magnifies the last bits of a gradient: an element whose
    gradient sum nearly cancels moves by lr * m / sqrt(v), which turns on those bits (a few
    elements in a thousand). Those stay within 1% of one update (lr)."""
    assert actual.dtype == expected.dtype == torch.float32, where  # (bf16 weights are compared bit for bit)
    off = ~torch.isclose(actual, expected, **FP32)
    assert int(off.sum()) <= max(1, actual.numel() // 1000), f"{where}: {int(off.sum())} elements off"
    assert float((actual - expected).abs().max()) <= 0.01 * LR, f"{where}: more than 1% of an update off"


def exact(world, same):
    """Whether the ranks' mean gradient is one process's bit for bit."""
    return world == 1 or (world == 2 and same)


# -------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", list(CASES))
def test_weights_equal_one_process_on_the_global_batch(ranks, case, tmp_path):
    world, _, outs = ranks
    same = CASES[case][3]
    expected, result = single_process(case, world, tmp_path)
    for rank, out in enumerate(outs):
        assert out[case]["groups"] == result.groups
        for key, value in expected.items():
            where = f"rank {rank} of {world}, {case}, {key}"
            if exact(world, same):
                assert torch.equal(out[case]["weights"][key], value), where
            else:
                assert_close_as_adam(out[case]["weights"][key], value, where)
        if exact(world, same):
            assert out[case]["losses"] == result.losses


@pytest.mark.parametrize("moments", ["int8", "bf16"])
def test_hift_adamw_is_one_process_with_the_state_cut_at_the_rows(ranks, moments):
    """HiftAdamW alone, shard_weights: the weights and each rank's resting moments are one
    process's whose state is cut at the ranks' rows (int8 blocks from each shard's first row,
    bf16 moments rounded by group element), bit for bit where the mean is exact."""
    world, _, outs = ranks
    model, opt = single_hift_adamw(moments, world)
    expected = {k: v.detach() for k, v in model.state_dict().items()}
    resting = resting_shard(opt)
    for rank, out in enumerate(outs):
        ours = out[moments]
        assert ours["dp"] == "ShardedParallel" and ours["device"] == "cpu"
        # hift moves no weight: one small all-reduce per step and the loss means, nothing else
        assert ours["traffic"]["reduce_scatter"] == ours["traffic"]["all_gather"] == 0 < ours["traffic"]["all_reduce"]
        for key, value in expected.items():
            if exact(world, True):
                assert torch.equal(ours["weights"][key], value), f"rank {rank}, {key}"
            else:
                assert_close_as_adam(ours["weights"][key], value, f"rank {rank}, {key}")
        if not exact(world, True):
            continue
        for g in range(len(opt.groups)):
            single = {piece: (m, v) for piece, _, m, v in resting[g]}
            for piece, _, exp_avg, exp_avg_sq in ours["resting"][g]:
                m, v = single[piece]
                assert torch.equal(exp_avg, m) and torch.equal(exp_avg_sq, v), f"rank {rank}, group {g}, {piece}"
    opt.close()


def llama_shapes():
    """Per group, its parameters' shapes (the groups every case's llama has)."""
    opt = HiftAdamW(tm.llama(layers=2), lr=LR, example_batch=tm.lm_batches(1)[0], memory="manual")
    shapes = [[p.shape for p in g.params] for g in opt.groups]
    opt.close()
    return shapes


def test_each_rank_rests_the_state_of_its_rows(ranks):
    """A rank's pieces of each parameter are its rows (torch.chunk's cut) end to end, cut into
    chunks 16 elements apart from its first row; the ranks' tile every parameter once."""
    world, _, outs = ranks
    shapes = llama_shapes()
    covered = [[torch.zeros(s.numel(), dtype=torch.int32) for s in group] for group in shapes]
    for rank, out in enumerate(outs):
        for g, group in enumerate(out["bf16"]["resting"]):
            mine = {}
            for (param, lo, hi), *_ in group:
                covered[g][param][lo:hi] += 1
                mine.setdefault(param, []).append((lo, hi))
            for param, shape in enumerate(shapes[g]):
                first, last = rows_of(shape[0], world, rank)
                row = shape.numel() // shape[0]
                pieces = sorted(mine.get(param, []))
                if first == last:
                    assert not pieces
                    continue
                assert pieces[0][0] == first * row and pieces[-1][1] == last * row, f"rank {rank}, group {g}"
                assert all(a[1] == b[0] and (b[0] - first * row) % 16 == 0 for a, b in zip(pieces, pieces[1:]))
    assert all(bool((c == 1).all()) for group in covered for c in group)


@pytest.mark.slow
def test_a_state_dict_of_two_ranks_loads_on_three(two_ranks, three_ranks):
    """bf16 moments: each of 3 ranks takes its rows out of the 2 ranks' state_dicts, the saved
    bits; int8 moments, whose blocks start at the 2 ranks' rows, are refused in words."""
    shapes = llama_shapes()
    saved = [[[torch.full((s.numel(),), float("nan")) for s in group] for group in shapes] for _ in range(2)]
    for out in two_ranks[2]:
        for g, group in enumerate(out["bf16"]["resting"]):
            for (param, lo, hi), _, m, v in group:
                saved[0][g][param][lo:hi] = m
                saved[1][g][param][lo:hi] = v
    for rank, out in enumerate(three_ranks[2]):
        loaded = out["from_two"]
        assert isinstance(loaded["bf16"], list), loaded["bf16"]
        assert sum(len(group) for group in loaded["bf16"]) > 0
        for g, group in enumerate(loaded["bf16"]):
            for (param, lo, hi), _, m, v in group:
                assert torch.equal(m, saved[0][g][param][lo:hi]), f"rank {rank}, group {g}, param {param}"
                assert torch.equal(v, saved[1][g][param][lo:hi]), f"rank {rank}, group {g}, param {param}"
        assert "int8" in loaded["int8"] and "rows" in loaded["int8"], loaded["int8"]


def test_backward_gathers_every_module_it_reaches_and_no_other(two_ranks):
    """FSDP2 prefetches, in backward, the module before each one it reaches; below the active
    group that would be a module hift's backward never reaches (fsdp.BackwardStop: the lowest
    reached module prefetches itself, a no-op). Every other reached module is still prefetched:
    the root ("") comes first in backward and nothing prefetches it; it prefetches the last module
    where it holds parameters (a model sharded by block), and nothing where it holds none (hift's
    wrapping, every unit a module of its own: lm_head then unshards as its backward starts)."""
    for rank, out in enumerate(two_ranks[2]):
        for how, steps in out["backward"].items():
            for group, ran, gathered in steps:
                where = f"rank {rank}, {how}, group {group}"
                assert gathered <= ran, f"{where}: {sorted(gathered - ran)} gathered for nothing"
                missing = ran - gathered - {""} - ({"lm_head"} if how == "hift" else set())
                assert not missing, f"{where}: {sorted(missing)} not prefetched"


def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(two_ranks):
    outs = two_ranks[2]
    for rank, out in enumerate(outs):
        assert out["skip"]["unchanged"], f"rank {rank}: the skipped step changed the weights"
        assert out["skip"]["skipped"] == 1, f"rank {rank}"


def test_refusals_come_in_words_before_anything_changes(two_ranks):
    for rank, out in enumerate(two_ranks[2]):
        refused = out["refusals"]
        assert "hift casts no sharded weight" in refused["cast"] and "before fully_shard" in refused["cast"]
        assert "sharded already" in refused["twice"]
        assert "offload_weights on 2 ranks" in refused["offload_alone"] and "shard_weights=True" in refused["offload_alone"]
        assert refused["cast_unchanged"]
        assert refused["auto_note"] == [] and refused["auto_predicted"]  # (tests/test_memory_auto_fsdp.py)
        assert "not made of whole modules" in refused["loose"] and "units=" in refused["loose"]
        assert refused["loose_unchanged"]


# ------------------------------------------------------------------------------- no ranks


def test_the_clip_clips():
    """CLIP is below the gradient norms: the same run without it ends elsewhere."""
    weights = []
    for clip in (CLIP, None):
        model = tm.llama(layers=2)
        fit(model, global_batches(2)[: 2 * ACCUM], max_steps=2, accum_steps=ACCUM, **QUIET, max_grad_norm=clip)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert any(not torch.equal(a, b) for a, b in zip(*weights))


@pytest.mark.parametrize("asked", ["shard_weights", "offload_weights"])
def test_sharding_without_a_process_group_is_refused_before_anything_changes(asked):
    model = tm.llama(layers=2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=f"{asked} runs the model on FSDP2, over the ranks of a process group"):
        HiftAdamW(model, lr=LR, example_batch=tm.lm_batches(1)[0], memory="manual", **{asked: True})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.requires_grad for p in model.parameters())


def test_offload_weights_on_several_gpus_without_shard_weights_is_refused_before_the_planner(monkeypatch):
    """On GPUs the planner would refuse it first, in its own words (a ValueError); fit and HiftAdamW
    refuse it as on the CPU (test_refusals_come_in_words_before_anything_changes), before planning."""
    import torch.distributed as dist

    from hift.config import Config
    from hift.memory_plan import plan_run

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    model = tm.llama(layers=2)
    with pytest.raises(ConfigError, match="offload_weights on 2 ranks.*pass shard_weights=True"):
        plan_run(Config(lr=LR, offload_weights=True, memory="manual"), model, tm.lm_batches(1)[0],
                 torch.device("cuda", 0), "fp32", 2, can_recompute=True)


@pytest.mark.parametrize("world", [2, 3, 5, 8])
def test_the_ranks_norm_is_one_process_norm_bit_for_bit(world):
    """Each rank fills its rows' blocks and its elements of the blocks a row cut splits; the
    sum over ranks folds to ops.grad_norm_sq of the whole gradients, bit for bit."""
    g = torch.Generator().manual_seed(world)
    shapes = [torch.Size(s) for s in [(61, 24), (2, 10), (2,), (300, 7), (5, 513), (1, 9), (24,), (1000,)]]
    grads = [torch.randn(s, generator=g) * 10 ** torch.randint(-3, 3, (1,), generator=g).item() for s in shapes]
    layout = NormLayout(shapes, world)
    total = torch.zeros(layout.numel)
    for rank in range(world):
        stats = torch.zeros(layout.numel)
        for piece in rank_pieces(shapes, world, rank):
            layout.fill(stats, piece.param, piece.lo, grads[piece.param].reshape(-1)[piece.lo : piece.hi])
        total += stats
    assert layout.split  # some cut falls inside a block
    expected = ops.grad_norm_sq(grads)
    assert torch.equal(layout.norm_sq(total), expected), (float(layout.norm_sq(total)), float(expected))


@pytest.mark.parametrize("world", [2, 3, 7])
def test_rank_pieces_are_torch_chunk_rows_and_tile_each_parameter(world):
    shapes = [torch.Size(s) for s in [(61, 24), (2, 10), (2,), (300, 7), (1, 9)]]
    covered = [torch.zeros(s.numel(), dtype=torch.int32) for s in shapes]
    for rank in range(world):
        for chunk in chunk_pieces(rank_pieces(shapes, world, rank), 100, 16):
            for piece in chunk:
                covered[piece.param][piece.lo : piece.hi] += 1
        for piece in rank_pieces(shapes, world, rank):
            rows = torch.arange(shapes[piece.param][0]).chunk(world)
            mine = rows[rank] if rank < len(rows) else torch.empty(0)
            row = shapes[piece.param].numel() // shapes[piece.param][0]
            assert (piece.lo, piece.hi) == (int(mine[0]) * row, (int(mine[-1]) + 1) * row)
    assert all(bool((c == 1).all()) for c in covered)
