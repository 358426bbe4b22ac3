"""Role groups on Ray: one actor per rank, placed as the planner says, joined by torch.distributed.

A call of a role method splits the arguments its worker method declares (`actors.dispatch`) and puts each rank's
shard into the object store on its own, so a rank receives its shard only; the future reduces the ranks' results as
declared, and turns a dead rank into `RankDied` naming the role and rank. Every rank actor says what it is in Ray's
dashboard: its repr `ppo/critic rank 1/2` (in a sweep `... of trial 3f2a1_00001 (ppo.kl_coef=0.1)`), and a name
unique to that start of the group. While a run's backend is open, every step it logs also sets Ray gauges
(`export_metrics`), which the node's metrics agent serves to Prometheus and the dashboard's Metrics view.
"""
from __future__ import annotations

import math
import secrets
import sys
import threading
from dataclasses import dataclass
from typing import Any, Optional

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.dispatch import declared, reduce_results, shard_arguments
from actors.faults import runtime_env
from actors.placement import (READY_TIMEOUT_S, PlacementError, PlacementPlan, TrialSlice, plan_placement, release,
                              reserve, room_for, show, total, what_to_change)
from actors.rank import RankSpec
from actors.runtime import ensure_ray
from rlhf.config import RayConfig, ranks
from rlhf.metrics import TAG_KEYS, Trial, current_trial, prometheus_name, set_exporter
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


@dataclass(frozen=True)
class RankLabels:
    """What a group's rank actors are called in Ray's dashboard, `ray list actors` and the state API."""
    command: str = ""
    """sft, rm, dpo or ppo: the command whose run the ranks are."""
    trial: Optional[Trial] = None
    """The sweep trial the run is, if any."""
    restart: int = 0
    """How many times the run rebuilt this role's group after a dead rank."""
    start_id: str = ""
    """Unique to this start of the group; empty: the actors get no name."""

    def repr(self, role: str, rank: int, world_size: int) -> str:
        """`ppo/critic rank 1/2`, `rm/reward rank 0/1 of trial 3f2a1_00001 (optim.lr=0.0003)`, `..., restart 1`."""
        text = self._rank(role, rank, world_size)
        if self.trial:
            text += f" of {self.trial}"
        return text + (f", restart {self.restart}" if self.restart else "")

    def name(self, role: str, rank: int, world_size: int) -> Optional[str]:
        """`ppo/critic rank 1/2 [3f2a1_00001 9c0e4b]`: named actors are unique in a namespace, and a rebuilt group's
        must not collide with its dead predecessor's, which Ray frees a moment after the kill."""
        if not self.start_id:
            return None
        trial = f"{self.trial.id} " if self.trial else ""
        return f"{self._rank(role, rank, world_size)} [{trial}{self.start_id}]"

    def _rank(self, role: str, rank: int, world_size: int) -> str:
        return f"{self.command + '/' if self.command else ''}{role} rank {rank}/{world_size}"


class RayGroup:
    """N ranks of one role. `worker_cls` is an `actors.rank.RankWorker`; every rank gets the same `spec`."""

    def __init__(self, role: str, worker_cls: type, spec: RankSpec, placement: PlacementGroup, offset: int,
                 use_gpu: bool, labels: RankLabels = RankLabels()):
        self.role, self.worker_cls, self.spec, self.use_gpu = role, worker_cls, spec, use_gpu
        layout = spec.role.layout
        self.world_size = ranks(layout)
        remote_cls = ray.remote(worker_cls)
        extra = {"runtime_env": runtime_env()} if runtime_env() else {}
        self.workers = []
        for rank in range(self.world_size):
            name = labels.name(role, rank, self.world_size)
            self.workers.append(remote_cls.options(
                num_cpus=layout.cpus_per_rank, num_gpus=layout.gpu_fraction if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement,
                                                                     placement_group_bundle_index=offset + rank),
                **({"name": name} if name else {}), **extra,
            ).remote(role, rank, self.world_size, spec, num_threads=max(1, int(layout.cpus_per_rank)),
                     label=labels.repr(role, rank, self.world_size)))

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


_gauges: dict[str, Any] = {}
_export_failed = False
_open_backends = 0
_open_lock = threading.Lock()  # rm-strength opens several backends side by side, in threads


def export_metrics(step: int, values: dict, tags: dict) -> None:
    """A logged step as Ray gauges, `rlhf_<name>` (and `rlhf_step`), tagged with the run (`rlhf.metrics.TAG_KEYS`).
    Ray pushes them to its node's metrics agent every few seconds; Prometheus scrapes them from there."""
    global _export_failed
    if _export_failed or not ray.is_initialized():
        return
    from ray.util.metrics import Gauge
    try:
        for key, value in {"step": step, **values}.items():
            if not math.isfinite(value):
                continue  # as metrics.jsonl writes null: no point, rather than a NaN that breaks every graph
            name = prometheus_name(key)
            if name not in _gauges:
                _gauges[name] = Gauge(name, f"{key}, as the run logs it to metrics.jsonl", TAG_KEYS)
            _gauges[name].set(float(value), tags)
    except (RuntimeError, TypeError, ValueError) as err:  # metrics must never stop a run: say it once, go on
        _export_failed = True
        print(f"metrics: no longer exported to Ray ({type(err).__name__}: {err})", file=sys.stderr, flush=True)


