"""The bundled synthetic MOSS task: small English and Chinese data whose reply quality a rule can score.

A prompt asks about one topic word (or an arithmetic expression); a reply earns 0.5 for naming the topic
(or the right answer) and 0.5 for thanking the user. SFT replies mix all four qualities on purpose, so an SFT
policy is mediocre and PPO has room to raise `rule_score`. Arithmetic questions under the plugin meta
instruction carry their `answer`: the plugin SFT dialogues always call the calculator but more often guess than
use its result, which gives PPO with the verifiable answer reward room too. A step-by-step arithmetic task gives
process reward models their data: solutions in labelled steps, some with one slipped step, SFT dialogues whose replies
are such solutions, and prompts with their `answer`. Everything is deterministic for a seed.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import sys

from rlhf.data import STEP_SEPARATOR, StepSolution, write_jsonl
from rlhf.moss import Dialogue, Turn, build_meta_instruction

EN_TOPICS = ["apples", "rivers", "music", "chess", "coffee", "tigers", "snow", "stars",
             "bread", "trains", "gardens", "oceans", "books", "winter", "bicycles", "mountains"]
ZH_TOPICS = ["苹果", "音乐", "大海", "熊猫", "茶", "月亮", "书", "雨"]

POLITE_MARKERS = ("thank you", "thanks", "谢谢")

SAMPLE_META_INSTRUCTION = "You are an AI assistant whose name is MOSS.\n"
PLUGIN_META_INSTRUCTION = build_meta_instruction(
    {"Web Search": None, "Calculator": "Calculate(expression)", "Equation Solver": None, "Text-to-Image": None},
    base=SAMPLE_META_INSTRUCTION + "Capabilities and tools that MOSS can possess.\n")

_PROMPTS = {
    "en": (["", "Hi! ", "Hello MOSS. ", "Quick question: ", "Please help me. ", "Good morning! "],
           ["Tell me something about {t}.", "What do you think about {t}?",
            "Can you say a few words about {t}?", "I want to learn about {t}.",
            "Write one sentence about {t}.", "Do you like {t}?"]),
    "zh": (["", "你好！", "请问，", "MOSS，"],
           ["请介绍一下{t}。", "你觉得{t}怎么样？", "能说说{t}吗？", "我想了解{t}。", "用一句话讲讲{t}。"]),
}
_MATH_PROMPTS = {"en": ["What is {e}?", "Please calculate {e}.", "Can you compute {e}?"],
                 "zh": ["{e}等于多少？", "请帮我算一下{e}。", "计算{e}的结果。"]}

# A reply is an optional thank-you opener plus a sentence that names the topic or says nothing; the two
# halves are exactly what the rule scores, which keeps the task learnable by a two-layer model.
_OPENERS = {"en": ["Thank you for asking! ", "Thank you for the question. ", "Thanks for asking! "],
            "zh": ["谢谢你的提问！", "谢谢！"]}
_TOPIC_SENTENCES = {"en": ["Many people enjoy {t}, and so do I.", "There is a lot to say about {t}.",
                           "I like talking about {t} very much."],
                    "zh": ["很多人喜欢{t}，我也是。", "关于{t}有很多可以说的。", "我很喜欢聊{t}。"]}
_EMPTY_SENTENCES = {"en": ["I am not sure what to say.", "I have nothing to add.",
                           "That is hard for me to answer."],
                    "zh": ["这个问题我不太清楚。", "我没有什么可以补充的。", "这个很难回答。"]}
_ANSWER_SENTENCES = {"en": ["The answer is {a}.", "It is {a}."], "zh": ["答案是{a}。", "结果是{a}。"]}
_GUESS_SENTENCES = {"en": ["I think it is {a}.", "Maybe {a}."], "zh": ["我猜是{a}。", "大概是{a}。"]}
# Inner Thoughts: (use the calculator, a topic question). Short, so a plugin turn fits the tiny models'
# generation budget in Chinese too.
_THOUGHTS = {"en": ("I should use the calculator.", "No tool is needed for {t}."),
             "zh": ("需要计算器。", "{t}不需要工具。")}

# style -> (polite, on topic); SFT replies mix them (SFT_STYLE_WEIGHTS) so the SFT policy is deliberately mixed.
STYLES = {"best": (True, True), "topic": (False, True), "polite": (True, False), "bad": (False, False)}
# Politeness is rare in the SFT replies (30%), so the SFT policy leaves PPO clear room to learn what the
# preference data rewards. Copying the topic word is the harder half for a tiny model: it needs the steps and
# learning rate of configs/tiny/sft.yaml, and then names the asked topic in most replies that name one.
SFT_STYLE_WEIGHTS = {"best": 0.15, "topic": 0.45, "polite": 0.15, "bad": 0.25}
# Arithmetic: operands small enough for a two-layer model to copy into a command and back out of its result;
# enough of them that it must copy rather than memorise.
OPERANDS = range(2, 21)
# In the plugin SFT data the model always calls the calculator, but answers with its result only 40% of the
# time and otherwise guesses, off by a little (a tool user that ignores its tool: a known failure of tool-using
# chat models). PPO with the verifiable answer reward has clear room to learn to trust the Results
# (see tests/test_plugin_ppo.py).
TRUST_FRACTION = 0.4
ZH_FRACTION = 0.3
MULTI_TURN_FRACTION = 0.15
EVAL_FRACTION = 0.2
# The step-by-step task: `a + b - c` over one-digit operands (every such expression, and 600 of four operands), every
# running total a digit (0 to 9); one step a line, "3 + 4 = 7", then "The answer is 7.". A slipped solution gets one
# sum wrong, off by 1 to 3 (the answer itself, where no sum can slip and keep every total a digit), and carries on
# consistently from it, so its labels are True up to the slip and False from it on (the right answer is out of
# reach). The PRM's data slips often enough for both labels to be common; the SFT
# data mostly does not, so an SFT policy writes mostly right solutions and PPO with process rewards has room.
STEP_OPERANDS = range(1, 10)
FOUR_OPERAND_EXPRESSIONS = 600
STEP_EVAL_EXPRESSIONS = 200
STEP_SLIP_FRACTION = 0.35
STEP_SFT_SLIP_FRACTION = 0.25
STEP_PROMPTS = 1000
"""PPO's training prompts of the step task: as many distinct training sums (of 1,129), so that RL generalises to
held-out sums instead of memorising a few (with 180 distinct prompts, PPO's training accuracy rose 0.2 above its
held-out accuracy)."""
STEP_MAX_TOTAL = 9
"""Every running total, slipped or not, is one digit: 90 sums (a + b and a - b within 0..9) that a tiny model learns
to check, and no two-digit number that would give a slip away."""
_SLIPS = (-3, -2, -1, 1, 2, 3)


# --- the rule ----------------------------------------------------------------------------------------------


def _mentions(text: str, word: str) -> bool:
    if word.isascii():
        # Whole words or numbers only: "12" must not count inside "120", nor "snow" inside "snowy". ASCII
        # boundaries, since Chinese characters count as \w and "是52" must still name 52.
        return re.search(rf"(?<![A-Za-z0-9_.]){re.escape(word)}(?![A-Za-z0-9_])", text, re.IGNORECASE) is not None
    return word in text


def prompt_key(prompt: Dialogue) -> str | None:
    """What a good reply must name: the known answer of an arithmetic prompt, else the topic word the last
    human message asks about (read from the text, so it works after metadata is stripped)."""
    if prompt.metadata.get("answer") is not None:
        return str(prompt.metadata["answer"])
    human = prompt.turns[-1].human
    for topic in EN_TOPICS + ZH_TOPICS:
        if _mentions(human, topic):
            return topic
    topic = prompt.metadata.get("topic")
    return str(topic) if topic is not None else None


def rule_parts(prompt: Dialogue, response: str) -> dict[str, bool]:
    """The rule's two parts: whether the reply names the prompt's topic (or answer), and whether it thanks the user."""
    key = prompt_key(prompt)
    return {"on_topic": key is not None and _mentions(response, key),
            "thanks": any(marker in response.lower() for marker in POLITE_MARKERS)}


def rule_score(prompt: Dialogue, response: str) -> float:
    """0.5 for naming the prompt's topic (or answer) plus 0.5 for thanking the user; in [0, 1]."""
    parts = rule_parts(prompt, response)
    return 0.5 * parts["on_topic"] + 0.5 * parts["thanks"]


