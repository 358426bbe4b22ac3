"""The role interface's plumbing without Ray: how a worker method's declared split gives each rank its own shard, and
how the ranks' results reduce."""
from __future__ import annotations

import pytest
import torch

from actors.dispatch import (dispatch, even_items, even_rows, padded_items, padded_rows, reduce_results,
                             shard_arguments, update_plan)
from rlhf.roles import UpdatePlan


class Worker:
    role, rank = "test", 0

    @dispatch(split={"batch": padded_rows}, reduce="concat")
    def score(self, batch, scale: float):
        return batch["x"] * scale

    @dispatch(split={"batch": even_rows}, reduce={"loss": "sum", "grad_norm": "first", "rows": "concat"})
    def step(self, batch, tokens: int):
        return {"loss": float(batch["x"].sum()) / tokens, "grad_norm": 1.5, "rows": batch["x"]}


def _ranks(method, world, *args):
    """What each of `world` ranks computes, and the reduced result, as both group implementations do it."""
    per_rank, real = shard_arguments(Worker, method, world, args, {})
    results = [getattr(Worker(), method)(**kwargs) for kwargs in per_rank]
    return per_rank, reduce_results(getattr(Worker, method).dispatch, results, real)


def test_a_rank_receives_only_its_shard_and_the_padding_copies_are_dropped():
    batch = {"x": torch.arange(7.0)}
    per_rank, out = _ranks("score", 3, batch, 2.0)
    assert [kw["batch"]["x"].tolist() for kw in per_rank] == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]
    assert all(kw["scale"] == 2.0 for kw in per_rank)  # arguments not declared as split go to every rank whole
    assert out.tolist() == [2 * i for i in range(7)]  # rank order, the copies of the last row gone


def test_training_splits_must_be_even_and_stats_reduce_as_declared():
    batch = {"x": torch.ones(8)}
    _, out = _ranks("step", 2, batch, 8)
    assert out["loss"] == pytest.approx(1.0)  # two shares of the global mean add up to it
    assert out["grad_norm"] == 1.5 and out["rows"].shape == (8,)
    with pytest.raises(ValueError, match="does not split evenly"):
        _ranks("step", 3, batch, 8)


def test_lists_and_update_plans_split_whole():
    assert even_items(list("abcd"), 2).parts == [["a", "b"], ["c", "d"]]
    shards = padded_items(list("abcde"), 2)
    assert shards.parts == [["a", "b", "c"], ["d", "e", "e"]] and shards.real == [3, 2]
    plan = UpdatePlan([{"x": torch.arange(4)}, {"x": torch.arange(4, 8)}], [10, 12])
    parts = update_plan(plan, 2).parts
    assert [s["x"].tolist() for s in parts[1].steps] == [[2, 3], [6, 7]]
    assert parts[0].tokens == [10, 12]  # each minibatch's loss is normalised by its global token count
