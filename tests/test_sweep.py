"""`rlhf sweep` on the tests' shared local Ray: tiny RM and PPO runs as Tune trials, each in its own placement group,
each trial's one rank in its controller's process (`ray.in_process`: what is tested here is Tune's side). Trials whose
ranks are Ray actors, seen inside their placement group through the state API: tests/test_dashboard.py; PBT on an
object store: tests/test_storage.py."""
from __future__ import annotations

import csv
import os

import pytest
import yaml

from conftest import run_cli
from rlhf.config import load_config

pytestmark = pytest.mark.slow


def write_spec(tmp_path, **spec) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def summary(output: str) -> list[dict]:
    with open(os.path.join(output, "summary.tsv"), encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


ONE_RANK = ["layout.gpus_per_node=1", "train.global_batch_size=8", "train.micro_batch_size=8", "train.log_every=1",
            "ray.in_process=true"]


def test_rm_grid_sweep_writes_a_best_config_that_loads(tiny, tmp_path, capsys):
    spec = write_spec(tmp_path, command="rm", base_config="configs/tiny/rm.yaml",
                      args={"model": tiny["base"], "data": tiny["prefs_train"]},
                      overrides=[f"data.eval={tiny['prefs_eval']}", "train.max_steps=2", "train.eval_every=2",
                                 "train.save_every=2", *ONE_RANK],
                      search={"optim.lr": {"type": "grid", "values": [1.0e-5, 3.0e-3]}},
                      metric="eval/pairwise_accuracy", mode="max")
    out = str(tmp_path / "sweep")
    assert run_cli("sweep", "--config", spec, "--output", out) == 0
    printed = capsys.readouterr().out

    rows = summary(out)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert sorted(float(r["optim.lr"]) for r in rows) == [1.0e-5, 3.0e-3]
    best = rows[0]  # the table is sorted best first
    assert float(best["eval/pairwise_accuracy"]) >= float(rows[1]["eval/pairwise_accuracy"])
    assert f"best: trial {best['trial']}" in printed
    # Where to look is the sweep's own directory (each trial's run writes its TensorBoard there), never Ray's
    # temporary session folder.
    assert f"TensorBoard: tensorboard --logdir {out}/tune" in printed and "--logdir /tmp/ray" not in printed

    # best_config.yaml is the base config plus the best trial's value, ready for `rlhf rm --config`.
    cfg = load_config("rm", f"{out}/best_config.yaml")
    assert cfg.optim.lr == pytest.approx(float(best["optim.lr"]))
    assert cfg.train.max_steps == 2 and cfg.data.eval == tiny["prefs_eval"]
    assert "rlhf rm --config" in open(f"{out}/best_config.yaml").read()
    # Each trial is a whole run with its own metrics and TensorBoard, and Tune's experiment can be resumed.
    for r in rows:
        assert os.path.exists(os.path.join(r["run_dir"], "metrics.jsonl"))
        assert os.listdir(os.path.join(r["run_dir"], "tensorboard"))
    assert run_cli("sweep", "--config", spec, "--output", out) == 2  # refuses to overwrite without --resume


def test_asha_stops_the_weaker_ppo_trial_early(tiny, tmp_path):
    # The metric is the KL coefficient itself, so which trial is weaker is known and the test does not rest on luck;
    # one trial at a time so the strong one sets the rung first. Each trial is a LoRA policy that is its own
    # reference, rewarded by a rule: one role group, so the trials are quick to start.
    spec = write_spec(tmp_path, command="ppo", base_config="configs/tiny/ppo.yaml",
                      args={"policy": tiny["base"], "prompts": tiny["prompts_train"]},
                      overrides=["ppo.iterations=3", "ppo.prompts_per_iteration=8", "ppo.train_batch_size=8",
                                 "ppo.ppo_epochs=1", "ppo.estimator=grpo", "ppo.samples_per_prompt=2",
                                 "ppo.reward_model_weight=0", "ppo.reward_rules.sample=1.0",
                                 "roles.policy.lora.enabled=true", "generation.max_new_tokens=8",
                                 "roles.policy.micro_batch_size=8", "train.save_every=0", "ray.in_process=true"],
                      search={"ppo.kl_coef": {"type": "grid", "values": [0.1, 0.01]}},
                      metric="ppo/kl_coef", mode="max", max_concurrent_trials=1,
                      scheduler={"type": "asha", "max_t": 3, "grace_period": 1, "reduction_factor": 2})
    out = str(tmp_path / "sweep")
    assert run_cli("sweep", "--config", spec, "--output", out) == 0
    steps = {float(r["ppo.kl_coef"]): int(r["step"]) for r in summary(out)}
    assert steps[0.1] == 3  # ran every iteration
    assert steps[0.01] < 3  # stopped at the first rung
    assert load_config("ppo", f"{out}/best_config.yaml").ppo.kl_coef == pytest.approx(0.1)
