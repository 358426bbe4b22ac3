"""Tokenizer training and model building on the bundled sample: MOSS special tokens stay single ids,
random models load with plain transformers, and LoRA checkpoints load both as adapters and merged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from rlhf.data import DataFileError
from rlhf.modeling import (LORA_TARGETS, PRESETS, ModelLoadError, apply_lora, atomic_directory, init_model,
                           load_causal_lm, load_tokenizer, run_init_model, save_pretrained_atomic)
from rlhf.moss import PAD, SPECIAL_TOKENS
from rlhf.sample import write_sample
from rlhf.tokenizer import run_tokenizer, texts_from_files, train_tokenizer

TEXT = "<|Human|>: 你好！Tell me about chess.<eoh>\n<|MOSS|>: 谢谢你的提问！Chess  is fun 😀<eom>\n"


@pytest.fixture(scope="module")
def sample_paths(tmp_path_factory) -> dict[str, str]:
    return write_sample(str(tmp_path_factory.mktemp("sample")), seed=0, n_sft=200, n_prompts=60, n_prefs=120)


@pytest.fixture(scope="module")
def tokenizer_dir(sample_paths, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tokenizer"))
    train_tokenizer(texts_from_files(list(sample_paths.values())), 800, out)
    return out


@pytest.fixture(scope="module")
def model_dirs(tokenizer_dir, tmp_path_factory) -> dict[str, str]:
    return {arch: init_model(arch, "tiny", tokenizer_dir, str(tmp_path_factory.mktemp(arch)), seed=0)
            for arch in PRESETS}


def test_the_saved_chat_template_renders_what_the_model_was_trained_on_byte_for_byte(sample_paths, model_dirs):
    """transformers (and vLLM, and any server that reads tokenizer_config.json) renders our dialogues exactly as
    `rlhf.moss.render` does: SFT dialogues, plugin dialogues in both styles, and prompts with the generation prompt."""
    from rlhf.data import load_dialogues, load_prompts
    from rlhf.moss import chat_messages, render
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["codegen"])  # plain transformers, from init-model's output
    assert tokenizer.chat_template
    cases = [(d, False, False) for d in load_dialogues(sample_paths["sft_train"])[:50]]
    cases += [(d, plugin, False) for d in load_dialogues(sample_paths["plugin_sft"])[:50] for plugin in (False, True)]
    cases += [(d, False, True) for d in load_prompts(sample_paths["prompts_eval"])[:30]]
    cases += [(d, True, True) for d in load_prompts(sample_paths["plugin_prompts"])[:30]]
    assert any(d.meta_instruction for d, _, _ in cases) and any(d.turns[0].commands for d, _, _ in cases)
    for dialogue, plugin, prompt in cases:
        text = tokenizer.apply_chat_template(chat_messages(dialogue), tokenize=False, add_generation_prompt=prompt,
                                             plugin=plugin)
        assert text == render(dialogue, plugin), (text, render(dialogue, plugin))


def test_special_tokens_are_single_ids_even_inside_text(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for token in SPECIAL_TOKENS + [PAD]:
        ids = tokenizer.encode(f"word{token}word", add_special_tokens=False)
        assert tokenizer.convert_tokens_to_ids(token) in ids
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert tokenizer.eos_token == "<eom>" and tokenizer.pad_token == "<pad>"


def test_decode_gives_back_the_text_chinese_included(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.unk_token_id not in ids or tokenizer.unk_token_id is None


def test_a_number_is_the_same_digit_tokens_wherever_it_stands(tokenizer_dir):
    """Question, command, Results and a Chinese answer: 147 is always the tokens 1, 4, 7, so a model can copy it."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "147"]
    for text in ("What is 147?", 'Calculate("147+2")', "=> 147<eor>", "答案是147。"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        at = ids.index(digits[0])
        assert ids[at:at + 3] == digits, text
        assert tokenizer.decode(ids) == text


def test_texts_from_files_reads_every_kind(sample_paths):
    texts = list(texts_from_files([sample_paths["prefs_eval"], sample_paths["plugin_sft"]]))
    assert any(t.endswith("<eom>\n") and "<|Human|>:" in t for t in texts)
    # Plugin records appear in both renderings, the plugin one with `None` for absent segments.
    assert any('<|Commands|>: Calculate("' in t for t in texts)
    assert any("<|Commands|>: None<eoc>" in t for t in texts)


def test_texts_from_files_reports_bad_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"turns": [{"human": "hi", "moss": "hello"}]}) + "\n" + '{"turns": 3}\n')
    with pytest.raises(DataFileError, match=r"bad.jsonl:2: turns: expected a list"):
        list(texts_from_files([str(bad)]))


def test_run_tokenizer_prints_one_line(sample_paths, tmp_path, capsys):
    assert run_tokenizer([sample_paths["sft_eval"]], 400, str(tmp_path / "tok")) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and str(tmp_path / "tok") in out
    assert run_tokenizer([sample_paths["sft_eval"]], 100, str(tmp_path / "tok2")) == 2
    assert "--vocab-size 100 is too small" in capsys.readouterr().err


