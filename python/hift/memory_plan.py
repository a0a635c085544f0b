"""The planner on a live run: memory="auto" picks the options left unset for this model on this
machine, and every run's prediction is held to what it measured (the claim check).

The model is traced as `hift plan` traces a config: a meta-device twin (no storage) runs the
example batch, and what autograd saves is added up unit by unit (hift/plan/trace.py). A model
the meta device cannot run, or a run without an example batch, is not predicted: memory="auto"
then keeps the manual defaults and says so. Traces are cached per model shape and batch shape,
so a process that builds many optimizers over one model traces it once.

FSDP2 runs (a model the user sharded with fully_shard, or shard_weights / offload_weights set)
are predicted by hift.plan.fsdp over the process group's ranks; under a process group an
unsharded model whose weights fit no rank gets shard_weights (then offload_weights) chosen, after
every choice that keeps them whole (auto.choose's placements); without one, the refusal names the
torchrun that would fit it.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from hift.batches import BatchError
from hift import fsdp_wrap
from hift.config import Config
from hift.fsdp import held_device, is_sharded, sharded_model
from hift.plan import auto, resting
from hift.plan.predict import GB, Breakdown
from hift.plan.trace import UnitTrace, meta_twin, trace_units
from hift.precision import DTYPES

CLAIM_TOLERANCE = 0.10  # a measured peak this far above the prediction is a warning...
# ...and this much above it: a process's first steps also grow by what no plan counts (the
# allocator's arenas, libraries' first use), which only a small run would notice
CLAIM_SLACK = {"device": 64 * 2**20, "host": 256 * 2**20}
_TRACES: dict = {}
_TRACE_CACHE_SIZE = 32


@dataclass
class MemoryPlan:
    """What a run was predicted to need (None where it could not be predicted), and the choice."""

    prediction: Optional[Breakdown]
    choice: Optional[auto.MemoryChoice] = None
    note: str = ""
    temporary_state_dir: Optional[str] = None  # made for the disk store by auto: removed at close


def default_state_dir() -> str:
    """Where memory="auto" puts the disk store's files when it chooses the disk and no
    state_dir was given: $HIFT_STATE_DIR, else ~/.cache/hift/state, in a folder of this run's
    own (removed when the optimizer closes)."""
    base = os.environ.get("HIFT_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hift", "state")
    return os.path.join(base, f"run-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}")


def _meta_inputs(batch):
    if isinstance(batch, torch.Tensor):
        return batch.to("meta")
    if isinstance(batch, dict):
        # no attention mask: transformers reads its values (is any token padded?), which meta
        # tensors do not have; what autograd saves is the same (the trace's attention is fused)
        return {k: _meta_inputs(v) for k, v in batch.items() if k != "attention_mask"}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_meta_inputs(v) for v in batch)
    return batch


def _shape_key(x):
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype)
    if isinstance(x, dict):
        return tuple((k, _shape_key(v)) for k, v in sorted(x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_shape_key(v) for v in x)
    return repr(x)


def trace_model(model: nn.Module, example_batch, precision: str) -> tuple[Optional[UnitTrace], str]:
    """The model's UnitTrace on example_batch, in the run's weight dtype; (None, why) where the
    model cannot be traced on the meta device."""
    if example_batch is None:
        return None, "no example batch to trace the model with"
    key = (type(model).__qualname__, precision,
           tuple((n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()), _shape_key(example_batch))
    if key in _TRACES:
        return _TRACES[key], ""
    try:
        twin = (_unsharded_twin(model) if sharded_model(model) else meta_twin(model)).to(DTYPES[precision])
        trace, _ = trace_units(twin, 0, 0, inputs=_meta_inputs(example_batch))
    except BatchError:  # the batch itself is wrong: the probe says so in words, next
        return None, ""
    except Exception as err:  # a forward the meta device cannot run (data-dependent shapes, .item())
        return None, f"the planner cannot trace {type(model).__name__} on the meta device ({type(err).__name__}: {err})"
    if len(_TRACES) >= _TRACE_CACHE_SIZE:
        _TRACES.pop(next(iter(_TRACES)))
    _TRACES[key] = trace
    return trace, ""


def _unsharded_twin(model: nn.Module) -> nn.Module:
    """A model sharded with fully_shard, unsharded on the meta device: FSDP2 refuses deepcopy, so
    the twin is the model's own class (FSDP2's wrapper class dropped) built again from its config
    (a transformers model), with the model's requires_grad flags. Raises where there is none."""
    from torch.distributed.fsdp import FSDPModule

    base = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("a model sharded with fully_shard is rebuilt from its config to be traced, and it has none")
    with torch.device("meta"):
        twin = base(config)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in twin.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    return twin


