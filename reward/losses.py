"""Ranked-list preference loss for the reward model (InstructGPT style).

Each response of each prompt is scored once; the loss runs over every (better, worse) pair of a prompt's ranking,
averaged within the prompt first so that prompts with many responses do not dominate, then summed over prompts
and divided by the GLOBAL number of prompts, so micro-batches and ranks add up to the whole-batch loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ranking_loss(
    scores: Tensor,
    pairs: Tensor,
    pair_prompt: Tensor,
    margins: Tensor | float = 0.0,
    label_smoothing: float = 0.0,
    num_prompts: int | None = None,
) -> dict:
    """Bradley-Terry loss over ranked pairs, with optional margin (Llama 2) and label smoothing (MOSS-RLHF II).

    scores: `[N]`, one scalar per encoded response. pairs: `[P, 2]` long, (better, worse) indices into `scores`.
    pair_prompt: `[P]` long, the local prompt index (0..num_local_prompts-1) of each pair. margins: `[P]` or a float
    (fixed, a record's own, or per pair the ensemble's mean preference strength: part II's adaptive margin).
    num_prompts: the global number of prompts that have at least one pair (None: the distinct prompts here).

    Per pair, d = s_better - s_worse - margin and loss = -(1 - a) * logsigmoid(d) - a * logsigmoid(-d).
    Returns `loss` (scalar, with grad), `accuracy` (share of pairs with s_better > s_worse), `mean_margin`
    (mean of s_better - s_worse) and `num_pairs`.
    """
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape [P, 2] (better, worse), got {tuple(pairs.shape)}")
    if pair_prompt.shape != pairs.shape[:1]:
        raise ValueError(
            f"pair_prompt must hold one prompt index per pair ({pairs.shape[0]}), got shape {tuple(pair_prompt.shape)}"
        )
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")

    num_pairs = pairs.shape[0]
    if num_pairs == 0:  # every ranking here was a tie: no signal, but keep the graph so backward() still works
        zero = scores.sum() * 0.0
        return {"loss": zero, "accuracy": zero.detach(), "mean_margin": zero.detach(), "num_pairs": 0}

    scores = scores.float()
    diff = scores[pairs[:, 0]] - scores[pairs[:, 1]]  # [P]
    d = diff - torch.as_tensor(margins, dtype=scores.dtype, device=scores.device)
    pair_loss = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)  # [P]

    num_local = int(pair_prompt.max().item()) + 1
    pair_loss_sum = torch.zeros(num_local, dtype=scores.dtype, device=scores.device).index_add(
        0, pair_prompt, pair_loss
    )  # [num_local]
    pairs_per_prompt = torch.zeros(num_local, dtype=scores.dtype, device=scores.device).index_add(
        0, pair_prompt, torch.ones_like(pair_loss)
    )  # [num_local]
    per_prompt_loss = pair_loss_sum / pairs_per_prompt.clamp(min=1)  # prompts without pairs add 0
    if num_prompts is None:
        num_prompts = int((pairs_per_prompt > 0).sum().item())
    loss = per_prompt_loss.sum() / num_prompts

    with torch.no_grad():
        accuracy = (diff > 0).float().mean()
        mean_margin = diff.mean()
    return {"loss": loss, "accuracy": accuracy, "mean_margin": mean_margin, "num_pairs": num_pairs}


def step_loss(logits: Tensor, labels: Tensor, mask: Tensor, num_steps: int) -> dict:
    """A process reward model's loss: binary cross-entropy of each labelled step's score (the logit of "the solution
    can still reach the right answer") against its label, summed over the micro-batch's steps and divided by the
    labelled steps of the whole global batch (`num_steps`), so a step's gradient is the same however ranks and
    micro-batches split it. Also the steps predicted right (good at probability >= 0.5, logit >= 0)."""
    mask = mask.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    right = ((logits >= 0).float() == labels.float()).float() * mask
    return {"loss": (bce * mask).sum() / max(1, num_steps), "correct": right.sum(), "steps": mask.sum()}
