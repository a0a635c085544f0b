"""hift: hierarchical full-parameter fine-tuning.

    import hift
    result = hift.fit(model, loader, lr=2e-5, group_size=1, num_cycles=3)
"""
from hift.config import Config
from hift.engine import FitResult, NonFiniteError, StepEvent, fit

__all__ = ["Config", "FitResult", "NonFiniteError", "StepEvent", "fit"]
__version__ = "0.1.0"
