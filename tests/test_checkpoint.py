"""Checkpoints resume exactly, survive a kill mid-save, and refuse to be misused."""
import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import tiny_models as tm
from hift import checkpoint, fit
from hift.checkpoint import CheckpointError

QUIET = dict(progress=False, max_grad_norm=1.0, lr=3e-3, log_every=3)


def dropout_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=tm.VOCAB, hidden_size=24, intermediate_size=40,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        attention_dropout=0.2, max_position_embeddings=64))


def shuffled_loader():
    samples = [{k: v[0] for k, v in b.items()} for b in tm.lm_batches(7, batch=1, seed=3)]
    return DataLoader(samples, batch_size=2, shuffle=True)  # 4 batches a pass, the last short


def final_state(root: Path):
    """The newest checkpoint's weights, and its optimizer tensors with every state chunk's bytes."""
    last = checkpoint.latest(root)
    tensors = load_file(str(last / "optimizer.safetensors"))
    chunks = sorted((last / checkpoint.STATE).glob("chunk-*.safetensors"))
    assert chunks
    tensors.update({f"chunk{c}": checkpoint.load_chunk(last, c) for c in range(len(chunks))})
    return load_file(str(last / "model.safetensors")), tensors


@pytest.mark.parametrize("precision,order,layout", [
    *[(p, o, {}) for p in ("fp32", "bf16") for o in ("bottom_up", "top_down", "random")],
    ("bf16", "random", dict(offload=True, state_chunk_mib=0.004)),  # state in chunks, via slots
    ("bf16", "top_down", dict(moment_dtype="bf16")),  # stochastic rounding draws the same bits
    ("fp32", "random", dict(moment_dtype="bf16", offload=True, state_chunk_mib=0.004)),
    ("bf16", "random", dict(moment_dtype="int8", offload=True, state_chunk_mib=0.003)),  # blocks cut across chunks
])
def test_resume_is_bitwise_exact(tmp_path, precision, order, layout):
    model = dropout_llama()
    resumed_model = copy.deepcopy(model)
    k = 5
    options = dict(QUIET, precision=precision, order=order, num_cycles=5, lr_schedule="cosine",
                   warmup_cycles=1, seed=11, **layout)
    torch.manual_seed(123)
    straight = fit(model, shuffled_loader(), save_dir=str(tmp_path / "a"), save_every=k, keep_last=10, **options)

    torch.manual_seed(999)  # the checkpoint's RNG state must win over whatever came before
    resumed = fit(resumed_model, shuffled_loader(), save_dir=str(tmp_path / "b"),
                  resume_from=str(tmp_path / "a" / f"step-{3 * k:08d}"), **options)
    assert resumed.steps == straight.steps == 5 * k and resumed.cycles == 5
    assert resumed.groups == straight.groups and resumed.lrs == straight.lrs
    assert resumed.losses == straight.losses
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    weights_a, state_a = final_state(tmp_path / "a")
    weights_b, state_b = final_state(tmp_path / "b")
    for name in state_a:
        if name != "data.rng_epoch_cpu":
            assert torch.equal(state_a[name], state_b[name]), name


def test_keep_last_and_final_model_loads_with_transformers_alone(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tm.llama(layers=2)
    result = fit(model, tm.lm_batches(3), max_steps=7, save_dir=str(tmp_path), save_every=2, keep_last=2, **QUIET)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-00000006", "step-00000007"]
    assert result.checkpoint == tmp_path / "step-00000007"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_truncated_checkpoint_is_refused_and_names_the_previous(tmp_path):
    fit(tm.llama(layers=2), tm.lm_batches(3), max_steps=4, save_dir=str(tmp_path), save_every=2, **QUIET)
    newest = tmp_path / "step-00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])
    model = tm.llama(layers=2, seed=5)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match="step-00000002"):
        fit(model, tm.lm_batches(3), max_steps=6, resume_from=str(tmp_path), **QUIET)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
    # the older one is intact and resumes
    result = fit(model, tm.lm_batches(3), max_steps=6, resume_from=str(tmp_path / "step-00000002"), **QUIET)
    assert result.steps == 6


