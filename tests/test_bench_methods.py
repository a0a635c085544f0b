"""Every bench method trains 2 steps of a tiny LLaMA on the CPU, changes what it trains, and the
harness returns its measurements."""
import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds bench/

from bench import methods  # noqa: E402
from bench.compare import run_one  # noqa: E402
from bench.tasks import tiny_task  # noqa: E402

NEEDS = {"lomo": "lomo_optim", "adalomo": "lomo_optim", "badam": "badam", "lora": "peft"}
SPECS = ["adamw", "lomo", "adalomo", "mezo", "badam", "lora", "hift", "hift:precision=bf16",
         "hift:group_size=2,order=random"]


def _skip_without_package(spec):
    name = methods.parse_spec(spec)[0]
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])


@pytest.mark.parametrize("spec", SPECS)
def test_method_changes_what_it_trains(spec):
    _skip_without_package(spec)
    task = tiny_task(steps=2)
    method, options = methods.make(spec)
    precision = options.pop("precision", "fp32")
    model = task.make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    rs = methods.RunSpec(lr=method.lr_grid[-1], max_steps=2, precision=precision, options=options)
    trained = method.train(model, task.batches, rs, lambda loss: losses.append(loss) and False,
                           torch.device("cpu"))
    assert len(losses) == 2 and all(math.isfinite(float(loss)) for loss in losses), losses
    after = dict(trained.named_parameters())
    if method.name == "lora":
        adapters = [n for n in after if "lora_" in n]
        assert adapters
        # lora_B starts at zero; any update moves it
        assert any(after[n].detach().abs().sum() > 0 for n in adapters if "lora_B" in n)
        base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in after.items()}
        frozen = [n for n in before if "lm_head" not in n and n in base]
        assert all(torch.equal(before[n], base[n].detach().to(before[n].dtype)) for n in frozen)
    else:
        changed = [n for n, p in model.named_parameters()
                   if not torch.equal(before[n], p.detach().to(before[n].dtype))]
        assert changed, f"{spec}: no weight changed in 2 steps"
    assert method.trainable > 0


@pytest.mark.parametrize("spec", ["adamw", "mezo", "hift"])
def test_harness_returns_the_measurements(spec):
    args = argparse.Namespace(seed=0, device="cpu", max_steps=3, steps=3, task="tiny", task_args="{}",
                              method=spec, precision="fp32", grad_checkpointing=False, lr=1e-3,
                              time_budget=None, warmup=1)
    out = run_one(args)
    json.dumps(out)  # what the harness writes must be JSON
    assert out["steps"] == 3 and len(out["losses"]) == 3 and len(out["step_seconds"]) == 3
    assert out["tokens_per_second"] > 0 and out["median_step_seconds"] > 0
    assert out["peak_bytes"] >= 0 and out["weights_bytes"] > 0
    if spec != "mezo":
        assert out["state_bytes"] > 0


def test_spec_parsing():
    assert methods.parse_spec("hift:group_size=2,order=bottom_up") == ("hift", {"group_size": "2", "order": "bottom_up"})
    with pytest.raises(KeyError):
        methods.parse_spec("sgd")
    with pytest.raises(ValueError):
        methods.parse_spec("hift:group_size")
