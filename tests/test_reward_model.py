"""The scalar-head model on tiny random CodeGen and Llama: shapes, the last-token score under either padding,
a save/load round trip in safetensors that plain transformers can also load, and LoRA merged on save."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, CodeGenConfig, LlamaConfig

from reward.model import ScalarHeadModel, last_index, load_reward_stats

VOCAB = 64


def tiny_lm(arch: str):
    if arch == "codegen":
        config = CodeGenConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4,
                               bos_token_id=1, eos_token_id=2)
    else:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def padded_batch():
    """Two rows of different lengths, right-padded and left-padded, with pad id 0."""
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    width = max(len(r) for r in rows)
    right = torch.zeros(len(rows), width, dtype=torch.long)
    left = torch.zeros(len(rows), width, dtype=torch.long)
    right_mask = torch.zeros_like(right)
    left_mask = torch.zeros_like(left)
    for i, row in enumerate(rows):
        right[i, :len(row)] = torch.tensor(row)
        right_mask[i, :len(row)] = 1
        left[i, width - len(row):] = torch.tensor(row)
        left_mask[i, width - len(row):] = 1
    return (right, right_mask), (left, left_mask)


def test_last_index_finds_the_last_attended_position():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_index(mask).tolist() == [2, 4, 4]


@pytest.mark.parametrize("arch", ["codegen", "llama"])
def test_values_logits_and_score_shapes(arch):
    model = ScalarHeadModel(tiny_lm(arch))
    assert model.head.in_features == 32 and model.head.weight.dtype == torch.float32
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"lm", "head"}
    (ids, mask), _ = padded_batch()
    with torch.no_grad():
        values = model(ids, mask)
        both, logits = model.forward_with_logits(ids, mask)
        scores = model.score(ids, mask)
        plain_logits = model.lm(input_ids=ids, attention_mask=mask).logits
    assert values.shape == (2, 6) and values.dtype == torch.float32
    assert logits.shape == (2, 6, VOCAB)
    assert scores.shape == (2,)
    torch.testing.assert_close(both, values)
    # The LM head on the backbone's hidden states is the causal LM's own output at the attended positions.
    torch.testing.assert_close(logits * mask[..., None], plain_logits * mask[..., None])


@pytest.mark.parametrize("arch", ["codegen", "llama"])
def test_score_is_the_value_at_the_last_attended_token_for_either_padding(arch):
    model = ScalarHeadModel(tiny_lm(arch))
    (right, right_mask), (left, left_mask) = padded_batch()
    with torch.no_grad():
        right_values, right_scores = model(right, right_mask), model.score(right, right_mask)
        left_values, left_scores = model(left, left_mask), model.score(left, left_mask)
    for i, idx in enumerate([5, 2]):
        assert right_scores[i] == right_values[i, idx]
        assert left_scores[i] == left_values[i, 5]
    # Positions skip left padding, so a row scores the same however it is padded.
    torch.testing.assert_close(left_scores, right_scores, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["codegen", "llama"])
def test_save_and_load_round_trip_in_safetensors(arch, tmp_path):
    model = ScalarHeadModel(tiny_lm(arch))
    with torch.no_grad():
        model.head.bias.fill_(0.25)  # a trained-looking head, so a fresh head could not pass by chance
    out = str(tmp_path / "rm")
    model.save_pretrained(out, stats={"mean": 0.5, "std": 2.0})

    files = os.listdir(out)
    assert "value_head.safetensors" in files and "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert load_reward_stats(out) == {"mean": 0.5, "std": 2.0}

    loaded = ScalarHeadModel.from_pretrained(out).eval()
    (ids, mask), _ = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask), rtol=0, atol=0)
        torch.testing.assert_close(loaded.head.bias, model.head.bias)
        plain = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits,
                                   model.lm(input_ids=ids, attention_mask=mask).logits)


def test_a_directory_without_a_head_gets_a_new_small_head(tmp_path):
    tiny_lm("llama").save_pretrained(str(tmp_path / "sft"))
    critic = ScalarHeadModel.from_pretrained(str(tmp_path / "sft"))
    assert critic.head.bias.item() == 0.0
    assert critic.head.weight.std().item() < 0.5
    assert load_reward_stats(str(tmp_path / "sft")) is None


def test_lora_layers_apply_in_the_backbone_and_are_merged_on_save(tmp_path):
    from rlhf.modeling import apply_lora

    peft_model = apply_lora(tiny_lm("codegen"), r=4, alpha=8, dropout=0.0)
    model = ScalarHeadModel(peft_model)
    assert not [n for n, _ in model.named_parameters() if not n.startswith(("lm.", "head."))]
    (ids, mask), _ = padded_batch()
    with torch.no_grad():
        before = model(ids, mask)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # LoRA starts as a no-op; make it change the backbone
        after = model(ids, mask)
    assert not torch.allclose(before, after)

    out = str(tmp_path / "lora_rm")
    model.save_pretrained(out)
    loaded = ScalarHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), after, atol=1e-5, rtol=1e-4)


def test_loading_a_missing_directory_is_a_one_line_error(tmp_path):
    from rlhf.modeling import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not exist"):
        ScalarHeadModel.from_pretrained(str(tmp_path / "nope"))
