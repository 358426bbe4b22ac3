"""Preference strength (Secrets of RLHF Part II): how strongly an ensemble of reward models agrees with each pair's
label, and what `rlhf rm` does with the pairs it disagrees with. Pure functions and files; no Ray.

A pair's strength under one member is r_better - r_worse; over the ensemble it is the members' mean and std. A
negative mean says the ensemble prefers the response labelled worse: a label to distrust. Pairs are named by
(record line, better, worse): the record's line in the data file (1-based; a JSON array's element, a table's row)
and the two responses' indices in its ranked list.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from reward.batches import EncodedList
from rlhf.config import EnsembleConfig, RewardLossConfig
from rlhf.data import DataError, DataFileError
from rlhf.formats import read_source

PairKey = tuple[int, int, int]
"""(record line, better, worse) of one labelled pair."""

WEAK_PAIR_RULES = ("keep", "flip", "drop", "margin")


@dataclass(frozen=True)
class Strength:
    mean: float
    std: float


# --- the ensemble ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One reward model of the ensemble: its seed and the ranked lists it trains on (indices, with repeats)."""
    index: int
    seed: int
    lists: list[int]


def ensemble_members(ensemble: EnsembleConfig, seed: int, num_lists: int) -> list[Member]:
    """Member k trains with seed `seed + k`; with `bootstrap`, on num_lists lists drawn with replacement (a function
    of that seed alone), else on every list."""
    if ensemble.members < 1:
        raise ValueError(f"rm.ensemble.members: needs at least 1 reward model, got {ensemble.members}")
    members = []
    for k in range(ensemble.members):
        draw = random.Random(1_000_003 * (seed + k) + 17)
        chosen = sorted(draw.choices(range(num_lists), k=num_lists)) if ensemble.bootstrap else list(range(num_lists))
        members.append(Member(k, seed + k, chosen))
    return members


def pair_strength(diffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffs `[members, P]` of r_better - r_worse -> (mean `[P]`, std `[P]`): the members' mean, and their sample
    standard deviation (n - 1; 0 with one member)."""
    if diffs.dim() != 2 or diffs.shape[0] < 1:
        raise ValueError(f"diffs must have shape [members, pairs], got {tuple(diffs.shape)}")
    diffs = diffs.double()
    std = diffs.std(dim=0, unbiased=True) if diffs.shape[0] > 1 else torch.zeros_like(diffs[0])
    return diffs.mean(dim=0), std


def pair_keys(lists: Sequence[EncodedList], lines: Sequence[int]) -> list[PairKey]:
    """Every pair of every list, in file order then the list's own pair order."""
    if len(lists) != len(lines):
        raise ValueError(f"{len(lists)} ranked lists but {len(lines)} record lines")
    return [(line, better, worse) for lst, line in zip(lists, lines) for better, worse in lst.pairs]


def summarize(means: Sequence[float], stds: Sequence[float], flip_below: float = 0.0) -> dict:
    """The numbers a reader checks first: how many pairs the ensemble contradicts, and the spread."""
    m = torch.tensor(list(means), dtype=torch.float64)
    s = torch.tensor(list(stds), dtype=torch.float64)
    if not len(m):
        return {"pairs": 0, "negative": 0, "negative_share": 0.0}
    quantiles = torch.quantile(m, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)).tolist()
    out = {"pairs": len(m), "negative": int((m < 0).sum()), "negative_share": float((m < 0).double().mean()),
           "mean": float(m.mean()), "mean_std": float(s.mean()),
           "quantiles": dict(zip(("p10", "p25", "p50", "p75", "p90"), quantiles))}
    if flip_below != 0.0:
        out |= {"flip_below": flip_below, "below_flip": int((m < flip_below).sum())}
    return out


# --- the file: one JSON line per pair --------------------------------------------------------------------------


def strength_rows(keys: Sequence[PairKey], means: Sequence[float], stds: Sequence[float]) -> list[dict]:
    return [{"line": line, "better": better, "worse": worse, "mean": float(mean), "std": float(std)}
            for (line, better, worse), mean, std in zip(keys, means, stds)]


