"""Placement on a simulated 3-node cluster with declared GPUs and no CUDA behind them: SPREAD puts a group's
ranks on different nodes, PACK on one, and the ranks still rendezvous and train on CPU."""
from __future__ import annotations

import pytest

from actors.group import RayBackend
from actors.lm import SFTWorker
from actors.rank import RankSpec
from conftest import simulated_cluster
from rlhf.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_nodes():
    with simulated_cluster(nodes=3, cpus=2, gpus=2) as cluster:
        yield cluster


def _start(tiny, *overrides: str):
    cfg = load_config("sft", None, ["layout.gpus_per_node=2", "layout.cpus_per_rank=1", *overrides])
    spec = RankSpec(tiny["base"], cfg.role(), cfg.model, cfg.seed, trainable=True, total_steps=10)
    return RayBackend(cfg.ray).start({"sft": (SFTWorker, spec)})


@pytest.mark.parametrize("strategy, nodes", [("SPREAD", 2), ("PACK", 1)])
def test_strategy_decides_the_nodes(three_nodes, tiny, strategy, nodes):
    from actors.group import RayGroup, cluster_has_gpus
    from actors.placement import plan_placement, release, reserve
    cfg = load_config("sft", None, ["layout.gpus_per_node=2", "layout.cpus_per_rank=1", f"layout.strategy={strategy}"])
    placements = reserve(plan_placement({"sft": cfg.layout}, cluster_has_gpus()))
    # The ranks as placed, before they build anything: where they run is the planner's and Ray's doing alone.
    group = RayGroup("sft", SFTWorker, RankSpec(tiny["base"], cfg.role(), cfg.model, cfg.seed), placements["sft"], 0,
                     cluster_has_gpus())
    try:
        info = group.node_info()
    finally:
        group.shutdown()
        release(placements)
    assert group.use_gpu  # the cluster declares GPUs, so each rank reserved one ...
    assert all(i["gpu_ids"] for i in info)
    assert not any(i["cuda"] for i in info)  # ... and runs on CPU, since none is really there
    assert len({i["node_id"] for i in info}) == nodes


def test_spread_ranks_train_together_across_nodes(three_nodes, tiny):
    from rlhf.batching import collate_sft
    from rlhf.data import load_dialogues
    from rlhf.modeling import load_tokenizer
    from rlhf.moss import tokenize_dialogue
    groups = _start(tiny, "layout.strategy=SPREAD", "train.micro_batch_size=4", "train.global_batch_size=8")
    group = groups.groups["sft"]
    try:
        tok = load_tokenizer(tiny["tokenizer"])
        batch = collate_sft([tokenize_dialogue(d, tok, 128) for d in load_dialogues(tiny["sft_train"])[:8]],
                            tok.pad_token_id)
        tokens = int(batch["loss_mask"][:, 1:].sum())
        for _ in range(2):
            group.call("train_step", batch, tokens).result()
        digests = group.call("weights_digest").result()
        assert len({i["node_id"] for i in group.node_info()}) == 2
    finally:
        groups.stop()
    assert digests[0] == pytest.approx(digests[1], abs=1e-9)
