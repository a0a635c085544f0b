"""What the loader yields, and how a batch becomes a loss.

A dict batch is passed as model(**batch) (the transformers convention), a tuple or list as
model(*batch), anything else as model(batch). The loss is `output.loss` (transformers), the
"loss" key of a dict, or the output itself when it is a scalar tensor.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any, Iterator, Optional

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
    """The loader, pass after pass, remembering where it is (epoch, batch within the epoch), and
    able to come back there in another process.

    A shuffling DataLoader draws its order when a pass begins (the iterator's base seed) and at
    its first batch (the sampler's seed or permutation), from the global CPU RNG or from the
    loader's and sampler's own generators; a RandomSampler draws once more when it runs out. So
    the stream keeps the state of every one of those generators at the start of the pass, and a
    resume sets them back, makes the pass's iterator again and replays it to the saved position.
    """

    def __init__(self, loader):
        self.loader = loader
        self.epoch = 0
        self.position = 0
        self.epoch_rng: torch.Tensor | None = None  # the global CPU RNG when this pass began
        self.epoch_generator_states: list[torch.Tensor] = []  # and each of _generators()'s
        self._iterator: Iterator | None = None
        self._one_pass = False  # iter(loader) is loader: a generator, which no one can replay
        self._peeked = None
        self._rng_after_peek: torch.Tensor | None = None
        self._last = None  # the batch consumed last, fingerprinted when a checkpoint is saved

    def _samplers(self) -> list:
        parts = [getattr(self.loader, "sampler", None), getattr(self.loader, "batch_sampler", None)]
        parts.append(getattr(parts[1], "sampler", None))
        return [p for i, p in enumerate(parts) if p is not None and all(p is not q for q in parts[:i])]

    def _generators(self) -> list[torch.Generator]:
        """The generators (besides the global one) that the loader draws its order from."""
        found = []
        for part in (self.loader, *self._samplers()):
            g = getattr(part, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not h for h in found):
                found.append(g)
        return found

    def _new_iterator(self) -> None:
        for sampler in self._samplers():
            if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new order each pass
                sampler.set_epoch(self.epoch)
        self.epoch_rng = torch.get_rng_state()
        self.epoch_generator_states = [g.get_state() for g in self._generators()]
        self._iterator = iter(self.loader)
        self._one_pass = self._iterator is self.loader

    def _fetch(self):
        if self._iterator is None:
            self._new_iterator()
        try:
            return next(self._iterator)
        except StopIteration:
            if self.position == 0:
                raise BatchError("the loader yielded no batches; give fit a loader with data") from None
        self.epoch += 1
        self.position = 0
        self._new_iterator()
        try:
            return next(self._iterator)
        except StopIteration:
            raise BatchError("the loader yielded no batches on its second pass; fit needs "
                             "a loader it can iterate more than once (a DataLoader, a list)") from None

    def __iter__(self):
        return self

    def __next__(self):
        if self._peeked is not None:
            batch, self._peeked = self._peeked, None
            # The probe peeks inside a forked RNG, which undoes the draws the loader made to
            # begin this pass: the next pass would draw them again and repeat this pass's order.
            # They count as in a plain loop, unless something has drawn since.
            if self._rng_after_peek is not None and torch.equal(torch.get_rng_state(), self.epoch_rng):
                torch.set_rng_state(self._rng_after_peek)
            self._rng_after_peek = None
        else:
            batch = self._fetch()
        self.position += 1
        self._last = batch
        return batch

    def peek(self):
        """The next batch, without consuming it."""
        if self._peeked is None:
            begins_pass = self._iterator is None
            self._peeked = self._fetch()
            if begins_pass:
                self._rng_after_peek = torch.get_rng_state()
        return self._peeked

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Where the stream is: JSON-able metadata and tensors (both go into a checkpoint)."""
        if self._one_pass:
            warnings.warn(
                f"the loader is a one-pass iterator ({type(self.loader).__name__}: iter(loader) is "
                "loader), so a run resumed from this checkpoint cannot replay its batches to where "
                "it stopped, and resuming will be refused; pass fit a DataLoader or a list",
                stacklevel=2)
        generators = self._generators()
        meta = {"epoch": self.epoch, "position": self.position, "generators": len(generators),
                "last_batch": None if self._last is None else batch_fingerprint(self._last),
                # what another number of ranks needs to continue this pass (resume_by_samples)
                "batch_size": getattr(self.loader, "batch_size", None), "batches_per_pass": _length(self.loader),
                "sampler": self._sharing()}
        tensors = {"rng_epoch_cpu": self.epoch_rng}
        for i, (g, at_epoch) in enumerate(zip(generators, self.epoch_generator_states)):
            tensors[f"rng_epoch_generator{i}"] = at_epoch
            tensors[f"rng_generator{i}"] = g.get_state()
        return meta, tensors

    def load_state_dict(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Continue where state_dict() was taken: the pass's iterator made again from the same
        generator states and replayed to the saved position, whose last batch must match the
        one the saving run consumed. The caller restores the global RNG after."""
        epoch, position = meta["epoch"], meta["position"]
        if self._one_pass and (epoch or position):
            raise BatchError(
                f"the loader is a one-pass iterator ({type(self.loader).__name__}: iter(loader) is "
                f"loader), so it cannot be replayed to batch {position} of pass {epoch}, where the "
                "checkpoint was saved; resume with a DataLoader or a list of the same batches")
        self._replay(meta, tensors, position)
        saved_last = meta.get("last_batch")
        if saved_last is not None and batch_fingerprint(self._last) != saved_last:
            raise BatchError(
                f"the loader does not yield the same batches as in the run that saved the checkpoint "
                f"(batch {position} of pass {epoch} differs), so the run would continue on other data. "
                "Resume with the same data, batch size and sampler, any torch.Generator seeded as "
                "before, and no randomness in the loader beyond torch's generators; or start afresh.")

    def resume_by_samples(self, meta: dict, tensors: dict[str, torch.Tensor], saved_ranks: int) -> None:
        """Continue a pass that `saved_ranks` ranks were in (one rank's state_dict(): every rank
        was at the same batch), on this loader's number of ranks. A DistributedSampler deals a
        pass's one order out in turn (rank r takes samples r, r + N, ...), so after b batches of
        B samples on N ranks the ranks together have taken the order's first b*B*N samples,
        whatever N: this rank goes on after that many, divided among the new ranks."""
        ours, theirs = self._sharing(), meta.get("sampler")
        fix = ("resume with a DataLoader(dataset, batch_size=..., sampler=DistributedSampler(dataset, "
               "num_replicas=<ranks>, rank=<rank>, seed=..., shuffle=...)) on the same dataset, as saved")
        if ours is None or theirs is None:
            which = "this run's loader" if ours is None else "the loader that saved it"
            raise BatchError(
                f"the checkpoint was saved by {saved_ranks} rank(s) and this run has another number; the data "
                f"position carries over between them only through a DistributedSampler, and {which} has none "
                f"(its batch_size and sampler decide which samples each rank takes): {fix} (one process: "
                "num_replicas=1, rank=0); or resume with the number of ranks that saved it")
        differ = [k for k in ("samples", "shuffle", "seed", "drop_last") if ours[k] != theirs[k]]
        if differ:
            raise BatchError("the DistributedSampler differs from the one that saved the checkpoint ("
                             + ", ".join(f"{k}: {theirs[k]} there, {ours[k]} here" for k in differ)
                             + "), so the pass would continue in another order: " + fix)
        batch, per_pass = self.loader.batch_size, _length(self.loader)
        taken = meta["position"] * meta["batch_size"] * saved_ranks
        if meta["position"] == meta["batches_per_pass"]:  # the pass was over: so it is here
            position = per_pass
        elif taken % (batch * ours["num_replicas"]):
            raise BatchError(
                f"the ranks that saved the checkpoint had taken {taken} samples of pass {meta['epoch']}, which "
                f"{ours['num_replicas']} rank(s) with batch_size {batch} cannot end a batch on: resume with a "
                f"batch_size per rank that divides {taken // ours['num_replicas']} (the saving run's global "
                f"batch, {meta['batch_size'] * saved_ranks}, over the number of ranks keeps every step's data)")
        else:
            position = taken // (batch * ours["num_replicas"])
        self._replay(meta, tensors, position)

    def _replay(self, meta: dict, tensors: dict[str, torch.Tensor], position: int) -> None:
        """Make pass meta["epoch"]'s iterator again from the generator states it began with and
        consume `position` batches of it."""
        epoch = meta["epoch"]
        generators = self._generators()
        if len(generators) != meta.get("generators", 0):
            raise BatchError(
                f"the loader draws its order from {len(generators)} torch.Generator(s), the one that "
                f"saved the checkpoint from {meta.get('generators', 0)}; resume with a loader built as "
                "before")
        torch.set_rng_state(tensors["rng_epoch_cpu"])
        for i, g in enumerate(generators):
            g.set_state(tensors[f"rng_epoch_generator{i}"])
        self.epoch, self.position = epoch, 0
        self._peeked = self._rng_after_peek = self._last = None
        self._new_iterator()
        for _ in range(position):
            try:
                self._last = next(self._iterator)
            except StopIteration:
                raise BatchError(f"the loader now has fewer than {position} batches per pass; resume "
                                 "with the loader the checkpoint was made with") from None
        self.position = position
        for i, g in enumerate(generators):
            g.set_state(tensors[f"rng_generator{i}"])

    def _sharing(self) -> Optional[dict]:
        """How a DistributedSampler shares the passes out (None: the loader has none, or no
        batch_size to count samples by)."""
        sampler = next((s for s in self._samplers() if hasattr(s, "num_replicas") and hasattr(s, "seed")), None)
        if sampler is None or getattr(self.loader, "batch_size", None) is None:
            return None
        return {"num_replicas": sampler.num_replicas, "samples": len(sampler.dataset), "shuffle": sampler.shuffle,
                "seed": sampler.seed, "drop_last": sampler.drop_last}


def _length(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


def batch_fingerprint(batch: Any) -> str:
    """A short hash of a batch (its tensors' dtypes, shapes and bytes, its keys), the same in
    any process: how a resume checks that it replayed the loader to the same place."""
    digest = hashlib.blake2b(digest_size=16)
    _feed(digest, batch)
    return digest.hexdigest()


def _feed(digest, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(x, dict) or (hasattr(x, "keys") and hasattr(x, "__getitem__")):
        for key in x.keys():
            digest.update(f"K{key!r}".encode())
            _feed(digest, x[key])
    elif isinstance(x, (list, tuple)):
        digest.update(f"L{len(x)}".encode())
        for item in x:
            _feed(digest, item)
    elif x is None or isinstance(x, (str, bytes, int, float)):
        digest.update(f"V{x!r}".encode())
    else:  # no bytes known to be the same in another process; the type alone still counts
        digest.update(f"O{type(x).__qualname__}".encode())
