"""Faults a week-long job meets: a rank killed mid-run, the driver killed during a checkpoint save, and NaN scores.
The run goes on or stops cleanly, and never takes a half-written checkpoint as its latest."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

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


def _iterations(out) -> list[dict]:
    path = f"{out}/metrics.jsonl"
    return [m for m in read_metrics(path) if "ppo/reward_raw" in m] if os.path.exists(path) else []


@pytest.mark.parametrize("method, call, restored, lost", [
    ("values", 3, 2, 1),           # inside iteration 3: back to the checkpoint of iteration 2
    ("save_checkpoint", 2, 2, 2),  # while the final checkpoint (iteration 4) is written: back to iteration 2
])
def test_a_killed_critic_rank_is_rebuilt_and_the_run_finishes(tiny, sft_run, rm_run, tmp_path, monkeypatch, capsys,
                                                               method, call, restored, lost):
    out = tmp_path / "ppo"
    marker = tmp_path / "fault-fired"
    monkeypatch.setenv("RLHF_FAULT", f"critic:{method}:{call}:{marker}")  # the critic's rank 0 SIGKILLs itself there
    assert run_cli(*_args(tiny, sft_run, rm_run, out), "--set", "ppo.iterations=4") == 0
    assert marker.exists()  # the rank really died
    assert "critic rank 0 died" in capsys.readouterr().out
    metrics = read_metrics(f"{out}/metrics.jsonl")
    restarts = [m for m in metrics if "ppo/restarts" in m]
    assert len(restarts) == 1 and restarts[0]["ppo/restarts"] == 1
    assert restarts[0]["step"] == restored and restarts[0]["ppo/iterations_lost"] == lost
    assert [m["step"] for m in metrics if "ppo/reward_raw" in m] == [1, 2, 3, 4]
    assert read_meta(CheckpointManager(str(out / "checkpoints")).latest())["step"] == 4
    assert (out / "final" / "model.safetensors").exists()
    with open(out / "placement.json") as f:
        assert json.load(f)["critic"][0]["pid"] != int(marker.read_text().split("pid ")[1])


def test_a_rank_that_keeps_dying_ends_the_run_in_one_line_naming_it_and_how_to_resume(tiny, sft_run, rm_run,
                                                                                     tmp_path, monkeypatch, capsys):
    out = tmp_path / "ppo"
    monkeypatch.setenv("RLHF_FAULT", f"critic:values:1:{tmp_path / 'fault-fired'}")
    code = run_cli(*_args(tiny, sft_run, rm_run, out), "--set", "ppo.iterations=2", "--set", "ray.max_restarts=0")
    assert code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # the ranks' own log lines come before it
    assert last.startswith("rlhf ppo: iteration 1: critic rank 0 died") and "rerun with --resume" in last, last
    assert "Traceback" not in err


def test_driver_killed_during_a_checkpoint_save_resumes_from_the_last_complete_one(tiny, sft_run, rm_run, tmp_path):
    out = tmp_path / "ppo"
    cmd = [sys.executable, "-m", "rlhf", *_args(tiny, sft_run, rm_run, out), "--set", "ppo.iterations=4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = out / "checkpoints"
    caught = False
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if ckpts.exists() and any(p.name.startswith(".tmp-step_00000004") for p in ckpts.iterdir()):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the processes it started, mid-save
            caught = True
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert caught, "the save of step 4 was never seen in progress"
    latest = CheckpointManager(str(ckpts)).latest()
    assert latest is not None and read_meta(latest)["step"] == 2  # the half-written step 4 is not taken
    assert run_cli(*_args(tiny, sft_run, rm_run, out), "--set", "ppo.iterations=4", "--resume") == 0
    assert [m["step"] for m in _iterations(out)] == [1, 2, 3, 4]
    assert read_meta(CheckpointManager(str(ckpts)).latest())["step"] == 4


def test_nan_scores_are_skipped_then_the_run_stops_naming_phase_and_iteration(tiny, sft_run, rm_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "rm-nan"
    shutil.copytree(f"{rm_run}/final", broken)
    head = load_file(broken / "value_head.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in head.items()}, broken / "value_head.safetensors")
    out = tmp_path / "ppo"
    code = run_cli(*_args(tiny, sft_run, rm_run, out, reward=str(broken)), "--set", "ppo.iterations=6",
                   "--set", "ppo.max_skipped_in_row=2")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "iteration 2" in err and "NaN/inf" in err and "reward" in err
    assert not (out / "final").exists()
