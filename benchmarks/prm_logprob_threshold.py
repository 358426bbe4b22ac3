"""A verifier with no trained head (RESULTS.md section 10): a step is good while every token of it, and of every step
before it, has a log-probability of at least tau under the SFT policy; tau is the one that labels the training
solutions best. Prints its held-out step and first-error accuracy, as `rlhf prm-eval` reports a PRM's.

    python benchmarks/prm_logprob_threshold.py runs/sft/final data/steps_train.jsonl data/steps_eval.jsonl
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from reward.steps import encode_steps_file, step_metrics
from rlhf.modeling import load_tokenizer


def weakest_tokens(lm, tokenizer, data: str) -> list[tuple[list[float], list[bool]]]:
    """Per solution: each step's smallest token log-probability (the separator before it left out), and its labels."""
    solutions, _ = encode_steps_file(data, tokenizer, 256, False, "auto", "\n")
    out = []
    with torch.no_grad():
        for s in solutions:
            logp = torch.log_softmax(lm(torch.tensor([s.ids])).logits[0].float(), -1)
            starts = [s.reply_start] + [end + 2 for end in s.ends[:-1]]
            out.append(([min(float(logp[t - 1, s.ids[t]]) for t in range(a, b + 1)) for a, b in zip(starts, s.ends)],
                        s.labels))
    return out


def judged(data: list[tuple[list[float], list[bool]]], tau: float) -> dict:
    """prm-eval's metrics of the verifier with threshold tau (a step is bad from the first one under it on)."""
    found = []
    for weakest, _ in data:
        good, row = True, []
        for value in weakest:
            good = good and value >= tau
            row.append(float(good))
        found.append(row)
    return step_metrics(found, [labels for _, labels in data])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the SFT policy (a causal LM directory)")
    parser.add_argument("train", help="stepwise training solutions (to pick tau)")
    parser.add_argument("eval", help="held-out stepwise solutions")
    args = parser.parse_args()
    tokenizer, lm = load_tokenizer(args.model), AutoModelForCausalLM.from_pretrained(args.model).eval()
    train = weakest_tokens(lm, tokenizer, args.train)
    tau = max((judged(train, t / 4)["step_accuracy"], t / 4) for t in range(-40, 1))[1]
    print(f"tau {tau}: held out {judged(weakest_tokens(lm, tokenizer, args.eval), tau)}")


if __name__ == "__main__":
    main()
