"""`rlhf ppo` with the layouts of a real cluster: roles colocated and spread on a simulated three-node cluster with
declared GPUs, and a ZeRO-3 policy over two ranks."""
from __future__ import annotations

import json
import math

import pytest

from conftest import simulated_cluster
from rlhf.metrics import read_metrics
from test_ppo import SMALL, _ppo

pytestmark = pytest.mark.slow


@pytest.fixture()
def three_node_cluster():
    with simulated_cluster(nodes=3, cpus=3, gpus=1) as cluster:
        yield cluster


def test_roles_are_placed_as_configured_on_a_simulated_cluster(tiny, sft_run, rm_run, tmp_path, three_node_cluster):
    """Reference and reward share the policy's GPU (fractions of one bundle); the critic's two ranks spread over
    two other nodes' GPUs."""
    out = tmp_path / "ppo"
    layout = ["--set", "roles.policy.layout.gpu_fraction=0.5",
              "--set", "roles.reference.layout.colocate_with=policy", "--set", "roles.reference.layout.gpu_fraction=0.25",
              "--set", "roles.reward.layout.colocate_with=policy", "--set", "roles.reward.layout.gpu_fraction=0.25",
              "--set", "roles.critic.layout.gpus_per_node=2", "--set", "roles.critic.layout.strategy=STRICT_SPREAD",
              "--set", "ppo.iterations=2", "--set", "data.eval="]
    assert _ppo(tiny, sft_run, rm_run, out, *SMALL, *layout) == 0
    with open(out / "placement.json") as f:
        placed = json.load(f)
    node = lambda role: {r["node_id"] for r in placed[role]}  # noqa: E731
    gpus = lambda role: {g for r in placed[role] for g in r["gpu_ids"]}  # noqa: E731
    assert node("reference") == node("reward") == node("policy")
    assert gpus("reference") == gpus("reward") == gpus("policy")
    assert len(node("critic")) == 2 and not (node("critic") & node("policy"))
    assert len(read_metrics(f"{out}/metrics.jsonl")) >= 2


def test_zero3_policy_on_two_ranks_generates_in_lockstep_and_trains(tiny, sft_run, rm_run, tmp_path):
    """ZeRO-3 partitions the policy over two ranks; generation without gathering steps both ranks together. A rule
    reward, so no preference-model group starts (the critic starts from the policy)."""
    out = tmp_path / "ppo"
    assert _ppo(tiny, sft_run, rm_run, out, *SMALL, "--set", "data.eval=", "--set", "ppo.iterations=2",
                "--set", "ppo.reward_model_weight=0", "--set", "ppo.reward_rules.sample=1.0",
                "--set", "ppo.critic_init=policy",
                "--set", "roles.policy.layout.gpus_per_node=2", "--set", "roles.policy.deepspeed.zero_stage=3",
                "--set", "roles.policy.deepspeed.gather_for_generation=false",
                "--set", "roles.critic.deepspeed.zero_stage=3") == 0
    iters = [m for m in read_metrics(f"{out}/metrics.jsonl") if "ppo/reward_raw" in m]
    assert len(iters) == 2 and all(math.isfinite(m["ppo/kl"]) for m in iters)
    assert (out / "final" / "model.safetensors").exists()
