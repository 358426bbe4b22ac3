"""`rlhf sft`, `rlhf rm` and `rlhf rm-eval` end to end on the bundled sample, as a user runs them."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from conftest import off_umask, run_cli
from rlhf import files
from rlhf.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_sft_learns_the_dialogues_and_writes_a_loadable_model(tiny, sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    evals = [m["eval/loss"] for m in read_metrics(f"{sft_run}/metrics.jsonl") if "eval/loss" in m]
    assert evals[-1] < 0.3 * evals[0], evals
    for name in ("config.yaml", "metrics.jsonl", "tensorboard", "checkpoints", "final/model.safetensors"):
        assert os.path.exists(f"{sft_run}/{name}"), name
    assert off_umask(sft_run, files.umask()) == {}  # the weights too: a teammate or a server may read them

    # Plain transformers loads the result, and its replies end in <eom>.
    from rlhf.batching import collate_prompts
    from rlhf.data import load_prompts
    from rlhf.generation import generate_replies
    from rlhf.moss import tokenize_prompt
    tok = AutoTokenizer.from_pretrained(f"{sft_run}/final")
    model = AutoModelForCausalLM.from_pretrained(f"{sft_run}/final")
    prompts = load_prompts(tiny["prompts_eval"])[:16]
    batch = collate_prompts([tokenize_prompt(p, tok, 128) for p in prompts], tok.pad_token_id)
    torch.manual_seed(0)
    out = generate_replies(model, batch, {"max_new_tokens": 40, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
                                          "top_k": 0, "repetition_penalty": 1.0},
                           tok.convert_tokens_to_ids("<eom>"), tok.pad_token_id, torch.device("cpu"))
    assert float(out["ended"].mean()) >= 0.9


def test_sft_resume_continues_from_the_last_checkpoint_with_progress_lines_in_a_log(tiny, sft_run, tmp_path,
                                                                                    capsys):
    out = tmp_path / "sft"
    base = ["sft", "--config", "configs/tiny/sft.yaml", "--model", tiny["base"], "--data", tiny["sft_train"],
            "--set", "logging.progress_every_s=0", "--set", "train.save_every=2", "--set", "train.log_every=1",
            "--set", "ray.in_process=true", "--output", out]  # resume is the driver's: one process will do
    assert run_cli(*base, "--set", "train.max_steps=3") == 0
    assert run_cli(*base, "--set", "train.max_steps=5", "--resume") == 0
    steps = [m["step"] for m in read_metrics(f"{out}/metrics.jsonl") if "train/loss" in m]
    assert steps == [1, 2, 3, 4, 5]
    # Output that is not a terminal (a job log; here pytest's capture) gets progress lines, not a bar.
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sft: step")]
    assert [line.split(",")[0] for line in lines] == ["sft: step 1/3 (33%)", "sft: step 2/3 (67%)",
                                                      "sft: step 3/3 (100%)", "sft: step 4/5 (80%)",
                                                      "sft: step 5/5 (100%)"]
    assert re.fullmatch(r"sft: step 4/5 \(80%\), loss=[0-9.]+.*; [0-9.]+ steps/s, 0m\d\ds left", lines[3]), lines[3]
    # Without --resume, a directory that holds a run is refused rather than overwritten.
    assert run_cli(*base, "--set", "train.max_steps=5") == 2


def test_reward_model_ranks_held_out_responses(tiny, rm_run, capsys):
    evals = [m for m in read_metrics(f"{rm_run}/metrics.jsonl") if "eval/pairwise_accuracy" in m]
    assert evals[-1]["eval/pairwise_accuracy"] >= 0.85  # chance is 0.5 (ties make no pair)
    # Every response is encoded once a step: sequences through the model == responses, not 2 x pairs.
    train = [m for m in read_metrics(f"{rm_run}/metrics.jsonl") if "train/responses_encoded" in m]
    assert train and all(m["train/responses_encoded"] == m["train/responses"] for m in train)
    assert sum(m["train/pairs"] for m in train) > sum(m["train/responses"] for m in train) / 2

    capsys.readouterr()
    assert run_cli("rm-eval", "--model", f"{rm_run}/final", "--data", tiny["prefs_eval"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pairwise_accuracy"] >= 0.85 and result["pairs"] > 100
    assert {"mean_margin", "reward_mean", "reward_std"} <= set(result)
    with open(f"{rm_run}/final/reward_stats.json") as f:
        assert json.load(f)["std"] > 0
    assert off_umask(f"{rm_run}/final", files.umask()) == {}  # value_head.safetensors too


def test_rlhf_chat_answers_each_message_with_the_conversation_as_its_prompt(tiny, sft_run, tmp_path):
    """Driven as a person types: two messages, a blank line and /quit. The SFT model's run is not a plugin one, so it
    just answers; /save writes the conversation, which reads back as an SFT dialogue."""
    import io
    from rlhf.data import load_dialogues, load_prompts
    from rlhf.drivers.chat import run_chat
    [first, second] = load_prompts(tiny["prompts_eval"])[:2]
    typed = io.StringIO(f"{first.turns[0].human}\n\n{second.turns[0].human}\n/save {tmp_path / 'c.jsonl'}\n/quit\n"
                        "never read\n")
    shown = io.StringIO()
    assert run_chat(f"{sft_run}/final", None, [], None, first.meta_instruction, typed, shown) == 0
    lines = shown.getvalue().splitlines()
    assert lines[0].startswith(f"rlhf chat: {sft_run}/final (a chat model)")
    answers = [line.split("MOSS> ")[1] for line in lines if "MOSS> " in line]
    assert len(answers) == 2 and all(answers) and not any("(runs)" in line for line in lines)
    [saved] = load_dialogues(str(tmp_path / "c.jsonl"))
    assert [(t.human, t.moss) for t in saved.turns] == [(first.turns[0].human, answers[0]),
                                                        (second.turns[0].human, answers[1])]


def test_an_sft_run_logs_to_weights_and_biases_offline_and_its_resume_continues_the_same_run(tiny, tmp_path):
    """logging.wandb (off by default): every logged value also goes to a W&B run, here in its offline mode (written
    under the output's wandb/, nothing sent anywhere); --resume continues that run, not a new one."""
    import glob
    out = tmp_path / "sft"
    base = ["sft", "--config", "configs/tiny/sft.yaml", "--model", tiny["base"], "--data", tiny["sft_train"],
            "--set", "logging.progress=false", "--set", "train.save_every=2", "--set", "train.log_every=1",
            "--set", "ray.in_process=true", "--set", "logging.wandb=true", "--set", "logging.wandb_mode=offline",
            "--output", out]
    assert run_cli(*base, "--set", "train.max_steps=2") == 0
    run_id = (out / "wandb_run_id").read_text()
    assert run_cli(*base, "--set", "train.max_steps=3", "--resume") == 0
    assert (out / "wandb_run_id").read_text() == run_id
    runs = glob.glob(f"{out}/wandb/offline-run-*")
    assert len(runs) == 2 and {p.rsplit("-", 1)[1] for p in runs} == {run_id}  # one W&B run, written twice
    logged = b"".join(open(p, "rb").read() for p in glob.glob(f"{out}/wandb/offline-run-*/run-{run_id}.wandb"))
    losses = [m["train/loss"] for m in read_metrics(f"{out}/metrics.jsonl") if "train/loss" in m]
    assert len(losses) == 3 and b"train/loss" in logged
    assert all(json.dumps(loss).encode() in logged for loss in losses)  # each value as W&B stores it, as JSON
