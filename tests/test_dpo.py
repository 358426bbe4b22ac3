"""`rlhf dpo` on the bundled sample: the policy learns from the ranked lists (held-out implicit-reward accuracy well
above chance, the sample's rule score above the SFT policy's), the reference scores each response once, a resumed
run reads those scores back, and a LoRA policy saves its adapter."""
from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli
from rlhf.data import load_preferences
from rlhf.metrics import read_metrics

pytestmark = pytest.mark.slow


def responses(path: str) -> int:
    return sum(len(p.responses) for p in load_preferences(path))


def test_dpo_learns_the_ranking_and_scores_each_response_once_with_the_reference(tiny, sft_run, tmp_path, capsys):
    from rlhf.config import load_config
    from rlhf.data import load_prompts
    from rlhf.drivers.generate import generate_texts
    from rlhf.sample import score_of

    # In one process (the same workers and loop as on Ray; DPO on Ray groups runs in tests/test_pipeline.py).
    out = tmp_path / "dpo"
    args = ["dpo", "--config", "configs/tiny/dpo.yaml", "--model", f"{sft_run}/final", "--data", tiny["prefs_train"],
            "--set", f"data.eval={tiny['prefs_eval']}", "--set", "logging.progress=false", "--set",
            "ray.in_process=true", "--output", out]
    assert run_cli(*args) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"reference_responses_scored={responses(tiny['prefs_train']) + responses(tiny['prefs_eval'])}" in summary

    metrics = read_metrics(f"{out}/metrics.jsonl")
    evals = [m for m in metrics if "eval/pairwise_accuracy" in m]
    # Policy = reference: no margins yet, every pair a tie, half right; and the counts print as counts.
    assert evals[0]["step"] == 0 and evals[0]["eval/pairwise_accuracy"] == 0.5
    assert "pairwise_accuracy_start=0.5000" in summary and re.search(r"train_pairs=\d+,", summary), summary
    assert evals[-1]["eval/pairwise_accuracy"] > 0.75 and evals[-1]["eval/mean_margin"] > 0
    # The KL to the reference on the policy's own replies: none before training, bounded after it (a k1 estimate from
    # samples: a policy this close to its reference may read slightly below 0).
    assert abs(evals[0]["eval/kl"]) < 1e-3 and abs(evals[-1]["eval/kl"]) < 20 and evals[-1]["eval/kl"] != 0
    steps = [m for m in metrics if "train/responses_encoded" in m]
    # Each step encodes every response of its 16 lists once: K = 2..4 responses a list.
    assert all(32 <= m["train/responses_encoded"] <= 64 for m in steps)

    cfg = load_config("generate", "configs/tiny/generate.yaml", [])  # chat sampling, as the report compares them
    prompts = load_prompts(tiny["prompts_eval"])[:200]
    sft = score_of(prompts, generate_texts(f"{sft_run}/final", prompts, cfg))
    dpo = score_of(prompts, generate_texts(f"{out}/final", prompts, cfg))
    assert dpo > sft + 0.15, (sft, dpo)

    # Resumed: the reference's scores are read back from the run, not computed again.
    assert run_cli(*args, "--resume") == 0
    assert "reference_responses_scored=0" in capsys.readouterr().out
    with open(out / "reference_logprobs.json", encoding="utf-8") as f:
        cached = json.load(f)
    assert [len(lists) for lists in cached.values()] == [len(load_preferences(tiny["prefs_train"])),
                                                        len(load_preferences(tiny["prefs_eval"]))]


@pytest.mark.parametrize("loss", ["pairwise", "ipo"])
def test_lora_dpo_with_each_loss_trains_and_saves_its_adapter(tiny, sft_run, tmp_path, loss):
    out = tmp_path / loss
    assert run_cli("dpo", "--config", "configs/tiny/dpo.yaml", "--model", f"{sft_run}/final", "--data",
                   tiny["prefs_train"], "--set", f"dpo.loss={loss}", "--set", "lora.enabled=true",
                   "--set", "optim.lr=1e-3", "--set", "train.max_steps=6", "--set", "train.log_every=1",
                   "--set", "ray.in_process=true", "--set", "logging.progress=false", "--output", out) == 0
    steps = [m for m in read_metrics(f"{out}/metrics.jsonl") if "train/loss" in m]
    # Step 1: the LoRA policy is still its base, the reference (implicit rewards 0 but for float noise); then it
    # learns the order.
    assert len(steps) == 6 and steps[0]["train/accuracy"] < 0.5 and steps[-1]["train/accuracy"] > 0.6
    assert (out / "final" / "adapter" / "adapter_config.json").exists()
    assert (out / "final" / "config.json").exists()


def test_bad_dpo_settings_are_one_line_errors(tiny, sft_run, tmp_path, capsys):
    for setting, message in [("dpo.loss=kto", "dpo.loss: 'kto' is not one of listwise, pairwise, ipo"),
                             ("dpo.beta=0", "dpo.beta: must be above 0"),
                             ("dpo.label_smoothing=0.1", "not defined for the ipo loss")]:
        extra = ["--set", "dpo.loss=ipo"] if "smoothing" in setting else []
        assert run_cli("dpo", "--config", "configs/tiny/dpo.yaml", "--model", f"{sft_run}/final", "--data",
                       tiny["prefs_train"], "--set", setting, *extra, "--output", tmp_path / "bad") == 2
        assert message in capsys.readouterr().err
