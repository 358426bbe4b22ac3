"""How a worker method's input is split over a role's ranks and how their results combine, declared once.

    @dispatch(split={"batch": padded_rows}, reduce="concat")
    def logprobs(self, batch): ...

Both implementations of the role interface (Ray role groups in `actors.group`, one process in `actors.local`) read
the declaration: the named arguments are split before anything is sent, so a rank receives only its shard, every
other argument goes to every rank as it is, and the ranks' results are reduced as declared. The controller never
slices a batch for the ranks nor guesses how to combine what they return.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from actors.faults import fault_point
from rlhf.batching import Batch, chunk
from rlhf.roles import UpdatePlan

Splitter = Callable[[Any, int], "Shards"]
Reducer = Union[str, dict]


@dataclass
class Shards:
    """One value per rank; `real[r]` items of rank r's shard are real, the rest are filler a concatenation drops."""
    parts: list
    real: Optional[list[int]] = None


@dataclass(frozen=True)
class Dispatch:
    split: dict[str, Splitter] = field(default_factory=dict)
    reduce: Reducer = "first"
    method: str = ""


def dispatch(split: Optional[dict[str, Splitter]] = None, reduce: Reducer = "first") -> Callable:
    """Declare how a worker method's arguments split over ranks (`split`: argument name -> splitter) and how the
    ranks' results reduce: "concat" (rank order; tensors, dicts of tensors or lists), "sum", "mean", "first"
    (rank 0's: the same on every rank, or written by rank 0 alone), or a dict of those per result key, which must
    name every key the method returns (a key it does not name is an error, never a silent rank 0's value)."""
    def mark(method: Callable) -> Callable:
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            fault_point(self.role, self.rank, method.__name__)
            return method(self, *args, **kwargs)
        wrapper.dispatch = Dispatch(dict(split or {}), reduce, method.__qualname__)  # type: ignore[attr-defined]
        return wrapper
    return mark


def declared(worker_cls: type, method: str) -> Dispatch:
    fn = getattr(worker_cls, method, None)
    spec = getattr(fn, "dispatch", None)
    if spec is None:
        raise AttributeError(f"{worker_cls.__name__}.{method} is not a role method (no @dispatch)")
    return spec


def shard_arguments(worker_cls: type, method: str, world: int, args: tuple,
                    kwargs: dict) -> tuple[list[dict], Optional[list[int]]]:
    """Each rank's keyword arguments for one call, and the real item counts of the (first) padded split."""
    spec = declared(worker_cls, method)
    bound = inspect.signature(getattr(worker_cls, method)).bind(None, *args, **kwargs)
    values = dict(bound.arguments)
    values.pop(next(iter(values)))  # self
    per_rank = [dict(values) for _ in range(world)]
    real = None
    for name, splitter in spec.split.items():
        if values.get(name) is None:
            continue
        shards = splitter(values[name], world)
        for r in range(world):
            per_rank[r][name] = shards.parts[r]
        real = real or shards.real
    return per_rank, real


# --- splitters --------------------------------------------------------------------------------------------------

def even_rows(batch: Batch, world: int) -> Shards:
    """Equal contiguous row blocks (training: every rank must take the same number of micro-steps)."""
    return Shards([chunk(batch, r, world) for r in range(world)])


def padded_rows(batch: Batch, world: int) -> Shards:
    """Contiguous row blocks of equal size, the last ones filled with copies of the last row (ZeRO-3 ranks must
    run the same forwards); the copies' results are dropped by a "concat" reduction."""
    n = next(iter(batch.values())).shape[0]
    size = -(-n // world)
    parts, real = [], []
    for r in range(world):
        index = torch.arange(r * size, (r + 1) * size).clamp(max=n - 1)
        parts.append({k: v[index] for k, v in batch.items()})
        real.append(max(0, min(size, n - r * size)))
    return Shards(parts, real)


def even_items(items: Sequence, world: int) -> Shards:
    """Equal contiguous blocks of a list (whole ranked lists stay on one rank)."""
    if len(items) % world:
        raise ValueError(f"{len(items)} items do not split evenly over {world} ranks")
    share = len(items) // world
    return Shards([list(items[r * share:(r + 1) * share]) for r in range(world)])


def padded_items(items: Sequence, world: int) -> Shards:
    """Contiguous list blocks of equal size, the last ones filled with copies of the last item; a "concat"
    reduction drops the copies' results (so a rank returns one result per item)."""
    size = -(-len(items) // world)
    parts = [[items[min(i, len(items) - 1)] for i in range(r * size, (r + 1) * size)] for r in range(world)]
    return Shards(parts, [max(0, min(size, len(items) - r * size)) for r in range(world)])


def update_plan(plan: UpdatePlan, world: int) -> Shards:
    """Each optimizer step's minibatch (and PPO-ptx rows) split into equal contiguous row blocks; the token
    counts stay global, since every rank's loss is a share of the whole minibatch's."""
    def part(batches: Optional[list[Batch]], r: int) -> Optional[list[Batch]]:
        return None if batches is None else [chunk(b, r, world) for b in batches]
    return Shards([UpdatePlan(part(plan.steps, r), plan.tokens, part(plan.ptx, r), plan.ptx_tokens)
                   for r in range(world)])


# --- reductions -------------------------------------------------------------------------------------------------

def _concat(values: list, real: Optional[list[int]]) -> Any:
    if real is not None:
        values = [_head(v, n) for v, n in zip(values, real)]
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if isinstance(first, dict):
        return {k: _concat([v[k] for v in values], None) for k in first}
    return [item for v in values for item in v]


def _head(value: Any, n: int) -> Any:
    if isinstance(value, dict):
        return {k: _head(v, n) for k, v in value.items()}
    return value[:n]


def _reduce_one(kind: str, values: list, real: Optional[list[int]]) -> Any:
    if kind == "concat":
        return _concat(values, real)
    if kind == "sum":
        return sum(values[1:], values[0])
    if kind == "mean":
        return sum(values[1:], values[0]) / len(values)
    if kind == "first":
        return values[0]
    raise ValueError(f"unknown reduction {kind!r}")


def reduce_results(spec: Dispatch, results: list, real: Optional[list[int]]) -> Any:
    if isinstance(spec.reduce, dict):
        undeclared = sorted(set(results[0]) - set(spec.reduce))
        if undeclared:
            raise KeyError(f"{spec.method} returned {', '.join(undeclared)}, whose reduction over ranks its @dispatch "
                           "does not declare")
        return {k: _reduce_one(spec.reduce[k], [r[k] for r in results], real) for k in results[0]}
    return _reduce_one(spec.reduce, results, real)
