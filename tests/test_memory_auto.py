"""memory="auto": the planner picks the memory options a user left unset so that the run fits,
in the documented order (hift/plan/auto.py); options the user set are kept; a run that cannot fit
is refused before anything changes; every run reports its predicted and measured peaks."""
import os

import pytest
import torch

import hift
import tiny_models as tm
from hift import memory_plan
from hift.plan import auto
from hift.plan.predict import GB
from hift.plan.trace import MODELS, block_input_bytes, meta_model, trace_units


@pytest.fixture(scope="module")
def small_llama():
    """A LLaMA-shaped model's trace large enough that the options change the numbers."""
    model = meta_model(dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                            intermediate_size=688, vocab_size=8000, max_position_embeddings=512,
                            tie_word_embeddings=False), "bf16")
    trace, _ = trace_units(model, 2, 128)
    return trace, block_input_bytes(model, 2, 128, "bf16")


def choose(trace_and_boundary, budgets, fixed=None, device="cuda"):
    trace, boundary = trace_and_boundary
    return auto.choose(trace, budgets, fixed or {}, precision="bf16", group_size=1, recompute_boundary=boundary,
                       device=device)


def test_plenty_keeps_everything_exact_and_fast(small_llama):
    choice = choose(small_llama, auto.Budgets(host=100 * GB, device=100 * GB))
    assert choice.options == dict(offload=False, state_chunk_mib=None, moment_dtype="fp32",
                                  recompute_activations=False, state_store="host")


def test_a_tighter_device_gives_up_in_order_offload_chunks_moments_recompute(small_llama):
    """Each step down the order is taken only when the one before it no longer fits."""
    picks, seen = [], set()
    resident = choose(small_llama, auto.Budgets(host=100 * GB, device=100 * GB)).plan.total
    for fraction in [x / 100 for x in range(101, 20, -2)]:
        budgets = auto.Budgets(host=100 * GB, device=int(resident * fraction / (1 - auto.MARGIN)))
        try:
            choice = choose(small_llama, budgets)
        except auto.MemoryPlanError:
            break
        assert choice.plan.total <= (1 - auto.MARGIN) * budgets.device
        o = choice.options
        key = (o["offload"], o["state_chunk_mib"] is not None, o["moment_dtype"], o["recompute_activations"])
        if key not in seen:
            seen.add(key)
            picks.append(key)
    kinds = [("offload" if k[0] else "resident") for k in picks]
    assert kinds[0] == "resident" and "offload" in kinds
    first = {name: next(i for i, k in enumerate(picks) if test(k)) for name, test in (
        ("offload", lambda k: k[0]), ("chunks", lambda k: k[1]), ("bf16", lambda k: k[2] != "fp32"),
        ("recompute", lambda k: k[3]))
        if any(test(k) for k in picks)}
    assert list(first) == sorted(first, key=first.get), picks  # in the documented order
    assert len(first) >= 3, picks


def test_a_tight_host_shrinks_the_moments_before_it_goes_to_disk(small_llama):
    plenty = choose(small_llama, auto.Budgets(host=100 * GB, device=100 * GB))
    def offloaded(moments):
        return auto.predict(small_llama[0], dict(plenty.options, offload=True, moment_dtype=moments), precision="bf16",
                            group_size=1, recompute_boundary=None, device="cuda")
    # room on the device for one int8 slot, not for every group's state
    fp32_host, device = offloaded("fp32").host, int(offloaded("int8").total * 1.01 / (1 - auto.MARGIN))
    choice = choose(small_llama, auto.Budgets(host=int(fp32_host * 0.8 / (1 - auto.MARGIN)), device=device))
    assert choice.options["state_store"] == "host" and choice.options["moment_dtype"] in ("bf16", "int8")
    disk = choose(small_llama, auto.Budgets(host=int(fp32_host * 0.2), device=device, disk=100 * GB))
    assert disk.options["state_store"] == "disk" and disk.plan.host_ram <= 0.9 * fp32_host * 0.2


