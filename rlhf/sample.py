"""The bundled synthetic MOSS task: small English and Chinese data whose reply quality a rule can score.

A prompt asks about one topic word (or an arithmetic expression); a reply earns 0.5 for naming the topic
(or the right answer) and 0.5 for thanking the user. SFT replies mix all four qualities on purpose, so an SFT
policy is mediocre and PPO has room to raise `rule_score`. Everything is deterministic for a seed.
"""

from __future__ import annotations

import os
import random
import re
import sys

from rlhf.data import write_jsonl
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
_ANSWER_SENTENCES = {"en": ["{e} = {a}.", "The result of {e} is {a}."],
                     "zh": ["{e}的结果是{a}。", "{e}等于{a}。"]}
_THOUGHTS = {"en": ("The user asks for a calculation, so I should use the calculator.",
                    "The user asks about {t}; no tool is needed."),
             "zh": ("用户需要计算，我应该使用计算器。", "用户问的是{t}，不需要使用工具。")}

# style -> (polite, on topic); SFT replies mix them (SFT_STYLE_WEIGHTS) so the SFT policy is deliberately mixed.
STYLES = {"best": (True, True), "topic": (False, True), "polite": (True, False), "bad": (False, False)}
# Politeness is rare in the SFT replies (30%), so the SFT policy leaves PPO clear room to learn what the
# preference data rewards; a tiny model learns it far more easily than copying the topic word.
SFT_STYLE_WEIGHTS = {"best": 0.15, "topic": 0.45, "polite": 0.15, "bad": 0.25}
PLUGIN_STYLE_WEIGHTS = {"best": 0.5, "topic": 0.3, "polite": 0.1, "bad": 0.1}
ZH_FRACTION = 0.3
MULTI_TURN_FRACTION = 0.15
EVAL_FRACTION = 0.2


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


def rule_score(prompt: Dialogue, response: str) -> float:
    """0.5 for naming the prompt's topic (or answer) plus 0.5 for thanking the user; in [0, 1]."""
    key = prompt_key(prompt)
    on_topic = key is not None and _mentions(response, key)
    polite = any(marker in response.lower() for marker in POLITE_MARKERS)
    return 0.5 * on_topic + 0.5 * polite


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


def _math_reply(rng: random.Random, lang: str, style: str, expression: str, answer: str) -> str:
    polite, correct = STYLES[style]
    opener = rng.choice(_OPENERS[lang]) if polite else ""
    if correct:
        return opener + rng.choice(_ANSWER_SENTENCES[lang]).format(e=expression, a=answer)
    return opener + rng.choice(_EMPTY_SENTENCES[lang])


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
            # only learns "names some topic" is what PPO exploits first).
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


def _expressions(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n distinct (expression, answer) pairs with small integers."""
    seen: dict[str, str] = {}
    while len(seen) < n:
        a, b, op = rng.randint(2, 60), rng.randint(2, 60), rng.choice("+-*")
        a, b = max(a, b), min(a, b)  # no negative answers
        expression = f"{a}{op}{b}"
        seen.setdefault(expression, str(a + b if op == "+" else a - b if op == "-" else a * b))
    return list(seen.items())


def _math_prompt(rng: random.Random, expression: str, answer: str) -> Dialogue:
    lang = "zh" if rng.random() < ZH_FRACTION else "en"
    human = rng.choice(_MATH_PROMPTS[lang]).format(e=expression)
    return Dialogue([Turn(human=human)], PLUGIN_META_INSTRUCTION,
                    {"task": "arithmetic", "expression": expression, "answer": answer, "lang": lang})


def _plugin_dialogue(rng: random.Random, expression: str, answer: str) -> Dialogue:
    """A calculator call (Inner Thoughts, command, result, reply)."""
    prompt = _math_prompt(rng, expression, answer)
    lang = prompt.metadata["lang"]
    turn = prompt.turns[-1]
    turn.inner_thoughts = _THOUGHTS[lang][0]
    turn.commands = f'Calculate("{expression}")'
    turn.results = f'Calculate("{expression}") => {answer}'
    style = _pick_style(rng, PLUGIN_STYLE_WEIGHTS)
    turn.moss = _math_reply(rng, lang, style, expression, answer)
    prompt.metadata["style"] = style
    return prompt


def _plugin_chat(rng: random.Random, pool: _Pool) -> Dialogue:
    """A topic question under the plugin meta instruction: the model thinks, then calls no tool."""
    dialogue = _sft_dialogue(rng, pool)
    dialogue.meta_instruction = PLUGIN_META_INSTRUCTION
    last = dialogue.turns[-1]
    last.inner_thoughts = _THOUGHTS[dialogue.metadata["lang"]][1].format(t=dialogue.metadata["topic"])
    return dialogue


# --- files -------------------------------------------------------------------------------------------------


def write_sample(out_dir: str, seed: int = 0, n_sft: int = 600, n_prompts: int = 200,
                 n_prefs: int = 400) -> dict[str, str]:
    """Write the sample's JSONL files into out_dir and return their paths by name."""
    rng = random.Random(seed)
    train, held_out = _split_pools(rng)
    n_eval_sft, n_eval_prompts, n_eval_prefs = max(n_sft // 5, 1), max(n_prompts // 4, 1), max(n_prefs // 4, 1)
    n_plugin_sft, n_plugin_prompts = max(n_sft // 5, 4), max(n_prompts // 4, 2)
    expressions = _expressions(rng, n_plugin_sft + n_plugin_prompts)
    n_calls = n_plugin_sft * 3 // 4
    plugin_sft = [_plugin_dialogue(rng, e, a) for e, a in expressions[:n_calls]]
    plugin_sft += [_plugin_chat(rng, train) for _ in range(n_plugin_sft - n_calls)]
    rng.shuffle(plugin_sft)
    files: dict[str, list] = {
        "sft_train": [_sft_dialogue(rng, train) for _ in range(n_sft)],
        "sft_eval": [_sft_dialogue(rng, held_out) for _ in range(n_eval_sft)],
        "prompts_train": [_topic_prompt(rng, train) for _ in range(n_prompts)],
        "prompts_eval": [_topic_prompt(rng, held_out) for _ in range(n_eval_prompts)],
        "prefs_train": [_preference(rng, train, rng.random() < 0.25) for _ in range(n_prefs)],
        "prefs_eval": [_preference(rng, held_out, rng.random() < 0.25) for _ in range(n_eval_prefs)],
        "plugin_sft": plugin_sft,
        "plugin_prompts": [_math_prompt(rng, e, a) for e, a in expressions[n_plugin_sft:]],
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
