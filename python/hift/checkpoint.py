"""Checkpoints that resume exactly, and that a crash cannot break.

A checkpoint is a directory `step-NNNNNNNN/` holding
  model.safetensors      every model tensor (shared ones once)
  optimizer.safetensors  the per-group step counts, RNG states, the data stream's state
  state/chunk-N.safetensors  each chunk of optimizer state, its bytes in their formats (one
                         file per chunk, so that no more than one chunk is ever in memory)
  trainer.json           schedule position, loss scaler, data position, history, the run's shape
  manifest.json          size and sha256 of every file above, written last
Data parallel (hift.distributed): each rank writes its own shard under state/rank-RRRRR/ (its
chunks, rank.safetensors with its RNG and data-stream tensors, rank.json with its stream's
position); rank 0 writes the files above. Every rank fsyncs its files, then rank 0, once it has
heard from all (the collective is the barrier), writes manifest.json over every rank's files
and renames the directory into place: no rank's files count before all are written.
Each checkpoint records how its state was cut into chunks (state_layout: trainer.json, or each
rank's rank.json), so it resumes on another number of ranks or with another state_chunk_mib:
each rank assembles its chunks from the saved ones (hift.reshard), and its data stream goes on
after the samples the saving ranks took (BatchStream.resume_by_samples).
It is written into a hidden temporary directory, flushed to disk, then renamed into place:
a process killed mid-save leaves the previous checkpoint untouched, and a checkpoint without a
manifest that matches its files is refused. Only safetensors and JSON are read back, never
pickle, so a checkpoint from elsewhere cannot run code.

save_run and restore_run say what a run's checkpoint holds: the model, the optimizer's method
state (HiftAdamW: step counts, rotation, loss scale, chunks), the data stream's position, the
global RNG and fit's history.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model

from hift import reshard
from hift.optim import world_of

# 2: the data stream keeps its own state (data.* tensors); 3: state chunks are raw bytes in
# their formats (hift.formats), not fp32
FORMAT = 3
PREFIX = "step-"
FILES = ("model.safetensors", "optimizer.safetensors", "trainer.json")
STATE = "state"


def rank_dir(rank: int) -> str:
    """Where a data-parallel rank's shard of a checkpoint lies."""
    return f"{STATE}/rank-{rank:05d}"


def chunk_file(c: int, rank: Optional[int] = None) -> str:
    return f"{STATE if rank is None else rank_dir(rank)}/chunk-{c:06d}.safetensors"


def load_chunk(path: Path, c: int, rank: Optional[int] = None) -> torch.Tensor:
    """State chunk c's bytes from checkpoint `path` (a data-parallel rank's chunk c)."""
    with safe_open(str(Path(path) / chunk_file(c, rank)), framework="pt") as f:
        return f.get_tensor("bytes")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the one to use instead."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(root: Path) -> list[Path]:
    """The finished checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save(root, step: int, model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict,
         keep_last: int = 2, write_state: Optional[Callable[[Callable[[int, torch.Tensor], None]], None]] = None) -> Path:
    """Write checkpoint `step` atomically; write_state(write) hands each state chunk's bytes
    to write(c, bytes)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps(meta))
    names = list(FILES)
    if write_state is not None:
        (tmp / STATE).mkdir()

        def write(c: int, data: torch.Tensor) -> None:
            name = chunk_file(c)
            save_file({"bytes": data.contiguous()}, str(tmp / name))
            names.append(name)

        write_state(write)
    manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in names}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for name in (*names, "manifest.json"):
        _fsync(tmp / name)
    if write_state is not None:
        _fsync(tmp / STATE)
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    for old in checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):  # left by killed saves
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save_sharded(root, step: int, model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict, dp,
                 rank_tensors: dict[str, torch.Tensor], rank_meta: dict, keep_last: int = 2,
                 write_state: Optional[Callable[[Callable[[int, torch.Tensor], None]], None]] = None) -> Path:
    """Checkpoint `step` of a data-parallel run (hift.distributed.DataParallel `dp`), called by
    every rank: each writes its shard (write_state, rank_tensors, rank_meta), rank 0 the model
    and `tensors`/`meta` too; atomic as a whole (see the module docstring)."""
    root = Path(root)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-ranks"  # one name every rank knows
    if dp.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / STATE).mkdir(parents=True)
    dp.barrier()
    mine = rank_dir(dp.rank)
    (tmp / mine).mkdir()
    names = []

    def write(c: int, data: torch.Tensor) -> None:
        name = chunk_file(c, dp.rank)
        save_file({"bytes": data.contiguous()}, str(tmp / name))
        names.append(name)

    if write_state is not None:
        write_state(write)
    save_file({k: v.detach().contiguous().cpu() for k, v in rank_tensors.items()}, str(tmp / mine / "rank.safetensors"))
    (tmp / mine / "rank.json").write_text(json.dumps(rank_meta))
    names += [f"{mine}/rank.safetensors", f"{mine}/rank.json"]
    if dp.rank == 0:
        save_model(model, str(tmp / "model.safetensors"))
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps(meta))
        names += list(FILES)
    entries = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in names}
    for name in names:
        _fsync(tmp / name)
    _fsync(tmp / mine)
    # every rank's files are on disk before rank 0 hears from it: the manifest comes after all
    everyone = dp.all_gather_object(entries)
    if dp.rank == 0:
        manifest = {name: entry for ranks in everyone for name, entry in sorted(ranks.items())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / "manifest.json")
        _fsync(tmp / STATE)
        _fsync(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
        for old in checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    dp.barrier()  # no rank goes on (or reads it) before it is in place
    return final


def verify(path: Path) -> None:
    """Raise CheckpointError unless every file is there with its recorded size and hash."""
    path = Path(path)
    older = [p for p in checkpoints(path.parent) if p.name < path.name]
    hint = f"; the previous checkpoint is {older[-1]}" if older else ""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a complete checkpoint (manifest.json: {err}){hint}") from None
    for name in sorted(set(FILES) | set(manifest)):
        file = path / name
        entry = manifest.get(name)
        if entry is None or not file.is_file():
            raise CheckpointError(f"{path} is missing {name}{hint}")
        if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{path}/{name} is truncated or corrupted (size or sha256 differ "
                                  f"from its manifest){hint}")


def resolve(path) -> Path:
    """A checkpoint directory, or a save directory (its newest checkpoint)."""
    path = Path(path)
    if (path / "manifest.json").exists() or path.name.startswith(PREFIX):
        return path
    found = checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint in {path}: pass a save_dir that fit wrote to, or one "
                              f"of its {PREFIX}* directories")
    return found[-1]


