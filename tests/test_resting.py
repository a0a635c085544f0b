"""A sharded run's memory options as the user set them (memory="manual"): what rests on each rank
for the whole run (its share of the weights and of the optimizer state, where the options put
them) is held to what the machine has, and a world size whose share does not fit is refused in
words before any step and before the model changes (hift.plan.resting).

The machine is faked by replacing auto.machine_capacity (in the spawned ranks' own processes,
as tests/test_memory_auto_fsdp.py replaces auto.machine_budgets): a host whose available RAM
holds the 3-rank share of a tiny LLaMA and not the 2-rank one. The check itself is held to the
planner's numbers without any rank."""
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import tiny_models as tm
from test_fsdp import _init, full_weights, rank_share, shard_yourself
from hift import HiftAdamW, fit, memory_plan
from hift.config import Config
from hift.plan import auto, resting
from hift.plan.auto import MemoryPlanError

MANUAL = dict(memory="manual", progress=False, lr=3e-3, max_steps=2)
CPU = dict(precision="fp32", group_size=1, recompute_boundary=None)


def _model_and_batch():
    return tm.llama(layers=2), tm.lm_batches(1, batch=2, seed=3)[0]


def _share(ranks, device="cpu", **options):
    """One rank's resting share of the tiny LLaMA with shard_weights on `ranks` ranks, all on one node."""
    model, batch = _model_and_batch()
    trace, _ = memory_plan.trace_model(model, batch, "fp32")
    options = dict(dict(offload=device != "cpu", state_chunk_mib=None, moment_dtype="fp32",
                        recompute_activations=False, state_store="host", shard_weights=ranks > 1,
                        offload_weights=False), **options)
    plan = auto.predict(trace, options, **CPU, device=device, ranks=ranks, ranks_per_node=ranks)
    return resting.share_of(plan, ranks), plan, options


def _model_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def host_between_two_and_three():
    """Host RAM available (a node's, shared by its ranks) that holds each of 3 ranks' shares and
    not each of 2's, every rank's process holding the whole model it loaded (which it gives up
    to its share)."""
    held = _model_bytes(_model_and_batch()[0])
    lowest = 3 * (_share(3)[0].host - held)  # the least that holds 3 ranks' shares
    highest = 2 * (_share(2)[0].host - held)  # 2 ranks' need more than this
    assert 0 < lowest < highest, (lowest, highest)
    return (lowest + highest) // 2


# ------------------------------------------------------------------------------- the check


