"""The bundled synthetic task: files load with the real loaders, splits are held out, the rule scores
replies as documented and the preference ranks follow it."""

from __future__ import annotations

import filecmp
import json
import re

import pytest

from rlhf.data import load_dialogues, load_preferences, load_prompts, load_steps
from rlhf.moss import Dialogue, Turn, render
from reward.rules import answer_reward
from rlhf.sample import (EN_TOPICS, ZH_TOPICS, prompt_key, rule_score, run_sample, score_responses,
                         write_sample)
from rlhf.tokenizer import texts_from_files

LOADERS = {"sft_train": load_dialogues, "sft_eval": load_dialogues, "plugin_sft": load_dialogues,
           "prompts_train": load_prompts, "prompts_eval": load_prompts, "plugin_prompts": load_prompts,
           "plugin_prompts_eval": load_prompts,
           "prefs_train": load_preferences, "prefs_eval": load_preferences,
           "steps_train": load_steps, "steps_eval": load_steps, "steps_sft": load_dialogues,
           "steps_prompts": load_prompts, "steps_prompts_eval": load_prompts}
"""Every file `rlhf sample` writes; the step-by-step task's files are checked further in tests/test_steps_data.py."""


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    paths = write_sample(str(out), seed=0)
    return paths, {name: LOADERS[name](path) for name, path in paths.items()}


def ask(human: str, **metadata) -> Dialogue:
    return Dialogue([Turn(human=human)], "", metadata)


def humans(records) -> set[str]:
    dialogues = [getattr(r, "prompt", r) for r in records]
    return {turn.human for d in dialogues for turn in d.turns}


def test_files_load_with_the_data_loaders(sample):
    paths, records = sample
    assert set(paths) == set(LOADERS)
    sizes = {name: len(r) for name, r in records.items()}
    assert sizes["sft_train"] == 600 and sizes["prompts_train"] == 200 and sizes["prefs_train"] == 400
    assert all(n > 0 for n in sizes.values())
    total_bytes = sum(open(p, "rb").seek(0, 2) for p in paths.values())
    assert total_bytes < 2_000_000


def test_same_seed_same_files_other_seed_other_files(tmp_path, sample):
    paths, _ = sample
    again = write_sample(str(tmp_path / "again"), seed=0)
    other = write_sample(str(tmp_path / "other"), seed=1)
    assert all(filecmp.cmp(paths[name], again[name], shallow=False) for name in paths)
    assert not filecmp.cmp(paths["sft_train"], other["sft_train"], shallow=False)


def test_held_out_splits_share_no_prompt_text(sample):
    _, records = sample
    train = humans(records["sft_train"]) | humans(records["prompts_train"]) | humans(records["prefs_train"])
    held_out = humans(records["sft_eval"]) | humans(records["prompts_eval"]) | humans(records["prefs_eval"])
    assert train and held_out and not train & held_out


def test_mix_of_languages_turns_and_reply_quality(sample):
    _, records = sample
    sft = records["sft_train"]
    zh = sum(d.metadata["lang"] == "zh" for d in sft) / len(sft)
    assert 0.2 < zh < 0.4
    assert any(len(d.turns) > 1 for d in sft) and any(len(d.turns) == 1 for d in sft)
    scores = [rule_score(d, d.turns[-1].moss) for d in sft]
    # Mixed on purpose: PPO must have room to improve on the SFT policy.
    assert {0.0, 0.5, 1.0} <= set(scores)
    assert 0.3 < sum(scores) / len(scores) < 0.6


def test_rule_score_english():
    prompt = ask("Hi! Tell me something about chess.")
    assert prompt_key(prompt) == "chess"
    assert rule_score(prompt, "Thank you for asking! There is a lot to say about chess.") == 1.0
    assert rule_score(prompt, "Many people enjoy Chess, and so do I.") == 0.5
    assert rule_score(prompt, "Thanks for asking! I have nothing to add.") == 0.5
    assert rule_score(prompt, "Thank you! Many people enjoy music.") == 0.5  # the wrong topic
    assert rule_score(prompt, "No idea.") == 0.0
    assert rule_score(prompt, "chessboards are nice") == 0.0  # whole words only


def test_rule_score_chinese_and_arithmetic():
    prompt = ask("你好！请介绍一下熊猫。")
    assert rule_score(prompt, "谢谢你的提问！我很喜欢聊熊猫。") == 1.0
    assert rule_score(prompt, "很多人喜欢熊猫，我也是。") == 0.5
    assert rule_score(prompt, "谢谢！这个问题我不太清楚。") == 0.5
    assert rule_score(prompt, "不知道。") == 0.0
    math = ask("12+7等于多少？", answer="19")
    assert rule_score(math, "谢谢！12+7的结果是19。") == 1.0
    assert rule_score(math, "12+7 = 190.") == 0.0
    assert score_responses([prompt, math], ["不知道。", "Thanks! 12+7 = 19."]) == 0.5


