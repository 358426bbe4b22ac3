"""A role as a group of ranks: one Ray actor per rank, placed with a placement group, joined by torch.distributed.

The controller calls a method on every rank at once; a worker method decorated with `@chunked` takes its own
rank's share of the global batch, and `gather` concatenates the ranks' results in rank order.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional, Sequence

import ray
import torch
from ray.util.placement_group import (PlacementGroup, get_current_placement_group, placement_group,
                                      remove_placement_group)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.faults import fault_point, runtime_env
from rlhf.batching import chunk, concat
from rlhf.config import LayoutConfig, ranks

log = logging.getLogger(__name__)


def chunked(method: Callable) -> Callable:
    """Marks a worker method whose first argument is the global batch: the rank sees only its contiguous chunk,
    and the controller concatenates the ranks' results in rank order."""
    @functools.wraps(method)
    def wrapper(self, batch, *args, **kwargs):
        fault_point(self.role, self.rank, method.__name__)
        return method(self, chunk(batch, self.rank, self.world_size), *args, **kwargs)
    wrapper.gather = "concat"  # type: ignore[attr-defined]
    return wrapper


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


class PlacementSlice(PlacementGroup):
    """Bundles [offset, offset + count) of the placement group this process runs in: a Ray Tune trial reserves
    every bundle of its run up front (rlhf.sweep), so the run's role groups take theirs from it."""

    def __init__(self, enclosing: PlacementGroup, offset: int, count: int):
        super().__init__(enclosing.id, enclosing.bundle_cache)
        self.offset, self.count = offset, count


# Bundles of an enclosing placement group held by role groups, by its id; bundle 0 is the trial's controller.
_taken: dict[Any, set[int]] = {}


def _take_bundles(enclosing: PlacementGroup, name: str, count: int, wanted: dict) -> PlacementSlice:
    """The first `count` consecutive free bundles of the enclosing group that each fit `wanted`."""
    specs = enclosing.bundle_specs
    taken = _taken.setdefault(enclosing.id, {0})
    for start in range(1, len(specs) - count + 1):
        block = range(start, start + count)
        if all(i not in taken and all(specs[i].get(k, 0) >= v - 1e-9 for k, v in wanted.items()) for i in block):
            taken.update(block)
            return PlacementSlice(enclosing, start, count)
    raise RuntimeError(f"{name}: the enclosing placement group (a sweep trial's) has no {count} free bundles of "
                       f"{wanted}; its bundles are {specs} and {sorted(taken)} are taken, so the trial's resources "
                       f"do not match the role layout")


def release_placement_group(pg: PlacementGroup) -> None:
    """Give a role group's bundles back: a slice returns to the enclosing trial, a group of its own is removed."""
    if isinstance(pg, PlacementSlice):
        _taken.get(pg.id, set()).difference_update(range(pg.offset, pg.offset + pg.count))
    else:
        remove_placement_group(pg)


def make_placement_group(name: str, layout: LayoutConfig, use_gpu: bool, cpus_per_bundle: float) -> PlacementGroup:
    """One bundle per rank (a whole GPU each when there are GPUs; colocated roles take fractions of it).

    Inside a placement group already (a Ray Tune trial), the bundles come from it instead: reserving more would
    oversubscribe what the trial was given."""
    bundle = {"CPU": cpus_per_bundle}
    if use_gpu:
        bundle["GPU"] = 1
    enclosing = get_current_placement_group()
    if enclosing is not None:
        return _take_bundles(enclosing, name, ranks(layout), bundle)
    pg = placement_group([dict(bundle) for _ in range(ranks(layout))], strategy=layout.strategy, name=name)
    ready, _ = ray.wait([pg.ready()], timeout=600)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(f"{name}: the cluster cannot place {ranks(layout)} bundles of {bundle} "
                           f"({layout.strategy}); free resources or shrink the layout")
    return pg


class RoleGroup:
    """N ranks of one role. `worker_cls` is a plain class (actors.worker.RankWorker subclass); its constructor
    receives (role, rank, world_size, **init_kwargs)."""

    def __init__(self, role: str, worker_cls: type, layout: LayoutConfig, init_kwargs: dict,
                 placement: Optional[PlacementGroup] = None, use_gpu: Optional[bool] = None):
        self.role = role
        self.layout = layout
        self.world_size = ranks(layout)
        self.use_gpu = cluster_has_gpus() if use_gpu is None else use_gpu
        self.owns_placement = placement is None
        self.placement = placement or make_placement_group(
            f"{role}-{id(self):x}", layout, self.use_gpu, layout.cpus_per_rank)
        offset = getattr(self.placement, "offset", 0)  # a slice of a trial's placement group starts further on
        remote_cls = ray.remote(worker_cls)
        threads = max(1, int(layout.cpus_per_rank))
        self.workers = [
            remote_cls.options(
                num_cpus=layout.cpus_per_rank,
                num_gpus=layout.gpu_fraction if self.use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement,
                                                                     placement_group_bundle_index=offset + rank),
                **({"runtime_env": runtime_env()} if runtime_env() else {}),
            ).remote(role, rank, self.world_size, num_threads=threads, **init_kwargs)
            for rank in range(self.world_size)
        ]
        try:
            one_node = len({info["node_id"] for info in self.node_info()}) == 1
            addr, port = ray.get(self.workers[0].master_endpoint.remote(one_node))
            ray.get([w.init_distributed.remote(addr, port) for w in self.workers])
        except BaseException:
            self.shutdown()
            raise
        self._gather = {name: getattr(getattr(worker_cls, name), "gather", None) for name in dir(worker_cls)
                        if callable(getattr(worker_cls, name, None)) and not name.startswith("__")}

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Start `method` on every rank with the same arguments (ObjectRefs are resolved by Ray on each rank)."""
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers]

    def call_each(self, method: str, per_rank: Sequence[tuple], **kwargs: Any) -> list[ray.ObjectRef]:
        """Start `method` on every rank with that rank's own arguments (batches the controller split itself)."""
        return [getattr(w, method).remote(*args, **kwargs) for w, args in zip(self.workers, per_rank)]

    def gather(self, method: str, refs: Sequence[ray.ObjectRef]) -> Any:
        """Wait for a call and combine its results as the method declares: concatenated, or rank 0's."""
        results = ray.get(list(refs))
        if self._gather.get(method) == "concat":
            return concat(results) if isinstance(results[0], dict) else torch.cat(results)
        return results[0]

    def run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.gather(method, self.call(method, *args, **kwargs))

    def node_info(self) -> list[dict]:
        return ray.get([w.node_info.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        if self.owns_placement:
            release_placement_group(self.placement)
