"""A checkpoint's weights, whole (model.safetensors) or sharded (FSDP2's rows through DCP under
model/), load into a whole or a sharded model on any number of ranks (gloo, spawned ranks)."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hift import model_weights


def make_model(seed: int) -> nn.Sequential:
    """Odd sizes: a layer of 2 rows leaves a third rank no rows at all. A buffer no checkpoint
    holds (persistent=False, as transformers' rotary inv_freq): nothing expects it saved."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(11, 7), nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 2), nn.Linear(2, 3))
    model[1].register_buffer("inv_freq", torch.arange(5.0), persistent=False)
    return model


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in list(model)[1:]:
        fully_shard(layer)
    fully_shard(model)
    return model


def whole(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if model_weights.is_sharded(model) else p).detach().clone()
            for n, p in model.named_parameters()}


def _init(rank, world, root):
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)


def _save_sharded(rank, world, root):
    _init(rank, world, root)
    model = shard(make_model(seed=1))
    os.makedirs(f"{root}/ckpt", exist_ok=True)
    names = model_weights.save_weights(model, f"{root}/ckpt", rank)
    torch.save(names, f"{root}/names-{rank}.pt")
    dist.destroy_process_group()


def _load_into_sharded(rank, world, root, source):
    _init(rank, world, root)
    model = shard(make_model(seed=2))
    model_weights.load_weights(f"{root}/{source}", model)
    loaded = whole(model)
    if rank == 0:
        torch.save(loaded, f"{root}/loaded.pt")
    dist.destroy_process_group()


def spawn(fn, world, root, *args):
    if os.path.exists(f"{root}/store"):
        os.remove(f"{root}/store")
    mp.spawn(fn, args=(world, str(root), *args), nprocs=world, join=True)


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    spawn(_save_sharded, 2, root)
    return root


def test_each_rank_writes_its_own_rows_and_names_them(saved_on_two):
    names = [torch.load(saved_on_two / f"names-{r}.pt") for r in range(2)]
    assert names[0] and names[1] and not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1]) == model_weights.saved_files(saved_on_two / "ckpt")
    assert not (saved_on_two / "ckpt" / model_weights.MODEL_FILE).exists()


@pytest.mark.parametrize("world", [1, 3])
def test_sharded_weights_load_resharded(saved_on_two, world):
    spawn(_load_into_sharded, world, saved_on_two, "ckpt")
    loaded = torch.load(saved_on_two / "loaded.pt")
    expected = whole(make_model(seed=1))
    assert loaded.keys() == expected.keys()
    for name in expected:
        assert torch.equal(loaded[name], expected[name]), name


def test_sharded_weights_load_into_a_whole_model_in_one_process(saved_on_two):
    model = make_model(seed=2)
    model_weights.load_weights(saved_on_two / "ckpt", model)
    expected = whole(make_model(seed=1))
    for name, value in whole(model).items():
        assert torch.equal(value, expected[name]), name


def test_a_whole_models_file_loads_into_a_sharded_model(tmp_path):
    (tmp_path / "whole").mkdir()
    assert model_weights.save_weights(make_model(seed=1), tmp_path / "whole", rank=0) == [model_weights.MODEL_FILE]
    spawn(_load_into_sharded, 3, tmp_path, "whole")
    loaded, expected = torch.load(tmp_path / "loaded.pt"), whole(make_model(seed=1))
    for name in expected:
        assert torch.equal(loaded[name], expected[name]), name


def test_weights_of_another_model_are_refused_in_words(saved_on_two, tmp_path):
    other = nn.Sequential(nn.Embedding(11, 7), nn.Linear(7, 5))
    other.add_module("extra", nn.Linear(5, 1))
    with pytest.raises(model_weights.WeightsError, match="different model.*missing.*extra"):
        model_weights.load_weights(saved_on_two / "ckpt", other)
    (tmp_path / "whole").mkdir()
    model_weights.save_weights(other, tmp_path / "whole", rank=0)
    with pytest.raises(model_weights.WeightsError, match="different model"):
        model_weights.load_weights(tmp_path / "whole", make_model(seed=1))
