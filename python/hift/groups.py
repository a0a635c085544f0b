"""From a model to units, and from units to K groups.

A unit is a list of parameters that train together: the embeddings, each block of the model's
block lists, the final norm, the head. Units are found from the module structure, never from
parameter or class names:

- the block lists are the homogeneous nn.ModuleLists (every child of one class) that hold
  trainable parameters and do not sit inside a block of another one: how every transformers
  family (and most hand-written transformers) keeps its layers. A decoder-only model has one;
  an encoder-decoder (T5, BART, Whisper) has two, a vision-language model one per tower. A
  list inside a block (a decoder layer's MoE experts) is part of that block;
- each block is a unit, in the order the forward pass first uses it;
- the parameters outside the blocks are placed by when the forward pass first uses them,
  observed once on a real batch with hooks: those used before the first block form the
  embeddings unit; those used between two block lists (an encoder's final norm, a decoder's
  position embeddings, a projector between two towers) form a norm unit (the leading modules
  whose parameters are all 1-D, such as LayerNorm and RMSNorm) and an embeddings unit (the
  rest); those used after the last block form the final-norm unit and the head unit;
- a parameter shared by two modules (a tied embedding and LM head) belongs to the first unit
  that uses it, so tied weights always land in one group;
- only trainable parameters (requires_grad at the start) are grouped, so a model wrapped by
  peft trains exactly its adapters;
- a unit none of whose parameters the loss reaches cannot be trained (its step has nothing to
  differentiate), so it is refused before training starts; the reached parameters are read
  from the autograd graph of the probe's loss.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointFunction

from hift.batches import probe, to_device
from hift.fsdp import leaves_in_forward, reshard, sharded_model


class GroupingError(ValueError):
    """The model's layers cannot be split into groups; the message says what to pass."""


@dataclass
class Unit:
    kind: str  # "embeddings", "block", "norm", "head", or "units[i]" when the user passed it
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