def _process_group() -> int:
    """The ranks of the default process group (0: none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0


def _placement(cfg: Config, model: nn.Module, device: torch.device, ranks: int) -> tuple[dict, tuple]:
    """Where the run's weights are, for the planner: (the weight options fixed, the placements
    memory="auto" may choose). A model the user sharded: sharded over its ranks, offloaded where
    its rows rest in host memory beside a GPU; shard_weights / offload_weights set: as set (on one
    rank FSDP2 holds every row: no shard; on a CPU the weights are in host memory already); an
    unsharded model under a process group: both may be chosen, after everything else."""
    on_gpu = device.type != "cpu"
    if sharded_model(model):
        offloaded = on_gpu and any(held_device(p).type == "cpu" for p in model.parameters() if is_sharded(p))
        return dict(shard_weights=ranks > 1, offload_weights=offloaded), ()
    if cfg.hift_shards:
        return dict(shard_weights=cfg.shard_weights and ranks > 1, offload_weights=cfg.offload_weights and on_gpu), ()
    return {}, (auto.WEIGHT_OPTIONS if _process_group() else ())


def _local_bytes(t: torch.Tensor) -> int:
    held = t.to_local() if is_sharded(t) else t
    return held.numel() * held.element_size()


def _torchrun_hint(trace: UnitTrace, budgets: auto.Budgets, fixed: dict, common: dict) -> str:
    """Without a process group: what torchrun with the weights placed would fit, in words ("" if nothing)."""
    tries = [(1, "--nproc_per_node 1")]  # offload_weights on one GPU
    gpus = torch.cuda.device_count() if common["device"] == "cuda" else 0
    if gpus > 1:
        tries.append((gpus, f"--nproc_per_node {gpus}"))
    for ranks, how in tries:
        try:
            choice = auto.choose(trace, budgets, fixed, **dict(common, ranks=ranks), placements=auto.WEIGHT_OPTIONS)
        except auto.MemoryPlanError:
            continue
        placed = [name for name in auto.WEIGHT_OPTIONS if choice.options.get(name)]
        if placed:
            return (f" Under torchrun {how} (a process group, even of one rank), {'/'.join(placed)}=True would "
                    f"fit it: {auto._describe(choice.options)}: {auto._prediction(choice.plan)}.")
    return ""


def _recompute_boundary(model: nn.Module, example_batch, precision: str) -> Optional[int]:
    """One block's input bytes (what recompute keeps per frozen block), for a transformers model
    with token ids; None where unknown (then recompute is not chosen)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    ids = example_batch.get("input_ids") if isinstance(example_batch, dict) else None
    if hidden is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    return ids.shape[0] * ids.shape[1] * hidden * DTYPES[precision].itemsize


def _fixed(cfg: Config, can_recompute: bool) -> dict:
    fixed = {name: getattr(cfg, name) for name in auto.AUTO_OPTIONS if getattr(cfg, name) is not None}
    if "state_chunk_mib" in fixed and not fixed["state_chunk_mib"]:
        fixed["state_chunk_mib"] = None  # 0: whole groups, asked for
    if not can_recompute:
        fixed.setdefault("recompute_activations", False)
    return fixed


