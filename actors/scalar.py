"""The scalar-head roles: the reward (a frozen preference model), the critic, and the preference-model and
process-reward-model trainers.

All hold a `reward.model.ScalarHeadModel`: one value per position, the reward read at a dialogue's last token, a
step's score at the step's last token.
With a token budget (`max_tokens_per_micro_batch`) micro-batches are rows packed end to end without padding
(`rlhf.batching.Packing`); every value is the padded path's.
"""
from __future__ import annotations

from typing import Optional

import torch

from actors.dispatch import dispatch, even_items, padded_items, padded_rows, update_plan
from actors.engine import (check_packable, deepspeed_config, load_partitioned, partitioned_construction, peak_rss_gb,
                           say_unloaded)
from actors.rank import RankWorker
from reward.batches import EncodedList
from reward.losses import ranking_loss, step_loss
from reward.model import ScalarHeadModel, last_index, load_reward_stats
from reward.steps import (EncodedSteps, Pieces, at_steps, calibrated, collate_steps, reply_features, reply_step_mask,
                          saved_prm, step_features)
from rlhf.batching import Batch, Experience, Packing, fill_bins, position_ids, trim_left_padding, trim_padding
from rlhf.modeling import apply_lora_config, atomic_directory, build_causal_lm, write_text_files
from rlhf.moss import EOM
from rlhf.ppo_math import logprobs_from_logits, value_loss
from rlhf.records import STEP_SEPARATOR
from rlhf.roles import PRMStep, RankingStep, UpdatePlan, ValueLoss


