"""`rlhf sft`: supervised fine-tuning on MOSS dialogues, loss only on what the model writes, on a Ray role group."""
from __future__ import annotations

import os
import time

from rlhf.batching import collate_sft, pad_rows
from rlhf.config import Config, gradient_accumulation_steps, ranks, to_dict
from rlhf.data import load_dialogues
from rlhf.metrics import Progress
from rlhf.moss import tokenize_dialogue
from rlhf.runs import open_run, permutation, save_checkpoint


def encode_dialogues(path: str, tokenizer, cfg: Config) -> list[dict]:
    return [tokenize_dialogue(d, tokenizer, cfg.data.max_length, cfg.data.plugin) for d in load_dialogues(path)]


def run_sft(cfg: Config, model: str, data: str, output: str, resume: bool = False) -> dict:
    import ray
    from actors.group import RoleGroup
    from actors.runtime import ensure_ray
    from actors.worker import LMWorker
    from rlhf.modeling import load_tokenizer

    # Everything that can be wrong with the input is found before any actor starts.
    from rlhf.modeling import check_model_dir
    check_model_dir(model, "--model")
    tokenizer = load_tokenizer(cfg.model.tokenizer or model, cfg.model.trust_remote_code)
    train = encode_dialogues(data, tokenizer, cfg)
    held_out = encode_dialogues(cfg.data.eval, tokenizer, cfg) if cfg.data.eval else []
    world = ranks(cfg.layout)
    batch = cfg.train.global_batch_size
    if len(train) < batch:
        raise SystemExit(f"{data}: {len(train)} dialogues is fewer than train.global_batch_size ({batch})")
    steps_per_epoch = len(train) // batch
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    run = open_run(output, cfg, resume)

    started = ensure_ray(cfg.ray, world * cfg.layout.cpus_per_rank)
    group = RoleGroup("sft", LMWorker, cfg.layout, {"config": to_dict(cfg)})
    try:
        grad_accum = gradient_accumulation_steps(batch, cfg.train.micro_batch_size, world)
        group.run("setup", model, True, to_dict(cfg)["deepspeed"], to_dict(cfg)["optim"], to_dict(cfg)["lora"],
                  cfg.train.micro_batch_size, grad_accum, total)
        start = 0
        if run.resume_from:
            ray.get(group.call("load_checkpoint", run.resume_from))
            from rlhf.checkpoint import read_meta
            start = int(read_meta(run.resume_from)["step"])

        def evaluate() -> float:
            rows, _ = pad_rows(collate_sft(held_out, tokenizer.pad_token_id), world * cfg.train.micro_batch_size)
            out = group.run("lm_eval", ray.put(rows))
            return float(out["loss_sum"].sum() / out["tokens"].sum())

        summary: dict = {}
        if held_out and start == 0:
            summary["eval/loss_start"] = evaluate()
            run.metrics.log(0, {"eval/loss": summary["eval/loss_start"]})
        progress = Progress(total, desc="sft", enabled=cfg.logging.progress, initial=start)
        for step in range(start, total):
            epoch, index = divmod(step, steps_per_epoch)
            order = permutation(len(train), cfg.seed, epoch)[index * batch:(index + 1) * batch]
            rows = collate_sft([train[i] for i in order], tokenizer.pad_token_id)
            num_tokens = int(rows["loss_mask"][:, 1:].sum())
            began = time.time()
            out = group.run("sft_step", ray.put(rows), num_tokens)
            metrics = {"train/loss": float(out["loss_sum"].sum()) / num_tokens, "train/grad_norm": float(out["grad_norm"][0]),
                       "train/lr": float(out["lr"][0]), "train/tokens_per_s": num_tokens / (time.time() - began),
                       "train/epoch": epoch}
            done = step + 1
            if held_out and cfg.train.eval_every and done % cfg.train.eval_every == 0:
                metrics["eval/loss"] = evaluate()
            if done % cfg.train.log_every == 0 or done == total or "eval/loss" in metrics:
                run.metrics.log(done, metrics)
            progress.update(1, loss=f"{metrics['train/loss']:.3f}")
            if cfg.train.save_every and done % cfg.train.save_every == 0 and done < total:
                save_checkpoint(run, [(group, {})], done, {"epoch": epoch})
        progress.close()
        if held_out:
            summary["eval/loss"] = evaluate()
            run.metrics.log(total, {"eval/loss": summary["eval/loss"]})
        save_checkpoint(run, [(group, {})], total, {"epoch": cfg.train.epochs})
        ray.get(group.call("save_pretrained", run.final, cfg.lora.merge_on_save))
        summary["final"] = run.final
        return summary
    finally:
        run.metrics.close()
        group.shutdown()
        if started:
            ray.shutdown()