def test_topic_words_do_not_overlap_the_templates(sample):
    # A topic inside another topic, or inside a generic sentence, would make the rule lie.
    topics = EN_TOPICS + ZH_TOPICS
    assert len(set(topics)) == 16 + 8
    for a in topics:
        assert not any(a != b and a in b for b in topics)
    _, records = sample
    for d in records["sft_train"]:
        if d.metadata["style"] in ("polite", "bad"):
            assert not any(t in d.turns[-1].moss for t in topics)


def test_preference_ranks_follow_the_rule_with_ties_and_shorthand(sample):
    paths, records = sample
    raw = [json.loads(line) for line in open(paths["prefs_train"], encoding="utf-8")]
    assert any("chosen" in r for r in raw) and any("responses" in r for r in raw)
    assert {len(p.responses) for p in records["prefs_train"]} == {2, 3, 4}
    ties = 0
    for pref in records["prefs_train"]:
        scores = [rule_score(pref.prompt, r) for r in pref.responses]
        assert pref.pairs(), "every record must give at least one pair"
        for i in range(len(scores) - 1):
            assert scores[i] >= scores[i + 1]
            assert (scores[i] == scores[i + 1]) == (pref.ranks[i] == pref.ranks[i + 1])
        ties += len(set(pref.ranks)) < len(pref.ranks)
    assert ties > 20


def test_plugin_dialogues_call_the_calculator(sample):
    _, records = sample
    calls = [d for d in records["plugin_sft"] if d.turns[-1].commands]
    assert calls and len(calls) < len(records["plugin_sft"])  # some plugin turns need no tool
    text = render(calls[0], plugin=True)
    expression = calls[0].metadata["expression"]
    assert f'<|Commands|>: Calculate("{expression}")<eoc>' in text
    assert f'Calculate("{expression}") => {calls[0].metadata["answer"]}\n<eor>' in text
    assert "- Calculator: enabled. API: Calculate(expression)" in calls[0].meta_instruction
    no_tool = next(d for d in records["plugin_sft"] if not d.turns[-1].commands)
    assert "<|Commands|>: None<eoc>" in render(no_tool, plugin=True)
    # The calculator's result is right; a reply that ignores it guesses, and the guess is always off.
    math = [d for d in records["plugin_sft"] if d.metadata.get("task") == "arithmetic"]
    for dialogue in math:
        assert dialogue.turns[-1].results.endswith(f'=> {dialogue.metadata["answer"]}')
        assert answer_reward(dialogue.metadata, dialogue.turns[-1].moss) == float(dialogue.metadata["trusted"])
    assert 0.3 < sum(d.metadata["trusted"] for d in math) / len(math) < 0.5
    # Held-out arithmetic prompts ask about expressions no training prompt or dialogue contains.
    seen = {d.metadata.get("expression") for d in records["plugin_sft"] + records["plugin_prompts"]}
    assert not seen & {p.metadata["expression"] for p in records["plugin_prompts_eval"]}
    for prompt in records["plugin_prompts"] + records["plugin_prompts_eval"]:
        expression, answer = prompt.metadata["expression"], prompt.metadata["answer"]
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", expression).groups()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(answer)
        assert expression in prompt.turns[-1].human


def test_run_sample_prints_a_summary(tmp_path, capsys):
    assert run_sample(str(tmp_path / "s"), seed=3) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "sample:" in out and str(tmp_path / "s") in out


def test_the_step_task_replies_end_with_the_answer_the_answer_rule_reads(sample):
    """PPO's `answer` rule on the step SFT replies: the slipped ones miss the prompt's answer, the others give it."""
    _, records = sample
    sft = records["steps_sft"]
    assert [answer_reward(d.metadata, d.turns[-1].moss) for d in sft] == [float(not d.metadata["slipped"]) for d in sft]
    for solution in records["steps_train"]:
        assert answer_reward(solution.metadata, solution.reply()) == float(solution.first_error is None)


def test_the_demo_tokenizer_corpus_holds_every_word_of_the_step_task(sample):
    """The demo's tokenizer trains on sft_train, prefs_train and plugin_sft, left as they were (so the demo is too):
    every word and symbol of the step task's text is in that text, so its merges serve the step task as well."""
    paths, _ = sample

    def words(names: tuple[str, ...]) -> set[str]:
        text = "".join(texts_from_files([paths[name] for name in names]))
        return set(re.findall(r"[A-Za-z]+|[^\sA-Za-z0-9]", text))

    step_words = words(("steps_train", "steps_eval", "steps_sft", "steps_prompts"))
    assert {"answer", "+", "-", "="} <= step_words <= words(("sft_train", "prefs_train", "plugin_sft"))
