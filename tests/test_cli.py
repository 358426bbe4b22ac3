"""The small commands as a user types them: sample, tokenizer, init-model, validate, render, and `rlhf --help`."""
from __future__ import annotations

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import off_umask, run_cli, umask
from rlhf.cli import build_parser


def test_sample_tokenizer_init_model_and_validate(tmp_path, capsys):
    with umask(0o022):
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
    # Under umask 022 a teammate or a serving process reads all of it: files 644 (model.safetensors too), dirs 755.
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert off_umask(tmp_path, 0o022) == {}


def test_help_lists_the_design_commands():
    text = build_parser().format_help()
    for command in ("tokenizer", "init-model", "sft", "rm", "rm-eval", "ppo", "generate", "sweep", "validate",
                    "render", "pipeline"):
        assert command in text


def test_render_writes_the_text_the_model_sees_and_the_spans_it_trains_on(tmp_path):
    from test_moss import RAW_RECORDS
    raw = RAW_RECORDS["calculator"]
    (tmp_path / "raw.jsonl").write_text(json.dumps(raw, ensure_ascii=False) + "\n", encoding="utf-8")
    assert run_cli("render", tmp_path / "raw.jsonl", "--kind", "sft", "--plugin", "--out", tmp_path / "r.jsonl") == 0
    [line] = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()]
    turn = raw["chat"]["turn_1"]
    assert line["text"] == raw["meta_instruction"] + "".join(turn.values())
    trained = [line["text"][a:b] for a, b in line["trained"]]
    assert trained == [turn["Inner Thoughts"] + turn["Commands"].rstrip("\n"), turn["MOSS"].rstrip("\n")]
    assert line["conversation_id"] == 1  # unknown keys ride along

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"turns": [{"human": "2+3?"}], "responses": ["5", "6"], "id": 9}) + "\n")
    assert run_cli("render", prefs, "--kind", "preferences", "--out", tmp_path / "p.jsonl") == 0
    [line] = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert line["id"] == 9 and line["ranks"] == [0, 1]
    assert [r["text"] for r in line["responses"]] == ["<|Human|>: 2+3?<eoh>\n<|MOSS|>: 5<eom>\n",
                                                      "<|Human|>: 2+3?<eoh>\n<|MOSS|>: 6<eom>\n"]
    assert [[r["text"][a:b] for a, b in r["trained"]] for r in line["responses"]] == [[" 5<eom>"], [" 6<eom>"]]


def test_tokenizer_and_the_generation_cap_read_another_projects_format(tmp_path):
    """`--data-format` reaches every command that reads data, the tokenizer and the reply-length check too."""
    from rlhf.generation import reply_lengths
    hh = tmp_path / "hh.jsonl"
    hh.write_text("".join(json.dumps({"chosen": f"\n\nHuman: {q}?\n\nAssistant: {a}.",
                                      "rejected": f"\n\nHuman: {q}?\n\nAssistant: no."}) + "\n"
                          for q, a in [("2+3", "It is 5"), ("Name a colour", "Blue, like the sky")] * 20))
    assert run_cli("tokenizer", "--data", hh, "--data-format", "hh-rlhf", "--vocab-size", "300",
                   "--out", tmp_path / "tok") == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    lengths = reply_lengths(str(hh), tok, "hh-rlhf")
    assert len(lengths) == 80 and max(lengths) == len(tok.encode(" Blue, like the sky.<eom>", add_special_tokens=False))