def test_the_users_options_are_kept_and_a_refusal_names_what_would_fit(small_llama):
    plenty = choose(small_llama, auto.Budgets(host=100 * GB, device=100 * GB))
    budgets = auto.Budgets(host=100 * GB, device=int(plenty.plan.total * 0.85))
    kept = choose(small_llama, budgets, {"moment_dtype": "fp32", "offload": True})
    assert kept.options["moment_dtype"] == "fp32" and kept.options["offload"] is True
    assert "moment_dtype" not in kept.chosen and "state_chunk_mib" in kept.chosen
    tiny = auto.Budgets(host=100 * GB, device=int(plenty.plan.weights * 1.05))
    with pytest.raises(auto.MemoryPlanError, match="nothing fits") as err:
        choose(small_llama, tiny, {"moment_dtype": "fp32"})
    assert "the smallest is" in str(err.value) and "GB" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("name,device,host,device_max,host_max", [
    ("llama-3-8b", 24, 64, 22, 60),   # the card most people own
    ("llama-2-7b", 16, 32, 15, 30),   # no 16 GB card held it with the defaults
    ("qwen2.5-7b", 24, 64, 22, 60),   # a vocabulary of 152064
])
def test_seven_and_eight_billion_fit_common_cards_with_no_option_set(name, device, host, device_max, host_max):
    model = meta_model(name, "bf16")
    trace, _ = trace_units(model, 1, 512)
    choice = auto.choose(trace, auto.Budgets(host=host * GB, device=device * GB), {}, precision="bf16",
                         group_size=1, recompute_boundary=block_input_bytes(model, 1, 512, "bf16"), device="cuda")
    print(name, choice.line())
    assert choice.plan.total <= device_max * GB and choice.plan.host_ram <= host_max * GB


# ------------------------------------------------------------------------------ on a live run


def batches(n=6):
    return tm.lm_batches(n, seed=3)


def test_auto_on_a_small_run_is_the_manual_run_bit_for_bit():
    runs = []
    for memory in ("auto", "manual"):
        model = tm.llama(layers=2)
        result = hift.fit(model, batches(), max_steps=6, lr=1e-2, progress=False, memory=memory)
        runs.append((model.state_dict(), result))
    (auto_weights, auto_result), (manual_weights, _) = runs
    assert all(torch.equal(auto_weights[k], v) for k, v in manual_weights.items())
    assert auto_result.memory["predicted_host_peak"] > 0  # the claim check ran


def cpu_total(trace, **options):
    base = dict(offload=False, state_chunk_mib=None, moment_dtype="fp32", recompute_activations=False,
                state_store="host")
    return auto.predict(trace, {**base, **options}, precision="fp32", group_size=1, recompute_boundary=None,
                        device="cpu").total


def test_a_tight_machine_gets_compact_moments(monkeypatch, capsys):
    model = tm.llama(layers=2)
    trace, _ = memory_plan.trace_model(model, batches(1)[0], "fp32")
    between = (cpu_total(trace) + cpu_total(trace, moment_dtype="bf16")) / 2
    monkeypatch.setattr(auto, "machine_budgets", lambda *a, **k: auto.Budgets(host=int(between / (1 - auto.MARGIN))))
    result = hift.fit(model, batches(), max_steps=3, progress=False)
    assert "hift memory=auto: moment_dtype=bf16" in capsys.readouterr().out
    assert result.memory["predicted_host_peak"] < cpu_total(trace)


def test_a_run_that_cannot_fit_is_refused_before_anything_changes(monkeypatch):
    model = tm.llama(layers=2).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(auto, "machine_budgets", lambda *a, **k: auto.Budgets(host=1000))
    with pytest.raises(auto.MemoryPlanError, match="nothing fits"):
        hift.fit(model, batches(), max_steps=3, progress=False)
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_disk_chosen_without_a_state_dir_uses_a_folder_of_its_own_and_removes_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HIFT_STATE_DIR", str(tmp_path / "states"))
    model = tm.llama(layers=6)  # enough groups that the disk store's staging is less than all the state
    trace, _ = memory_plan.trace_model(model, batches(1)[0], "fp32")
    in_ram = min(cpu_total(trace, moment_dtype=m) for m in auto.MOMENTS)
    on_disk = min(cpu_total(trace, moment_dtype=m, state_store="disk") for m in auto.MOMENTS)
    assert on_disk < in_ram
    monkeypatch.setattr(auto, "machine_budgets",
                        lambda *a, **k: auto.Budgets(host=int((in_ram + on_disk) / 2 / (1 - auto.MARGIN)), disk=10**9))
    seen = []
    hift.fit(model, batches(), max_steps=3, progress=False, recompute_activations=False,  # else it recomputes
             on_step=lambda e: seen.extend(os.listdir(tmp_path / "states")))
    assert seen and seen[0].startswith("run-")
    assert os.listdir(tmp_path / "states") == []  # removed when the run ended
