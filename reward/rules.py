"""Rule-based and verifiable rewards: Python functions of one rollout, weighted beside the preference model.

PPO's reward is `ppo.reward_model_weight x model score + sum(weight x rule)` over `ppo.reward_rules`; each part is
logged on its own (`reward/model`, `reward/answer`, ...). `ppo.eval_rules` are rules measured but never rewarded
(`ppo/NAME` each iteration, `eval/NAME` on held-out prompts). Built-in rules are `answer` (the final number equals
the prompt's known `answer`: "the correctness of the conclusion as the reward"), `command` (every command line is
`Name("arg")` of a registered tool), `grounded` (the final number is the one the tool returned: the reply uses its
Results) and `sample` (the bundled task's rule, `rlhf.sample:rule`); any `module:function` taking a `Rollout` and
returning a float is a rule too. A rule returns None for a prompt it cannot judge (an `answer` rule on a prompt
without an answer): an eval rule is then not logged, a reward rule stops the run naming the prompt.
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Optional

import torch

from rlhf.moss import NONE_TEXT, Dialogue
from rlhf.tools import ToolRegistry, default_registry, parse_command

BUILTIN_RULES = ("answer", "command", "grounded", "sample")
ALIASES = {"sample": "rlhf.sample:rule"}
"""Built-in rules that live with what they judge: the bundled demo task's rule is the demo's, not the trainer's."""


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
    """The Results the program wrote back, as the model saw them ("" without a Commands segment)."""
    ended: bool = True
    """The reply reached `<eom>`."""


Rule = Callable[[Rollout], Optional[float]]


class RuleError(ValueError):
    """A rule that cannot be loaded or returned something that is not a finite number; one line."""


# --- verifiable checks -------------------------------------------------------------------------------------------

# A number not glued to a word or another number: "x2" is no number, "52-7" ends with 7, "1,024" is 1024.
_NUMBER = re.compile(r"(?<![A-Za-z0-9_.])-?\d+(?:,\d{3})*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in a reply, without thousands separators, or None."""
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return Decimal(str(value).strip())
    except InvalidOperation:
        return None


def answer_reward(prompt_metadata: dict, reply: str) -> float:
    """1.0 when the reply's last number equals the prompt's known `answer` numerically, else 0.0."""
    answer = _decimal(prompt_metadata.get("answer"))
    final = final_number(reply)
    got = _decimal(final) if final is not None else None
    if answer is None or got is None or not answer.is_finite():
        return 0.0
    return 1.0 if got == answer else 0.0


def command_well_formed(commands: str, registry: ToolRegistry | None = None) -> float:
    """1.0 when the Commands segment is `None` or every line is `Name("arg")` of a registered command."""
    registry = registry or default_registry()
    text = commands.strip()
    if text == NONE_TEXT:
        return 1.0
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0
    for line in lines:
        parsed = parse_command(line)
        if parsed is None or registry.get(parsed[0]) is None:
            return 0.0
    return 1.0


# --- the built-in rules ------------------------------------------------------------------------------------------

def _answer(rollout: Rollout) -> Optional[float]:
    if rollout.prompt.metadata.get("answer") is None:
        return None
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


def load_rule(name: str, registry: ToolRegistry, key: str = "ppo.reward_rules") -> Rule:
    """A built-in rule by name, or `package.module:function` imported from the Python path."""
    where = f"{key}.{name}" if key == "ppo.reward_rules" else key
    if name == "answer":
        return _answer
    if name == "command":
        return _command(registry)
    if name == "grounded":
        return _grounded
    module_name, _, attr = ALIASES.get(name, name).partition(":")
    if not module_name or not attr:
        raise RuleError(f"{where}: {name!r} is not a built-in rule ({', '.join(BUILTIN_RULES)}) nor module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise RuleError(f"{where}: cannot import it ({' '.join(str(err).split())})") from None
    if not callable(fn):
        raise RuleError(f"{where}: {attr} is not a function of a Rollout")
    return fn


def load_rules(rules: dict[str, Any], registry: ToolRegistry, by_value: bool = False) -> dict[str, Rule]:
    """name -> rule, loaded before Ray starts so a typo fails in a second. `rules` maps rule names to weights
    (`ppo.reward_rules`: a zero weight loads nothing), or with `by_value` metric names to rule names
    (`ppo.eval_rules`)."""
    if by_value:
        return {metric: load_rule(name, registry, f"ppo.eval_rules.{metric}") for metric, name in rules.items()}
    return {name: load_rule(name, registry) for name, weight in rules.items() if weight}


def score_rules(rules: dict[str, Rule], rollouts: list[Rollout], strict: bool = True) -> dict[str, list]:
    """Each rule's score of each rollout. A rule that raises, returns a non-finite value or (when `strict`, as for
    rewards) None stops the run in one line naming it and the prompt: a silently wrong reward is worse than none."""
    out: dict[str, list] = {}
    for name, rule in rules.items():
        scores = []
        for rollout in rollouts:
            question = rollout.prompt.turns[-1].human[:60]
            try:
                value = rule(rollout)
            except Exception as err:  # a user rule's bug must name the rule, not surface as a trainer crash
                raise RuleError(f"ppo.reward_rules.{name}: raised {type(err).__name__} ({err}) on the prompt "
                                f"{question!r}") from None
            if value is None and not strict:
                scores.append(None)
                continue
            if value is None or not math.isfinite(float(value)):
                raise RuleError(f"ppo.reward_rules.{name}: returned {value} on the prompt {question!r}; a rule "
                                f"must return a finite number")
            scores.append(float(value))
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


class RewardRules:
    """A run's reward (the preference model's weighted score plus the weighted rules) and its measured-only rules."""

    def __init__(self, rules: dict[str, Rule], weights: dict[str, float], model_weight: float,
                 eval_rules: dict[str, Rule]):
        self.rules, self.weights, self.model_weight, self.eval_rules = rules, weights, model_weight, eval_rules

    def reward(self, model_scores: Optional[torch.Tensor], rollouts: list[Rollout]) -> tuple[torch.Tensor, dict]:
        """([B] reward, the parts that made it: `model` and each rule, per rollout)."""
        parts = score_rules(self.rules, rollouts)
        scores = model_scores.float().tolist() if model_scores is not None else None
        total = torch.tensor(combine(scores, parts, self.model_weight, self.weights))
        return total, ({"model": scores} if scores is not None else {}) | parts

    def evaluate(self, rollouts: list[Rollout]) -> dict[str, float]:
        """Each eval rule's mean over the rollouts, where it could judge every one of them."""
        out = {}
        for metric, scores in score_rules(self.eval_rules, rollouts, strict=False).items():
            if rollouts and None not in scores:
                out[metric] = sum(scores) / len(scores)
        return out
