"""A preference model's agreement with held-out ranked lists, in one process (no Ray needed): `rlhf rm-eval`."""
from __future__ import annotations

import torch

from reward.batches import collate_ranked, encode_file
from reward.model import ScalarHeadModel
from reward.scorer import PreferenceScorer
from rlhf.config import RMConfig
from rlhf.modeling import check_model_dir, load_tokenizer


def evaluate(model_dir: str, data: str, cfg: RMConfig, batch_size: int = 8) -> dict:
    check_model_dir(model_dir, "--model")
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_dir, cfg.model.trust_remote_code)
    lists = encode_file(data, tokenizer, cfg.data, cfg.rm)  # a bad line is named before the model loads
    model = ScalarHeadModel.from_pretrained(model_dir, torch.float32, cfg.model.trust_remote_code)
    scorer = PreferenceScorer(model, tokenizer, cfg.data)  # the one place a score is read, best-of-N's too
    correct = pairs = 0
    margins, rewards = [], []
    for i in range(0, len(lists), batch_size):
        mb = collate_ranked(lists[i:i + batch_size], tokenizer.pad_token_id)
        scores = scorer.score_ids(mb["input_ids"], mb["attention_mask"])
        diff = scores[mb["pairs"][:, 0]] - scores[mb["pairs"][:, 1]]
        correct += int((diff > 0).sum())
        pairs += len(diff)
        margins.append(diff)
        rewards.append(scores)
    r = torch.cat(rewards)
    return {"pairwise_accuracy": correct / max(1, pairs), "pairs": pairs,
            "mean_margin": float(torch.cat(margins).mean()) if pairs else 0.0,
            "reward_mean": float(r.mean()), "reward_std": float(r.std()) if len(r) > 1 else 0.0}
