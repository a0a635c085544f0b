"""memory="auto": the memory options a user left unset, chosen so that the run fits the machine.

Five options trade memory for time or exactness: `offload` (the state off the device),
`state_chunk_mib` (the update streams its state through two device slots), `moment_dtype`
(bf16 or int8 moments: 6 or 4 instead of 10 bytes per parameter), `recompute_activations` and
`state_store="disk"`. Every combination of the ones the user left unset is predicted by the
planner (plan_hift); among those that fit the budgets, the one chosen is the first in this
order, which prefers exact and fast to small:
  1. the state in host RAM before on disk: the disk store reads and writes the group's state
     every step, far slower than PCIe;
  2. no recompute before recompute: recompute runs the frozen blocks above the group forward
     twice;
  3. fp32 moments before bf16 before int8: the compact moments round (stochastically), and
     trained as fp32 moments do in bench/results/moments_quality.md; they also halve or quarter
     the bytes that cross PCIe;
  4. whole-group device slots before chunks: a chunked update waits on its copies. The chunk
     sizes tried first are a block's state ("blocks": every block keeps its whole-group slot
     and overlap, and only the larger groups, the embeddings and the head of a large vocabulary,
     stream through it), then 256 and 64 MiB;
  5. the state resident on the device before offloaded (offload: the group's state crosses
     PCIe each step, hidden behind its forward and backward).
So a tight device first offloads, then chunks, then shrinks the moments, then recomputes; a
tight host first shrinks the moments, then moves the state to disk.

Where the weights themselves do not fit, and only where the caller says the run can place them
(`placements`: the runtime's Config.shard_weights / offload_weights, hift.plan.fsdp), the same
order is tried again with the weights placed, after everything above has failed, so that no
pick above changes: first sharded over the ranks with FSDP2 (shard_weights; two or more ranks:
all-gathers on the network every step), then in host RAM (offload_weights; on several ranks
with shard_weights: every unit's weights over PCIe in forward and again in backward, the update
on the host). On a CPU (FSDP2 over gloo) the weights are in host memory already: only sharding
is tried there, and the plan counts everything in the process's memory.

Budgets are what the machine has free, less MARGIN (allocator fragmentation, the CUDA context's
growth, other processes): a plan fits when its device peak and host RAM are at most (1 - MARGIN)
of them.
"""
from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

from hift.plan.predict import GB, Breakdown, make_group_ranges, plan_hift, state_format
from hift.plan.trace import UnitTrace

MARGIN = 0.10
AUTO_OPTIONS = ("offload", "state_chunk_mib", "moment_dtype", "recompute_activations", "state_store")
# where the weights rest (hift.plan.fsdp): tried only where `placements` names them
WEIGHT_OPTIONS = ("shard_weights", "offload_weights")
MOMENTS = ("fp32", "bf16", "int8")
BLOCKS = "blocks"  # state_chunk_mib candidate: one block's state
CHUNK_MIBS = (None, BLOCKS, 256.0, 64.0)


class MemoryPlanError(ValueError):
    """No choice of the options fits the machine (memory="auto"), or what the options set leave
    resting on a rank does not (hift.plan.resting); the message gives the planner's numbers."""


@dataclass
class Budgets:
    """What the run may use, in bytes, before the margin: the device's (None on a CPU, where the
    host is the device), the host's and the disk's under state_dir (None: not known)."""

    host: int
    device: Optional[int] = None
    disk: Optional[int] = None

    def describe(self) -> str:
        parts = ([f"device {gb(self.device)}"] if self.device is not None else []) + \
                [f"host RAM {gb(self.host)}"] + ([f"disk {gb(self.disk)}"] if self.disk is not None else [])
        return ", ".join(parts) + f" (plans must fit {1 - MARGIN:.0%} of each)"


@dataclass
class MemoryChoice:
    """The options chosen (and the ones the user set), with the planner's prediction for them."""

    options: dict
    plan: Breakdown
    budgets: Budgets
    chosen: tuple[str, ...] = ()  # the names auto decided (the others were the user's)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line: what was chosen and its predicted device peak, host RAM and PCIe per step."""
        o = self.options
        what = [f"moment_dtype={o['moment_dtype']}", f"state_store={o['state_store']}",
                f"recompute_activations={o['recompute_activations']}"]
        if self.plan.device != "cpu":
            what += [f"offload={o['offload']}", f"state_chunk_mib={_mib(o['state_chunk_mib'])}"]
        what += [f"{name}=True" for name in WEIGHT_OPTIONS if o.get(name)]  # only where placed
        p = self.plan
        pred = _prediction(p) + (f", PCIe {gb(p.pcie_per_step)} per step" if p.device != "cpu" else "")
        return f"hift memory=auto: {', '.join(what)} -> predicted {pred}; budgets {self.budgets.describe()}"


def _mib(x) -> str:
    return "None" if x is None else x if isinstance(x, str) else f"{x:.4g}"