def read(path) -> tuple[Path, dict]:
    """Resolve and verify a checkpoint; its directory and trainer.json (nothing loaded yet)."""
    path = resolve(path)
    verify(path)
    return path, json.loads((path / "trainer.json").read_text())


def load_weights(path: Path, model: torch.nn.Module) -> None:
    missing, unexpected = load_model(model, str(Path(path) / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} was saved from a different model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}); resume with the model it was made from")


def load_tensors(path: Path, prefix: str = "", strip: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of optimizer.safetensors whose names start with `prefix` (all by default),
    read alone; with strip, named without the prefix."""
    with safe_open(str(Path(path) / "optimizer.safetensors"), framework="pt") as f:
        return {(k[len(prefix):] if strip else k): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def latest(root) -> Optional[Path]:
    found = checkpoints(Path(root))
    return found[-1] if found else None


# ------------------------------------------------------------------------ a run's checkpoint


def save_run(root, model: torch.nn.Module, optimizer, stream, history: dict, keep_last: int = 2) -> Path:
    """Checkpoint `history["steps"]` of a run: the model, the optimizer's method state
    (hift.HiftAdamW), the stream's position (hift.batches.BatchStream), the global RNG and
    `history` (fit's losses, lrs, groups, skipped_steps)."""
    optimizer.group_state.synchronize()
    tensors = {"steps": optimizer.group_state.steps, "rng_cpu": torch.get_rng_state()}
    data_meta, data_tensors = stream.state_dict()
    tensors.update({f"data.{k}": v for k, v in data_tensors.items()})
    if optimizer.device.type == "cuda":
        tensors["rng_cuda"] = torch.cuda.get_rng_state(optimizer.device)
    dp = getattr(optimizer, "dp", None)
    meta = {
        "format": FORMAT,
        "run": optimizer.fingerprint(),
        "order": optimizer.order.state_dict(),
        "scaler": optimizer.scaler.state_dict(),
        "data": data_meta,
        "history": history,
    }
    # how the state was cut into chunks: another layout can read them (hift.reshard)
    layout = optimizer.group_state.layout()
    if dp is not None:  # each rank's RNG, data position and chunks are its own
        rank_tensors = {k: v for k, v in tensors.items() if k != "steps"}
        return save_sharded(root, history["steps"], model, tensors, meta, dp, rank_tensors,
                            {"data": data_meta, "state_layout": layout}, keep_last=keep_last,
                            write_state=optimizer.save_chunks)
    meta["state_layout"] = layout
    return save(root, history["steps"], model, tensors, meta, keep_last=keep_last, write_state=optimizer.save_chunks)


def saved_world(meta: dict) -> int:
    """How many ranks saved a checkpoint (1: one process)."""
    return world_of(meta["run"])


def saved_layouts(path: Path, meta: dict) -> Optional[list[list]]:
    """Per saving rank, how its state was cut into chunks (OptimizerState.layout()); None where
    the checkpoint does not say (written by a hift before re-sharding)."""
    if saved_world(meta) == 1:
        return [meta["state_layout"]] if "state_layout" in meta else None
    layouts = [_rank_meta(path, rank).get("state_layout") for rank in range(saved_world(meta))]
    return None if None in layouts else layouts


def check_resumable(path: Path, meta: dict, optimizer) -> None:
    """Refuse a checkpoint of another format or another run before anything is loaded. Another
    number of ranks or another state_chunk_mib is this run, where the checkpoint records its
    layout (the state is re-cut as it loads: hift.reshard)."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')}; this hift reads {FORMAT}")
    any_layout = saved_layouts(path, meta) is not None
    differ = optimizer.differences(meta["run"], any_layout=any_layout)
    if differ:
        raise CheckpointError(
            f"{path} was made by another run ({differ}); resume with the same model, group_size, "
            "precision, state formats, order and seed as the run that saved it"
            + ("" if any_layout else ", and its state_chunk_mib (it predates re-sharding)"))


def _rank_meta(path: Path, rank: int) -> dict:
    return json.loads((Path(path) / rank_dir(rank) / "rank.json").read_text())


def _rank_tensors(path: Path, rank: int) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(path) / rank_dir(rank) / "rank.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def resume_stream(path: Path, meta: dict, stream, rank: int = 0, world: int = 1) -> None:
    """Bring the batch stream to where the checkpoint was saved; this checks that the loader
    yields the same batches, so it runs before the model is cast or loaded. A data-parallel
    rank resumes its own stream; on another number of ranks, the pass goes on after the
    samples the saving ranks took (BatchStream.resume_by_samples)."""
    saved = saved_world(meta)
    if saved == 1:
        data_meta, tensors = meta["data"], load_tensors(path, prefix="data.", strip=True)
    else:  # the ranks' streams stood at the same batch; a rank that did not save takes one's RNG
        data_meta = _rank_meta(path, rank % saved)["data"]
        tensors = {k[len("data."):]: v for k, v in _rank_tensors(path, rank % saved).items() if k.startswith("data.")}
    if saved == world:
        stream.load_state_dict(data_meta, tensors)
    else:
        stream.resume_by_samples(data_meta, tensors, saved)


def _chunk_reader(path: Path, meta: dict, optimizer, rank: int, world: int) -> Callable[[int], torch.Tensor]:
    """read(c): this rank's state chunk c from the checkpoint: the saved file itself where this
    rank saved it in this layout, else assembled from the saved chunks (hift.reshard)."""
    state, saved, layouts = optimizer.group_state, saved_world(meta), saved_layouts(path, meta)
    if layouts is not None and saved == world and layouts[rank] == state.layout():
        return lambda c: load_chunk(path, c, rank if saved > 1 else None)
    if layouts is None:  # before re-sharding: this rank's own chunks, cut as here, pieces end to end
        files = [(Path(path) / chunk_file(c, rank if saved > 1 else None), entry[:2])
                 for c, entry in enumerate(state.layout())]
    else:
        files = [(Path(path) / chunk_file(c, r if saved > 1 else None), entry)
                 for r, layout in enumerate(layouts) for c, entry in enumerate(layout)]
    source = reshard.SavedState(files, state.format)

    def assemble(c: int) -> torch.Tensor:
        try:
            return source.assemble(state.chunks[c])
        except reshard.LayoutError as err:
            raise CheckpointError(f"{path} was saved from a different model ({err}); resume with the model it "
                                  "was made from") from None

    return assemble


PROGRESS_BYTES = 1 << 30  # less state loads in seconds: no bar


def _counted(read: Callable[[int], torch.Tensor], state, progress: bool) -> Callable[[int], torch.Tensor]:
    """read, advancing a progress bar by each chunk's bytes (closed after the last chunk)."""
    total = sum(state.numels) * 4
    if not progress or total < PROGRESS_BYTES:
        return read
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="hift: loading optimizer state")

    def counted(c: int) -> torch.Tensor:
        data = read(c)
        bar.update(data.numel() * data.element_size())
        if c == len(state.numels) - 1:
            bar.close()
        return data

    return counted


def restore_run(path: Path, meta: dict, model: torch.nn.Module, optimizer, progress: bool = False) -> dict:
    """Load the model, the optimizer's method state and the global RNG; return the history.
    progress: a bar over the state's bytes where they are many (a large model's take minutes)."""
    load_weights(path, model)
    tensors = load_tensors(path)
    history = meta["history"]
    (rank, world), saved = optimizer.rank_and_world, saved_world(meta)
    if saved > 1:
        tensors.update(_rank_tensors(path, rank % saved))  # this rank's RNG (or a saving rank's)
    read_chunk = _counted(_chunk_reader(path, meta, optimizer, rank, world), optimizer.group_state, progress)
    optimizer.load_method_state(steps=tensors["steps"], order=meta["order"], scaler=meta["scaler"],
                                steps_taken=history["steps"], read_chunk=read_chunk, skipped=history["skipped_steps"])
    torch.set_rng_state(tensors["rng_cpu"])
    if "rng_cuda" in tensors and optimizer.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng_cuda"], optimizer.device)
    return history
