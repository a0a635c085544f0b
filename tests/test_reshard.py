"""Optimizer state saved in one layout and read into another (hift.reshard): the byte mapping on
random layouts and formats, and a run resumed with another state_chunk_mib that equals the run
that went straight, bit for bit. Another number of ranks: tests/test_distributed.py."""
import json
import random

import pytest
import torch
from safetensors.torch import save_file

import tiny_models as tm
from hift import checkpoint, fit, formats
from hift.batches import BatchStream
from hift.distributed import GroupLayout, shard_chunks
from hift.reshard import LayoutError, SavedState
from hift.state import PACKED, PIECE_ALIGN, Chunk, Piece, StateFormat, cut_into_chunks

FORMATS = [StateFormat("none", "fp32"), StateFormat("remainder", "bf16"), StateFormat("fp32", "int8"),
           StateFormat("remainder", "int8")]


def random_layout(rng: random.Random, sizes: list[int], block: int) -> list[list]:
    """Every element of one group, cut as one process (whole, or chunks of some size) or as the
    ranks of a data-parallel run cut it, as a list of chunks' pieces."""
    chunk = rng.choice([None, block, 3 * block, max(block, 1000 + rng.randrange(2000))])
    world = rng.choice([1, 2, 3, 5])
    if world == 1:
        return cut_into_chunks(sizes, chunk, block)
    layout = GroupLayout.of(sizes, world, block)
    return [pieces for rank in range(world) for pieces in shard_chunks(layout, rank, chunk, block) if pieces]


# What each section holds per parameter element: master, exp_avg, exp_avg_sq one each; int8
# moments' fp32 scales so many per block of INT8_BLOCK elements (exp_avg: its scale; exp_avg_sq: lo, hi)
PER_BLOCK = [None, None, None, 1, 2]
SECTION_ALIGN = 16  # every section starts on 16 bytes (docs/architecture.md, "The state's bytes")


