"""Rule-based rewards without Ray: reading a plugin rollout's segments, the built-in rules, a user's rule by
import path, weighting beside the preference model, and one-line errors for a rule that cannot be used."""
from __future__ import annotations

import math
import sys
import types

import pytest

from reward.rules import Rollout, RuleError, combine, load_rule, load_rules, score_rules
from rlhf.moss import plugin_segments
from rlhf.config import ConfigError, load_config
from rlhf.moss import Dialogue, Turn
from rlhf.tools import ToolError, build_registry, default_registry

PROMPT = Dialogue([Turn(human="What is 7*8?")], "", {"answer": "56"})
FULL = ('<|Inner Thoughts|>: use it<eot>\n<|Commands|>: Calculate("7*8")<eoc>\n<|Results|>:\n'
        'Calculate("7*8") => 56\n<eor>\n<|MOSS|>: It is 56.<eom>')


def test_plugin_segments_of_a_rollout():
    assert plugin_segments(FULL) == ('Calculate("7*8")', 'Calculate("7*8") => 56')
    assert plugin_segments("<|MOSS|>: hi<eom>") == ("", "")
    assert plugin_segments("<|Commands|>: None<eoc>\n<|Results|>: None<eor>\n<|MOSS|>: 3<eom>") == ("None", "None")


def test_builtin_rules_score_answers_and_commands():
    registry = default_registry()
    answer, command = load_rule("answer", registry), load_rule("command", registry)
    right = Rollout(PROMPT, "It is 56.", 'Calculate("7*8")', "Calculate(\"7*8\") => 56")
    wrong = Rollout(PROMPT, "It is 54.", "Calculate(7*8", "No result.")
    silent = Rollout(PROMPT, "It is 56.")  # no Commands segment at all
    assert [answer(r) for r in (right, wrong, silent)] == [1.0, 0.0, 1.0]
    assert [command(r) for r in (right, wrong, silent)] == [1.0, 0.0, 0.0]
    assert command(Rollout(PROMPT, "56", "Search(\"x\")")) == 0.0  # not a registered tool
    sample = load_rule("sample", registry)
    assert sample(Rollout(PROMPT, "Thanks! It is 56.")) == 1.0


def test_weighted_sum_keeps_each_part():
    scores = score_rules(load_rules({"answer": 2.0, "command": 0.5, "sample": 0.0}, default_registry()),
                         [Rollout(PROMPT, "56", 'Calculate("7*8")'), Rollout(PROMPT, "1", "None")])
    assert scores == {"answer": [1.0, 0.0], "command": [1.0, 1.0]}  # a zero weight loads no rule
    total = combine([0.4, -0.2], scores, 0.5, {"answer": 2.0, "command": 0.5})
    assert total == pytest.approx([0.2 + 2.0 + 0.5, -0.1 + 0.0 + 0.5])
    assert combine(None, scores, 0.0, {"answer": 2.0, "command": 0.5}) == [2.5, 0.5]


def test_a_user_rule_by_import_path_and_its_errors(monkeypatch):
    module = types.ModuleType("my_rules")
    module.length_penalty = lambda r: -len(r.reply) / 100
    module.broken = lambda r: 1 / 0
    module.nan = lambda r: math.nan
    module.not_callable = 3
    monkeypatch.setitem(sys.modules, "my_rules", module)
    registry = default_registry()
    rollouts = [Rollout(PROMPT, "x" * 50)]
    assert score_rules({"len": load_rule("my_rules:length_penalty", registry)}, rollouts) == {"len": [-0.5]}
    with pytest.raises(RuleError, match=r"my_rules:broken: raised ZeroDivisionError .* 'What is 7\*8\?'"):
        score_rules({"my_rules:broken": module.broken}, rollouts)
    with pytest.raises(RuleError, match="returned nan"):
        score_rules({"my_rules:nan": module.nan}, rollouts)
    with pytest.raises(RuleError, match="not a function"):
        load_rule("my_rules:not_callable", registry)
    with pytest.raises(RuleError, match="cannot import it"):
        load_rule("no_such_module_xyz:rule", registry)


def test_reward_config_is_checked_in_one_line():
    cfg = load_config("ppo", "configs/tiny/plugin_ppo.yaml", ["ppo.reward_rules.command=0.5"])
    assert cfg.ppo.reward_rules == {"answer": 1.0, "command": 0.5} and cfg.ppo.reward_model_weight == 0.0
    for overrides, message in [
        (["ppo.reward_rules.answer=0"], "0 leaves no reward"),
        (["ppo.reward_rules.typo=1"], "reward_rules.typo: not a built-in rule"),
        (["ppo.estimator=gae"], "critic_init: reward needs a reward model"),
        (["ppo.reward_model_weight=-1"], "must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("ppo", "configs/tiny/plugin_ppo.yaml", overrides)


def test_user_tools_register_through_the_config_path(monkeypatch):
    module = types.ModuleType("my_tools")
    module.register = lambda registry: registry.register_tool("Web Search", "Search(query)", "Search",
                                                              lambda q: f"top result for {q}")
    monkeypatch.setitem(sys.modules, "my_tools", module)
    registry = build_registry(["my_tools:register"], solver=False, timeout=1.0)
    assert registry.run_commands('Search("moss")\nSolve("x+1=2")') == \
        'Search("moss") => top result for moss\nNo result.'
    assert registry.meta_tools()["Web Search"] == "Search(query)" and registry.meta_tools()["Equation Solver"] is None
    with pytest.raises(ToolError, match="plugins.tools: my_tools:missing: cannot import it"):
        build_registry(["my_tools:missing"])
