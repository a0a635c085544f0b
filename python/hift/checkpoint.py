"""Checkpoints that resume exactly, and that a crash cannot break.

A checkpoint is a directory `step-NNNNNNNN/` holding
  model.safetensors      every model tensor (shared ones once); a model sharded with FSDP2:
                         model/, one safetensors file per rank written through DCP
                         (hift.model_weights)
  optimizer.safetensors  the RNG states and the data stream's tensors
  trainer.json           the format, the data position, fit's history
  state/method.json      the optimizer's hift.resume.MethodState (what a HiftAdamW.state_dict()
                         holds under "hift", all but the chunks' bytes)
  state/chunk-N.safetensors  each chunk of optimizer state, its bytes in their formats (one
                         file per chunk, so that no more than one chunk is ever in memory)
  manifest.json          size and sha256 of every file above, written last
Data parallel (hift.distributed): each rank writes its own shard under state/rank-RRRRR/ (its
method.json and chunks, rank.safetensors with its RNG and data-stream tensors, rank.json with its
stream's position); rank 0 writes the files above. commit() seals both: every rank fsyncs its
files, then rank 0, once it has heard from all (the collective is the barrier), writes
manifest.json over every rank's files and renames the directory into place: no rank's files
count before all are written.
Each MethodState records how its chunks were cut (its layout), so a checkpoint resumes on another
number of ranks or with another state_chunk_mib: each rank assembles its chunks from the saved
ones (hift.resume.chunk_reader), and its data stream goes on after the samples the saving ranks
took (BatchStream.resume_by_samples). A checkpoint of another format (an older hift's) is refused
in words that name its format.
It is written into a hidden temporary directory, flushed to disk, then renamed into place:
a process killed mid-save leaves the previous checkpoint untouched, and a checkpoint without a
manifest that matches its files is refused. Only safetensors and JSON are read back, never
pickle, so a checkpoint from elsewhere cannot run code.

save_run and restore_run say what a run's checkpoint holds: the model, the optimizer's method
state and chunks, the data stream's position, the global RNG and fit's history.
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
from safetensors.torch import save_file

from hift import model_weights, resume
from hift.reshard import LayoutError
from hift.resume import MethodState

# 2: the data stream keeps its own state (data.* tensors); 3: state chunks are raw bytes in
# their formats (hift.formats), not fp32; 4: the optimizer's state is a MethodState (resume.FORMAT)
FORMAT = resume.FORMAT
PREFIX = "step-"
FILES = ("optimizer.safetensors", "trainer.json")  # and the weights: model_weights.saved_files
STATE = "state"


def rank_dir(rank: int) -> str:
    """Where a data-parallel rank's shard of a checkpoint lies."""
    return f"{STATE}/rank-{rank:05d}"


def chunk_file(c: int, rank: Optional[int] = None) -> str:
    return f"{STATE if rank is None else rank_dir(rank)}/chunk-{c:06d}.safetensors"


def method_file(rank: Optional[int] = None) -> str:
    return f"{STATE if rank is None else rank_dir(rank)}/method.json"


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


def save(root, step: int, write: Callable[[Path], list[str]], keep_last: int = 2, dp=None) -> Path:
    """Write checkpoint `step` atomically: write(tmp) writes this rank's files into the hidden
    directory tmp and returns their names; commit() seals it. Data parallel (dp: hift.distributed.
    DataParallel): every rank calls it, into one directory."""
    root = Path(root)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / (f".tmp-{PREFIX}{step:08d}-{os.getpid()}" if dp is None else f".tmp-{PREFIX}{step:08d}-ranks")
    if dp is None or dp.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if dp is not None:
        dp.barrier()
    commit(tmp, final, write(tmp), keep_last, dp)
    return final


