"""🤗 accelerate's own loop with HiftAdamW: prepare(), backward(), save_state()/load_state(), one
process and two gloo ranks (accelerate wraps the model in DDP). accelerate writes the
optimizer's state from rank 0 alone; hift.save_shard / hift.load_shards keep every rank's shard
beside it, and a run resumed on the same or another number of ranks ends on the weights of one
that went straight. Every sample is the same, so every batch is, whatever the ranks: the mean
over ranks is exact and the runs must agree bit for bit."""
from pathlib import Path

import pickle

import pytest
import torch
import torch.multiprocessing as mp

import tiny_models as tm
from planted import RunsCodeWhenUnpickled
from torchrun_like import become_rank, free_port, reference_threads

pytest.importorskip("accelerate")

STEPS, SAVE_AT = 8, 3


def train(folder, resume_from=None):
    """STEPS steps of an accelerate loop; the state saved at SAVE_AT, or loaded from resume_from."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    import hift

    accelerator = Accelerator(cpu=True)
    sample = {k: v[0] for k, v in tm.lm_batches(1, batch=1, seed=3)[0].items()}
    model = tm.llama(layers=2)
    opt = hift.HiftAdamW(model, lr=3e-3, order="random", seed=1, moment_dtype="int8", state_chunk_mib=0.003)
    model, opt, loader = accelerator.prepare(model, opt, DataLoader([sample] * 8, batch_size=2))
    batch = next(iter(loader))
    start = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        hift.load_shards(opt, resume_from)
        start = SAVE_AT
    for step in range(start, STEPS):
        accelerator.backward(model(**batch).loss)
        opt.step()
        opt.zero_grad()
        if step + 1 == SAVE_AT and resume_from is None:
            accelerator.save_state(str(folder))
            hift.save_shard(opt, folder)
    weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    hift.shards.unwrap(opt).close()
    return weights, type(model).__name__


def _rank(rank, world, port, root):
    become_rank(rank, world, port)
    root = Path(root)
    out = dict(straight=train(root / "two"), resumed=train(None, root / "two"), from_one=train(None, root / "one"))
    torch.save(out, root / f"rank-{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.bitwise
def test_accelerate_loop_checkpoints_resume_on_any_number_of_ranks(tmp_path):
    with reference_threads():
        one, kind = train(tmp_path / "one")
    assert kind == "LlamaForCausalLM"
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert {p.name for p in (tmp_path / "two").glob("hift_optimizer_rank*.pt")} == {
        "hift_optimizer_rank00000.pt", "hift_optimizer_rank00001.pt"}
    runs = {"2 ranks -> 1": train(None, tmp_path / "two")[0]}
    for rank in range(2):
        out = torch.load(tmp_path / f"rank-{rank}.pt", weights_only=False)
        assert out["straight"][1] == "DistributedDataParallel"  # accelerate's own wrapping, left as it is
        runs.update({f"2 ranks, rank {rank}": out["straight"][0], f"2 ranks resumed, rank {rank}": out["resumed"][0],
                     f"1 -> 2 ranks, rank {rank}": out["from_one"][0]})
    for where, weights in runs.items():
        for name, value in one.items():
            assert torch.equal(weights[name], value), f"{where}, {name}"


def test_load_shards_names_what_is_missing(tmp_path):
    import hift

    opt = hift.HiftAdamW(tm.llama(layers=2), lr=1e-3)
    with pytest.raises(FileNotFoundError, match="no shard of the optimizer state"):
        hift.load_shards(opt, tmp_path)
    with pytest.raises(TypeError, match="not a HiftAdamW"):
        hift.save_shard(torch.optim.SGD(tm.llama(layers=2).parameters(), lr=1e-3), tmp_path)
    opt.close()



def stepped_with_shard(folder):
    """A HiftAdamW one step in, and the shard file save_shard wrote of it into folder."""
    import hift

    model = tm.llama(layers=2)
    batch = tm.lm_batches(1)[0]
    opt = hift.HiftAdamW(model, lr=1e-3, example_batch=batch)
    model(**batch).loss.backward()
    opt.step()
    return opt, hift.save_shard(opt, folder)


def test_a_shard_file_that_holds_a_pickled_object_is_refused_before_it_runs(tmp_path):
    """Shard files are state_dicts (tensors, numbers, strings, lists, dicts): they load with
    weights_only=True, so a file planted in a shared checkpoint folder cannot run code."""
    import hift

    opt, path = stepped_with_shard(tmp_path)
    hift.load_shards(opt, tmp_path)  # its own file loads
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "ran"
    state["hift"]["planted"] = RunsCodeWhenUnpickled(marker)
    torch.save(state, path)
    with pytest.raises(pickle.UnpicklingError):
        hift.load_shards(opt, tmp_path)
    assert not marker.exists()


def test_every_shard_file_loads_with_weights_only_on_another_number_of_ranks(tmp_path):
    """On another number of ranks load_shards reads every saving rank's file: a pickled object
    planted in any of them is refused before it runs, as in this rank's own."""
    import hift
    from hift.shards import SHARD_FILE

    opt, path = stepped_with_shard(tmp_path)
    state = torch.load(path, weights_only=True)
    state["hift"]["world"] = 2  # as if two ranks saved it: this process reads both files
    torch.save(state, path)
    marker = tmp_path / "ran"
    state["hift"].update(rank=1, planted=RunsCodeWhenUnpickled(marker))
    torch.save(state, tmp_path / SHARD_FILE.format(rank=1))
    with pytest.raises(pickle.UnpicklingError):
        hift.load_shards(opt, tmp_path)
    assert not marker.exists()
    opt.close()
