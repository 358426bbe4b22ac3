"""Role groups on Ray: one actor per rank, placed as the planner says, joined by torch.distributed.

A call of a role method splits the arguments its worker method declares (`actors.dispatch`) and puts each rank's
shard into the object store on its own, so a rank receives its shard only; the future reduces the ranks' results as
declared, and turns a dead rank into `RankDied` naming the role and rank.
"""
from __future__ import annotations

from typing import Any, Optional

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.dispatch import declared, reduce_results, shard_arguments
from actors.faults import runtime_env
from actors.placement import PlacementPlan, plan_placement, release, reserve
from actors.rank import RankSpec
from rlhf.config import RayConfig, ranks
from rlhf.roles import RankDied


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


class RayFuture:
    def __init__(self, group: "RayGroup", method: str, refs: list, real: Optional[list[int]]):
        self.group, self.method, self.refs, self.real = group, method, refs, real

    def result(self) -> Any:
        return reduce_results(declared(self.group.worker_cls, self.method), wait(self.group, self.refs), self.real)


def wait(group: "RayGroup", refs: list) -> list:
    """ray.get, with a dead rank as RankDied and one of our own errors raised on a rank (a bad model path, a rule
    that broke) as itself, so the command line prints it in one line as it would in the driver."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayActorError as err:
        raise RankDied(group.who(err), " ".join(str(err).split())[:160]) from None
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception) and type(cause).__module__.split(".")[0] in ("rlhf", "reward", "actors"):
            raise cause from None
        if type(cause).__name__ == "DistNetworkError":
            # The group could not rendezvous (the free port rank 0 picked was taken before it bound it, a node went
            # away): as good as a dead rank; the run's recovery starts the groups again on fresh ports.
            raise RankDied(f"{group.role} rank 0 (at its rendezvous)", " ".join(str(cause).split())[:160]) from None
        raise


class RayGroup:
    """N ranks of one role. `worker_cls` is an `actors.rank.RankWorker`; every rank gets the same `spec`."""

    def __init__(self, role: str, worker_cls: type, spec: RankSpec, placement: PlacementGroup, offset: int,
                 use_gpu: bool):
        self.role, self.worker_cls, self.spec, self.use_gpu = role, worker_cls, spec, use_gpu
        layout = spec.role.layout
        self.world_size = ranks(layout)
        remote_cls = ray.remote(worker_cls)
        extra = {"runtime_env": runtime_env()} if runtime_env() else {}
        self.workers = [
            remote_cls.options(
                num_cpus=layout.cpus_per_rank, num_gpus=layout.gpu_fraction if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement,
                                                                     placement_group_bundle_index=offset + rank),
                **extra,
            ).remote(role, rank, self.world_size, spec, num_threads=max(1, int(layout.cpus_per_rank)))
            for rank in range(self.world_size)
        ]

    def start(self) -> list:
        """Rendezvous and build every rank's engine; returns the refs to wait on (groups start side by side)."""
        one_node = len({info["node_id"] for info in self.node_info()}) == 1
        addr, port = ray.get(self.workers[0].master_endpoint.remote(one_node))
        return [w.setup.remote(addr, port) for w in self.workers]

    def call(self, method: str, *args: Any, **kwargs: Any) -> RayFuture:
        per_rank, real = shard_arguments(self.worker_cls, method, self.world_size, args, kwargs)
        split = declared(self.worker_cls, method).split
        refs = []
        for worker, rank_kwargs in zip(self.workers, per_rank):
            # Each rank's shard goes into the object store on its own: a rank fetches only what it was given.
            sent = {k: (ray.put(v) if k in split and v is not None else v) for k, v in rank_kwargs.items()}
            refs.append(getattr(worker, method).remote(**sent))
        return RayFuture(self, method, refs, real)

    def node_info(self) -> list[dict]:
        return wait(self, [w.node_info.remote() for w in self.workers])

    def who(self, err: Exception) -> str:
        """`critic rank 0` for the error of one of this group's dead ranks."""
        dead = getattr(err, "actor_id", None)
        for rank, worker in enumerate(self.workers):
            if dead and worker._actor_id.hex() == dead:
                return f"{self.role} rank {rank}"
        return f"a {self.role} rank"

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)


class RayBackend:
    """Starts (or joins) Ray for a run and places its role groups with the planner."""

    local = False

    def __init__(self, cfg: RayConfig):
        self.cfg = cfg
        self.started = False

    def open(self, cpus_needed: float) -> None:
        from actors.runtime import ensure_ray
        self.started = ensure_ray(self.cfg, cpus_needed)

    def close(self) -> None:
        if self.started:
            ray.shutdown()
            self.started = False

    def plan(self, roles: dict[str, tuple[type, RankSpec]]) -> PlacementPlan:
        return plan_placement({name: spec.role.layout for name, (_, spec) in roles.items()},
                              ray.is_initialized() and cluster_has_gpus())

    def start(self, roles: dict[str, tuple[type, RankSpec]]) -> "Groups":
        """Every role's ranks, placed and built (side by side); on any failure nothing is left holding bundles."""
        plan = self.plan(roles)
        use_gpu = cluster_has_gpus()
        groups = Groups({}, reserve(plan))
        try:
            for name, (worker_cls, spec) in roles.items():
                slot = plan.slots[name]
                pg = groups.placements[slot.group]
                offset = getattr(pg, "offset", 0) + slot.offset
                groups.groups[name] = RayGroup(name, worker_cls, spec, pg, offset, use_gpu)
            pending = {name: group.start() for name, group in groups.groups.items()}
            for name, refs in pending.items():
                wait(groups.groups[name], refs)
        except BaseException:
            groups.stop()
            raise
        return groups


class Groups:
    """The started groups of a run and the bundles they hold."""

    def __init__(self, groups: dict, placements: dict[str, PlacementGroup]):
        self.groups, self.placements = groups, placements

    def stop(self) -> None:
        for group in self.groups.values():
            group.shutdown()
        release(self.placements)
        self.placements = {}
