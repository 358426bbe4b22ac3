"""The scalar-head roles: the reward (a frozen preference model), the critic, and the preference-model trainer.

All three hold a `reward.model.ScalarHeadModel`: one value per position, the reward read at a dialogue's last token.
"""
from __future__ import annotations

from typing import Optional

import torch

from actors.dispatch import dispatch, even_items, padded_items, padded_rows, update_plan
from actors.rank import RankWorker
from reward.batches import EncodedList, micro_batches_of
from reward.model import last_index
from rlhf.batching import Batch, micro_batches, position_ids, trim_left_padding, trim_padding
from rlhf.ppo_math import logprobs_from_logits, value_loss
from rlhf.roles import UpdatePlan, ValueLoss


class ScalarWorker(RankWorker):
    """What the three scalar roles share: the model (LoRA on its backbone when trained so) and its values."""

    def build(self) -> torch.nn.Module:
        from reward.model import ScalarHeadModel, load_reward_stats
        from rlhf.modeling import apply_lora_config
        spec = self.spec
        model = ScalarHeadModel.from_pretrained(spec.model_path, self.dtype(), spec.model.trust_remote_code)
        self.stats = load_reward_stats(spec.model_path)
        self.lora = spec.role.lora.enabled and spec.trainable
        if self.lora:  # adapters in the backbone, the head trained in full
            model = ScalarHeadModel(apply_lora_config(model.lm, spec.role.lora), model.head.requires_grad_(True))
        if spec.model.gradient_checkpointing and spec.trainable:
            model.lm.gradient_checkpointing_enable()
        self.sequences_encoded = 0
        return model

    def _values(self, mb: Batch) -> torch.Tensor:
        mb = {k: v.to(self.device) for k, v in mb.items()}
        self.sequences_encoded += int(mb["input_ids"].shape[0])
        return self.engine.forward(mb["input_ids"], mb["attention_mask"], position_ids(mb["attention_mask"]))

    def _response_values(self, mb: Batch) -> torch.Tensor:
        """[b, R] values of the states before each reply token of an experience micro-batch."""
        width = mb["response_ids"].shape[1]
        mb = trim_left_padding(mb)
        values = self._values({"input_ids": mb["sequences"], "attention_mask": mb["attention_mask"]})
        return values[:, -width - 1:-1]


class RewardWorker(ScalarWorker):
    @dispatch(split={"batch": padded_rows}, reduce="concat")
    def score(self, batch: Batch) -> torch.Tensor:
        """[b] reward of each full dialogue, read at its last token (the reply's <eom>)."""
        def forward(mb: Batch) -> torch.Tensor:
            mb = trim_left_padding(mb)
            seq = {"input_ids": mb["sequences"], "attention_mask": mb["attention_mask"]}
            return _last_values(self._values(seq), seq["attention_mask"].to(self.device))
        return self.each_micro_batch(batch, forward)


class CriticWorker(ScalarWorker):
    @dispatch(split={"batch": padded_rows}, reduce="concat")
    def values(self, batch: Batch) -> torch.Tensor:
        """[b, R] critic values of the states before each reply token."""
        return self.each_micro_batch(batch, self._response_values)

    @dispatch(split={"plan": update_plan},
              reduce={"vf_loss": "sum", "vf_clipfrac": "sum", "vf_grad_norm": "mean", "nonfinite": "sum"})
    def update(self, plan: UpdatePlan, loss: ValueLoss) -> dict:
        """One optimizer step of the clipped value loss per minibatch; this rank's shares, averaged over steps."""
        self.engine.train()
        sums = {"vf_loss": 0.0, "vf_clipfrac": 0.0, "vf_grad_norm": 0.0}
        for batch, num_tokens in zip(plan.steps, plan.tokens):
            for mb in micro_batches(batch, self.spec.role.micro_batch_size):
                mask = mb["action_mask"].to(self.device).float()
                values = self._response_values(mb).float()
                vf, stats = value_loss(values, mb["old_values"].to(self.device), mb["returns"].to(self.device), mask,
                                       loss.clip_eps or None, num_tokens=num_tokens)
                sums["vf_loss"] += float(vf.detach())
                sums["vf_clipfrac"] += float(stats["vf_clipfrac"]) * float(mask.sum()) / num_tokens
                self.engine.backward_step(loss.coef * vf)
            sums["vf_grad_norm"] += self.engine.grad_norm()
        steps = max(1, len(plan.steps))
        return {k: v / steps for k, v in sums.items()} | {"nonfinite": self.engine.take_nonfinite()}


