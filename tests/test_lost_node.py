"""A node lost mid-run on a simulated two-node cluster (a head and a worker with a GPU each, with no CUDA behind
them): the policy's two ranks must spread over both, so losing the worker loses a rank and half the GPUs."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import NO_DASHBOARD, run_cli
from rlhf.checkpoint import CheckpointManager, read_meta
from rlhf.metrics import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, **NO_DASHBOARD})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1, **NO_DASHBOARD)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_lost_node_stops_the_run_in_one_line_and_resume_finishes_once_the_node_is_back(tiny, cluster, tmp_path):
    """The worker node of one policy rank goes away after the first checkpoint: the rebuilt policy needs two GPUs and the
    cluster has one, so after ray.node_wait_s the run stops naming what is short and the command that resumes, with
    its checkpoints intact; with a node back, --resume finishes every iteration."""
    cluster, workers = cluster
    out = tmp_path / "ppo"
    args = ["ppo", "--config", "configs/tiny/ppo.yaml", "--policy", tiny["base"], "--prompts", tiny["prompts_train"],
            "--output", str(out), "--set", f"ray.address={cluster.address}", "--set", "ray.node_wait_s=2",
            "--set", "roles.policy.layout.gpus_per_node=2", "--set", "ppo.iterations=4", "--set", "train.save_every=1",
            # one role group: a LoRA policy that is its own reference, rewarded by the sample's rule
            "--set", "ppo.estimator=grpo", "--set", "ppo.samples_per_prompt=2", "--set", "ppo.reward_model_weight=0",
            "--set", "ppo.reward_rules.sample=1.0", "--set", "roles.policy.lora.enabled=true",
            "--set", "ppo.prompts_per_iteration=8", "--set", "ppo.train_batch_size=8", "--set", "data.eval=",
            "--set", "generation.max_new_tokens=8", "--set", "logging.progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "rlhf", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        first = out / "checkpoints" / "step_00000001" / "COMPLETE"
        deadline = time.monotonic() + 240
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else "no checkpoint in 240 s"
        cluster.remove_node(workers[0])
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("rlhf ppo: iteration ") and " died and the cluster no longer holds the role groups " \
        "(the Ray cluster has 1 GPU in all, 1 GPU short after ray.node_wait_s=2 s); nothing committed is lost" in last, last
    latest = CheckpointManager(str(out / "checkpoints")).latest()
    assert f"continue from {latest} with rlhf ppo --config configs/tiny/ppo.yaml" in last and \
        last.endswith(" --resume"), last
    assert "waiting up to 2 s for the cluster to grow: the Ray cluster has 1 GPU in all" in stdout

    cluster.add_node(num_cpus=2, num_gpus=1, **NO_DASHBOARD)
    cluster.wait_for_nodes()
    assert run_cli(*args, "--resume") == 0
    assert [m["step"] for m in read_metrics(str(out / "metrics.jsonl")) if "ppo/reward_raw" in m] == [1, 2, 3, 4]
    assert read_meta(CheckpointManager(str(out / "checkpoints")).latest())["step"] == 4
