"""`rlhf pipeline` (what `make demo` runs), cut short and each stage in one process (the stages' Ray role groups are
tested by their own commands' tests): every stage runs (DPO beside PPO), the report is written with its plots and
compares the policies, and a second run skips the finished stages."""
from __future__ import annotations

import os

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_pipeline_runs_every_stage_and_writes_the_report(tiny, tmp_path, capsys):
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"data: {os.path.dirname(tiny['sft_train'])}\nmodel: {tiny['base']}\neval_prompts: 8\nreport_examples: 3\n"
        "overrides:\n"
        "  sft: [train.max_steps=4, layout.gpus_per_node=1, logging.progress=false, ray.in_process=true]\n"
        "  rm: [train.max_steps=4, layout.gpus_per_node=1, logging.progress=false, ray.in_process=true]\n"
        "  ppo: [ppo.iterations=2, ppo.prompts_per_iteration=8, ppo.train_batch_size=8, generation.max_new_tokens=8,"
        " ppo.eval_prompts=8, logging.progress=false, ray.in_process=true]\n"
        "  dpo: [train.max_steps=4, layout.gpus_per_node=1, logging.progress=false, ray.in_process=true]\n"
        "stages:\n  dpo: configs/tiny/dpo.yaml\n")
    out = tmp_path / "run"
    assert run_cli("pipeline", "--config", config, "--output", out) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-2] == f"Report: {out}/report.md"
    assert printed[-1].startswith("TensorBoard: tensorboard --logdir")
    report = (out / "report.md").read_text()
    for needle in ("pairwise accuracy", "rule score, SFT → PPO → DPO", "| prompt | SFT policy | PPO policy | DPO policy |",
                   "| DPO | held-out implicit-reward pairwise accuracy"):
        assert needle in report
    for png in ("reward_raw.png", "kl.png", "response_length.png", "perplexity.png"):
        assert (out / png).stat().st_size > 1000
    for stage in ("sft", "rm", "ppo", "dpo"):
        assert (out / stage / "final" / "config.json").exists()

    # Finished stages are not run again.
    assert run_cli("pipeline", "--config", config, "--output", out) == 0
    assert "SFT ..." not in capsys.readouterr().out
