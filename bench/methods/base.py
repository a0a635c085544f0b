"""The one interface every method implements, and the pieces they share.

A method trains a model, step by step, on batches it is handed, and calls `on_step(loss)` after
every step; `on_step` returns True when the harness wants it to stop (it also times the steps,
evaluates, and reads memory, so a method never does). A step-wise method subclasses StepMethod
and writes `setup` and `step`; a method that owns its loop (hift.fit) overrides `train`.
Adding a method is one small file in bench/methods/ and one line in METHODS (__init__.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from hift.batches import compute_loss, to_device
from hift.precision import DTYPES


@dataclass
class RunSpec:
    """What the harness holds equal across methods (lr aside, which is per method)."""

    lr: float
    max_steps: int  # a cap; the harness usually stops earlier through on_step
    precision: str = "fp32"  # fp32 | bf16 | fp16: the dtype the model's weights are trained in
    grad_checkpointing: bool = False
    max_grad_norm: Optional[float] = 1.0  # where a method can clip without an extra pass
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # method-specific, from "name:k=v,..."


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages among `tensors` (views of one buffer counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor) and v.numel() > 1)


def cycle(batches: list) -> Iterator:
    while True:
        yield from batches


class Method:
    name = "method"
    # The learning rate its paper recommends (fine-tuning), and the grid the harness may tune on.
    paper_lr = 1e-5
    lr_grid = (1e-5, 1e-4, 1e-3)
    note = ""  # one line for the results table: anything unusual about how it runs here

    def __init__(self):
        self.state_bytes = 0  # optimizer state (and masters, adapters' state), measured after setup/run
        self.grad_bytes = 0  # the most gradient bytes alive at once (estimated per method)
        self.trainable = 0  # parameters the method can change
        self.extra: dict = {}  # anything else worth reporting (JSON-serializable)

    def prepare_model(self, model: nn.Module, spec: RunSpec) -> nn.Module:
        """Cast / wrap the model before training; returns the module the loss is computed on."""
        dtype = DTYPES[spec.precision]
        if any(p.dtype != dtype for p in model.parameters()):
            model.to(dtype)
        if spec.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "config"):
                model.config.use_cache = False
        return model

    def train(self, model: nn.Module, batches: list, spec: RunSpec,
              on_step: Callable[[float], bool], device: torch.device) -> nn.Module:
        raise NotImplementedError


class StepMethod(Method):
    """A method written as setup() once and step(batch) -> loss per step."""

    def setup(self, model: nn.Module, spec: RunSpec) -> None:
        raise NotImplementedError

    def step(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, batch) -> torch.Tensor:
        return compute_loss(self.model, batch)

    def train(self, model, batches, spec, on_step, device):
        self.model = self.prepare_model(model, spec)
        self.model.train()
        self.spec = spec
        torch.manual_seed(spec.seed)
        self.device = device
        self.first_batch = to_device(batches[0], device)
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.setup(self.model, spec)
        for i, batch in enumerate(cycle(batches)):
            if i >= spec.max_steps:
                break
            loss = self.step(to_device(batch, device))
            value = float(loss)
            if not math.isfinite(value):
                raise FloatingPointError(f"{self.name}: the loss became {value} at step {i}")
            if on_step(value):
                break
        return self.model

    def clip(self, params):
        if self.spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.spec.max_grad_norm)


def grads_bytes(params: Iterable[torch.Tensor]) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
