"""The placement planner: which bundles each role group's ranks take, for every command and for sweep trials.

A role with a layout of its own gets a placement group of one bundle per rank (a whole GPU each when the cluster
has GPUs); a role that colocates with another shares its host's bundles, each rank taking a fraction of the GPU.
The plan is computed once from the run's layouts; `reserve` makes it real, inside a Ray Tune trial by taking the
planned bundles of the trial's own placement group (which `trial_bundles` sized), elsewhere as new groups. Before
that, `room_for` compares the bundles with the cluster's nodes: a plan the cluster can never hold stops the command
at once, saying why, instead of leaving a placement group (or a Tune trial) pending forever.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import ray
from ray.util.placement_group import (PlacementGroup, get_current_placement_group, placement_group,
                                      remove_placement_group)

from rlhf.config import ConfigError, LayoutConfig, ranks


class PlacementError(ConfigError):
    """A layout that cannot be placed as written, or on this cluster; one line naming the key."""


READY_TIMEOUT_S = 600.0
"""How long a placement group the cluster could hold may wait for busy resources (or, rebuilding a run's groups,
for a lost node to come back) before the command gives up."""


@dataclass(frozen=True)
class Slot:
    """Where a role group's ranks go: bundles [offset, offset + ranks) of the placement group `group`."""
    group: str
    offset: int = 0


@dataclass
class PlacementPlan:
    layouts: dict[str, LayoutConfig]
    """The role groups the run starts, in start order."""
    bundles: dict[str, list[dict]]
    """Placement group (named after its host role) -> one bundle per rank."""
    strategies: dict[str, str]
    slots: dict[str, Slot]

    def cpus(self) -> float:
        return sum(b["CPU"] for group in self.bundles.values() for b in group)

    def trial_bundles(self, driver_cpus: float) -> list[dict]:
        """A sweep trial's placement group: its controller's bundle first, then every group's bundles in order."""
        return [{"CPU": driver_cpus}] + [dict(b) for group in self.bundles.values() for b in group]

    def groups(self) -> list[tuple[list[dict], str]]:
        """Every placement group's (bundles, strategy), as `room_for` takes them."""
        return [(bundles, self.strategies[name]) for name, bundles in self.bundles.items()]

    def describe(self) -> str:
        """`policy+critic 2 x (2 CPU, 1 GPU), reference 1 x (0.5 CPU)`: each placement group, named after the roles
        on its bundles."""
        parts = []
        for name, bundles in self.bundles.items():
            roles = "+".join(role for role, slot in self.slots.items() if slot.group == name) or name
            parts.append(f"{roles} {len(bundles)} x ({show(bundles[0])})")
        return ", ".join(parts)

    def trial_offsets(self) -> dict[str, int]:
        """Where each placement group's bundles start inside the trial's placement group."""
        offsets, at = {}, 1
        for name, group in self.bundles.items():
            offsets[name] = at
            at += len(group)
        return offsets


def plan_placement(layouts: dict[str, LayoutConfig], use_gpu: bool) -> PlacementPlan:
    """Plan the bundles of `layouts` (role -> layout, in start order); colocated roles join their host's group."""
    for role, layout in layouts.items():
        host = layout.colocate_with
        if not host:
            continue
        if host not in layouts:
            raise PlacementError(f"roles.{role}.layout.colocate_with: {host} has no group in this run")
        if layouts[host].colocate_with:
            raise PlacementError(f"roles.{role}.layout.colocate_with: {host} colocates with "
                                 f"{layouts[host].colocate_with} itself; name that role instead")
        if ranks(layout) > ranks(layouts[host]):
            raise PlacementError(f"roles.{role}.layout: {ranks(layout)} ranks do not fit the "
                                 f"{ranks(layouts[host])} bundles of {host}, which it colocates with")
    for host, layout in layouts.items():
        guests = {r: g for r, g in layouts.items() if g.colocate_with == host}
        # Guest rank i sits on the host's bundle (GPU) i, so the low GPUs carry every guest: check each one.
        for gpu in range(ranks(layout) if guests else 0):
            share = layout.gpu_fraction + sum(g.gpu_fraction for g in guests.values() if ranks(g) > gpu)
            if share > 1 + 1e-9:
                raise PlacementError(f"roles.*.layout.gpu_fraction: GPU {gpu} of {host}'s group is asked for "
                                     f"{share:.2f} of itself by {host} and {', '.join(guests)}; lower the fractions")
    bundles: dict[str, list[dict]] = {}
    strategies: dict[str, str] = {}
    # Hosts of colocated roles first (their bundles carry every guest's CPUs), then the roles on their own.
    hosts = [r for r, lay in layouts.items() if not lay.colocate_with and
             any(g.colocate_with == r for g in layouts.values())]
    alone = [r for r, lay in layouts.items() if not lay.colocate_with and r not in hosts]
    for role in hosts + alone:
        layout = layouts[role]
        cpus = layout.cpus_per_rank + sum(g.cpus_per_rank for g in layouts.values() if g.colocate_with == role)
        bundles[role] = [{"CPU": cpus, **({"GPU": 1} if use_gpu else {})} for _ in range(ranks(layout))]
        strategies[role] = layout.strategy
    slots = {role: Slot(layout.colocate_with or role) for role, layout in layouts.items()}
    return PlacementPlan(dict(layouts), bundles, strategies, slots)


# --- whether the cluster can ever hold it ------------------------------------------------------------------------

def show(resources: dict) -> str:
    """`2 CPU, 1 GPU`."""
    return ", ".join(f"{value:g} {key}" for key, value in resources.items())


