"""Data parallel (hift.distributed) on gloo, with 2 and 3 spawned ranks: the same weights as one
process on the concatenated global batch, torch DDP + AdamW at K=1, 1/N of the state per rank,
sharded checkpoints that resume exactly, and a failing rank that ends every rank in bounded time.

Each world size is spawned once (module fixtures): every rank runs all cases and writes what
it ends with; the tests compare in this process."""
import copy
import datetime
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tiny_models as tm
from torchrun_like import reference_threads
from hift import HiftAdamW, checkpoint, fit, ops
from hift.batches import BatchError
from hift.checkpoint import CheckpointError
from hift.distributed import GroupLayout, shard_chunks

LR = 3e-3
PER_RANK = 2  # rows of each rank's micro-batch
STEPS, ACCUM = 7, 2
QUIET = dict(progress=False, lr=LR, log_every=3)
# one process's run on the global batch, to tolerances of fp32 arithmetic: the gradients are
# summed in another order (over ranks, not over the batch), a few ulps of a step's update
FP32 = dict(rtol=1e-5, atol=1e-6)


def assert_close_as_adam(actual, expected, where):
    """fp32 tolerance, except where Adam magnifies the last bits of a gradient: an element whose
    gradient sum nearly cancels moves by lr * m / sqrt(v), which turns on those bits, so the
    order of the sum shows there (a few elements in ten thousand). Those stay within 1% of one
    update (lr)."""
    off = ~torch.isclose(actual, expected, **FP32)
    assert int(off.sum()) <= max(1, actual.numel() // 1000), f"{where}: {int(off.sum())} elements off"
    assert float((actual - expected).abs().max()) <= 0.01 * LR, f"{where}: more than 1% of an update off"


# name -> fit options; "same_batch" cases give every rank the same batch, so that the mean over
# ranks is exact and the run must equal one process bit for bit (stochastic rounding, int8
# blocks, chunks and stores included)
CASES = {
    "top_down": dict(order="top_down", weight_decay=0.05, max_grad_norm=0.5),
    "bottom_up": dict(order="bottom_up", max_grad_norm=0.5, offload=True, state_chunk_mib=0.002),
    "random": dict(order="random", seed=5, group_size=2, max_grad_norm=0.5),
}
SAME_BATCH = {
    "bf16_moments": dict(order="random", seed=3, precision="bf16", moment_dtype="bf16", offload=True,
                         state_chunk_mib=0.002),
    "int8_chunks": dict(order="top_down", precision="bf16", moment_dtype="int8", offload=True, state_chunk_mib=0.003),
    "disk": dict(order="bottom_up", precision="bf16", state_store="disk", weight_decay=0.1),
    "fp16": dict(order="random", precision="fp16", loss_scale=2.0**10),  # one loss scale, skips agreed
    "bf16_reduce": dict(order="random", seed=4, precision="bf16", reduce_dtype="bf16", moment_dtype="int8",
                        max_grad_norm=0.5),  # a sum of equal bf16 gradients is exact in bf16
}


def global_batches(world, seed=4):
    return tm.lm_batches(STEPS * ACCUM, batch=world * PER_RANK, seed=seed)


def rank_share(batches, rank):
    return [{k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in b.items()} for b in batches]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def resting_shard(opt):
    """Per group: [(piece, master, exp_avg, exp_avg_sq)] of this rank's resting state, as fp32."""
    state = opt.group_state
    state.synchronize()
    out = []
    for g in range(len(opt.groups)):
        pieces = [p for c in state.chunks_of[g] for p in state.chunks[c].pieces]
        views = state.host_views(g)
        parts = [[t.float().clone() for t in getattr(views, part)] or [None] * len(pieces)
                 for part in ("masters", "exp_avgs", "exp_avg_sqs")]
        out.append([((p.param, p.lo, p.hi), *row) for p, *row in zip(pieces, *parts)])
    return out


# ------------------------------------------------------------------------------ the workers


def _init(rank, world, store_file, timeout_s=60):
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    torch.set_num_threads(1)


def _run_cases(rank, world, root):
    root = Path(root)
    _init(rank, world, root / "store")
    try:
        out = {}
        for name, options in CASES.items():
            model = tm.llama(layers=2)
            result = fit(model, rank_share(global_batches(world), rank), max_steps=STEPS, accum_steps=ACCUM,
                         **QUIET, **options)
            out[name] = dict(weights=weights(model), groups=result.groups)
        for name, options in SAME_BATCH.items():
            model = tm.llama(layers=2)
            if options.get("state_store") == "disk":
                options = dict(options, state_dir=str(root / f"disk-{name}"))
            fit(model, rank_share(global_batches(1), 0), max_steps=STEPS, accum_steps=ACCUM, **QUIET, **options)
            out[name] = dict(weights=weights(model))
        out["resting"] = _resting_state(rank, world)
        out["planned"] = _what_the_planner_predicts(rank, world)
        out["skip"] = _one_rank_overflows(rank, world)
        if world == 2:
            out["ddp"] = _k1_against_ddp(rank, world)
            out["resume"] = _resume(rank, world, root)
            out["other_rank"] = _load_another_ranks_state_dict(rank, world, root)
            out["reduce_bytes"] = _reduce_bytes(rank, world)
        torch.save(out, root / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _load_another_ranks_state_dict(rank, world, root):
    """Each rank saves state_dict() and loads the next rank's: nothing is loaded, and the next
    step is refused in words, before any update; loading its own shard then clears it."""
    model = tm.llama(layers=2)
    batch = rank_share(global_batches(world), rank)[0]
    opt = HiftAdamW(model, lr=3e-3, moment_dtype="int8")
    model(**batch).loss.backward()
    opt.step()
    torch.save(opt.state_dict(), root / f"state_dict-{rank}.pt")
    dist.barrier()
    opt.load_state_dict(torch.load(root / f"state_dict-{(rank + 1) % world}.pt", weights_only=False))
    before = weights(model)
    model(**batch).loss.backward()
    try:
        opt.step()
        refused = None
    except ValueError as err:
        refused = str(err)
    changed = [k for k, v in weights(model).items() if not torch.equal(v, before[k])]
    opt.load_state_dict(torch.load(root / f"state_dict-{rank}.pt", weights_only=False))  # its own
    opt.step()  # (the same gradients, kept by the refused step)
    opt.close()
    return dict(refused=refused, changed=changed)


def _reduce_bytes(rank, world):
    """Bytes of one step's reduce-scatter, per reduce_dtype, on a bf16 model."""
    out = {}
    for dtype in ("fp32", "bf16"):
        model = tm.llama(layers=2).to(torch.bfloat16)
        opt = HiftAdamW(model, lr=3e-3, reduce_dtype=dtype)
        model(**rank_share(global_batches(world), rank)[0]).loss.backward()
        opt.step()
        out[dtype] = opt.dp.traffic.reduce_scatter
        opt.close()
    return out


PLANNED = [dict(precision="fp32", moment_dtype="fp32", reduce_dtype="fp32", group_size=1),
           dict(precision="bf16", moment_dtype="int8", reduce_dtype="fp32", group_size=2),
           dict(precision="bf16", moment_dtype="bf16", reduce_dtype="bf16", group_size=1)]


def _what_the_planner_predicts(rank, world):
    """What `hift plan --ranks N` predicts, as a rank has it: its resting state's bytes and, per
    step (every group once), the bytes it hands to the reduce-scatter and the all-gather."""
    out = []
    for options in PLANNED:
        model = tm.llama(layers=2)
        if options["precision"] == "bf16":
            model = model.to(torch.bfloat16)
        batches = rank_share(global_batches(world), rank)
        opt = HiftAdamW(model, lr=3e-3, example_batch=batches[0], offload=True,
                        **{k: v for k, v in options.items() if k != "precision"})
        handed = []
        for batch in batches[: len(opt.groups)]:
            before = opt.dp.traffic.reduce_scatter + opt.dp.traffic.all_gather
            model(**batch).loss.backward()
            opt.step()
            handed.append(opt.dp.traffic.reduce_scatter + opt.dp.traffic.all_gather - before)
        out.append(dict(state=sum(opt.group_state.numels) * 4, handed=handed))
        opt.close()
    return out


def _resting_state(rank, world):
    model = tm.llama(layers=2)
    batches = rank_share(global_batches(world), rank)
    opt = HiftAdamW(model, lr=3e-3, example_batch=batches[0], moment_dtype="bf16", state_chunk_mib=0.002)
    for batch in batches[:5]:
        model(**batch).loss.backward()
        opt.step()
    shard = resting_shard(opt)
    opt.close()
    return shard


def _one_rank_overflows(rank, world):
    """fp16: the last rank's gradient overflows at the second step; every rank must skip it
    (weights untouched everywhere, the loss scale halved everywhere) and retry the group."""
    batches = rank_share(global_batches(world), rank)
    model = tm.llama(layers=2).half()
    opt = HiftAdamW(model, lr=3e-3, loss_scale=2.0**10, example_batch=batches[0])
    groups, skipped, scales, before = [], [], [], None
    for step, batch in enumerate(batches[:3]):
        opt.scale_loss(model(**batch).loss).backward()
        if step == 1:
            before = weights(model)
            if rank == world - 1:
                next(p for p in opt.param_groups[opt.active_group]["params"] if p.grad is not None).grad[0] = math.inf
        opt.step()
        opt.zero_grad()
        groups.append(opt.last_step.group)
        skipped.append(opt.last_step.retried)
        scales.append(float(opt.scaler.scale))
        if step == 1:
            unchanged = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    opt.close()
    return dict(groups=groups, skipped=skipped, scales=scales, unchanged=unchanged, weights=weights(model))


def _k1_against_ddp(rank, world):
    """One group holding every unit: hift's data parallel and DDP + torch.optim.AdamW."""
    batches = rank_share(global_batches(world), rank)
    model = tm.llama(layers=2)
    twin = copy.deepcopy(model)
    opt = HiftAdamW(model, lr=3e-3, weight_decay=0.1, group_size=5, example_batch=batches[0])
    assert len(opt.param_groups) == 1
    ddp = torch.nn.parallel.DistributedDataParallel(twin)
    params = list(twin.parameters())
    torch_opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=3e-3)
    for batch in batches[:5]:
        model(**batch).loss.backward()
        opt.step()
        ddp(**batch).loss.backward()
        torch_opt.step()
        torch_opt.zero_grad()
    opt.close()
    return dict(hift=weights(model), ddp=weights(twin))


def _resume(rank, world, root):
    """Straight vs saved at step 4 and resumed in a fresh model: the same weights, bit for bit."""
    options = dict(QUIET, order="random", seed=2, precision="bf16", moment_dtype="bf16", max_grad_norm=0.5,
                   offload=True, state_chunk_mib=0.002, accum_steps=ACCUM)
    batches = rank_share(global_batches(world, seed=9), rank)
    straight = tm.llama(layers=2)
    fit(straight, batches, max_steps=STEPS, **options)
    first = tm.llama(layers=2)
    fit(first, batches, max_steps=4, save_dir=str(root / "ckpt"), **options)
    resumed = tm.llama(layers=2)
    fit(resumed, batches, max_steps=STEPS, save_dir=str(root / "ckpt"), resume_from=str(root / "ckpt" / "step-00000004"),
        **options)
    return dict(straight=weights(straight), resumed=weights(resumed))


def _spawn(fn, world, root):
    mp.spawn(fn, args=(world, str(root)), nprocs=world, join=True)
    return [torch.load(Path(root) / f"rank-{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow)], ids=["2 ranks", "3 ranks"])
def ranks(request, tmp_path_factory):
    world = request.param
    root = tmp_path_factory.mktemp(f"dp{world}")
    return world, root, _spawn(_run_cases, world, root)


# -------------------------------------------------------------------------------- the tests


def single_process(options, batches):
    model = tm.llama(layers=2)
    with reference_threads():
        result = fit(model, batches, max_steps=STEPS, accum_steps=ACCUM, **QUIET, **options)
    return weights(model), result.groups


@pytest.mark.parametrize("name", list(CASES))
def test_weights_equal_one_process_on_the_global_batch(ranks, name):
    world, _, outs = ranks
    expected, groups = single_process(CASES[name], global_batches(world))
    for rank, out in enumerate(outs):
        assert out[name]["groups"] == groups
        for key, value in expected.items():
            assert_close_as_adam(out[name]["weights"][key], value, f"rank {rank}, {key}")


@pytest.mark.parametrize("name", list(SAME_BATCH))
def test_exact_mean_is_one_process_bit_for_bit(ranks, tmp_path, name):
    world, _, outs = ranks
    if world != 2:
        pytest.skip("the mean of 3 equal gradients is not exact in binary floating point")
    options = SAME_BATCH[name]
    if options.get("state_store") == "disk":
        options = dict(options, state_dir=str(tmp_path / "disk"))
    expected, _ = single_process(options, rank_share(global_batches(1), 0))
    for rank, out in enumerate(outs):
        for key, value in expected.items():
            assert torch.equal(out[name]["weights"][key], value), f"rank {rank}, {key}"


def test_each_rank_rests_its_share_of_the_state(ranks):
    """The ranks' pieces tile every group's elements once, and each piece's state is the one
    process's state at those elements (bf16 moments: stochastic rounding by group element)."""
    world, _, outs = ranks
    model = tm.llama(layers=2)
    batches = global_batches(world)
    opt = HiftAdamW(model, lr=3e-3, example_batch=batches[0], moment_dtype="bf16", state_chunk_mib=0.002)
    for batch in batches[:5]:
        model(**batch).loss.backward()
        opt.step()
    single = opt.group_state
    total = sum(p.numel() for p in model.parameters())
    held = [sum(hi - lo for group in out["resting"] for (_, lo, hi), *_ in group) for out in outs]
    assert sum(held) == total
    # 1/N, up to the padding that starts each parameter, and cuts each shard, on a norm block
    padding = sum(len(g.params) * (ops.NORM_BLOCK - 1) + world * ops.NORM_BLOCK for g in opt.groups)
    assert max(held) <= math.ceil((total + padding) / world)
    assert min(held) > 0
    for g in range(len(opt.groups)):
        full = single.param_state(g)
        covered = [torch.zeros(p.numel(), dtype=torch.int32) for p in opt.groups[g].params]
        for rank, out in enumerate(outs):
            for (param, lo, hi), master, exp_avg, exp_avg_sq in out["resting"][g]:
                covered[param][lo:hi] += 1
                where = f"rank {rank}, group {g}, param {param}[{lo}:{hi}]"
                # moments: bf16 values of fp32 sums in another order, a bf16 ulp apart at most;
                # where a gradient sums to nearly zero its last bits differ (cancellation), by an
                # amount that is tiny beside the tensor's scale
                for mine, theirs in ((exp_avg, full.exp_avgs[param]), (exp_avg_sq, full.exp_avg_sqs[param])):
                    scale = float(theirs.abs().max())
                    theirs = theirs.reshape(-1)[lo:hi]
                    allowed = torch.maximum(mine.abs(), theirs.abs()) * 2**-7 + 1e-5 * scale
                    assert bool(((mine - theirs).abs() <= allowed).all()), where
        assert all(bool((c == 1).all()) for c in covered), f"group {g}: not tiled once"
    opt.close()


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(ranks):
    world, _, outs = ranks
    for rank, out in enumerate(outs):
        skip = out["skip"]
        assert skip["skipped"] == [False, True, False], f"rank {rank}"
        assert skip["unchanged"], f"rank {rank}: the skipped step changed the weights"
        assert skip["groups"][1] == skip["groups"][2]  # the group is retried
        assert skip["scales"] == [2.0**10, 2.0**9, 2.0**9]
        for key, value in outs[0]["skip"]["weights"].items():
            assert torch.equal(skip["weights"][key], value), f"rank {rank}, {key}"


def test_one_group_equals_ddp_with_torch_adamw(ranks):
    world, _, outs = ranks
    if world != 2:
        pytest.skip("run with 2 ranks")
    for rank, out in enumerate(outs):
        for key, value in out["ddp"]["ddp"].items():
            assert_close_as_adam(out["ddp"]["hift"][key], value, f"rank {rank}, {key}")


def test_sharded_checkpoint_resumes_exactly(ranks):
    world, root, outs = ranks
    if world != 2:
        pytest.skip("run with 2 ranks")
    for rank, out in enumerate(outs):
        for key, value in out["resume"]["straight"].items():
            assert torch.equal(out["resume"]["resumed"][key], value), f"rank {rank}, {key}"
    saved = checkpoint.latest(root / "ckpt")
    checkpoint.verify(saved)
    files = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    for rank in range(world):
        assert f"state/rank-{rank:05d}/rank.json" in files
        assert any(f.startswith(f"state/rank-{rank:05d}/chunk-") for f in files)
    # one process could take the state (tests/test_reshard.py), but not a list's position
    with pytest.raises(BatchError, match=r"saved by 2 rank\(s\).*only through a DistributedSampler"):
        fit(tm.llama(layers=2), global_batches(1), max_steps=STEPS, resume_from=str(saved), **QUIET,
            order="random", seed=2, precision="bf16", moment_dtype="bf16", max_grad_norm=0.5, offload=True,
            state_chunk_mib=0.002, accum_steps=ACCUM)


def test_bf16_reduction_moves_half_the_bytes(ranks):
    world, _, outs = ranks
    if world != 2:
        pytest.skip("run with 2 ranks")
    for out in outs:
        assert out["reduce_bytes"]["bf16"] * 2 == out["reduce_bytes"]["fp32"] > 0


def test_a_state_dict_of_another_ranks_shard_is_refused(ranks):
    world, _, outs = ranks
    if world != 2:
        pytest.skip("run with 2 ranks")
    for rank, out in enumerate(outs):
        refused = out["other_rank"]["refused"]
        assert refused is not None, f"rank {rank} loaded another rank's shard"
        assert "rank(s) 0, 1 were given another rank's shard" in refused and f"this is rank {rank}" in refused
        assert "hift.TrainerShards()" in refused
        assert out["other_rank"]["changed"] == []


# ------------------------------------------------------------------------- layout, no ranks


@pytest.mark.parametrize("world,block", [(2, 1), (3, 1), (3, 256), (5, 256)])
def test_layout_tiles_each_parameter_and_cuts_int8_blocks_whole(world, block):
    sizes = [1464, 24, 960, 7, 600, 1]
    layout = GroupLayout.of(sizes, world, block)
    assert layout.shard % block == 0 and layout.numel >= sum(sizes)
    covered = [torch.zeros(n, dtype=torch.int32) for n in sizes]
    for rank in range(world):
        for chunk in shard_chunks(layout, rank, 300 if block == 1 else 512, block):
            for piece in chunk:
                covered[piece.param][piece.lo : piece.hi] += 1
                assert piece.lo % block == 0 and (piece.hi % block == 0 or piece.hi == sizes[piece.param])
                assert 0 <= layout.at(piece, rank) and layout.at(piece, rank) + piece.numel <= layout.shard
    assert all(bool((c == 1).all()) for c in covered)
    gaps = sum(hi - lo for lo, hi in layout.gaps())
    assert gaps + sum(sizes) == layout.numel


@pytest.mark.parametrize("world", [3, 5])
@pytest.mark.parametrize("options", [
    dict(moment_dtype="int8", offload=True, state_chunk_mib=0.003),  # empty shards of small groups, blocks
    dict(moment_dtype="bf16", state_store="disk"),
    dict(moment_dtype="fp32", offload=True, state_chunk_mib=0.001),
], ids=["int8", "bf16-disk", "fp32-chunks"])
def test_the_ranks_shard_states_updated_in_turn_are_the_whole_state(tmp_path, world, options):
    """No ranks: each rank's OptimizerState (built over its shard) updates its pieces of one
    model from the same gradients, in turn; together they must be one process's update, bit for
    bit (stochastic rounding by group element, int8 blocks whole, every store, empty shards)."""
    from hift.state import OptimizerState, chunk_numel

    disk = options.get("state_store") == "disk"
    where = lambda name: dict(options, state_dir=str(tmp_path / name)) if disk else options
    model, twin = tm.llama(layers=2), tm.llama(layers=2)
    batches = tm.lm_batches(7, seed=6)
    opt = HiftAdamW(model, lr=LR, weight_decay=0.1, order="random", seed=4, example_batch=batches[0], **where("one"))
    groups = HiftAdamW(twin, example_batch=batches[0]).groups  # the same units over the twin's parameters
    state_format = opt.group_state.format
    max_numel = chunk_numel(state_format, options.get("state_chunk_mib"))
    ranks = []
    for rank in range(world):
        shard = [shard_chunks(GroupLayout.of([p.numel() for p in g.params], world, state_format.cut), rank,
                              max_numel, state_format.cut) for g in groups]
        ranks.append(OptimizerState(groups, torch.device("cpu"), state_format, offload=bool(options.get("offload")),
                                    chunk_mib=options.get("state_chunk_mib"), seed=4, shard=shard,
                                    state_dir=str(tmp_path / f"rank-{rank}") if disk else None))
    if state_format.int8:  # a norm's 24 elements fill one block: the other ranks hold none of its group
        assert any(not state.chunks[c].pieces for state in ranks for c in range(len(state.chunks)))
    no_inf = torch.zeros(())
    for batch in batches:
        g = opt.active_group
        model(**batch).loss.backward()
        grads = [p.grad.clone() for p in opt.groups[g].params]
        for state in ranks:
            step = state.steps.select(0, g)
            step.add_(1.0)
            state.update_group(g, lr=torch.tensor(LR), step=step, betas=(0.9, 0.999), eps=1e-8,
                               weight_decays=[0.0 if p.dim() < 2 else 0.1 for p in groups[g].params],
                               grad_scale=None, found_inf=no_inf,
                               grad_of=lambda pc: grads[pc.param].reshape(-1)[pc.lo : pc.hi])
        opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    opt.close()
    for state in ranks:
        state.close()


# ---------------------------------------------------------------------------------- failure

TIMEOUT_S = 6


def _fail_one(rank, world, root):
    root = Path(root)
    _init(rank, world, root / "store", timeout_s=TIMEOUT_S)

    def loader():
        for step, batch in enumerate(rank_share(global_batches(world), rank)):
            if rank == 1 and step == 3:
                raise ValueError("rank 1's data is broken")
            yield batch

    class Batches:
        def __iter__(self):
            return loader()

        def __len__(self):
            return STEPS * ACCUM

    try:
        fit(tm.llama(layers=2), Batches(), max_steps=STEPS, **QUIET)
        outcome = "finished"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    (root / f"rank-{rank}.txt").write_text(f"{time.time()}\n{outcome}")
    if rank == 1:  # stay alive (not exiting) until the others gave up: their wait is the timeout's
        deadline = time.monotonic() + 4 * TIMEOUT_S
        while time.monotonic() < deadline and not all((root / f"rank-{r}.txt").exists() for r in range(world)):
            time.sleep(0.2)
    os._exit(0)  # no destroy_process_group: it would wait on the others


@pytest.mark.slow
def test_a_raising_rank_ends_every_rank_within_the_timeout(tmp_path):
    world = 3
    context = mp.start_processes(_fail_one, args=(world, str(tmp_path)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    os.kill(process.pid, 9)
            pytest.fail("a rank hung")
    reports = {r: (tmp_path / f"rank-{r}.txt").read_text().split("\n", 1) for r in range(world)}
    assert "ValueError: rank 1's data is broken" in reports[1][1]
    failed_at = float(reports[1][0])
    for r in (0, 2):
        ended_at, outcome = reports[r]
        assert outcome.startswith("RankFailedError"), outcome
        assert "rank 1" in outcome and "rank 1's data is broken" in outcome, outcome
        assert float(ended_at) - failed_at < TIMEOUT_S + 10, f"rank {r} waited {float(ended_at) - failed_at:.1f} s"


def wait_for_ranks(context, seconds):
    """Until every spawned rank has exited (killed ones included); a rank still alive after
    `seconds` is killed and the test fails."""
    deadline = time.monotonic() + seconds
    while any(p.is_alive() for p in context.processes):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGKILL)
            pytest.fail("a rank hung")
        time.sleep(0.5)


def _killed_mid_save(rank, world, root):
    """Rank 1 is killed (SIGKILL) while it writes its shard of the second checkpoint."""
    root = Path(root)
    _init(rank, world, root / "store", timeout_s=TIMEOUT_S)
    if rank == 1:
        write = checkpoint.save_file

        def dying_write(tensors, path, *args, **kwargs):
            if "step-00000006" in path and "/chunk-" in path:
                os.kill(os.getpid(), signal.SIGKILL)
            return write(tensors, path, *args, **kwargs)

        checkpoint.save_file = dying_write
    try:
        fit(tm.llama(layers=2), rank_share(global_batches(world), rank), max_steps=STEPS, save_dir=str(root / "ckpt"),
            save_every=3, keep_last=5, **QUIET)
        outcome = "finished"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    (root / f"rank-{rank}.txt").write_text(outcome)
    os._exit(0)


@pytest.mark.slow
def test_a_rank_killed_mid_save_leaves_the_last_complete_checkpoint(tmp_path):
    world = 2
    context = mp.start_processes(_killed_mid_save, args=(world, str(tmp_path)), nprocs=world, join=False,
                                 start_method="spawn")
    wait_for_ranks(context, 120)
    assert context.processes[1].exitcode == -signal.SIGKILL
    assert (tmp_path / "rank-0.txt").read_text().startswith("RankFailedError")
    saved = checkpoint.latest(tmp_path / "ckpt")
    assert saved.name == "step-00000003"  # the half-written one never became a checkpoint
    checkpoint.verify(saved)


def _killed_and_resumed(rank, world, root, mode):
    """mode straight | kill | resume: a shuffling DistributedSampler loader, checkpoints every 3
    steps; "kill" SIGKILLs every rank right after checkpoint 6, "resume" is a fresh job."""
    from torch.utils.data import DataLoader, DistributedSampler

    root = Path(root)
    _init(rank, world, root / f"store-{mode}")
    samples = [{k: v[0] for k, v in b.items()} for b in tm.lm_batches(12, batch=1, seed=6)]
    sampler = DistributedSampler(samples, num_replicas=world, rank=rank, shuffle=True, seed=7)
    loader = DataLoader(samples, batch_size=2, sampler=sampler)  # 3 batches per rank and pass
    save_dir = root / ("straight" if mode == "straight" else "ckpt")

    def kill_after_checkpoint(event):
        if mode == "kill" and event.step == 6:
            os.kill(os.getpid(), signal.SIGKILL)

    model = tm.llama(layers=2)
    result = fit(model, loader, max_steps=10, save_dir=str(save_dir), save_every=3, on_step=kill_after_checkpoint,
                 resume_from=str(save_dir) if mode == "resume" else None, order="random", seed=4,
                 precision="bf16", moment_dtype="int8", max_grad_norm=0.5, **QUIET)
    torch.save(dict(weights=weights(model), losses=result.losses), root / f"{mode}-rank-{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_killed_job_resumes_in_fresh_processes_exactly(tmp_path):
    """Every rank SIGKILLed after checkpoint 6; a new job (fresh processes, same world size)
    resumes it with the same shuffling loader: the losses and weights of a job that ran straight.
    The losses are the mean over ranks, the same on every rank (the checkpoint keeps rank 0's)."""
    world = 2
    killed = mp.start_processes(_killed_and_resumed, args=(world, str(tmp_path), "kill"), nprocs=world,
                                join=False, start_method="spawn")
    wait_for_ranks(killed, 300)
    assert [p.exitcode for p in killed.processes] == [-signal.SIGKILL] * world
    assert checkpoint.latest(tmp_path / "ckpt").name == "step-00000006"
    for mode in ("resume", "straight"):
        mp.spawn(_killed_and_resumed, args=(world, str(tmp_path), mode), nprocs=world, join=True)
    rank0 = torch.load(tmp_path / "straight-rank-0.pt", weights_only=False)
    for rank in range(world):
        straight = torch.load(tmp_path / f"straight-rank-{rank}.pt", weights_only=False)
        assert straight["losses"] == rank0["losses"]  # the global batch's loss, on every rank
        resumed = torch.load(tmp_path / f"resume-rank-{rank}.pt", weights_only=False)
        assert len(straight["losses"]) == 10 and resumed["losses"] == straight["losses"]
        for name, value in straight["weights"].items():
            assert torch.equal(resumed["weights"][name], value), f"rank {rank}, {name}"


# ------------------------------------------------------------------- another number of ranks

GLOBAL_BATCH, PASS = 6, 24  # samples per step (over all ranks) and per pass
ACROSS = dict(QUIET, order="random", seed=4, max_grad_norm=0.5, weight_decay=0.05, offload=True,
              state_chunk_mib=0.002, max_steps=8, save_every=3, keep_last=5)


def shared_loader(world, rank, batch_size=None):
    """A shuffling DistributedSampler over one dataset: the global batch is the same whatever
    the number of ranks."""
    from torch.utils.data import DataLoader, DistributedSampler

    samples = [{k: v[0] for k, v in b.items()} for b in tm.lm_batches(PASS, batch=1, seed=8)]
    sampler = DistributedSampler(samples, num_replicas=world, rank=rank, shuffle=True, seed=7)
    return DataLoader(samples, batch_size=batch_size or GLOBAL_BATCH // world, sampler=sampler)


def across(rank, world, save_dir, resume_from=None):
    model = tm.llama(layers=2)
    result = fit(model, shared_loader(world, rank), save_dir=save_dir, resume_from=resume_from, **ACROSS)
    return dict(weights=weights(model), losses=result.losses)


def _across_worlds(rank, world, root):
    """2 ranks: a run that saves, and one resumed from one process's checkpoint; 3 ranks: one
    resumed from the 2 ranks' checkpoint."""
    root = Path(root)
    _init(rank, world, root / f"store-{world}")
    if world == 2:
        out = dict(straight=across(rank, world, str(root / "two")),
                   from_one=across(rank, world, str(root / "two-from-one"), str(root / "one" / "step-00000003")))
    else:
        out = dict(from_two=across(rank, world, str(root / "three"), str(root / "two" / "step-00000006")))
    torch.save(out, root / f"across-{world}-{rank}.pt")
    dist.destroy_process_group()


def assert_same_run(run, reference, where):
    assert run["losses"] == pytest.approx(reference["losses"], rel=1e-5), where
    for key, value in reference["weights"].items():
        assert_close_as_adam(run["weights"][key], value, f"{where}, {key}")


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    root = tmp_path_factory.mktemp("across")
    one = across(0, 1, str(root / "one"))
    mp.spawn(_across_worlds, args=(2, str(root)), nprocs=2, join=True)
    return root, one, [torch.load(root / f"across-2-{r}.pt", weights_only=False) for r in range(2)]


def test_a_checkpoint_resumes_on_another_number_of_ranks(one_and_two):
    """2 ranks -> 1 process and 1 process -> 2 ranks, with the same global batch: the run of
    one process that went straight (the state re-cut, the pass continued after the samples
    taken), to the tolerance of fp32 sums in another order."""
    root, one, twos = one_and_two
    for rank, two in enumerate(twos):
        assert_same_run(two["straight"], one, f"2 ranks, rank {rank}")
        assert_same_run(two["from_one"], one, f"1 -> 2 ranks, rank {rank}")
    resumed = across(0, 1, str(root / "one-from-two"), str(root / "two" / "step-00000006"))
    assert_same_run(resumed, one, "2 ranks -> 1")
    # the same global batch as 2 micro-batches of 3: the pass goes on at batch 4, not 2
    model = tm.llama(layers=2)
    result = fit(model, shared_loader(1, 0, batch_size=3), save_dir=str(root / "one-accum"),
                 resume_from=str(root / "two" / "step-00000006"), **dict(ACROSS, accum_steps=2))
    assert_same_run(dict(weights=weights(model), losses=result.losses), one, "2 ranks -> 1, accumulating 2")


def test_another_number_of_ranks_needs_batches_that_end_where_the_ranks_stopped(one_and_two):
    root, *_ = one_and_two
    saved = root / "two" / "step-00000006"  # pass 1, 12 samples taken
    with pytest.raises(BatchError, match="divides 12"):
        fit(tm.llama(layers=2), shared_loader(1, 0, batch_size=5), save_dir=str(root / "refused"),
            resume_from=str(saved), **ACROSS)
    other = shared_loader(1, 0)
    other.sampler.seed = 8
    with pytest.raises(BatchError, match="seed: 7 there, 8 here"):
        fit(tm.llama(layers=2), other, save_dir=str(root / "refused"), resume_from=str(saved), **ACROSS)
    checkpoint.verify(saved)  # refusals leave the checkpoint as it was


@pytest.mark.slow
def test_a_checkpoint_of_two_ranks_resumes_on_three(one_and_two):
    root, one, _ = one_and_two
    mp.spawn(_across_worlds, args=(3, str(root)), nprocs=3, join=True)
    for rank in range(3):
        assert_same_run(torch.load(root / f"across-3-{rank}.pt", weights_only=False)["from_two"], one,
                        f"2 -> 3 ranks, rank {rank}")


@pytest.mark.parametrize("case", range(len(PLANNED)))
def test_the_planner_predicts_each_ranks_state_and_collectives(ranks, case):
    """hift plan --ranks N: the largest rank's resting state and the largest step's
    bytes handed to collectives, as the ranks measured them, to the byte."""
    from hift.plan.predict import plan_hift
    from hift.plan.trace import meta_model, trace_units

    world, _, outs = ranks
    options = PLANNED[case]
    batch = global_batches(world)[0]["input_ids"]
    model = meta_model(tm.llama(layers=2).config, options["precision"])
    trace, _ = trace_units(model, PER_RANK, batch.shape[1])
    plan = plan_hift(trace, options["precision"], options["group_size"], offload=True, ranks=world,
                     moment_dtype=options["moment_dtype"], reduce_dtype=options["reduce_dtype"])
    measured = [out["planned"][case] for out in outs]
    assert plan.host == max(m["state"] for m in measured)
    assert sum(m["state"] for m in measured) <= plan.host * world
    assert plan.network_per_step == max(measured[0]["handed"])