def commit(tmp: Path, final: Path, names: list[str], keep_last: int, dp=None) -> None:
    """Seal the checkpoint written into tmp: fsync every file, then write manifest.json (each
    file's size and sha256; under data parallel rank 0 writes it over every rank's files, after
    all have fsynced theirs), rename tmp to final and keep the last keep_last checkpoints."""
    entries = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in names}
    for name in names:
        _fsync(tmp / name)
    for folder in sorted({(tmp / name).parent for name in names}):
        _fsync(folder)
    if dp is not None:  # every rank's files are on disk before rank 0 hears from it
        entries = {name: entry for ranks in dp.all_gather_object(entries) for name, entry in sorted(ranks.items())}
    if dp is None or dp.rank == 0:
        (tmp / "manifest.json").write_text(json.dumps(entries, indent=1))
        _fsync(tmp / "manifest.json")
        _fsync(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(final.parent)
        for old in checkpoints(final.parent)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in final.parent.glob(f".tmp-{PREFIX}*"):  # left by killed saves
            shutil.rmtree(stale, ignore_errors=True)
    if dp is not None:
        dp.barrier()  # no rank goes on (or reads it) before it is in place


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
    for name in sorted(set(FILES) | set(model_weights.saved_files(path)) | set(manifest)):
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
    """The checkpoint's weights into the model, whole or sharded, either way round."""
    try:
        model_weights.load_weights(path, model)
    except model_weights.WeightsError as err:
        raise CheckpointError(str(err)) from None


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
    """Checkpoint `history["steps"]` of a run: the model, the optimizer's MethodState and chunks
    (hift.HiftAdamW), the stream's position (hift.batches.BatchStream), the global RNG and
    `history` (fit's losses, lrs, groups, skipped_steps)."""
    method = optimizer.method_state()
    data_meta, data_tensors = stream.state_dict()
    tensors = {"rng_cpu": torch.get_rng_state(), **{f"data.{k}": v for k, v in data_tensors.items()}}
    if optimizer.device.type == "cuda":
        tensors["rng_cuda"] = torch.cuda.get_rng_state(optimizer.device)
    rank = method.rank if method.world > 1 else None  # data parallel: each rank's state is its own

    def write(tmp: Path) -> list[str]:
        names = []
        (tmp / (STATE if rank is None else rank_dir(rank))).mkdir(parents=True, exist_ok=True)

        def write_chunk(c: int, data: torch.Tensor) -> None:
            names.append(chunk_file(c, rank))
            save_file({"bytes": data.contiguous()}, str(tmp / names[-1]))

        optimizer.save_chunks(write_chunk)
        names.append(_write_json(tmp, method_file(rank), method.to_dict()))
        if rank is not None:  # its RNG and data position
            names.append(_write_tensors(tmp, f"{rank_dir(rank)}/rank.safetensors", tensors))
            names.append(_write_json(tmp, f"{rank_dir(rank)}/rank.json", {"data": data_meta}))
        names.extend(model_weights.save_weights(model, tmp, rank or 0))  # (sharded: every rank its rows)
        if not rank:
            names += [_write_tensors(tmp, "optimizer.safetensors", tensors),
                      _write_json(tmp, "trainer.json", {"format": FORMAT, "data": data_meta, "history": history})]
        return names

    return save(root, history["steps"], write, keep_last=keep_last, dp=optimizer.dp if rank is not None else None)


def _write_json(folder: Path, name: str, data: dict) -> str:
    (folder / name).write_text(json.dumps(data))
    return name


def _write_tensors(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / name))
    return name


def saved_methods(path: Path) -> list[MethodState]:
    """Every saving rank's MethodState, in rank order (one: a run of one process)."""
    path = Path(path)

    def method(rank: Optional[int]) -> MethodState:
        return MethodState.from_dict(json.loads((path / method_file(rank)).read_text()), str(path))

    if (path / method_file()).is_file():
        return [method(None)]
    first = method(0)
    return [first] + [method(rank) for rank in range(1, first.world)]


def check_resumable(path: Path, meta: dict, optimizer) -> None:
    """Refuse a checkpoint of another format or another run before anything is loaded. Another
    number of ranks or another state_chunk_mib is this run (the state is re-cut as it loads)."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} was written in format {meta.get('format')} of hift's checkpoints, and this "
                              f"hift reads format {FORMAT} only: resume it with the hift that wrote it, or start "
                              "the run again")
    differ = optimizer.differences(saved_methods(path)[0])
    if differ:
        raise CheckpointError(
            f"{path} was made by another run ({differ}); resume with the same model, group_size, "
            "precision, state formats, order and seed as the run that saved it")


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
    saved = saved_methods(path)[0].world
    if saved == 1:
        data_meta, tensors = meta["data"], load_tensors(path, prefix="data.", strip=True)
    else:  # the ranks' streams stood at the same batch; a rank that did not save takes one's RNG
        data_meta = _rank_meta(path, rank % saved)["data"]
        tensors = {k[len("data."):]: v for k, v in _rank_tensors(path, rank % saved).items() if k.startswith("data.")}
    if saved == world:
        stream.load_state_dict(data_meta, tensors)
    else:
        stream.resume_by_samples(data_meta, tensors, saved)


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
    methods = saved_methods(path)
    rank, saved = optimizer.rank_and_world[0], methods[0].world
    if saved > 1:
        tensors.update(_rank_tensors(path, rank % saved))  # this rank's RNG (or a saving rank's)
    files = [(m, [Path(path) / chunk_file(c, m.rank if saved > 1 else None) for c in range(len(m.layout))])
             for m in methods]
    optimizer.load_method_state(files, wrap_reader=lambda read: _counted(_refusing(read, path),
                                                                         optimizer.group_state, progress))
    torch.set_rng_state(tensors["rng_cpu"])
    if "rng_cuda" in tensors and optimizer.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng_cuda"], optimizer.device)
    return meta["history"]


def _refusing(read: Callable[[int], torch.Tensor], path: Path) -> Callable[[int], torch.Tensor]:
    """read, with saved chunks that miss some of this run's elements refused in words."""
    def checked(c: int) -> torch.Tensor:
        try:
            return read(c)
        except LayoutError as err:
            raise CheckpointError(f"{path} was saved from a different model ({err}); resume with the model it "
                                  "was made from") from None

    return checked