def read_strength(path: str) -> dict[PairKey, Strength]:
    """strength.jsonl as {(line, better, worse): Strength}; every bad line is reported as PATH:LINE: FIELD: what."""
    table: dict[PairKey, Strength] = {}
    errors: list[DataError] = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataFileError([DataError(path, 0, "file", f"cannot open: {e.strerror or e}")]) from None
    with f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                errors.append(DataError(path, number, "line", f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            if not isinstance(row, dict):
                errors.append(DataError(path, number, "line", "expected an object {line, better, worse, mean, std}"))
                continue
            bad = _bad_field(row)
            if bad:
                errors.append(DataError(path, number, *bad))
                continue
            key = (row["line"], row["better"], row["worse"])
            if key in table:
                errors.append(DataError(path, number, "line", f"a second strength for record line {key[0]}'s pair "
                                                              f"({key[1]}, {key[2]})"))
                continue
            table[key] = Strength(float(row["mean"]), float(row.get("std", 0.0)))
    if not errors and not table:
        errors.append(DataError(path, 0, "file", "no pairs; the file is empty"))
    if errors:
        raise DataFileError(errors)
    return table


def _bad_field(row: dict) -> Optional[tuple[str, str]]:
    for name in ("line", "better", "worse"):
        value = row.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return name, f"expected a non-negative int, got {json.dumps(value)}"
    for name in ("mean", "std"):
        value = row.get(name, 0.0 if name == "std" else None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return name, f"expected a finite number, got {json.dumps(value)}"
    return None


def record_lines(path: str, data_format: str = "auto") -> list[int]:
    """Each record's number in its file, in file order (the line of a JSONL file, skipping blank lines; the element
    of a JSON array; the row of a table): how strength.jsonl names a record."""
    objects, errors, _ = read_source(path)
    if errors:
        raise DataFileError(errors)
    return [number for number, _ in objects]


# --- the rules `rlhf rm` applies ----------------------------------------------------------------------------------


def weak_pair_rule(pairs: Sequence[tuple[int, int]], means: Sequence[float], rule: str, flip_below: float,
                   margin: float) -> tuple[list[tuple[int, int]], list[float]]:
    """One list's (pairs, per-pair margins) under a rule, each pair with the ensemble's mean strength:

    keep: as labelled. flip: a pair whose mean is below `flip_below` swaps better and worse. drop: such a pair is
    left out. margin: every pair kept, its margin `margin + mean` (Part II's adaptive margin in
    -log sigmoid(r_better - r_worse - margin): strong pairs must be told apart by more, weak ones by less, and a
    pair the ensemble contradicts by a negative amount)."""
    if rule not in WEAK_PAIR_RULES:
        raise ValueError(f"rm.weak_pairs: {rule!r} is not one of {', '.join(WEAK_PAIR_RULES)}")
    out_pairs: list[tuple[int, int]] = []
    out_margins: list[float] = []
    for (better, worse), mean in zip(pairs, means, strict=True):
        weak = mean < flip_below
        if rule == "drop" and weak:
            continue
        out_pairs.append((worse, better) if rule == "flip" and weak else (better, worse))
        out_margins.append(margin + mean if rule == "margin" else margin)
    return out_pairs, out_margins


def apply_weak_pairs(lists: Sequence[EncodedList], lines: Sequence[int], table: dict[PairKey, Strength], rule: str,
                     flip_below: float, names: tuple[str, str] = ("strength file", "data file")
                     ) -> tuple[list[EncodedList], dict]:
    """The training lists under `rule`, and how many pairs it touched. A list whose pairs were all dropped is left
    out (it would train nothing). `names` (strength file, data file) are what a mismatch names; a strength file that
    is not the data file's (a pair of either without the other) raises SystemExit, one line."""
    keys = pair_keys(lists, lines)
    missing = [k for k in keys if k not in table]
    extra = len(table) - (len(keys) - len(missing))
    if missing or extra:
        known = set(keys)
        first = missing[0] if missing else next(k for k in table if k not in known)
        raise SystemExit(f"{names[0]} does not match {names[1]}: {len(missing)} of the data's {len(keys)} pairs have "
                         f"no strength and {extra} of its {len(table)} strengths name no pair of the data (first: "
                         f"record line {first[0]}, better {first[1]}, worse {first[2]}); run rlhf rm-strength on "
                         f"{names[1]} again")
    counts = {"pairs_labelled": len(keys), "pairs_weak": 0, "pairs_flipped": 0, "pairs_dropped": 0,
              "pairs_margined": 0, "lists_dropped": 0}
    out = []
    for lst, line in zip(lists, lines):
        means = [table[(line, b, w)].mean for b, w in lst.pairs]
        pairs, margins = weak_pair_rule(lst.pairs, means, rule, flip_below, lst.margin)
        weak = sum(m < flip_below for m in means)
        counts["pairs_weak"] += weak
        counts["pairs_flipped"] += weak if rule == "flip" else 0
        counts["pairs_dropped"] += len(lst.pairs) - len(pairs)
        counts["pairs_margined"] += len(pairs) if rule == "margin" else 0
        if lst.pairs and not pairs:
            counts["lists_dropped"] += 1
            continue
        out.append(replace(lst, pairs=pairs, pair_margins=margins if rule == "margin" else None))
    return out, counts


def weak_pairs_of_file(lists: Sequence[EncodedList], data_path: str, loss: RewardLossConfig,
                       data_format: str = "auto") -> tuple[list[EncodedList], dict]:
    """`rlhf rm`'s training lists under `rm.weak_pairs`, with `rm.preference_strength` read and matched."""
    table = read_strength(loss.preference_strength)
    return apply_weak_pairs(lists, record_lines(data_path, data_format), table, loss.weak_pairs, loss.flip_below,
                            (loss.preference_strength, data_path))