def plan_run(cfg: Config, model: nn.Module, example_batch, device: torch.device, precision: str, ranks: int,
             can_recompute: bool, fixed_by_resume: Optional[dict] = None) -> tuple[Config, MemoryPlan]:
    """Fill the memory options cfg left unset (memory="auto": the planner's choice for this
    machine; "manual" or where the model cannot be predicted: Config.MANUAL_MEMORY), and the
    prediction for the run. Raises auto.MemoryPlanError, before anything changes, where nothing
    fits."""
    if cfg.hift_shards:
        fsdp_wrap.check_world(cfg)  # (before the planner, which would refuse the same in its own words)
    unset = [name for name in auto.AUTO_OPTIONS if getattr(cfg, name) is None]
    group = _process_group()
    if sharded_model(model) or cfg.hift_shards or group:
        ranks = max(group, 1)  # FSDP2's ranks: the process group's
    placed, placements = _placement(cfg, model, device, ranks)
    if cfg.memory != "auto":
        placements = ()
    trace, why = trace_model(model, example_batch, precision)
    if fixed_by_resume:
        cfg = Config.build(cfg, **{k: v for k, v in fixed_by_resume.items() if getattr(cfg, k) is None})
    device_kind = "cuda" if device.type == "cuda" else "cpu"
    boundary = _recompute_boundary(model, example_batch, precision)
    common = dict(precision=precision, group_size=cfg.group_size, recompute_boundary=boundary, device=device_kind,
                  master_format=cfg.master_format, prefetch=cfg.prefetch, ranks=ranks, reduce_dtype=cfg.reduce_dtype,
                  ranks_per_node=_ranks_per_node(ranks) if placed or placements else None)
    if cfg.memory == "manual" or trace is None or not unset:
        note = "" if cfg.memory == "manual" or not unset or not why else \
            f"hift memory=auto: {why}; the manual defaults are used"
        cfg = cfg.with_memory()
        prediction = None
        if trace is not None:
            options = {"offload": cfg.offload if cfg.offload is not None else device.type != "cpu",
                       "state_chunk_mib": cfg.state_chunk_mib, "moment_dtype": cfg.moment_dtype,
                       "recompute_activations": bool(cfg.recompute_activations), "state_store": cfg.state_store,
                       **placed}
            if placed.get("offload_weights"):
                options["offload"] = True  # the update runs on the host, where the state rests
            prediction = auto.predict(trace, options, **common)
            if placed:
                _check_resting(prediction, options, cfg, model, device, ranks, common["ranks_per_node"])
        return cfg, MemoryPlan(prediction, note=note)
    temporary = None
    state_dir = cfg.state_dir
    if cfg.state_store is None and state_dir is None:
        state_dir = temporary = default_state_dir()
    model_bytes = sum(_local_bytes(t) for t in [*model.parameters(), *model.buffers()] if t.device == device)
    budgets = auto.machine_budgets(device_kind, device.index, model_bytes, state_dir)
    fixed = {**_fixed(cfg, can_recompute), **placed}
    if placed.get("offload_weights"):
        fixed["offload"] = True  # the state rests on the host, where the update runs (whatever offload says)
    try:
        choice = auto.choose(trace, budgets, fixed, **common, placements=placements)
    except auto.MemoryPlanError as err:
        hint = "" if group or placed else _torchrun_hint(trace, budgets, fixed, common)
        if not hint:
            raise
        raise auto.MemoryPlanError(str(err) + hint) from None
    chosen = dict(choice.options)
    weights = {name: chosen.pop(name) for name in auto.WEIGHT_OPTIONS if name in chosen}
    if device_kind == "cpu":
        del chosen["offload"]  # nothing to offload from: the state's place is its store
    if chosen["state_store"] == "disk" and cfg.state_dir is None:
        chosen["state_dir"] = state_dir
    else:
        temporary = None
    if temporary is not None:
        choice.notes.append(f"the state rests in {temporary} (removed when the run ends; pass state_dir to keep it)")
    cfg = cfg.with_memory(**chosen)
    if placements and any(weights.values()):  # auto placed the weights: fit and HiftAdamW shard the model
        cfg = dataclasses.replace(cfg, **weights)
    return cfg, MemoryPlan(choice.plan, choice, temporary_state_dir=temporary)


