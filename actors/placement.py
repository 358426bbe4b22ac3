"""The placement planner: which bundles each role group's ranks take, for every command and for sweep trials.

A role with a layout of its own gets a placement group of one bundle per rank (a whole GPU each when the cluster
has GPUs); a role that colocates with another shares its host's bundles, each rank taking a fraction of the GPU.
The plan is computed once from the run's layouts; `reserve` makes it real, inside a Ray Tune trial by taking the
planned bundles of the trial's own placement group (which `trial_bundles` sized), elsewhere as new groups.
"""
from __future__ import annotations

from dataclasses import dataclass
import ray
from ray.util.placement_group import (PlacementGroup, get_current_placement_group, placement_group,
                                      remove_placement_group)

from rlhf.config import LayoutConfig, ranks


class PlacementError(ValueError):
    """A layout that cannot be placed as written; one line naming the key."""


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


# --- making the plan real on Ray --------------------------------------------------------------------------------

def reserve(plan: PlacementPlan, timeout_s: float = 600) -> dict[str, PlacementGroup]:
    """Placement group name -> a Ray placement group, ready; inside a Tune trial, slices of the trial's own."""
    enclosing = get_current_placement_group()
    offsets = plan.trial_offsets()
    made: dict[str, PlacementGroup] = {}
    try:
        for name, bundles in plan.bundles.items():
            if enclosing is not None:
                made[name] = _slice(enclosing, name, offsets[name], bundles)
                continue
            pg = placement_group([dict(b) for b in bundles], strategy=plan.strategies[name], name=name)
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