def machine_budgets(device_type: str, device_index: Optional[int] = None, model_bytes_on_device: int = 0,
                    state_dir: Optional[str] = None) -> Budgets:
    """What this machine has free now: the device's free memory plus what the model already
    holds there (the plan counts the weights), the host's available RAM (plus the model's bytes,
    on a CPU), and the free disk under state_dir."""
    host = _host_available()
    device = None
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device_index)
        device = free + model_bytes_on_device
    else:
        host += model_bytes_on_device
    disk = _disk_free(state_dir) if state_dir else None
    return Budgets(host=host, device=device, disk=disk)


def machine_capacity(device_type: str, device_index: Optional[int] = None,
                     state_dir: Optional[str] = None) -> Budgets:
    """What this machine has at all for what rests on a run's ranks (hift.plan.resting's check of
    options the user set): the device's total memory (what the process holds there already is
    part of it), the host's available RAM (the node's: its ranks share it), and the free disk
    under state_dir with the state files an earlier run left there (the disk store truncates
    them, so a resume in the same state_dir has their room too)."""
    device = None
    if device_type == "cuda":
        import torch

        index = torch.cuda.current_device() if device_index is None else device_index
        device = torch.cuda.get_device_properties(index).total_memory
    disk = None
    if state_dir:
        from hift.store import state_files

        disk = _disk_free(state_dir) + sum(f.stat().st_size for f in state_files(state_dir))
    return Budgets(host=_host_available(), device=device, disk=disk)


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _disk_free(state_dir: str) -> int:
    return shutil.disk_usage(_existing_parent(state_dir)).free


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def block_chunk_mib(trace: UnitTrace, precision: str, group_size: int, moment_dtype: str,
                    master_format: str = "auto") -> Optional[float]:
    """The state of the largest group made of blocks alone, in MiB: chunks of it keep every
    such group whole. None where no group is all blocks."""
    fmt = state_format(precision, moment_dtype, master_format)
    sizes = [sum(trace.numels[u] for u in g) for g in make_group_ranges(len(trace.numels), group_size)
             if all(trace.kinds[u] == "block" for u in g)]
    return max(sizes) * fmt.bytes_per_element / 2**20 if sizes else None


def _placements(fixed: dict, device: str, ranks: int, placements) -> list[tuple[bool, bool]]:
    """(shard_weights, offload_weights) in the module's order: the weights resident first, then
    those of `placements` FSDP2 can do on this many ranks, as `fixed` allows (a placement fixed
    on is tried whether or not `placements` names it)."""
    placements = set(placements) | {name for name in WEIGHT_OPTIONS if fixed.get(name)}
    order = [(False, False)]
    if device == "cpu":  # the weights are in host memory already: only sharding makes a rank's share smaller
        if ranks > 1 and "shard_weights" in placements:
            order.append((True, False))
    else:
        if ranks > 1 and "shard_weights" in placements:
            order.append((True, False))
            if "offload_weights" in placements:
                order.append((True, True))
        elif ranks == 1 and "offload_weights" in placements:
            order.append((False, True))
    return [(s, o) for s, o in order if fixed.get("shard_weights", s) == s and fixed.get("offload_weights", o) == o]


def _candidates(fixed: dict, device: str, ranks: int = 1, placements=()):
    weighed = bool(placements) or any(name in fixed for name in WEIGHT_OPTIONS)
    for shard, offload_weights in _placements(fixed, device, ranks, placements):
        for options in _state_candidates(fixed, device):
            if offload_weights and not options["offload"]:
                continue  # the update runs on the host, where the state rests
            yield {**options, **(dict(shard_weights=shard, offload_weights=offload_weights) if weighed else {})}


def _state_candidates(fixed: dict, device: str):
    gpu = device != "cpu"
    space = {
        "state_store": ("host", "disk"),
        "recompute_activations": (False, True),
        "moment_dtype": MOMENTS,
        "state_chunk_mib": CHUNK_MIBS if gpu else (None,),
        "offload": (False, True) if gpu else (False,),
    }
    axes = [[fixed[name]] if name in fixed else list(values) for name, values in space.items()]
    # itertools.product walks the last axis fastest: the list above is the preference order
    for values in itertools.product(*axes):
        options = dict(zip(space, values))
        if gpu and not options["offload"] and (options["state_store"] == "disk" or options["state_chunk_mib"]):
            continue  # the disk store and chunks keep the state off the device
        yield options


def _fits(plan: Breakdown, budgets: Budgets) -> bool:
    room = 1 - MARGIN
    if plan.device != "cpu" and budgets.device is not None and plan.total > room * budgets.device:
        return False
    if plan.host_ram > room * budgets.host:
        return False
    return not (plan.disk and budgets.disk is not None and plan.disk > room * budgets.disk)