def _check_resting(prediction: Breakdown, options: dict, cfg: Config, model: nn.Module, device: torch.device,
                   ranks: int, ranks_per_node: int) -> None:
    """A sharded run with its options as set: refused in words where a rank cannot hold what rests
    on it for the whole run (hift.plan.resting), before anything changes.

    Unsharded runs are not checked. What rests there is the whole model, loaded already, and the
    state, which OptimizerState allocates when the optimizer is built, before the cast and before
    any step: a run that cannot hold it stops there today (an allocation error; the kernel's OOM
    killer for host RAM), with the model untouched. The check would add words, and could also
    refuse runs that work today: host RAM is read as MemAvailable, an estimate that counts no
    swap and none of the heap the process has freed and would reuse. A sharded run's weights are
    placed by fully_shard, which changes the model in place, after the state is made: that is
    where a share too large for a rank would otherwise fail, with the model half sharded."""
    state_dir = cfg.state_dir if options["state_store"] == "disk" else None
    capacity = auto.machine_capacity("cuda" if device.type == "cuda" else "cpu", device.index, state_dir)
    held = sum(_local_bytes(t) for t in [*model.parameters(), *model.buffers()] if held_device(t).type == "cpu")
    label = "hift memory=manual" if cfg.memory == "manual" else "hift (every memory option set)"
    resting.check(resting.share_of(prediction, ranks_per_node), capacity, ranks=ranks, ranks_per_node=ranks_per_node,
                  options=options, held_on_host=held, sharded_by_user=sharded_model(model), label=label)


def _ranks_per_node(ranks: int) -> int:
    """Ranks sharing this node's host RAM: torchrun's LOCAL_WORLD_SIZE, else every rank."""
    try:
        return max(1, min(ranks, int(os.environ["LOCAL_WORLD_SIZE"])))
    except (KeyError, ValueError):
        return ranks


def claim_check(plan: MemoryPlan, device: torch.device, measured_device: int, measured_host_growth: int) -> dict:
    """The prediction against what the run measured: the device peak (max_memory_allocated on
    CUDA) and the host's (the process's growth in resident memory over the run on a CPU, its
    peak resident set on a GPU machine), their ratios, and a warning in words where a measured
    peak is more than CLAIM_TOLERANCE above its prediction."""
    out = dict(measured_device_peak=measured_device if device.type == "cuda" else None,
               measured_host_peak=measured_host_growth)
    p = plan.prediction
    if p is None:
        return {**out, "predicted_device_peak": None, "predicted_host_peak": None, "note": plan.note or "not predicted"}
    # on a CPU the planner's total above the weights is what the process grows by
    predicted_host = p.above_model if device.type != "cuda" else p.host
    out.update(predicted_device_peak=p.total if device.type == "cuda" else None, predicted_host_peak=predicted_host)
    if device.type == "cuda":
        out["device_ratio"] = measured_device / p.total if p.total else None
    out["host_ratio"] = measured_host_growth / predicted_host if predicted_host else None
    for what in ("device", "host"):
        ratio = out.get(f"{what}_ratio")
        over = (out[f"measured_{what}_peak"] or 0) - (out[f"predicted_{what}_peak"] or 0)
        if ratio is not None and ratio > 1 + CLAIM_TOLERANCE and over > CLAIM_SLACK[what]:
            message = (f"hift: the measured {what} peak, {out[f'measured_{what}_peak'] / GB:.2f} GB, is {ratio:.2f}x "
                       f"the planner's prediction ({out[f'predicted_{what}_peak'] / GB:.2f} GB): please report it, "
                       "with the model and options")
            warnings.warn(message, stacklevel=3)
            out.setdefault("warnings", []).append(message)
    return out


def remove_temporary_state_dir(plan: Optional[MemoryPlan]) -> None:
    if plan is not None and plan.temporary_state_dir:
        shutil.rmtree(plan.temporary_state_dir, ignore_errors=True)
