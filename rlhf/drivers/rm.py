"""`rlhf rm` and `rlhf rm-eval`: the preference model trained from ranked responses (InstructGPT's ranked lists).

Each step takes a global batch of prompts; every response is encoded once, all of a prompt's (better, worse) pairs
are formed from those scores, and the loss is averaged per prompt, then over the global batch's prompts.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

import torch

from reward.batches import EncodedList, encode_file
from reward.strength import weak_pairs_of_file
from rlhf.checkpoint import atomic_write_json
from rlhf.config import RMConfig
from rlhf.drivers.runs import Supervised, backend_for, one_group_plan, open_run, train_supervised
from rlhf.generation import lengths_file
from rlhf.modeling import check_model_dir, load_tokenizer
from rlhf.roles import RankingStep, Trainer


def summarize_eval(out: dict) -> dict:
    """The numbers `rm-eval` prints, from the per-list results of a held-out pass."""
    pairs = sum(out["pairs"])
    margins = torch.cat(out["margins"]) if out["margins"] else torch.zeros(0)
    rewards = torch.cat(out["rewards"]).float()
    return {"pairwise_accuracy": sum(out["correct"]) / max(1, pairs), "pairs": pairs,
            "mean_margin": float(margins.mean()) if len(margins) else 0.0,
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0}


def run_rm(cfg: RMConfig, output: str, resume: bool = False, backend: Optional[Any] = None,
           encoded: Optional[list[EncodedList]] = None, role: str = "reward",
           score: Optional[list[EncodedList]] = None) -> dict:
    """Train a preference model from `cfg.model.path` on `cfg.data.train`; returns the command's summary.

    For an ensemble member (`rlhf rm-strength`): `encoded`, the training lists already encoded (a resample of them);
    `role`, the trained group's name, which its placement group takes (members train side by side under their own);
    `score`, lists the trained group scores before it stops: the summary's `pair_margins` is `[P]` r_better - r_worse
    of their pairs, in order."""
    from actors.scalar import RMWorker  # its reward.model imports transformers

    check_model_dir(cfg.model.path, "--model")
    backend = backend_for(cfg, backend)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code)
    train = encode_file(cfg.data.train, tokenizer, cfg.data, cfg.rm) if encoded is None else encoded
    train, touched = weak_pairs(cfg, train)
    held_out = encode_file(cfg.data.eval, tokenizer, cfg.data, cfg.rm) if cfg.data.eval else []
    plan, spec = one_group_plan(cfg, len(train), "ranked lists")
    lengths = lengths_file(cfg.data.train, tokenizer, cfg.data.format)  # for PPO's max_new_tokens: auto
    # The loop's own throughput (start-up and the final save left out) and the scores PPO normalises with.
    seen = {"pairs": 0, "began": 0.0, "rewards": []}

    def step(trainer: Trainer, lists: list[EncodedList], epoch: int) -> dict:
        seen["began"] = seen["began"] or time.time()
        best_tokens = sum(sum(lst.reply_masks[0][1:]) for lst in lists)
        began = time.time()
        out = trainer.train_step(lists, RankingStep(len(lists), cfg.rm.label_smoothing, cfg.rm.lm_loss_coef,
                                                    best_tokens)).result()
        pairs = int(out["pairs"])  # summed over ranks as floats; a count
        seen["pairs"] += pairs
        seen["rewards"].append(out["rewards"])
        metrics = {"train/loss": out["loss"], "train/accuracy": out["correct"] / pairs,
                   "train/mean_margin": out["margin_sum"] / pairs, "train/reward_mean": float(out["rewards"].mean()),
                   "train/reward_std": float(out["rewards"].std()), "train/grad_norm": out["grad_norm"],
                   "train/pairs_per_s": pairs / (time.time() - began), "train/responses_encoded": out["encoded"],
                   "train/pairs": pairs, "train/responses": sum(len(lst.rows) for lst in lists)}
        return metrics | ({"train/lm_loss": out["lm_loss"]} if cfg.rm.lm_loss_coef else {})

    def evaluate(trainer: Trainer) -> dict:
        return {f"eval/{k}": v for k, v in summarize_eval(trainer.evaluate(held_out).result()).items()}

    def finish(trainer: Trainer, before: dict, after: dict) -> dict:
        seconds = time.time() - seen["began"] if seen["began"] else 0.0  # in-loop evaluations and checkpoints too
        final = {k.removeprefix("eval/"): v for k, v in after.items()}
        # PPO normalises scores with these; held-out statistics when there is a held-out file.
        recent = torch.cat(seen["rewards"][-max(1, plan.steps_per_epoch):]) if seen["rewards"] else torch.zeros(2)
        stats = {"mean": final.get("reward_mean", float(recent.mean())),
                 "std": final.get("reward_std", float(recent.std())) or 1.0}
        if not math.isfinite(stats["std"]) or stats["std"] <= 0:
            stats["std"] = 1.0
        trainer.save_pretrained(run.final, stats, cfg.lora.merge_on_save, lengths).result()
        scored = {}
        if score is not None:  # while the group is up: an ensemble member's scores of every pair
            margins = trainer.evaluate(score).result()["margins"]
            scored["pair_margins"] = torch.cat(margins) if margins else torch.zeros(0)
        return final | {"train_pairs": seen["pairs"], "train_seconds": seconds,
                        "train_pairs_per_s": seen["pairs"] / max(1e-9, seconds), "final": run.final} | touched | scored

    run = open_run(output, cfg, resume)
    if touched and not run.resume_from:
        run.metrics.log(0, {f"train/{k}": v for k, v in touched.items()})
    job = Supervised(role, RMWorker, train, step, evaluate if held_out else None, finish,
                     lambda m: {"loss": f"{m['train/loss']:.3f}", "acc": f"{m['train/accuracy']:.2f}"})
    return train_supervised("rm", cfg, plan, run, backend, spec, job)


def weak_pairs(cfg: RMConfig, train: list[EncodedList]) -> tuple[list[EncodedList], dict]:
    """The training lists under `rm.weak_pairs` (flip, drop or margin by `rm.preference_strength`), and how many
    pairs each rule touched (said once here, logged once at step 0); as they are when no strength file is given."""
    if not cfg.rm.preference_strength:
        if cfg.rm.weak_pairs != "keep":
            raise SystemExit(f"rm.weak_pairs: {cfg.rm.weak_pairs} needs rm.preference_strength, the strength.jsonl "
                             f"that `rlhf rm-strength` writes for {cfg.data.train}")
        return train, {}
    train, touched = weak_pairs_of_file(train, cfg.data.train, cfg.rm, cfg.data.format)
    rule = cfg.rm.weak_pairs
    did = {"keep": "kept as labelled", "flip": f"{touched['pairs_flipped']} flipped",
           "drop": f"{touched['pairs_dropped']} dropped",
           "margin": f"all {touched['pairs_margined']} with their mean strength added to their margin"}[rule]
    emptied = f", {touched['lists_dropped']} lists left without pairs" if touched["lists_dropped"] else ""
    print(f"rm: {cfg.rm.preference_strength}: {touched['pairs_weak']} of {touched['pairs_labelled']} pairs have a "
          f"mean strength below {cfg.rm.flip_below:g}; rm.weak_pairs={rule}: {did}{emptied}", flush=True)
    return train, touched


def run_rm_eval(model_dir: str, data: str, cfg: RMConfig, write_stats: bool = True) -> int:
    """`rlhf rm-eval`: print one JSON line; keep the reward mean/std in the model directory for PPO's
    normalisation. One process, no Ray."""
    from reward.evaluate import evaluate  # imports transformers
    result = evaluate(model_dir, data, cfg)
    if write_stats and os.path.isdir(model_dir):
        atomic_write_json(os.path.join(model_dir, "reward_stats.json"),
                          {"mean": result["reward_mean"], "std": result["reward_std"] or 1.0, "source": data})
    print(json.dumps(result))
    return 0