def find_block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The model's block lists, in registration order: homogeneous ModuleLists holding trainable
    parameters, looked for outside the blocks of lists already found."""
    found: list[nn.ModuleList] = []
    visited: set[int] = set()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if id(child) in visited:
                continue
            visited.add(id(child))
            if _is_block_list(child):
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) < 1:
        return False
    kinds = {type(child) for child in module}
    if len(kinds) != 1:
        return False
    # A list of lists (stages of layers) holds containers the forward never calls: its blocks
    # are the layers inside, one level down.
    if issubclass(next(iter(kinds)), (nn.ModuleList, nn.ModuleDict)):
        return False
    return any(p.requires_grad for p in module.parameters())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad, in model.parameters() order; refused in words if none do."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise GroupingError("the model has no trainable parameters (every requires_grad is False)")
    return trainable


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
        # The hooks need no graph; a run_forward that wants one (fit's probe) turns it back on.
        with torch.no_grad():
            run_forward()
    finally:
        for h in hooks:
            h.remove()
    return order


def detect_units(model: nn.Module, run_forward: Callable[[], Any]) -> list[Unit]:
    """Units of `model` in forward order; `run_forward` runs the model once on a real batch."""
    trainable_parameters(model)  # refuses a model with none
    names = _trainable_names(model)
    block_lists = find_block_lists(model)
    if not block_lists:
        raise GroupingError(
            f"found no block list in {type(model).__name__}: hift looks for an nn.ModuleList of "
            "identical blocks (the transformer layers). Pass the units yourself, e.g. "
            "fit(model, loader, units=[model.embed, *model.layers, model.head])."
        )
    walk = _walk_forward(block_lists, forward_order(model, run_forward))
    taken: set[int] = set()

    def claim(params: Iterable[nn.Parameter]) -> tuple[list[nn.Parameter], list[str]]:
        kept = []
        for p in params:
            if id(p) in names and id(p) not in taken:
                taken.add(id(p))
                kept.append(p)
        return kept, [names[id(p)] for p in kept]

    def own(modules: list[nn.Module]) -> Iterable[nn.Parameter]:
        return (p for m in modules for p in m.parameters(recurse=False))

    # The embeddings claim first and the blocks next, so that a weight tied between them and a
    # later module stays with them (an LM head tied to the input embedding joins the
    # embeddings unit; a weight tied between a block and a later module, rare, its block).
    embeddings = Unit("embeddings", *claim(own(walk.before)))
    segments = [[Unit("block", *claim(block.parameters())) for block in run] for run in walk.segments]
    unused_blocks = [Unit("block", *claim(block.parameters())) for block in walk.unused_blocks]
    # A gap between two block lists opens the next part of the model (a decoder's embeddings,
    # a projector); the gap after the last list closes the model (its head).
    gaps = []
    for i, gap in enumerate(walk.gaps):
        norms, rest = _split_leading_norms(gap)
        rest_kind = "head" if i == len(walk.gaps) - 1 else "embeddings"
        gaps.append([Unit("norm", *claim(own(norms))), Unit(rest_kind, *claim(own(rest)))])
    head = gaps[-1][-1] if gaps else Unit("head", [])
    # Parameters the forward never touched through a module call (used by reference, or not at
    # all) join the embeddings when registered before the blocks, else the head.
    leftovers_before, leftovers_after = _leftovers(model, block_lists, taken, names)
    for unit, extra in ((embeddings, leftovers_before), (head, leftovers_after)):
        unit.params += extra
        unit.names += [names[id(p)] for p in extra]

    units = [embeddings]
    for run, gap in zip(segments, gaps):
        units += run + gap
    units += unused_blocks
    if not gaps:
        units.append(head)
    return [u for u in units if u.params]


@dataclass
class _ForwardWalk:
    before: list[nn.Module]  # modules used before the first block
    segments: list[list[nn.Module]]  # runs of blocks of one list, in order of first use
    gaps: list[list[nn.Module]]  # gaps[i]: the modules used after segments[i], before the next run
    unused_blocks: list[nn.Module]  # blocks the forward never called


def _walk_forward(block_lists: list[nn.ModuleList], order: list[nn.Module]) -> _ForwardWalk:
    block_of: dict[int, nn.Module] = {}
    list_of: dict[int, nn.ModuleList] = {}
    for blocks in block_lists:
        for block in blocks:
            list_of[id(block)] = blocks
            for module in block.modules():
                block_of.setdefault(id(module), block)
    walk = _ForwardWalk([], [], [], [])
    seen: set[int] = set()
    for module in order:
        block = block_of.get(id(module))
        if block is None:
            # Used between two blocks of one list (a module the layers share), it goes with the
            # modules after the list rather than cut the list's run of blocks.
            (walk.gaps[-1] if walk.gaps else walk.before).append(module)
        elif id(block) not in seen:
            seen.add(id(block))
            if walk.segments and list_of[id(walk.segments[-1][-1])] is list_of[id(block)]:
                walk.segments[-1].append(block)
            else:
                walk.segments.append([block])
                walk.gaps.append([])
    walk.unused_blocks = [b for blocks in block_lists for b in blocks if id(b) not in seen]
    return walk


def _split_leading_norms(modules: list[nn.Module]) -> tuple[list[nn.Module], list[nn.Module]]:
    """Leading modules whose parameters are all 1-D (norms) vs the rest."""
    norms = []
    for module in modules:
        if all(p.dim() == 1 for p in module.parameters(recurse=False)):
            norms.append(module)
        else:
            break
    return norms, modules[len(norms):]


def _leftovers(model, block_lists, taken: set[int], names: dict[int, str]):
    block_ids = {id(p) for blocks in block_lists for p in blocks.parameters()}
    before, after = [], []
    passed = False
    for p in model.parameters():  # registration order, shared parameters once
        passed = passed or id(p) in block_ids
        if id(p) in taken or id(p) not in names:
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
            result.append(Unit(f"units[{i}]", kept, [names[id(p)] for p in kept]))
    missing = [n for pid, n in names.items() if pid not in taken]
    if missing:
        raise GroupingError(
            f"the units you passed leave {len(missing)} trainable parameter(s) out, e.g. "
            f"{missing[:3]}; add them to a unit, or set requires_grad=False on them to freeze them"
        )
    if not result:
        raise GroupingError("the units you passed hold no trainable parameters")
    return result


def parameters_reached(loss: torch.Tensor) -> Optional[set[int]]:
    """ids of the trainable leaves `loss` depends on, read from its autograd graph (no backward,
    no .grad written); None when the graph hides some of them."""
    reached: set[int] = set()
    if loss.grad_fn is None:
        return reached
    seen = {loss.grad_fn}
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        # A reentrant checkpoint runs its function without a graph and recomputes it in
        # backward: the parameters inside appear nowhere in the graph until then.
        if getattr(node, "_forward_cls", None) is CheckpointFunction:
            return None
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node: its leaf
        if isinstance(leaf, torch.Tensor):
            reached.add(id(leaf))
        for next_node, _ in node.next_functions:
            if next_node is not None and next_node not in seen:
                seen.add(next_node)
                stack.append(next_node)
    return reached


def check_units_reached(units: list[Unit], reached: Optional[set[int]]) -> None:
    """Refuse a unit none of whose parameters the loss reaches (`reached`, from
    parameters_reached; None skips the check): its step would have nothing to differentiate.
    A unit with only some unreached parameters trains; like torch's AdamW, those get no update."""
    if reached is None:
        return
    if not reached:
        raise GroupingError(
            "the loss of the first batch depends on no trainable parameter (it has no autograd "
            "graph): the model's forward must not run under torch.no_grad() or detach the loss"
        )
    for i, unit in enumerate(units):
        if any(id(p) in reached for p in unit.params):
            continue
        shown = ", ".join(unit.names[:3]) + (f" and {len(unit.names) - 3} more" if len(unit.names) > 3 else "")
        raise GroupingError(
            f"the loss never reaches the unit {unit.kind} (number {i} of {len(units)}, counting "
            f"from 0; parameters {shown}): on the first batch it depends on none of them, so that "
            "unit's step would have nothing to train. Freeze them with requires_grad_(False) "
            "before fit (and leave them out of units=), or pass units= that put them in a unit "
            "the loss does reach (there they get no update)."
        )


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


