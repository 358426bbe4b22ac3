"""DPO from ranked lists, as pure functions: the implicit reward and the listwise, pairwise and IPO losses.

A prompt's K responses are ranked (ties allowed); `pairs` lists every (better, worse) pair, as the preference
model's ranked lists do (`reward.batches`). The implicit reward of a response is r = beta * (log pi(y|x) -
log pi_ref(y|x)), summed over the reply's tokens (Rafailov et al., 2023).

- listwise: the Plackett-Luce likelihood of the ranking. Each response that beats at least one other is "chosen"
  among itself and the responses strictly worse than it: -log(exp(r_b) / (exp(r_b) + sum_{w worse} exp(r_w))).
  Without ties that is the usual Plackett-Luce product; tied responses never compete with each other, so a tie
  makes no term; with K = 2 it is pairwise DPO.
- pairwise: DPO over all K(K-1)/2 pairs, -log sigmoid(r_better - r_worse).
- ipo: (h - 1/(2 beta))^2 with h the difference of per-token mean log-ratios (Azar et al., 2023).
Label smoothing (cDPO, Mitchell 2023) mixes in the flipped preference with weight eps: -(1-eps) log p - eps log(1-p),
p the chosen response's probability; it does not apply to IPO.

As the reward model's loss, a prompt's terms are summed (listwise: the ranking's negative log-likelihood) or averaged
(pairwise, ipo), then summed over prompts and divided by the GLOBAL number of prompts, so micro-batches and ranks
add up to the whole batch's loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("listwise", "pairwise", "ipo")


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """[N] beta x the log-ratio of each response (log-probs summed over its reply tokens)."""
    return beta * (policy_logps.float() - ref_logps.float())


def _per_prompt(term: Tensor, prompt: Tensor, mean: bool) -> Tensor:
    """[num_local] each prompt's terms summed (or averaged)."""
    num_local = int(prompt.max()) + 1
    total = torch.zeros(num_local, dtype=term.dtype, device=term.device).index_add(0, prompt, term)
    if not mean:
        return total
    count = torch.zeros(num_local, dtype=term.dtype, device=term.device).index_add(0, prompt, torch.ones_like(term))
    return total / count.clamp(min=1)


def _listwise_terms(rewards: Tensor, pairs: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(loss term, chosen response) per response that beats another: the log-softmax of its reward over itself and
    the responses strictly worse than it."""
    better, worse = pairs[:, 0], pairs[:, 1]
    chosen = torch.unique(better)  # [C]
    slot = torch.searchsorted(chosen, better.contiguous())  # [P] which chosen response each pair belongs to
    # log sum_{w worse} exp(r_w) per group, shifted by the group's largest worse reward (a constant) so it stays finite.
    top = torch.full_like(chosen, -torch.inf, dtype=rewards.dtype).scatter_reduce(
        0, slot, rewards[worse].detach(), reduce="amax")  # [C]
    log_worse = torch.log(torch.zeros_like(top).index_add(0, slot, torch.exp(rewards[worse] - top[slot]))) + top
    log_denominator = torch.logaddexp(rewards[chosen], log_worse)
    log_p = rewards[chosen] - log_denominator  # log p(chosen first among its group)
    term = -log_p
    if label_smoothing:
        term = -(1 - label_smoothing) * log_p - label_smoothing * (log_worse - log_denominator)  # log(1 - p)
    return term, chosen


def dpo_loss(policy_logps: Tensor, ref_logps: Tensor, pairs: Tensor, pair_prompt: Tensor, row_prompt: Tensor,
             beta: float, loss_type: str = "listwise", label_smoothing: float = 0.0,
             num_prompts: int | None = None, reply_tokens: Tensor | None = None) -> dict:
    """The DPO loss of one micro-batch of ranked lists.

    policy_logps, ref_logps: [N] summed reply log-probs per response. pairs: [P, 2] (better, worse) row indices.
    pair_prompt: [P] and row_prompt: [N] the local prompt of each pair and row. num_prompts: the global number of
    prompts (None: the distinct prompts with a pair here). reply_tokens: [N] reply lengths (IPO's per-token mean).
    Returns `loss` (scalar, with grad), `accuracy` (pairs whose better response has the higher implicit reward),
    `margin` (mean implicit-reward difference over pairs), `num_pairs`, and `rewards` [N] (detached).
    """
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSSES)}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    rewards = implicit_rewards(policy_logps, ref_logps, beta)
    if pairs.shape[0] == 0:  # only ties: no signal, but a graph backward() can run through
        zero = policy_logps.sum() * 0.0
        return {"loss": zero, "accuracy": 0.0, "margin": 0.0, "num_pairs": 0, "rewards": rewards.detach()}
    better, worse = pairs[:, 0], pairs[:, 1]
    diff = rewards[better] - rewards[worse]  # [P]
    if loss_type == "listwise":
        term, chosen = _listwise_terms(rewards, pairs, label_smoothing)
        per_prompt = _per_prompt(term, row_prompt[chosen], mean=False)
    elif loss_type == "pairwise":
        term = -(1 - label_smoothing) * F.logsigmoid(diff) - label_smoothing * F.logsigmoid(-diff)
        per_prompt = _per_prompt(term, pair_prompt, mean=True)
    else:
        if reply_tokens is None:
            raise ValueError("the ipo loss needs reply_tokens (per-token mean log-ratios)")
        ratio = (policy_logps.float() - ref_logps.float()) / reply_tokens.float().clamp(min=1)
        term = (ratio[better] - ratio[worse] - 1 / (2 * beta)) ** 2
        per_prompt = _per_prompt(term, pair_prompt, mean=True)
    if num_prompts is None:
        num_prompts = int(torch.unique(pair_prompt).numel())
    with torch.no_grad():
        accuracy, margin = float((diff > 0).float().mean()), float(diff.mean())
    return {"loss": per_prompt.sum() / num_prompts, "accuracy": accuracy, "margin": margin,
            "num_pairs": int(pairs.shape[0]), "rewards": rewards.detach()}
