"""Options are checked once, before any work, with errors that name the fix."""
import pytest
import torch

import tiny_models as tm
from hift import Config, fit
from hift.batches import BatchError
from hift.config import ConfigError


@pytest.mark.parametrize("options,match", [
    (dict(order="sideways"), "order must be one of"),
    (dict(group_size=0), "group_size"),
    (dict(lr=-1.0), "lr must be"),
    (dict(accum_steps=0), "accum_steps"),
    (dict(precision="fp8"), "precision must be one of"),
    (dict(lr_schedule="step"), "lr_schedule"),
    (dict(num_cycles=0), "num_cycles"),
    (dict(learning_rate=1e-3), "unknown option"),
])
def test_bad_options_fail_before_any_work(options, match):
    model = tm.llama(layers=2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=match):
        fit(model, tm.lm_batches(2), progress=False, **options)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_config_and_keywords_combine():
    cfg = Config(lr=1e-3, group_size=2)
    merged = Config.build(cfg, group_size=3)
    assert (merged.lr, merged.group_size) == (1e-3, 3)


def test_group_size_above_units_names_the_range():
    with pytest.raises(ValueError, match="between 1 and 5"):
        fit(tm.llama(layers=2), tm.lm_batches(2), group_size=9, progress=False)


@pytest.mark.parametrize("loader,error,match", [
    ([], BatchError, "no batches"),
    ([{"input_ids": torch.randint(0, 61, (2, 5))}], BatchError, "labels"),
    ([{"input_ids": torch.randn(2, 5), "labels": torch.zeros(2, 5)}], BatchError, "could not take"),
    # labels one token longer than the inputs: the sequence lengths must match
    ([{"input_ids": torch.randint(0, 61, (2, 5)), "labels": torch.randint(0, 61, (2, 6))}], BatchError,
     "padded to the same length"),
])
def test_bad_batches_are_explained_and_change_nothing(loader, error, match):
    model = tm.llama(layers=2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        fit(model, loader, max_steps=2, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_failed_probe_leaves_the_model_in_train_mode():
    model = tm.llama(layers=2)
    model.train()
    with pytest.raises(BatchError):
        fit(model, [{"input_ids": torch.randint(0, 61, (2, 5))}], max_steps=1, progress=False)
    assert model.training