def rule(rollout) -> float | None:
    """The task's rule as a reward rule (`ppo.reward_rules: {sample: W}`) or an eval rule (`ppo.eval_rules:
    {rule_score: sample}`) of a `reward.rules.Rollout`: None for a prompt that is not one of the task's."""
    if prompt_key(rollout.prompt) is None:
        return None
    return rule_score(rollout.prompt, rollout.reply)


def score_of(prompts: list[Dialogue], replies: list[str]) -> float | None:
    """The rule over reply texts, or None when some prompt has nothing the rule can check (the report's score)."""
    if not prompts or any(prompt_key(d) is None for d in prompts):
        return None
    return score_responses(prompts, replies)


def parts_of(prompts: list[Dialogue], replies: list[str]) -> dict[str, float] | None:
    """The share of replies that name the topic and that thank the user (the report shows each part), or None as
    `score_of`."""
    if not prompts or any(prompt_key(d) is None for d in prompts):
        return None
    parts = [rule_parts(p, r) for p, r in zip(prompts, replies)]
    return {name: sum(p[name] for p in parts) / len(parts) for name in ("on_topic", "thanks")}


def score_responses(prompts: list[Dialogue], responses: list[str]) -> float:
    """Mean rule score of responses to prompts (0.0 for none)."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one response a prompt")
    if not prompts:
        return 0.0
    return sum(rule_score(p, r) for p, r in zip(prompts, responses)) / len(prompts)


# --- building blocks -----------------------------------------------------------------------------------------


def _prompt_texts(lang: str) -> list[tuple[str, str]]:
    """Every (question, topic) of a language."""
    prefixes, templates = _PROMPTS[lang]
    topics = EN_TOPICS if lang == "en" else ZH_TOPICS
    return [(p + t.format(t=topic), topic) for topic in topics for t in templates for p in prefixes]


def _reply(rng: random.Random, lang: str, style: str, topic: str) -> str:
    polite, on_topic = STYLES[style]
    opener = rng.choice(_OPENERS[lang]) if polite else ""
    sentence = rng.choice(_TOPIC_SENTENCES[lang]).format(t=topic) if on_topic else rng.choice(_EMPTY_SENTENCES[lang])
    return opener + sentence


def _math_reply(rng: random.Random, lang: str, answer: str, guess: bool) -> str:
    """A sentence naming `answer` (or a guess), thanking the user as often as the SFT topic replies do."""
    polite = rng.random() < SFT_STYLE_WEIGHTS["best"] + SFT_STYLE_WEIGHTS["polite"]
    opener = rng.choice(_OPENERS[lang]) if polite else ""
    return opener + rng.choice((_GUESS_SENTENCES if guess else _ANSWER_SENTENCES)[lang]).format(a=answer)


def _pick_style(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


class _Pool:
    """Prompt texts of one split; eval and train pools never share a human message."""

    def __init__(self, en: list[tuple[str, str]], zh: list[tuple[str, str]]) -> None:
        self.by_lang = {"en": en, "zh": zh}

    def draw(self, rng: random.Random, lang: str | None = None) -> tuple[str, str, str]:
        if lang is None:
            lang = "zh" if rng.random() < ZH_FRACTION else "en"
        text, topic = rng.choice(self.by_lang[lang])
        return lang, text, topic


def _split_pools(rng: random.Random) -> tuple[_Pool, _Pool]:
    train, held_out = {}, {}
    for lang in ("en", "zh"):
        texts = _prompt_texts(lang)
        rng.shuffle(texts)
        n_eval = int(len(texts) * EVAL_FRACTION)
        held_out[lang], train[lang] = texts[:n_eval], texts[n_eval:]
    return _Pool(train["en"], train["zh"]), _Pool(held_out["en"], held_out["zh"])


def _topic_prompt(rng: random.Random, pool: _Pool) -> Dialogue:
    """A single- or multi-turn prompt; earlier turns are about another topic and answered well."""
    lang, text, topic = pool.draw(rng)
    turns = []
    if rng.random() < MULTI_TURN_FRACTION:
        _, first, first_topic = pool.draw(rng, lang)
        while first_topic == topic:
            _, first, first_topic = pool.draw(rng, lang)
        turns.append(Turn(human=first, moss=_reply(rng, lang, "best", first_topic)))
    turns.append(Turn(human=text))
    return Dialogue(turns, SAMPLE_META_INSTRUCTION, {"task": "topic", "topic": topic, "lang": lang})


def _sft_dialogue(rng: random.Random, pool: _Pool) -> Dialogue:
    prompt = _topic_prompt(rng, pool)
    style = _pick_style(rng, SFT_STYLE_WEIGHTS)
    dialogue = prompt.with_reply(_reply(rng, prompt.metadata["lang"], style, prompt.metadata["topic"]))
    dialogue.metadata["style"] = style
    return dialogue


def _preference(rng: random.Random, pool: _Pool, shorthand: bool) -> dict:
    """A ranked list (K = 2..4, best first, ties share a rank) or a chosen/rejected pair."""
    prompt = _topic_prompt(rng, pool)
    lang, topic = prompt.metadata["lang"], prompt.metadata["topic"]
    k = 2 if shorthand else rng.choice([2, 3, 3, 4, 4])
    while True:
        responses: list[str] = []
        while len(responses) < k:
            style = rng.choice(list(STYLES))
            # Often a reply about the wrong topic, so the reward must compare it with the prompt (a reward model that
            # only learns "names some topic" is what PPO exploits first). The tiny reward model of configs/tiny/rm.yaml
            # does not learn that comparison from these lists: on held-out prompts it scores another topic as high as
            # the asked one (1600 lists, half of whose topic contrasts are with another topic, teach it in most runs,
            # at 4x the training). PPO's replies stay on the asked topic because the SFT policy copies it.
            other = rng.choice(EN_TOPICS if lang == "en" else ZH_TOPICS)
            reply = _reply(rng, lang, style, other if rng.random() < 0.4 else topic)
            if reply not in responses:
                responses.append(reply)
        scores = [rule_score(prompt, r) for r in responses]
        distinct = sorted(set(scores), reverse=True)
        # Every record must give at least one pair (so a K = 2 record is never a tie).
        if len(distinct) >= 2:
            break
    order = sorted(range(k), key=lambda i: -scores[i])
    responses = [responses[i] for i in order]
    scores = [scores[i] for i in order]
    record = prompt.to_json()
    if shorthand:
        record.update(chosen=responses[0], rejected=responses[1])
    else:
        record.update(responses=responses, ranks=[distinct.index(s) for s in scores], rule_scores=scores)
    return record


def _answer(expression: str) -> str:
    a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", expression).groups()
    x, y = int(a), int(b)
    return str(x + y if op == "+" else x - y if op == "-" else x * y)


def _split_expressions(rng: random.Random) -> tuple[list[str], list[str]]:
    """Every `a op b` over OPERANDS (a >= b, so no negative answers), split 3:1 into train and held-out."""
    every = sorted({f"{max(a, b)}{op}{min(a, b)}" for a in OPERANDS for b in OPERANDS for op in "+-*"})
    rng.shuffle(every)
    n_eval = len(every) // 4
    return every[n_eval:], every[:n_eval]


def _math_prompt(rng: random.Random, expression: str) -> Dialogue:
    lang = "zh" if rng.random() < ZH_FRACTION else "en"
    human = rng.choice(_MATH_PROMPTS[lang]).format(e=expression)
    return Dialogue([Turn(human=human)], PLUGIN_META_INSTRUCTION,
                    {"task": "arithmetic", "expression": expression, "answer": _answer(expression), "lang": lang})


def _plugin_dialogue(rng: random.Random, expression: str) -> Dialogue:
    """An arithmetic turn: a calculator call, its result, then the answer from the result or a guess that
    ignores it and is off by 1 to 3."""
    prompt = _math_prompt(rng, expression)
    lang, answer = prompt.metadata["lang"], prompt.metadata["answer"]
    turn = prompt.turns[-1]
    turn.inner_thoughts = _THOUGHTS[lang][0]
    turn.commands = f'Calculate("{expression}")'
    turn.results = f'Calculate("{expression}") => {answer}'
    trusted = rng.random() < TRUST_FRACTION
    prompt.metadata["trusted"] = trusted
    if not trusted:
        value = int(answer)
        answer = str(value + rng.choice([1, 2, 3] if value < 3 else [-3, -2, -1, 1, 2, 3]))
    turn.moss = _math_reply(rng, lang, answer, guess=not trusted)
    return prompt


def _plugin_chat(rng: random.Random, pool: _Pool) -> Dialogue:
    """A topic question under the plugin meta instruction: the model thinks, then calls no tool."""
    dialogue = _sft_dialogue(rng, pool)
    dialogue.meta_instruction = PLUGIN_META_INSTRUCTION
    last = dialogue.turns[-1]
    last.inner_thoughts = _THOUGHTS[dialogue.metadata["lang"]][1].format(t=dialogue.metadata["topic"])
    return dialogue


# --- the step-by-step task ----------------------------------------------------------------------------------

Expression = tuple[int, tuple[tuple[str, int], ...]]  # the first operand, then (operator, operand) pairs


def _running_totals(expression: Expression) -> list[int]:
    first, rest = expression
    totals = [first]
    for op, x in rest:
        totals.append(totals[-1] + x if op == "+" else totals[-1] - x)
    return totals


def _expression_text(expression: Expression) -> str:
    first, rest = expression
    return " ".join([str(first), *(f"{op} {x}" for op, x in rest)])


def _step_expressions(rng: random.Random) -> tuple[list[Expression], list[Expression]]:
    """Every three-operand expression and FOUR_OPERAND_EXPRESSIONS four-operand ones, no running total negative,
    split into train and STEP_EVAL_EXPRESSIONS held out."""
    def every(n: int) -> list[Expression]:
        found = []
        for operands in itertools.product(STEP_OPERANDS, repeat=n):
            for ops in itertools.product("+-", repeat=n - 1):
                expression = (operands[0], tuple(zip(ops, operands[1:])))
                if 0 <= min(_running_totals(expression)) and max(_running_totals(expression)) <= STEP_MAX_TOTAL:
                    found.append(expression)
        return found

    expressions = every(3) + rng.sample(every(4), FOUR_OPERAND_EXPRESSIONS)
    rng.shuffle(expressions)
    return expressions[STEP_EVAL_EXPRESSIONS:], expressions[:STEP_EVAL_EXPRESSIONS]


def _step_prompt(rng: random.Random, expression: Expression) -> Dialogue:
    text = _expression_text(expression)
    human = rng.choice(_MATH_PROMPTS["en"]).format(e=text)
    return Dialogue([Turn(human=human)], SAMPLE_META_INSTRUCTION,
                    {"task": "steps", "expression": text, "answer": str(_running_totals(expression)[-1])})


def _step_solution(rng: random.Random, expression: Expression, slip: bool) -> StepSolution:
    """A solution, one arithmetic step a line and the answer last; with `slip`, one arithmetic step is off by 1 to 3
    and the later steps compute on from it, so their labels are False from the slip on."""
    totals = _running_totals(expression)
    _, rest = expression
    slip_at, delta = len(rest) + 1, 0  # the first bad step (past the end: none) and how far off it is
    if slip:  # off by 1 to 3, every running total from the slip on still a digit; else the answer misreported
        fits = [(k, d) for k in range(len(rest)) for d in _SLIPS
                if all(0 <= t + d <= STEP_MAX_TOTAL for t in totals[k + 1:])]
        slip_at, delta = rng.choice(fits) if fits else \
            (len(rest), rng.choice([d for d in _SLIPS if 0 <= totals[-1] + d <= STEP_MAX_TOTAL]))
    written = [total + (delta if i > slip_at else 0) for i, total in enumerate(totals)]
    steps = [f"{written[k]} {op} {x} = {written[k + 1]}" for k, (op, x) in enumerate(rest)]
    steps.append(f"The answer is {written[-1] + (delta if slip_at == len(rest) else 0)}.")
    prompt = _step_prompt(rng, expression)
    metadata, prompt.metadata = prompt.metadata, {}
    return StepSolution(prompt, steps, [k < slip_at for k in range(len(steps))], metadata)


def _step_solutions(rng: random.Random, expressions: list[Expression], slip_fraction: float) -> list[StepSolution]:
    """One solution per expression, exactly round(slip_fraction * n) of them slipped."""
    slipped = set(rng.sample(range(len(expressions)), round(slip_fraction * len(expressions))))
    return [_step_solution(rng, e, i in slipped) for i, e in enumerate(expressions)]


def _step_sft_dialogue(solution: StepSolution) -> Dialogue:
    """What an SFT policy learns to write: the solution's steps joined, one a line, as the reply."""
    dialogue = solution.dialogue(STEP_SEPARATOR)
    dialogue.metadata["slipped"] = solution.first_error is not None
    return dialogue


