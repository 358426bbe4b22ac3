"""`rlhf generate`: one reply per prompt from a model, in one process, with the MOSS-003 chat sampling defaults; with
`--best-of N --scorer DIR`, the one of N sampled replies that a scorer (`reward.scorer`) ranks highest."""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Optional

import torch

from reward.scorer import Scorer, load_scorer
from rlhf.batching import collate_prompts
from rlhf.config import GenerateConfig, load_config
from rlhf.data import DataFileError, load_prompts, write_jsonl
from rlhf.generation import fit_generation_cap, generate_plugin_replies, generate_replies, reply_text
from rlhf.modeling import check_model_dir, inference_placement, load_causal_lm, load_tokenizer
from rlhf.moss import EOM, Dialogue, tokenize_prompt


class Replier:
    """A chat model loaded once, replying as `cfg` says (sampling, dtype, a plugin model's tools)."""

    def __init__(self, model_path: str, cfg: GenerateConfig):
        from rlhf.tools import build_registry  # imports sympy

        check_model_dir(model_path, "model")  # before the tokenizer, so a wrong path is named as the model's
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or model_path, cfg.model.trust_remote_code)
        self.device, dtype = inference_placement(cfg.model.dtype)
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
        return [first for first, in self.candidates(dialogues, 1, batch_size)]

    def candidates(self, dialogues: Sequence[Dialogue], n: int, batch_size: int = 16) -> list[list[str]]:
        """n reply texts to each dialogue, sampled in n rounds over all of them, seeded once with `cfg.seed` (the
        caller's random state left alone). Round k goes on from where round k-1 left the random state, so a
        dialogue's first n candidates are the same for any larger n, and round 0 gives `texts`' replies: best-of-1 is
        plain generation, and more samples never lower the best score."""
        prompts = [d if d.is_prompt else d.as_prompt(self.plugin) for d in dialogues]
        rounds: list[list[str]] = []
        devices = [torch.cuda.current_device()] if self.device == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed)
            for _ in range(n):
                texts: list[str] = []
                for start in range(0, len(prompts), batch_size):
                    out = self.generate(prompts[start:start + batch_size])
                    texts += [reply_text(self.tokenizer, r, m, self.eom_id, self.plugin)
                              for r, m in zip(out["response_ids"], out["action_mask"])]
                rounds.append(texts)
        return [list(samples) for samples in zip(*rounds)]


def generate_texts(model_path: str, dialogues: Sequence[Dialogue], cfg: GenerateConfig,
                   batch_size: int = 16) -> list[str]:
    """Reply texts of the model at model_path to dialogues (prompts, or dialogues whose last reply is dropped), in
    order, sampled as `cfg.generation` says in `cfg.model.dtype`, a plugin model (`cfg.data.plugin`) calling the
    tools of `cfg.plugins`; seeded with `cfg.seed` without disturbing the caller's random state."""
    return Replier(model_path, cfg).texts(dialogues, batch_size)


def best_of_n(replier: Replier, scorer: Scorer, prompts: Sequence[Dialogue], n: int) -> list[dict]:
    """Per prompt, n sampled replies scored as whole dialogues (prompt and reply): `response` and `score` of the one
    the scorer ranks highest (the earlier sample on a tie), and `candidates`, every sample's `{"response", "score"}`
    in the order drawn, so a user can check the scorer."""
    candidates = replier.candidates(prompts, n)
    scores = scorer.score([p.with_reply(text) for p, texts in zip(prompts, candidates) for text in texts])
    kept = []
    for i, texts in enumerate(candidates):
        mine = scores[i * n:(i + 1) * n]
        best = max(range(n), key=mine.__getitem__)
        kept.append({"response": texts[best], "score": mine[best],
                     "candidates": [{"response": t, "score": s} for t, s in zip(texts, mine)]})
    return kept


def check_best_of(best_of: Optional[int], scorer: str) -> None:
    """--best-of and --scorer come together (--best-of 1 alone is plain generation); one line otherwise, before
    anything loads."""
    if best_of is not None and best_of < 1:
        raise SystemExit(f"--best-of {best_of}: give the number of replies to sample per prompt, 1 or more")
    if scorer and best_of is None:
        raise SystemExit("--scorer ranks sampled replies; give --best-of N too, the number to sample per prompt")
    if not scorer and (best_of or 1) > 1:
        raise SystemExit(f"--best-of {best_of} needs --scorer DIR, the model that ranks the replies (a preference "
                         "model: rlhf rm's final/)")


def run_generate(model: str, prompts: str, out: str, config: Optional[str] = None,
                 overrides: Optional[list[str]] = None, best_of: Optional[int] = None, scorer: str = "") -> int:
    """`rlhf generate`: one JSON line per prompt, in input order, with its fields kept plus `response`; with `best_of`
    N and a `scorer` directory, the best of N sampled replies and its `score` and `candidates` (`best_of_n`).

    Bad prompt lines are printed as `PATH:LINE: FIELD: ...` and give 1; flag, config and model errors are raised
    for the command line to print in one line.
    """
    check_best_of(best_of, scorer)
    cfg = load_config("generate", config, overrides or [])
    try:
        dialogues = load_prompts(prompts, cfg.data.format)
    except DataFileError as error:
        for line in error.errors:
            print(str(line), file=sys.stderr)
        return 1
    if not scorer:
        texts = generate_texts(model, dialogues, cfg)
        write_jsonl(out, [{**d.to_json(), "response": text} for d, text in zip(dialogues, texts)])
        print(f"generate: {len(texts)} replies (seed {cfg.seed}) -> {out}")
        return 0
    # Its own tokenizer, the policy's dtype; checked and loaded before the policy.
    ranker = load_scorer(dataclasses.replace(cfg.model, path=scorer, tokenizer=""), cfg.data)
    kept = best_of_n(Replier(model, cfg), ranker, dialogues, best_of)
    write_jsonl(out, [{**d.to_json(), **k} for d, k in zip(dialogues, kept)])
    print(f"generate: {len(kept)} replies, each the best of {best_of} by {scorer} (seed {cfg.seed}) -> {out}")
    return 0
