"""Faults a week-long job meets: a rank killed mid-run (inside an iteration, during a checkpoint save), a rank that
keeps dying, and NaN scores. The run goes on or stops cleanly, and never takes a half-written checkpoint as its latest
(the driver killed mid-save: tests/test_storage.py)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import run_cli
from rlhf.checkpoint import CheckpointManager, read_meta
from rlhf.metrics import read_metrics

pytestmark = pytest.mark.slow

SMALL = ["--set", "ppo.prompts_per_iteration=8", "--set", "ppo.train_batch_size=8", "--set", "generation.max_new_tokens=8",
         "--set", "logging.progress=false", "--set", "data.eval=", "--set", "train.save_every=2"]


def _args(tiny, sft_run, rm_run, out, reward=None):
    return ["ppo", "--config", "configs/tiny/ppo.yaml", "--policy", f"{sft_run}/final", "--reward",
            reward or f"{rm_run}/final", "--prompts", tiny["prompts_train"], "--output", str(out), *SMALL]


# A rule for the reward and the critic from the policy: three role groups (policy, reference, critic) to kill and
# rebuild instead of four, the same recovery.
NO_REWARD_GROUP = ["--set", "ppo.reward_model_weight=0", "--set", "ppo.reward_rules.sample=1.0",
                   "--set", "ppo.critic_init=policy"]


def _iterations(out) -> list[dict]:
    path = f"{out}/metrics.jsonl"
    return [m for m in read_metrics(path) if "ppo/reward_raw" in m] if os.path.exists(path) else []


def test_ranks_killed_during_a_checkpoint_save_and_inside_an_iteration_are_rebuilt_and_the_run_finishes(
        tiny, sft_run, rm_run, tmp_path, monkeypatch, capsys):
    """Rank 0 of the two-rank policy dies while the checkpoint of iteration 2 is written (nothing complete yet: back
    to the start, losing 2 iterations); then, on the rebuilt groups, rank 0 of the critic dies inside iteration 3
    (back to the checkpoint of iteration 2, losing 1). The run finishes every iteration with both restarts counted."""
    out = tmp_path / "ppo"
    during_save, inside = tmp_path / "killed-during-save", tmp_path / "killed-inside-iteration"
    # Calls are counted per process: the policy's first save, and the third value pass of the rebuilt critic.
    monkeypatch.setenv("RLHF_FAULT", f"policy:save_checkpoint:1:{during_save},critic:values:3:{inside}")
    assert run_cli(*_args(tiny, sft_run, rm_run, out), "--set", "ppo.iterations=4", *NO_REWARD_GROUP,
                   "--set", "roles.policy.layout.gpus_per_node=2") == 0
    assert during_save.exists() and inside.exists()  # the ranks really died
    printed = capsys.readouterr().out
    assert "policy rank 0 died during the checkpoint of iteration 2" in printed
    assert "critic rank 0 died during iteration 3" in printed
    metrics = read_metrics(f"{out}/metrics.jsonl")
    restarts = [(m["step"], m["ppo/restarts"], m["ppo/iterations_lost"]) for m in metrics if "ppo/restarts" in m]
    assert restarts == [(0, 1, 2), (2, 2, 1)]
    assert [m["step"] for m in metrics if "ppo/reward_raw" in m] == [1, 2, 3, 4]
    assert read_meta(CheckpointManager(str(out / "checkpoints")).latest())["step"] == 4
    assert (out / "final" / "model.safetensors").exists()
    with open(out / "placement.json") as f:
        placed = json.load(f)
    assert len(placed["policy"]) == 2 and placed["critic"][0]["pid"] != int(inside.read_text().split("pid ")[1])
    assert placed["policy"][0]["pid"] != int(during_save.read_text().split("pid ")[1])


def test_a_rank_that_keeps_dying_ends_the_run_in_one_line_naming_it_and_how_to_resume(tiny, sft_run, rm_run,
                                                                                     tmp_path, monkeypatch, capsys):
    out = tmp_path / "ppo"
    monkeypatch.setenv("RLHF_FAULT", f"critic:values:1:{tmp_path / 'fault-fired'}")
    code = run_cli(*_args(tiny, sft_run, rm_run, out), "--set", "ppo.iterations=2", "--set", "ray.max_restarts=0",
                   *NO_REWARD_GROUP)
    assert code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # the ranks' own log lines come before it
    assert last.startswith("rlhf ppo: iteration 1: critic rank 0 died") and "rerun with --resume" in last, last
    assert "Traceback" not in err


def test_nan_scores_are_skipped_then_the_run_stops_naming_phase_and_iteration(tiny, sft_run, rm_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "rm-nan"
    shutil.copytree(f"{rm_run}/final", broken)
    head = load_file(broken / "value_head.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in head.items()}, broken / "value_head.safetensors")
    out = tmp_path / "ppo"
    code = run_cli(*_args(tiny, sft_run, rm_run, out, reward=str(broken)), "--set", "ppo.iterations=6",
                   "--set", "ppo.max_skipped_in_row=2", "--set", "ray.in_process=true")  # the controller's guard
    assert code == 2
    printed = capsys.readouterr()
    # The phase and what held NaN, exactly (the line's advice names the reward model whatever the phase): the
    # reward, and the critic, which starts from the same preference model (ppo.critic_init: reward).
    phase = "score: reward, critic values"
    assert printed.err.strip().splitlines()[-1] == (
        f"rlhf ppo: iteration 2: 2 iterations in a row were skipped for NaN/inf in {phase}; lower the learning rate "
        "or check the reward model")
    assert [line for line in printed.out.splitlines() if " skipped (" in line] == [
        f"ppo: iteration 1 skipped ({phase})", f"ppo: iteration 2 skipped ({phase})"]
    assert not (out / "final").exists()
