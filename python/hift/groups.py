"""From a model to units, and from units to K groups.

A unit is a list of parameters that train together: the embeddings, each block of the model's
block list, the final norm, the head. Units are found from the module structure, never from
parameter or class names:

- the blocks are the children of the model's largest homogeneous nn.ModuleList (every child
  of one class), which is how every transformers family (and most hand-written transformers)
  keeps its layers;
- the parameters outside the blocks are placed by when the forward pass first uses them,
  observed once on a real batch with hooks and no autograd: those used before the first block
  form the embeddings unit; those used after the last block form the final-norm unit (leading
  modules whose parameters are all 1-D, such as LayerNorm and RMSNorm) and the head unit;
- a parameter shared by two modules (a tied embedding and LM head) belongs to the first unit
  that uses it, so tied weights always land in one group;
- only trainable parameters (requires_grad at the start) are grouped, so a model wrapped by
  peft trains exactly its adapters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn


class GroupingError(ValueError):
    """The model's layers cannot be split into groups; the message says what to pass."""


@dataclass
class Unit:
    kind: str  # "embeddings", "block", "norm", "head", or "unit" when the user passed it
    params: list[nn.Parameter]
    names: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


@dataclass
class Group:
    index: int
    units: list[Unit]

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for u in self.units for p in u.params]

    @property
    def names(self) -> list[str]:
        return [n for u in self.units for n in u.names]

    @property
    def numel(self) -> int:
        return sum(u.numel for u in self.units)

    def describe(self) -> str:
        kinds = [u.kind for u in self.units]
        return f"group {self.index} ({', '.join(kinds)}; {self.numel:,} parameters)"


def find_block_list(model: nn.Module) -> Optional[nn.ModuleList]:
    """The homogeneous ModuleList holding the most trainable parameters, or None."""
    best, best_numel = None, 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        numel = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if numel > best_numel:
            best, best_numel = module, numel
    return best


def _trainable_names(model: nn.Module) -> dict[int, str]:
    """id(param) -> its first name, for the trainable parameters (shared ones appear once)."""
    return {id(p): n for n, p in model.named_parameters() if p.requires_grad}


def forward_order(model: nn.Module, run_forward: Callable[[], Any]) -> list[nn.Module]:
    """Modules that hold parameters directly, in the order the forward pass first calls them."""
    order: list[nn.Module] = []
    seen: set[int] = set()

    def record(module, _inputs):
        if id(module) not in seen:
            seen.add(id(module))
            order.append(module)

    hooks = [
        m.register_forward_pre_hook(record)
        for m in model.modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in hooks:
            h.remove()
    return order


def detect_units(model: nn.Module, run_forward: Callable[[], Any]) -> list[Unit]:
    """Units of `model` in forward order; `run_forward` runs the model once on a real batch."""
    names = _trainable_names(model)
    if not names:
        raise GroupingError("the model has no trainable parameters (every requires_grad is False)")
    blocks = find_block_list(model)
    if blocks is None:
        raise GroupingError(
            f"found no block list in {type(model).__name__}: hift looks for an nn.ModuleList of "
            "identical blocks (the transformer layers). Pass the units yourself, e.g. "
            "fit(model, loader, units=[model.embed, *model.layers, model.head])."
        )
    taken: set[int] = set()

    def claim(params: Iterable[nn.Parameter]) -> tuple[list[nn.Parameter], list[str]]:
        kept = []
        for p in params:
            if id(p) in names and id(p) not in taken:
                taken.add(id(p))
                kept.append(p)
        return kept, [names[id(p)] for p in kept]

    block_param_ids = {id(p) for p in blocks.parameters()}
    before, after = [], []
    passed_blocks = False
    for module in forward_order(model, run_forward):
        own = list(module.parameters(recurse=False))
        if any(id(p) in block_param_ids for p in own):
            passed_blocks = True
            continue
        (after if passed_blocks else before).append(module)

    units: list[Unit] = []
    embed_params, embed_names = claim(p for m in before for p in m.parameters(recurse=False))
    # Blocks claim their parameters before the head so that a weight tied between a block and a
    # later module (rare) stays with the block; the embeddings claimed theirs first for the
    # same reason (an LM head tied to the input embedding joins the embeddings unit).
    block_units = []
    for block in blocks:
        params, pnames = claim(block.parameters())
        block_units.append(Unit("block", params, pnames))
    norm_modules, head_modules = _split_norm_and_head(after)
    norm_params, norm_names = claim(p for m in norm_modules for p in m.parameters(recurse=False))
    head_params, head_names = claim(p for m in head_modules for p in m.parameters(recurse=False))
    # Parameters the forward never touched through a module call (used by reference, or not at
    # all) join the embeddings when registered before the blocks, else the head.
    leftovers_before, leftovers_after = _leftovers(model, blocks, taken, names)
    embed_params += leftovers_before
    embed_names += [names[id(p)] for p in leftovers_before]
    head_params += leftovers_after
    head_names += [names[id(p)] for p in leftovers_after]

    units.append(Unit("embeddings", embed_params, embed_names))
    units.extend(block_units)
    units.append(Unit("norm", norm_params, norm_names))
    units.append(Unit("head", head_params, head_names))
    return [u for u in units if u.params]


def _split_norm_and_head(after: list[nn.Module]) -> tuple[list[nn.Module], list[nn.Module]]:
    """Leading modules whose parameters are all 1-D (norms) vs the rest (the head)."""
    norms = []
    for module in after:
        if all(p.dim() == 1 for p in module.parameters(recurse=False)):
            norms.append(module)
        else:
            break
    return norms, after[len(norms):]


def _leftovers(model, blocks, taken: set[int], names: dict[int, str]):
    before, after = [], []
    block_ids = {id(p) for p in blocks.parameters()}
    first_block_param = next(iter(blocks.parameters()), None)
    passed = False
    for p in model.parameters():  # registration order, shared parameters once
        if first_block_param is not None and p is first_block_param:
            passed = True
        if id(p) in block_ids or id(p) in taken or id(p) not in names:
            continue
        taken.add(id(p))
        (after if passed else before).append(p)
    return before, after


def units_from_user(model: nn.Module, units: Sequence[Any]) -> list[Unit]:
    """Units given by the user: each an nn.Module or an iterable of parameters."""
    names = _trainable_names(model)
    taken: set[int] = set()
    result = []
    for i, item in enumerate(units):
        params = list(item.parameters()) if isinstance(item, nn.Module) else list(item)
        if not all(isinstance(p, torch.Tensor) for p in params):
            raise GroupingError(f"units[{i}] must be an nn.Module or a list of parameters")
        kept = []
        for p in params:
            if id(p) in names and id(p) not in taken:
                taken.add(id(p))
                kept.append(p)
        if kept:
            result.append(Unit("unit", kept, [names[id(p)] for p in kept]))
    missing = [n for pid, n in names.items() if pid not in taken]
    if missing:
        raise GroupingError(
            f"the units you passed leave {len(missing)} trainable parameter(s) out, e.g. "
            f"{missing[:3]}; add them to a unit, or set requires_grad=False on them to freeze them"
        )
    if not result:
        raise GroupingError("the units you passed hold no trainable parameters")
    return result


def make_groups(units: list[Unit], group_size: int) -> list[Group]:
    """Consecutive units, `group_size` to a group; the last group takes what remains."""
    if group_size > len(units):
        raise GroupingError(
            f"group_size={group_size} is larger than the model's {len(units)} units; pass a "
            f"group_size between 1 and {len(units)}"
        )
    return [
        Group(index=i // group_size, units=units[i : i + group_size])
        for i in range(0, len(units), group_size)
    ]
