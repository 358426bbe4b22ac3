"""Rule-based and verifiable rewards: Python functions of one rollout, weighted beside the preference model.

PPO's reward is `ppo.reward_model_weight x model score + sum(weight x rule)` over `ppo.reward_rules`; each part is
logged on its own (`reward/model`, `reward/answer`, ...). Built-in rules are `answer` (the final number equals
the prompt's known `answer`: "the correctness of the conclusion as the reward"), `command` (every command line
is `Name("arg")` of a registered tool), `grounded` (the final number is the one the tool returned: the reply
uses its Results) and `sample` (the bundled sample's rule); any `module:function` taking a `Rollout` and
returning a float is a rule too.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

from rlhf.moss import COMMANDS_TAG, EOC, EOR, RESULTS_TAG, Dialogue
from rlhf.plugins import ToolRegistry, answer_reward, command_well_formed, final_number

BUILTIN_RULES = ("answer", "command", "grounded", "sample")


@dataclass(frozen=True)
class Rollout:
    """What a rule sees of one rollout."""

    prompt: Dialogue
    """The prompt record, its metadata included (e.g. `answer`)."""
    reply: str
    """The final MOSS reply, without tags."""
    commands: str = ""
    """The Commands segment the model wrote: `None` when it called no tool, "" when it wrote no segment."""
    results: str = ""
    """The Results the program wrote back ("" without a Commands segment)."""
    ended: bool = True
    """The reply reached `<eom>`."""


Rule = Callable[[Rollout], float]


class RuleError(ValueError):
    """A rule that cannot be loaded or returned something that is not a finite number; one line."""


def plugin_segments(text: str) -> tuple[str, str]:
    """(commands, results) of a rollout's full text (what the model wrote with the Results in between)."""
    if EOC not in text:
        return "", ""
    head = text.split(EOC, 1)[0]
    at = head.rfind(COMMANDS_TAG)
    commands = head[at + len(COMMANDS_TAG):].strip() if at >= 0 else ""
    tail = text.split(EOC, 1)[1]
    at = tail.find(RESULTS_TAG)
    results = tail[at + len(RESULTS_TAG):].split(EOR, 1)[0].strip() if at >= 0 else ""
    return commands, results


def _answer(rollout: Rollout) -> float:
    return answer_reward(rollout.prompt.metadata, rollout.reply)


def _command(registry: ToolRegistry) -> Rule:
    def rule(rollout: Rollout) -> float:
        return command_well_formed(rollout.commands, registry) if rollout.commands else 0.0
    return rule


def _grounded(rollout: Rollout) -> float:
    """1.0 when the reply's final number is the last number the tools returned (`... => 56`)."""
    returned = [line.rsplit("=>", 1)[1] for line in rollout.results.splitlines() if "=>" in line]
    tool_number = final_number(returned[-1]) if returned else None
    return 1.0 if tool_number is not None and answer_reward({"answer": tool_number}, rollout.reply) else 0.0


def _sample(rollout: Rollout) -> float:
    from rlhf.sample import rule_score
    return rule_score(rollout.prompt, rollout.reply)


def load_rule(name: str, registry: ToolRegistry) -> Rule:
    """A built-in rule by name, or `package.module:function` imported from the Python path."""
    if name == "answer":
        return _answer
    if name == "command":
        return _command(registry)
    if name == "grounded":
        return _grounded
    if name == "sample":
        return _sample
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise RuleError(f"ppo.reward_rules.{name}: not a built-in rule ({', '.join(BUILTIN_RULES)}) nor "
                        "module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise RuleError(f"ppo.reward_rules.{name}: cannot import it ({' '.join(str(err).split())})") from None
    if not callable(fn):
        raise RuleError(f"ppo.reward_rules.{name}: {attr} is not a function of a Rollout")
    return fn


def load_rules(weights: dict[str, float], registry: ToolRegistry) -> dict[str, Rule]:
    """The rules of a run with a non-zero weight, loaded before Ray starts so a typo fails in a second."""
    return {name: load_rule(name, registry) for name, weight in weights.items() if weight}


def score_rules(rules: dict[str, Rule], rollouts: list[Rollout]) -> dict[str, list[float]]:
    """Each rule's score of each rollout; a rule that raises or returns a non-finite value stops the run in one
    line naming it and the prompt, since a silently wrong reward is worse than none."""
    out: dict[str, list[float]] = {}
    for name, rule in rules.items():
        scores = []
        for rollout in rollouts:
            try:
                value = float(rule(rollout))
            except Exception as err:  # a user rule's bug must name the rule, not surface as a trainer crash
                raise RuleError(f"ppo.reward_rules.{name}: raised {type(err).__name__} ({err}) on the prompt "
                                f"{rollout.prompt.turns[-1].human[:60]!r}") from None
            if not math.isfinite(value):
                raise RuleError(f"ppo.reward_rules.{name}: returned {value} on the prompt "
                                f"{rollout.prompt.turns[-1].human[:60]!r}; a rule must return a finite number")
            scores.append(value)
        out[name] = scores
    return out


def combine(model_scores: list[float] | None, rule_scores: dict[str, list[float]], model_weight: float,
            weights: dict[str, float]) -> list[float]:
    """The reward of each rollout: the weighted preference-model score plus the weighted rules."""
    n = len(model_scores) if model_scores is not None else len(next(iter(rule_scores.values())))
    total = [model_weight * s for s in model_scores] if model_scores is not None else [0.0] * n
    for name, scores in rule_scores.items():
        total = [t + weights[name] * s for t, s in zip(total, scores)]
    return total
