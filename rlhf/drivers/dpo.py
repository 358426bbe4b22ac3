"""`rlhf dpo`: offline preference training of the policy from the ranked lists `rlhf rm` reads (listwise DPO).

The reference (the starting model, frozen: a group of its own, or the LoRA policy's base with its adapters off)
scores every response once before the first step; the log-probs are kept in the output directory, so a resumed or
recovered run does not score them again. Then the policy trains as the preference model does: each step takes a
global batch of ranked lists, every response encoded once (the prompt's pieces tokenized once), and the loss of
`rlhf.dpo_math` over all of a prompt's responses at once. At each held-out evaluation the policy also answers a few
held-out prompts, and the reference scores those answers: the KL to the reference on the policy's own replies.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import torch

from actors.lm import DPOWorker, ReferenceWorker
from reward.batches import EncodedList, encode_file
from rlhf.batching import collate_prompts, experience
from rlhf.checkpoint import atomic_write_json
from rlhf.config import DPOConfig, RewardLossConfig
from rlhf.data import load_preferences
from rlhf.drivers.runs import RunDir, Supervised, backend_for, one_group_plan, open_run, train_supervised
from rlhf.generation import fit_generation_cap, lengths_file
from rlhf.modeling import check_model_dir, load_tokenizer
from rlhf.moss import tokenize_prompt
from rlhf.roles import DPOStep, Policy, Reference, Trainer

REFERENCE_FILE = "reference_logprobs.json"


def summarize_eval(out: dict) -> dict:
    """Held-out numbers from the per-list results: the implicit reward's pairwise accuracy (as `rm-eval` reports a
    preference model's), its mean margin, and the better and worse responses' mean log-probs (both falling is
    DPO's known failure)."""
    pairs = sum(out["pairs"])
    cat = lambda key: torch.cat(out[key]) if out[key] else torch.zeros(0)  # noqa: E731
    margins, better, worse = cat("margins"), cat("better_logps"), cat("worse_logps")
    mean = lambda t: float(t.mean()) if len(t) else 0.0  # noqa: E731
    return {"pairwise_accuracy": sum(out["correct"]) / max(1, pairs), "pairs": pairs, "mean_margin": mean(margins),
            "better_logp": mean(better), "worse_logp": mean(worse)}


def _cached(path: str, splits: dict[str, list[EncodedList]]) -> Optional[dict]:
    """The reference log-probs an earlier attempt of this run wrote, if they fit these lists."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        cached = json.load(f)
    fits = all(len(cached.get(name, [])) == len(lists) and
               all(len(lp) == len(lst.rows) for lp, lst in zip(cached[name], lists)) for name, lists in splits.items())
    return cached if fits else None


def score_with_reference(run: RunDir, reference: Reference, splits: dict[str, list[EncodedList]]) -> int:
    """Attach the reference's log-probs to every list (scored once, or read back); returns the responses scored."""
    path = os.path.join(run.root, REFERENCE_FILE)
    cached = _cached(path, splits)
    encoded = 0
    if cached is None:
        out = reference.reply_logprobs([lst for lists in splits.values() for lst in lists]).result()
        encoded, logps, cached = out["encoded"], iter(out["logps"]), {}
        for name, lists in splits.items():
            cached[name] = [next(logps) for _ in lists]
        atomic_write_json(path, cached)
    for name, lists in splits.items():
        for lst, logps in zip(lists, cached[name]):
            lst.ref_logps = logps
    return encoded


def run_dpo(cfg: DPOConfig, output: str, resume: bool = False, backend: Optional[Any] = None) -> dict:
    """Train the policy `cfg.model.path` by DPO on the ranked lists of `cfg.data.train`; returns the summary."""
    check_model_dir(cfg.model.path, "--model")
    backend = backend_for(cfg, backend)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code)
    no_margin = RewardLossConfig(use_record_margin=False)
    train = encode_file(cfg.data.train, tokenizer, cfg.data, no_margin)
    held_out = encode_file(cfg.data.eval, tokenizer, cfg.data, no_margin) if cfg.data.eval else []
    # The held-out prompts the policy answers for its KL to the reference, and how long it may answer.
    kl_prompts = collate_prompts([tokenize_prompt(p.prompt, tokenizer, cfg.data.max_length, cfg.data.plugin) for p in
                                  load_preferences(cfg.data.eval, cfg.data.format)[:cfg.dpo.kl_prompts]],
                                 tokenizer.pad_token_id) if cfg.data.eval and cfg.dpo.kl_prompts else None
    cfg.generation = fit_generation_cap(cfg.generation, tokenizer, cfg.generation.lengths_from, "dpo", cfg.data.format,
                                        models=(cfg.model.path,), fallback=cfg.data.train)
    plan, spec = one_group_plan(cfg, len(train), "ranked lists")
    spec = dataclasses.replace(spec, temperature=cfg.generation.temperature)  # the held-out KL's replies' distribution
    lengths = lengths_file(cfg.data.train, tokenizer, cfg.data.format)  # for a later run's max_new_tokens: auto
    # The reference is the starting model, frozen: no optimizer, no LoRA (a LoRA policy's base is that model).
    reference = dataclasses.replace(spec, role=spec.role.frozen(), trainable=False, grad_accum=1, total_steps=1)
    run = open_run(output, cfg, resume)
    dpo = DPORun(cfg, run, train, held_out, kl_prompts, lengths)
    others = {"reference": (ReferenceWorker, reference)} if "reference" in cfg.groups() else {}
    job = Supervised("policy", DPOWorker, train, dpo.step, dpo.evaluate if held_out else None, dpo.finish,
                     lambda m: {"loss": f"{m['train/loss']:.3f}", "acc": f"{m['train/accuracy']:.2f}"}, others,
                     dpo.started)
    return train_supervised("dpo", cfg, plan, run, backend, spec, job)