def predict(trace: UnitTrace, options: dict, *, precision: str, group_size: int, recompute_boundary: Optional[int],
            device: str, master_format: str = "auto", prefetch: bool = True, ranks: int = 1,
            reduce_dtype: str = "fp32", ranks_per_node: Optional[int] = None) -> Breakdown:
    """plan_hift for one set of the memory options ("blocks" resolved to a size); with the weights
    placed (shard_weights, offload_weights), hift.plan.fsdp's breakdown (its host: a node's)."""
    chunk = options["state_chunk_mib"]
    if chunk == BLOCKS:
        chunk = block_chunk_mib(trace, precision, group_size, options["moment_dtype"], master_format)
    if options.get("shard_weights") or options.get("offload_weights"):
        from hift.plan.fsdp import plan_placed

        return plan_placed(trace, precision, group_size, prefetch, offload=bool(options["offload"]),
                           state_chunk_mib=chunk,
                           recompute_boundary=recompute_boundary if options["recompute_activations"] else None,
                           moment_dtype=options["moment_dtype"], master_format=master_format,
                           state_store=options["state_store"], ranks=ranks, reduce_dtype=reduce_dtype,
                           shard_weights=bool(options.get("shard_weights")),
                           offload_weights=bool(options.get("offload_weights")),
                           ranks_per_node=ranks_per_node, device=device).breakdown
    return plan_hift(trace, precision, group_size, prefetch, offload=bool(options["offload"]) and device != "cpu",
                     state_chunk_mib=chunk,
                     recompute_boundary=recompute_boundary if options["recompute_activations"] else None,
                     moment_dtype=options["moment_dtype"], master_format=master_format,
                     state_store=options["state_store"], device=device, ranks=ranks, reduce_dtype=reduce_dtype)


def choose(trace: UnitTrace, budgets: Budgets, fixed: dict, *, precision: str, group_size: int,
           recompute_boundary: Optional[int], device: str, master_format: str = "auto", prefetch: bool = True,
           ranks: int = 1, reduce_dtype: str = "fp32", placements=(),
           ranks_per_node: Optional[int] = None) -> MemoryChoice:
    """The first combination (in the module's order) of the options not in `fixed` that fits.
    placements: which of WEIGHT_OPTIONS the run can do (none: the weights stay whole on the
    device, and the options say nothing of them); `fixed` may hold them too. Refuses in words,
    with the planner's numbers, where none does."""
    common = dict(precision=precision, group_size=group_size, recompute_boundary=recompute_boundary, device=device,
                  master_format=master_format, prefetch=prefetch, ranks=ranks, reduce_dtype=reduce_dtype,
                  ranks_per_node=ranks_per_node)
    unknown = set(placements) - set(WEIGHT_OPTIONS)
    if unknown:
        raise ValueError(f"placements are among {WEIGHT_OPTIONS}, got {sorted(unknown)}")
    if recompute_boundary is None:
        fixed = {**fixed, "recompute_activations": fixed.get("recompute_activations", False)}
    seen = []
    for options in _candidates(fixed, device, ranks, placements):
        plan = predict(trace, options, **common)
        if _fits(plan, budgets):
            return _resolved(trace, options, plan, budgets, fixed, common)
        seen.append((options, plan))
    if not seen:
        raise MemoryPlanError(f"hift memory=auto: {_describe(fixed)} leaves nothing to try on {ranks} rank(s) "
                              f"with placements {tuple(placements) or 'none'}")
    smallest = min(seen, key=lambda op: _overshoot(op[1], budgets))
    message = (f"hift memory=auto: nothing fits {budgets.describe()}. With "
               f"{_describe(fixed) or 'no option set'}, the smallest is {_describe(smallest[0])}: "
               f"{_prediction(smallest[1])}.")
    if fixed:
        free = [(o, p) for o in _candidates({}, device, ranks, placements) for p in [predict(trace, o, **common)]
                if _fits(p, budgets)]
        if free:
            message += f" Without your {', '.join(sorted(fixed))}, {_describe(free[0][0])} fits: {_prediction(free[0][1])}."
    raise MemoryPlanError(message + " A smaller batch or sequence, a larger group_size of fewer units, or a "
                          "larger machine would fit too (`hift plan --device-memory GB --host-memory GB`).")


def _resolved(trace, options, plan, budgets, fixed, common) -> MemoryChoice:
    options = dict(options)
    if options["state_chunk_mib"] == BLOCKS:
        options["state_chunk_mib"] = block_chunk_mib(trace, common["precision"], common["group_size"],
                                                     options["moment_dtype"], common["master_format"])
    return MemoryChoice(options, plan, budgets, tuple(n for n in (*AUTO_OPTIONS, *WEIGHT_OPTIONS)
                                                      if n in options and n not in fixed))


def _overshoot(plan: Breakdown, budgets: Budgets) -> float:
    ratios = [plan.host_ram / budgets.host]
    if plan.device != "cpu" and budgets.device:
        ratios.append(plan.total / budgets.device)
    return max(ratios)


def _describe(options: dict) -> str:
    return ", ".join(f"{k}={_mib(v) if k == 'state_chunk_mib' else v}" for k, v in options.items())


def gb(nbytes: int) -> str:
    """Bytes in GB (1e9), with enough digits that a small run's numbers are not all zeros."""
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / GB:.3g} GB"


def _prediction(plan: Breakdown) -> str:
    where = "device peak" if plan.device != "cpu" else "process growth above the weights"
    total = plan.total if plan.device != "cpu" else plan.above_model
    return f"{where} {gb(total)}, host RAM {gb(plan.host_ram)}" + (f", disk {gb(plan.disk)}" if plan.disk else "")
