"""🤗 Trainer + HiftAdamW under data parallel, as torchrun starts it: two gloo ranks, the
Trainer wrapping the model in DDP as it does. Every sample is the same, so every rank's batch is
the same whatever its sampler draws, and the mean gradient over ranks is exactly one rank's: the
two ranks must end with the weights of one process, bit for bit, and hift's optimizer state must
rest sharded (each rank half of it)."""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import tiny_models as tm
from hift import HiftAdamW

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
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    weights, resting, wrapped = train(Path(root) / "out", distributed=True)
    torch.save(dict(weights=weights, resting=resting, wrapped=wrapped), Path(root) / f"rank-{rank}.pt")
    if torch.distributed.is_initialized():  # (accelerate may have ended it)
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_trainer_under_torchrun_trains_as_one_process(tmp_path):
    world = 2
    mp.spawn(_rank, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    one, resting_one, _ = train(tmp_path / "single")
    for rank in range(world):
        out = torch.load(tmp_path / f"rank-{rank}.pt", weights_only=False)
        assert out["wrapped"] == "DistributedDataParallel"  # the Trainer's own wrapping, left as it is
        assert out["resting"] < resting_one  # this rank's shard of the state, not all of it
        for name, value in one.items():
            assert torch.equal(out["weights"][name], value), f"rank {rank}, {name}"
