"""`rlhf ppo` stopped and resumed, and the role interface's two implementations, against one uninterrupted run of
four Ray role groups."""
from __future__ import annotations

import json

import pytest

from rlhf.metrics import read_metrics
from test_ppo import SMALL, _ppo

pytestmark = pytest.mark.slow


SHORT = [*SMALL, "--set", "train.save_every=2", "--set", "data.eval="]


@pytest.fixture(scope="module")
def short_run(tiny, sft_run, rm_run, tmp_path_factory) -> str:
    """Three iterations of four Ray role groups, uninterrupted: what a resumed run and the one-process
    implementation must reproduce."""
    out = tmp_path_factory.mktemp("short") / "ppo"
    assert _ppo(tiny, sft_run, rm_run, out, *SHORT, "--set", "ppo.iterations=3") == 0
    return str(out)


def test_ppo_resume_gives_the_same_metrics_as_an_uninterrupted_run(tiny, sft_run, rm_run, short_run, tmp_path):
    """Two iterations, stopped, resumed for the third: its metrics are the uninterrupted Ray run's. The resumed run
    is in one process, whose ranks keep their own RNG streams as Ray's do (`test_one_process_gives_what_ray_gives`),
    so the checkpoint (engines, optimizer, every rank's RNG, data order, running statistics, KL controller) is what
    carries the run across the stop."""
    whole, part = short_run, tmp_path / "part"
    common = [*SHORT, "--set", "ray.in_process=true"]
    assert _ppo(tiny, sft_run, rm_run, part, *common, "--set", "ppo.iterations=2") == 0
    assert _ppo(tiny, sft_run, rm_run, part, *common, "--set", "ppo.iterations=3", "--resume") == 0
    keys = ("ppo/reward_raw", "ppo/kl", "ppo/pg_loss", "ppo/vf_loss", "ppo/response_length", "ppo/kl_coef")
    a = {m["step"]: m for m in read_metrics(f"{whole}/metrics.jsonl") if "ppo/reward_raw" in m}
    b = {m["step"]: m for m in read_metrics(f"{part}/metrics.jsonl") if "ppo/reward_raw" in m}
    assert sorted(b) == [1, 2, 3]
    for step in (3,):
        for k in keys:
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-5, abs=1e-6), (step, k)


def test_one_process_gives_what_ray_gives(tiny, sft_run, rm_run, short_run, tmp_path):
    """The role interface's two implementations run the same workers and controller: `ray.in_process` (one rank
    each, no Ray) gives the metrics of four Ray role groups, so controller tests and the benchmarks' no-Ray
    baseline measure what `rlhf ppo` computes."""
    out = tmp_path / "local"
    assert _ppo(tiny, sft_run, rm_run, out, *SHORT, "--set", "ppo.iterations=3", "--set", "ray.in_process=true") == 0
    runs = {name: [m for m in read_metrics(f"{path}/metrics.jsonl") if "ppo/reward_raw" in m]
            for name, path in (("ray", short_run), ("local", out))}
    assert len(runs["ray"]) == len(runs["local"]) == 3
    for ray_step, local_step in zip(runs["ray"], runs["local"]):
        for key in ("ppo/reward_raw", "ppo/kl", "ppo/pg_loss", "ppo/vf_loss", "ppo/response_length", "ppo/perplexity"):
            if key in ray_step:  # the policy's losses from iteration 2 on: the critic warms up alone first
                assert local_step[key] == pytest.approx(ray_step[key], rel=1e-4, abs=1e-5), key
    assert "ppo/pg_loss" in runs["local"][-1]
    with open(tmp_path / "local" / "placement.json") as f:
        assert sorted(json.load(f)) == ["critic", "policy", "reference", "reward"]


def test_sigterm_stops_at_an_iteration_boundary_with_a_checkpoint_and_resume_continues_exactly(
        tiny, sft_run, rm_run, short_run, tmp_path):
    """What SLURM and Kubernetes send before a kill: the run finishes the iteration it is in, writes a checkpoint,
    says so in one line and exits 0; `--resume` then gives the uninterrupted run's next iteration."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "preempted"
    argv = [sys.executable, "-m", "rlhf", "ppo", "--config", "configs/tiny/ppo.yaml", "--policy", f"{sft_run}/final",
            "--reward", f"{rm_run}/final", "--prompts", tiny["prompts_train"], "--output", str(out), *SHORT,
            "--set", "ppo.iterations=3", "--set", "ray.in_process=true"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:  # the first iteration logged: signal the second
            if (out / "metrics.jsonl").exists() and '"ppo/reward_raw"' in (out / "metrics.jsonl").read_text():
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        printed, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, printed
    [line] = [x for x in printed.splitlines() if "preempted (SIGTERM)" in x]
    stopped = int(line.split("after step ")[1].split(";")[0])
    assert stopped in (1, 2)
    done = [m["step"] for m in read_metrics(f"{out}/metrics.jsonl") if "ppo/reward_raw" in m]
    assert done == list(range(1, stopped + 1))
    assert os.path.isdir(out / "checkpoints" / f"step_{stopped:08d}")

    assert _ppo(tiny, sft_run, rm_run, out, *SHORT, "--set", "ppo.iterations=3", "--set", "ray.in_process=true",
                "--resume") == 0
    a = {m["step"]: m for m in read_metrics(f"{short_run}/metrics.jsonl") if "ppo/reward_raw" in m}
    b = {m["step"]: m for m in read_metrics(f"{out}/metrics.jsonl") if "ppo/reward_raw" in m}
    assert sorted(b) == [1, 2, 3]
    for k in ("ppo/reward_raw", "ppo/kl", "ppo/vf_loss", "ppo/response_length", "ppo/kl_coef"):
        assert b[stopped + 1][k] == pytest.approx(a[stopped + 1][k], rel=1e-5, abs=1e-6), k
