"""`rlhf rm-eval`: a preference model's agreement with held-out ranked lists, in one process (no Ray needed)."""
from __future__ import annotations

import json
import os

import torch

from reward.batches import collate_ranked
from rlhf.config import Config


def evaluate(model_dir: str, data: str, cfg: Config, batch_size: int = 8) -> dict:
    from reward.model import ScalarHeadModel
    from reward.trainer import encode_file
    from rlhf.batching import position_ids
    from rlhf.modeling import check_model_dir, load_tokenizer

    check_model_dir(model_dir, "--model")
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_dir, cfg.model.trust_remote_code)
    lists = encode_file(data, tokenizer, cfg)
    model = ScalarHeadModel.from_pretrained(model_dir, torch.float32, cfg.model.trust_remote_code).eval()
    correct = pairs = 0
    margins, rewards = [], []
    with torch.no_grad():
        for i in range(0, len(lists), batch_size):
            mb = collate_ranked(lists[i:i + batch_size], tokenizer.pad_token_id)
            scores = model.score(mb["input_ids"], mb["attention_mask"], position_ids(mb["attention_mask"])).float()
            diff = scores[mb["pairs"][:, 0]] - scores[mb["pairs"][:, 1]]
            correct += int((diff > 0).sum())
            pairs += len(diff)
            margins.append(diff)
            rewards.append(scores)
    r = torch.cat(rewards)
    return {"pairwise_accuracy": correct / max(1, pairs), "pairs": pairs,
            "mean_margin": float(torch.cat(margins).mean()) if pairs else 0.0,
            "reward_mean": float(r.mean()), "reward_std": float(r.std()) if len(r) > 1 else 0.0}


def run_rm_eval(model_dir: str, data: str, cfg: Config, write_stats: bool = True) -> int:
    """Print one JSON line; keep the reward mean/std in the model directory for PPO's normalisation."""
    from rlhf.checkpoint import atomic_write_json
    result = evaluate(model_dir, data, cfg)
    if write_stats and os.path.isdir(model_dir):
        atomic_write_json(os.path.join(model_dir, "reward_stats.json"),
                          {"mean": result["reward_mean"], "std": result["reward_std"] or 1.0, "source": data})
    print(json.dumps(result))
    return 0
