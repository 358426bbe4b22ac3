"""Ranked lists as tensors: every response of a prompt encoded once, its (better, worse) pairs as row indices.

A prompt with K responses gives K rows and up to K·(K-1)/2 pairs; the loss is formed from the K scores, never by
encoding each pair's two sides again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from rlhf.batching import Batch, pad
from rlhf.config import DataConfig, RewardLossConfig
from rlhf.data import Preference, load_preferences
from rlhf.moss import Dialogue, tokenize_dialogue


@dataclass
class EncodedList:
    rows: list[list[int]]        # one token sequence per response (prompt + reply, ending at <eom>)
    reply_masks: list[list[int]]  # 1 on each reply's tokens
    pairs: list[tuple[int, int]]  # (better, worse) indices into rows
    margin: float
    reply_starts: list[int] = field(default_factory=list)  # where each row's last turn begins (DPO scores it alone)
    ref_logps: Optional[list[float]] = None  # DPO: the reference's summed log-prob of each row's last reply
    pair_margins: Optional[list[float]] = None  # one per pair where they differ (preference strength); else margin

    def margins_of_pairs(self) -> list[float]:
        """Each pair's margin in -log sigmoid(s_better - s_worse - margin)."""
        return list(self.pair_margins) if self.pair_margins is not None else [self.margin] * len(self.pairs)


class _MemoEncoder:
    """`tokenizer.encode` remembered by text: a list's K responses share their prompt's pieces (meta instruction,
    earlier turns, the question), which are then tokenized once instead of K times."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.known: dict[tuple[str, bool], list[int]] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        key = (text, add_special_tokens)
        if key not in self.known:
            self.known[key] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return list(self.known[key])


def encode_scored(dialogue: Dialogue, tokenizer, max_length: int, plugin: bool) -> tuple[list[int], list[int], int]:
    """A whole dialogue as a preference model reads it: its ids and reply mask up to the last reply's last token, and
    where its last turn begins. Every scoring of a dialogue by text (training, `rlhf rm-eval`, best-of-N) encodes
    through here."""
    enc = tokenize_dialogue(dialogue, tokenizer, max_length, plugin)
    ids, mask = enc["input_ids"], enc["loss_mask"]
    # The reward is read at the reply's last token (<eom>), as in PPO; drop the context newline after it.
    end = max(i for i, m in enumerate(mask) if m) + 1 if any(mask) else len(ids)
    return ids[:end], mask[:end], enc["last_turn_start"]


def encode_preference(pref: Preference, tokenizer, max_length: int, plugin: bool, fixed_margin: float,
                      use_record_margin: bool) -> EncodedList:
    rows, masks, starts = [], [], []
    encoder = _MemoEncoder(tokenizer)
    for response in pref.responses:
        ids, mask, start = encode_scored(pref.prompt.with_reply(response), encoder, max_length, plugin)
        rows.append(ids)
        masks.append(mask)
        starts.append(start)
    margin = fixed_margin + (pref.margin or 0.0 if use_record_margin else 0.0)
    return EncodedList(rows, masks, pref.pairs(), margin, starts)


def collate_rows(rows: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Encoded dialogues to input_ids and attention_mask [N, L], right-padded: a row's score is read at its last
    attended token."""
    return {"input_ids": pad(rows, pad_id), "attention_mask": pad([[1] * len(r) for r in rows], 0)}


def collate_ranked(lists: Sequence[EncodedList], pad_id: int) -> Batch:
    """Lists of one micro-batch to tensors: input_ids [N, L] right-padded, pairs [P, 2] as row indices,
    pair_prompt [P], row_prompt [N], margins [P], best_rows [num_prompts] (each list's first response is its best);
    for DPO also reply_mask [N, L] (the last reply's tokens alone) and ref_logps [N] where the lists have them."""
    rows, masks, pairs, pair_prompt, row_prompt, margins, best = [], [], [], [], [], [], []
    for p, lst in enumerate(lists):
        offset = len(rows)
        best.append(offset)
        rows += lst.rows
        masks += lst.reply_masks
        row_prompt += [p] * len(lst.rows)
        for (better, worse), margin in zip(lst.pairs, lst.margins_of_pairs()):
            pairs.append((offset + better, offset + worse))
            pair_prompt.append(p)
            margins.append(margin)
    batch = {
        **collate_rows(rows, pad_id),
        "loss_mask": pad(masks, 0),
        "pairs": torch.tensor(pairs, dtype=torch.long).view(-1, 2),
        "pair_prompt": torch.tensor(pair_prompt, dtype=torch.long),
        "row_prompt": torch.tensor(row_prompt, dtype=torch.long),
        "margins": torch.tensor(margins, dtype=torch.float32),
        "best_rows": torch.tensor(best, dtype=torch.long),
    }
    if all(lst.reply_starts for lst in lists):
        starts = [s for lst in lists for s in lst.reply_starts]
        batch["reply_mask"] = pad([[int(m and i >= s) for i, m in enumerate(mask)] for mask, s in zip(masks, starts)], 0)
    if all(lst.ref_logps is not None for lst in lists):
        batch["ref_logps"] = torch.tensor([x for lst in lists for x in lst.ref_logps], dtype=torch.float32)
    return batch


def _longest(lst: EncodedList) -> int:
    return max(len(row) for row in lst.rows)


def micro_batches_of(lists: Sequence[EncodedList], micro: int, pad_id: int, by_length: bool = True,
                     with_lists: bool = False) -> Iterator:
    """A rank's ranked lists as micro-batches of `micro` lists. Whole lists stay together so their pairs never
    cross a micro-batch; `by_length` groups lists of similar length, which then carry little padding (the step's
    loss is the sum over its micro-batches, each divided by the global prompt count, so grouping does not change
    it). With `with_lists`, each batch comes with its lists."""
    ordered = sorted(lists, key=_longest) if by_length else list(lists)
    for i in range(0, len(ordered), micro):
        part = ordered[i:i + micro]
        batch = collate_ranked(part, pad_id)
        yield (batch, part) if with_lists else batch


def encode_file(path: str, tokenizer, data: DataConfig, loss: RewardLossConfig) -> list[EncodedList]:
    """A preference file's ranked lists, each response tokenized once (shared prompt pieces too)."""
    return [encode_preference(p, tokenizer, data.max_length, data.plugin, loss.margin, loss.use_record_margin)
            for p in load_preferences(path, data.format)]
