"""hift: hierarchical full-parameter fine-tuning.

    import hift
    result = hift.fit(model, loader, group_size=1, num_cycles=3)   # lr 6e-4 (docs/defaults.md)

or as an optimizer in any loop or trainer:

    opt = hift.HiftAdamW(model, group_size=1)
"""
from hift.config import Config
from hift.engine import FitResult, NonFiniteError, StepEvent, fit
from hift.optim import HiftAdamW
from hift.shards import load_shards, save_shard

__all__ = ["Config", "FitResult", "HiftAdamW", "NonFiniteError", "StepEvent", "TrainerShards", "fit", "load_shards",
           "save_shard"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "TrainerShards":  # imported on use: it needs transformers
        from hift.trainer_shards import TrainerShards

        return TrainerShards
    raise AttributeError(f"module 'hift' has no attribute {name!r}")