def _step_files(rng: random.Random, n_steps: int) -> dict[str, list]:
    train, held_out = _step_expressions(rng)
    sft = _step_solutions(rng, [rng.choice(train) for _ in range(n_steps * 2 // 3)], STEP_SFT_SLIP_FRACTION)
    return {
        "steps_train": _step_solutions(rng, [rng.choice(train) for _ in range(n_steps)], STEP_SLIP_FRACTION),
        "steps_eval": _step_solutions(rng, held_out, STEP_SLIP_FRACTION),
        "steps_sft": [_step_sft_dialogue(s) for s in sft],
        "steps_prompts": [_step_prompt(rng, e) for e in rng.sample(train, min(STEP_PROMPTS, len(train)))],
        "steps_prompts_eval": [_step_prompt(rng, e) for e in held_out],
    }


# --- files -------------------------------------------------------------------------------------------------


def write_sample(out_dir: str, seed: int = 0, n_sft: int = 600, n_prompts: int = 200,
                 n_prefs: int = 400, n_steps: int = 1500) -> dict[str, str]:
    """Write the sample's JSONL files into out_dir and return their paths by name."""
    rng = random.Random(seed)
    train, held_out = _split_pools(rng)
    n_eval_sft, n_eval_prompts, n_eval_prefs = max(n_sft // 5, 1), max(n_prompts // 4, 1), max(n_prefs // 4, 1)
    math_train, math_eval = _split_expressions(rng)
    plugin_sft = [_plugin_dialogue(rng, rng.choice(math_train)) for _ in range(n_sft)]
    plugin_sft += [_plugin_chat(rng, train) for _ in range(max(n_sft // 10, 2))]
    rng.shuffle(plugin_sft)
    files: dict[str, list] = {
        "sft_train": [_sft_dialogue(rng, train) for _ in range(n_sft)],
        "sft_eval": [_sft_dialogue(rng, held_out) for _ in range(n_eval_sft)],
        "prompts_train": [_topic_prompt(rng, train) for _ in range(n_prompts)],
        "prompts_eval": [_topic_prompt(rng, held_out) for _ in range(n_eval_prompts)],
        "prefs_train": [_preference(rng, train, rng.random() < 0.25) for _ in range(n_prefs)],
        "prefs_eval": [_preference(rng, held_out, rng.random() < 0.25) for _ in range(n_eval_prefs)],
        "plugin_sft": plugin_sft,
        "plugin_prompts": [_math_prompt(rng, rng.choice(math_train)) for _ in range(n_prompts)],
        "plugin_prompts_eval": [_math_prompt(rng, e) for e in math_eval],
        # A generator of its own, so the step task leaves every file above as it was before the task was added.
        **_step_files(random.Random(f"{seed}:steps"), n_steps),
    }
    paths = {}
    for name, records in files.items():
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        write_jsonl(paths[name], records)
    return paths


def run_sample(out: str, seed: int = 0) -> int:
    """`rlhf sample`: write the bundled task and print a one-line summary."""
    try:
        paths = write_sample(out, seed)
    except OSError as error:
        print(f"error: cannot write the sample to {out!r} ({error.strerror or error}); pick a writable --out",
              file=sys.stderr)
        return 2
    total = sum(os.path.getsize(p) for p in paths.values())
    print(f"sample: {len(paths)} files ({total / 1024:.0f} KiB, seed {seed}) -> {out}")
    return 0
