"""Reward models that other tools load, and any causal LM as policy, reward model and critic.

A saved preference model loads with transformers' `AutoModelForSequenceClassification` and scores as ours does, a
saved process reward model with `AutoModelForTokenClassification` (a score at every token, its bias kept); a
hub-style sequence classifier loads as our reward model and critic; CodeGen, which transformers has no classifier
for, keeps its value head file; and Qwen2 and GPT-NeoX models go through `rlhf rm` and `rlhf ppo` as all three
roles.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)

from conftest import run_cli
from reward.model import HEAD_FILE, ScalarHeadModel
from rlhf.modeling import ModelLoadError

VOCAB, PAD = 64, 0
CLASSIFIED = ["llama", "qwen2", "gpt_neox"]  # the architectures with a *ForSequenceClassification in transformers


def tiny_config(arch: str, **extra):
    sizes = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 4} if arch == "codegen" else {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 64}
    if arch == "qwen2":
        sizes["num_key_value_heads"] = 2
    return AutoConfig.for_model(arch, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
                                **sizes, **extra)


def trained_looking(arch: str) -> ScalarHeadModel:
    """A random tiny model whose head is not the fresh small one, so a load that started a new head would show."""
    torch.manual_seed(0)
    model = ScalarHeadModel(AutoModelForCausalLM.from_config(tiny_config(arch)).eval())
    with torch.no_grad():
        model.head.weight.normal_()
    return model


def padded(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of different lengths padded with PAD on `side`; no real token is PAD."""
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    for i, row in enumerate(rows):
        if side == "right":
            ids[i, :len(row)] = torch.tensor(row)
        else:
            ids[i, width - len(row):] = torch.tensor(row)
    return ids, (ids != PAD).long()