class RMWorker(ScalarWorker):
    """A preference-model rank: every response of its ranked lists encoded once, all their pairs from the scores."""

    def build(self) -> torch.nn.Module:
        model = super().build()
        # The ranking loss sees only score differences, so the head's bias gets no signal, only Adam's rounding noise.
        # Held where it starts (0), it lets final/ load as transformers' bias-free *ForSequenceClassification.
        model.head.bias.requires_grad_(False)
        return model

    @dispatch(split={"lists": even_items},
              reduce={"grad_norm": "first", "rewards": "concat", **{k: "sum" for k in (
                  "loss", "correct", "pairs", "margin_sum", "lm_loss", "encoded")}})
    def train_step(self, lists: list[EncodedList], num_prompts: int, label_smoothing: float, lm_coef: float,
                   num_best_tokens: int) -> dict:
        """One optimizer step over this rank's whole ranked lists, the loss averaged over the global batch's
        prompts (and an LM loss on each prompt's best response when lm_coef > 0)."""
        from reward.losses import ranking_loss
        self.engine.train()
        encoded_before = self.sequences_encoded
        out = {"loss": 0.0, "correct": 0.0, "pairs": 0.0, "margin_sum": 0.0, "lm_loss": 0.0}
        rewards = []
        for mb in micro_batches_of(lists, self.spec.role.micro_batch_size, self.tokenizer.pad_token_id):
            seq = {"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]}
            if lm_coef > 0:
                values, logits = self._values_and_logits(seq)
            else:
                values, logits = self._values(trim_padding(seq)), None
            scores = _last_values(values, mb["attention_mask"].to(self.device))
            res = ranking_loss(scores, mb["pairs"].to(self.device), mb["pair_prompt"].to(self.device),
                               mb["margins"].to(self.device), label_smoothing, num_prompts=num_prompts)
            loss = res["loss"]
            if logits is not None:
                lm = _best_lm_loss(logits, mb, self.device) / max(1, num_best_tokens)
                loss = loss + lm_coef * lm
                out["lm_loss"] += float(lm.detach())
            self.engine.backward_step(loss)
            n_pairs = int(res["num_pairs"])
            out["loss"] += float(res["loss"].detach())
            out["pairs"] += n_pairs
            out["correct"] += float(res["accuracy"]) * n_pairs
            out["margin_sum"] += float(res["mean_margin"]) * n_pairs
            rewards.append(scores.detach().float().cpu())
        return out | {"encoded": self.sequences_encoded - encoded_before, "grad_norm": self.engine.grad_norm(),
                      "rewards": torch.cat(rewards) if rewards else torch.zeros(0)}

    def _values_and_logits(self, seq: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mb = {k: v.to(self.device) for k, v in seq.items()}
        self.sequences_encoded += int(mb["input_ids"].shape[0])
        return self.engine.module.forward_with_logits(mb["input_ids"], mb["attention_mask"],
                                                      position_ids(mb["attention_mask"]))

    @dispatch(split={"lists": padded_items}, reduce="concat")
    def evaluate(self, lists: list[EncodedList]) -> dict:
        """Per ranked list: correctly ordered pairs, pairs, the pairs' margins and the responses' scores."""
        self.engine.eval()
        out: dict[str, list] = {"correct": [], "pairs": [], "margins": [], "rewards": []}
        with torch.no_grad():
            for mb, part in micro_batches_of(lists, self.spec.role.micro_batch_size, self.tokenizer.pad_token_id,
                                             by_length=False, with_lists=True):
                seq = trim_padding({"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]})
                scores = _last_values(self._values(seq), mb["attention_mask"].to(self.device)).float().cpu()
                diff = scores[mb["pairs"][:, 0]] - scores[mb["pairs"][:, 1]]
                offset = 0
                for i, lst in enumerate(part):
                    mine = diff[mb["pair_prompt"] == i]
                    out["correct"].append(int((mine > 0).sum()))
                    out["pairs"].append(len(mine))
                    out["margins"].append(mine)
                    out["rewards"].append(scores[offset:offset + len(lst.rows)])
                    offset += len(lst.rows)
        return out

    @dispatch(reduce="first")
    def save_pretrained(self, out_dir: str, stats: Optional[dict] = None, merge_lora: bool = True) -> None:
        """All ranks call this; rank 0 writes the LM (merged when LoRA), the head, the stats and the tokenizer: a
        directory that also loads as a sequence classifier (`reward.model`), whose pad token is the tokenizer's."""
        from rlhf.modeling import atomic_directory
        def write() -> None:
            with atomic_directory(out_dir) as tmp:
                self.engine.module.save_pretrained(tmp, stats=stats, merge_lora=merge_lora,
                                                   pad_token_id=self.tokenizer.pad_token_id)
                self.tokenizer.save_pretrained(tmp)
        self.engine.write_on_rank0(self.rank, write)


def _last_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    idx = last_index(attention_mask[:, : values.shape[1]])
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)


def _best_lm_loss(logits: torch.Tensor, mb: Batch, device: torch.device) -> torch.Tensor:
    """Summed LM loss on each prompt's best response (its reply tokens only)."""
    rows = mb["best_rows"].to(device)
    ids = mb["input_ids"].to(device)[rows]
    mask = mb["loss_mask"].to(device)[rows][:, 1:].float()
    logp = logprobs_from_logits(logits[rows][:, :-1].float(), ids[:, 1:])
    return -(logp * mask).sum()
