"""Config.shard_weights (offload_weights): hift shards the model with FSDP2 itself, one FSDP
module per unit.

The units are found on the unsharded model (hift.groups); the optimizer state and its masters
are made from the full weights, the model is cast to the run's precision, and only then is
every unit made an FSDP module of its own (fully_shard on the modules that hold exactly its
parameters), and the root last (it takes what no unit's modules hold: at most one unit's
parameters, and the frozen ones). So no bit is lost: an fp32 model's bf16 run keeps its fp32
masters, as without FSDP. A group is then a set of whole FSDP modules, and a step's backward
reduce-scatters the active group's modules alone.

plan() decides and refuses before anything changes; shard() applies it (HiftAdamW.cast_model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from hift.config import ConfigError
from hift.fsdp import mesh_device
from hift.groups import Group


@dataclass
class ShardPlan:
    modules: list[list[nn.Module]]  # per unit (in group order), the modules of its FSDP module; [] for the root's


def plan(model: nn.Module, groups: list[Group]) -> ShardPlan:
    """Per unit, the modules that hold exactly its trainable parameters (the highest ones that
    hold no other unit's); a unit that no such modules cover goes to the root. Refused in words:
    two units in the root, or a parameter that two FSDP modules would hold."""
    units = [u for g in groups for u in g.units]
    unit_of = {id(p): k for k, u in enumerate(units) for p in u.params}
    parent: dict[int, Optional[nn.Module]] = {id(model): None}
    for module in model.modules():
        for child in module.children():
            parent.setdefault(id(child), module)
    trained_units: dict[int, set[int]] = {}

    def units_in(module: nn.Module) -> set[int]:
        if id(module) not in trained_units:
            trained_units[id(module)] = {unit_of[id(p)] for _, p in module.named_parameters(remove_duplicate=False)
                                         if id(p) in unit_of}
        return trained_units[id(module)]

    holders: dict[int, list[nn.Module]] = {}  # id(param) -> the modules it is registered on
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append(module)
    modules: list[list[nn.Module]] = []
    for k, unit in enumerate(units):
        chosen, covered = [], True
        for p in unit.params:
            for holder in holders[id(p)]:
                best, at = None, holder
                while at is not None and at is not model:
                    if units_in(at) == {k}:
                        best = at
                    at = parent[id(at)]
                if best is None:
                    covered = False
                elif all(best is not m for m in chosen):
                    chosen.append(best)
        chosen = [m for m in chosen if not any(m is not o and _inside(m, o, parent) for o in chosen)]
        modules.append(chosen if covered else [])
    rooted = [k for k, m in enumerate(modules) if not m]
    if len(rooted) > 1:
        shown = ", ".join(f"{units[k].kind} ({units[k].names[0]}, ...)" for k in rooted[:3])
        raise ConfigError(
            f"shard_weights: hift makes each unit one FSDP module, and {len(rooted)} units ({shown}) are not made of "
            "whole modules (a parameter of theirs sits on a module beside another unit's, or is shared with one): "
            "only one unit can be the root's. Pass units= made of whole modules, or shard the model yourself with "
            "fully_shard and leave shard_weights off")
    _refuse_shared(model, units, modules, holders, parent)
    return ShardPlan(modules)


def _inside(module: nn.Module, other: nn.Module, parent: dict) -> bool:
    at = parent.get(id(module))
    while at is not None:
        if at is other:
            return True
        at = parent.get(id(at))
    return False


def _refuse_shared(model, units, modules, holders, parent) -> None:
    """A parameter registered on two modules (tied) must land in one FSDP module."""
    fsdp_of = {id(m): k for k, ms in enumerate(modules) for m in ms}

    def owner(module: nn.Module) -> int:
        at = module
        while at is not None:
            if id(at) in fsdp_of:
                return fsdp_of[id(at)]
            at = parent.get(id(at))
        return -1  # the root

    names = {id(p): n for n, p in model.named_parameters()}
    for pid, mods in holders.items():
        owners = {owner(m) for m in mods}
        if len(owners) > 1:
            where = ["the root" if o < 0 else f"unit {units[o].kind} ({units[o].names[0]}, ...)" for o in sorted(owners)]
            raise ConfigError(
                f"shard_weights: {names.get(pid, 'a parameter')} is shared by modules that would be different FSDP "
                f"modules ({' and '.join(where)}); FSDP shards each module's parameters on its own. Untie it, pass "
                "units= that keep its modules in one unit, or shard the model yourself")


def check_world(cfg) -> None:
    """Refuse in words, before anything is planned or changed, what shard_weights / offload_weights
    cannot mean on this world: no process group; offload_weights on several ranks without
    shard_weights (FSDP2 shards over them)."""
    import torch.distributed as dist

    asked = "shard_weights" if cfg.shard_weights else "offload_weights"
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(f"{asked} runs the model on FSDP2, over the ranks of a process group: start the run with "
                          "torchrun (one rank too: --nproc_per_node 1) and call hift.distributed.init_process_group() "
                          "(or torch's) first")
    if not cfg.shard_weights and dist.get_world_size() > 1:
        raise ConfigError(f"offload_weights on {dist.get_world_size()} ranks: FSDP2 offloads each rank's shard of the "
                          "weights, so pass shard_weights=True with it (on one rank it needs none)")


def default_mesh(cfg):
    """fully_shard's default mesh: every rank of the default process group, on the accelerator
    (each rank's current device) where there is one, else the CPU. (check_world has refused what
    cannot be meshed: memory_plan.plan_run calls it before anything is planned.)"""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return init_device_mesh(accelerator.type if accelerator is not None else "cpu", (dist.get_world_size(),))


def shard_device(mesh, offload: bool) -> torch.device:
    """Where fully_shard puts this rank's rows: the host with offload, else the mesh's device."""
    return torch.device("cpu") if offload else mesh_device(mesh)


def shard(model: nn.Module, plan: ShardPlan, groups: list[Group], mesh, offload: bool) -> None:
    """fully_shard each unit's modules, then the root, over `mesh` (offload: FSDP's
    CPUOffloadPolicy, the rows in host memory); the groups' units then hold the sharded
    parameters (fully_shard registers new ones)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for modules in plan.modules:
        if modules:
            fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    for group in groups:
        for unit in group.units:
            unit.params = [model.get_parameter(name) for name in unit.names]