def build_groups(model: nn.Module, given_units: Optional[Sequence[Any]], group_size: int, example_batch,
                 device: torch.device) -> list[Group]:
    """The model's K groups: given_units (HiftAdamW's units=), else the units detected. A forward
    pass on `example_batch` orders the units and checks that the model takes it and that its loss
    reaches every unit, before anything changes; without one, a transformers model's
    dummy_inputs order the units (no reach check: they carry no labels). It runs in eval mode on
    a forked RNG: it must not update batch-norm statistics or consume the random numbers that
    dropout and shuffling will draw."""
    reached = None
    batch = example_batch
    if batch is None and given_units is None:
        batch = getattr(model, "dummy_inputs", None)
        if batch is None:
            raise GroupingError(
                f"hift finds the units of {type(model).__name__} from one forward pass: pass "
                "example_batch=<a batch the model takes> (or units=[...]) to HiftAdamW")
        batch = to_device(batch, device)

        def forward():
            model(**batch)
    else:
        def forward():
            nonlocal reached
            reached = probe(model, batch)

    # FSDP2: the root keeps its unsharded parameters after a forward (for a backward the probe
    # never runs): the sharded ones back before the units are read; and the graph's leaves are
    # the unsharded ones: mapped back to the sharded ones after
    sharded = sharded_model(model)

    def run_forward():
        forward()
        if sharded:
            reshard(model)

    was_training = model.training
    leaves = leaves_in_forward(model) if sharded else contextlib.nullcontext({})
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), leaves as aliases:
        model.eval()
        try:
            if given_units is not None:
                if batch is not None:
                    run_forward()
                units = units_from_user(model, given_units)
            else:
                units = detect_units(model, run_forward)
        finally:
            model.train(was_training)
    if reached is not None and aliases:
        reached = {aliases.get(i, i) for i in reached}
    check_units_reached(units, reached)
    return make_groups(units, group_size)
