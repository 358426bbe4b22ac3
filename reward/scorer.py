"""What ranks a prompt's sampled replies (`rlhf generate --best-of N --scorer DIR`): a scorer gives each whole dialogue
one number, higher is better, re-tokenized with its own tokenizer (which may not be the policy's). A preference model
reads a dialogue as `rlhf rm-eval` and PPO's reward role do, at the last reply's `<eom>`; a process reward model scores
each step of the reply (`rlhf prm-eval`'s reading) and gives the reply its weakest step's probability of being good.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

import torch
from torch import Tensor

from reward.batches import collate_rows, encode_scored
from reward.model import ScalarHeadModel
from reward.steps import (EncodedSteps, Pieces, calibrated, collate_steps, encode_reply, saved_prm, saved_separator,
                          step_features)
from rlhf.batching import position_ids
from rlhf.commands import check_model
from rlhf.config import DataConfig, ModelConfig
from rlhf.modeling import inference_placement, load_tokenizer
from rlhf.records import STEP_SEPARATOR
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


class ProcessScorer(PreferenceScorer):
    """A process reward model (`rlhf prm`'s final/): a reply's steps split as the model was trained to split them (its
    prm.json), each step's probability of being good from its features at its last token, calibrated as prm.json
    says (`reward.steps.calibrated`); the reply's score is the smallest (Math-Shepherd's min: a solution is as good
    as its weakest step), 0 for a reply with no step."""

    def __init__(self, model: ScalarHeadModel, tokenizer: Any, data: DataConfig, separator: str,
                 calibration: Optional[dict] = None, batch_size: int = 16) -> None:
        super().__init__(model, tokenizer, data, batch_size)
        self.separator, self.calibration = separator, calibration
        self.pieces = Pieces(tokenizer)

    @classmethod
    def load(cls, model: ModelConfig, data: DataConfig, separator: str = STEP_SEPARATOR) -> ProcessScorer:
        """`model.path` as its prm.json says; `separator` for a directory that names none."""
        scorer = PreferenceScorer.load(model, data)
        saved = saved_prm(model.path) or {}
        return cls(scorer.model, scorer.tokenizer, data, saved.get("step_separator", separator),
                   saved.get("calibration"))

    def step_probabilities(self, dialogues: Sequence[Dialogue]) -> list[list[float]]:
        """Each dialogue's reply: the probability that each of its steps is good, in order."""
        return self.probabilities_of([encode_reply(d, self.tokenizer, self.data.max_length, self.data.plugin,
                                                   self.separator, self.pieces)[0] for d in dialogues])

    @torch.no_grad()
    def probabilities_of(self, rows: Sequence[EncodedSteps]) -> list[list[float]]:
        """The same, of dialogues already encoded with their steps' ends (`reward.steps`)."""
        found: list[list[float]] = []
        for start in range(0, len(rows), self.batch_size):
            batch = collate_steps(rows[start:start + self.batch_size], self.tokenizer.pad_token_id)
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            values, logits = self.model(ids, mask, position_ids(mask), logits_at=True)
            p = torch.sigmoid(calibrated(step_features(values, logits, batch), self.calibration)).cpu()
            found += [row[:int(n)].tolist() for row, n in zip(p, batch["step_mask"].sum(1))]
        return found

    def score(self, dialogues: Sequence[Dialogue]) -> list[float]:
        return [min(p, default=0.0) for p in self.step_probabilities(dialogues)]


def load_scorer(model: ModelConfig, data: DataConfig) -> Scorer:
    """The scorer the directory `model.path` holds, checked before anything loads (one line naming --scorer when it
    does not exist or scores nothing): a process reward model when it has prm.json, else a preference model."""
    check_model(model.path, "--scorer", "reward")
    if saved_separator(model.path) is not None:
        return ProcessScorer.load(model, data)
    return PreferenceScorer.load(model, data)