def test_the_two_rank_share_is_refused_where_the_three_rank_share_fits():
    host = host_between_two_and_three()
    held = _model_bytes(_model_and_batch()[0])
    two, _, options = _share(2)
    with pytest.raises(MemoryPlanError) as err:
        resting.check(two, auto.Budgets(host=host), ranks=2, ranks_per_node=2, options=options, held_on_host=held)
    message = str(err.value)
    assert "each of the 2 ranks must hold, for the whole run, host RAM" in message
    assert auto.gb(two.host) in message and auto.gb(host // 2 + held) in message, message
    assert "shared by the node's 2 ranks" in message
    for fix in ("more ranks", 'state_store="disk"', 'moment_dtype="bf16" or "int8"', 'memory="auto"'):
        assert fix in message, (fix, message)
    three, _, options = _share(3)
    resting.check(three, auto.Budgets(host=host), ranks=3, ranks_per_node=3, options=options, held_on_host=held)


def test_only_what_rests_is_counted_not_the_peak():
    """A machine that holds the share exactly passes, though the step's peak (activations, the
    units FSDP2 gathers, gradients) is above it: those are not second-guessed."""
    share, plan, options = _share(2)
    rests = plan.weights + plan.optimizer  # the weights' rows and the state, resident (a CPU: the host)
    assert plan.total > rests and share.host == rests and share.weights == plan.weights
    resting.check(share, auto.Budgets(host=2 * rests), ranks=2, ranks_per_node=2, options=options)
    with pytest.raises(MemoryPlanError, match="host RAM"):
        resting.check(share, auto.Budgets(host=2 * rests - 2), ranks=2, ranks_per_node=2, options=options)


def test_on_a_gpu_the_device_share_is_held_to_its_total_memory():
    """Predicted for a GPU (no GPU needed): the weights' rows and the state, resident (offload
    off), on the device; the fixes name offload_weights and offload. With offload_weights the
    device holds nothing for the whole run, and the host holds the weights' rows and the state."""
    share, plan, options = _share(2, device="cuda", offload=False)
    assert share.device == plan.weights + plan.optimizer and share.weights == plan.weights > 0
    roomy_host = auto.Budgets(host=10**12, device=share.device - 1)
    with pytest.raises(MemoryPlanError) as err:
        resting.check(share, roomy_host, ranks=2, ranks_per_node=2, options=options)
    message = str(err.value)
    assert f"device memory {auto.gb(share.device)} (its share of the weights {auto.gb(share.weights)}" in message
    assert "offload_weights=True" in message and "offload=True" in message
    assert "host RAM" not in message.split("Fixes")[0]  # (the host holds its share)
    sharded_by_user = pytest.raises(MemoryPlanError, match=r"CPUOffloadPolicy\(\)")
    with sharded_by_user:
        resting.check(share, roomy_host, ranks=2, ranks_per_node=2, options=options, sharded_by_user=True)
    offloaded, _, options = _share(2, device="cuda", offload_weights=True)
    assert offloaded.device == 0 and offloaded.host > share.host
    resting.check(offloaded, auto.Budgets(host=2 * offloaded.host, device=0), ranks=2, ranks_per_node=2,
                  options=options)


def test_the_disk_store_is_held_to_the_free_disk_a_node_shares(tmp_path):
    share, _, options = _share(2, state_store="disk")
    assert share.disk > 0
    enough = auto.Budgets(host=10**12, disk=2 * share.disk)
    resting.check(share, enough, ranks=2, ranks_per_node=2, options=options)
    with pytest.raises(MemoryPlanError, match=r"disk .* under state_dir.*shared by the node's 2 ranks") as err:
        resting.check(share, auto.Budgets(host=10**12, disk=2 * share.disk - 2), ranks=2, ranks_per_node=2,
                      options=options)
    assert 'state_store="disk"' not in str(err.value)  # (the store it has)


def test_the_state_files_of_an_earlier_run_count_as_room(tmp_path, monkeypatch):
    """The disk store truncates the files it finds: a resume in the same state_dir has their room."""
    monkeypatch.setattr(auto, "_disk_free", lambda state_dir: 10**9)  # (no other writer moves it)
    assert auto.machine_capacity("cpu", state_dir=str(tmp_path / "state")).disk == 10**9  # (not made yet)
    for rank in range(2):
        folder = tmp_path / "state" / f"rank-{rank:05d}"
        folder.mkdir(parents=True)
        (folder / "chunk-000000.bin").write_bytes(b"\0" * 4096)
    (tmp_path / "state" / "notes.txt").write_bytes(b"\0" * 4096)  # (not a chunk)
    after = auto.machine_capacity("cpu", state_dir=str(tmp_path / "state"))
    assert after.device is None and after.host > 0 and after.disk == 10**9 + 2 * 4096


def test_an_unsharded_run_is_not_checked(monkeypatch):
    """Its state is allocated when the optimizer is built, before the cast and any step: a run that
    cannot hold it stops there today, so nothing is second-guessed (memory_plan._check_resting)."""
    monkeypatch.setattr(auto, "machine_capacity", lambda *a, **k: auto.Budgets(host=0, disk=0))
    model, batch = _model_and_batch()
    cfg, plan = memory_plan.plan_run(Config.build(None, memory="manual"), model, batch, torch.device("cpu"), "fp32",
                                     1, can_recompute=True)
    assert plan.prediction is not None and cfg.moment_dtype == "fp32"


# -------------------------------------------------------------------- spawned ranks (gloo, CPU)


def _worker(rank, world, root, host):
    root = Path(root)
    _init(rank, world, root / "store")
    auto.machine_capacity = lambda *a, **k: auto.Budgets(host=host)  # (this process's own)
    batches = rank_share(tm.lm_batches(2, batch=2 * world, seed=3), rank)
    out = {}
    try:
        cases = {"shard_weights": (lambda: tm.llama(layers=2), dict(shard_weights=True)),
                 "yours": (lambda: shard_yourself(tm.llama(layers=2)), {})}
        for name, (make, options) in cases.items():
            model = make()
            before = full_weights(model)
            steps = []
            try:
                result = fit(model, batches, on_step=steps.append, **MANUAL, **options)
                out[name] = dict(losses=result.losses)
            except MemoryPlanError as err:
                out[name] = dict(error=str(err))
            out[name].update(steps=len(steps), sharded=all(hasattr(p, "device_mesh") for p in model.parameters()),
                             unchanged=all(torch.equal(v, before[k]) for k, v in full_weights(model).items()),
                             requires_grad=all(p.requires_grad for p in model.parameters()))
        try:  # HiftAdamW alone plans (and checks) itself
            HiftAdamW(tm.llama(layers=2), lr=3e-3, shard_weights=True, example_batch=batches[0], memory="manual")
            out["hift_adamw"] = None
        except MemoryPlanError as err:
            out["hift_adamw"] = str(err)
        torch.save(out, root / f"rank-{rank}.pt")
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def _spawn(world, root, host):
    mp.spawn(_worker, args=(world, str(root), host), nprocs=world, join=True)
    return [torch.load(Path(root) / f"rank-{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def host():
    return host_between_two_and_three()


def test_two_ranks_that_cannot_hold_their_share_are_refused_before_any_step(tmp_path, host):
    for rank, out in enumerate(_spawn(2, tmp_path, host)):
        for name in ("shard_weights", "yours"):
            case = out[name]
            assert "error" in case, f"rank {rank}, {name}: trained {case}"
            assert case["steps"] == 0 and case["unchanged"] and case["requires_grad"], (rank, name, case)
            message = case["error"]
            assert message.startswith("hift memory=manual: each of the 2 ranks must hold, for the whole run, host RAM")
            assert "more ranks" in message and 'state_store="disk"' in message and 'memory="auto"' in message
        assert not out["shard_weights"]["sharded"], f"rank {rank}: the model was sharded before the refusal"
        assert out["yours"]["sharded"]  # (the user's own sharding, untouched)
        assert out["hift_adamw"] is not None and "each of the 2 ranks" in out["hift_adamw"]


@pytest.mark.slow
def test_three_ranks_whose_share_fits_train(tmp_path, host):
    """The same machine on 3 ranks: each rank's share fits, and fit shards the model and trains.
    (The user's model, sharded before fit: each process gives up only its rows, so on one node
    it needs what the whole state needs, on any number of ranks, and is refused here too.)"""
    for rank, out in enumerate(_spawn(3, tmp_path, host)):
        case = out["shard_weights"]
        assert "error" not in case, f"rank {rank}: {case['error']}"
        assert case["steps"] == 2 and case["sharded"] and all(map(torch.isfinite, torch.tensor(case["losses"])))
        assert "error" in out["yours"] and out["yours"]["unchanged"]
        assert out["hift_adamw"] is None
