"""memory="auto" on FSDP2 runs (hift.memory_plan with hift.plan.fsdp): under a process group whose
device cannot hold the weights, fit chooses shard_weights and trains sharded, and a data-parallel
checkpoint (the weights whole on every rank) resumes sharded there; a model the user sharded with
fully_shard is predicted (no warning) and its prediction is held to the measured peak; without a
process group the refusal names torchrun with the weights placed.

Two ranks are spawned once (gloo, CPU): the budgets are the child's own (auto.machine_budgets
replaced in the child, as tests/test_resume_process.py's "+tight" case does)."""
import contextlib
import io
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import tiny_models as tm
from test_fsdp import _init, full_weights, rank_share, shard_yourself
from test_fsdp_resume import loader
from hift import fit, memory_plan
from hift.plan import auto
from hift.plan.predict import GB

WORLD = 2
STEPS = 3


def _batches(world, rank):
    return rank_share(tm.lm_batches(STEPS, batch=2 * world, seed=3), rank)


def _fit(model, batches, **options):
    """fit under memory="auto": (its result, what it printed, the warnings it gave)."""
    printed = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        result = fit(model, batches, max_steps=STEPS, progress=False, lr=3e-3, **options)
    return result, printed.getvalue(), [str(w.message) for w in caught]


def _tight_budget(model, batch, ranks, **fixed):
    """Host RAM (the device, on a CPU) below every plan with the whole weights on a rank, above
    the smallest with them sharded (`fixed`: the options the run fixes); and those two totals."""
    trace, _ = memory_plan.trace_model(model, batch, "fp32")
    common = dict(precision="fp32", group_size=1, recompute_boundary=None, device="cpu", ranks=ranks,
                  ranks_per_node=ranks)
    fixed = dict(fixed, recompute_activations=False)
    plans = [(o, auto.predict(trace, o, **common).total)
             for o in auto._candidates(fixed, "cpu", ranks, auto.WEIGHT_OPTIONS)]
    whole = min(t for o, t in plans if not o["shard_weights"])
    sharded = min(t for o, t in plans if o["shard_weights"])
    return int((whole - 1) / (1 - auto.MARGIN)), whole, sharded


def _worker(rank, world, root):
    root = Path(root)
    _init(rank, world, root / "store")
    out = {}
    try:
        # 1. the weights do not fit one rank: fit shards them itself
        model = tm.llama(layers=4)  # (2 layers: the two units FSDP2 gathers outweigh the half of the weights saved)
        batches = _batches(world, rank)
        host, whole, sharded = _tight_budget(model, batches[0], world)
        out["whole"], out["sharded"] = whole, sharded
        own = auto.machine_budgets
        auto.machine_budgets = lambda *a, **k: auto.Budgets(host=host)
        try:
            result, printed, caught = _fit(model, batches, recompute_activations=False, state_dir=str(root / "state"))
        finally:
            auto.machine_budgets = own
        out["tight"] = dict(printed=printed, warnings=caught, losses=result.losses, memory=result.memory,
                            sharded=all(hasattr(p, "device_mesh") for p in model.parameters()),
                            weights=full_weights(model))
        # 2. a model the user sharded: predicted, a choice, no warning
        model = shard_yourself(tm.llama(layers=2))
        result, printed, caught = _fit(model, _batches(world, rank))
        out["yours"] = dict(printed=printed, warnings=caught, losses=result.losses, memory=result.memory)
        torch.save(out, root / f"rank-{rank}.pt")
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


DATA_PARALLEL = dict(progress=False, lr=3e-3, log_every=3, order="random", seed=4, max_grad_norm=0.5,
                     recompute_activations=False)


def _resume_worker(rank, world, root):
    """A data-parallel run (memory="manual": the weights whole on every rank) saves at step 3; on
    a machine where they no longer fit whole, memory="auto" resumes it to step 6; beside it the
    data-parallel run straight to step 6."""
    root = Path(root)
    _init(rank, world, root / "store")
    out = {}
    try:
        fit(tm.llama(layers=4), loader(world, rank), memory="manual", save_dir=str(root / "dp"), save_every=3,
            max_steps=3, **DATA_PARALLEL)
        model = tm.llama(layers=4)
        # the resume keeps the saved state format (fp32 moments): the budget leaves it no whole choice
        host, whole, sharded = _tight_budget(model, next(iter(loader(world, rank))), world, moment_dtype="fp32")
        out["whole"], out["sharded"] = whole, sharded
        own = auto.machine_budgets
        auto.machine_budgets = lambda *a, **k: auto.Budgets(host=host)
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                result = fit(model, loader(world, rank), resume_from=str(root / "dp"), state_dir=str(root / "state"),
                             max_steps=6, **DATA_PARALLEL)
        finally:
            auto.machine_budgets = own
        out["resumed"] = dict(printed=printed.getvalue(), losses=result.losses, weights=full_weights(model),
                              sharded=all(hasattr(p, "device_mesh") for p in model.parameters()))
        model = tm.llama(layers=4)
        result = fit(model, loader(world, rank), memory="manual", max_steps=6, **DATA_PARALLEL)
        out["straight"] = dict(losses=result.losses, weights=full_weights(model))
        torch.save(out, root / f"rank-{rank}.pt")
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto_fsdp")
    mp.spawn(_worker, args=(WORLD, str(root)), nprocs=WORLD, join=True)
    return [torch.load(root / f"rank-{r}.pt", weights_only=False) for r in range(WORLD)]


