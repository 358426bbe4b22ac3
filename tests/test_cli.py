"""The small commands as a user types them: sample, tokenizer, init-model, validate, render, and `rlhf --help`."""
from __future__ import annotations

import json
import re

import pytest

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
    listed = re.findall(r"^    (\S+)", text, re.MULTILINE)  # a command's name starts its line; its help may wrap
    assert sorted(listed) == sorted(["tokenizer", "init-model", "sample", "validate", "convert", "render", "sft", "rm",
                                     "rm-eval", "rm-strength", "prm", "prm-eval", "dpo", "ppo", "generate", "chat", "config", "sweep",
                                     "pipeline"])


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


def test_every_option_of_every_command_says_what_it_takes_and_does():
    import argparse
    from rlhf.cli import build_parser
    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    silent = [f"{name} {' '.join(a.option_strings) or a.dest}" for name, sub in commands.choices.items()
              for a in sub._actions if not isinstance(a, argparse._HelpAction) and len(a.help or "") < 12]
    assert not silent, f"options without a description in --help: {silent}"
    assert {"sft", "rm", "dpo", "ppo"} <= set(commands.choices)


def test_rlhf_config_prints_a_resolved_config_that_loads_back_with_each_keys_documentation(tmp_path, capsys):
    from rlhf.config import AlgorithmConfig, load_config, to_yaml
    from rlhf.config_docs import doc_of
    assert run_cli("config", "ppo", "--config", "configs/tiny/ppo.yaml", "--set", "ppo.kl_target=0.07") == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed, encoding="utf-8")
    expected = load_config("ppo", "configs/tiny/ppo.yaml", ["ppo.kl_target=0.07"])
    assert to_yaml(load_config("ppo", str(tmp_path / "printed.yaml"))) == to_yaml(expected)
    lines = printed.splitlines()
    at = first = lines.index("  kl_target: 0.07")
    while lines[first - 1].startswith("  # "):
        first -= 1
    assert " ".join(line[4:] for line in lines[first:at]) == " ".join(doc_of(AlgorithmConfig, "kl_target").split())


@pytest.mark.slow
def test_a_command_that_starts_its_own_ray_does_not_print_rays_token_notice(tmp_path):
    """Ray says on every local start that token authentication is on; a run keeps it on and spares its users the
    notice (actors.runtime.ensure_ray, the one place a command starts a local Ray)."""
    import os
    import subprocess
    import sys
    script = ("from actors.runtime import ensure_ray; from rlhf.config import RayConfig; import ray\n"
              "assert ensure_ray(RayConfig(), 1)\nray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Token authentication" not in result.stdout + result.stderr
