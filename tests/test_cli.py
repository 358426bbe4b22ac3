"""The small commands as a user types them: sample, tokenizer, init-model, validate, and `rlhf --help`."""
from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli
from rlhf.cli import build_parser


def test_sample_tokenizer_init_model_and_validate(tmp_path, capsys):
    assert run_cli("sample", "--out", tmp_path / "data", "--seed", "3") == 0
    assert run_cli("validate", tmp_path / "data" / "prefs_train.jsonl", "--kind", "preferences") == 0
    assert "OK" in capsys.readouterr().out
    assert run_cli("tokenizer", "--data", tmp_path / "data" / "sft_train.jsonl", "--vocab-size", "600",
                   "--out", tmp_path / "tok") == 0
    assert run_cli("init-model", "--arch", "llama", "--preset", "tiny", "--tokenizer", tmp_path / "tok",
                   "--out", tmp_path / "model") == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert tok.eos_token == "<eom>" and model.config.vocab_size == len(tok)


def test_help_lists_the_design_commands():
    text = build_parser().format_help()
    for command in ("tokenizer", "init-model", "sft", "rm", "rm-eval", "ppo", "generate", "sweep", "validate",
                    "pipeline"):
        assert command in text