class DPORun:
    """What a DPO run adds to the shared loop (`train_supervised`): the reference's pass over every response, the
    step on ranked lists, the held-out evaluation (implicit-reward accuracy and the KL to the reference on the
    policy's own replies), and what it counts for the summary."""

    def __init__(self, cfg: DPOConfig, run: Any, train: list[EncodedList], held_out: list[EncodedList],
                 kl_prompts: Optional[dict], lengths: dict):
        self.cfg, self.run, self.train, self.held_out, self.kl_prompts, self.lengths = (
            cfg, run, train, held_out, kl_prompts, lengths)
        self.pairs = 0
        """Pairs trained on, in all."""
        self.began = 0.0
        """When the first step began (the summary's train_seconds)."""
        self.scored = 0
        """Responses the reference scored (once per run, cached across restarts)."""
        self.policy: Any = None
        self.reference: Any = None

    def started(self, groups: Any) -> None:
        """The roles of this start of the groups, and the reference's log-probs of every response (once per run)."""
        policy = groups.groups["policy"]
        self.policy = Policy(policy)
        self.reference = Reference(groups.groups["reference"]) if "reference" in groups.groups else \
            Reference(policy, adapters_off=True)
        self.scored += score_with_reference(self.run, self.reference, {"train": self.train, "eval": self.held_out})

    def step(self, trainer: Trainer, lists: list[EncodedList], epoch: int) -> dict:
        self.began = self.began or time.time()
        began = time.time()
        d = self.cfg.dpo
        out = trainer.train_step(lists, DPOStep(len(lists), d.beta, d.loss, d.label_smoothing)).result()
        pairs = max(1, out["pairs"])
        self.pairs += int(out["pairs"])  # summed over ranks as floats; a count
        return {"train/loss": out["loss"], "train/accuracy": out["correct"] / pairs,
                "train/mean_margin": out["margin_sum"] / pairs, "train/better_logp": out["better_logp_sum"] / pairs,
                "train/worse_logp": out["worse_logp_sum"] / pairs, "train/grad_norm": out["grad_norm"],
                "train/lr": out["lr"], "train/pairs_per_s": out["pairs"] / (time.time() - began),
                "train/responses_encoded": out["encoded"], "train/epoch": epoch}

    def evaluate(self, trainer: Trainer) -> dict:
        out = {f"eval/{k}": v for k, v in
               summarize_eval(trainer.evaluate(self.held_out, self.cfg.dpo.beta).result()).items()}
        if self.kl_prompts is None:
            return out
        exp = experience(self.kl_prompts, self.policy.generate(self.kl_prompts, self.cfg.generation).result())
        policy, reference = self.policy.logprobs(exp), self.reference.logprobs(exp)
        mask = exp["action_mask"].float()
        ratio = ((policy.result() - reference.result()) * mask).sum(1)  # [b] log pi/pi_ref of each reply
        return out | {"eval/kl": float(ratio.mean()), "eval/response_length": float(mask.sum(1).mean())}

    def finish(self, trainer: Trainer, before: dict, after: dict) -> dict:
        seconds = time.time() - self.began if self.began else 0.0
        trainer.save_pretrained(self.run.final, self.cfg.lora.merge_on_save, self.lengths).result()
        start = {f"{k.removeprefix('eval/')}_start": v for k, v in before.items()}
        return start | {k.removeprefix("eval/"): v for k, v in after.items()} | {
            "train_pairs": self.pairs, "train_seconds": seconds, "reference_responses_scored": self.scored,
            "final": self.run.final}
