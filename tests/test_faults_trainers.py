"""A rank of a two-rank RM run killed at chosen points (`RLHF_FAULT`, see actors/faults.py): the same recovery as
PPO's rebuilds the group from the last complete checkpoint and the run finishes every step; SIGTERM in SFT; a sweep
trial whose controller dies."""
from __future__ import annotations

import pytest

from conftest import run_cli
from rlhf.checkpoint import CheckpointManager, read_meta
from rlhf.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_a_rank_of_a_two_rank_run_killed_in_an_evaluation_then_inside_a_step_is_rebuilt_each_time(tiny, tmp_path,
                                                                                                   monkeypatch):
    """A two-rank RM run (SFT, RM and DPO share the loop and the recovery, `rlhf.drivers.runs`): rank 0 dies in the
    held-out evaluation of step 2, before its checkpoint (back to the start); then a rank of the rebuilt group dies
    inside its third step, step 3 (back to the checkpoint of step 2). The run finishes every step."""
    out, held_out = tmp_path / "rm", tmp_path / "prefs_eval.jsonl"
    held_out.write_text("".join(open(tiny["prefs_eval"], encoding="utf-8").readlines()[:24]), encoding="utf-8")
    in_eval, in_step = tmp_path / "killed-in-evaluation", tmp_path / "killed-in-step"
    # Calls are counted per process: the first rank's second evaluation, and the rebuilt rank's third step.
    monkeypatch.setenv("RLHF_FAULT", f"reward:evaluate:2:{in_eval},reward:train_step:3:{in_step}")
    assert run_cli("rm", "--config", "configs/tiny/rm.yaml", "--model", tiny["base"], "--data", tiny["prefs_train"],
                   "--set", f"data.eval={held_out}", "--set", "train.max_steps=4",
                   "--set", "train.save_every=2", "--set", "train.eval_every=2", "--set", "train.log_every=1", "--set", "logging.progress=false",
                   "--output", out) == 0
    assert in_eval.exists() and in_step.exists()
    metrics = read_metrics(f"{out}/metrics.jsonl")
    assert [(m["step"], m["train/restarts"]) for m in metrics if "train/restarts" in m] == [(0, 1), (2, 2)]
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3, 4]
    assert read_meta(CheckpointManager(str(out / "checkpoints")).latest())["step"] == 4
    assert (out / "final" / "config.json").exists()


def test_sigterm_in_an_sft_step_checkpoints_that_step_exits_0_and_resume_continues_exactly(tiny, tmp_path):
    """A scheduler's SIGTERM arriving inside step 3 (`RLHF_FAULT=...:SIGTERM`; one process, so the rank is the
    driver): the run finishes step 3, checkpoints it, says so and exits 0; resumed, steps 4-6 are the uninterrupted
    run's."""
    import os
    import subprocess
    import sys
    common = ["sft", "--config", "configs/tiny/sft.yaml", "--model", tiny["base"], "--data", tiny["sft_train"],
              "--set", "train.max_steps=6", "--set", "train.save_every=0", "--set", "train.log_every=1",
              "--set", "logging.progress=false", "--set", "ray.in_process=true"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_cli(*common, "--output", whole) == 0
    env = {**os.environ, "RLHF_FAULT": f"sft:train_step:3:{tmp_path / 'sent'}:SIGTERM"}
    done = subprocess.run([sys.executable, "-m", "rlhf", *common, "--output", str(part)], env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sft: preempted (SIGTERM) after step 3; checkpoint" in done.stdout
    assert read_meta(CheckpointManager(str(part / "checkpoints")).latest())["step"] == 3
    assert not (part / "final").exists()
    assert run_cli(*common, "--output", part, "--resume") == 0
    a = {m["step"]: m["train/loss"] for m in read_metrics(f"{whole}/metrics.jsonl") if "train/loss" in m}
    b = {m["step"]: m["train/loss"] for m in read_metrics(f"{part}/metrics.jsonl") if "train/loss" in m}
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [b[s] for s in (4, 5, 6)] == pytest.approx([a[s] for s in (4, 5, 6)], rel=1e-5)


def test_a_learning_rate_changed_for_the_resume_is_the_one_the_restored_optimizer_uses(tiny, tmp_path):
    """What PBT does to a trial (restore a checkpoint, mutate optim.lr): the restored schedule must not bring the
    old rate back. Resumed with half the rate, the steps after the checkpoint run at the new one."""
    common = ["sft", "--config", "configs/tiny/sft.yaml", "--model", tiny["base"], "--data", tiny["sft_train"],
              "--set", "train.save_every=2", "--set", "train.log_every=1", "--set", "optim.schedule=constant",
              "--set", "optim.warmup_steps=0", "--set", "logging.progress=false", "--set", "ray.in_process=true",
              "--output", tmp_path / "sft"]
    assert run_cli(*common, "--set", "train.max_steps=2", "--set", "optim.lr=1e-3") == 0
    assert run_cli(*common, "--set", "train.max_steps=4", "--set", "optim.lr=5e-4", "--resume") == 0
    lrs = {m["step"]: m["train/lr"] for m in read_metrics(f"{tmp_path}/sft/metrics.jsonl") if "train/lr" in m}
    assert lrs[1] == pytest.approx(1e-3) and lrs[3] == pytest.approx(5e-4) and lrs[4] == pytest.approx(5e-4)


def test_a_sweep_trial_whose_controller_dies_starts_again_from_its_last_checkpoint(tiny, tmp_path):
    """The controller of a one-trial SFT sweep (its rank in the same process, so both go, as with a lost node) is
    SIGKILLed while it seals the checkpoint of step 2: Tune starts the trial again from the checkpoint of step 1 it
    was given (Tune's FailureConfig, `ray.max_restarts` attempts) and the trial finishes every step. The sweep runs as
    a job of the tests' Ray, so the fault reaches its trial controller through the job's runtime_env only."""
    import csv
    import json
    import os
    import subprocess
    import sys
    import ray
    marker = tmp_path / "controller-killed"
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({
        "command": "sft", "base_config": "configs/tiny/sft.yaml",
        "args": {"model": tiny["base"], "data": tiny["sft_train"]},
        "overrides": ["train.max_steps=3", "train.save_every=1", "train.log_every=1", "train.global_batch_size=8",
                      "train.micro_batch_size=8", "layout.gpus_per_node=1", "ray.in_process=true"],
        "search": {"optim.lr": {"type": "grid", "values": [1.0e-3]}}, "metric": "train/loss", "mode": "min"}))
    env = {**os.environ, "RLHF_FAULT": f"driver:commit:2:{marker}",
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-m", "rlhf", "sweep", "--config", str(spec), "--output",
                           str(tmp_path / "sweep")], env=env, text=True, capture_output=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert marker.exists(), out[-4000:]  # the controller really died
    with open(tmp_path / "sweep" / "summary.tsv", encoding="utf-8") as f:
        (row,) = list(csv.DictReader(f, delimiter="\t"))
    assert row["status"] == "ok" and row["step"] == "3", row
    assert f"trial {row['trial']}: continues from the checkpoint of step 1" in out, out[-4000:]
    steps = [m["step"] for m in read_metrics(f"{row['run_dir']}/metrics.jsonl") if "train/loss" in m]
    assert steps == [1, 2, 3]  # step 2's first try was cut back with the checkpoint it never sealed
    assert read_meta(CheckpointManager(f"{row['run_dir']}/checkpoints").latest())["step"] == 3
