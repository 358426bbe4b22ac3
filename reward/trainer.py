"""`rlhf rm`: the preference model trained from ranked responses (InstructGPT's ranked lists) on a Ray role group.

Each step takes a global batch of prompts; every response is encoded once, all of a prompt's (better, worse) pairs
are formed from those scores, and the loss is averaged per prompt, then over the global batch's prompts.
"""
from __future__ import annotations

import math
import time

import torch

from reward.batches import EncodedList, encode_preference, split_for_eval, split_for_ranks
from rlhf.config import Config, gradient_accumulation_steps, ranks, to_dict
from rlhf.data import load_preferences
from rlhf.metrics import Progress
from rlhf.runs import open_run, permutation, save_checkpoint


def encode_file(path: str, tokenizer, cfg: Config) -> list[EncodedList]:
    return [encode_preference(p, tokenizer, cfg.data.max_length, cfg.data.plugin, cfg.rm.margin,
                              cfg.rm.use_record_margin) for p in load_preferences(path)]


def summarize_eval(parts: list[dict]) -> dict:
    """Combine the ranks' held-out results into the numbers `rm-eval` prints."""
    pairs = sum(p["pairs"] for p in parts)
    margins = torch.cat([p["margins"] for p in parts])
    rewards = torch.cat([p["rewards"] for p in parts]).float()
    return {"pairwise_accuracy": sum(p["correct"] for p in parts) / max(1, pairs), "pairs": pairs,
            "mean_margin": float(margins.mean()) if len(margins) else 0.0,
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0}


def run_rm(cfg: Config, model: str, data: str, output: str, resume: bool = False) -> dict:
    import ray
    from actors.group import RoleGroup
    from actors.runtime import ensure_ray
    from actors.worker import ScalarWorker
    from rlhf.modeling import check_model_dir, load_tokenizer

    check_model_dir(model, "--model")
    tokenizer = load_tokenizer(cfg.model.tokenizer or model, cfg.model.trust_remote_code)
    train = encode_file(data, tokenizer, cfg)
    held_out = encode_file(cfg.data.eval, tokenizer, cfg) if cfg.data.eval else []
    world, batch, micro = ranks(cfg.layout), cfg.train.global_batch_size, cfg.train.micro_batch_size
    if len(train) < batch:
        raise SystemExit(f"{data}: {len(train)} ranked lists is fewer than train.global_batch_size ({batch})")
    steps_per_epoch = len(train) // batch
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    run = open_run(output, cfg, resume)
    pad_id = tokenizer.pad_token_id

    started = ensure_ray(cfg.ray, world * cfg.layout.cpus_per_rank)
    group = RoleGroup("reward", ScalarWorker, cfg.layout, {"config": to_dict(cfg)})
    try:
        conf = to_dict(cfg)
        group.run("setup", model, True, conf["deepspeed"], conf["optim"], conf["lora"], micro,
                  gradient_accumulation_steps(batch, micro, world), total)
        start = 0
        if run.resume_from:
            ray.get(group.call("load_checkpoint", run.resume_from))
            from rlhf.checkpoint import read_meta
            start = int(read_meta(run.resume_from)["step"])

        def evaluate() -> dict:
            shares = split_for_eval(held_out, world, micro, pad_id)
            return summarize_eval(ray.get(group.call_each("rm_eval", [(s,) for s in shares])))

        if held_out and start == 0:
            first = evaluate()
            run.metrics.log(0, {f"eval/{k}": v for k, v in first.items()})
        progress = Progress(total, desc="rm", enabled=cfg.logging.progress, initial=start)
        train_rewards: list[torch.Tensor] = []
        trained_pairs, loop_began = 0, time.time()  # the loop's own throughput, startup and final save left out
        for step in range(start, total):
            epoch, index = divmod(step, steps_per_epoch)
            order = permutation(len(train), cfg.seed, epoch)[index * batch:(index + 1) * batch]
            lists = [train[i] for i in order]
            shares = split_for_ranks(lists, world, micro, pad_id)
            best_tokens = sum(sum(lst.reply_masks[0][1:]) for lst in lists)
            began = time.time()
            parts = ray.get(group.call_each("rm_step", [(s,) for s in shares], num_prompts=len(lists),
                                            label_smoothing=cfg.rm.label_smoothing, lm_coef=cfg.rm.lm_loss_coef,
                                            num_best_tokens=best_tokens))
            pairs = sum(p["pairs"] for p in parts)
            trained_pairs += pairs
            rewards = torch.cat([p["rewards"] for p in parts])
            train_rewards.append(rewards)
            metrics = {"train/loss": sum(p["loss"] for p in parts), "train/accuracy": sum(p["correct"] for p in parts) / pairs,
                       "train/mean_margin": sum(p["margin_sum"] for p in parts) / pairs,
                       "train/reward_mean": float(rewards.mean()), "train/reward_std": float(rewards.std()),
                       "train/grad_norm": parts[0]["grad_norm"], "train/pairs_per_s": pairs / (time.time() - began),
                       "train/responses_encoded": sum(p["encoded"] for p in parts), "train/pairs": pairs,
                       "train/responses": sum(len(lst.rows) for lst in lists)}
            if cfg.rm.lm_loss_coef:
                metrics["train/lm_loss"] = sum(p["lm_loss"] for p in parts)
            done = step + 1
            if held_out and cfg.train.eval_every and done % cfg.train.eval_every == 0:
                metrics |= {f"eval/{k}": v for k, v in evaluate().items()}
            if done % cfg.train.log_every == 0 or done == total or "eval/pairwise_accuracy" in metrics:
                run.metrics.log(done, metrics)
            progress.update(1, loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['train/accuracy']:.2f}")
            if cfg.train.save_every and done % cfg.train.save_every == 0 and done < total:
                save_checkpoint(run, [(group, {})], done, {"epoch": epoch})
        progress.close()
        loop_seconds = time.time() - loop_began  # includes any in-loop evaluation and checkpoints
        summary = evaluate() if held_out else {}
        if summary:
            run.metrics.log(total, {f"eval/{k}": v for k, v in summary.items()})
        # PPO normalises scores with these; held-out statistics when there is a held-out file.
        recent = torch.cat(train_rewards[-max(1, steps_per_epoch):]) if train_rewards else torch.zeros(2)
        stats = {"mean": summary.get("reward_mean", float(recent.mean())),
                 "std": summary.get("reward_std", float(recent.std())) or 1.0}
        if not math.isfinite(stats["std"]) or stats["std"] <= 0:
            stats["std"] = 1.0
        save_checkpoint(run, [(group, {})], total, {"epoch": cfg.train.epochs})
        ray.get(group.call("save_pretrained", run.final, stats))
        return summary | {"train_pairs": trained_pairs, "train_seconds": loop_seconds,
                          "train_pairs_per_s": trained_pairs / max(1e-9, loop_seconds), "final": run.final}
    finally:
        run.metrics.close()
        group.shutdown()
        if started:
            ray.shutdown()