def hf_scores(directory: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] what a user of plain transformers gets: no position ids, the last token found from the pad id."""
    classifier = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        return classifier(input_ids=ids, attention_mask=mask).logits.squeeze(-1)


@pytest.mark.parametrize("arch", CLASSIFIED)
def test_a_saved_reward_model_loads_as_transformers_sequence_classifier_with_our_scores(arch, tmp_path):
    model = trained_looking(arch)
    out = str(tmp_path / "rm")
    model.save_pretrained(out, pad_token_id=PAD)

    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"][1].endswith("ForSequenceClassification") and len(config["id2label"]) == 1
    assert config["architectures"][0].endswith("ForCausalLM") and config["pad_token_id"] == PAD
    # One copy of the backbone: the classifier's score lives in the causal LM's weights file.
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model.safetensors", HEAD_FILE]
    for side in ("right", "left"):
        ids, mask = padded(side)
        with torch.no_grad():
            ours = model.score(ids, mask)
        torch.testing.assert_close(hf_scores(out, ids, mask), ours, atol=1e-5, rtol=1e-4)
    # Everything that loaded it before still does: the causal LM with its LM head, and our reward model.
    ids, mask = padded("right")
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(plain, model.lm(input_ids=ids, attention_mask=mask).logits)
        torch.testing.assert_close(ScalarHeadModel.from_pretrained(out)(ids, mask), model(ids, mask), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_saved_process_reward_model_loads_as_transformers_token_classifier_with_our_scores(arch, tmp_path):
    model = trained_looking(arch)
    with torch.no_grad():
        model.head.bias.fill_(0.3)  # a process reward model's binary loss trains the bias, which this view keeps
    out = str(tmp_path / "prm")
    model.save_pretrained(out, pad_token_id=PAD, classifier="token")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"][1].endswith("ForTokenClassification") and len(config["id2label"]) == 1
    ids, mask = padded("right")
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = AutoModelForTokenClassification.from_pretrained(out).eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(theirs.squeeze(-1) * mask, ours * mask, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ScalarHeadModel.from_pretrained(out)(ids, mask), ours, rtol=0, atol=0)


@pytest.mark.parametrize("arch", CLASSIFIED)
def test_a_hub_sequence_classifier_loads_as_reward_model_and_critic(arch, tmp_path, capsys):
    torch.manual_seed(1)
    hub = AutoModelForSequenceClassification.from_config(tiny_config(arch, num_labels=1)).eval()
    hub.save_pretrained(str(tmp_path / "hub"))
    capsys.readouterr()

    reward = ScalarHeadModel.from_pretrained(str(tmp_path / "hub")).eval()
    assert torch.equal(reward.head.weight, hub.score.weight) and reward.head.bias.item() == 0.0
    if not reward.config.tie_word_embeddings:
        assert "a new one is initialised" in capsys.readouterr().err  # one line, not transformers' table
    for side in ("right", "left"):
        ids, mask = padded(side)
        with torch.no_grad():
            values = reward(ids, mask)  # the critic's per-token values: [B, T]
            scores = reward.score(ids, mask)
        assert values.shape == ids.shape
        torch.testing.assert_close(scores, hf_scores(str(tmp_path / "hub"), ids, mask), atol=1e-5, rtol=1e-4)

    # Re-saved (as `rlhf rm` would after training from it), it keeps both views.
    reward.save_pretrained(str(tmp_path / "again"), pad_token_id=PAD)
    ids, mask = padded("right")
    torch.testing.assert_close(hf_scores(str(tmp_path / "again"), ids, mask), scores, atol=1e-5, rtol=1e-4)


def test_codegen_has_no_classifier_and_keeps_its_value_head(tmp_path):
    model = trained_looking("codegen")
    with torch.no_grad():
        model.head.bias.fill_(0.25)
    out = str(tmp_path / "rm")
    model.save_pretrained(out, pad_token_id=PAD)
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["CodeGenForCausalLM"]
    loaded = ScalarHeadModel.from_pretrained(out)
    ids, mask = padded("left")
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(ids, mask), model.score(ids, mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForSequenceClassification.from_pretrained(out)


def test_a_head_with_a_bias_the_classifier_cannot_hold_is_saved_without_that_view(tmp_path, capsys):
    model = trained_looking("llama")
    with torch.no_grad():
        model.head.bias.fill_(0.5)  # a critic's head: the value loss trains the bias
    out = str(tmp_path / "critic")
    model.save_pretrained(out, pad_token_id=PAD)
    assert "score has no bias" in capsys.readouterr().err
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["LlamaForCausalLM"]
    ids, mask = padded("right")
    with torch.no_grad():
        torch.testing.assert_close(ScalarHeadModel.from_pretrained(out).score(ids, mask), model.score(ids, mask))


def test_a_classifier_with_more_than_one_label_or_a_stale_head_file_is_refused(tmp_path):
    hub = AutoModelForSequenceClassification.from_config(tiny_config("llama", num_labels=2))
    hub.save_pretrained(str(tmp_path / "two"))
    with pytest.raises(ModelLoadError, match="2 labels; a reward model has one"):
        ScalarHeadModel.from_pretrained(str(tmp_path / "two"))

    model = trained_looking("llama")
    out = str(tmp_path / "rm")
    model.save_pretrained(out, pad_token_id=PAD)
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}, os.path.join(out, HEAD_FILE))
    with pytest.raises(ModelLoadError, match="differ"):
        ScalarHeadModel.from_pretrained(out)


def test_a_lora_reward_model_saves_merged_with_both_views_and_a_peft_adapter(tmp_path):
    from peft import PeftModel

    from rlhf.modeling import apply_lora

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("qwen2"))
    base.save_pretrained(str(tmp_path / "base"))
    model = ScalarHeadModel(apply_lora(base, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # LoRA starts as a no-op; make it change the backbone
        model.head.weight.normal_()
    model.eval()
    out = str(tmp_path / "final")
    model.save_pretrained(out, pad_token_id=PAD)
    ids, mask = padded("left")
    with torch.no_grad():
        expected = model.score(ids, mask)
    torch.testing.assert_close(hf_scores(out, ids, mask), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ScalarHeadModel.from_pretrained(out).score(ids, mask), expected, atol=1e-5, rtol=1e-4)

    # adapter/ is PEFT's own: it loads on the base with PeftModel, and its value head completes the reward model.
    adapter = os.path.join(out, "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", HEAD_FILE} <= set(os.listdir(adapter))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")), adapter).eval()
    from safetensors.torch import load_file
    head = load_file(os.path.join(adapter, HEAD_FILE))
    with torch.no_grad():
        hidden = peft(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                      output_hidden_states=True).hidden_states[-1]
        last = hidden[:, -1] @ head["weight"].T + head["bias"]  # left-padded: every row ends at the last column
    torch.testing.assert_close(last.squeeze(-1), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox"])
def test_a_new_architecture_runs_as_policy_reward_model_and_critic(arch, tiny, tmp_path):
    """`rlhf rm` (LoRA) then `rlhf ppo` with a tiny Qwen2 (or GPT-NeoX) in every role, each in one process; the
    reward model it trains scores held-out dialogues the same through transformers' sequence classifier."""
    from reward.batches import collate_ranked, encode_file
    from rlhf.config import RMConfig
    from rlhf.metrics import read_metrics
    from rlhf.modeling import init_model, load_tokenizer

    base = init_model(arch, "tiny", tiny["tokenizer"], str(tmp_path / "base"), seed=0)
    rm = tmp_path / "rm"
    assert run_cli("rm", "--config", "configs/tiny/rm.yaml", "--model", base, "--data", tiny["prefs_train"],
                   "--set", f"data.eval={tiny['prefs_eval']}", "--set", "train.max_steps=4",
                   "--set", "lora.enabled=true", "--set", "logging.progress=false", "--set", "ray.in_process=true",
                   "--set", "layout.cpus_per_rank=2", "--output", rm) == 0
    final = str(rm / "final")
    assert os.path.exists(os.path.join(final, "adapter", "adapter_config.json"))
    reward = ScalarHeadModel.from_pretrained(final).eval()
    assert reward.head.bias.item() == 0.0  # held by the trainer: the ranking loss cannot see it

    tokenizer = load_tokenizer(final)
    cfg = RMConfig()
    batch = collate_ranked(encode_file(tiny["prefs_eval"], tokenizer, cfg.data, cfg.rm)[:4], tokenizer.pad_token_id)
    with torch.no_grad():  # whole dialogues ending in <eom>, right-padded as the trainer batches them
        ours = reward.score(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(hf_scores(final, batch["input_ids"], batch["attention_mask"]), ours,
                               atol=1e-5, rtol=1e-4)

    out = tmp_path / "ppo"
    assert run_cli("ppo", "--config", "configs/tiny/ppo.yaml", "--policy", base, "--reward", final,
                   "--prompts", tiny["prompts_train"], "--set", "data.eval=", "--set", "ppo.iterations=2",
                   "--set", "ppo.prompts_per_iteration=8", "--set", "ppo.train_batch_size=8",
                   "--set", "generation.max_new_tokens=12", "--set", "logging.progress=false",
                   "--set", "ray.in_process=true", "--output", out) == 0
    with open(out / "placement.json") as f:
        assert sorted(json.load(f)) == ["critic", "policy", "reference", "reward"]
    iters = [m for m in read_metrics(f"{out}/metrics.jsonl") if "ppo/reward_raw" in m]
    assert len(iters) == 2 and all(torch.isfinite(torch.tensor(m["ppo/vf_loss"])) for m in iters)
    assert AutoModelForCausalLM.from_pretrained(str(out / "final")).config.model_type == arch
