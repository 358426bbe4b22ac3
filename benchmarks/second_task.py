"""A second small ranked task, nobody's tuning target: "What sound does a dog make?" for twelve animals.

A good reply earns 0.5 for the right sound from a fixed table (the prompt never names it, so the model must learn
the mapping by heart: the harder part for a tiny model) and 0.5 for being brief (1 to 8 words: the easier part).
SFT replies mix all four qualities on purpose, so an SFT policy is mediocre and PPO has room to learn; the ranked
lists follow the rule. `benchmarks/kl_hold.py` runs PPO on it beside the bundled sample (`rlhf.sample`), with this
module's `rule` as the held-out eval rule (`ppo.eval_rules: {rule_score: "second_task:rule"}`, with benchmarks/ on
the Python path). Everything is deterministic for a seed.

    python benchmarks/second_task.py --out DIR [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.data import write_jsonl  # noqa: E402
from rlhf.moss import Dialogue, Turn  # noqa: E402

META_INSTRUCTION = "You are an AI assistant whose name is MOSS.\n"

SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "pig": "oink",
          "lion": "roar", "owl": "hoot", "horse": "neigh", "snake": "hiss", "bee": "buzz", "frog": "croak"}
"""The facts a reply must get right: each animal's sound, one word, none of them in any other reply text."""

MAX_BRIEF_WORDS = 8
"""A reply of at most this many words (and at least one) is brief."""

_PREFIXES = ["", "Hi! ", "Hello MOSS. ", "Quick question: ", "My child wants to know: ", "Please tell me: "]
_QUESTIONS = ["What sound does {a} make?", "What does {a} say?", "What noise does {a} make?",
              "How does {a} sound?", "Which sound does {a} make?"]
_CUE = re.compile(r"\b(sound|say|noise)\b", re.IGNORECASE)  # a question about a sound, not just a mention

# A reply is an optional lead-in sentence (6 words, which makes it long) plus one short sentence that names a
# sound (the right one or another animal's) or none. The halves are exactly what the rule scores.
_FACT_SENTENCES = ["{A} says {s}.", "It goes {s}.", "{S}! That is what {a} says.", "{A} goes {s} {s}."]
_UNSURE_SENTENCES = ["I am not sure.", "I do not know that one.", "Sorry, I cannot tell you."]
_LEAD_INS = ["What a fun question about animals!", "Many children ask me this question.",
             "Animals make all kinds of noises.", "I like questions about farm animals."]

STYLES = {"best": (True, True), "fact": (True, False), "brief": (False, True), "bad": (False, False)}
"""style -> (the right sound, brief)."""
SFT_STYLE_WEIGHTS = {"best": 0.15, "fact": 0.30, "brief": 0.20, "bad": 0.35}
"""The SFT replies: the right sound 45% of the time, brief 35%: a data rule score of 0.40, room for PPO."""
UNSURE_FRACTION = 0.35
"""Of the replies without the right sound, those that name no sound (the rest name another animal's)."""
MULTI_TURN_FRACTION = 0.15
EVAL_FRACTION = 0.2


# --- the rule ----------------------------------------------------------------------------------------------


def _names(text: str, sound: str) -> bool:
    """Whole words only, with a verb ending: "moo", "Moo!", "moos"; not "mood"."""
    return re.search(rf"\b{re.escape(sound)}(?:s|es)?\b", text, re.IGNORECASE) is not None


def words(text: str) -> int:
    return len(re.findall(r"[A-Za-z0-9']+", text))


def prompt_key(prompt: Dialogue) -> str | None:
    """The animal the last human message asks the sound of, read from the text (so it works after metadata is
    stripped); None for a prompt that is not this task's."""
    human = prompt.turns[-1].human if prompt.turns else ""
    if not _CUE.search(human):
        return None
    found = [animal for animal in SOUNDS if re.search(rf"\b{animal}\b", human, re.IGNORECASE)]
    return found[0] if len(found) == 1 else None


def rule_parts(prompt: Dialogue, reply: str) -> dict[str, bool]:
    """The rule's two parts: the reply names the asked animal's sound and no other animal's (`fact`), and it is 1
    to MAX_BRIEF_WORDS words long (`brief`)."""
    animal = prompt_key(prompt)
    named = {sound for sound in SOUNDS.values() if _names(reply, sound)}
    return {"fact": animal is not None and named == {SOUNDS[animal]},
            "brief": 1 <= words(reply) <= MAX_BRIEF_WORDS}


def rule_score(prompt: Dialogue, reply: str) -> float:
    """0.5 for the right sound plus 0.5 for brevity; in [0, 1]."""
    parts = rule_parts(prompt, reply)
    return 0.5 * parts["fact"] + 0.5 * parts["brief"]


def rule(rollout) -> float | None:
    """The task's rule as a reward or eval rule of a `reward.rules.Rollout` (`ppo.eval_rules: {rule_score:
    second_task:rule}`): None for a prompt that is not one of the task's."""
    if prompt_key(rollout.prompt) is None:
        return None
    return rule_score(rollout.prompt, rollout.reply)


def fact_rule(rollout) -> float | None:
    """The rule's first part alone, 1.0 or 0.0 (`ppo.eval_rules: {fact: second_task:fact_rule}`), None as `rule`."""
    if prompt_key(rollout.prompt) is None:
        return None
    return float(rule_parts(rollout.prompt, rollout.reply)["fact"])


