"""Activation recomputation for the frozen blocks above the active group.

Backpropagation has to pass through every block above the active group, and by default each
of them keeps its activations from the forward pass. With recomputation a block keeps only its
input and runs its forward again during backward: for LLaMA-2-7B at batch 1, seq 512 that is
about 2.4 GB less at the price of re-running the blocks above the active one. Blocks below the
active group record nothing either way (nothing there requires grad).

A transformers model uses its own gradient checkpointing (which also turns the KV cache off,
as recomputation needs); any other model has the forwards of every block of its block lists
(an encoder's and a decoder's, each tower's) wrapped in torch.utils.checkpoint. Either way the
model is left as it was found.
"""
from __future__ import annotations

import contextlib
import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from hift.config import ConfigError
from hift.groups import find_block_lists


def _hf_checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _hf_enable(model: nn.Module) -> None:
    # transformers 5.2x renamed it; older releases have only the first name
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def recompute_blocks(model: nn.Module, enabled: bool = True):
    if not enabled:
        yield
        return
    if getattr(model, "supports_gradient_checkpointing", False) and hasattr(model, "gradient_checkpointing_enable"):
        was_on = _hf_checkpointing_on(model)
        if not was_on:
            _hf_enable(model)
        try:
            yield
        finally:
            if not was_on:
                (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        return
    blocks = [block for block_list in find_block_lists(model) for block in block_list]
    if not blocks:
        raise ConfigError("recompute_activations needs the model's block lists, and hift found none: "
                          "wrap your blocks' forwards in torch.utils.checkpoint.checkpoint(..., "
                          "use_reentrant=False) yourself and leave recompute_activations off")
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the instance attribute: the class's forward shows through again
