"""Batches as dicts of tensors: padding, collation, and the split of a global batch across ranks and micro-batches.

Everything here is pure torch so the controller, the workers and the tests share one definition of a batch.
"""
from __future__ import annotations

from typing import Iterator, Sequence, TypedDict

import torch

Batch = dict[str, torch.Tensor]


class RolloutBatch(TypedDict, total=False):
    """What generation returns for a batch of prompts (the policy's `generate`, a rollout engine's): right-padded
    replies, R tokens wide."""
    response_ids: torch.Tensor
    """[b, R] the reply's tokens, plugin Results included."""
    action_mask: torch.Tensor
    """[b, R] 1 on the tokens the policy wrote (not Results, not padding): the tokens the losses train."""
    response_mask: torch.Tensor
    """[b, R] 1 on every reply token (what attention covers)."""
    ended: torch.Tensor
    """[b] 1.0 where the reply reached <eom>."""
    logprobs: torch.Tensor
    """[b, R] the sampler's log-probs of its tokens (a rollout engine's, the behaviour distribution)."""
    version: torch.Tensor
    """[b] a rollout group's: the policy version whose weights sampled the row."""
    span: torch.Tensor
    """[b, 2] a rollout group's: the wall-clock start and end of the batch."""


class Experience(TypedDict):
    """A rollout as every scoring role reads it (`experience`): prompt and reply side by side, P + R wide."""
    sequences: torch.Tensor
    """[b, P+R] the left-padded prompt, then the right-padded reply."""
    attention_mask: torch.Tensor
    """[b, P+R]"""
    response_ids: torch.Tensor
    """[b, R]"""
    action_mask: torch.Tensor
    """[b, R]"""


class TrainBatch(Experience, total=False):
    """What the policy's and the critic's update read of each rollout row (`PPOTrainer.train_batch`)."""
    advantages: torch.Tensor
    """[b, R] always."""
    old_logprobs: torch.Tensor
    """[b, R] the policy's log-probs before the update: the ratio's denominator. Absent: on-policy, and the
    update's own forward gives them."""
    behaviour_logprobs: torch.Tensor
    """[b, R] the rollout engine's log-probs of what it sampled (truncated importance weights, ppo.tis_cap)."""
    ref_logprobs: torch.Tensor
    """[b, R] the reference's, for a KL term in the loss (GRPO, RLOO)."""
    old_values: torch.Tensor
    """[b, R] the critic's values before the update (the value loss's clipping), with `returns`."""
    returns: torch.Tensor
    """[b, R] the critic's targets."""


def checked(batch: Batch, kind: type) -> Batch:
    """`batch` if it has every required key of the TypedDict `kind` and no other: a misspelt or unknown key is an
    error where the batch is made, not a key some worker silently never reads."""
    unknown = set(batch) - set(kind.__annotations__)
    missing = set(kind.__required_keys__) - set(batch)  # type: ignore[attr-defined]
    if unknown or missing:
        raise KeyError(f"a {kind.__name__} batch: unknown keys {sorted(unknown)}, missing {sorted(missing)}")
    return batch


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


# --- packing: sequences end to end, without padding between them ----------------------------------------------

