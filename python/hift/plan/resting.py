"""What rests on each rank of a sharded run for the whole run, against what the machine has: the
check of memory options the user set (memory="manual", or "auto" with none left to choose), so
that a world size whose share cannot be held is refused in words before any step and before the
model changes (fit shards it in place), not out of memory once training has begun.

Only what rests is held to the machine: the rank's share of the weights where they rest (its
rows on the device, or in host RAM with offload_weights) and of the optimizer state where the
options put it (all of it on the device with offload off; its device slots, and every group's
share in host RAM, with offload; the staging buffers in host RAM and the files on disk with the
disk store). These are the planner's exact bytes (hift.plan.fsdp.plan_placed, as memory="auto"
predicts them). The peaks above them (activations, the units FSDP2 gathers, gradients) are
estimates, and a user who set the options may know better: a false refusal is worse than none, so
they are not checked, and no margin is taken.

What the machine has (auto.machine_capacity): on a GPU the device's total memory, each rank its
own; host RAM available now, shared by the node's ranks (torchrun's LOCAL_WORLD_SIZE), plus what
the process holds there already and gives up to its share (the model it loaded, on a CPU); free
disk under state_dir, shared by the node's ranks too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hift.plan.auto import Budgets, MemoryPlanError, gb
from hift.plan.predict import Breakdown


@dataclass
class Resting:
    """One rank's resting bytes by where they are (device: None on a CPU, where it is the host)."""

    host: int
    disk: int = 0
    device: Optional[int] = None
    weights: int = 0  # of which the rank's rows of the weights (on the device; on a CPU, the host)


def share_of(plan: Breakdown, ranks_per_node: int) -> Resting:
    """A rank's resting bytes in a placed plan (auto.predict with shard_weights / offload_weights,
    or a sharded model's: host RAM and disk are its node's there, of ranks_per_node ranks)."""
    on_device = plan.weights + plan.optimizer  # the weights' rows and the state's slots (all of it, offload off)
    host, disk = plan.host // ranks_per_node, plan.disk // ranks_per_node
    if plan.device == "cpu":
        return Resting(host=on_device + host, disk=disk, weights=plan.weights)
    return Resting(host=host, disk=disk, device=on_device, weights=plan.weights)


def check(share: Resting, capacity: Budgets, *, ranks: int, ranks_per_node: int, options: dict,
          held_on_host: int = 0, sharded_by_user: bool = False, label: str = "hift") -> None:
    """Refuse, in words, a share that one of the rank's memories cannot hold. capacity: the
    machine's (auto.machine_capacity: host RAM and disk a node's); held_on_host: what the process
    holds in host RAM now and gives up to its share (the model it loaded, on a CPU); options: the
    run's memory and weight options, and sharded_by_user (fully_shard's, not shard_weights), to
    name the fixes that apply."""
    host_has = capacity.host // ranks_per_node + held_on_host
    over = []
    if share.device is not None and capacity.device is not None and share.device > capacity.device:
        over.append(("device", f"device memory {gb(share.device)} (its share of the weights "
                               f"{gb(share.weights)}, the optimizer state's {gb(share.device - share.weights)}), and "
                               f"the device has {gb(capacity.device)}"))
    if share.host > host_has:
        node = f", shared by the node's {ranks_per_node} ranks" if ranks_per_node > 1 else ""
        held = f", with the {gb(held_on_host)} it holds now" if held_on_host else ""
        what = "" if share.device is not None else \
            f" (its share of the weights {gb(share.weights)}, the optimizer state's {gb(share.host - share.weights)})"
        over.append(("host", f"host RAM {gb(share.host)}{what}, and it has {gb(host_has)} ({gb(capacity.host)} "
                             f"available{node}{held})"))
    if share.disk and capacity.disk is not None and share.disk * ranks_per_node > capacity.disk:
        over.append(("disk", f"disk {gb(share.disk)} under state_dir, and it has "
                             f"{gb(capacity.disk // ranks_per_node)} ({gb(capacity.disk)} free"
                             + (f", shared by the node's {ranks_per_node} ranks)" if ranks_per_node > 1 else ")")))
    if not over:
        return
    where = {name for name, _ in over}
    who = f"each of the {ranks} ranks" if ranks > 1 else "the one rank"
    raise MemoryPlanError(
        f"{label}: {who} must hold, for the whole run, " + "; and ".join(text for _, text in over)
        + ". (Only what rests is counted: the peaks of a step come on top.) "
        + _fixes(where, options, ranks_per_node, sharded_by_user) + ".")


def _fixes(where: set, options: dict, ranks_per_node: int, sharded_by_user: bool) -> str:
    """The changes that make the share that is over smaller, in words."""
    fixes = ["more ranks (each rests 1/N of the weights and of the state" +
             (": host RAM and disk are a node's, so on more nodes)" if where & {"host", "disk"} and ranks_per_node > 1
              else ")")]
    if "device" in where:
        if not options.get("offload_weights"):
            fixes.append("fully_shard(..., offload_policy=CPUOffloadPolicy()) (the weights' share in host RAM, the "
                         "update on the host)" if sharded_by_user else
                         "offload_weights=True (the weights' share in host RAM, the update on the host)")
        if not options.get("offload") and not options.get("offload_weights"):
            fixes.append("offload=True (the state's share in host RAM, through device slots)")
    if "disk" in where:
        fixes.append("a state_dir on a disk with more room")
    if "host" in where and options.get("state_store") != "disk":
        fixes.append('state_store="disk" with a state_dir (the state\'s share in files)')
    smaller = {"fp32": 'moment_dtype="bf16" or "int8"', "bf16": 'moment_dtype="int8"'}.get(options.get("moment_dtype"))
    if smaller:
        fixes.append(f"compact state formats ({smaller})")
    fixes.append('or memory="auto" with those options unset (it chooses what fits, or says why nothing does)')
    return "Fixes: " + ", ".join(fixes)