def _count_open(delta: int) -> None:
    """Export logged metrics while any backend is open in this process."""
    global _open_backends
    with _open_lock:
        _open_backends += delta
        set_exporter(export_metrics if _open_backends > 0 else None)


class RayBackend:
    """Starts (or joins) Ray for a run and places its role groups with the planner; while open, the run's logged
    metrics also go to Ray's."""

    local = False

    def __init__(self, cfg: RayConfig, command: str = ""):
        self.cfg, self.command = cfg, command
        self.started = False
        self.starts: dict[str, int] = {}
        """Role -> how many times its group was started (a recovered run starts it again)."""
        self.exporting = False

    def open(self, cpus_needed: float) -> None:
        self.started = ensure_ray(self.cfg, cpus_needed) or self.started  # a second open keeps the first's Ray
        if not self.exporting:
            _count_open(1)
            self.exporting = True

    def close(self) -> None:
        if self.exporting:
            _count_open(-1)
            self.exporting = False
        if self.started:
            ray.shutdown()
            self.started = False

    def plan(self, roles: dict[str, tuple[type, RankSpec]]) -> PlacementPlan:
        return plan_placement({name: spec.role.layout for name, (_, spec) in roles.items()},
                              ray.is_initialized() and cluster_has_gpus())

    def start(self, roles: dict[str, tuple[type, RankSpec]]) -> "Groups":
        """Every role's ranks, placed and built (side by side); on any failure nothing is left holding bundles.
        A plan the cluster can never hold stops here with what it needs, what the cluster has and the keys to change
        (a sweep trial's bundles were checked and placed with the trial)."""
        plan = self.plan(roles)
        # Rebuilding after a dead rank, the node it died with may be on its way back: wait for it ray.node_wait_s.
        rebuild = any(self.starts.get(name) for name in roles)
        if get_current_placement_group() is None:
            wait_s = max(self.cfg.wait_for_nodes_s, self.cfg.node_wait_s if rebuild else 0.0)
            why = room_for(plan.groups(), wait_s)
            if why:
                raise PlacementError(self.no_room(plan, why))
        use_gpu = cluster_has_gpus()
        start_id, trial = secrets.token_hex(3), current_trial()
        groups = Groups({}, reserve(plan, timeout_s=self.cfg.node_wait_s if rebuild else READY_TIMEOUT_S,
                                    start_id=start_id))
        try:
            for name, (worker_cls, spec) in roles.items():
                slot = plan.slots[name]
                pg = groups.placements[slot.group]
                offset = getattr(pg, "offset", 0) + slot.offset
                self.starts[name] = self.starts.get(name, 0) + 1
                labels = RankLabels(self.command, trial, self.starts[name] - 1, start_id)
                groups.groups[name] = RayGroup(name, worker_cls, spec, pg, offset, use_gpu, labels)
            pending = {name: group.start() for name, group in groups.groups.items()}
            for name, refs in pending.items():
                wait(groups.groups[name], refs)
        except BaseException:
            groups.stop()
            raise
        return groups

    def no_room(self, plan: PlacementPlan, why: str) -> str:
        keys = "roles.<role>.layout" if self.command == "ppo" else "layout"
        needed = show(total([b for bundles, _ in plan.groups() for b in bundles]))
        return f"the role groups need {needed} ({plan.describe()}) but {why}; {what_to_change(keys, why, self.started)}"


class Groups:
    """The started groups of a run and the bundles they hold."""

    def __init__(self, groups: dict, placements: dict[str, PlacementGroup]):
        self.groups, self.placements = groups, placements

    def held_bundles(self) -> list[tuple[list[dict], str]]:
        """The bundles and strategy of each placement group these groups hold, read before they are released (a
        recovered run waits until the cluster could hold them again); none in a sweep trial, whose bundles Tune
        holds."""
        held = []
        for pg in (pg for pg in self.placements.values() if not isinstance(pg, TrialSlice)):
            try:
                held.append(([dict(b) for b in pg.bundle_specs], placement_group_table(pg).get("strategy", "PACK")))
            except (ray.exceptions.RaySystemError, KeyError, ValueError):
                continue  # a group Ray no longer knows: it is being rebuilt from the plan anyway
        return held

    def stop(self) -> None:
        for group in self.groups.values():
            group.shutdown()
        release(self.placements)
        self.placements = {}