def brief_rule(rollout) -> float | None:
    """The rule's second part alone, 1.0 or 0.0, None as `rule`."""
    if prompt_key(rollout.prompt) is None:
        return None
    return float(rule_parts(rollout.prompt, rollout.reply)["brief"])


def score_of(prompts: list[Dialogue], replies: list[str]) -> float | None:
    """The mean rule score of replies, or None when some prompt is not the task's."""
    if not prompts or any(prompt_key(p) is None for p in prompts):
        return None
    return sum(rule_score(p, r) for p, r in zip(prompts, replies, strict=True)) / len(prompts)


def parts_of(prompts: list[Dialogue], replies: list[str]) -> dict[str, float] | None:
    """The share of replies with the right sound and of brief ones, or None as `score_of`."""
    if not prompts or any(prompt_key(p) is None for p in prompts):
        return None
    parts = [rule_parts(p, r) for p, r in zip(prompts, replies, strict=True)]
    return {name: sum(p[name] for p in parts) / len(parts) for name in ("fact", "brief")}


# --- building blocks -----------------------------------------------------------------------------------------


def _article(animal: str) -> str:
    return f"an {animal}" if animal[0] in "aeiou" else f"a {animal}"


def _reply(rng: random.Random, animal: str, style: str) -> str:
    right, brief = STYLES[style]
    if right:
        sound = SOUNDS[animal]
    elif rng.random() < UNSURE_FRACTION:
        sound = None
    else:
        sound = SOUNDS[rng.choice([a for a in SOUNDS if a != animal])]
    if sound is None:
        core = rng.choice(_UNSURE_SENTENCES)
    else:
        a = _article(animal)
        core = rng.choice(_FACT_SENTENCES).format(a=a, A=a.capitalize(), s=sound, S=sound.capitalize())
    return core if brief else f"{rng.choice(_LEAD_INS)} {core}"


def _split_pools(rng: random.Random) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Every (question, animal), split into train and held-out texts; every animal is asked in both."""
    texts = [(p + q.format(a=_article(animal)), animal) for animal in SOUNDS for q in _QUESTIONS for p in _PREFIXES]
    rng.shuffle(texts)
    n_eval = int(len(texts) * EVAL_FRACTION)
    return texts[n_eval:], texts[:n_eval]


def _prompt(rng: random.Random, pool: list[tuple[str, str]]) -> Dialogue:
    """A single- or multi-turn prompt; an earlier turn asks about another animal and is answered well."""
    text, animal = rng.choice(pool)
    turns = []
    if rng.random() < MULTI_TURN_FRACTION:
        first, other = rng.choice(pool)
        while other == animal:
            first, other = rng.choice(pool)
        turns.append(Turn(human=first, moss=_reply(rng, other, "best")))
    turns.append(Turn(human=text))
    return Dialogue(turns, META_INSTRUCTION, {"task": "animal_sound", "animal": animal, "sound": SOUNDS[animal]})


def _sft_dialogue(rng: random.Random, pool: list[tuple[str, str]]) -> Dialogue:
    prompt = _prompt(rng, pool)
    style = rng.choices(list(SFT_STYLE_WEIGHTS), weights=list(SFT_STYLE_WEIGHTS.values()))[0]
    dialogue = prompt.with_reply(_reply(rng, prompt.metadata["animal"], style))
    dialogue.metadata["style"] = style
    return dialogue


def _preference(rng: random.Random, pool: list[tuple[str, str]]) -> dict:
    """A ranked list, K = 2..4, best first by the rule; equal scores share a rank (a tie makes no pair)."""
    prompt = _prompt(rng, pool)
    k = rng.choice([2, 3, 3, 4, 4])
    while True:
        responses: list[str] = []
        while len(responses) < k:
            reply = _reply(rng, prompt.metadata["animal"], rng.choice(list(STYLES)))
            if reply not in responses:
                responses.append(reply)
        scores = [rule_score(prompt, r) for r in responses]
        distinct = sorted(set(scores), reverse=True)
        if len(distinct) >= 2:  # every record gives at least one pair
            break
    order = sorted(range(k), key=lambda i: -scores[i])
    record = prompt.to_json()
    record.update(responses=[responses[i] for i in order], ranks=[distinct.index(scores[i]) for i in order],
                  rule_scores=[scores[i] for i in order])
    return record


# --- files -------------------------------------------------------------------------------------------------


def write_task(out_dir: str, seed: int = 0, n_sft: int = 600, n_prompts: int = 200,
               n_prefs: int = 400) -> dict[str, str]:
    """Write the six files the pipeline reads (sft/prefs/prompts, train and eval) into out_dir; their paths by name."""
    rng = random.Random(seed)
    train, held_out = _split_pools(rng)
    files = {
        "sft_train": [_sft_dialogue(rng, train) for _ in range(n_sft)],
        "sft_eval": [_sft_dialogue(rng, held_out) for _ in range(max(n_sft // 5, 1))],
        "prefs_train": [_preference(rng, train) for _ in range(n_prefs)],
        "prefs_eval": [_preference(rng, held_out) for _ in range(max(n_prefs // 4, 1))],
        "prompts_train": [_prompt(rng, train) for _ in range(n_prompts)],
        "prompts_eval": [_prompt(rng, held_out) for _ in range(max(n_prompts // 4, 1))],
    }
    paths = {}
    for name, records in files.items():
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        write_jsonl(paths[name], records)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the six JSONL files")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = write_task(args.out, args.seed)
    total = sum(os.path.getsize(path) for path in paths.values())
    print(f"second task: {len(paths)} files ({total / 1024:.0f} KiB, seed {args.seed}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
