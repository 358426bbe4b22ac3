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
from rlhf.modeling import PRM_FILE
from rlhf.moss import EOM, Dialogue, tokenize_dialogue
from rlhf.records import StepSolution, first_bad


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
    (each step's last position, 0 past a row's steps), step_mask [b, S], labels [b, S] (1.0 good, 0.0 bad) and
    reply_start [b]."""
    return {"input_ids": pad([e.ids for e in items], pad_id),
            "attention_mask": pad([[1] * len(e.ids) for e in items], 0),
            "step_index": pad([e.ends for e in items], 0),
            "step_mask": pad([[1] * len(e.ends) for e in items], 0),
            "labels": pad([[float(x) for x in e.labels] for e in items], 0).float(),
            "reply_start": torch.tensor([e.reply_start for e in items], dtype=torch.long)}


def at_steps(values: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
    """[b, S] of values [b, T] at each step's last position (positions past T read the last column)."""
    return values.gather(1, step_index.to(values.device).clamp(max=values.shape[1] - 1))


def step_features(values: torch.Tensor, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[b, S, 2] of each step: the head's value at its last token, and the smallest log-probability the model's own
    LM head gave any reply token up to there (the running minimum: once a step is unlikely, so is the solution).
    values [b, T] and logits [b, T, V] are one forward pass over batch["input_ids"] (right-padded)."""
    ids = batch["input_ids"].to(logits.device)
    width = min(ids.shape[1], logits.shape[1])
    logp = torch.log_softmax(logits[:, :width - 1].float(), -1).gather(2, ids[:, 1:width, None])[..., 0]
    logp = torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)  # [b, T]: the log-prob of token t given < t
    positions = torch.arange(width, device=logp.device)
    in_reply = positions[None, :] >= batch["reply_start"].to(logp.device)[:, None]
    running = running_min(logp, in_reply)
    return torch.stack([at_steps(values.float(), batch["step_index"]), at_steps(running, batch["step_index"])], -1)


def running_min(logprobs: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """[b, T] the smallest of the `counted` tokens' log-probs up to each position (0 before the first; -inf read as
    -100, as `fit_calibration` reads it)."""
    running = torch.cummin(torch.where(counted.bool(), logprobs.float(), torch.inf), dim=1).values
    return torch.nan_to_num(running, posinf=0.0, neginf=-100.0).clamp(min=-100.0)


def reply_step_mask(response_ids: torch.Tensor, action_mask: torch.Tensor, pieces: Callable[[int], str],
                    separator: str, eom_id: int) -> torch.Tensor:
    """[b, R] 1.0 at the last token of each step of a policy's replies (right-padded, as a rollout holds them): each
    stretch the policy wrote (the action tokens; with plugins the Inner Thoughts, Commands and final reply, between
    the Results it did not write) is split at `separator` as `step_ends` splits a training solution, so a segment
    ends a step too. The `<eom>` that ends a reply is no step's text."""
    marks = torch.zeros(action_mask.shape, dtype=torch.float32)
    for row, (ids, acts) in enumerate(zip(response_ids.tolist(), action_mask.tolist())):
        written = [i for i, a in enumerate(acts) if a and ids[i] != eom_id]
        for run in _runs(written):
            for end in step_ends([ids[i] for i in run], pieces, separator):
                marks[row, run[end]] = 1.0
    return marks


def _runs(positions: list[int]) -> list[list[int]]:
    """Consecutive stretches of sorted positions."""
    runs: list[list[int]] = []
    for i in positions:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def reply_features(values: torch.Tensor, logprobs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """[b, R, 2] at every reply token, what `step_features` reads at a step's last token: the head's value there,
    and the smallest log-probability the model's own LM gave any token the policy wrote up to there. values and
    logprobs [b, R] are of the reply's tokens (the log-prob of token t given those before it)."""
    return torch.stack([values.float(), running_min(logprobs, action_mask)], -1)


def calibrated(features: torch.Tensor, calibration: Optional[dict]) -> torch.Tensor:
    """The steps' logits of "good" from their features ([..., 2]): the head's value alone without a calibration,
    else value_weight x value + logprob_weight x running minimum log-prob + bias."""
    if not calibration:
        return features[..., 0]
    return (calibration["value_weight"] * features[..., 0] + calibration["logprob_weight"] * features[..., 1]
            + calibration["bias"])


def fit_calibration(features: Sequence[torch.Tensor], labels: Sequence[Sequence[bool]], steps: int = 200) -> dict:
    """The logistic regression of the labels on the features ([S, 2] per solution): the three numbers `calibrated`
    reads, fitted by L-BFGS on the features standardised (deterministic: no sampling)."""
    x = torch.cat([f.float() for f in features]).double()
    y = torch.tensor([float(g) for row in labels for g in row], dtype=torch.float64)
    x = torch.nan_to_num(x, neginf=-100.0).clamp(min=-100.0)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w[:2] + w[2], y) + 1e-4 * w[:2].square().sum()
        value.backward()
        return value

    opt.step(loss)
    weights = (w[:2] / std).detach()
    return {"value_weight": float(weights[0]), "logprob_weight": float(weights[1]),
            "bias": float(w[2].detach() - (weights * mean).sum())}


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


def prm_file(separator: str, calibration: Optional[dict] = None) -> dict[str, str]:
    """prm.json: the step separator and, once fitted, the calibration of the step's features (`calibrated`)."""
    record = {"step_separator": separator} | ({"calibration": calibration} if calibration else {})
    return {PRM_FILE: json.dumps(record) + "\n"}


def saved_prm(model_dir: str) -> Optional[dict]:
    """A process reward model's prm.json ({"step_separator", "calibration"?}), or None when the directory has none."""
    path = os.path.join(model_dir, PRM_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def saved_separator(model_dir: str) -> Optional[str]:
    """The step separator a process reward model was trained with (its prm.json), or None when it has none."""
    saved = saved_prm(model_dir)
    return None if saved is None else str(saved["step_separator"])
