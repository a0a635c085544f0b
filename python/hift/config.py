"""Config: every knob of a hift run, validated once before any work starts."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

ORDERS = ("bottom_up", "top_down", "random")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "linear", "cosine")
MOMENT_DTYPES = ("fp32", "bf16", "int8")
MASTER_FORMATS = ("auto", "remainder", "fp32")
STATE_STORES = ("host", "disk")
REDUCE_DTYPES = ("fp32", "bf16")
MEMORY_MODES = ("auto", "manual")
# memory="manual" (and memory="auto" where the planner cannot trace the model): what the memory
# options left unset (None) become
MANUAL_MEMORY = dict(moment_dtype="fp32", state_store="host", recompute_activations=False)


class ConfigError(ValueError):
    """An option that cannot work; the message names the option and the fix."""


@dataclass
class Config:
    # optimizer (AdamW, decoupled weight decay; none on biases and norm weights)
    # lr: the best on the validation splits of three fine-tuning tasks at group_size 1, and one
    # x3 step below the lr at which two of them collapsed (docs/defaults.md, with the table and
    # what it does not cover: model size, and K-scaling, which one task of three supports)
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0  # clip by the active group's norm; None or 0 = off

    # hierarchy
    group_size: int = 1  # units per group; K = ceil(units / group_size)
    order: str = "top_down"
    units: Optional[Sequence[Any]] = None  # override detection: a list of modules or param lists

    # length: num_cycles, else max_steps, else `epochs` passes over the loader
    num_cycles: Optional[int] = None
    max_steps: Optional[int] = None
    epochs: int = 1
    accum_steps: int = 1

    # learning-rate schedule, counted in cycles (one cycle = every group updated once)
    lr_schedule: str = "linear"
    warmup_cycles: int = 0

    # numerics and memory
    precision: str = "auto"  # auto: bf16/fp16 if the model is, else fp32
    # "auto": before the first step the planner picks the memory options left unset (offload,
    # state_chunk_mib, moment_dtype, recompute_activations, state_store) so that the run fits the
    # machine's free device memory, host RAM and disk (hift/plan/auto.py says in which order);
    # "manual": those options as given, unset ones as MANUAL_MEMORY
    memory: str = "auto"
    offload: Optional[bool] = None  # keep inactive groups' state on the host; None = when on an accelerator
    prefetch: bool = True  # copy the next group's state in while the current one computes
    pin_memory: bool = True
    # Optimizer state formats (hift.formats): moments in fp32, or bf16 with stochastic rounding
    # (6 instead of 10 bytes per parameter with bf16 weights); a bf16 weight's master as the
    # low 16 bits beside it ("auto"/"remainder", lossless) or a full fp32 copy ("fp32").
    moment_dtype: Optional[str] = None  # None: memory decides (manual: fp32)
    master_format: str = "auto"
    # Where every group's state rests: "host" (RAM, pinned on CUDA; with offload) or "disk"
    # (files under state_dir, read ahead and written back on background threads: host RAM then
    # holds at most two groups' state)
    state_store: Optional[str] = None  # None: memory decides (manual: host)
    state_dir: Optional[str] = None
    # Stream a group's state through two device slots of this many MiB during its update
    # instead of one slot holding the whole group: less device memory, and the update waits
    # on its copies. None: memory decides (manual: whole groups); 0: whole groups.
    state_chunk_mib: Optional[float] = None
    # Keep only the inputs of the frozen blocks above the active group and recompute the rest
    # in backward (less activation memory, one more forward of those blocks).
    recompute_activations: Optional[bool] = None  # None: memory decides (manual: False)
    # Data parallel: the dtype the active group's gradients are summed over the ranks in. fp32:
    # the mean gradient as one process on the global batch would have it, to fp32 rounding; bf16:
    # half the bytes of the largest collective, each rank's sum rounded to bf16 as DDP does for
    # a bf16 model.
    reduce_dtype: str = "fp32"
    # Weights that do not fit one device (hift.fsdp): shard_weights makes every unit an FSDP2
    # module (fully_shard, over every rank of the process group) once the state's masters are
    # taken and the model is cast; offload_weights keeps FSDP's shards and their gradients in
    # host memory (CPUOffloadPolicy), and the update runs there, beside the state (on one rank
    # alone it needs no shard_weights: FSDP2 over that rank; on several, pass both). A model
    # you sharded yourself with fully_shard needs neither.
    shard_weights: bool = False
    offload_weights: bool = False
    loss_scale: float = 2.0**16
    loss_scale_growth_interval: int = 2000
    # fp16: this many overflows in a row end the run (the scale has then fallen 2**N-fold, so
    # the gradients are inf or nan whatever the scale)
    max_consecutive_skips: int = 20

    # checkpoints: every save_every steps and at the end, the last keep_last kept
    save_dir: Optional[str] = None
    save_every: Optional[int] = None
    keep_last: int = 2
    resume_from: Optional[str] = None  # a save_dir (its newest checkpoint) or one checkpoint

    seed: int = 0
    progress: bool = True
    on_step: Optional[Callable[[Any], None]] = None  # called with a StepEvent after every step
    log_every: int = 10  # host reads the loss every N steps (the only sync in the loop)

    def __post_init__(self):
        self.validate()

    @classmethod
    def build(cls, config: Optional["Config"] = None, **options) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown}; the options are: {', '.join(sorted(known))}"
            )
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)} if config is not None else {}
        base.update(options)
        return cls(**base)

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)

        need(math.isfinite(self.lr) and self.lr >= 0, f"lr must be a finite number >= 0, got {self.lr}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.eps > 0, f"eps must be > 0, got {self.eps}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.max_grad_norm is None or self.max_grad_norm >= 0,
             f"max_grad_norm must be >= 0 or None (no clipping), got {self.max_grad_norm}")
        need(isinstance(self.group_size, int) and self.group_size >= 1,
             f"group_size is the number of units per group and must be an integer >= 1, got {self.group_size!r}")
        need(self.order in ORDERS, f"order must be one of {ORDERS}, got {self.order!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        need(isinstance(self.accum_steps, int) and self.accum_steps >= 1,
             f"accum_steps (micro-batches per step) must be an integer >= 1, got {self.accum_steps!r}")
        for name in ("num_cycles", "max_steps"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= 1),
                 f"{name} must be an integer >= 1 or None, got {value!r}")
        need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs!r}")
        need(isinstance(self.warmup_cycles, int) and self.warmup_cycles >= 0,
             f"warmup_cycles must be an integer >= 0, got {self.warmup_cycles!r}")
        need(self.memory in MEMORY_MODES, f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")
        need(self.moment_dtype is None or self.moment_dtype in MOMENT_DTYPES,
             f"moment_dtype must be one of {MOMENT_DTYPES}, got {self.moment_dtype!r}")
        need(self.master_format in MASTER_FORMATS,
             f"master_format must be one of {MASTER_FORMATS}, got {self.master_format!r}")
        need(self.reduce_dtype in REDUCE_DTYPES, f"reduce_dtype must be one of {REDUCE_DTYPES}, got {self.reduce_dtype!r}")
        need(self.state_store is None or self.state_store in STATE_STORES,
             f"state_store must be one of {STATE_STORES}, got {self.state_store!r}")
        need(self.state_store != "disk" or self.state_dir is not None,
             "state_store='disk' needs state_dir: a directory on a disk with room for the optimizer "
             "state (hift plan says how much)")
        need(self.state_store != "disk" or self.offload is not False,
             "state_store='disk' keeps the state off the device, which offload=False asks for: drop one")
        need(self.state_chunk_mib is None or self.state_chunk_mib >= 0,
             f"state_chunk_mib must be > 0, or 0 (one slot per group), got {self.state_chunk_mib!r}")
        need(self.loss_scale > 0, f"loss_scale must be > 0, got {self.loss_scale}")
        need(self.loss_scale_growth_interval >= 1, "loss_scale_growth_interval must be >= 1")
        need(isinstance(self.max_consecutive_skips, int) and self.max_consecutive_skips >= 1,
             f"max_consecutive_skips must be an integer >= 1, got {self.max_consecutive_skips!r}")
        need(self.save_every is None or (isinstance(self.save_every, int) and self.save_every >= 1),
             f"save_every must be an integer >= 1 or None, got {self.save_every!r}")
        need(self.save_every is None or self.save_dir is not None,
             "save_every needs save_dir: pass save_dir='runs/my-run' to say where checkpoints go")
        need(isinstance(self.keep_last, int) and self.keep_last >= 1,
             f"keep_last must be an integer >= 1, got {self.keep_last!r}")
        need(isinstance(self.log_every, int) and self.log_every >= 1, f"log_every must be an integer >= 1, got {self.log_every!r}")

    @property
    def hift_shards(self) -> bool:
        """Whether hift wraps the model in FSDP2 itself (shard_weights, offload_weights)."""
        return self.shard_weights or self.offload_weights

    def with_memory(self, **chosen) -> "Config":
        """This config with the memory options left unset filled: from `chosen` (memory="auto"'s
        pick), else MANUAL_MEMORY; state_chunk_mib 0 (whole groups, asked for) becomes None."""
        filled = {name: getattr(self, name) if getattr(self, name) is not None else chosen.get(name, default)
                  for name, default in MANUAL_MEMORY.items()}
        for name in ("offload", "state_chunk_mib", "state_dir"):
            if getattr(self, name) is None and name in chosen:
                filled[name] = chosen[name]
        chunk = filled.get("state_chunk_mib", self.state_chunk_mib)
        filled["state_chunk_mib"] = None if not chunk else chunk
        return dataclasses.replace(self, **filled)


# Config's fields that only fit's loop reads; every other field is an option of HiftAdamW as
# well (OPTIMIZER_FIELDS): its keyword options, its signature and its docstring follow this.
LOOP_FIELDS = ("num_cycles", "max_steps", "epochs", "accum_steps", "lr_schedule", "warmup_cycles",
               "recompute_activations", "max_consecutive_skips", "save_dir", "save_every", "keep_last",
               "resume_from", "progress", "on_step", "log_every")
OPTIMIZER_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in LOOP_FIELDS)
