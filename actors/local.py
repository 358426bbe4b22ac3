"""The role interface in one process: every role a single rank, each call run when it is made.

For controller tests (the same `PPOTrainer`, no Ray) and the benchmarks' no-Ray baseline. The workers are the Ray
groups' own classes with world size 1, so the math, the engines and the dispatch declarations are the same; what
this leaves out is what Ray adds (actors, object transfers, the ranks of a group working side by side).
"""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Iterator

import torch

from actors.dispatch import declared, reduce_results, shard_arguments
from actors.rank import RankSpec
from rlhf.checkpoint import load_rng_state, save_rng_state


class Done:
    """A result computed already."""

    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        return self.value


class LocalGroup:
    world_size = 1

    def __init__(self, role: str, worker_cls: type, spec: RankSpec):
        self.role, self.worker_cls = role, worker_cls
        self.threads = max(1, int(spec.role.layout.cpus_per_rank))
        self.rng = None
        with self.as_rank():  # seeds its own RNG streams, as a rank process of its own does
            self.worker = worker_cls(role, 0, 1, spec)

    @contextlib.contextmanager
    def as_rank(self) -> Iterator[None]:
        """Run as this rank's own process would: its RNG streams (so sampling draws what the Ray rank draws) and
        its torch threads; the caller's are given back after."""
        caller, threads = save_rng_state(), torch.get_num_threads()
        if self.rng is not None:
            load_rng_state(self.rng)
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            self.rng = save_rng_state()
            load_rng_state(caller)
            torch.set_num_threads(threads)

    def start(self) -> dict:
        with socket.socket() as s:  # the one-rank process group every engine of this process shares
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with self.as_rank():
            return self.worker.setup("127.0.0.1", port)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Done:
        per_rank, real = shard_arguments(self.worker_cls, method, 1, args, kwargs)
        with self.as_rank():
            result = getattr(self.worker, method)(**per_rank[0])
        return Done(reduce_results(declared(self.worker_cls, method), [result], real))

    def node_info(self) -> list[dict]:
        return [{"role": self.role, "rank": 0, "node_id": "local", "hostname": socket.gethostname(),
                 "pid": os.getpid(), "gpu_ids": [], "cuda": self.worker.cuda}]

    def shutdown(self) -> None:
        self.worker = None


class LocalBackend:
    """Builds every role in this process; `open`/`close` start and stop nothing."""

    local = True

    def open(self, cpus_needed: float) -> None:
        pass

    def close(self) -> None:
        pass

    def start(self, roles: dict[str, tuple[type, RankSpec]]) -> "LocalGroups":
        groups = LocalGroups({name: LocalGroup(name, cls, spec) for name, (cls, spec) in roles.items()})
        for group in groups.groups.values():
            group.start()
        return groups


class LocalGroups:
    def __init__(self, groups: dict[str, LocalGroup]):
        self.groups = groups

    def held_bundles(self) -> list[tuple[list[dict], str]]:
        """No placement groups in one process (`actors.group.Groups.held_bundles`)."""
        return []

    def stop(self) -> None:
        for group in self.groups.values():
            group.shutdown()
