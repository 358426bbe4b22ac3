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

    @dispatch(split={"batch": even_rows}, reduce={"loss": "sum"})
    def forgetful(self, batch):
        return {"loss": float(batch["x"].sum()), "entropy": 0.5}


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


def test_a_result_key_without_a_declared_reduction_is_an_error_not_rank_0s_value():
    with pytest.raises(KeyError, match="Worker.forgetful returned entropy, whose reduction over ranks its @dispatch "
                                       "does not declare"):
        _ranks("forgetful", 2, {"x": torch.ones(4)})


def test_a_train_batch_with_a_key_the_update_does_not_know_is_refused_where_it_is_made():
    from rlhf.batching import TrainBatch, checked
    rows = {k: torch.zeros(2, 3) for k in ("sequences", "attention_mask", "response_ids", "action_mask")}
    assert checked({**rows, "advantages": torch.zeros(2, 3), "old_logprobs": torch.zeros(2, 3)}, TrainBatch)
    with pytest.raises(KeyError, match=r"unknown keys \['old_logprob'\], missing \[\]"):
        checked({**rows, "old_logprob": torch.zeros(2, 3)}, TrainBatch)  # a misspelt key would never be read
    with pytest.raises(KeyError, match=r"missing \['action_mask'\]"):
        checked({k: v for k, v in rows.items() if k != "action_mask"}, TrainBatch)


def test_lists_and_update_plans_split_whole():
    assert even_items(list("abcd"), 2).parts == [["a", "b"], ["c", "d"]]
    shards = padded_items(list("abcde"), 2)
    assert shards.parts == [["a", "b", "c"], ["d", "e", "e"]] and shards.real == [3, 2]
    plan = UpdatePlan([{"x": torch.arange(4)}, {"x": torch.arange(4, 8)}], [10, 12])
    parts = update_plan(plan, 2).parts
    assert [s["x"].tolist() for s in parts[1].steps] == [[2, 3], [6, 7]]
    assert parts[0].tokens == [10, 12]  # each minibatch's loss is normalised by its global token count
