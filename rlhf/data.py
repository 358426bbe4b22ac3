"""Loaders for SFT dialogues, PPO prompts, ranked preferences and solutions in labelled steps, in this project's JSONL
or any format rlhf/formats.py reads, and `rlhf validate`: what the rest of the code loads data files with.

A file is read whole and every bad line is reported as `PATH:LINE: FIELD: what is wrong`; a file with any
error raises one DataFileError and is never half-used. The records themselves, their parsing and `write_jsonl` are
rlhf/records.py's (the layer under rlhf/formats.py), and importable from here too.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rlhf.formats import load
from rlhf.moss import Dialogue, tokenize_dialogue
from rlhf.records import (KINDS, MAX_LINE_BYTES, STEP_SEPARATOR, DataError, DataFileError, Preference, StepSolution,
                          load_parsed, parse_dialogue, parse_preference, parse_prompt, parse_steps, write_jsonl)

__all__ = ["KINDS", "MAX_LINE_BYTES", "STEP_SEPARATOR", "DataError", "DataFileError", "Preference", "StepSolution",
           "load_dialogues", "load_parsed", "load_preferences", "load_prompts", "load_records", "load_steps",
           "parse_dialogue", "parse_preference", "parse_prompt", "parse_steps", "validate", "write_jsonl"]


def load_dialogues(path: str | os.PathLike, data_format: str = "auto") -> list[Dialogue]:
    return load_records(path, "sft", data_format)


def load_prompts(path: str | os.PathLike, data_format: str = "auto") -> list[Dialogue]:
    return load_records(path, "prompts", data_format)


def load_preferences(path: str | os.PathLike, data_format: str = "auto") -> list[Preference]:
    return load_records(path, "preferences", data_format)


def load_steps(path: str | os.PathLike, data_format: str = "auto",
               step_separator: str = STEP_SEPARATOR) -> list[StepSolution]:
    """Solutions in labelled steps (PRM training and evaluation); a step that holds `step_separator` (the config's
    prm.step_separator) is an error, since joined into the reply it would split into other steps."""
    return load(path, "steps", data_format, step_separator)


def load_records(path: str | os.PathLike, kind: str,
                 data_format: str = "auto") -> list[Dialogue] | list[Preference] | list[StepSolution]:
    """Load a file of one kind: "sft", "prompts", "preferences" or "steps" (KINDS), in one of rlhf.formats.FORMATS
    ("auto": detected from the first records; this project's JSONL reads as before)."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    return load(path, kind, data_format)


def _summary(path: str | os.PathLike, kind: str, records: list) -> str:
    if kind == "sft":
        turns = sum(len(d.turns) for d in records)
        return f"{path}: {len(records)} dialogues, {turns} turns, OK"
    if kind == "prompts":
        return f"{path}: {len(records)} prompts, OK"
    if kind == "steps":
        steps = sum(len(s.steps) for s in records)
        bad = sum(not label for s in records for label in s.labels)
        slipped = sum(s.first_error is not None for s in records)
        return f"{path}: {len(records)} solutions, {steps} steps, {bad} labelled bad, {slipped} with a bad step, OK"
    pairs = sum(len(p.pairs()) for p in records)
    ks = [len(p.responses) for p in records]
    k = f"{min(ks)}" if min(ks) == max(ks) else f"{min(ks)}..{max(ks)}"
    return f"{path}: {len(records)} preference records, {pairs} pairs, K={k}, OK"


def validate(path: str | os.PathLike, kind: str, data_format: str = "auto") -> int:
    """`rlhf validate`: every bad line to stderr and 1, or a one-line summary to stdout and 0."""
    try:
        records = load_records(path, kind, data_format)
    except DataFileError as e:
        print(e, file=sys.stderr)
        if other := _kind_it_reads_as(path, kind, data_format):
            print(f"{path}: every record reads as {other[0]} ({other[1]}); did you mean --kind {other[0]}?",
                  file=sys.stderr)
        return 1
    print(_summary(path, kind, records))
    return 0


def _kind_it_reads_as(path: str | os.PathLike, kind: str, data_format: str) -> tuple[str, str] | None:
    """The other kind whose reader takes every record of a file that `kind`'s refused, with its summary; the most
    specific first (a preference record also reads as its prompt)."""
    for other in ("steps", "preferences", "sft", "prompts"):
        if other != kind:
            try:
                records = load_records(path, other, data_format)
            except DataFileError:
                continue
            return other, _summary(path, other, records).split(": ", 1)[1].removesuffix(", OK")
    return None


def encode_dialogues(path: str | os.PathLike, tokenizer: Any, data: Any) -> list[dict]:
    """The dialogues of a file tokenised for training ({input_ids, loss_mask} each), as the config's `data:` section
    says (max_length, plugin, format): SFT's records, and PPO-ptx's."""
    return [tokenize_dialogue(d, tokenizer, data.max_length, data.plugin) for d in load_dialogues(path, data.format)]
