"""Resume as a user meets it: a run killed (SIGKILL) after a checkpoint and resumed in a fresh
process takes the same batches, losses and weights, bit for bit, as one that ran straight."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import tiny_models as tm
from hift import fit
from hift.batches import BatchError, BatchStream

TESTS = Path(__file__).parent

# argv: loader case, mode (straight | kill | resume), save_every, kill_at, save_dir, out prefix
RUN = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader, RandomSampler
    import tiny_models as tm
    from hift import checkpoint, fit

    case, mode, save_every, kill_at, save_dir, out = sys.argv[1:]
    save_every, kill_at = int(save_every), int(kill_at)
    # "+disk": bf16 moments resting in files under a state_dir that the resumed run reuses
    case, _, store = case.partition("+")
    state = (dict(state_store="disk", state_dir=save_dir + "-state", moment_dtype="bf16")
             if store == "disk" else {})
    if store == "tight" and mode != "resume":
        # memory="auto" on a machine whose RAM holds bf16 moments but not fp32 ones; the resumed
        # process has the machine's own (ample) budgets and must keep the saved format
        from hift import memory_plan
        from hift.plan import auto
        example = {k: v[:4] for k, v in tm.lm_batches(1, batch=4, seed=3)[0].items()}
        trace, _ = memory_plan.trace_model(tm.llama(layers=2), example, "fp32")
        total = lambda m: auto.predict(trace, dict(offload=False, state_chunk_mib=None, moment_dtype=m,
                                                   recompute_activations=False, state_store="host"),
                                       precision="fp32", group_size=1, recompute_boundary=None, device="cpu").total
        host = (total("fp32") + total("bf16")) / 2 / (1 - auto.MARGIN)
        auto.machine_budgets = lambda *a, **k: auto.Budgets(host=int(host))
    torch.manual_seed(1234)
    samples = [{k: v[0] for k, v in b.items()} for b in tm.lm_batches(18, batch=1, seed=3)]
    seeded = lambda: torch.Generator().manual_seed(5)
    loader = {
        "global_rng": lambda: DataLoader(samples, batch_size=4, shuffle=True),
        "loader_generator": lambda: DataLoader(samples, batch_size=4, shuffle=True, generator=seeded()),
        "sampler_generator": lambda: DataLoader(samples, batch_size=4,
                                                sampler=RandomSampler(samples, generator=seeded())),
    }[case]()  # 5 batches a pass, the last of 2

    def kill_after_checkpoint(event):
        if mode == "kill" and event.step == kill_at:
            assert checkpoint.latest(save_dir).name == f"step-{kill_at:08d}"
            os.kill(os.getpid(), signal.SIGKILL)

    model = tm.llama(layers=2)
    if case == "global_rng":  # dropout draws from the same global RNG as the shuffle
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.2
    result = fit(model, loader, epochs=3, lr=3e-3, max_grad_norm=1.0, progress=False, log_every=2,
                 save_dir=save_dir, save_every=save_every, keep_last=10, on_step=kill_after_checkpoint,
                 resume_from=save_dir if mode == "resume" else None, **state)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out + ".safetensors")
    with open(out + ".json", "w") as f:
        json.dump(result.losses, f)
""")


