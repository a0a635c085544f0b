"""The model's weights in a checkpoint, whole or sharded.

A model every process holds whole (one process, or hift's data parallel, where every rank has
all of it): rank 0 writes `model.safetensors` (tied tensors once). A model sharded with FSDP2
(`fully_shard`: its parameters are DTensors) is held whole by no rank, so every rank writes its
own rows through torch.distributed.checkpoint (DCP) with the Hugging Face storage writer: one
safetensors file per rank under `model/`, whose header records where each of its pieces lies in
the whole tensor. DCP's default reader unpickles a `.metadata` file; the Hugging Face reader reads
only safetensors headers and JSON, so nothing in a checkpoint can run code.

Either form loads into either kind of model, on any number of ranks: DCP re-shards `model/` for
a sharded model (or assembles it whole for one that is not), and a sharded model reads its own
rows of `model.safetensors` by slices.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from hift import fsdp

MODEL_FILE = "model.safetensors"
MODEL_DIR = "model"  # a sharded model's: one file per rank that holds any of it


class WeightsError(RuntimeError):
    """Saved weights that do not fit the model: the message says which and what to do."""


def is_sharded(model: nn.Module) -> bool:
    """Whether any of the model's parameters is a DTensor (FSDP2's fully_shard made it one)."""
    return fsdp.sharded_model(model)


def saved_files(folder: Path) -> list[str]:
    """The weight files a checkpoint folder must hold (checked by its manifest)."""
    folder = Path(folder)
    if (folder / MODEL_DIR).is_dir():
        return sorted(f"{MODEL_DIR}/{f.name}" for f in (folder / MODEL_DIR).iterdir() if f.suffix == ".safetensors")
    return [MODEL_FILE]


def save_weights(model: nn.Module, folder: Path, rank: int) -> list[str]:
    """Write this rank's part of the model's weights into folder; return the names it wrote. A
    sharded model: a collective, every rank calls it."""
    folder = Path(folder)
    if not is_sharded(model):
        if rank:
            return []
        save_model(model, str(folder / MODEL_FILE))
        return [MODEL_FILE]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp.save(get_model_state_dict(model), storage_writer=dcp.HuggingFaceStorageWriter(
        str(folder / MODEL_DIR), save_distributed=True))
    # (the writer numbers each rank's file from 1; a rank that holds no rows writes none)
    own = f"shard-{rank + 1:05d}-"
    return sorted(f"{MODEL_DIR}/{f.name}" for f in (folder / MODEL_DIR).iterdir() if f.name.startswith(own))


def save_final(model: nn.Module, folder: Path, rank: int) -> None:
    """The trained model as `save_pretrained` writes it (a Hugging Face model; other models are
    not written), from rank 0. A sharded model's rows are gathered through DCP into whole
    safetensors files with their index (a collective: every rank calls it), beside the config."""
    folder = Path(folder)
    if not hasattr(model, "save_pretrained"):
        return
    if not is_sharded(model):
        if not rank:
            model.save_pretrained(folder)
        return
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp.save(get_model_state_dict(model), storage_writer=dcp.HuggingFaceStorageWriter(
        str(folder), save_distributed=True, enable_consolidation=True))
    if not rank:  # the writer's per-rank files, merged into the whole ones now
        shutil.rmtree(folder / "sharded", ignore_errors=True)
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)


def load_weights(folder: Path, model: nn.Module) -> None:
    """Load a checkpoint's weights into the model, whichever form each has (see the module
    docstring). A sharded model: a collective, every rank calls it."""
    folder = Path(folder)
    if (folder / MODEL_DIR).is_dir():
        _load_shards(folder, model)
    elif is_sharded(model):
        _load_own_rows(folder / MODEL_FILE, model)
    else:
        missing, unexpected = load_model(model, str(folder / MODEL_FILE), strict=False)
        _refuse_other_model(folder, missing, unexpected)


def _refuse_other_model(folder: Path, missing, unexpected) -> None:
    if missing or unexpected:
        raise WeightsError(f"{folder} was saved from a different model (missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}); resume with the model it was made from")


def _load_shards(folder: Path, model: nn.Module) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(model)
    reader = dcp.HuggingFaceStorageReader(str(folder / MODEL_DIR))
    saved = set(reader.read_metadata().state_dict_metadata)
    _refuse_other_model(folder, set(state) - saved, saved - set(state))
    dcp.load(state, storage_reader=reader)
    set_model_state_dict(model, state)


def _load_own_rows(file: Path, model: nn.Module) -> None:
    """A sharded model from a whole one's file: each parameter's local rows read as one slice
    (FSDP2 shards on dim 0); buffers and unsharded tensors whole. A buffer the model does not
    save (persistent=False: transformers' rotary inv_freq) is expected in no file."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    saved_by_model = set(model.state_dict(keep_vars=True))
    tensors = {name: t for name, t in tensors.items() if name in saved_by_model}
    with safe_open(str(file), framework="pt") as f:
        saved = set(f.keys())
        # save_model writes a tied tensor once, under one of its names
        missing = {name for name, t in tensors.items() if name not in saved
                   and not any(other in saved and o is t for other, o in tensors.items())}
        _refuse_other_model(file.parent, missing, saved - set(tensors))
        with torch.no_grad():
            for name in sorted(saved):
                target = tensors[name]
                if fsdp.is_sharded(target):
                    local = target.to_local()
                    if local.shape[0] == 0:
                        continue
                    mesh = target.device_mesh
                    row0 = fsdp.rows_of(target.shape[0], mesh.size(), mesh.get_local_rank())[0]
                    local.copy_(f.get_slice(name)[row0 : row0 + local.shape[0]])
                else:
                    target.copy_(f.get_tensor(name))