def test_checkpoint_of_another_run_is_refused_before_loading(tmp_path):
    fit(tm.llama(layers=2), tm.lm_batches(3), max_steps=2, save_dir=str(tmp_path), **QUIET)
    model = tm.llama(layers=2, seed=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match="group_size"):
        fit(model, tm.lm_batches(3), max_steps=4, group_size=2, resume_from=str(tmp_path), **QUIET)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))


@pytest.mark.parametrize("changed", [dict(order="top_down"), dict(seed=12)])
def test_another_order_or_seed_is_refused_on_resume(tmp_path, changed):
    """The rotation belongs to the run: resuming with another order or another random-order
    seed would silently train other groups than the run that saved."""
    options = dict(QUIET, max_steps=4, order="random", seed=3)
    fit(tm.llama(layers=2), tm.lm_batches(3), save_dir=str(tmp_path), **options)
    model = tm.llama(layers=2, seed=4)
    before = copy.deepcopy(model.state_dict())
    key = next(iter(changed))
    with pytest.raises(CheckpointError, match=rf"{key}: .* there, .* here"):
        fit(model, tm.lm_batches(3), resume_from=str(tmp_path), **{**options, **changed, "max_steps": 6})
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import tiny_models as tm
    from hift import checkpoint, fit
    real_fsync = checkpoint._fsync
    def slow_fsync(path):
        if path.name == "model.safetensors" and "step-00000004" in str(path):
            print("SAVING", flush=True)
            time.sleep(60)
        real_fsync(path)
    checkpoint._fsync = slow_fsync
    fit(tm.llama(layers=2), tm.lm_batches(3), max_steps=6, save_dir={root!r}, save_every=2,
        progress=False, lr=3e-3)
""")


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    root = tmp_path / "run"
    code = CHILD.format(tests=str(Path(__file__).parent), root=str(root))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        for line in child.stdout:
            if line.startswith("SAVING"):
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert [p.name for p in checkpoint.checkpoints(root)] == ["step-00000002"]
    result = fit(tm.llama(layers=2), tm.lm_batches(3), max_steps=6, resume_from=str(root),
                 save_dir=str(root), save_every=2, progress=False, lr=3e-3)
    assert result.steps == 6
    assert [p.name for p in checkpoint.checkpoints(root)] == ["step-00000004", "step-00000006"]
    assert not list(root.glob(".tmp-*"))


def test_host_memory_does_not_grow_over_300_steps():
    from hift.memory import host_peak_bytes

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64))
    peaks = {}

    def record(event):
        if event.step + 1 in (50, 300):
            peaks[event.step + 1] = host_peak_bytes()

    ids = torch.randint(0, 512, (2, 32))
    fit(model, [{"input_ids": ids, "labels": ids}], max_steps=300, on_step=record, progress=False)
    assert peaks[300] <= peaks[50] * 1.02, peaks


@pytest.mark.parametrize("threshold, shown", [(1, True), (checkpoint.PROGRESS_BYTES, False)])
def test_loading_much_state_shows_a_progress_bar(tmp_path, monkeypatch, capsys, threshold, shown):
    """A large model's state takes minutes to load: a bar over its bytes, where there are many."""
    monkeypatch.setattr(checkpoint, "PROGRESS_BYTES", threshold)
    batches = tm.lm_batches(4, batch=2)
    fit(tm.llama(layers=2), batches, max_steps=2, save_dir=str(tmp_path), **QUIET)
    capsys.readouterr()
    fit(tm.llama(layers=2), batches, max_steps=4, resume_from=str(tmp_path), **dict(QUIET, progress=True))
    assert ("hift: loading optimizer state" in capsys.readouterr().err) == shown


def test_a_checkpoint_resumes_without_unpickling_anything(tmp_path, monkeypatch):
    """A fit checkpoint is safetensors and JSON: resuming one never calls torch.load or pickle,
    so a file planted in it cannot run code."""
    import pickle

    fit(tm.llama(layers=2), tm.lm_batches(4), max_steps=2, save_dir=str(tmp_path), **QUIET)

    def refused(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", refused)
    monkeypatch.setattr(pickle, "load", refused)
    monkeypatch.setattr(pickle, "loads", refused)
    monkeypatch.setattr(pickle, "Unpickler", refused)
    assert fit(tm.llama(layers=2), tm.lm_batches(4), max_steps=4, resume_from=str(tmp_path), **QUIET).steps == 4
