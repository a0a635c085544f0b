"""fit(model, loader, ...): the HiFT training loop. It orchestrates; the math lives in ops,
the bytes move in state, the rotation is decided in schedule."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from hift import ops
from hift.batches import BatchStream, compute_loss, probe, to_device
from hift.config import Config, ConfigError
from hift.groups import Group, GroupingError, detect_units, make_groups, units_from_user
from hift.memory import peak_memory_bytes, reset_peak_memory
from hift.precision import DTYPES, LossScaler, resolve_precision
from hift.schedule import GroupOrder, lr_at_cycle
from hift.state import OptimizerState


class NonFiniteLossError(FloatingPointError):
    """The loss became inf or nan in fp32/bf16, where no loss scale can explain it."""


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)  # one per step (mean over micro-batches)
    lrs: list[float] = field(default_factory=list)  # the learning rate each step used
    groups: list[int] = field(default_factory=list)  # the group each step trained
    skipped_steps: int = 0  # fp16 overflows: update skipped, scale lowered, group retried
    steps: int = 0
    cycles: int = 0  # completed cycles
    num_groups: int = 0
    precision: str = "fp32"
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0

    @property
    def median_step_seconds(self) -> float:
        s = sorted(self.step_seconds)
        return s[len(s) // 2] if s else 0.0


@dataclass
class StepEvent:
    """What `on_step` sees after each step (the update is enqueued, not necessarily done)."""

    step: int  # 0-based index of the step just taken
    group: int
    lr: float
    skipped: bool
    model: nn.Module
    groups: list[Group]
    state: OptimizerState
    scaler: LossScaler


@dataclass
class Plan:
    """How long the run is: steps to take and the cycles the LR schedule spans."""

    max_steps: Optional[int]
    max_cycles: Optional[int]
    schedule_cycles: int


def plan_length(cfg: Config, loader, num_groups: int) -> Plan:
    if cfg.num_cycles is not None:
        return Plan(cfg.max_steps, cfg.num_cycles, cfg.num_cycles)
    if cfg.max_steps is not None:
        return Plan(cfg.max_steps, None, math.ceil(cfg.max_steps / num_groups))
    try:
        batches = len(loader)
    except TypeError:
        raise ConfigError("the loader has no length, so fit cannot count epochs: pass num_cycles "
                          "or max_steps") from None
    steps = max(1, cfg.epochs * batches // cfg.accum_steps)
    return Plan(steps, None, math.ceil(steps / num_groups))


def build_groups(model: nn.Module, cfg: Config, first_batch) -> list[Group]:
    if cfg.units is not None:
        units = units_from_user(model, cfg.units)
    else:
        units = detect_units(model, lambda: compute_loss(model, first_batch))
    return make_groups(units, cfg.group_size)


def model_device(params: list[nn.Parameter]) -> torch.device:
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ConfigError(f"the trainable parameters are spread over {sorted(map(str, devices))}; "
                          "hift trains a model that sits on one device: move it with model.to(device)")
    return next(iter(devices))


def no_decay(p: nn.Parameter) -> bool:
    """Biases and norm weights (every 1-D parameter) take no weight decay."""
    return p.dim() < 2


def fit(model: nn.Module, loader, config: Optional[Config] = None, **options) -> FitResult:
    """Fine-tune `model` on `loader` with HiFT and return the loss history and timings.

    Options are the fields of `hift.Config` (pass a Config, keyword options, or both: keywords
    win). The model trains in place; its requires_grad flags and train/eval mode are restored
    at the end.
    """
    cfg = Config.build(config, **options)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise GroupingError("the model has no trainable parameters (every requires_grad is False)")
    device = model_device(trainable)
    stream = BatchStream(loader)
    first = to_device(stream.peek(), device)
    was_training = model.training
    model.train()
    probe(model, first)
    groups = build_groups(model, cfg, first)
    plan = plan_length(cfg, loader, len(groups))

    precision = resolve_precision(cfg.precision, trainable)
    dtype = DTYPES[precision]
    with_master = dtype != torch.float32
    offload = cfg.offload if cfg.offload is not None else device.type != "cpu"
    # The state is made before the cast so an fp32 model's masters keep every bit it had.
    state = OptimizerState(groups, device, with_master, offload, cfg.pin_memory)
    if any(p.dtype != dtype for p in trainable):
        model.to(dtype)
    scaler = LossScaler(device, enabled=precision == "fp16", init_scale=cfg.loss_scale,
                        growth_interval=cfg.loss_scale_growth_interval)
    order = GroupOrder(len(groups), cfg.order, cfg.seed)
    trainer = _Trainer(model, cfg, groups, state, scaler, order, plan, device)
    try:
        return trainer.run(stream, precision)
    finally:
        for p in trainable:
            p.requires_grad_(True)
            p.grad = None
        model.train(was_training)


class _Trainer:
    def __init__(self, model, cfg: Config, groups, state: OptimizerState, scaler: LossScaler,
                 order: GroupOrder, plan: Plan, device):
        self.model, self.cfg, self.groups, self.state = model, cfg, groups, state
        self.scaler, self.order, self.plan, self.device = scaler, order, plan, device
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.weight_decays = [[0.0 if no_decay(p) else cfg.weight_decay for p in g.params] for g in groups]
        self._pending_losses: list[tuple[int, int, torch.Tensor]] = []

    def done(self, steps: int) -> bool:
        if self.plan.max_steps is not None and steps >= self.plan.max_steps:
            return True
        return self.plan.max_cycles is not None and self.order.cycle >= self.plan.max_cycles

    def lr_of_cycle(self, cycle: int) -> float:
        return lr_at_cycle(cycle, base_lr=self.cfg.lr, schedule=self.cfg.lr_schedule,
                           total_cycles=self.plan.schedule_cycles, warmup_cycles=self.cfg.warmup_cycles)

    def run(self, stream: BatchStream, precision: str) -> FitResult:
        result = FitResult(num_groups=len(self.groups), precision=precision)
        for p in (p for g in self.groups for p in g.params):
            p.requires_grad_(False)
        total = self.plan.max_steps or self.plan.max_cycles * len(self.groups)
        bar = _progress(self.cfg.progress, total)
        reset_peak_memory(self.device)
        start = time.perf_counter()
        lr_value = self.lr_of_cycle(self.order.cycle)
        self.lr.fill_(lr_value)
        self.state.prefetch(self.order.current)
        while not self.done(result.steps):
            tick = time.perf_counter()
            g = self.order.current
            skipped = self.step(g, stream, result.steps)
            result.groups.append(g)
            result.lrs.append(lr_value)
            result.steps += 1
            if skipped:
                result.skipped_steps += 1
            elif self.order.advance():
                lr_value = self.lr_of_cycle(self.order.cycle)
                self.lr.fill_(lr_value)
            if self.cfg.on_step is not None:
                self.cfg.on_step(StepEvent(result.steps - 1, g, result.lrs[-1], skipped,
                                           self.model, self.groups, self.state, self.scaler))
            if result.steps % self.cfg.log_every == 0:
                self.flush_losses(result, bar)
            result.step_seconds.append(time.perf_counter() - tick)
            bar.update(1)
        self.flush_losses(result, bar)
        self.state.synchronize()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        bar.close()
        result.seconds = time.perf_counter() - start
        result.cycles = self.order.cycle
        result.peak_memory_bytes = peak_memory_bytes(self.device)
        return result

    def step(self, g: int, stream: BatchStream, step_index: int) -> bool:
        """Train group g on accum_steps micro-batches; True when the update was skipped."""
        group = self.groups[g]
        params = group.params
        for p in params:
            p.requires_grad_(True)
        if self.cfg.prefetch:
            self.state.prefetch(self.order.upcoming)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for _ in range(self.cfg.accum_steps):
            batch = to_device(next(stream), self.device)
            loss = compute_loss(self.model, batch)
            (self.scaler.scale_loss(loss) / self.cfg.accum_steps).backward()
            loss_sum += loss.detach().float()
        loss_mean = loss_sum / self.cfg.accum_steps
        self._pending_losses.append((step_index, g, loss_mean))

        used = [i for i, p in enumerate(params) if p.grad is not None]
        grads = [params[i].grad for i in used]
        found_inf, grad_scale = self.check_and_scale(grads, loss_mean)
        step_count = self.state.steps.select(0, g)
        step_count.add_(1.0 - found_inf)
        buffers = self.state.acquire(g)
        pick = lambda views: [views[i] for i in used] if views else views
        ops.adamw_(
            [params[i] for i in used], pick(buffers.masters), pick(buffers.exp_avgs),
            pick(buffers.exp_avg_sqs), grads, lr=self.lr, step=step_count,
            beta1=self.cfg.betas[0], beta2=self.cfg.betas[1], eps=self.cfg.eps,
            weight_decays=[self.weight_decays[g][i] for i in used],
            grad_scale=grad_scale, found_inf=found_inf,
        )
        self.state.release(g)
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        self.scaler.update(found_inf)
        # Only fp16 needs the flag on the host (to retry the same group on the next batch);
        # it is read after the update and the copy-out are enqueued.
        return self.scaler.enabled and bool(found_inf.item())

    def check_and_scale(self, grads, loss):
        """The overflow flag and the one multiplier the fused update applies to every grad
        (the inverse loss scale times the clip coefficient), both left on the device."""
        if not grads:
            return torch.zeros((), device=self.device), None
        if not (self.cfg.clipping or self.scaler.enabled):
            return (~torch.isfinite(loss)).float(), None
        norm_sq = ops.grad_norm_sq(grads)
        # inf or nan anywhere in the grads makes their squared norm non-finite (fp16 squares
        # cannot overflow an fp32 sum), so one read pass both detects and measures.
        found_inf = (~torch.isfinite(norm_sq)).float()
        inv_scale = self.scaler.inv_scale()
        grad_scale = inv_scale
        if self.cfg.clipping:
            norm = norm_sq.sqrt() * inv_scale
            clip = (self.cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            grad_scale = inv_scale * clip
        return found_inf, grad_scale

    def flush_losses(self, result: FitResult, bar) -> None:
        """Bring the pending losses to the host: the one host sync, every log_every steps."""
        if not self._pending_losses:
            return
        values = torch.stack([loss for _, _, loss in self._pending_losses]).tolist()
        for (step_index, g, _), value in zip(self._pending_losses, values):
            if not math.isfinite(value) and not self.scaler.enabled:
                self._pending_losses = []
                raise NonFiniteLossError(
                    f"the loss became {value} at step {step_index} while training "
                    f"{self.groups[g].describe()}; that update was skipped, so the weights hold "
                    "the last good state. Lower lr, check the data at that step, or use fp32."
                )
        result.losses.extend(values)
        self._pending_losses = []
        bar.set_postfix(loss=f"{values[-1]:.4f}", refresh=False)


def _progress(enabled: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", desc="hift")