def spans(attention_mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """Each row's first attended column and number of attended tokens, in a left- or right-padded batch. Packing
    takes a row's attended tokens as one sequence, so they must be one contiguous run (padding only around it)."""
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    starts = mask.long().argmax(1)  # the first attended column (0 for an empty row)
    columns = torch.arange(mask.shape[1]).expand_as(mask)
    inside = (columns >= starts.unsqueeze(1)) & (columns < (starts + lengths).unsqueeze(1))
    if not torch.equal(inside, mask):
        raise ValueError("packing needs each row's attended tokens in one run, with padding only before or after it")
    return starts.tolist(), lengths.tolist()


def fill_bins(sizes: Sequence[int], capacity: int, in_order: bool = False) -> list[list[int]]:
    """The indices of `sizes` in bins of at most `capacity` (an item larger than that alone in its own), first fit
    from the largest item down: few bins, nearly full. Each bin lists its indices in their input order. `in_order`
    keeps the items in order instead, a new bin whenever the next item does not fit (results that must come back in
    the input's order)."""
    if in_order:
        runs: list[list[int]] = []
        for i, size in enumerate(sizes):
            if runs and sum(sizes[j] for j in runs[-1]) + size <= capacity:
                runs[-1].append(i)
            else:
                runs.append([i])
        return runs
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for b, left in enumerate(room):
            if sizes[i] <= left:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return [sorted(b) for b in bins]


class Packing:
    """The rows of a padded batch as sequences laid end to end in `rows` rows of `width` tokens (the longest
    sequence; first fit from the longest down), with no padding between them. Each sequence keeps its positions
    (0, 1, ...), the ones a padded row gets from its attention mask, and a block-diagonal causal mask keeps its
    attention inside it, so every token's outputs are the padded batch's. Only a row's end can be padding, which
    attends to itself and is never attended to.

    Flat indices address the packed tokens row-major ([rows * width]): `locate` maps the padded batch's columns to
    them, `targets` finds the positions whose next token a loss reads."""

    def __init__(self, attention_mask: torch.Tensor):
        self.starts, self.lengths = spans(attention_mask)
        self.width = max([1] + self.lengths)
        rows = fill_bins(self.lengths, self.width)
        self.rows = len(rows)
        self.row, self.offset = [0] * len(self.lengths), [0] * len(self.lengths)
        segment = torch.full((self.rows, self.width), -1, dtype=torch.long)  # the sequence of each token; -1: padding
        positions = torch.arange(self.width).repeat(self.rows, 1)
        for r, members in enumerate(rows):
            at = 0
            for i in members:
                self.row[i], self.offset[i] = r, at
                segment[r, at:at + self.lengths[i]] = i
                positions[r, at:at + self.lengths[i]] = torch.arange(self.lengths[i])
                at += self.lengths[i]
            positions[r, at:] = torch.arange(self.width - at)
        self.segment, self.position_ids = segment, positions
        # Every real token: (row of the padded batch, its column there) -> its flat packed index.
        counts = torch.tensor(self.lengths, dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(len(self.lengths)), counts)
        within = torch.arange(len(seq)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        self._seq, self._col = seq, torch.tensor(self.starts, dtype=torch.long)[seq] + within
        self._flat = (torch.tensor(self.row, dtype=torch.long)[seq] * self.width
                      + torch.tensor(self.offset, dtype=torch.long)[seq] + within)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def pack(self, x: torch.Tensor, fill: int = 0) -> torch.Tensor:
        """[rows, width] from a padded batch's [b, T] (ids or a mask): each row's attended tokens, end to end."""
        out = torch.full((self.rows * self.width,), fill, dtype=x.dtype)
        out[self._flat] = x[self._seq, self._col]
        return out.view(self.rows, self.width)

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[rows, 1, width, width] additive mask: 0 where a token may attend (earlier tokens of its own sequence,
        itself), the dtype's minimum elsewhere. transformers takes a 4D mask as it is (eager and SDPA attention)."""
        seg = self.segment
        causal = torch.ones(self.width, self.width, dtype=torch.bool).tril()
        allowed = (seg.unsqueeze(2) == seg.unsqueeze(1)) & causal
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    def locate(self, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat packed indices [b, k] of columns [b, k] of the padded rows, and whether each is an attended token
        (the others get index 0, to be masked by the caller)."""
        within = columns - torch.tensor(self.starts, dtype=torch.long).unsqueeze(1)
        valid = (within >= 0) & (within < torch.tensor(self.lengths, dtype=torch.long).unsqueeze(1))
        base = torch.tensor(self.row, dtype=torch.long) * self.width + torch.tensor(self.offset, dtype=torch.long)
        return torch.where(valid, base.unsqueeze(1) + within, 0), valid

    def targets(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next-token loss positions: for every token of the padded rows where `mask` [b, T] is 1 but a sequence's
        first (which nothing in it predicts), the flat index of the token before it, its own flat index, and its
        sequence (row of the padded batch); each [k], in packed order."""
        packed = self.pack(mask.long()).view(-1).bool()
        seg = self.segment.view(-1)
        follows = torch.zeros_like(packed)
        follows[1:] = (seg[1:] == seg[:-1]) & (seg[1:] >= 0)
        target = torch.nonzero(packed & follows).squeeze(1)
        return target - 1, target, seg[target]


def experience(prompts: Batch, rollout: RolloutBatch) -> Experience:
    """Prompt (left-padded) and reply (right-padded) side by side: what every scoring role reads. Attention
    covers plugin Results too (the policy wrote its answer after reading them); actions cover only what it wrote."""
    return {"sequences": torch.cat([prompts["input_ids"], rollout["response_ids"]], 1),
            "attention_mask": torch.cat([prompts["attention_mask"], rollout["response_mask"]], 1),
            "response_ids": rollout["response_ids"], "action_mask": rollout["action_mask"]}