def run_child(tmp_path, case, mode, save_every, kill_at, run_dir):
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    out = str(tmp_path / mode)
    args = [case, mode, str(save_every), str(kill_at), str(tmp_path / run_dir), out]
    child = subprocess.Popen([sys.executable, "-c", RUN, *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    return child, out


def finished(child) -> str:
    """Its stdout, once it has exited cleanly."""
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    return out


@pytest.mark.parametrize("case,save_every,kill_at", [
    ("global_rng", 4, 8),  # resumes in pass 1 and crosses into pass 2
    ("loader_generator", 4, 8),
    ("sampler_generator", 3, 3),  # resumes in the first pass, the one the probe peeked into
    ("loader_generator", 5, 10),  # the checkpoint sits at the end of pass 1
    ("loader_generator+disk", 4, 8),  # the state on disk, killed while its files were written
    ("loader_generator+tight", 4, 8),  # memory="auto" chose bf16 moments; the resume keeps them
])
def test_killed_run_resumed_in_a_fresh_process_is_bitwise_exact(tmp_path, case, save_every, kill_at):
    straight, straight_out = run_child(tmp_path, case, "straight", save_every, kill_at, "straight")
    killed, _ = run_child(tmp_path, case, "kill", save_every, kill_at, "run")
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    resumed, resumed_out = run_child(tmp_path, case, "resume", save_every, kill_at, "run")
    printed = [finished(resumed), finished(straight)]
    if case.endswith("+tight"):
        assert all("moment_dtype=bf16" in out for out in printed), printed

    losses = json.loads(Path(straight_out + ".json").read_text())
    resumed_losses = json.loads(Path(resumed_out + ".json").read_text())
    assert len(losses) == 15
    assert resumed_losses == losses
    weights = load_file(straight_out + ".safetensors")
    resumed_weights = load_file(resumed_out + ".safetensors")
    for name, w in weights.items():
        assert torch.equal(w, resumed_weights[name]), name


# ------------------------------------------------- in one process: what a resume refuses

QUIET = dict(progress=False, lr=3e-3, max_grad_norm=1.0)


def shuffled(data_seed=3, batch_size=3, order_seed=5):
    samples = [{k: v[0] for k, v in b.items()} for b in tm.lm_batches(11, batch=1, seed=data_seed)]
    generator = torch.Generator().manual_seed(order_seed) if order_seed is not None else None
    return DataLoader(samples, batch_size=batch_size, shuffle=True, generator=generator)


# The generators' states come from the checkpoint (another order_seed alone resumes exactly).
@pytest.mark.parametrize("other,error", [
    (dict(data_seed=4), "does not yield the same batches .*batch 2 of pass 1"),
    (dict(batch_size=4), "does not yield the same batches .*batch 2 of pass 1"),
    (dict(order_seed=None), "draws its order from 0 torch.Generator.* from 1"),
])
def test_resume_onto_other_batches_is_refused(tmp_path, other, error):
    straight = fit(tm.llama(layers=2), shuffled(), max_steps=7, save_dir=str(tmp_path), save_every=3, **QUIET)
    resumed = fit(tm.llama(layers=2), shuffled(order_seed=6), max_steps=7,
                  resume_from=str(tmp_path / "step-00000006"), **QUIET)
    assert resumed.losses == straight.losses
    model = tm.llama(layers=2, seed=3)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(BatchError, match=error):
        fit(model, shuffled(**other), max_steps=7, resume_from=str(tmp_path / "step-00000006"), **QUIET)
    # refused before anything was loaded into the model
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_one_pass_iterator_warns_at_save_and_is_refused_at_resume(tmp_path):
    batches = tm.lm_batches(5)
    with pytest.warns(UserWarning, match="one-pass iterator .* pass fit a DataLoader or a list"):
        fit(tm.llama(layers=2), (b for b in batches), max_steps=4, save_dir=str(tmp_path / "gen"),
            save_every=2, **QUIET)
    with pytest.raises(BatchError, match="one-pass iterator .* resume with a DataLoader or a list"):
        fit(tm.llama(layers=2), (b for b in batches), max_steps=5, resume_from=str(tmp_path / "gen"), **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tm.llama(layers=2), batches, max_steps=4, save_dir=str(tmp_path / "list"), save_every=2, **QUIET)
    assert not [w for w in caught if "one-pass" in str(w.message)]


class Recorder(nn.Module):
    """A small model that keeps the batches it trains on."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(tm.VOCAB, 6), nn.Linear(6, tm.VOCAB)
        self.seen = []

    def forward(self, input_ids, labels):
        if self.training:  # not the probe
            self.seen.append(input_ids)
        return nn.functional.cross_entropy(self.head(self.embed(input_ids)).flatten(0, 1), labels.flatten())


def test_shuffled_passes_are_those_of_a_plain_loop():
    """The probe peeks at the first batch inside a forked RNG; the draws that began the first
    pass must still count, or the second pass repeats the first one's order."""
    samples = [{k: v[0] for k, v in b.items()} for b in tm.lm_batches(10, batch=1, seed=3)]
    model = Recorder()
    torch.manual_seed(7)
    fit(model, DataLoader(samples, batch_size=3, shuffle=True), epochs=3, units=[model.embed, model.head],
        **QUIET)
    torch.manual_seed(7)
    loader = DataLoader(samples, batch_size=3, shuffle=True)
    expected = [b["input_ids"] for _ in range(3) for b in loader]
    assert len(model.seen) == len(expected) == 12
    assert all(torch.equal(a, b) for a, b in zip(model.seen, expected))


def test_distributed_sampler_is_told_each_pass_and_the_stream_resumes_in_it():
    samples = torch.arange(3, 3 + 13)
    make = lambda: DataLoader(samples, batch_size=4,
                              sampler=DistributedSampler(samples, num_replicas=1, rank=0, seed=5))
    stream = BatchStream(make())
    taken = [next(stream) for _ in range(4 * 3)]
    reference = make()
    expected = []
    for epoch in range(3):
        reference.sampler.set_epoch(epoch)
        expected += list(reference)
    assert len(expected) == 12 and all(torch.equal(a, b) for a, b in zip(taken, expected))
    assert not torch.equal(torch.cat(expected[:4]), torch.cat(expected[4:8]))

    stream = BatchStream(make())
    for _ in range(6):
        next(stream)
    resumed = BatchStream(make())
    resumed.peek()
    resumed.load_state_dict(*stream.state_dict())
    assert all(torch.equal(next(resumed), b) for b in expected[6:])