@pytest.mark.parametrize("arch", sorted(PRESETS))
def test_init_model_loads_with_transformers_and_is_seeded(arch, model_dirs, tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(model_dirs[arch])
    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch])
    assert model.config.model_type == arch
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<eom>")
    logits = model(torch.tensor([tokenizer.encode(TEXT)])).logits
    assert logits.shape[-1] == len(tokenizer) == len(load_tokenizer(tokenizer_dir))
    # Plain AutoTokenizer (which for Qwen2 swaps in its own class) encodes a MOSS dialogue the same way.
    assert AutoTokenizer.from_pretrained(model_dirs[arch]).encode(TEXT) == tokenizer.encode(TEXT)
    assert os.path.exists(os.path.join(model_dirs[arch], "model.safetensors"))

    again = AutoModelForCausalLM.from_pretrained(init_model(arch, "tiny", tokenizer_dir, str(tmp_path / "a")))
    other = AutoModelForCausalLM.from_pretrained(init_model(arch, "tiny", tokenizer_dir, str(tmp_path / "b"), 1))
    for (name, p), q, r in zip(model.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(p, q), name
    assert not all(torch.equal(p, r) for p, r in zip(model.parameters(), other.parameters()))


def test_run_init_model_reports_unknown_preset(tokenizer_dir, tmp_path, capsys):
    assert run_init_model("llama", "huge", tokenizer_dir, str(tmp_path / "m")) == 2
    assert "--preset 'huge' is unknown" in capsys.readouterr().err


def test_tokenizer_without_moss_tokens_is_refused(tmp_path):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"lacks the MOSS special tokens <eoh> <eom>.*rlhf tokenizer"):
        load_tokenizer(str(tmp_path))


def test_missing_paths_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no-such-model")
    for load in (load_tokenizer, load_causal_lm):
        with pytest.raises(ModelLoadError, match="does not exist") as error:
            load(missing)
        assert "\n" not in str(error.value)
    # Offline, a hub id must already be cached: nothing is downloaded.
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        load_causal_lm("no-such-org/no-such-model")
    # A directory that exists but holds no safetensors model.
    with pytest.raises(ModelLoadError, match="safetensors") as error:
        load_causal_lm(str(tmp_path))
    assert "\n" not in str(error.value)
    with pytest.raises(ModelLoadError, match="dtype"):
        load_causal_lm(missing, dtype="float8")


def test_load_tokenizer_sets_a_pad_token(model_dirs):
    tokenizer = load_tokenizer(model_dirs["llama"])
    assert tokenizer.pad_token == "<pad>"
    assert load_causal_lm(model_dirs["llama"], dtype="bfloat16").dtype == torch.bfloat16


@pytest.mark.parametrize("arch", sorted(PRESETS))
def test_lora_saves_adapter_and_merged_model(arch, model_dirs, tmp_path):
    from peft import PeftModel

    tokenizer = load_tokenizer(model_dirs[arch])
    policy = apply_lora(load_causal_lm(model_dirs[arch]), r=4, alpha=8, dropout=0.0, target_modules="auto")
    with torch.no_grad():  # LoRA starts as a no-op; make it change the outputs so the merge is tested
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()
    policy.eval()
    ids = torch.tensor([tokenizer.encode(TEXT)])
    expected = policy(ids).logits

    out = str(tmp_path / "final")
    save_pretrained_atomic(policy, tokenizer, out, extra_files={"old.txt": "replaced"})
    save_pretrained_atomic(policy, tokenizer, out, extra_files={"note.txt": "hi"})
    assert not os.path.exists(os.path.join(out, "old.txt"))
    assert open(os.path.join(out, "note.txt")).read() == "hi"
    assert not any(".tmp-" in name or ".old-" in name for name in os.listdir(tmp_path))

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(merged(ids).logits, expected, atol=1e-4)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs[arch]),
                                        os.path.join(out, "adapter")).eval()
    assert torch.allclose(adapter(ids).logits, expected, atol=1e-5)
    targets = set(json.load(open(os.path.join(out, "adapter", "adapter_config.json")))["target_modules"])
    assert targets == set(LORA_TARGETS[arch])
    # Only the attention projections carry adapters (GPT-NeoX's `dense` must not catch the MLP's dense_h_to_4h).
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in policy.named_parameters() if "lora_A" in name}
    assert adapted == set(LORA_TARGETS[arch])


def test_a_write_that_fails_leaves_the_old_directory_and_no_temp_beside_it(tmp_path):
    out = tmp_path / "final"
    with atomic_directory(str(out)) as tmp:
        (Path(tmp) / "model.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(str(out)) as tmp:
            (Path(tmp) / "model.txt").write_text("half")
            raise OSError("disk full")
    assert (out / "model.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["final"]
