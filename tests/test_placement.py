"""Placement on a simulated 3-node cluster with declared GPUs and no CUDA behind them: SPREAD puts a group's
ranks on different nodes, PACK on one, and the ranks still rendezvous and train on CPU."""
from __future__ import annotations

import pytest
import ray

from actors.group import RoleGroup
from actors.worker import LMWorker
from conftest import simulated_cluster
from rlhf.config import load_config, to_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_nodes():
    with simulated_cluster(nodes=3, cpus=2, gpus=2) as cluster:
        yield cluster


def _group(strategy: str) -> RoleGroup:
    cfg = load_config(None, ["layout.gpus_per_node=2", f"layout.strategy={strategy}", "layout.cpus_per_rank=1"])
    return RoleGroup("policy", LMWorker, cfg.layout, {"config": to_dict(cfg)})


@pytest.mark.parametrize("strategy, nodes", [("SPREAD", 2), ("PACK", 1)])
def test_strategy_decides_the_nodes(three_nodes, strategy, nodes):
    group = _group(strategy)
    try:
        info = group.node_info()
    finally:
        group.shutdown()
    assert group.use_gpu  # the cluster declares GPUs, so each rank reserved one ...
    assert all(i["gpu_ids"] for i in info)
    assert not any(i["cuda"] for i in info)  # ... and runs on CPU, since none is really there
    assert len({i["node_id"] for i in info}) == nodes


def test_spread_ranks_train_together_across_nodes(three_nodes, tiny):
    from rlhf.batching import collate_sft
    from rlhf.data import load_dialogues
    from rlhf.modeling import load_tokenizer
    from rlhf.moss import tokenize_dialogue
    cfg = load_config(None, ["layout.gpus_per_node=2", "layout.strategy=SPREAD", "train.micro_batch_size=4",
                             "train.global_batch_size=8"])
    conf = to_dict(cfg)
    group = RoleGroup("sft", LMWorker, cfg.layout, {"config": conf})
    try:
        group.run("setup", tiny["base"], True, conf["deepspeed"], conf["optim"], conf["lora"], 4, 1, 10)
        tok = load_tokenizer(tiny["tokenizer"])
        batch = collate_sft([tokenize_dialogue(d, tok, 128) for d in load_dialogues(tiny["sft_train"])[:8]],
                            tok.pad_token_id)
        tokens = int(batch["loss_mask"][:, 1:].sum())
        for _ in range(2):
            group.run("sft_step", ray.put(batch), tokens)
        digests = ray.get(group.call("weights_digest"))
        assert len({i["node_id"] for i in group.node_info()}) == 2
    finally:
        group.shutdown()
    assert digests[0] == pytest.approx(digests[1], abs=1e-9)
