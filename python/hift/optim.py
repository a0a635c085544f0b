"""HiftAdamW: the HiFT method as a torch.optim.Optimizer.

    opt = hift.HiftAdamW(model, group_size=1)
    for batch in loader:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()

The model's units are split into K groups (hift.groups) when the optimizer is made. Each step()
updates one group, the active one, with the fused AdamW over its state (OptimizerState.
update_group), then makes the next group in the rotation (hift.schedule.GroupOrder) the only one
that requires grad, so that the next backward builds no graph below it and writes no other
gradient, and starts bringing that group's state nearer (prefetch, read-ahead). From
construction only the first group requires grad: the first step costs what the others do.

The learning rate is held for a cycle (K steps: every group updated once). step() reads
param_groups[g]["lr"] at the step that starts a cycle and uses those values until the cycle
ends, whatever a scheduler writes in between. A scheduler made for this optimizer therefore
keeps its length in optimizer steps, as it would for any optimizer (a Trainer's warmup_steps
and max_steps mean what they say), and hift samples it once per cycle: cycle c trains at the
scheduler's value at step c*K. Nothing is stretched K-fold: a warm-up of W steps is over after
ceil(W/K) cycles. The other hyperparameters (betas, eps, weight_decay) are read at every step.

Made while a default process group of several ranks is initialized, the optimizer trains
data-parallel (hift.distributed): step() reduces the active group's gradients over the ranks,
updates this rank's shard of the group from its shard of the state, and gathers the weights.
Made on a model sharded with FSDP2 (fully_shard), or with shard_weights (offload_weights), which shard it,
each rank updates its rows of the weights from FSDP's reduced gradient rows and its share of
the state (hift.fsdp); FSDP's next forward gathers them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import warnings

import torch
from torch import Tensor, nn

from hift import distributed, formats, fsdp, fsdp_wrap, ops, resume
from hift.config import OPTIMIZER_FIELDS, Config, ConfigError
from hift.groups import Group, GroupingError, build_groups, trainable_parameters
from hift.memory_plan import MemoryPlan, plan_run, remove_temporary_state_dir
from hift.precision import DTYPES, LossScaler, check_grads, resolve_precision
from hift.resume import MethodState, Source
from hift.schedule import GroupOrder
from hift.state import OptimizerState, StateFormat, chunk_numel, whole

# the Config fields that make the optimizer (the rest belong to fit's loop): hift.config's list
OPTIONS = OPTIMIZER_FIELDS


@dataclass
class StepEvent:
    """What one step() did: HiftAdamW.last_step, and what fit's on_step is called with (the
    update is enqueued, not necessarily done).

    `skipped` is the step's 0-d device flag, never a host bool: 1.0 where the update was skipped
    on a non-finite loss or gradient. Reading it (bool(event.skipped)) waits for the device,
    which the loop does only every log_every steps. fp16 reads it on the host at every step, to
    retry the group: `retried` is that reading (False outside fp16)."""

    step: int  # 0-based: the optimizer's step() calls before this one
    group: int  # the group it updated (or skipped)
    lr: float  # the learning rate it used: its cycle's
    skipped: Tensor  # 0-d device flag, 1.0: the update was skipped (inf or nan)
    loss: Optional[Tensor]  # 0-d, on the device: the loss the step checked (fit's: the mean over its
    # micro-batches, what its flush reads into FitResult.losses); None where step() was given none
    retried: bool  # fp16: the update overflowed and the same group trains at the next step
    loss_finite: bool  # fp16: the unscaled loss was finite (read on the host); True outside fp16
    model: nn.Module
    groups: list[Group]
    state: OptimizerState
    scaler: LossScaler


def model_device(params: list[nn.Parameter]) -> torch.device:
    """The device the trainable parameters sit on (FSDP2's: where their local rows are)."""
    devices = {fsdp.held_device(p) for p in params}
    if len(devices) != 1:
        raise ConfigError(f"the trainable parameters are spread over {sorted(map(str, devices))}; "
                          "hift trains a model that sits on one device: move it with model.to(device)")
    return next(iter(devices))


def compute_device(params: list[nn.Parameter]) -> torch.device:
    """Where the model computes and its inputs go: an FSDP2 model's mesh device (its rows may rest
    on the host, CPUOffloadPolicy), else model_device."""
    return fsdp.mesh_device(params[0].device_mesh) if fsdp.sharded(params) else model_device(params)


def no_decay(p: nn.Parameter) -> bool:
    """Biases and norm weights (every 1-D parameter) take no weight decay."""
    return p.dim() < 2


class HiftAdamW(torch.optim.Optimizer):
    """AdamW that updates one group of the model's units per step; see the module docstring.

    Options are hift.Config's where they apply (hift.config.OPTIMIZER_FIELDS), with the same
    names, defaults and checks: lr, betas, eps, weight_decay (none on 1-D parameters),
    max_grad_norm, group_size, order, units, seed, precision, memory, moment_dtype,
    master_format, state_store, state_dir, offload, prefetch, pin_memory, state_chunk_mib,
    reduce_dtype, shard_weights, offload_weights, loss_scale, loss_scale_growth_interval; or
    config=<a Config>, the options over it. Two differ from fit:
    - max_grad_norm defaults to None: a trainer clips already (the Trainer's max_grad_norm sees
      only the active group's gradients, which is per-group clipping), and torch's optimizers
      do not clip. When set, the active group's gradients are clipped inside the update.
    - example_batch: a batch the model takes, to find its units and check that the loss reaches
      each (fit uses its loader's first batch). A transformers model can do without it (its
      dummy_inputs then order the units).
    A precision other than the weights' casts the model (bf16: the fp32 weights become the
    masters first, so no bit is lost). shard_weights (offload_weights: its rows in host memory)
    then shards it with FSDP2, one FSDP module per unit (hift.fsdp_wrap); a model sharded already
    (fully_shard) trains as it is, in its dtype.

    The model must sit on its device before the optimizer is made. The optimizer owns the
    parameters' requires_grad flags until close(): only the active group's are set. step()
    frees the active group's gradients. A non-finite gradient (or loss, passed to step) skips
    the update on the device, without a host sync: weights and state stay as they were
    (skipped_updates counts them). fp16 weights need the loss scaled: opt.scale_loss(loss)
    .backward(); an overflow then retries the same group on the next step.

    param_groups: one per group, in group order, with its params and param_names and the keys
    lr, betas, eps, weight_decay. state_dict() carries, beside param_groups, the state of the
    method under "hift": a hift.resume.MethodState (per-group step counts, the rotation's
    position, the current cycle's learning rates, the loss scale, the run's fingerprint with its
    seed, the only randomness, and the layout) and every state chunk's bytes (a state_dict taken
    before the first step carries none: the state is then the one any optimizer made on these
    weights holds). A fit checkpoint holds the same MethodState. Loading it resumes bit for bit.
    """

    def __init__(self, model: nn.Module, lr: Optional[float] = None, *, config: Optional[Config] = None,
                 example_batch=None, cast: bool = True, memory_plan: Optional[MemoryPlan] = None, **options):
        """config: a Config to take the options from (its loop fields are ignored), with `lr` and
        `options` over it. cast=False leaves the model in its dtype (fit checks a checkpoint before
        the model changes, and calls cast_model() then). memory_plan: fit's (the config's memory
        options then filled already); without one, memory="auto" plans here."""
        if lr is not None:
            options["lr"] = lr
        self._build(model, optimizer_config(config, **options), example_batch, memory_plan)
        if cast:
            self.cast_model()

    def _build(self, model: nn.Module, cfg: Config, example_batch, memory_plan: Optional[MemoryPlan] = None) -> None:
        trainable = trainable_parameters(model)
        probe_device = compute_device(trainable)
        sharded = fsdp.sharded(trainable)
        if sharded and cfg.hift_shards:
            raise ConfigError("shard_weights / offload_weights make hift shard the model, and it is sharded already "
                              "(fully_shard): drop them (offload: fully_shard(..., offload_policy=CPUOffloadPolicy()))")
        if memory_plan is None:  # HiftAdamW alone: it cannot recompute the model's activations
            world = distributed.dist.get_world_size() if distributed.active() else 1
            cfg, memory_plan = plan_run(cfg, model, example_batch if example_batch is not None
                                        else getattr(model, "dummy_inputs", None), probe_device,
                                        resolve_precision(cfg.precision, trainable), world, can_recompute=False)
            if memory_plan.choice is not None:
                print(memory_plan.choice.line())
        self.memory_plan = memory_plan
        # FSDP2: the mesh (the model's, or a new one over every rank: refused without a process
        # group); after the plan, which may choose shard_weights
        mesh = fsdp.check_sharding(trainable, [n for n, p in model.named_parameters() if p.requires_grad]) \
            if sharded else fsdp_wrap.default_mesh(cfg) if cfg.hift_shards else None
        groups = build_groups(model, cfg.units, cfg.group_size, example_batch, probe_device)
        if memory_plan.note and memory_plan.prediction is None and cfg.memory == "auto":
            warnings.warn(memory_plan.note, stacklevel=3)  # (after the probe, which refuses a bad batch in words)
        self._ready = False
        self._gate = resume.ShardGate()
        super().__init__([{"params": list(zip(g.names, g.params))} for g in groups],
                         dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay))
        self._ready = True
        # device: where the model computes (its inputs, the loss); update_device: where the weights
        # (FSDP2: this rank's rows) are updated and the state is used, the host under CPU offload
        self.model, self.config, self.groups = model, cfg, groups
        self.device = fsdp.mesh_device(mesh) if mesh is not None else probe_device
        self.update_device = fsdp_wrap.shard_device(mesh, cfg.offload_weights) if cfg.hift_shards else \
            model_device(trainable)
        self.precision = resolve_precision(cfg.precision, trainable)
        self.dtype = DTYPES[self.precision]
        if sharded and any(p.dtype != self.dtype for p in trainable):
            raise ConfigError(
                f"the model is sharded by FSDP2 in {sorted({str(p.dtype) for p in trainable})} and the run's precision "
                f"is {self.precision}: hift casts no sharded weight. Cast the model to {self.dtype} before fully_shard, "
                "or pass shard_weights=True on the unsharded model so that hift shards it (after taking fp32 masters)")
        # shard_weights / offload_weights: the units' FSDP modules (refused in words here), sharded
        # in cast_model; the state is made where the shards will be
        self._shard_plan = fsdp_wrap.plan(model, groups) if cfg.hift_shards else None
        self._mesh = mesh
        device = self.update_device
        self.max_grad_norm = cfg.max_grad_norm
        self.prefetch = cfg.prefetch
        offload = cfg.offload if cfg.offload is not None else device.type != "cpu"
        # The state is made before the cast so an fp32 model's masters keep every bit it had.
        state_format = StateFormat(formats.master_format(self.dtype, cfg.master_format), cfg.moment_dtype)
        state_dir = cfg.state_dir if cfg.state_store == "disk" else None
        # FSDP2 (a sharded model, or hift shards it): each rank holds the state of its rows of every
        # parameter and reads weights and gradients through their local rows (hift.fsdp). Data
        # parallel (a default process group of several ranks): every rank starts from rank 0's
        # weights and holds its shard of each group's state (hift.distributed).
        self.dp: Optional[distributed.Ranks] = None
        shard, local = None, whole
        if mesh is not None:
            self.dp = fsdp.ShardedParallel([[p.shape for p in g.params] for g in groups], state_format.cut, device, mesh)
            local = fsdp.local_of
        elif distributed.active():
            self.dp = distributed.DataParallel([[p.numel() for p in g.params] for g in groups], state_format.cut,
                                               device, DTYPES[cfg.reduce_dtype])
            self.dp.broadcast_model(model)
        if self.dp is not None:
            shard = self.dp.chunks(chunk_numel(state_format, cfg.state_chunk_mib))
            if state_dir is not None:
                state_dir = str(Path(state_dir) / f"rank-{self.dp.rank:05d}")
        self.group_state = OptimizerState(groups, device, state_format, offload, cfg.pin_memory,
                                          cfg.state_chunk_mib, cfg.seed, state_dir=state_dir, shard=shard,
                                          local=local)
        self.scaler = LossScaler(device, enabled=self.precision == "fp16", init_scale=cfg.loss_scale,
                                 growth_interval=cfg.loss_scale_growth_interval)
        self.order = GroupOrder(len(groups), cfg.order, cfg.seed)
        self.steps_taken = 0  # step() calls, skipped ones included
        self.last_step: Optional[StepEvent] = None
        self._cycle_lrs: Optional[list[float]] = None  # read at the step that starts a cycle
        self._lrs = torch.zeros(len(groups), dtype=torch.float32, device=device)
        self._skipped = torch.zeros((), dtype=torch.float32, device=device)
        self._scaled = False  # fp16: scale_loss was called since the last step
        self._prefetched: Optional[int] = None  # the chunk a prefetch brought in, not yet acquired
        for p in (p for g in groups for p in g.params):
            p.requires_grad_(False)
        # FSDP2's backward would all-gather the module below the active group (hift.fsdp)
        self._backward_stop = fsdp.BackwardStop(model, groups) if sharded else None
        self._arm()

    # ------------------------------------------------------------------------ the method

    @property
    def active_group(self) -> int:
        """The group the next step() updates; only its parameters require grad."""
        return self.order.current

    @property
    def rank_and_world(self) -> tuple[int, int]:
        """This process's rank and the number of ranks (data parallel), else (0, 1)."""
        return (self.dp.rank, self.dp.world) if self.dp is not None else (0, 1)

    @property
    def cycle(self) -> int:
        """Cycles completed (a cycle: every group updated once)."""
        return self.order.cycle

    def cast_model(self) -> None:
        """Cast the model to the run's precision, the trained weights rounded as their masters'
        format says (a no-op when it is there already); with shard_weights or offload_weights,
        then shard it."""
        if any(p.dtype != self.dtype for g in self.groups for p in g.params):
            self.group_state.cast_weights(self.dtype)
            self.model.to(self.dtype)  # the rest
        if self._shard_plan is not None:
            fsdp_wrap.shard(self.model, self._shard_plan, self.groups, self._mesh, self.config.offload_weights)
            self._shard_plan = None
            for options, group in zip(self.param_groups, self.groups):
                options["params"] = group.params
            params = [p for g in self.groups for p in g.params]
            fsdp.check_sharding(params, self._names())
            if model_device(params) != self.update_device:
                raise RuntimeError(f"fully_shard put the weights on {model_device(params)}, and hift's state is on "
                                   f"{self.update_device}: call torch.cuda.set_device(local_rank) before making the "
                                   "optimizer")
            for p in params:  # (fully_shard's parameters keep the flags; the active group's, to be sure)
                p.requires_grad_(False)
            for p in self.groups[self.order.current].params:
                p.requires_grad_(True)
            self._backward_stop = fsdp.BackwardStop(self.model, self.groups)
            self._backward_stop.arm(self.order.current)

    def _names(self) -> list[str]:
        return [name for g in self.groups for name in g.names]

    def scale_loss(self, loss: Tensor) -> Tensor:
        """The loss to call backward on: multiplied by the loss scale in fp16, as it is otherwise."""
        self._scaled = True
        return self.scaler.scale_loss(loss)

    def _arm(self) -> None:
        """The active group alone requires grad; its state (first chunk) starts coming in behind
        any copy-out in flight, and the disk store reads the following group's from its file."""
        g = self.order.current
        for p in self.groups[g].params:
            p.requires_grad_(True)
        if self._backward_stop is not None:
            self._backward_stop.arm(g)
        if self.prefetch:
            first = self.group_state.chunks_of[g][0]
            self.group_state.prefetch(first)
            self._prefetched = first
            self.group_state.read_ahead(self.order.following)

    def _begin_cycle(self, lrs: Optional[list[float]] = None) -> None:
        """Hold each group's learning rate for the cycle: `lrs`, or param_groups' now."""
        self._cycle_lrs = [float(lr) for lr in lrs] if lrs is not None else [float(pg["lr"]) for pg in self.param_groups]
        if len(set(self._cycle_lrs)) == 1:
            self._lrs.fill_(self._cycle_lrs[0])
        else:
            for g, lr in enumerate(self._cycle_lrs):
                self._lrs[g].fill_(lr)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *, loss: Optional[Tensor] = None):
        """Update the active group from its gradients, then arm the next one. `loss` (or the
        closure's result), when given, is checked too: a non-finite loss skips the update."""
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            if loss is None and isinstance(result, Tensor):
                loss = result.detach()
        self._gate.check(self.dp)
        g = self.order.current
        group, options = self.groups[g], self.param_groups[g]
        if fsdp.held_device(group.params[0]) != self.update_device:
            raise RuntimeError(
                f"the model moved to {fsdp.held_device(group.params[0])} after HiftAdamW was made on "
                f"{self.update_device}; "
                "make the optimizer after model.to(device)")
        if self.scaler.enabled and not self._scaled and any(p.grad is not None for p in group.params):
            raise RuntimeError("fp16 weights train with a loss scale: call opt.scale_loss(loss).backward() "
                               "(or train in bf16, which needs none)")
        if self._cycle_lrs is None or self.order.position == 0:
            self._begin_cycle()
        grad_of = None
        if self.dp is not None:  # the mean gradient's shard, the global norm and skip flag
            check, has_grad = self.dp.reduce(g, group.params, loss, self.scaler, self.max_grad_norm)
            reached = any(has_grad)
            grad_of = self.dp.grad_of(g)
        else:
            grads = [p.grad for p in group.params]
            reached = any(grad is not None for grad in grads)
            norm_sq = (ops.grad_norm_sq(grads, [p.numel() for p in group.params]) if reached
                       else torch.zeros((), device=self.update_device))
            check = check_grads(norm_sq, loss.float() if loss is not None else None, self.scaler, self.max_grad_norm)
        if reached:  # a batch that reaches none of g's parameters leaves g as it was
            self._prefetched = None  # update_group acquires and releases it
            step_count = self.group_state.steps.select(0, g)
            step_count.add_(1.0 - check.found_inf)
            self.group_state.update_group(
                g, lr=self._lrs.select(0, g), step=step_count, betas=tuple(options["betas"]), eps=options["eps"],
                weight_decays=[0.0 if no_decay(p) else options["weight_decay"] for p in group.params],
                grad_scale=check.grad_scale, found_inf=check.found_inf, grad_of=grad_of)
            if self.dp is not None:
                self.dp.gather_weights(g, group.params)
        else:  # the prefetched chunk holds a device slot (and a staging slot): give it back
            self._release_prefetch()
        for p in group.params:
            p.grad = None
            p.requires_grad_(False)
        self.scaler.update(check.found_inf)
        self._skipped += check.found_inf
        self._scaled = False
        retried, loss_finite = False, True
        if self.scaler.enabled:
            # fp16 reads its flags on the host (to retry the same group on the next batch), once
            # the update and the copy-out are enqueued.
            skipped, finite = torch.stack([check.found_inf, check.loss_finite.float()]).tolist()
            retried, loss_finite = bool(skipped), bool(finite)
        info = StepEvent(self.steps_taken, g, self._cycle_lrs[g], check.found_inf, loss, retried, loss_finite,
                         self.model, self.groups, self.group_state, self.scaler)
        if not retried:
            self.order.advance()
        self.steps_taken += 1
        self.last_step = info
        self._arm()
        return result

    @property
    def skipped_updates(self) -> int:
        """Updates skipped on a non-finite gradient or loss so far (reading it waits for the device)."""
        return int(self._skipped.item())

    def add_param_group(self, param_group: dict) -> None:
        if self._ready:
            raise NotImplementedError("HiftAdamW's groups are the model's units, fixed when it is made; "
                                      "make a new HiftAdamW to train other parameters")
        super().add_param_group(param_group)

    def close(self) -> None:
        """Wait for the copies and writes in flight, let go of the state's buffers (pinned
        memory, I/O threads) and give every trained parameter requires_grad back; remove the
        state's folder if memory="auto" made it. Idempotent; the optimizer cannot step after it."""
        self.group_state.close()
        remove_temporary_state_dir(self.memory_plan)
        if self._backward_stop is not None:
            self._backward_stop.arm(None)
        for p in (p for g in self.groups for p in g.params):
            p.requires_grad_(True)

    # ------------------------------------------------------------------ saving and loading

    def fingerprint(self) -> dict:
        """What a resumed run must share with the run that saved: the groups and the state's
        formats, and the rotation (another order or seed would silently train other groups).
        The number of ranks and the chunking may differ: the state is re-cut as it loads."""
        state = self.group_state
        return {"groups": [g.names for g in self.groups], "master": state.format.master,
                "moments": state.format.moments, "precision": self.precision, "order": self.config.order,
                "seed": self.config.seed}

    def differences(self, saved: MethodState) -> Optional[str]:
        """How a saved state's run differs from this one, in words (None: it does not)."""
        return resume.differences(self.fingerprint(), saved.run)

    @property
    def awaiting_own_shard(self) -> bool:
        """Another rank's shard was loaded (all but its chunks), and this rank's own has not come:
        step() refuses until load_state_dict(its own) or load_sharded_state_dicts(every rank's)."""
        return self._gate.waiting

    def method_state(self) -> MethodState:
        """The method's state as plain data, all but the chunks' bytes (waits for the copies in flight)."""
        state = self.group_state
        state.synchronize()
        rank, world = self.rank_and_world
        return MethodState(run=self.fingerprint(), steps=state.steps.tolist(), order=self.order.state_dict(),
                           cycle_lrs=self._cycle_lrs, scaler=self.scaler.state_dict(), steps_taken=self.steps_taken,
                           skipped=float(self._skipped), rank=rank, world=world, layout=state.layout())

    def save_chunks(self, write: Callable[[int, Tensor], None]) -> None:
        """Hand each state chunk's resting bytes to write(c, bytes), one chunk at a time."""
        self.group_state.save_chunks(write)

    def load_method_state(self, saved: Sequence[tuple[MethodState, Optional[Sequence[Source]]]],
                          wrap_reader: Optional[Callable[[Callable[[int], Tensor]], Callable[[int], Tensor]]] = None
                          ) -> None:
        """Load what one or every rank of a run saved: each its MethodState and its chunks (safetensors
        files or bytes; None: saved before a first step, so none). This rank's chunks come from
        them where they hold its elements (its own shard, one process's state, or every rank's),
        re-cut where the layout differs; else all but the chunks loads (the ranks must train the
        same group) and step() refuses until this rank's own arrive. wrap_reader(read) wraps
        the chunk reader (a progress bar). The caller checked differences() first."""
        methods = [method for method, _ in saved]
        method = min(methods, key=lambda m: m.rank)
        rank, world = self.rank_and_world
        read_chunk, foreign = None, None
        if all(chunks is not None for _, chunks in saved):
            if resume.covers(methods, rank, world, self.group_state.layout()):
                read_chunk = resume.chunk_reader(self.group_state, saved, rank, world)
                read_chunk = wrap_reader(read_chunk) if wrap_reader is not None else read_chunk
            else:
                foreign = method.rank
        elif self.steps_taken:
            raise ValueError("this state was saved before its first step, so it carries no optimizer "
                             "state, and this HiftAdamW has stepped: make a fresh HiftAdamW to load it")
        self._release_prefetch()
        for p in (p for g in self.groups for p in g.params):
            p.requires_grad_(False)
        if read_chunk is not None:
            self.group_state.load_chunks(read_chunk)
        self.group_state.steps.copy_(torch.tensor(method.steps, dtype=torch.float32))
        self.order.load_state_dict(method.order)
        self.scaler.load_state_dict(method.scaler)
        self.steps_taken = int(method.steps_taken)
        self._skipped.fill_(method.skipped)
        self._cycle_lrs = None
        if method.cycle_lrs is not None:
            self._begin_cycle(method.cycle_lrs)
        self._gate.loaded(foreign, method.world)
        self._arm()

    def _release_prefetch(self) -> None:
        """Give back the slot a prefetched chunk holds, copied back out with the bytes it came
        with: before a load (it would keep its old bytes) and after a step that did not update
        its group (the next _arm needs the slot)."""
        if self._prefetched is not None:
            self.group_state.acquire(self._prefetched)
            self.group_state.release(self._prefetched)
            self._prefetched = None

    def state_dict(self) -> dict[str, Any]:
        """torch's, with the method's state under "hift": a MethodState's fields and "chunks", each
        chunk's bytes (None before the first step: the state is then the one any optimizer made
        on these weights holds). Plain data: it loads with torch.load(weights_only=True)."""
        saved = super().state_dict()
        state = self.group_state
        saved["hift"] = self.method_state().to_dict()
        saved["hift"]["chunks"] = ([state.storage(c).view(torch.uint8) for c in range(len(state.chunks))]
                                   if self.steps_taken else None)
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict() of this run: this rank's own shard, or one process's whole state
        on any number of ranks or state_chunk_mib (each rank cuts its share out). Another rank's
        shard loads all but the chunks (a 🤗 Trainer hands every rank rank 0's optimizer.pt), and
        step() refuses until this rank's own arrive (awaiting_own_shard): load_state_dict(its
        own), or load_sharded_state_dicts(every saving rank's) where the number of ranks changed."""
        method, chunks = self._saved_of(state_dict)
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        self.load_method_state([(method, chunks)])

    def load_sharded_state_dicts(self, state_dicts: Sequence[dict[str, Any]]) -> None:
        """Load every rank's state_dict() of a data-parallel run (in any order; torch.load them
        with mmap=True, so that only what this rank takes is read) on any number of ranks: this
        rank's share is cut out of their shards."""
        saved = [self._saved_of(sd) for sd in state_dicts]
        world = saved[0][0].world
        if sorted(m.rank for m, _ in saved) != list(range(world)) or any(c is None for _, c in saved):
            raise ValueError(f"pass every rank's state_dict of the run, each saved after its first step: "
                             f"{world} rank(s) saved it, {len(saved)} were given")
        super().load_state_dict({"state": {}, "param_groups": state_dicts[0]["param_groups"]})
        self.load_method_state(saved)

    def _saved_of(self, state_dict: dict[str, Any]) -> tuple[MethodState, Optional[list[Tensor]]]:
        """A state_dict's MethodState and chunks, refused unless it is this run's, in this format."""
        saved = state_dict.get("hift")
        if saved is None:
            raise ValueError("this state_dict is not a HiftAdamW's (it has no 'hift' entry)")
        method = MethodState.from_dict(saved, "this state_dict")
        differ = self.differences(method)
        if differ:
            raise ValueError(f"this state_dict was saved by a HiftAdamW of another run ({differ}); load it "
                             "into one made with the same model, group_size, precision, state formats, "
                             "order and seed")
        return method, saved["chunks"]


def optimizer_config(config: Optional[Config] = None, **options) -> Config:
    """The Config of HiftAdamW's options: `config`'s (its loop fields are ignored) with `options`
    over them. Without a config, max_grad_norm defaults to None (see HiftAdamW)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"HiftAdamW got unexpected option(s) {unknown}: its options are {', '.join(OPTIONS)} "
                        "(hift.Config's; the others belong to hift.fit's loop)")
    if config is None:
        options = {"max_grad_norm": None, **options}
    return Config.build(config, **options)


def _signature() -> inspect.Signature:
    """HiftAdamW(model, lr, *, <every option with its default>, config, example_batch, cast, memory_plan),
    from Config."""
    defaults, P = optimizer_config(), inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD), P("model", P.POSITIONAL_OR_KEYWORD),
              P("lr", P.POSITIONAL_OR_KEYWORD, default=defaults.lr)]
    params += [P(name, P.KEYWORD_ONLY, default=getattr(defaults, name)) for name in OPTIONS if name != "lr"]
    params += [P("config", P.KEYWORD_ONLY, default=None), P("example_batch", P.KEYWORD_ONLY, default=None),
               P("cast", P.KEYWORD_ONLY, default=True), P("memory_plan", P.KEYWORD_ONLY, default=None)]
    return inspect.Signature(params)


HiftAdamW.__init__.__signature__ = _signature()
