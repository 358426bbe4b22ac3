"""Where the ranks go. The planner's bundles without Ray: colocated roles share their host's bundles, a sweep trial
reserves them in order, a layout that cannot be placed is refused in one line. Then on a simulated 3-node cluster
with declared GPUs and no CUDA behind them: SPREAD puts a group's ranks on different nodes, PACK on one, and the
ranks still rendezvous and train on CPU."""
from __future__ import annotations

import pytest

from actors.group import RayBackend
from actors.lm import SFTWorker
from actors.placement import PlacementError, plan_placement
from actors.rank import RankSpec
from conftest import simulated_cluster
from rlhf.config import LayoutConfig, load_config


def _layout(**kw) -> LayoutConfig:
    return LayoutConfig(**{"gpus_per_node": 2, **kw})


def test_colocated_roles_share_their_hosts_bundles_and_a_trial_reserves_them_in_order():
    plan = plan_placement({"policy": _layout(gpu_fraction=0.5, cpus_per_rank=2),
                           "reference": _layout(gpu_fraction=0.25, colocate_with="policy"),
                           "critic": _layout(gpus_per_node=1)}, use_gpu=True)
    assert plan.bundles["policy"] == [{"CPU": 3.0, "GPU": 1}] * 2  # its own CPUs and the guest's
    assert plan.slots["reference"].group == "policy" and "reference" not in plan.bundles
    assert plan.trial_bundles(1.0) == [{"CPU": 1.0}, *plan.bundles["policy"], *plan.bundles["critic"]]
    assert plan.trial_offsets() == {"policy": 1, "critic": 3}
    assert plan.cpus() == 7.0


@pytest.mark.parametrize("layouts, message", [
    ({"policy": _layout(), "critic": _layout(colocate_with="reward")}, "reward has no group"),
    ({"policy": _layout(gpus_per_node=1), "critic": _layout(colocate_with="policy")}, "do not fit the 1 bundles"),
    ({"policy": _layout(gpu_fraction=0.6), "critic": _layout(gpu_fraction=0.5, colocate_with="policy")},
     "GPU 0 of policy's group is asked for 1.10"),
])
def test_a_layout_that_cannot_be_placed_is_refused_in_one_line(layouts, message):
    with pytest.raises(PlacementError, match=message):
        plan_placement(layouts, use_gpu=True)


# --- on a simulated cluster ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_nodes():
    with simulated_cluster(nodes=3, cpus=2, gpus=2) as cluster:
        yield cluster


def _start(tiny, *overrides: str):
    cfg = load_config("sft", None, ["layout.gpus_per_node=2", "layout.cpus_per_rank=1", *overrides])
    spec = RankSpec(tiny["base"], cfg.role(), cfg.model, cfg.seed, trainable=True, total_steps=10)
    return RayBackend(cfg.ray).start({"sft": (SFTWorker, spec)})


@pytest.mark.slow
@pytest.mark.parametrize("strategy, nodes", [("SPREAD", 2), ("PACK", 1)])
def test_strategy_decides_the_nodes(three_nodes, tiny, strategy, nodes):
    from actors.group import RayGroup, cluster_has_gpus
    from actors.placement import release, reserve
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


@pytest.mark.slow
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
