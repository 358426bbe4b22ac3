"""Batches as dicts of tensors: padding, collation, and the split of a global batch across ranks and micro-batches.

Everything here is pure torch so the controller, the workers and the tests share one definition of a batch.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

Batch = dict[str, torch.Tensor]


def pad(rows: Sequence[Sequence[int]], value: int, left: bool = False, length: int | None = None) -> torch.Tensor:
    """Rows of ids to a [len(rows), length] long tensor, padded on the right (or left)."""
    width = max([len(r) for r in rows] + [length or 0])
    # Padded as Python lists and converted in one call: half the time of a tensor copy per row.
    filled = [[value] * (width - len(r)) + list(r) if left else list(r) + [value] * (width - len(r)) for r in rows]
    return torch.tensor(filled, dtype=torch.long).view(len(rows), width)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, the same ones generation uses."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def collate_sft(examples: Sequence[dict], pad_id: int) -> Batch:
    """Tokenised dialogues ({input_ids, loss_mask}) to a right-padded batch."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(r) for r in ids], 0),
        "loss_mask": pad([e["loss_mask"] for e in examples], 0),
    }


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Prompt ids to a left-padded batch, so every reply starts at the same column."""
    return {"input_ids": pad(prompts, pad_id, left=True), "attention_mask": pad([[1] * len(p) for p in prompts], 0, left=True)}


def chunk(batch: Batch, index: int, count: int) -> Batch:
    """The index-th of count equal contiguous chunks along dim 0 (a rank's share of a global batch)."""
    size = _rows(batch)
    if size % count:
        raise ValueError(f"a batch of {size} rows does not split evenly over {count} ranks")
    step = size // count
    return {k: v[index * step:(index + 1) * step] for k, v in batch.items()}


def micro_batches(batch: Batch, size: int) -> Iterator[Batch]:
    n = _rows(batch)
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in batch.items()}


def concat(batches: Sequence[Batch]) -> Batch:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def select(batch: Batch, index: torch.Tensor) -> Batch:
    return {k: v[index] for k, v in batch.items()}


def _rows(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]


def trim_padding(batch: Batch, right_keys: Sequence[str] = ("input_ids", "attention_mask", "loss_mask")) -> Batch:
    """Drop columns that are padding in every row (a micro-batch of short rows needs no long columns)."""
    width = int(batch["attention_mask"].sum(-1).max())
    return {k: (v[:, :width] if k in right_keys else v) for k, v in batch.items()}


def trim_left_padding(batch: Batch, keys: Sequence[str] = ("sequences", "attention_mask")) -> Batch:
    """Drop the leading columns that are padding in every row of an experience micro-batch (left-padded prompts
    of very different lengths). Positions come from the attention mask, so every row's outputs are unchanged."""
    seen = batch["attention_mask"].bool().any(0)
    start = int(seen.long().argmax()) if bool(seen.any()) else 0
    if start == 0:
        return batch
    return {k: (v[:, start:] if k in keys else v) for k, v in batch.items()}


def pad_rows(batch: Batch, multiple: int, zero_keys: Sequence[str] = ("loss_mask",)) -> tuple[Batch, int]:
    """Repeat the last row until the row count is a multiple of `multiple`; the copies carry no loss.
    Returns the padded batch and the number of real rows."""
    n = _rows(batch)
    extra = (-n) % multiple
    if not extra:
        return batch, n
    out = {}
    for k, v in batch.items():
        filler = v[-1:].repeat(extra, *([1] * (v.dim() - 1)))
        if k in zero_keys:
            filler = torch.zeros_like(filler)
        out[k] = torch.cat([v, filler])
    return out, n