class ScalarWorker(RankWorker):
    """What the scalar roles share: the model (LoRA on its backbone when trained so) and its values."""

    CLASSIFIER = "sequence"
    """The transformers classifier final/ also loads as (`reward.model.CLASSIFIERS`)."""

    def build(self) -> torch.nn.Module:
        spec = self.spec
        self.loaded = {"partitioned": spec.role.deepspeed.zero_stage == 3}
        model = ScalarHeadModel.from_pretrained(spec.model_path, self.dtype(), spec.model.trust_remote_code,
                                                load_lm=self._load_partitioned if self.loaded["partitioned"] else None)
        self.stats = load_reward_stats(spec.model_path)
        self.lora = spec.trainable and spec.role.lora.enabled
        if self.lora:  # adapters in the backbone, the head trained in full
            model = ScalarHeadModel(apply_lora_config(model.lm, spec.role.lora), model.head.requires_grad_(True))
        if spec.model.gradient_checkpointing and spec.trainable:
            model.lm.gradient_checkpointing_enable()
        self.sequences_encoded = 0
        self.budget = spec.role.max_tokens_per_micro_batch
        if self.budget:
            check_packable(model.config, spec.model_path)
        self.loaded["peak_rss_gb"] = peak_rss_gb()
        return model

    def _load_partitioned(self, path: str):
        """The backbone built partitioned (ZeRO-3), each rank reading only its share of every weight; with the
        checkpoint's unused and missing keys, and how to say them."""
        spec = self.spec
        config = deepspeed_config(spec.role, spec.trainable, spec.grad_accum, self.world_size, self.device,
                                  self.dtype())
        lm = build_causal_lm(path, str(self.dtype()).removeprefix("torch."), spec.model.trust_remote_code,
                             partitioned_construction(config))
        unused, missing, read = load_partitioned(lm, path)
        self.loaded |= {"elements_read": read, "elements": sum(p.ds_numel for p in lm.parameters())}
        return lm, unused, missing, lambda: say_unloaded(path, lm, unused, missing)

    @dispatch(reduce="concat")
    def load_report(self) -> list[dict]:
        """How each rank loaded its weights: partitioned (ZeRO-3, and then how many elements it read of how many),
        and its process's peak resident set once the model was built (before its DeepSpeed engine)."""
        return [self.loaded]

    def _values(self, mb: Batch) -> torch.Tensor:
        mb = {k: v.to(self.device) for k, v in mb.items()}
        self.sequences_encoded += int(mb["input_ids"].shape[0])
        return self.engine.forward(mb["input_ids"], mb["attention_mask"], position_ids(mb["attention_mask"]))

    def _packed_inputs(self, pk: Packing, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A packed forward's input ids, 4D attention mask and positions, on the device."""
        ids = pk.pack(input_ids, self.tokenizer.pad_token_id)
        return (ids.to(self.device), pk.attention_mask(self.dtype()).to(self.device), pk.position_ids.to(self.device))

    def _packed_values(self, mb: Batch, key: str, columns: torch.Tensor, real: bool = True) -> torch.Tensor:
        """Values [b, k] at columns [b, k] of the padded rows from one packed forward; 0 outside a row's tokens."""
        pk = Packing(mb["attention_mask"])
        self.sequences_encoded += len(pk.lengths) if real else 0
        values = self.engine.forward(*self._packed_inputs(pk, mb[key])).view(-1)
        flat, ok = pk.locate(columns)
        return torch.where(ok.to(self.device), values[flat.to(self.device)], 0.0)

    def _response_values(self, mb: Batch) -> torch.Tensor:
        """[b, R] values of the states before each reply token of an experience micro-batch."""
        width = mb["response_ids"].shape[1]
        if self.budget:
            end = mb["sequences"].shape[1]
            before = torch.arange(end - width - 1, end - 1).expand(len(mb["sequences"]), -1)
            return self._packed_values(mb, "sequences", before)
        mb = trim_left_padding(mb)
        values = self._values({"input_ids": mb["sequences"], "attention_mask": mb["attention_mask"]})
        return values[:, -width - 1:-1]

    @dispatch(reduce="first")
    def save_pretrained(self, out_dir: str, stats: Optional[dict] = None, merge_lora: bool = True,
                        extra_files: Optional[dict] = None) -> None:
        """All ranks call this; rank 0 writes the LM (merged when LoRA), the head, the stats, the tokenizer and
        `extra_files` (name -> text): a directory that also loads as the role's transformers classifier
        (`CLASSIFIER`, `reward.model`), whose pad token is the tokenizer's."""
        def write() -> None:
            with atomic_directory(out_dir) as tmp:
                self.engine.module.save_pretrained(tmp, stats=stats, merge_lora=merge_lora,
                                                   pad_token_id=self.tokenizer.pad_token_id,
                                                   classifier=self.CLASSIFIER)
                self.tokenizer.save_pretrained(tmp)
                write_text_files(tmp, extra_files)
        self.engine.write_on_rank0(self.rank, write)


class RewardWorker(ScalarWorker):
    @dispatch(split={"batch": padded_rows}, reduce="concat")
    def score(self, batch: Batch) -> torch.Tensor:
        """[b] reward of each full dialogue, read at its last token (the reply's <eom>)."""
        if self.budget:
            return self.engine.forward_rows(batch, self.budget, lambda mb: self._packed_values(
                mb, "sequences", last_index(mb["attention_mask"]).unsqueeze(1))[:, 0])

        def forward(mb: Batch) -> torch.Tensor:
            mb = trim_left_padding(mb)
            seq = {"input_ids": mb["sequences"], "attention_mask": mb["attention_mask"]}
            return _last_values(self._values(seq), seq["attention_mask"].to(self.device))
        return self.each_micro_batch(batch, forward)


class CriticWorker(ScalarWorker):
    @dispatch(split={"batch": padded_rows}, reduce="concat")
    def values(self, batch: Batch) -> torch.Tensor:
        """[b, R] critic values of the states before each reply token."""
        if self.budget:
            return self.engine.forward_rows(batch, self.budget, self._response_values)
        return self.each_micro_batch(batch, self._response_values)

    @dispatch(split={"plan": update_plan},
              reduce={"vf_loss": "sum", "vf_clipfrac": "sum", "vf_grad_norm": "mean", "nonfinite": "sum"})
    def update(self, plan: UpdatePlan, loss: ValueLoss) -> dict:
        """One optimizer step of the clipped value loss per minibatch; this rank's shares, averaged over steps."""
        self.engine.train()
        sums = {"vf_loss": 0.0, "vf_clipfrac": 0.0, "vf_grad_norm": 0.0}
        for batch, num_tokens in zip(plan.steps, plan.tokens):
            for mb, real in self.engine.micro_batches(batch, self.spec.role.micro_batch_size, self.budget):
                mask = mb["action_mask"].to(self.device).float()
                values = self._response_values(mb).float()
                vf, stats = value_loss(values, mb["old_values"].to(self.device), mb["returns"].to(self.device), mask,
                                       loss.clip_eps or None, num_tokens=num_tokens)
                if real:
                    sums["vf_loss"] += float(vf.detach())
                    sums["vf_clipfrac"] += float(stats["vf_clipfrac"]) * float(mask.sum()) / num_tokens
                self.engine.backward_step(loss.coef * vf, real)
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
    def train_step(self, lists: list[EncodedList], step: RankingStep) -> dict:
        """One optimizer step over this rank's whole ranked lists, the loss averaged over the global batch's
        prompts (and an LM loss on each prompt's best response when lm_coef > 0)."""
        self.engine.train()
        encoded_before = self.sequences_encoded
        out = {"loss": 0.0, "correct": 0.0, "pairs": 0.0, "margin_sum": 0.0, "lm_loss": 0.0}
        rewards = []
        for (mb, _), real in self._list_steps(lists):
            seq = {"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]}
            lm = None
            if self.budget:
                scores, lm = self._packed_scores(mb, step.lm_coef > 0, real)
            elif step.lm_coef > 0:
                values, logits = self._values_and_logits(seq)
                scores = _last_values(values, mb["attention_mask"].to(self.device))
                lm = _best_lm_loss(logits, mb, self.device)
            else:
                scores = _last_values(self._values(trim_padding(seq)), mb["attention_mask"].to(self.device))
            res = ranking_loss(scores, mb["pairs"].to(self.device), mb["pair_prompt"].to(self.device),
                               mb["margins"].to(self.device), step.label_smoothing, num_prompts=step.num_prompts)
            loss = res["loss"]
            if lm is not None:
                lm = lm / max(1, step.num_best_tokens)
                loss = loss + step.lm_coef * lm
                out["lm_loss"] += float(lm.detach()) if real else 0.0
            self.engine.backward_step(loss, real)
            if not real:
                continue
            n_pairs = int(res["num_pairs"])
            out["loss"] += float(res["loss"].detach())
            out["pairs"] += n_pairs
            out["correct"] += float(res["accuracy"]) * n_pairs
            out["margin_sum"] += float(res["mean_margin"]) * n_pairs
            rewards.append(scores.detach().float().cpu())
        return out | {"encoded": self.sequences_encoded - encoded_before, "grad_norm": self.engine.grad_norm(),
                      "rewards": torch.cat(rewards) if rewards else torch.zeros(0)}

    def _packed_scores(self, mb: Batch, with_lm: bool,
                       real: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Scores [N] of a packed ranked-list micro-batch's responses (the value at each one's last token) and, with
        with_lm, the summed LM loss on each prompt's best response (only its reply positions reach the LM head)."""
        pk = Packing(mb["attention_mask"])
        self.sequences_encoded += len(pk.lengths) if real else 0
        inputs = self._packed_inputs(pk, mb["input_ids"])
        last, _ = pk.locate(last_index(mb["attention_mask"]).unsqueeze(1))
        if not with_lm:
            return self.engine.forward(*inputs).view(-1)[last[:, 0].to(self.device)], None
        best = torch.zeros(len(pk.lengths), 1, dtype=torch.long)
        best[mb["best_rows"]] = 1
        predict, target, _ = pk.targets(mb["loss_mask"] * best)
        values, logits = self.engine.forward(*inputs, logits_at=predict.to(self.device))
        labels = inputs[0].view(-1)[target.to(self.device)]
        lm = -logprobs_from_logits(logits.float().unsqueeze(0), labels.unsqueeze(0)).sum()
        return values.view(-1)[last[:, 0].to(self.device)], lm

    def _values_and_logits(self, seq: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mb = {k: v.to(self.device) for k, v in seq.items()}
        self.sequences_encoded += int(mb["input_ids"].shape[0])
        return self.engine.forward(mb["input_ids"], mb["attention_mask"], position_ids(mb["attention_mask"]),
                                   logits_at=True)

    @dispatch(split={"lists": padded_items}, reduce="concat")
    def evaluate(self, lists: list[EncodedList]) -> dict:
        """Per ranked list: correctly ordered pairs, pairs, the pairs' margins and the responses' scores."""
        self.engine.eval()
        out: dict[str, list] = {"correct": [], "pairs": [], "margins": [], "rewards": []}
        with torch.no_grad():
            for (mb, part), real in self._list_steps(lists, train=False, by_length=False):
                if self.budget:
                    scores = self._packed_scores(mb, False, real)[0].float().cpu()
                else:
                    seq = trim_padding({"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]})
                    scores = _last_values(self._values(seq), mb["attention_mask"].to(self.device)).float().cpu()
                diff = scores[mb["pairs"][:, 0]] - scores[mb["pairs"][:, 1]]
                offset = 0
                for i, lst in enumerate(part if real else ()):
                    mine = diff[mb["pair_prompt"] == i]
                    out["correct"].append(int((mine > 0).sum()))
                    out["pairs"].append(len(mine))
                    out["margins"].append(mine)
                    out["rewards"].append(scores[offset:offset + len(lst.rows)])
                    offset += len(lst.rows)
        return out

class PRMWorker(ScalarWorker):
    """A process-reward-model rank: each solution encoded once, every step's score (the logit that the solution can
    still reach the right answer) read at the step's last token."""

    CLASSIFIER = "token"

    def build(self) -> torch.nn.Module:
        self.prm: Optional[dict] = None  # prm.json, read when PPO first asks for step scores
        model = super().build()
        if not self.spec.train_backbone:  # the head alone trains; the LM's log-probs stay the ones it started with
            model.lm.requires_grad_(False)
        return model

    def _solution_steps(self, items: list[EncodedSteps], train: bool = True, by_length: bool = True):
        """Micro-batches of solutions, each with whether it is real: `micro_batch_size` solutions each, or with a
        token budget (`max_tokens_per_micro_batch`) solutions packed end to end."""
        pad = self.tokenizer.pad_token_id
        if not self.budget:
            ordered = sorted(items, key=lambda e: len(e.ids)) if by_length else list(items)
            micro = self.spec.role.micro_batch_size
            return ((collate_steps(ordered[i:i + micro], pad), True) for i in range(0, len(ordered), micro))
        groups = fill_bins([len(e.ids) for e in items], self.budget, in_order=not by_length)
        return self.engine.micro_steps([collate_steps([items[i] for i in group], pad) for group in groups], train)

    def _step_logits(self, mb: Batch, real: bool = True) -> torch.Tensor:
        """[b, S] scores at the steps' last tokens (0 past a row's steps)."""
        if self.budget:
            return self._packed_values(mb, "input_ids", mb["step_index"], real)
        seq = trim_padding({"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]})
        return at_steps(self._values(seq), mb["step_index"])

    @dispatch(split={"items": even_items},
              reduce={"grad_norm": "first", **{k: "sum" for k in ("loss", "correct", "steps", "encoded")}})
    def train_step(self, items: list[EncodedSteps], step: PRMStep) -> dict:
        """One optimizer step over this rank's solutions, the loss averaged over the global batch's labelled steps."""
        self.engine.train()
        encoded_before = self.sequences_encoded
        out = {"loss": 0.0, "correct": 0.0, "steps": 0.0}
        for mb, real in self._solution_steps(items):
            res = step_loss(self._step_logits(mb, real), mb["labels"].to(self.device), mb["step_mask"].to(self.device),
                            step.num_steps)
            self.engine.backward_step(res["loss"], real)
            if real:
                out["loss"] += float(res["loss"].detach())
                out["correct"] += float(res["correct"])
                out["steps"] += float(res["steps"])
        return out | {"encoded": self.sequences_encoded - encoded_before, "grad_norm": self.engine.grad_norm()}

    @dispatch(split={"items": padded_items}, reduce="concat")
    def evaluate(self, items: list[EncodedSteps]) -> dict:
        """Per solution, in order: its steps' features [S, 2], the head's value and the running minimum of the reply
        tokens' log-probs under the model's own LM head (`reward.steps.step_features`), from one padded forward."""
        self.engine.eval()
        features: list[torch.Tensor] = []
        with torch.no_grad():
            for mb, real in self._solution_steps(items, train=False, by_length=False):
                ids, mask = mb["input_ids"].to(self.device), mb["attention_mask"].to(self.device)
                values, logits = self.engine.forward(ids, mask, position_ids(mask), logits_at=True)
                found = step_features(values, logits, mb).float().cpu()  # a repeat too: ZeRO-3 runs in lockstep
                if real:
                    features += [row[:int(n)] for row, n in zip(found, mb["step_mask"].sum(1))]
        return {"features": features}

    @dispatch(split={"batch": padded_rows}, reduce="concat")
    def step_scores(self, batch: Experience) -> dict:
        """PPO's process reward: each reply split into steps as this model's prm.json says (`reply_step_mask`),
        {"probs": [b, R] the probability that the reply can still reach the right answer after the step whose last
        token is there (0 elsewhere), "mask": [b, R] 1 at each step's last token}. A step's probability is the one
        `rlhf prm-eval` gives it: the head's value and the LM head's log-probs of the reply, calibrated. Padded
        forwards, of micro_batch_size rows or, with a token budget, of as many rows as it holds."""
        if self.prm is None:
            self.prm = saved_prm(self.spec.model_path) or {}
            self.pieces = Pieces(self.tokenizer)
        separator = self.prm.get("step_separator", STEP_SEPARATOR)
        marks = reply_step_mask(batch["response_ids"], batch["action_mask"], self.pieces, separator,
                                self.tokenizer.convert_tokens_to_ids(EOM))
        calibration = self.prm.get("calibration")

        def forward(mb: Batch) -> torch.Tensor:
            mb = trim_left_padding({k: v.to(self.device) for k, v in mb.items()})
            width = mb["response_ids"].shape[1]
            mask = mb["attention_mask"]
            self.sequences_encoded += int(mask.shape[0])
            rows, length = mask.shape
            before = torch.arange(length - width - 1, length - 1, device=mask.device)  # the positions predicting them
            flat = (torch.arange(rows, device=mask.device)[:, None] * length + before[None, :]).flatten()
            values, logits = self.engine.forward(mb["sequences"], mask, position_ids(mask), logits_at=flat)
            logp = logprobs_from_logits(logits.view(rows, width, -1).float(), mb["response_ids"])
            features = reply_features(values[:, -width:], logp, mb["action_mask"])
            return torch.sigmoid(calibrated(features, calibration)) * mb["step_mask"]
        rows = {**batch, "step_mask": marks}
        probs = self.engine.forward_rows(rows, self.budget, forward) if self.budget else self.each_micro_batch(
            rows, forward)
        return {"probs": probs, "mask": marks}


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
