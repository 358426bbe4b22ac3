"""The second ranked task (benchmarks/second_task.py, animal sounds): its files pass the project's loaders, the same
seed writes the same bytes, and its rule scores replies as documented, as PPO loads it (`second_task:rule`)."""
from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from reward.rules import Rollout, load_rule
from rlhf.data import load_dialogues, load_preferences, load_prompts
from rlhf.moss import Dialogue, Turn
from rlhf.sample import write_sample
from rlhf.tools import default_registry

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LOADERS = {"sft_train": load_dialogues, "sft_eval": load_dialogues, "prompts_train": load_prompts,
           "prompts_eval": load_prompts, "prefs_train": load_preferences, "prefs_eval": load_preferences}


@pytest.fixture()
def task(monkeypatch):
    """The module as `ppo.eval_rules: {rule_score: second_task:rule}` imports it: benchmarks/ on the path."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import second_task
    return second_task


@pytest.fixture()
def written(task, tmp_path):
    paths = task.write_task(str(tmp_path / "seed0"), seed=0)
    return paths, {name: LOADERS[name](path) for name, path in paths.items()}


def ask(human: str) -> Dialogue:
    return Dialogue([Turn(human=human)], "You are an AI assistant whose name is MOSS.\n")


def test_files_load_with_the_data_loaders(written):
    paths, records = written
    assert set(paths) == set(LOADERS)
    sizes = {name: len(r) for name, r in records.items()}
    assert sizes == {"sft_train": 600, "sft_eval": 120, "prompts_train": 200, "prompts_eval": 50,
                     "prefs_train": 400, "prefs_eval": 100}
    assert all(d.meta_instruction == "You are an AI assistant whose name is MOSS.\n" for d in records["sft_train"])
    prefs = records["prefs_train"]
    assert {len(p.responses) for p in prefs} == {2, 3, 4}
    assert any(len(set(p.ranks)) < len(p.ranks) for p in prefs)  # ties
    assert all(p.pairs() for p in prefs)


def test_same_seed_same_files_other_seed_other_files(task, written, tmp_path):
    paths, _ = written
    again = task.write_task(str(tmp_path / "again"), seed=0)
    other = task.write_task(str(tmp_path / "other"), seed=1)
    assert all(filecmp.cmp(paths[name], again[name], shallow=False) for name in paths)
    assert not filecmp.cmp(paths["sft_train"], other["sft_train"], shallow=False)


def test_sft_replies_are_mixed_and_ranks_follow_the_rule(task, written):
    _, records = written
    sft = records["sft_train"]
    prompts, replies = [d.as_prompt() for d in sft], [d.turns[-1].moss for d in sft]
    parts = task.parts_of(prompts, replies)
    # Mediocre on purpose, in both parts: PPO must have room to improve on the SFT policy.
    assert 0.3 < task.score_of(prompts, replies) < 0.5
    assert 0.3 < parts["fact"] < 0.6 and 0.2 < parts["brief"] < 0.5
    for pref in records["prefs_train"]:
        scores = [task.rule_score(pref.prompt, r) for r in pref.responses]
        assert scores == sorted(scores, reverse=True)
        assert all((a < b) == (sa > sb) for a, sa in zip(pref.ranks, scores) for b, sb in zip(pref.ranks, scores))


def test_held_out_prompts_are_new_questions_about_known_animals(task, written):
    _, records = written
    asked = lambda ds: {d.turns[-1].human for d in ds}  # noqa: E731
    train = asked(records["sft_train"]) | asked(records["prompts_train"])
    assert not asked(records["prompts_eval"]) & train
    animals = lambda ds: {task.prompt_key(d) for d in ds}  # noqa: E731
    assert animals(records["prompts_eval"]) <= animals(records["sft_train"]) == set(task.SOUNDS)


def test_rule_as_ppo_loads_it(task, tmp_path):
    rule = load_rule("second_task:rule", default_registry(), "ppo.eval_rules.rule_score")
    prompt = ask("Quick question: What sound does a cow make?")
    score = lambda reply: rule(Rollout(prompt, reply))  # noqa: E731
    assert score("A cow says moo.") == 1.0
    assert score("Animals make all kinds of noises. It goes moo moo.") == 0.5  # right, not brief
    assert score("A cow says woof.") == 0.5  # brief, wrong sound
    assert score("Animals make all kinds of noises. I do not know that one.") == 0.0
    assert score("Moo, or maybe woof, or quack.") == 0.5  # every sound named is no answer: brief only
    assert score("") == 0.0
    assert rule(Rollout(ask("What does an owl say?"), "Hoot!")) == 1.0
    assert task.parts_of([prompt, prompt], ["A cow says moo.", "A cow says woof."]) == {"fact": 0.5, "brief": 1.0}

    sample = write_sample(str(tmp_path / "sample"), seed=0)
    for bundled in load_prompts(sample["prompts_eval"])[:10]:
        assert rule(Rollout(bundled, "Thank you for asking! Many people enjoy music.")) is None
    assert task.score_of([bundled], ["Thanks!"]) is None and task.parts_of([bundled], ["Thanks!"]) is None
