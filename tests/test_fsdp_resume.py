"""Checkpoints of hift on FSDP2 as users meet them: every rank of a sharded run SIGKILLed after a
checkpoint, and a new job of fresh processes resumes it (weights through DCP, hift.model_weights;
each rank's state beside them, hift.checkpoint) on the same number of ranks, bit for bit, and on
another (the weights re-sharded by DCP, the state re-cut by rows), to fp32's tolerance. A state
cut where this run's rows do not cut it (int8 blocks) is refused in words before any step."""
import datetime
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler

import tiny_models as tm
from hift import checkpoint, fit, model_weights
from test_distributed import assert_close_as_adam, wait_for_ranks

PASS, GLOBAL_BATCH = 24, 6  # samples per pass and per step, whatever the number of ranks
OPTIONS = dict(progress=False, lr=3e-3, log_every=3, memory="manual", shard_weights=True, order="random", seed=4,
               max_grad_norm=0.5, weight_decay=0.05, state_chunk_mib=0.002, max_steps=8, save_every=3, keep_last=5)
KILL_AT = 6


def loader(world, rank):
    """A shuffling DistributedSampler over one dataset: the global batch does not depend on world."""
    samples = [{k: v[0] for k, v in b.items()} for b in tm.lm_batches(PASS, batch=1, seed=8)]
    sampler = DistributedSampler(samples, num_replicas=world, rank=rank, shuffle=True, seed=7)
    return DataLoader(samples, batch_size=GLOBAL_BATCH // world, sampler=sampler)


def whole(model):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def _job(rank, world, root, mode, moments, resume_from):
    """mode straight | kill | resume: one rank of a job; "kill" SIGKILLs itself after checkpoint 6."""
    root = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{root}/store-{mode}-{world}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)

    def kill_after_checkpoint(event):
        if mode == "kill" and event.step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)

    model = tm.llama(layers=2)
    save_dir = root / f"{mode}-{world}"
    try:
        result = fit(model, loader(world, rank), save_dir=str(save_dir), on_step=kill_after_checkpoint,
                     resume_from=resume_from, moment_dtype=moments, **OPTIONS)
        out = dict(weights=whole(model), losses=result.losses)
    except Exception as err:  # a refusal: every rank says it
        out = dict(error=f"{type(err).__name__}: {err}")
    torch.save(out, root / f"{mode}-{world}-rank-{rank}.pt")
    dist.destroy_process_group()


def run(root, world, mode, moments="fp32", resume_from=None):
    mp.spawn(_job, args=(world, str(root), mode, moments, resume_from), nprocs=world, join=True)
    return [torch.load(Path(root) / f"{mode}-{world}-rank-{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def killed_on_two(tmp_path_factory):
    """Two ranks killed after checkpoint 6, and the same job run straight."""
    root = tmp_path_factory.mktemp("fsdp_resume")
    job = mp.start_processes(_job, args=(2, str(root), "kill", "fp32", None), nprocs=2, join=False,
                             start_method="spawn")
    wait_for_ranks(job, 300)
    assert [p.exitcode for p in job.processes] == [-signal.SIGKILL] * 2
    return root, run(root, 2, "straight")


def test_the_checkpoint_holds_each_ranks_rows_and_state_under_one_manifest(killed_on_two):
    root, _ = killed_on_two
    saved = checkpoint.latest(root / "kill-2")
    assert saved.name == f"step-{KILL_AT:08d}"
    checkpoint.verify(saved)
    weights = model_weights.saved_files(saved)
    assert len(weights) == 2 and all(name.startswith(model_weights.MODEL_DIR + "/") for name in weights)
    manifest = (saved / "manifest.json").read_text()
    assert all(name in manifest for name in weights + [checkpoint.method_file(0), checkpoint.method_file(1)])


def test_a_killed_job_resumes_in_fresh_processes_exactly(killed_on_two):
    root, straight = killed_on_two
    resumed = run(root, 2, "resume", resume_from=str(root / "kill-2"))
    for rank in range(2):
        assert len(straight[rank]["losses"]) == OPTIONS["max_steps"]
        assert resumed[rank]["losses"] == straight[rank]["losses"]
        for name, value in straight[rank]["weights"].items():
            assert torch.equal(resumed[rank]["weights"][name], value), f"rank {rank}, {name}"


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3])
def test_a_killed_job_resumes_on_another_number_of_ranks(killed_on_two, world):
    """The same global batch on 1 or 3 ranks: the straight run's, to the tolerance of fp32 sums
    in another order (FSDP averages the ranks' gradients)."""
    root, straight = killed_on_two
    resumed = run(root, world, "resume", resume_from=str(root / "kill-2"))
    for rank in range(world):
        assert resumed[rank]["losses"] == pytest.approx(straight[0]["losses"], rel=1e-5)
        for name, value in straight[0]["weights"].items():
            assert_close_as_adam(resumed[rank]["weights"][name], value, f"{world} ranks, rank {rank}, {name}")


@pytest.mark.slow
def test_int8_moments_cut_at_other_rows_are_refused_in_words(tmp_path):
    """int8 blocks start at each rank's first row: 3 ranks' rows cut the 2 ranks' blocks elsewhere."""
    run(tmp_path, 2, "straight", moments="int8")
    refused = run(tmp_path, 3, "resume", moments="int8", resume_from=str(tmp_path / "straight-2"))
    for out in refused:
        assert out.get("error", "").startswith("CheckpointError") and "saved from" in out["error"], out


def test_the_final_model_is_one_hugging_face_model(killed_on_two):
    """fit's final/ of a sharded run: the ranks' rows gathered into whole files that
    from_pretrained loads, with the weights the ranks ended with."""
    from transformers import AutoModelForCausalLM

    root, straight = killed_on_two
    final = root / "straight-2" / "final"
    assert not (final / "sharded").exists()
    loaded = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert loaded.keys() == straight[0]["weights"].keys()
    for name, value in straight[0]["weights"].items():
        assert torch.equal(loaded[name], value), name
