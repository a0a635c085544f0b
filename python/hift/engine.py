"""fit(model, loader, ...): the HiFT training loop. It orchestrates; the math lives in ops,
the bytes move in state, the rotation is decided in schedule, checkpoints are written by
checkpoint."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from hift import checkpoint, formats
from hift.batches import BatchStream, compute_loss, probe, to_device
from hift.config import Config, ConfigError
from hift.groups import Group, GroupingError, check_units_reached, detect_units, make_groups, units_from_user
from hift.memory import peak_memory_bytes, reset_peak_memory
from hift.precision import DTYPES, LossScaler, check_grads, resolve_precision
from hift.recompute import recompute_blocks
from hift.schedule import GroupOrder, lr_at_cycle
from hift.state import OptimizerState, StateFormat

# 2: the data stream keeps its own state (data.* tensors); 3: state chunks are raw bytes in
# their formats (hift.formats), not fp32
CHECKPOINT_FORMAT = 3


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became inf or nan where no loss scale explains it (fp32, bf16, a
    non-finite unscaled loss in fp16), or fp16 overflowed max_consecutive_skips times in a row.
    The update that saw it was skipped: no inf or nan reaches a weight or the optimizer state.
    `result` is the FitResult up to the stop."""

    result: "FitResult"


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)  # one per step (mean over micro-batches)
    lrs: list[float] = field(default_factory=list)  # the learning rate each step used
    groups: list[int] = field(default_factory=list)  # the group each step trained
    skipped_steps: int = 0  # updates skipped on a non-finite loss or gradient (fp16: then retried)
    steps: int = 0
    cycles: int = 0  # completed cycles
    num_groups: int = 0
    precision: str = "fp32"
    seconds: float = 0.0  # this call's wall time (a resumed run counts from its resume)
    step_seconds: list[float] = field(default_factory=list)  # this call's steps
    peak_memory_bytes: int = 0
    checkpoint: Optional[Path] = None  # the last checkpoint written, if any

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
    found_inf: torch.Tensor  # 0-d device flag: 1.0 when the update was skipped
    model: nn.Module
    groups: list[Group]
    state: OptimizerState
    scaler: LossScaler

    @property
    def skipped(self) -> bool:
        """Whether the update was skipped (a non-finite loss or gradient); reading it waits for
        the device, so the loop itself never does outside fp16."""
        return bool(self.found_inf.item())


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
    """Groups of the model; the probe forward on the first batch also checks that the model
    takes what the loader yields and that the loss reaches every unit, before anything changes."""
    reached = None

    def run_probe():
        nonlocal reached
        reached = probe(model, first_batch)

    if cfg.units is not None:
        run_probe()
        units = units_from_user(model, cfg.units)
    else:
        units = detect_units(model, run_probe)
    check_units_reached(units, reached)
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
    at the end. With save_dir set, checkpoints are written every save_every steps and at the
    end; resume_from=<save_dir or checkpoint> continues a run exactly where it stopped.
    """
    cfg = Config.build(config, **options)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise GroupingError("the model has no trainable parameters (every requires_grad is False)")
    device = model_device(trainable)
    resume = checkpoint.read(cfg.resume_from) if cfg.resume_from is not None else None
    stream = BatchStream(loader)
    was_training = model.training
    trainer = None
    try:
        trainer = _prepare(model, cfg, trainable, device, stream, loader, resume)
        with recompute_blocks(model, cfg.recompute_activations):
            return trainer.run()
    finally:
        if trainer is not None:
            trainer.state.close()  # waits for the copies and writes in flight, then lets go
        for p in trainable:
            p.requires_grad_(True)
            p.grad = None
        model.train(was_training)


def _prepare(model, cfg: Config, trainable, device, stream: BatchStream, loader, resume) -> "_Trainer":
    """Groups, state, scaler and schedule; then the trainer loads (see _Trainer.load)."""
    # The probe runs in eval mode on a forked RNG: it must not update batch-norm statistics
    # or consume the random numbers that dropout and shuffling will draw.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.eval()
        groups = build_groups(model, cfg, to_device(stream.peek(), device))
    model.train()
    plan = plan_length(cfg, loader, len(groups))

    precision = resolve_precision(cfg.precision, trainable)
    dtype = DTYPES[precision]
    offload = cfg.offload if cfg.offload is not None else device.type != "cpu"
    # The state is made before the cast so an fp32 model's masters keep every bit it had.
    state_format = StateFormat(formats.master_format(dtype, cfg.master_format), cfg.moment_dtype)
    state = OptimizerState(groups, device, state_format, offload, cfg.pin_memory, cfg.state_chunk_mib, cfg.seed,
                           state_dir=cfg.state_dir if cfg.state_store == "disk" else None)
    scaler = LossScaler(device, enabled=precision == "fp16", init_scale=cfg.loss_scale,
                        growth_interval=cfg.loss_scale_growth_interval)
    trainer = _Trainer(model, cfg, groups, state, scaler, GroupOrder(len(groups), cfg.order, cfg.seed),
                       plan, device, stream, precision)
    try:
        trainer.load(resume, trainable, dtype)
    except BaseException:
        state.close()  # nothing else holds it yet: its pinned memory and I/O threads go now
        raise
    return trainer


class _Trainer:
    def __init__(self, model, cfg: Config, groups, state: OptimizerState, scaler: LossScaler,
                 order: GroupOrder, plan: Plan, device, stream: BatchStream, precision: str):
        self.model, self.cfg, self.groups, self.state = model, cfg, groups, state
        self.scaler, self.order, self.plan, self.device = scaler, order, plan, device
        self.stream = stream
        self.result = FitResult(num_groups=len(groups), precision=precision)
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.weight_decays = [[0.0 if no_decay(p) else cfg.weight_decay for p in g.params] for g in groups]
        # (step, group, loss, found_inf) on the device until the next flush reads them together
        self._pending: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        self._consecutive_skips = 0  # fp16 only: overflows in a row

    def load(self, resume, trainable, dtype) -> None:
        """Check the checkpoint to resume (if any) before the model is touched; then the cast
        and the restore."""
        if resume is not None:
            self.check_resumable(*resume)
            self.resume_data(*resume)  # the loader replays to the saved batch, or refuses
        if any(p.dtype != dtype for p in trainable):
            self.state.cast_weights(dtype)  # the trained weights, rounded as their masters' format says
            self.model.to(dtype)  # the rest
        if resume is not None:
            self.restore(*resume)

    # ---------------------------------------------------------------------------- the loop

    def done(self) -> bool:
        if self.plan.max_steps is not None and self.result.steps >= self.plan.max_steps:
            return True
        return self.plan.max_cycles is not None and self.order.cycle >= self.plan.max_cycles

    def lr_of_cycle(self, cycle: int) -> float:
        return lr_at_cycle(cycle, base_lr=self.cfg.lr, schedule=self.cfg.lr_schedule,
                           total_cycles=self.plan.schedule_cycles, warmup_cycles=self.cfg.warmup_cycles)

    def run(self) -> FitResult:
        result = self.result
        for p in (p for g in self.groups for p in g.params):
            p.requires_grad_(False)
        total = self.plan.max_steps or self.plan.max_cycles * len(self.groups)
        bar = _progress(self.cfg.progress, total, result.steps)
        reset_peak_memory(self.device)
        start = time.perf_counter()
        lr_value = self.lr_of_cycle(self.order.cycle)
        self.lr.fill_(lr_value)
        while not self.done():
            tick = time.perf_counter()
            g = self.order.current
            found_inf, fp16_flags = self.step(g)
            result.groups.append(g)
            result.lrs.append(lr_value)
            result.steps += 1
            if fp16_flags is not None and self.fp16_skipped(g, *fp16_flags):
                pass  # the same group again, on the next batch
            elif self.order.advance():
                lr_value = self.lr_of_cycle(self.order.cycle)
                self.lr.fill_(lr_value)
            if self.cfg.on_step is not None:
                self.cfg.on_step(StepEvent(result.steps - 1, g, result.lrs[-1], found_inf, self.model,
                                           self.groups, self.state, self.scaler))
            if result.steps % self.cfg.log_every == 0:
                self.flush_losses(bar)
            if self.cfg.save_dir is not None and self.cfg.save_every and result.steps % self.cfg.save_every == 0:
                self.save()
            result.step_seconds.append(time.perf_counter() - tick)
            bar.update(1)
        self.flush_losses(bar)
        self.state.synchronize()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        bar.close()
        result.seconds = time.perf_counter() - start
        result.cycles = self.order.cycle
        result.peak_memory_bytes = peak_memory_bytes(self.device)
        if self.cfg.save_dir is not None:
            if result.checkpoint is None or not result.checkpoint.name.endswith(f"{result.steps:08d}"):
                self.save()
            if hasattr(self.model, "save_pretrained"):
                self.model.save_pretrained(Path(self.cfg.save_dir) / "final")
        return result

    def step(self, g: int) -> tuple[torch.Tensor, Optional[tuple[bool, bool]]]:
        """Train group g on accum_steps micro-batches. Returns the device flag of a skipped
        update and, in fp16 only, (skipped, loss finite) read on the host."""
        group = self.groups[g]
        params = group.params
        for p in params:
            p.requires_grad_(True)
        if self.cfg.prefetch:
            # g's (first chunk of) state comes in on the side stream while its own forward and
            # backward run, queued behind the previous group's copy-out; the disk store reads the
            # next group's from its file meanwhile.
            self.state.prefetch(self.state.chunks_of[g][0])
            self.state.read_ahead(self.order.following)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for _ in range(self.cfg.accum_steps):
            batch = to_device(next(self.stream), self.device)
            loss = compute_loss(self.model, batch)
            (self.scaler.scale_loss(loss) / self.cfg.accum_steps).backward()
            loss_sum += loss.detach().float()
        loss_mean = loss_sum / self.cfg.accum_steps

        grads = [p.grad for p in params if p.grad is not None]
        check = check_grads(grads, loss_mean, self.scaler, self.cfg.max_grad_norm)
        self._pending.append((self.result.steps, g, loss_mean, check.found_inf))
        if grads:  # a batch that reaches none of g's parameters leaves g as it was
            step_count = self.state.steps.select(0, g)
            step_count.add_(1.0 - check.found_inf)
            self.update(g, step_count, check.grad_scale, check.found_inf)
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        self.scaler.update(check.found_inf)
        if not self.scaler.enabled:
            return check.found_inf, None
        # fp16 reads its flags on the host (to retry the same group on the next batch), once
        # the update and the copy-out are enqueued.
        found_inf, loss_finite = torch.stack([check.found_inf, check.loss_finite.float()]).tolist()
        return check.found_inf, (bool(found_inf), bool(loss_finite))

    def update(self, g: int, step_count, grad_scale, found_inf) -> None:
        self.state.update_group(g, lr=self.lr, step=step_count, betas=self.cfg.betas, eps=self.cfg.eps,
                                weight_decays=self.weight_decays[g], grad_scale=grad_scale,
                                found_inf=found_inf)

    def fp16_skipped(self, g: int, skipped: bool, loss_finite: bool) -> bool:
        """Count an fp16 overflow; True to retry the same group. An overflow of the scaled
        grads is the loss scale's business, up to max_consecutive_skips in a row; a non-finite
        unscaled loss is not, and no scale fixes it."""
        if not loss_finite:
            self.result.skipped_steps += 1
            self.stop(self.result.steps - 1, g, "loss")
        if not skipped:
            self._consecutive_skips = 0
            return False
        self.result.skipped_steps += 1
        self._consecutive_skips += 1
        if self._consecutive_skips >= self.cfg.max_consecutive_skips:
            self.stop(self.result.steps - self._consecutive_skips, g, "overflows", count=self._consecutive_skips)
        return True

    def flush_losses(self, bar=None) -> None:
        """Bring the pending losses and skip flags to the host: the one host sync outside fp16,
        every log_every steps. Outside fp16 a skipped update stops the run here."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        losses, flags = torch.stack([torch.stack([loss.float(), flag]) for *_, loss, flag in pending]).T.tolist()
        self.result.losses.extend(losses)
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if self.scaler.enabled:  # fp16 counted its skips step by step
            return
        skipped = [(step, g, loss) for (step, g, *_), loss, flag in zip(pending, losses, flags) if flag]
        self.result.skipped_steps += len(skipped)
        if skipped:
            step, g, loss = skipped[0]
            self.stop(step, g, "gradient" if math.isfinite(loss) else "loss", count=len(skipped))

    def stop(self, step: int, g: int, what: str, count: int = 1) -> None:
        """End the run on a non-finite value: save (every skipped update left the weights and
        the state finite, so the checkpoint is good to resume from), then raise in words."""
        self.flush_losses()  # fp16 stops between flushes; the history goes with the error
        saved = self.save() if self.cfg.save_dir is not None else None
        where = f"step {step} while training {self.groups[g].describe()}"
        if what == "overflows":
            told = (f"fp16 overflowed {count} times in a row from {where}: each of those updates "
                    f"was skipped, and the loss scale fell to {float(self.scaler.scale):g}. The "
                    "gradients are inf or nan whatever the scale")
        else:
            later = f"; {count - 1} later update(s) were skipped for the same reason" if count > 1 else ""
            told = (f"the {what} became inf or nan at {where}. That update was skipped, so no inf "
                    f"or nan reached the weights or the optimizer state{later}")
        error = NonFiniteError(
            f"{told}. The run stopped after step {self.result.steps - 1}"
            + (f" and saved its state in {saved}" if saved else "")
            + ". Lower lr, check the data at that step, or train in fp32"
            + (" (max_consecutive_skips sets how many overflows in a row end a run)" if what == "overflows" else "")
            + ".")
        error.result = self.result  # the history so far, skipped_steps included
        raise error

    # ---------------------------------------------------------------------- checkpoints

    def fingerprint(self) -> dict:
        """What a resumed run must share with the run that saved: the groups and the state's
        layout, and the rotation (another order or seed would silently train other groups)."""
        return {"groups": [g.names for g in self.groups], "master": self.state.format.master,
                "moments": self.state.format.moments,
                "precision": self.result.precision, "state_chunks": [c.numel for c in self.state.chunks],
                "order": self.cfg.order, "seed": self.cfg.seed}

    def save(self) -> Path:
        self.flush_losses()
        self.state.synchronize()
        r = self.result
        tensors = {"steps": self.state.steps}
        tensors["rng_cpu"] = torch.get_rng_state()
        data_meta, data_tensors = self.stream.state_dict()
        tensors.update({f"data.{k}": v for k, v in data_tensors.items()})
        if self.device.type == "cuda":
            tensors["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "run": self.fingerprint(),
            "order": self.order.state_dict(),
            "scaler": self.scaler.state_dict(),
            "data": data_meta,
            "history": {"steps": r.steps, "losses": r.losses, "lrs": r.lrs, "groups": r.groups,
                        "skipped_steps": r.skipped_steps},
        }
        r.checkpoint = checkpoint.save(self.cfg.save_dir, r.steps, self.model, tensors, meta,
                                       keep_last=self.cfg.keep_last, write_state=self.state.save_chunks)
        return r.checkpoint

    def check_resumable(self, path: Path, meta: dict) -> None:
        """Refuse a checkpoint from another run before anything is loaded."""
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise checkpoint.CheckpointError(f"{path} has format {meta.get('format')}; this hift reads {CHECKPOINT_FORMAT}")
        theirs, ours = meta["run"], self.fingerprint()
        differ = [k for k in ours if theirs.get(k) != ours[k]]
        if differ:
            def shown(run, key):
                value = run.get(key)
                return f"{len(value)} entries" if isinstance(value, list) else repr(value)

            what = "; ".join(f"{k}: {shown(theirs, k)} there, {shown(ours, k)} here" for k in differ)
            raise checkpoint.CheckpointError(
                f"{path} was made by another run ({what}); resume with the same model, group_size, "
                "precision, state_chunk_mib, order and seed as the run that saved it")

    def resume_data(self, path: Path, meta: dict) -> None:
        """Bring the batch stream to where the checkpoint was saved; this checks that the loader
        yields the same batches, so it runs before the model is cast or loaded."""
        self.stream.load_state_dict(meta["data"], checkpoint.load_tensors(path, prefix="data.", strip=True))

    def restore(self, path: Path, meta: dict) -> None:
        checkpoint.load_weights(path, self.model)
        tensors = checkpoint.load_tensors(path)
        self.state.load_chunks(lambda c: checkpoint.load_chunk(path, c))
        self.state.steps.copy_(tensors["steps"])
        self.order.load_state_dict(meta["order"])
        self.scaler.load_state_dict(meta["scaler"])
        history = meta["history"]
        r = self.result
        r.steps, r.losses, r.lrs = history["steps"], history["losses"], history["lrs"]
        r.groups, r.skipped_steps = history["groups"], history["skipped_steps"]
        torch.set_rng_state(tensors["rng_cpu"])
        if "rng_cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng_cuda"], self.device)


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc="hift")
