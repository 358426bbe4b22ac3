"""Solutions in labelled steps as tensors, for the process reward model (PRM).

A solution is encoded once, as the MOSS dialogue whose reply is its steps joined by `prm.step_separator`; the PRM's
score of a step is its value at the step's last token. Where a step ends is found in the reply's tokens themselves
(`step_ends`), so a reply the policy wrote in PPO is split exactly as a training solution is.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from rlhf.batching import Batch, pad
from rlhf.data import load_steps
from rlhf.moss import EOM, Dialogue, tokenize_dialogue
from rlhf.records import StepSolution


@dataclass
class EncodedSteps:
    ids: list[int]
    """The whole dialogue's tokens, ending at the reply's `<eom>`."""
    ends: list[int]
    """Where each step's last token is in `ids`."""
    labels: list[bool]
    """One a step: True while the solution can still reach the right answer."""
    reply_start: int = 0
    """Where the reply's tokens begin in `ids` (the reply runs to the end, its `<eom>` last)."""


class Pieces:
    """Each token's text, decoded once: what `step_ends` reads a reply's characters from."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.known: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.known:
            self.known[token] = self.tokenizer.decode([token])
        return self.known[token]


def step_ends(reply: Sequence[int], pieces: Callable[[int], str], separator: str) -> list[int]:
    """Positions in `reply` of each step's last token: the token holding the step's last character that is not
    white space. The reply's text is split at `separator`; a stretch with no text (two separators in a row, a
    separator at the end) is no step."""
    text, owner = [], []
    for position, token in enumerate(reply):
        piece = pieces(int(token))
        text.append(piece)
        owner += [position] * len(piece)
    joined = "".join(text)
    ends, start = [], 0
    while True:
        cut = joined.find(separator, start)
        stop = len(joined) if cut < 0 else cut
        kept = joined[start:stop].rstrip()
        if kept.strip():
            ends.append(owner[start + len(kept) - 1])
        if cut < 0:
            return ends
        start = cut + len(separator)


def reply_span(ids: Sequence[int], loss_mask: Sequence[int], eom_id: int) -> tuple[int, int]:
    """[start, stop) of the last reply's text in a tokenized dialogue: its last run of model-written tokens, the
    `<eom>` that ends it left out."""
    stop = max((i for i, m in enumerate(loss_mask) if m), default=-1) + 1
    start = stop
    while start > 0 and loss_mask[start - 1]:
        start -= 1
    if stop > start and ids[stop - 1] == eom_id:
        stop -= 1
    return start, stop


def encode_reply(dialogue: Dialogue, tokenizer, max_length: int, plugin: bool, separator: str,
                 pieces: Optional[Pieces] = None) -> tuple[EncodedSteps, bool]:
    """A dialogue (its last turn with a reply) with where its reply's steps end, no labels; and whether it was cut at
    max_length (as `tokenize_dialogue` cuts), when its steps are those that end before the cut."""
    enc = tokenize_dialogue(dialogue, tokenizer, max_length, plugin)
    ids = enc["input_ids"]
    start, stop = reply_span(ids, enc["loss_mask"], tokenizer.convert_tokens_to_ids(EOM))
    ends = [start + e for e in step_ends(ids[start:stop], pieces or Pieces(tokenizer), separator)]
    end = max((i for i, m in enumerate(enc["loss_mask"]) if m), default=len(ids) - 1) + 1  # through <eom>
    return EncodedSteps(ids[:end], ends, [], start), enc["truncated"]


def encode_solution(solution: StepSolution, tokenizer, max_length: int, plugin: bool, separator: str,
                    pieces: Optional[Pieces] = None) -> Optional[EncodedSteps]:
    """A solution's dialogue with where its steps end; None when it does not fit in max_length, or when the tokenizer
    merges a step's end with the next one's start, so the reply's tokens do not give one end a labelled step."""
    encoded, truncated = encode_reply(solution.dialogue(separator), tokenizer, max_length, plugin, separator, pieces)
    if truncated or len(encoded.ends) != len(solution.labels) or len(set(encoded.ends)) != len(encoded.ends):
        return None
    encoded.labels = list(solution.labels)
    return encoded


def encode_steps_file(path: str, tokenizer, max_length: int, plugin: bool, data_format: str,
                      separator: str) -> tuple[list[EncodedSteps], int]:
    """A stepwise file's solutions, encoded, and how many were left out (too long, or steps the tokenizer merges)."""
    pieces = Pieces(tokenizer)
    solutions = load_steps(path, data_format, separator)
    encoded = [encode_solution(s, tokenizer, max_length, plugin, separator, pieces) for s in solutions]
    kept = [e for e in encoded if e is not None]
    return kept, len(encoded) - len(kept)


def collate_steps(items: Sequence[EncodedSteps], pad_id: int) -> Batch:
    """Solutions of one micro-batch to tensors: input_ids and attention_mask [b, L] right-padded; step_index [b, S]
    (each step's last position, 0 past a row's steps), step_mask [b, S] and labels [b, S] (1.0 good, 0.0 bad)."""
    return {"input_ids": pad([e.ids for e in items], pad_id),
            "attention_mask": pad([[1] * len(e.ids) for e in items], 0),
            "step_index": pad([e.ends for e in items], 0),
            "step_mask": pad([[1] * len(e.ends) for e in items], 0),
            "labels": pad([[float(x) for x in e.labels] for e in items], 0).float()}


def at_steps(values: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
    """[b, S] of values [b, T] at each step's last position (positions past T read the last column)."""
    return values.gather(1, step_index.to(values.device).clamp(max=values.shape[1] - 1))


def first_bad(good: Sequence[bool]) -> Optional[int]:
    return next((i for i, g in enumerate(good) if not g), None)


def step_metrics(probabilities: Sequence[Sequence[float]], labels: Sequence[Sequence[bool]]) -> dict:
    """`step_accuracy`: labelled steps whose prediction (good at probability >= 0.5) is their label;
    `first_error_accuracy`: solutions where the first step predicted bad is the first step labelled bad (or none is
    predicted bad when none is); `steps`, `solutions`, and the share of steps labelled bad."""
    steps = sum(len(x) for x in labels)
    right = sum((p >= 0.5) == y for ps, ys in zip(probabilities, labels) for p, y in zip(ps, ys))
    first = sum(first_bad([p >= 0.5 for p in ps]) == first_bad(ys) for ps, ys in zip(probabilities, labels))
    return {"step_accuracy": right / max(1, steps), "first_error_accuracy": first / max(1, len(labels)),
            "steps": steps, "solutions": len(labels),
            "bad_fraction": sum(not y for ys in labels for y in ys) / max(1, steps)}


PRM_FILE = "prm.json"
"""What a process reward model's final/ says about reading steps: {"step_separator": ...}."""


def prm_file(separator: str) -> dict[str, str]:
    return {PRM_FILE: json.dumps({"step_separator": separator}) + "\n"}


def saved_separator(model_dir: str) -> Optional[str]:
    """The step separator a process reward model was trained with (its prm.json), or None when it has none."""
    path = os.path.join(model_dir, PRM_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return str(json.load(f)["step_separator"])
