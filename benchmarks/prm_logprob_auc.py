"""How well a policy's own log-probabilities tell a slipped step from a right one (RESULTS.md section 10).

For each arithmetic step of a stepwise file (every step but the answer), the log-probability the causal LM gives the
step's last token (the result's last digit), read with the same step ends the PRM uses (`reward.steps`). Prints the
AUC of that number between the right steps and the first slipped step of each solution (the steps after it are
consistent with it, so only the slip itself is locally wrong).

    python benchmarks/prm_logprob_auc.py runs/sft/final data/steps_eval.jsonl
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from reward.steps import encode_steps_file
from rlhf.modeling import load_tokenizer


def step_logprobs(model_dir: str, data: str) -> tuple[list[float], list[float]]:
    """(log-probs of the right arithmetic steps' results, of each solution's first slipped step's result)."""
    tokenizer = load_tokenizer(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    solutions, _ = encode_steps_file(data, tokenizer, 256, False, "auto", "\n")
    right, slipped = [], []
    with torch.no_grad():
        for s in solutions:
            logp = torch.log_softmax(lm(torch.tensor([s.ids])).logits[0].float(), -1)
            first_bad = next((i for i, good in enumerate(s.labels) if not good), None)
            for k, end in enumerate(s.ends[:-1]):
                value = float(logp[end - 1, s.ids[end]])
                if k == first_bad:
                    slipped.append(value)
                elif first_bad is None or k < first_bad:
                    right.append(value)
    return right, slipped


def auc(higher: list[float], lower: list[float]) -> float:
    """P(a value of `higher` > one of `lower`), ties counting half."""
    wins = sum((h > x) + 0.5 * (h == x) for h in higher for x in lower)
    return wins / max(1, len(higher) * len(lower))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a causal LM directory (an SFT policy's final/)")
    parser.add_argument("data", help="a stepwise file (rlhf sample's steps_eval.jsonl)")
    args = parser.parse_args()
    right, slipped = step_logprobs(args.model, args.data)
    print(f"{len(right)} right steps, {len(slipped)} slipped: AUC {auc(right, slipped):.3f}")


if __name__ == "__main__":
    main()
