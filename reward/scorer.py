"""What ranks a prompt's sampled replies (`rlhf generate --best-of N --scorer DIR`): a scorer gives each whole dialogue
one number, higher is better. A preference model is the one kind now; it reads a dialogue as `rlhf rm-eval` and PPO's
reward role do, at the last reply's `<eom>`, re-tokenized with its own tokenizer (which may not be the policy's).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

from reward.batches import collate_rows, encode_scored
from reward.model import ScalarHeadModel
from rlhf.batching import position_ids
from rlhf.commands import check_model
from rlhf.config import DataConfig, ModelConfig
from rlhf.modeling import inference_placement, load_tokenizer
from rlhf.moss import Dialogue


class Scorer(Protocol):
    def score(self, dialogues: Sequence[Dialogue]) -> list[float]:
        """One score per whole dialogue (its prompt and last reply), in order; higher is better. No sampling, no
        gradient: the same dialogue always gets the same score (up to the float noise of batching)."""
        ...


class PreferenceScorer:
    """A preference model: `rlhf rm`'s final/, or a hub `*ForSequenceClassification` with one label (whatever
    `ScalarHeadModel` loads); a dialogue's score is the value at its last reply's last token."""

    def __init__(self, model: ScalarHeadModel, tokenizer: Any, data: DataConfig, batch_size: int = 16) -> None:
        self.model = model.eval()
        self.tokenizer, self.data, self.batch_size = tokenizer, data, batch_size
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, model: ModelConfig, data: DataConfig) -> PreferenceScorer:
        """`model.path` with its own tokenizer (or `model.tokenizer`), placed as `rlhf generate`'s policy is (the GPU
        when there is one, in `model.dtype`); `data.max_length` and `data.plugin` say how a dialogue is rendered."""
        tokenizer = load_tokenizer(model.tokenizer or model.path, model.trust_remote_code)
        device, dtype = inference_placement(model.dtype)
        scalar = ScalarHeadModel.from_pretrained(model.path, getattr(torch, dtype), model.trust_remote_code)
        return cls(scalar.to(device), tokenizer, data)

    @torch.no_grad()
    def score_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B] float32 on the CPU: each right-padded row's score, read at its last attended token."""
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        return self.model.score(ids, mask, position_ids(mask)).float().cpu()

    def score(self, dialogues: Sequence[Dialogue]) -> list[float]:
        """`Scorer.score`: each dialogue in this model's own tokens, encoded as rm-eval encodes a response, in
        batches of `batch_size`."""
        rows = [encode_scored(d, self.tokenizer, self.data.max_length, self.data.plugin)[0] for d in dialogues]
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            batch = collate_rows(rows[start:start + self.batch_size], self.tokenizer.pad_token_id)
            scores += self.score_ids(batch["input_ids"], batch["attention_mask"]).tolist()
        return scores


def load_scorer(model: ModelConfig, data: DataConfig) -> Scorer:
    """The scorer the directory `model.path` holds, checked before anything loads (one line naming --scorer when it
    does not exist or scores nothing). One kind now, a preference model; a process reward model (scoring a reply's
    steps, aggregated by their min or the last) is the next, told apart here by what its directory holds."""
    check_model(model.path, "--scorer", "reward")
    return PreferenceScorer.load(model, data)