def test_weights_that_do_not_fit_a_rank_are_sharded_by_fit(two_ranks):
    first = two_ranks[0]
    assert first["sharded"] < first["whole"], "the test's model must fit sharded where it does not whole"
    for rank, out in enumerate(two_ranks):
        tight = out["tight"]
        assert tight["sharded"], f"rank {rank}: fit did not shard the model"
        assert all(torch.isfinite(torch.tensor(tight["losses"]))), f"rank {rank}"
        assert tight["memory"]["predicted_host_peak"] is not None
        assert not [w for w in tight["warnings"] if "planner" in w], tight["warnings"]
    # the choice is printed once (rank 0), and the ranks hold one model
    assert "shard_weights=True" in two_ranks[0]["tight"]["printed"]
    assert "hift memory=auto" not in two_ranks[1]["tight"]["printed"]
    for k, v in two_ranks[0]["tight"]["weights"].items():
        assert torch.equal(v, two_ranks[1]["tight"]["weights"][k]), k


def test_a_data_parallel_checkpoint_resumes_sharded_where_its_weights_no_longer_fit(tmp_path):
    """fit chooses shard_weights (the saved fp32 moments kept), loads rank 0's whole weights into
    each rank's rows and re-cuts the data-parallel state by rows, and goes on as the run that went
    straight: bit for bit, since over 2 ranks each gradient element is one sum of two in either
    runtime and every scale a power of two."""
    mp.spawn(_resume_worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=False) for r in range(WORLD)]
    assert ranks[0]["sharded"] < ranks[0]["whole"], "the test's model must fit sharded where it does not whole"
    printed = ranks[0]["resumed"]["printed"]
    assert "shard_weights=True" in printed and "moment_dtype=fp32" in printed, printed
    for rank, out in enumerate(ranks):
        resumed, straight = out["resumed"], out["straight"]
        assert resumed["sharded"], f"rank {rank}: the resumed run did not shard the model"
        assert len(straight["losses"]) == 6 and resumed["losses"] == straight["losses"], rank
        for name, value in straight["weights"].items():
            assert torch.equal(resumed["weights"][name], value), f"rank {rank}, {name}"


def test_a_model_the_user_sharded_is_planned_not_warned_about(two_ranks):
    for rank, out in enumerate(two_ranks):
        yours = out["yours"]
        assert not [w for w in yours["warnings"] if "FSDP" in w or "planner" in w], yours["warnings"]
        memory = yours["memory"]
        assert memory["predicted_host_peak"] and memory["measured_host_peak"] is not None, memory
        assert "note" not in memory, memory
    line = two_ranks[0]["yours"]["printed"]
    assert "hift memory=auto: moment_dtype=fp32" in line and "shard_weights=True" in line  # (the model's, as it is)


def test_without_a_process_group_the_refusal_names_torchrun(monkeypatch):
    """A GPU whose memory cannot hold the model (budgets replaced: no GPU needed): nothing fits,
    and the refusal says that torchrun --nproc_per_node 1 with offload_weights would."""
    model = tm.llama(layers=4)
    batch = tm.lm_batches(1, seed=3)[0]
    trace, _ = memory_plan.trace_model(model, batch, "fp32")
    common = dict(precision="fp32", group_size=1, recompute_boundary=None, device="cuda", ranks=1)
    plans = [(o, auto.predict(trace, o, **common).total) for o in
             auto._candidates(dict(recompute_activations=False), "cuda", 1, auto.WEIGHT_OPTIONS)]
    whole = min(t for o, t in plans if not o["offload_weights"])
    assert min(t for o, t in plans if o["offload_weights"]) < whole
    device = int((whole - 1) / (1 - auto.MARGIN))
    monkeypatch.setattr(auto, "machine_budgets", lambda *a, **k: auto.Budgets(host=100 * GB, device=device))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = memory_plan.Config.build(None, recompute_activations=False)
    with pytest.raises(auto.MemoryPlanError, match="nothing fits") as err:
        memory_plan.plan_run(cfg, model, batch, torch.device("cuda"), "fp32", 1, can_recompute=True)
    assert "torchrun --nproc_per_node 1" in str(err.value) and "offload_weights=True" in str(err.value)