def logical_bytes(rng: torch.Generator, format: StateFormat, sizes: list[int]) -> list:
    """Per section, (bytes per value, values per block or None, per parameter: random bytes for
    every element or block scale it holds); None for a section the format does not have."""
    out = []
    for dtype, per_block in zip(format.dtypes, PER_BLOCK):
        if dtype is None:
            out.append(None)
            continue
        counts = [n if per_block is None else -(-n // formats.INT8_BLOCK) * per_block for n in sizes]
        out.append((dtype.itemsize, per_block,
                    [torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=rng) for n in counts]))
    return out


def element_bytes(section, piece):
    """The logical bytes of a piece of a parameter in one section."""
    size, per_block, values = section
    if per_block is None:
        return values[piece.param][piece.lo * size : piece.hi * size]
    first = piece.lo // formats.INT8_BLOCK * per_block
    blocks = -(-piece.numel // formats.INT8_BLOCK)
    return values[piece.param][first * size : (first + blocks * per_block) * size]


def write_chunk(pieces, logical, align=PIECE_ALIGN) -> torch.Tensor:
    """A chunk's bytes written out from the rule alone, not with hift.state's Section arithmetic
    (which the code under test uses): the format's sections one after another, each padded to a
    multiple of 16 bytes; in a section the pieces in order, each starting on a multiple of `align`
    bytes from the section's start (PACKED: end to end); padding is zeros."""
    out = bytearray()
    for section in logical:
        if section is None:
            continue
        data = bytearray()
        for piece in pieces:
            data += bytes(-len(data) % align)
            data += element_bytes(section, piece).numpy().tobytes()
        data += bytes(-len(data) % SECTION_ALIGN)
        out += data
    return torch.frombuffer(out, dtype=torch.uint8) if out else torch.zeros(0, dtype=torch.uint8)


@pytest.mark.parametrize("format", FORMATS, ids=lambda f: f"{f.master}-{f.moments}")
def test_any_layout_reads_the_bits_of_any_other(tmp_path, format):
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for trial in range(6):
        sizes = [rng.choice([1, 7, 255, 256, 257, 513, 1000, 3001]) + rng.randrange(300)
                 for _ in range(rng.randrange(1, 6))]
        logical = logical_bytes(gen, format, sizes)
        saved_layout = random_layout(rng, sizes, format.block)
        files = []
        for c, pieces in enumerate(saved_layout):
            path = tmp_path / f"t{trial}-chunk-{c}.safetensors"
            entry = [0, [[p.param, p.lo, p.hi] for p in pieces]]
            align = rng.choice([PACKED, PIECE_ALIGN])  # an older hift's chunk, or this one's
            save_file({"bytes": write_chunk(pieces, logical, align)}, str(path))
            files.append((path, entry if align == PACKED else entry + [align]))
        source = SavedState(files, format)
        for pieces in random_layout(rng, sizes, format.block):
            got = source.assemble(Chunk(0, pieces))
            assert torch.equal(got, write_chunk(pieces, logical)), f"seed {seed}, trial {trial}"


def test_saved_state_that_misses_elements_is_refused(tmp_path):
    format = FORMATS[0]
    pieces = cut_into_chunks([300, 40], None)[0]
    logical = logical_bytes(torch.Generator().manual_seed(0), format, [300, 40])
    save_file({"bytes": write_chunk(pieces[:1], logical)}, str(tmp_path / "c.safetensors"))
    source = SavedState([(tmp_path / "c.safetensors", [0, [[0, 0, 300]]])], format)
    with pytest.raises(LayoutError, match="holds 0 of the 40 elements"):
        source.assemble(Chunk(0, pieces))


def test_int8_blocks_cut_at_other_rows_are_refused_in_words():
    """FSDP2 rows: int8 blocks start at each rank's first row, so 2 ranks' saved blocks of a
    61 x 24 parameter (rows 0-30, 31-60) are not 3 ranks' (0-20, 21-41, 42-60): a block's scales
    hold for its own elements only."""
    format = StateFormat("none", "int8")
    logical = logical_bytes(torch.Generator().manual_seed(1), format, [61 * 24])
    saved = [[Piece(0, 0, 31 * 24)], [Piece(0, 31 * 24, 61 * 24)]]
    source = SavedState([(write_chunk(pieces, logical), [0, [[p.param, p.lo, p.hi] for p in pieces], PIECE_ALIGN])
                         for pieces in saved], format)
    assert torch.equal(source.assemble(Chunk(0, saved[1])), write_chunk(saved[1], logical))  # the same rows
    with pytest.raises(LayoutError, match="int8 moments of parameter 0 of group 0 were saved in blocks from element 0"):
        source.assemble(Chunk(0, [Piece(0, 21 * 24, 42 * 24)]))


# ------------------------------------------------------------------------- a whole run

OPTIONS = dict(progress=False, lr=3e-3, order="random", seed=3, precision="bf16", moment_dtype="int8",
               max_grad_norm=0.5, offload=True, log_every=2)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("saved_mib, resumed", [(0.003, dict(state_chunk_mib=None)),
                                                (None, dict(state_chunk_mib=0.001)),
                                                (0.002, dict(state_chunk_mib=0.005, state_store="disk"))])
def test_a_run_resumes_with_another_state_chunk_mib_bit_for_bit(tmp_path, saved_mib, resumed):
    """The state of an element does not depend on its chunk (stochastic rounding by element,
    int8 blocks whole), so re-cut state continues exactly as the state that was never re-cut."""
    batches = tm.lm_batches(9, batch=2, seed=5)
    straight = tm.llama(layers=2)
    fit(straight, batches, max_steps=9, state_chunk_mib=saved_mib, **OPTIONS)
    fit(tm.llama(layers=2), batches, max_steps=4, state_chunk_mib=saved_mib, save_dir=str(tmp_path / "ckpt"), **OPTIONS)
    resumed_model = tm.llama(layers=2)
    if resumed.get("state_store") == "disk":
        resumed = dict(resumed, state_dir=str(tmp_path / "state"))
    result = fit(resumed_model, batches, max_steps=9, resume_from=str(tmp_path / "ckpt"), **{**OPTIONS, **resumed})
    assert result.steps == 9
    for key, value in weights(straight).items():
        assert torch.equal(resumed_model.state_dict()[key], value), key


def test_a_checkpoint_of_an_older_format_is_refused_naming_it(tmp_path):
    """A checkpoint of a hift before one MethodState (format 3: the method's state in
    trainer.json, no state/method.json) is refused in words that name its format."""
    batches = tm.lm_batches(6, batch=2, seed=5)
    fit(tm.llama(layers=2), batches, max_steps=3, state_chunk_mib=0.003, save_dir=str(tmp_path), **OPTIONS)
    saved = checkpoint.latest(tmp_path)
    meta = json.loads((saved / "trainer.json").read_text())
    meta.update(format=3, state_layout=json.loads((saved / checkpoint.method_file()).read_text())["layout"])
    (saved / checkpoint.method_file()).unlink()
    rewrite(saved, "trainer.json", json.dumps(meta), drop=[checkpoint.method_file()])
    model = tm.llama(layers=2)
    before = weights(model)
    with pytest.raises(checkpoint.CheckpointError, match="written in format 3 of hift's checkpoints.*reads format 4"):
        fit(model, batches, max_steps=6, resume_from=str(saved), state_chunk_mib=0.003, **OPTIONS)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def rewrite(saved, name, text, drop=()):
    """Write `name` into checkpoint `saved` and its manifest entry to match (dropping `drop`'s)."""
    (saved / name).write_text(text)
    manifest = json.loads((saved / "manifest.json").read_text())
    for gone in drop:
        del manifest[gone]
    manifest[name] = {"bytes": (saved / name).stat().st_size, "sha256": checkpoint._sha256(saved / name)}
    (saved / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------- the data side

def sampled(world, rank, batch_size, samples=25):
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(list(range(samples)), num_replicas=world, rank=rank, shuffle=True, seed=11)
    return BatchStream(DataLoader(list(range(samples)), batch_size=batch_size, sampler=sampler))


@pytest.mark.parametrize("taken_batches", [1, 2, 4, 5, 7])
@pytest.mark.parametrize("saved_world, old_batch, new_world, new_batch", [(2, 3, 1, 2), (1, 6, 3, 1), (2, 3, 3, 2),
                                                                          (1, 4, 2, 1)])
def test_a_pass_goes_on_after_the_samples_the_saving_ranks_took(taken_batches, saved_world, old_batch, new_world,
                                                                new_batch):
    """A DistributedSampler deals one order out among the ranks (padded with its first samples
    to a multiple of them): the new ranks take exactly what the saving ranks had not. A pass that
    was over (25 samples: the last batch short) goes on with the next."""
    order = torch.randperm(25, generator=torch.Generator().manual_seed(11)).tolist()  # the sampler's, pass 0
    padded = lambda world: order + order[: -len(order) % world]
    taken, states = [], []
    for rank in range(saved_world):
        stream = sampled(saved_world, rank, old_batch)
        taken += [int(i) for _ in range(min(taken_batches, len(stream.loader))) for i in next(stream)]
        states.append(stream.state_dict())
    count = min(taken_batches * old_batch * saved_world, len(padded(saved_world)))
    assert sorted(taken) == sorted(padded(saved_world)[:count])
    over = count == len(padded(saved_world))
    rest = []
    for rank in range(new_world):
        stream = sampled(new_world, rank, new_batch)
        meta, tensors = states[rank % saved_world]
        stream.resume_by_samples(meta, tensors, saved_world)
        left = len(stream.loader) - stream.position
        assert left == 0 if over else left > 0
        rest += [int(i) for _ in range(left) for i in next(stream)]
        assert stream.epoch == 0
        if over:
            next(stream)
            assert (stream.epoch, stream.position) == (1, 1)  # the next pass
    if not over:
        assert sorted(rest) == sorted(padded(new_world)[count:])


# ------------------------------------------------------------------- alignment of each piece

ALL_FORMATS = [StateFormat(master, moments) for master in ("none", "remainder", "fp32")
               for moments in ("fp32", "bf16", "int8")]


@pytest.mark.parametrize("format", ALL_FORMATS, ids=lambda f: f"{f.master}-{f.moments}")
def test_every_piece_of_a_chunk_starts_16_byte_aligned(format):
    """The CUDA kernel takes its 16-byte vector path only where every role of a tensor is 16-byte
    aligned: each piece's view into the chunk buffer, and its weight and gradient (a cut at a
    multiple of format.cut elements of a parameter)."""
    from hift.groups import Group, Unit
    from hift.state import OptimizerState

    seed = random.randrange(2**31)
    print(f"seed {seed}")
    rng = random.Random(seed)
    for trial in range(4):
        sizes = [rng.choice([1, 3, 7, 255, 257, 1000, 3001]) + rng.randrange(300) for _ in range(rng.randrange(1, 6))]
        dtype = torch.float32 if format.master == "none" else torch.bfloat16
        params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n in sizes]
        groups = [Group(0, [Unit("block", params, [f"p{i}" for i in range(len(params))])])]
        for chunk_mib in (None, 0.001, 0.0037, 0.01):
            state = OptimizerState(groups, torch.device("cpu"), format, offload=False, chunk_mib=chunk_mib)
            for c, chunk in enumerate(state.chunks):
                for piece in chunk.pieces:
                    assert piece.lo % 16 == 0 and piece.lo % format.block == 0, (seed, trial, chunk_mib, piece)
                views = state.acquire(c)
                for name in ("masters", "exp_avgs", "exp_avg_sqs", "exp_avg_scales", "exp_avg_sq_scales"):
                    for j, view in enumerate(getattr(views, name)):
                        assert view.data_ptr() % 16 == 0, (seed, trial, chunk_mib, c, name, j)
            state.close()


def repack_to_the_layout_before_alignment(saved, format):
    """Rewrite a checkpoint's chunks with each chunk's pieces end to end in their sections, its
    layout without an alignment (as a hift before piece alignment cut them), and the manifest's
    hashes to match."""
    method = json.loads((saved / checkpoint.method_file()).read_text())
    layout = method["layout"]
    manifest = json.loads((saved / "manifest.json").read_text())
    for c, entry in enumerate(layout):
        name = checkpoint.chunk_file(c)
        pieces = [Piece(*p) for p in entry[1]]
        packed = SavedState([(saved / name, entry)], format).assemble(Chunk(entry[0], pieces), align=PACKED)
        save_file({"bytes": packed}, str(saved / name))
        manifest[name] = {"bytes": (saved / name).stat().st_size, "sha256": checkpoint._sha256(saved / name)}
    (saved / "manifest.json").write_text(json.dumps(manifest))
    method["layout"] = [entry[:2] for entry in layout]
    rewrite(saved, checkpoint.method_file(), json.dumps(method))


def test_a_checkpoint_of_pieces_end_to_end_resumes_bit_for_bit(tmp_path):
    """A saved layout that records no alignment (its pieces end to end in each section) resumes
    exactly: the bytes are re-laid as they load."""
    batches = tm.lm_batches(9, batch=2, seed=5)
    straight = tm.llama(layers=2)
    fit(straight, batches, max_steps=9, state_chunk_mib=0.003, **OPTIONS)
    fit(tm.llama(layers=2), batches, max_steps=4, state_chunk_mib=0.003, save_dir=str(tmp_path), **OPTIONS)
    saved = checkpoint.latest(tmp_path)
    repack_to_the_layout_before_alignment(saved, StateFormat("remainder", "int8"))
    resumed = tm.llama(layers=2)
    fit(resumed, batches, max_steps=9, resume_from=str(saved), state_chunk_mib=0.003, **OPTIONS)
    for key, value in weights(straight).items():
        assert torch.equal(resumed.state_dict()[key], value), key
