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


def generate_texts(model_path: str, dialogues: Sequence[Dialogue], cfg: GenerateConfig,
                   batch_size: int = 16) -> list[str]:
    """Reply texts of the model at model_path to dialogues (prompts, or dialogues whose last reply is dropped), in
    order, sampled as `cfg.generation` says in `cfg.model.dtype`, a plugin model (`cfg.data.plugin`) calling the
    tools of `cfg.plugins`; seeded with `cfg.seed` without disturbing the caller's random state."""
    from rlhf.tools import build_registry  # imports sympy

    check_model_dir(model_path, "model")  # before the tokenizer, so a wrong path is named as the model's
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_path, cfg.model.trust_remote_code)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else (
        "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32")
    model = load_causal_lm(model_path, dtype, cfg.model.trust_remote_code).to(device)
    gen = dataclasses.asdict(fit_generation_cap(cfg.generation, tokenizer, cfg.generation.lengths_from, "generate",
                                                cfg.data.format, models=(model_path,)))
    eom_id = tokenizer.convert_tokens_to_ids(EOM)
    plugin = cfg.data.plugin
    tools = build_registry(cfg.plugins.tools, cfg.plugins.solver, cfg.plugins.timeout) if plugin else None
    prompts = [d if d.is_prompt else d.as_prompt(plugin) for d in dialogues]
    texts: list[str] = []
    devices = [torch.cuda.current_device()] if device == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        for start in range(0, len(prompts), batch_size):
            ids = [tokenize_prompt(d, tokenizer, cfg.data.max_prompt_length, plugin)
                   for d in prompts[start:start + batch_size]]
            batch = collate_prompts(ids, tokenizer.pad_token_id)
            if plugin:
                out, _ = generate_plugin_replies(model, tokenizer, batch, gen, tools, device, micro_batch=batch_size,
                                                 max_results_tokens=cfg.plugins.max_results_tokens)
            else:
                out = generate_replies(model, batch, gen, eom_id, tokenizer.pad_token_id, device,
                                       micro_batch=batch_size)
            texts += [reply_text(tokenizer, r, m, eom_id, plugin)
                      for r, m in zip(out["response_ids"], out["action_mask"])]
    return texts


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
