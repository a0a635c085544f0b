"""What the loader yields, and how a batch becomes a loss.

A dict batch is passed as model(**batch) (the transformers convention), a tuple or list as
model(*batch), anything else as model(batch). The loss is `output.loss` (transformers), the
"loss" key of a dict, or the output itself when it is a scalar tensor.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn


class BatchError(ValueError):
    """A batch the model cannot take or that yields no loss; the message says what to change."""


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    if hasattr(batch, "to") and hasattr(batch, "keys"):  # transformers BatchEncoding
        return batch.to(device)
    return batch


def call_model(model: nn.Module, batch: Any):
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__")):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def loss_of(output: Any) -> torch.Tensor:
    loss = None
    if isinstance(output, torch.Tensor):
        loss = output
    elif isinstance(output, dict) or hasattr(output, "keys"):
        loss = output.get("loss") if hasattr(output, "get") else None
    elif hasattr(output, "loss"):
        loss = output.loss
    elif isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        loss = output[0]
    if loss is None:
        raise BatchError(
            "the model returned no loss. For a transformers model, put `labels` in every batch "
            "(for a causal LM, labels=input_ids); a plain nn.Module's forward must return the "
            "loss as a scalar tensor."
        )
    if loss.dim() != 0:
        raise BatchError(
            f"the model's loss has shape {tuple(loss.shape)}; fit needs a scalar: reduce it "
            "(for example .mean()) inside the model's forward"
        )
    return loss


def compute_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return loss_of(call_model(model, batch))


def probe(model: nn.Module, batch: Any) -> set[int] | None:
    """Run the first batch once so that a batch the model cannot take fails before anything is
    changed, with the cause in words. Returns the ids of the trainable parameters the loss
    reaches (None where the graph cannot tell), so that fit can refuse a unit it never reaches."""
    from hift.groups import parameters_reached

    try:
        # The graph is built for its shape alone: the activations it would save are dropped as
        # they come, so the probe needs no more memory than inference, and it never runs backward.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda _: None, lambda _: None):
            loss = compute_loss(model, batch)
    except BatchError:
        raise
    except Exception as err:  # the model's own error, wrapped with what fit did
        kind = "dict (called as model(**batch))" if isinstance(batch, dict) else (
            "tuple/list (called as model(*batch))" if isinstance(batch, (list, tuple))
            else f"{type(batch).__name__} (called as model(batch))")
        raise BatchError(
            f"the model could not take the loader's first batch, a {kind}: "
            f"{type(err).__name__}: {err}. Make the loader yield what the model's forward "
            "accepts (for transformers: dicts with input_ids, attention_mask and labels, all "
            "sequences of one batch padded to the same length)."
        ) from err
    return parameters_reached(loss)


class BatchStream:
    """The loader, pass after pass, remembering where it is (epoch, batch within the epoch)."""

    def __init__(self, loader):
        self.loader = loader
        self.epoch = 0
        self.position = 0
        # The CPU RNG state when this epoch's iterator was made: a shuffling DataLoader draws
        # its order from it, so a resumed run can make the same iterator again.
        self.epoch_rng: torch.Tensor | None = None
        self._iterator: Iterator | None = None
        self._peeked = None

    def _new_iterator(self):
        self.epoch_rng = torch.get_rng_state()
        self._iterator = iter(self.loader)

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Where the stream is: JSON-able metadata and tensors (both go into a checkpoint)."""
        return {"epoch": self.epoch, "position": self.position}, {"rng_epoch_cpu": self.epoch_rng}

    def load_state_dict(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Continue where state_dict() was taken (the caller restores the global RNG after)."""
        self.restore(meta["epoch"], meta["position"], tensors["rng_epoch_cpu"])

    def restore(self, epoch: int, position: int, epoch_rng: torch.Tensor) -> None:
        """Continue at batch `position` of pass `epoch` (the caller restores the RNG after)."""
        self.epoch, self.position, self._peeked = epoch, 0, None
        torch.set_rng_state(epoch_rng)
        self._new_iterator()
        for _ in range(position):
            try:
                next(self._iterator)
            except StopIteration:
                raise BatchError(f"the loader now has fewer than {position} batches per pass; resume "
                                 "with the loader the checkpoint was made with") from None
        self.position = position

    def __iter__(self):
        return self

    def __next__(self):
        if self._peeked is not None:
            batch, self._peeked = self._peeked, None
            self.position += 1
            return batch
        if self._iterator is None:
            self._new_iterator()
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.position == 0:
                raise BatchError("the loader yielded no batches; give fit a loader with data") from None
            self.epoch += 1
            self.position = 0
            self._new_iterator()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise BatchError("the loader yielded no batches on its second pass; fit needs "
                                 "a loader it can iterate more than once (a DataLoader, a list)") from None
        self.position += 1
        return batch

    def peek(self):
        """The next batch, without consuming it."""
        if self._peeked is None:
            batch = next(self)
            self.position -= 1
            self._peeked = batch
        return self._peeked