def total(bundles: list[dict]) -> dict[str, float]:
    summed: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            summed[key] = summed.get(key, 0.0) + value
    return summed


def _fits(bundle: dict, node: dict) -> bool:
    return all(node.get(key, 0.0) >= value - 1e-9 for key, value in bundle.items())


def never_placed(groups: list[tuple[list[dict], str]], nodes: list[dict]) -> Optional[str]:
    """Why a cluster of `nodes` (each node's total resources) can never hold every group (bundles, strategy) at once,
    as the end of a sentence (`the Ray cluster has 2 CPU in all`); None when it can. Busy resources do not count:
    those are freed, and placement waits for them."""
    wanted = total([b for bundles, _ in groups for b in bundles])
    have = total(nodes)
    for key, amount in wanted.items():
        if amount > have.get(key, 0.0) + 1e-9:
            return f"the Ray cluster has {have.get(key, 0.0):g} {key} in all"
    most = {key: max((n.get(key, 0.0) for n in nodes), default=0.0) for key in wanted}
    for bundles, strategy in groups:
        for bundle in bundles:
            if not any(_fits(bundle, n) for n in nodes):
                return f"no node of the Ray cluster holds a bundle of ({show(bundle)}) (at most {show(most)} per node)"
        if strategy == "STRICT_PACK" and not any(_fits(total(bundles), n) for n in nodes):
            return f"no node of the Ray cluster holds {show(total(bundles))} at once, which STRICT_PACK asks for"
        holders = sum(_fits(bundles[0], n) for n in nodes) if bundles else 0
        if strategy == "STRICT_SPREAD" and holders < len(bundles):
            return (f"{holders} node(s) of the Ray cluster hold a bundle of ({show(bundles[0])}), and STRICT_SPREAD "
                    f"puts each of {len(bundles)} on a node of its own")
    return None


def what_to_change(keys: str, why: str, started_ray: bool, also: str = "") -> str:
    """The end of the message when there is no room: the keys that shrink the plan, or more cluster."""
    more = ("raise ray.num_cpus" if started_ray and " CPU" in why else
            "run on a bigger cluster (ray.wait_for_nodes_s waits for nodes that are still joining)")
    return f"lower {keys}.gpus_per_node (ranks per node) or {keys}.cpus_per_rank{also}, or {more}"


def cluster_nodes() -> list[dict]:
    """The total resources of each live node (what `ray.cluster_resources()` sums)."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def room_for(groups: list[tuple[list[dict], str]], wait_s: float = 0.0) -> Optional[str]:
    """None once the cluster could hold `groups`; else why it cannot, at once or (wait_s > 0) after waiting that
    long for nodes to join, asking Ray's autoscaler, where there is one, for them meanwhile."""
    why = never_placed(groups, cluster_nodes())
    if why is None or wait_s <= 0:
        return why
    from ray.autoscaler.sdk import request_resources
    print(f"waiting up to {wait_s:g} s for the cluster to grow: {why}", flush=True)
    request_resources(bundles=[dict(b) for bundles, _ in groups for b in bundles])
    deadline = time.monotonic() + wait_s
    try:
        while why is not None and time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            why = never_placed(groups, cluster_nodes())
    finally:
        request_resources(bundles=[])  # the placement groups made next ask for what they need themselves
    return why


# --- making the plan real on Ray --------------------------------------------------------------------------------

def reserve(plan: PlacementPlan, timeout_s: float = READY_TIMEOUT_S, start_id: str = "") -> dict[str, PlacementGroup]:
    """Placement group name -> a Ray placement group, ready; inside a Tune trial, slices of the trial's own. In
    Ray a group is named `policy [START_ID]`: unique to this start, so runs sharing a namespace never clash."""
    enclosing = get_current_placement_group()
    offsets = plan.trial_offsets()
    made: dict[str, PlacementGroup] = {}
    try:
        for name, bundles in plan.bundles.items():
            if enclosing is not None:
                made[name] = _slice(enclosing, name, offsets[name], bundles)
                continue
            pg = placement_group([dict(b) for b in bundles], strategy=plan.strategies[name],
                                 name=f"{name} [{start_id}]" if start_id else name)
            made[name] = pg
            ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
            if not ready:
                raise PlacementError(f"{name}: the cluster cannot place {len(bundles)} bundles of {bundles[0]} "
                                     f"({plan.strategies[name]}) within {timeout_s:.0f} s; free resources or "
                                     f"shrink roles.{name}.layout")
    except BaseException:
        for pg in made.values():
            if enclosing is None:
                remove_placement_group(pg)
        raise
    return made


def release(groups: dict[str, PlacementGroup]) -> None:
    """Give the bundles back: a trial's slices return to the trial, groups of their own are removed."""
    for pg in groups.values():
        if not isinstance(pg, TrialSlice):
            remove_placement_group(pg)


class TrialSlice(PlacementGroup):
    """Bundles of a sweep trial's placement group, from `offset` on, held by one role group."""

    def __init__(self, enclosing: PlacementGroup, offset: int):
        super().__init__(enclosing.id, enclosing.bundle_cache)
        self.offset = offset


def _slice(enclosing: PlacementGroup, name: str, offset: int, bundles: list[dict]) -> TrialSlice:
    specs = enclosing.bundle_specs
    wanted = range(offset, offset + len(bundles))
    if wanted.stop > len(specs) or any(specs[i].get(k, 0) < v - 1e-9 for i, b in zip(wanted, bundles)
                                       for k, v in b.items()):
        raise PlacementError(f"{name}: the sweep trial's placement group {specs} has no bundles {list(wanted)} of "
                             f"{bundles[0]}; the trial was sized for another layout")
    return TrialSlice(enclosing, offset)
