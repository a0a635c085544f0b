"""🤗 Trainer + HiftAdamW under data parallel, as torchrun starts it: two gloo ranks, the
Trainer wrapping the model in DDP as it does.

- Every sample the same, so every rank's batch is the same whatever its sampler draws, and the
  mean gradient over ranks is exactly one rank's: the two ranks end with the weights of one
  process, bit for bit, and hift's optimizer state rests sharded (each rank half of it).
- Resume: with hift.TrainerShards each checkpoint holds every rank's shard, and a run resumed
  mid-cycle ends on the weights of one that went straight; without it, the resumed run is
  refused in words at its first step (the Trainer hands every rank rank 0's optimizer.pt)."""
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import tiny_models as tm
from torchrun_like import become_rank, free_port, reference_threads
from hift import HiftAdamW, TrainerShards

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainingArguments  # noqa: E402

STEPS = 7  # more than one cycle of the tiny model's groups


def arguments(output_dir, distributed):
    return TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=STEPS,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0,
                             ddp_backend="gloo" if distributed else None)


def train(output_dir, distributed=False):
    sample = {k: v[0] for k, v in tm.lm_batches(1, batch=1, seed=3)[0].items()}
    model = tm.llama(layers=2)
    args = arguments(output_dir, distributed)  # under torchrun's variables this initializes the process group
    opt = HiftAdamW(model, lr=3e-3, order="random", seed=1, moment_dtype="bf16")
    trainer = Trainer(model=model, args=args, train_dataset=[sample] * 8, optimizers=(opt, None))
    trainer.train()
    resting = sum(opt.group_state.chunks[c].numel for c in range(len(opt.group_state.chunks)))
    wrapped = type(trainer.model_wrapped).__name__
    opt.close()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, resting, wrapped


def _rank(rank, world, port, root):
    become_rank(rank, world, port)
    weights, resting, wrapped = train(Path(root) / "out", distributed=True)
    torch.save(dict(weights=weights, resting=resting, wrapped=wrapped), Path(root) / f"rank-{rank}.pt")
    if torch.distributed.is_initialized():  # (accelerate may have ended it)
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.bitwise
def test_trainer_under_torchrun_trains_as_one_process(tmp_path):
    world = 2
    mp.spawn(_rank, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    with reference_threads():
        one, resting_one, _ = train(tmp_path / "single")
    for rank in range(world):
        out = torch.load(tmp_path / f"rank-{rank}.pt", weights_only=False)
        assert out["wrapped"] == "DistributedDataParallel"  # the Trainer's own wrapping, left as it is
        assert out["resting"] < resting_one  # this rank's shard of the state, not all of it
        for name, value in one.items():
            assert torch.equal(out["weights"][name], value), f"rank {rank}, {name}"


def _resume_rank(rank, world, port, root):
    become_rank(rank, world, port)
    root = Path(root)
    samples = [{k: v[0] for k, v in b.items()} for b in tm.lm_batches(12, batch=1, seed=5)]

    def run(callbacks, resume=None):
        model = tm.llama(layers=2)
        args = TrainingArguments(output_dir=str(root / "out"), per_device_train_batch_size=2, max_steps=STEPS,
                                 save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, seed=0,
                                 disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0,
                                 ddp_backend="gloo", logging_steps=1)
        opt = HiftAdamW(model, lr=3e-3, order="random", seed=1, moment_dtype="int8")
        trainer = Trainer(model=model, args=args, train_dataset=samples, optimizers=(opt, None),
                          callbacks=callbacks)
        try:
            trainer.train(resume_from_checkpoint=resume)
        finally:
            opt.close()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    straight = run([TrainerShards()])
    checkpoint = str(root / "out" / "checkpoint-4")
    resumed = run([TrainerShards()], resume=checkpoint)
    try:
        run([], resume=checkpoint)
        refused = None
    except ValueError as err:
        refused = str(err)
    torch.save(dict(straight=straight, resumed=resumed, refused=refused), root / f"resume-rank-{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.bitwise
def test_trainer_under_torchrun_resumes_with_every_ranks_shard(tmp_path):
    world = 2
    mp.spawn(_resume_rank, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    assert {p.name for p in (tmp_path / "out" / "checkpoint-4").glob("hift_optimizer_rank*.pt")} == {
        "hift_optimizer_rank00000.pt", "hift_optimizer_rank00001.pt"}
    outs = [torch.load(tmp_path / f"resume-rank-{rank}.pt", weights_only=False) for rank in range(world)]
    for rank, out in enumerate(outs):
        for name, value in out["straight"].items():
            assert torch.equal(out["resumed"][name], value), f"rank {rank}, {name}"
            assert torch.equal(outs[0]["straight"][name], value), f"rank {rank}, {name}"
    # without the callback rank 1 has only rank 0's shard (optimizer.pt): every rank refuses
    for rank, out in enumerate(outs):
        assert "rank(s) 1 were given another rank's shard" in out["refused"], out["refused"]
        assert f"this is rank {rank}" in out["refused"] and "hift.TrainerShards()" in out["refused"]


# ------------------------------------------------------------- another number of ranks

def run_same_samples(output_dir, resume=None, distributed=False):
    """Every sample the same (so every batch is, whatever the number of ranks), a checkpoint at
    step 4 with TrainerShards."""
    sample = {k: v[0] for k, v in tm.lm_batches(1, batch=1, seed=3)[0].items()}
    model = tm.llama(layers=2)
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=STEPS,
                             save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0, logging_steps=1,
                             ddp_backend="gloo" if distributed else None)
    opt = HiftAdamW(model, lr=3e-3, order="random", seed=1, moment_dtype="int8", state_chunk_mib=0.003)
    trainer = Trainer(model=model, args=args, train_dataset=[sample] * 8, optimizers=(opt, None),
                      callbacks=[TrainerShards()])
    try:
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    finally:
        opt.close()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _across_rank(rank, world, port, root):
    become_rank(rank, world, port)
    root = Path(root)
    out = dict(straight=run_same_samples(root / "two", distributed=True),
               from_one=run_same_samples(root / "one-to-two", resume=root / "one" / "checkpoint-4", distributed=True))
    torch.save(out, root / f"across-rank-{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.bitwise
def test_trainer_checkpoints_resume_on_another_number_of_ranks(tmp_path):
    """1 process -> 2 ranks (each cuts its share out of optimizer.pt, the whole state) and
    2 ranks -> 1 process (TrainerShards cuts it out of both ranks' shards): on equal batches,
    the weights of the one process that went straight, bit for bit (int8 moments, chunked)."""
    with reference_threads():
        one = run_same_samples(tmp_path / "one")
    mp.spawn(_across_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    with reference_threads():
        back = run_same_samples(tmp_path / "two", resume=tmp_path / "two" / "checkpoint-4")
    runs = {"2 ranks -> 1": back}
    for rank in range(2):
        out = torch.load(tmp_path / f"across-rank-{rank}.pt", weights_only=False)
        runs.update({f"2 ranks, rank {rank}": out["straight"], f"1 -> 2 ranks, rank {rank}": out["from_one"]})
    for where, weights in runs.items():
        for name, value in one.items():
            assert torch.equal(weights[name], value), f"{where}, {name}"
