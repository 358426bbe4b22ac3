"""`rlhf generate`: one reply per prompt from a model, in one process, with the MOSS-003 chat sampling defaults."""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Optional

import torch

from rlhf.batching import collate_prompts
from rlhf.config import GenerateConfig, load_config
from rlhf.data import DataFileError, load_prompts, write_jsonl
from rlhf.generation import fit_generation_cap, generate_plugin_replies, generate_replies, reply_text
from rlhf.modeling import check_model_dir, load_causal_lm, load_tokenizer
from rlhf.moss import EOM, Dialogue, tokenize_prompt


class Replier:
    """A chat model loaded once, replying as `cfg` says (sampling, dtype, a plugin model's tools)."""

    def __init__(self, model_path: str, cfg: GenerateConfig):
        from rlhf.tools import build_registry  # imports sympy

        check_model_dir(model_path, "model")  # before the tokenizer, so a wrong path is named as the model's
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or model_path, cfg.model.trust_remote_code)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = cfg.model.dtype if cfg.model.dtype != "auto" else (
            "bfloat16" if self.device == "cuda" and torch.cuda.is_bf16_supported() else "float32")
        self.model = load_causal_lm(model_path, dtype, cfg.model.trust_remote_code).to(self.device)
        self.gen = dataclasses.asdict(fit_generation_cap(cfg.generation, self.tokenizer, cfg.generation.lengths_from,
                                                         "generate", cfg.data.format, models=(model_path,)))
        self.eom_id = self.tokenizer.convert_tokens_to_ids(EOM)
        self.plugin = cfg.data.plugin
        self.tools = build_registry(cfg.plugins.tools, cfg.plugins.solver, cfg.plugins.timeout) if self.plugin \
            else None

    def generate(self, prompts: Sequence[Dialogue]) -> dict:
        """The rollout rows of one batch of prompts (`rlhf.generation`)."""
        ids = [tokenize_prompt(d, self.tokenizer, self.cfg.data.max_prompt_length, self.plugin) for d in prompts]
        batch = collate_prompts(ids, self.tokenizer.pad_token_id)
        if self.plugin:
            out, _ = generate_plugin_replies(self.model, self.tokenizer, batch, self.gen, self.tools, self.device,
                                             micro_batch=len(prompts),
                                             max_results_tokens=self.cfg.plugins.max_results_tokens)
            return out
        return generate_replies(self.model, batch, self.gen, self.eom_id, self.tokenizer.pad_token_id, self.device,
                                micro_batch=len(prompts))

    def texts(self, dialogues: Sequence[Dialogue], batch_size: int = 16) -> list[str]:
        """Reply texts to dialogues (prompts, or dialogues whose last reply is dropped), in order; seeded with
        `cfg.seed` without disturbing the caller's random state."""
        prompts = [d if d.is_prompt else d.as_prompt(self.plugin) for d in dialogues]
        texts: list[str] = []
        devices = [torch.cuda.current_device()] if self.device == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed)
            for start in range(0, len(prompts), batch_size):
                out = self.generate(prompts[start:start + batch_size])
                texts += [reply_text(self.tokenizer, r, m, self.eom_id, self.plugin)
                          for r, m in zip(out["response_ids"], out["action_mask"])]
        return texts


def generate_texts(model_path: str, dialogues: Sequence[Dialogue], cfg: GenerateConfig,
                   batch_size: int = 16) -> list[str]:
    """Reply texts of the model at model_path to dialogues (prompts, or dialogues whose last reply is dropped), in
    order, sampled as `cfg.generation` says in `cfg.model.dtype`, a plugin model (`cfg.data.plugin`) calling the
    tools of `cfg.plugins`; seeded with `cfg.seed` without disturbing the caller's random state."""
    return Replier(model_path, cfg).texts(dialogues, batch_size)


def run_generate(model: str, prompts: str, out: str, config: Optional[str] = None,
                 overrides: Optional[list[str]] = None) -> int:
    """`rlhf generate`: one JSON line per prompt, in input order, with its fields kept plus `response`.

    Bad prompt lines are printed as `PATH:LINE: FIELD: ...` and give 1; config and model errors are raised
    for the command line to print in one line.
    """
    cfg = load_config("generate", config, overrides or [])
    try:
        dialogues = load_prompts(prompts, cfg.data.format)
    except DataFileError as error:
        for line in error.errors:
            print(str(line), file=sys.stderr)
        return 1
    texts = generate_texts(model, dialogues, cfg)
    write_jsonl(out, [{**d.to_json(), "response": text} for d, text in zip(dialogues, texts)])
    print(f"generate: {len(texts)} replies (seed {cfg.seed}) -> {out}")
    return 0
