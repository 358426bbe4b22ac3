"""`rlhf sft`: supervised fine-tuning on MOSS dialogues, loss only on what the model writes, on one role group."""
from __future__ import annotations

import time
from typing import Any, Optional

from actors.lm import SFTWorker
from rlhf.batching import collate_sft
from rlhf.config import SFTConfig
from rlhf.data import encode_dialogues
from rlhf.drivers.runs import Supervised, backend_for, one_group_plan, open_run, train_supervised
from rlhf.generation import lengths_file
from rlhf.modeling import check_model_dir, load_tokenizer
from rlhf.roles import Trainer


def run_sft(cfg: SFTConfig, output: str, resume: bool = False, backend: Optional[Any] = None) -> dict:
    """Train `cfg.model.path` on `cfg.data.train`; returns the summary the command line prints."""
    # Everything that can be wrong with the input is found before any rank starts.
    check_model_dir(cfg.model.path, "--model")
    backend = backend_for(cfg, backend)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code)
    train = encode_dialogues(cfg.data.train, tokenizer, cfg.data)
    held_out = encode_dialogues(cfg.data.eval, tokenizer, cfg.data) if cfg.data.eval else []
    plan, spec = one_group_plan(cfg, len(train), "dialogues")
    lengths = lengths_file(cfg.data.train, tokenizer, cfg.data.format)  # for a later run's max_new_tokens: auto
    pad_id = tokenizer.pad_token_id

    def step(trainer: Trainer, dialogues: list, epoch: int) -> dict:
        rows = collate_sft(dialogues, pad_id)
        num_tokens = int(rows["loss_mask"][:, 1:].sum())
        began = time.time()
        out = trainer.train_step(rows, num_tokens).result()
        return {"train/loss": out["loss_sum"] / num_tokens, "train/grad_norm": out["grad_norm"],
                "train/lr": out["lr"], "train/tokens_per_s": num_tokens / (time.time() - began), "train/epoch": epoch}

    def evaluate(trainer: Trainer) -> dict:
        out = trainer.evaluate(collate_sft(held_out, pad_id)).result()
        return {"eval/loss": float(out["loss_sum"].sum() / out["tokens"].sum())}

    def finish(trainer: Trainer, before: dict, after: dict) -> dict:
        trainer.save_pretrained(run.final, cfg.lora.merge_on_save, lengths).result()
        start = {"eval/loss_start": before["eval/loss"]} if before else {}
        return start | after | {"final": run.final}

    run = open_run(output, cfg, resume)
    job = Supervised("sft", SFTWorker, train, step, evaluate if held_out else None, finish,
                     lambda m: {"loss": f"{m['train/loss']:.3f}"})
    return train_supervised("sft", cfg, plan, run, backend, spec, job)
