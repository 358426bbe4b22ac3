"""The causal-LM roles: the policy (generate, log-probs, PPO updates), the reference, and the SFT trainer.

Losses come from the pure functions of `rlhf.ppo_math`; each is a share of the global batch's token mean (see
`actors.engine`). Forward passes drop the columns that are padding in every row of a micro-batch and keep only the
reply's logits, so a micro-batch of short rows costs what its rows need. With a token budget
(`max_tokens_per_micro_batch`) micro-batches are rows packed end to end without padding (`rlhf.batching.Packing`),
and only the positions a loss reads reach the LM head; every per-token number is the padded path's.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch

from actors.dispatch import dispatch, even_items, even_rows, padded_items, padded_rows, update_plan
from actors.engine import (check_packable, deepspeed_config, load_partitioned, partitioned_construction, peak_rss_gb,
                           say_unloaded)
from actors.inference import as_dict
from actors.rank import RankWorker
from actors.weight_sync import manifest_of, send, sync_group, trainer_sources
from rlhf.batching import (Batch, Packing, chunk, fill_bins, micro_batches, position_ids, select, trim_left_padding,
                           trim_padding)
from rlhf.dpo_math import dpo_loss
from rlhf.generation import rollout_replies
from rlhf.modeling import apply_lora_config, build_causal_lm, load_causal_lm, save_pretrained_atomic
from rlhf.ppo_math import (entropy_from_logits, kl_loss, logprobs_from_logits, masked_sum, policy_loss,
                           truncated_is_weights)
from rlhf.roles import DPOStep, PolicyLoss, UpdatePlan


class CausalLMWorker(RankWorker):
    """What the three LM roles share: the model, its LoRA adapters, and log-probs of token spans."""

    def build(self) -> torch.nn.Module:
        spec = self.spec
        dtype = str(self.dtype()).removeprefix("torch.")
        self.loaded = {"partitioned": spec.role.deepspeed.zero_stage == 3}
        if self.loaded["partitioned"]:  # built partitioned; each rank reads only its share of every weight
            config = deepspeed_config(spec.role, spec.trainable, spec.grad_accum, self.world_size, self.device,
                                      self.dtype())
            model = build_causal_lm(spec.model_path, dtype, spec.model.trust_remote_code,
                                    partitioned_construction(config))
            unused, missing, read = load_partitioned(model, spec.model_path)
            say_unloaded(spec.model_path, model, unused, missing)
            self.loaded |= {"elements_read": read, "elements": sum(p.ds_numel for p in model.parameters())}
        else:
            # Load straight into the run's dtype: a 16B model in float32 would need 64 GB of host memory per rank.
            model = load_causal_lm(spec.model_path, dtype, spec.model.trust_remote_code)
        if spec.model.gradient_checkpointing and spec.trainable:
            model.gradient_checkpointing_enable()
        self.lora = spec.trainable and spec.role.lora.enabled
        if self.lora:
            model = apply_lora_config(model, spec.role.lora)
        base = model.get_base_model() if self.lora else model
        # transformers' own models keep only the reply's logits when asked; a checkpoint's remote code may not.
        self.keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.eom_id = self.tokenizer.convert_tokens_to_ids("<eom>")
        self.sequences_encoded = 0  # ranked-list responses encoded (DPO counts its reference passes with it)
        self.budget = spec.role.max_tokens_per_micro_batch
        if self.budget:
            check_packable(base.config, spec.model_path)
        self.lm_head = base.get_output_embeddings()
        self.tools = None
        if spec.plugins is not None:  # a plugin policy runs its commands in this process, between passes
            from rlhf.tools import build_registry  # imports sympy
            p = spec.plugins
            self.tools = build_registry(p.tools, p.solver, p.timeout)
        self.loaded["peak_rss_gb"] = peak_rss_gb()
        return model

    def _sample(self, prompts: Batch, generation: Any, synced: bool = False, with_logprobs: bool = False) -> Batch:
        """Replies to left-padded prompts, stopping at <eom>, right-padded to a fixed width; a plugin policy writes
        its turn in two passes around the tools' Results (see rlhf.generation). Returns response_ids, action_mask
        (what the model wrote), response_mask (what later passes attend to) [b, R] and ended [b] (and each row's
        commands and results for a plugin policy; with `with_logprobs`, the log-prob of each token it wrote)."""
        return rollout_replies(self.engine.module, self.tokenizer, prompts, as_dict(generation), self.tools,
                               self.device, synced=synced, micro_batch=len(prompts["input_ids"]),
                               max_results_tokens=self.spec.plugins.max_results_tokens if self.tools else 64,
                               with_logprobs=with_logprobs)

    @dispatch(reduce="concat")
    def load_report(self) -> list[dict]:
        """How each rank loaded its weights: partitioned (ZeRO-3, and then how many elements it read of how many),
        and its process's peak resident set once the model was built (before its DeepSpeed engine)."""
        return [self.loaded]

    # --- packed forward passes (a token budget): rows end to end, no padding --------------------------------------
    def _packed_logits(self, pk: Packing, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Float32 logits [k, V] at the flat packed positions `keep`: only those reach the LM head, so the other
        positions never make vocabulary-sized logits."""
        keep = keep.to(self.device)
        hook = self.lm_head.register_forward_pre_hook(
            lambda _, args: (args[0].flatten(0, -2)[keep].unsqueeze(0), *args[1:]))
        try:
            out = self.engine.forward(input_ids=pk.pack(input_ids, self.tokenizer.pad_token_id).to(self.device),
                                      attention_mask=pk.attention_mask(self.dtype()).to(self.device),
                                      position_ids=pk.position_ids.to(self.device), use_cache=False)
        finally:
            hook.remove()
        return out.logits[0].float()

    def _packed_token_logprobs(self, mb: Batch, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs [k] of the tokens where `mask` [b, T] is 1 (each sequence's first left out: nothing predicts
        it), and the row of the batch each belongs to."""
        pk = Packing(mb["attention_mask"])
        predict, target, row = pk.targets(mask)
        logits = self._packed_logits(pk, mb["input_ids"], predict)
        labels = pk.pack(mb["input_ids"]).view(-1)[target].to(self.device)
        return logprobs_from_logits(logits.unsqueeze(0), labels.unsqueeze(0))[0], row.to(self.device)

    def _packed_response_logprobs(self, mb: Batch, with_entropy: bool = False):
        """`_response_logprobs` of a packed micro-batch: [b, R], 0 where a row has no reply token."""
        rows, width = mb["response_ids"].shape
        pk = Packing(mb["attention_mask"])
        end = mb["sequences"].shape[1]
        before = torch.arange(end - width - 1, end - 1).expand(rows, -1)  # the columns that predict each reply token
        flat, ok = pk.locate(before)
        ok = ok & pk.locate(before + 1)[1]
        logits = self._packed_logits(pk, mb["sequences"], flat[ok]) / self.spec.temperature
        ok = ok.to(self.device)
        logp = torch.zeros(rows, width, device=self.device)
        logp[ok] = logprobs_from_logits(logits.unsqueeze(0), mb["response_ids"].to(self.device)[ok].unsqueeze(0))[0]
        if not with_entropy:
            return logp, None
        entropy = torch.zeros(rows, width, device=self.device)
        entropy[ok] = entropy_from_logits(logits.unsqueeze(0))[0]
        return logp, entropy

    def _logits(self, mb: Batch, keep: int = 0) -> torch.Tensor:
        """Float32 logits [b, T, V]; with `keep`, only the last `keep` positions'."""
        mb = {k: v.to(self.device) for k, v in mb.items()}
        extra = {"logits_to_keep": keep} if keep and self.keeps_logits else {}
        out = self.engine.forward(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                                  position_ids=position_ids(mb["attention_mask"]), use_cache=False, **extra)
        return out.logits[:, -keep:].float() if keep else out.logits.float()

    def _response_logprobs(self, mb: Batch, with_entropy: bool = False):
        """Log-probs [b, R] of the reply tokens of an experience micro-batch (sequences = prompt + reply), and their
        entropy: of the distribution the replies were sampled from, the logits over the run's temperature."""
        if self.budget:
            return self._packed_response_logprobs(mb, with_entropy)
        width = mb["response_ids"].shape[1]
        mb = trim_left_padding(mb)
        logits = self._logits({"input_ids": mb["sequences"], "attention_mask": mb["attention_mask"]}, keep=width + 1)
        logits = logits[:, :-1] / self.spec.temperature
        logp = logprobs_from_logits(logits, mb["response_ids"].to(self.device))
        return (logp, entropy_from_logits(logits)) if with_entropy else (logp, None)

    def _logprobs(self, batch: Batch, adapters_off: bool = False) -> torch.Tensor:
        off = self.engine.module.disable_adapter() if adapters_off and self.lora else contextlib.nullcontext()
        with off:
            if self.budget:
                return self.engine.forward_rows(batch, self.budget, lambda mb: self._response_logprobs(mb)[0])
            return self.each_micro_batch(batch, lambda mb: self._response_logprobs(mb)[0])

    def _reply_logps(self, mb: Batch, real: bool = True) -> torch.Tensor:
        """[b] summed log-probs of each row's last reply, in a right-padded ranked-list micro-batch (a pass that is
        not `real` only keeps the ranks' pass counts equal, and is not counted)."""
        self.sequences_encoded += int(mb["input_ids"].shape[0]) if real else 0
        if self.budget:
            logp, row = self._packed_token_logprobs(mb, mb["reply_mask"])
            return torch.zeros(len(mb["input_ids"]), device=self.device).index_add(0, row, logp)
        mb = trim_padding(mb, ("input_ids", "attention_mask", "reply_mask"))
        logits = self._logits({"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]})
        logp = logprobs_from_logits(logits[:, :-1], mb["input_ids"][:, 1:].to(self.device))
        return (logp * mb["reply_mask"][:, 1:].to(self.device).float()).sum(1)

    def _lists_logps(self, lists: list, adapters_off: bool = False) -> list[list[float]]:
        """Each ranked list's summed log-probs of its responses' last replies, without gradients."""
        self.engine.eval()
        off = self.engine.module.disable_adapter() if adapters_off and self.lora else contextlib.nullcontext()
        logps: list[list[float]] = []
        with off, torch.no_grad():
            for (mb, part), real in self._list_steps(lists, train=False, by_length=False):
                values = self._reply_logps(mb, real).float().cpu().tolist()
                for lst in part if real else ():
                    logps.append(values[:len(lst.rows)])
                    values = values[len(lst.rows):]
        return logps

    @dispatch(split={"lists": padded_items}, reduce={"logps": "concat", "encoded": "sum"})
    def reply_logprobs(self, lists: list, adapters_off: bool = False) -> dict:
        """DPO's reference pass: each ranked list's summed log-probs of its responses' last replies (with
        adapters_off, the LoRA policy's base), and how many sequences this rank encoded for them."""
        before = self.sequences_encoded
        return {"logps": self._lists_logps(lists, adapters_off), "encoded": self.sequences_encoded - before}

    def _lm_loss_sum(self, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed token loss over the loss mask of a right-padded micro-batch, and its token count."""
        if self.budget:
            logp, _ = self._packed_token_logprobs(mb, mb["loss_mask"])
            return -logp.sum(), torch.tensor(float(len(logp)))
        logits = self._logits(mb)
        labels = mb["input_ids"][:, 1:].to(self.device)
        mask = mb["loss_mask"][:, 1:].to(self.device).float()
        logp = logprobs_from_logits(logits[:, :-1], labels)
        return -(logp * mask).sum(), mask.sum()

    @dispatch(reduce="first")
    def save_pretrained(self, out_dir: str, merge_lora: bool = True, extra_files: dict | None = None) -> None:
        """All ranks call this (ZeRO-3 gathers); rank 0 writes an HF directory atomically, with `extra_files`
        (name -> text) beside the weights."""
        self.engine.write_on_rank0(self.rank, lambda: save_pretrained_atomic(
            self.engine.module, self.tokenizer, out_dir, merge_lora=merge_lora, extra_files=extra_files))


class PolicyWorker(CausalLMWorker):
    """A policy rank: it samples the rollouts, scores them with its own log-probs (and, with LoRA, its base's as
    the reference), and takes the PPO updates."""

    @dispatch(split={"prompts": padded_rows}, reduce="concat")
    def generate(self, prompts: Batch, generation: Any) -> Batch:
        """Sample replies to left-padded prompts with the training weights (no rollout group): see `_sample`."""
        zero3 = self.engine.partitioned
        gather = zero3 and self.spec.role.deepspeed.gather_for_generation
        with self.engine.gathered(gather):
            return self._sample(prompts, generation, synced=zero3 and not gather)  # synced: ranks gather layer by layer

    # --- weight sync to a rollout group (actors.weight_sync) ----------------------------------------------------
    @dispatch(reduce="first")
    def weight_manifest(self) -> list:
        """(name, shape, dtype) of what a sync sends: the plain model's parameters, LoRA merged in."""
        return manifest_of(trainer_sources(self.engine.module))

    @dispatch(reduce="first")
    def weight_sync_endpoint(self, loopback: bool) -> tuple[str, int]:
        return self.master_endpoint(loopback)

    @dispatch(reduce="first")
    def join_weight_sync(self, addr: str, port: int, world: int) -> None:
        """Rank 0 joins the sync group as its rank 0 (the other ranks only gather with it under ZeRO-3)."""
        import ray
        self.sync = sync_group(addr, port, 0, world, self.cuda, ray.util.get_node_ip_address()) \
            if self.rank == 0 else None

    @dispatch(reduce="first")
    def send_weights(self, bucket_mb: float) -> None:
        """Every rank calls this; rank 0 broadcasts the current weights to the rollout ranks, bucket by bucket."""
        send(self.sync, trainer_sources(self.engine.module), bucket_mb, self.engine.partitioned, self.device)

    @dispatch(split={"batch": padded_rows}, reduce="concat")
    def logprobs(self, batch: Batch) -> torch.Tensor:
        """[b, R] log-probs of the sampled replies under the current weights."""
        return self._logprobs(batch)

    @dispatch(split={"batch": padded_rows}, reduce="concat")
    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """The policy's base with its LoRA adapters switched off serves as the reference (no second copy)."""
        return self._logprobs(batch, adapters_off=True)

    @dispatch(split={"plan": update_plan},
              reduce={"grad_norm": "mean", "logprobs": "concat", **{k: "sum" for k in (
                  "pg_loss", "clipfrac", "approx_kl", "log_ratio_clipfrac", "entropy", "ptx_loss", "kl_loss", "nonfinite")}})
    def update(self, plan: UpdatePlan, loss: PolicyLoss) -> dict:
        """One optimizer step per minibatch of the plan (this rank's rows of each): the clipped surrogate, plus
        kl_coef x k3 KL to `ref_logprobs` (GRPO, RLOO), an entropy bonus and the PPO-ptx LM loss where asked.
        A minibatch without `old_logprobs` is on-policy (sampled by these weights): the ratio's denominator is this
        forward's own detached log-probs, which come back as `logprobs` [b, R]. Stats are this rank's shares,
        averaged over the steps."""
        self.engine.train()
        micro = self.spec.role.micro_batch_size
        sums = {"pg_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "log_ratio_clipfrac": 0.0, "entropy": 0.0,
                "ptx_loss": 0.0, "grad_norm": 0.0}
        if loss.kl_coef:
            sums["kl_loss"] = 0.0
        fresh: list[torch.Tensor] = []
        for step, (batch, num_tokens) in enumerate(zip(plan.steps, plan.tokens)):
            ptx = plan.ptx[step] if plan.ptx is not None and loss.ptx_coef > 0 else None  # this rank's SFT rows
            if self.budget:
                ptx_tokens = plan.ptx_tokens[step] if ptx is not None else 0
                fresh += self._packed_update_step(batch, num_tokens, ptx, ptx_tokens, loss, sums)
                sums["grad_norm"] += self.engine.grad_norm()
                continue
            n_micro = max(1, len(batch["response_ids"]) // micro)
            ptx_parts = None if ptx is None else [chunk(ptx, i, n_micro) for i in range(n_micro)]  # one per micro-batch
            for i, mb in enumerate(micro_batches(batch, micro)):
                total, logp = self._policy_loss(mb, num_tokens, loss, sums)
                if "old_logprobs" not in mb:
                    fresh.append(logp)
                if ptx_parts is not None:
                    total = total + self._ptx_loss(ptx_parts[i], plan.ptx_tokens[step], loss, sums)
                self.engine.backward_step(total)
            sums["grad_norm"] += self.engine.grad_norm()
        steps = max(1, len(plan.steps))
        out: dict[str, Any] = {k: v / steps for k, v in sums.items()}
        out["nonfinite"] = self.engine.take_nonfinite()
        if fresh:
            out["logprobs"] = torch.cat(fresh)
        return out

    def _packed_update_step(self, batch: Batch, num_tokens: int, ptx: Batch | None, ptx_tokens: int,
                            loss: PolicyLoss, sums: dict) -> list[torch.Tensor]:
        """One optimizer step in token-budget micro-batches: the minibatch's rows, then the PPO-ptx rows in micro-
        batches of their own (the gradient is a sum, so where each term is computed does not change it). Returns
        the on-policy log-probs [b, R] of the minibatch's rows, in their order, when it has no old ones."""
        parts = [("policy", group, select(batch, torch.tensor(group)))
                 for group in fill_bins(batch["attention_mask"].sum(1).tolist(), self.budget)]
        if ptx is not None:
            parts += [("ptx", group, select(ptx, torch.tensor(group)))
                      for group in fill_bins(ptx["attention_mask"].sum(1).tolist(), self.budget)]
        fresh = torch.zeros(batch["response_ids"].shape)
        for (kind, group, mb), real in self.engine.micro_steps(parts):
            stats = sums if real else dict.fromkeys(sums, 0.0)  # a repeat counts for nothing
            if kind == "policy":
                total, logp = self._policy_loss(mb, num_tokens, loss, stats)
                if real:
                    fresh[group] = logp
            else:
                total = self._ptx_loss(mb, ptx_tokens, loss, stats)
            self.engine.backward_step(total, real)
        return [] if "old_logprobs" in batch else [fresh]

    def _policy_loss(self, mb: Batch, num_tokens: int, loss: PolicyLoss,
                     sums: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch's share of the policy loss (clipped surrogate, entropy bonus, k3 KL), its stats added to
        `sums`; and its detached log-probs [b, R] on the CPU (the on-policy old ones when it has none)."""
        mask = mb["action_mask"].to(self.device).float()
        logp, entropy = self._response_logprobs(mb, with_entropy=True)
        old = mb["old_logprobs"].to(self.device) if "old_logprobs" in mb else logp.detach()
        weights = None
        if "behaviour_logprobs" in mb:  # sampled by the rollout engine: correct for its weights and numbers
            weights = truncated_is_weights(old, mb["behaviour_logprobs"].to(self.device), loss.tis_cap)
        total, stats = policy_loss(logp, old, mb["advantages"].to(self.device), mask, loss.clip_eps,
                                   num_tokens=num_tokens, dual_clip=loss.dual_clip, log_ratio_clip=loss.log_ratio_clip,
                                   is_weights=weights)
        share = float(mask.sum()) / num_tokens
        sums["pg_loss"] += float(total.detach())
        for key in ("clipfrac", "approx_kl", "log_ratio_clipfrac"):
            sums[key] += float(stats[key]) * share
        ent = masked_sum(entropy, mask) / num_tokens
        sums["entropy"] += float(ent.detach())
        if loss.entropy_coef:
            total = total - loss.entropy_coef * ent
        if loss.kl_coef:
            kl, _ = kl_loss(logp, mb["ref_logprobs"].to(self.device), mask, num_tokens, loss.kl_clip)
            sums["kl_loss"] += float(kl.detach())
            total = total + loss.kl_coef * kl
        return total, logp.detach().cpu()

    def _ptx_loss(self, rows: Batch, ptx_tokens: int, loss: PolicyLoss, sums: dict) -> torch.Tensor:
        """PPO-ptx: ptx_coef x the LM loss of SFT rows, over the minibatch's ptx tokens; its value added to `sums`."""
        ptx_sum, _ = self._lm_loss_sum(trim_padding(rows))
        ptx_loss = ptx_sum / max(1, ptx_tokens)
        sums["ptx_loss"] += float(ptx_loss.detach())
        return loss.ptx_coef * ptx_loss


class ReferenceWorker(CausalLMWorker):
    """A frozen copy of the starting policy: the KL penalty's other side."""

    @dispatch(split={"batch": padded_rows}, reduce="concat")
    def logprobs(self, batch: Batch) -> torch.Tensor:
        """[b, R] the reference's log-probs of the sampled replies."""
        return self._logprobs(batch)


class SFTWorker(CausalLMWorker):
    """An SFT rank: the LM loss over what the model writes (Inner Thoughts, Commands, MOSS replies)."""

    @dispatch(split={"batch": even_rows}, reduce={"loss_sum": "sum", "grad_norm": "first", "lr": "first"})
    def train_step(self, batch: Batch, num_tokens: int) -> dict:
        """One optimizer step over this rank's rows; the loss is the mean over the global batch's tokens."""
        self.engine.train()
        total = 0.0
        for mb, real in self.engine.micro_batches(batch, self.spec.role.micro_batch_size, self.budget):
            loss_sum, _ = self._lm_loss_sum(trim_padding(mb))
            self.engine.backward_step(loss_sum / num_tokens, real)
            total += float(loss_sum.detach()) if real else 0.0
        return {"loss_sum": total, "grad_norm": self.engine.grad_norm(), "lr": self.engine.lr()}

    @dispatch(split={"batch": padded_rows}, reduce="concat")
    def evaluate(self, batch: Batch) -> dict:
        """Per row: summed token loss and token count (no update)."""
        if self.budget:
            def per_row(mb: Batch) -> torch.Tensor:
                logp, row = self._packed_token_logprobs(mb, mb["loss_mask"])
                rows = len(mb["input_ids"])
                return torch.stack([torch.zeros(rows, device=self.device).index_add(0, row, -logp),
                                    torch.zeros(rows, device=self.device).index_add(0, row, torch.ones_like(logp))], 1)
            out = self.engine.forward_rows(batch, self.budget, per_row)
            return {"loss_sum": out[:, 0], "tokens": out[:, 1]}
        self.engine.eval()
        losses, tokens = [], []
        with torch.no_grad():
            for mb in micro_batches(batch, self.spec.role.micro_batch_size):
                mb = trim_padding(mb)
                logits = self._logits(mb)
                mask = mb["loss_mask"][:, 1:].to(self.device).float()
                logp = logprobs_from_logits(logits[:, :-1], mb["input_ids"][:, 1:].to(self.device))
                losses.append(-(logp * mask).sum(1).cpu())
                tokens.append(mask.sum(1).cpu())
        return {"loss_sum": torch.cat(losses), "tokens": torch.cat(tokens)}


TIE = 1e-4
"""|implicit reward margin| at or below this is a tie: far below any margin training makes (beta x nats), far above
the float noise of scoring one pair in two passes."""


class DPOWorker(PolicyWorker):
    """A DPO rank: whole ranked lists, each response encoded once per step, the listwise (Plackett-Luce), pairwise
    or IPO loss on the implicit rewards against the reference log-probs the lists carry (`rlhf.dpo_math`)."""

    @dispatch(split={"lists": even_items}, reduce={"grad_norm": "first", "lr": "first", **{k: "sum" for k in (
        "loss", "correct", "pairs", "margin_sum", "better_logp_sum", "worse_logp_sum", "encoded")}})
    def train_step(self, lists: list, step: DPOStep) -> dict:
        """One optimizer step over this rank's lists, the loss summed over them and divided by the global batch's
        prompt count. Stats are sums over pairs (the log-prob sums over each pair's better and worse response)."""
        self.engine.train()
        before = self.sequences_encoded
        out = dict.fromkeys(("loss", "correct", "pairs", "margin_sum", "better_logp_sum", "worse_logp_sum"), 0.0)
        for (mb, _), real in self._list_steps(lists):
            logps = self._reply_logps(mb, real)
            pairs = mb["pairs"].to(self.device)
            res = dpo_loss(logps, mb["ref_logps"].to(self.device), pairs, mb["pair_prompt"].to(self.device),
                           mb["row_prompt"].to(self.device), step.beta, step.loss, step.label_smoothing,
                           num_prompts=step.num_prompts, reply_tokens=mb["reply_mask"][:, 1:].sum(1).to(self.device))
            self.engine.backward_step(res["loss"], real)
            if not real:
                continue
            n = res["num_pairs"]
            out["loss"] += float(res["loss"].detach())
            out["pairs"] += n
            out["correct"] += res["accuracy"] * n
            out["margin_sum"] += res["margin"] * n
            detached = logps.detach()
            out["better_logp_sum"] += float(detached[pairs[:, 0]].sum())
            out["worse_logp_sum"] += float(detached[pairs[:, 1]].sum())
        return out | {"encoded": self.sequences_encoded - before, "grad_norm": self.engine.grad_norm(),
                      "lr": self.engine.lr()}

    @dispatch(split={"lists": padded_items}, reduce="concat")
    def evaluate(self, lists: list, beta: float) -> dict:
        """Per ranked list: pairs whose better response has the higher implicit reward, pairs, the pairs' implicit
        margins, and the better and worse responses' log-probs (no update)."""
        self.engine.eval()
        out: dict[str, list] = {"correct": [], "pairs": [], "margins": [], "better_logps": [], "worse_logps": []}
        with torch.no_grad():
            for lst, logps in zip(lists, self._lists_logps(lists)):
                policy, ref = torch.tensor(logps), torch.tensor(lst.ref_logps)
                rewards = beta * (policy - ref)
                pairs = torch.tensor(lst.pairs, dtype=torch.long).view(-1, 2)
                diff = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]
                # A pair the policy does not separate from the reference's view (the policy at the start, float noise
                # of separate passes) is a tie, half right, as a coin would be: not a loss.
                tied = diff.abs() <= TIE
                out["correct"].append(float((diff > TIE).sum() + 0.5 * tied.sum()))
                out["pairs"].append(len(diff))
                out["margins"].append(diff)
                out["better_logps"].append(policy[pairs[:, 0]])
                out["worse_logps"].append(policy[pairs[:, 1]])
        return out
