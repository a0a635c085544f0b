"""fit(model, loader, ...): the HiFT training loop over HiftAdamW. It orchestrates: the method is
hift.optim.HiftAdamW, the LR schedule by cycle is schedule's, checkpoints are checkpoint's."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from hift import checkpoint, distributed, model_weights
from hift.batches import BatchStream, compute_loss, to_device
from hift.config import Config, ConfigError
from hift.groups import Group, trainable_parameters
from hift.memory import host_peak_bytes, host_resident_bytes, peak_memory_bytes, reset_peak_memory
from hift.memory_plan import MemoryPlan, claim_check, plan_run
from hift.optim import HiftAdamW, StepEvent, compute_device
from hift.precision import resolve_precision
from hift.recompute import recompute_blocks
from hift.schedule import lr_at_cycle


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
    # the planner's predicted device and host peaks beside the measured ones, and their ratios
    # (hift.memory_plan.claim_check); a measured peak 10% over its prediction also warns
    memory: dict = field(default_factory=dict)
    checkpoint: Optional[Path] = None  # the last checkpoint written, if any

    @property
    def median_step_seconds(self) -> float:
        s = sorted(self.step_seconds)
        return s[len(s) // 2] if s else 0.0


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


def fit(model: nn.Module, loader, config: Optional[Config] = None, **options) -> FitResult:
    """Fine-tune `model` on `loader` with HiFT and return the loss history and timings.

    Options are the fields of `hift.Config` (pass a Config, keyword options, or both: keywords
    win). The model trains in place; its requires_grad flags and train/eval mode are restored
    at the end. With save_dir set, checkpoints are written every save_every steps and at the
    end; resume_from=<save_dir or checkpoint> continues a run exactly where it stopped.
    """
    cfg = Config.build(config, **options)
    trainable = trainable_parameters(model)
    device = compute_device(trainable)
    resume = checkpoint.read(cfg.resume_from) if cfg.resume_from is not None else None
    stream = BatchStream(loader)
    was_training = model.training
    optimizer = None
    host_baseline = host_resident_bytes()  # the claim check counts the process's growth from here
    try:
        example = to_device(stream.peek(), device)
        # memory="auto": the options left unset, for this model on this machine (before anything
        # changes: a run that cannot fit is refused here)
        cfg, memory = plan_run(cfg, model, example, device, resolve_precision(cfg.precision, trainable),
                               distributed.dist.get_world_size() if distributed.active() else 1,
                               can_recompute=True, fixed_by_resume=_memory_of(resume))
        if memory.choice is not None and (not distributed.active() or distributed.dist.get_rank() == 0):
            print(memory.choice.line(), *memory.choice.notes, sep="\n")
        # (recompute_blocks finds the block lists by their trainable parameters: before the
        # optimizer leaves only the first group requiring grad)
        with recompute_blocks(model, cfg.recompute_activations):
            # the probe on the loader's first batch finds the units and checks that its loss
            # reaches each, before anything changes
            optimizer = HiftAdamW(model, config=cfg, example_batch=example, cast=False, memory_plan=memory)
            if memory.note:  # (after the probe: a batch it refuses needs no word about the planner)
                warnings.warn(memory.note, stacklevel=2)
            model.train()
            loop = _Loop(model, cfg, optimizer, plan_length(cfg, loader, len(optimizer.groups)), stream, memory,
                         host_baseline)
            loop.load(resume)
            return loop.run()
    except BaseException as err:
        distributed.report_failure(err)  # data parallel: the other ranks say why they stop
        raise
    finally:
        if optimizer is not None:
            optimizer.close()  # waits for the copies and writes in flight, then lets go
        for p in trainable:
            p.requires_grad_(True)
            p.grad = None
        model.train(was_training)


def _memory_of(resume) -> Optional[dict]:
    """The memory options a resumed run must keep: the state format it saved (chunks, the store
    and recompute may change on resume)."""
    if resume is None or resume[1].get("format") != checkpoint.FORMAT:
        return None  # (check_resumable refuses another format in words)
    moments = checkpoint.saved_methods(resume[0])[0].run.get("moments")
    return {"moment_dtype": moments} if moments else None


class _Loop:
    def __init__(self, model, cfg: Config, optimizer: HiftAdamW, plan: Plan, stream: BatchStream,
                 memory_plan: MemoryPlan, host_baseline: int):
        self.model, self.cfg, self.optimizer, self.plan, self.stream = model, cfg, optimizer, plan, stream
        self.groups = optimizer.groups
        self.device = optimizer.device
        self.result = FitResult(num_groups=len(self.groups), precision=optimizer.precision)
        # the steps whose losses and skip flags are on the device until the next flush reads them together
        self._pending: list[StepEvent] = []
        self._consecutive_skips = 0  # fp16 only: overflows in a row
        self.memory_plan, self.host_baseline = memory_plan, host_baseline  # for the claim check at the end

    def load(self, resume) -> None:
        """Check the checkpoint to resume (if any) before the model is touched; then the cast
        and the restore."""
        if resume is not None:
            checkpoint.check_resumable(*resume, self.optimizer)
            # the loader replays to the saved batch, or refuses
            checkpoint.resume_stream(*resume, self.stream, *self.optimizer.rank_and_world)
        self.optimizer.cast_model()
        if resume is not None:
            history = checkpoint.restore_run(*resume, self.model, self.optimizer, progress=self.cfg.progress)
            r = self.result
            r.steps, r.losses, r.lrs = history["steps"], history["losses"], history["lrs"]
            r.groups, r.skipped_steps = history["groups"], history["skipped_steps"]

    # ---------------------------------------------------------------------------- the loop

    def done(self) -> bool:
        if self.plan.max_steps is not None and self.result.steps >= self.plan.max_steps:
            return True
        return self.plan.max_cycles is not None and self.optimizer.cycle >= self.plan.max_cycles

    def lr_of_cycle(self, cycle: int) -> float:
        return lr_at_cycle(cycle, base_lr=self.cfg.lr, schedule=self.cfg.lr_schedule,
                           total_cycles=self.plan.schedule_cycles, warmup_cycles=self.cfg.warmup_cycles)

    def run(self) -> FitResult:
        result, optimizer = self.result, self.optimizer
        total = self.plan.max_steps or self.plan.max_cycles * len(self.groups)
        bar = _progress(self.cfg.progress, total, result.steps)
        reset_peak_memory(self.device)
        start = time.perf_counter()
        while not self.done():
            tick = time.perf_counter()
            # the optimizer reads the LR at the step that starts a cycle
            lr = self.lr_of_cycle(optimizer.cycle)
            for options in optimizer.param_groups:
                options["lr"] = lr
            info = self.step()
            result.groups.append(info.group)
            result.lrs.append(info.lr)
            result.steps += 1
            if optimizer.scaler.enabled:
                self.count_fp16_skip(info)
            if self.cfg.on_step is not None:
                self.cfg.on_step(info)
            if result.steps % self.cfg.log_every == 0:
                self.flush_losses(bar)
            if self.cfg.save_dir is not None and self.cfg.save_every and result.steps % self.cfg.save_every == 0:
                self.save()
            result.step_seconds.append(time.perf_counter() - tick)
            bar.update(1)
        self.flush_losses(bar)
        optimizer.group_state.synchronize()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        bar.close()
        result.seconds = time.perf_counter() - start
        result.cycles = optimizer.cycle
        result.peak_memory_bytes = peak_memory_bytes(self.device)
        result.memory = claim_check(self.memory_plan, self.device, result.peak_memory_bytes,
                                    max(0, host_peak_bytes() - self.host_baseline))
        if self.cfg.save_dir is not None:
            if result.checkpoint is None or not result.checkpoint.name.endswith(f"{result.steps:08d}"):
                self.save()
            model_weights.save_final(self.model, Path(self.cfg.save_dir) / "final", optimizer.rank_and_world[0])
        return result

    def step(self):
        """Train the active group on accum_steps micro-batches (only its parameters require
        grad: the optimizer set them)."""
        optimizer = self.optimizer
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for _ in range(self.cfg.accum_steps):
            batch = to_device(next(self.stream), self.device)
            loss = compute_loss(self.model, batch)
            (optimizer.scale_loss(loss) / self.cfg.accum_steps).backward()
            loss_sum += loss.detach().float()
        loss_mean = loss_sum / self.cfg.accum_steps
        optimizer.step(loss=loss_mean)
        self._pending.append(optimizer.last_step)
        return optimizer.last_step

    def count_fp16_skip(self, info) -> None:
        """Count an fp16 overflow (the optimizer retries the group). An overflow of the scaled
        grads is the loss scale's business, up to max_consecutive_skips in a row; a non-finite
        unscaled loss is not, and no scale fixes it."""
        if not info.loss_finite:
            self.result.skipped_steps += 1
            self.stop(self.result.steps - 1, info.group, "loss")
        if not info.retried:
            self._consecutive_skips = 0
            return
        self.result.skipped_steps += 1
        self._consecutive_skips += 1
        if self._consecutive_skips >= self.cfg.max_consecutive_skips:
            self.stop(self.result.steps - self._consecutive_skips, info.group, "overflows",
                      count=self._consecutive_skips)

    def flush_losses(self, bar=None) -> None:
        """Bring the pending losses and skip flags to the host: the one host sync outside fp16,
        every log_every steps. Outside fp16 a skipped update stops the run here."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        # (FSDP2 with CPU offload: the skip flag is the host's, where the update ran)
        losses, flags = torch.stack([torch.stack([event.loss.float(), event.skipped.to(event.loss.device)])
                                     for event in pending]).T
        if self.optimizer.dp is not None:  # the global batch's loss: the same history on every rank
            losses = self.optimizer.dp.mean(losses)  # (the skip flags are agreed already)
        losses, flags = losses.tolist(), flags.tolist()
        self.result.losses.extend(losses)
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if self.optimizer.scaler.enabled:  # fp16 counted its skips step by step
            return
        skipped = [(event.step, event.group, loss) for event, loss, flag in zip(pending, losses, flags) if flag]
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
                    f"was skipped, and the loss scale fell to {float(self.optimizer.scaler.scale):g}. The "
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

    def save(self) -> Path:
        self.flush_losses()
        r = self.result
        history = {"steps": r.steps, "losses": r.losses, "lrs": r.lrs, "groups": r.groups,
                   "skipped_steps": r.skipped_steps}
        r.checkpoint = checkpoint.save_run(self.cfg.save_dir, self.model, self.optimizer, self.stream, history,
                                           keep_last=self.cfg.keep_last)
        return r.checkpoint


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc="hift")
