"""The PPO math as pure torch functions: masked statistics, KL estimators and controllers, reward shaping,
GAE, the clipped policy and value losses, and the critic-free advantage estimators (GRPO, RLOO, REINFORCE++).

Responses are right-padded `[batch, response_len]` tensors with an `action_mask` (1 on tokens the policy wrote).
Every loss takes `num_tokens`, the number of action tokens in the WHOLE global batch, and returns
`(per_token_loss * mask).sum() / num_tokens`, so summing the losses of micro-batches and ranks gives the same
gradient as the whole batch at once. `num_tokens=None` means the local count (`mask.sum()`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------------------
# masked statistics


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` is 1, over `dim` (all elements when None)."""
    if dim is None:
        return (x * mask).sum()
    return (x * mask).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` where `mask` is 1; an all-zero mask gives 0 rather than NaN."""
    return masked_sum(x, mask, dim) / masked_sum(torch.ones_like(x), mask, dim).clamp(min=1e-8)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over all positions where `mask` is 1 (Bessel-corrected when `unbiased` and n > 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum().to(var.dtype)
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1e-8), var)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise `x` to unit variance (and zero mean when `shift_mean`) over masked positions; padding becomes 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def _normaliser(mask: Tensor, num_tokens: int | float | Tensor | None) -> Tensor | float:
    # The caller passes the global count; None falls back to this batch's count (never 0, to avoid NaN).
    if num_tokens is None:
        return mask.sum().clamp(min=1)
    return num_tokens


# --------------------------------------------------------------------------------------------------------------
# log-probs and entropy


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of `labels` under `logits`: `[B, T, V]`, `[B, T]` -> `[B, T]` (float32).

    Done one row at a time so that only one `[T, V]` float32 copy of the log-softmax is alive at once.
    """
    rows = []
    for row_logits, row_labels in zip(logits, labels):  # [T, V], [T]
        logp = torch.log_softmax(row_logits.float(), dim=-1)
        rows.append(logp.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)  # [B, T]


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position: `[B, T, V]` -> `[B, T]` (float32)."""
    rows = []
    for row_logits in logits:  # [T, V]
        row_logits = row_logits.float()
        probs = torch.softmax(row_logits, dim=-1)
        # H = logsumexp(z) - sum_v p_v z_v, which never takes log of a zero probability
        rows.append(torch.logsumexp(row_logits, dim=-1) - (probs * row_logits).sum(dim=-1))
    return torch.stack(rows)  # [B, T]


# --------------------------------------------------------------------------------------------------------------
# KL penalty

KL_KINDS = ("k1", "k2", "k3", "abs")
KL_CONTROLLERS = ("fixed", "adaptive")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1", clip: float | None = None) -> Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy: `[B, T]`.

    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r (Schulman's unbiased, non-negative estimator),
    abs = |log r|, where log r = logprobs - ref_logprobs. `clip` bounds log r inside k3: one token where the
    reference is far above the policy would otherwise give an exponential penalty and gradient.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        if clip:
            log_ratio = log_ratio.clamp(-clip, clip)
        return torch.exp(-log_ratio) - 1 + log_ratio
    if kind == "abs":
        return log_ratio.abs()
    raise ValueError(f"unknown KL estimator {kind!r}; use one of {', '.join(KL_KINDS)}")


class FixedKLController:
    """A KL coefficient that never changes."""

    def __init__(self, coef: float):
        self.coef = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019): pushes the measured KL towards `target`.

    error = clip(kl / target - 1, -0.2, 0.2); coef = max(min_coef, coef * (1 + error * n_steps / horizon)).
    The floor keeps a run that starts below its target from wearing the coefficient down to ~0, from where it
    would climb back too slowly to stop the KL once it passes the target.
    """

    def __init__(self, init_coef: float, target: float, horizon: float, min_coef: float = 0.0):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.min_coef = float(min_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.coef = max(self.min_coef, self.coef * (1 + error * n_steps / self.horizon))

    def state_dict(self) -> dict:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


def make_kl_controller(
    kind: str, init_coef: float, target: float | None = None, horizon: float | None = None, min_coef: float = 0.0
) -> FixedKLController | AdaptiveKLController:
    """`fixed` keeps `init_coef`; `adaptive` also needs `target` (KL per sample) and `horizon` (samples), and keeps
    the coefficient at or above `min_coef`."""
    if kind == "fixed":
        return FixedKLController(init_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("an adaptive KL controller needs both target and horizon; set them or use kind 'fixed'")
        return AdaptiveKLController(init_coef, target, horizon, min_coef)
    raise ValueError(f"unknown KL controller {kind!r}; use one of {', '.join(KL_CONTROLLERS)}")


# --------------------------------------------------------------------------------------------------------------
# score normalisation and reward shaping


class RunningMoments:
    """Running mean and (population) std of every scalar seen, merged one batch at a time (Chan et al.)."""

    def __init__(self):
        self.mean = 0.0
        self.var = 1.0
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, x: Tensor) -> tuple[float, float]:
        """Merge the values of `x` (any shape) into the running stats; returns the batch's own (mean, std)."""
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            raise ValueError("RunningMoments.update got an empty tensor; pass at least one score")
        batch_mean = x.mean().item()
        batch_var = x.var(unbiased=False).item()
        if self.count == 0:
            self.mean, self.var, self.count = batch_mean, batch_var, n
        else:
            total = self.count + n
            delta = batch_mean - self.mean
            m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
            self.mean += delta * n / total
            self.var = m2 / total
            self.count = total
        return batch_mean, math.sqrt(batch_var)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


def normalize_scores(
    scores: Tensor, running: RunningMoments, clip: float | None = None, update: bool = True
) -> Tensor:
    """(scores - running mean) / running std, clipped to +-clip (MOSS-RLHF PPO-max): `[B]` -> `[B]`."""
    if update:
        running.update(scores)
    normalized = (scores - running.mean) / max(running.std, 1e-8)
    if clip is not None:
        normalized = normalized.clamp(-clip, clip)
    return normalized


def last_action_index(action_mask: Tensor) -> Tensor:
    """Index of each row's last action token `[B]` (0 for a row with none)."""
    positions = torch.arange(action_mask.shape[1], device=action_mask.device)
    return (action_mask.long() * positions).argmax(dim=1)


def shape_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    action_mask: Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
    kl_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: -kl_coef * KL on every action token, plus the score on the last one (`<eom>`).

    Returns `(rewards, kl)`, both `[B, T]` and zero on padding. Rows with no action token get no score.
    """
    kl = kl_estimate(logprobs, ref_logprobs, kl_kind, kl_clip) * action_mask  # [B, T]
    rewards = -kl_coef * kl
    has_action = action_mask.sum(dim=1) > 0  # [B]
    last = last_action_index(action_mask)  # [B]
    score_on_last = torch.zeros_like(rewards).scatter_(
        1, last.unsqueeze(1), (scores.to(rewards.dtype) * has_action).unsqueeze(1)
    )
    return rewards + score_on_last, kl


# --------------------------------------------------------------------------------------------------------------
# advantages


def gae(
    rewards: Tensor, values: Tensor, action_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the action tokens: `(advantages, returns)`, both `[B, T]`.

    The value after the last action token is 0 (the episode ends at `<eom>`). Non-action positions get 0 and are
    skipped, so a hole in the mask (e.g. plugin results the policy did not write) joins the tokens around it.
    """
    mask = action_mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # [B]
    last_gae = torch.zeros_like(values[:, 0])  # [B]
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae_t = delta + gamma * lam * last_gae
        advantages[:, t] = gae_t * mask[:, t]
        last_gae = torch.where(mask[:, t] > 0, gae_t, last_gae)
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
    returns = advantages + values * mask
    return advantages, returns


def broadcast_to_tokens(sample_adv: Tensor, action_mask: Tensor) -> Tensor:
    """One advantage per sample `[B]` -> the same value on each of its action tokens `[B, T]`."""
    return sample_adv.unsqueeze(1) * action_mask.to(sample_adv.dtype)


def _groups(scores: Tensor, group_size: int) -> Tensor:
    if group_size < 2 or scores.shape[0] % group_size != 0:
        raise ValueError(
            f"need group_size >= 2 dividing the batch; got {scores.shape[0]} scores and group_size={group_size}"
        )
    return scores.view(-1, group_size)  # [num_prompts, group_size]


def grpo_advantages(
    scores: Tensor,
    group_size: int,
    eps: float = 1e-6,
    scale_by_std: bool = True,
    action_mask: Tensor | None = None,
) -> Tensor:
    """GRPO: (score - mean of its group) / (std of its group + eps). Samples of one prompt are contiguous.

    Returns `[B]`, or `[B, T]` over the action tokens when `action_mask` is given.
    """
    groups = _groups(scores, group_size)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (groups.std(dim=1, keepdim=True) + eps)
    adv = adv.flatten()
    return adv if action_mask is None else broadcast_to_tokens(adv, action_mask)


def rloo_advantages(scores: Tensor, group_size: int, action_mask: Tensor | None = None) -> Tensor:
    """RLOO: score minus the mean score of the other samples of the same prompt.

    Returns `[B]`, or `[B, T]` over the action tokens when `action_mask` is given.
    """
    groups = _groups(scores, group_size)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    adv = (groups - others_mean).flatten()
    return adv if action_mask is None else broadcast_to_tokens(adv, action_mask)


def reinforce_pp_advantages(rewards: Tensor, action_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ (Hu 2025): discounted return-to-go of the (KL-shaped) token rewards, whitened over every action
    token of the batch: `[B, T]` -> `[B, T]`."""
    mask = action_mask.to(rewards.dtype)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # [B]
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        returns[:, t] = running * mask[:, t]
    return masked_whiten(returns, mask)


# --------------------------------------------------------------------------------------------------------------
# process rewards (a PRM's step scores)

PROCESS_AGGREGATIONS = ("clip", "step", "min", "last")
"""How a process reward model's step scores p (the probability that the reply can still reach the right answer after
the step) enter PPO's reward. Per step, on each step's last token: `clip` gives min(p - threshold, 0) (Gao et al.
2024's clip: a doubtful step costs, a sound one earns nothing, so with per-token rewards (GAE, REINFORCE++) writing
more steps never pays; GRPO and RLOO remove the group's mean, and that no longer holds), `step` gives
p - threshold. Per reply, added to its score: `min`, its weakest step's p (the min-form credit of Cheng et al. 2025,
Math-Shepherd's verifier score); `last`, its last step's p."""
DENSE_AGGREGATIONS = ("clip", "step")


def step_rewards(probs: Tensor, step_mask: Tensor, aggregation: str, threshold: float) -> Tensor:
    """`[B, T]` rewards on the steps' last tokens (step_mask), 0 elsewhere, for a per-step aggregation."""
    centred = probs - threshold
    if aggregation == "clip":
        centred = centred.clamp(max=0.0)
    elif aggregation != "step":
        raise ValueError(f"{aggregation!r} is not a per-step aggregation (one of {DENSE_AGGREGATIONS})")
    return centred * step_mask


def reply_step_score(probs: Tensor, step_mask: Tensor, aggregation: str) -> Tensor:
    """`[B]` one number per reply for a per-reply aggregation: its smallest step probability (`min`) or its last
    step's (`last`); 0 for a reply with no step."""
    has_step = step_mask.sum(dim=1) > 0
    if aggregation == "min":
        score = torch.where(step_mask > 0, probs, torch.inf).min(dim=1).values
    elif aggregation == "last":
        score = probs.gather(1, last_action_index(step_mask).unsqueeze(1)).squeeze(1)
    else:
        raise ValueError(f"{aggregation!r} is not a per-reply aggregation (min or last)")
    return torch.where(has_step, score, torch.zeros_like(score))


def process_advantages(rewards: Tensor, step_mask: Tensor, action_mask: Tensor, group_size: int,
                       scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Process supervision for the group estimators (GRPO, RLOO; DeepSeekMath 4.1.3): each prompt's step rewards
    standardised over every step of its group's samples (mean removed; divided by the std with `scale_by_std`), and
    each action token's advantage the sum of the standardised rewards of its reply's steps that end at or after it.
    `[B, T]` -> `[B, T]`; samples of one prompt are contiguous."""
    b, t = rewards.shape
    _groups(rewards[:, 0], group_size)  # the same check of the group size as the scores' estimators
    flat = rewards.reshape(-1, group_size * t)
    marks = step_mask.reshape(-1, group_size * t).to(rewards.dtype)
    count = marks.sum(dim=1, keepdim=True).clamp(min=1)
    centred = (flat - (flat * marks).sum(dim=1, keepdim=True) / count) * marks
    if scale_by_std:
        centred = centred / ((centred.square().sum(dim=1, keepdim=True) / count).sqrt() + eps)
    normed = centred.reshape(b, t)
    return normed.flip(1).cumsum(1).flip(1) * action_mask.to(rewards.dtype)


# --------------------------------------------------------------------------------------------------------------
# losses


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    action_mask: Tensor,
    clip_eps: float,
    num_tokens: int | float | Tensor | None = None,
    dual_clip: float | None = None,
    log_ratio_clip: float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """PPO clipped surrogate, summed over action tokens and divided by `num_tokens`.

    `is_weights` (detached, per token) multiplies each token's clipped loss: the truncated importance weights of
    replies sampled by another engine or weights than `old_logprobs` (`truncated_is_weights`; decoupled PPO).

    `dual_clip` (Ye et al. 2020, > 1) also caps the loss of negative-advantage tokens at dual_clip * |A|.
    `log_ratio_clip` bounds log(new/old) before the exponential, so a token whose probability moved by orders of
    magnitude cannot overflow the ratio. Stats (local means, detached): `clipfrac`, the share of tokens where the
    clipped term was chosen; `approx_kl`, the k3 estimate of KL(old || new) = mean(ratio - 1 - log ratio); and
    `log_ratio_clipfrac`, the share of tokens whose log-ratio the bound cut.
    """
    raw_log_ratio = logprobs - old_logprobs
    log_ratio = raw_log_ratio.clamp(-log_ratio_clip, log_ratio_clip) if log_ratio_clip else raw_log_ratio
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    pg_loss = torch.max(pg_loss1, pg_loss2)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (it caps the loss at dual_clip * |A|), got {dual_clip}")
        pg_loss = torch.where(advantages < 0, torch.min(pg_loss, -advantages * dual_clip), pg_loss)
    if is_weights is not None:
        pg_loss = pg_loss * is_weights
    loss = masked_sum(pg_loss, action_mask) / _normaliser(action_mask, num_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).float(), action_mask),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, action_mask),
            "log_ratio_clipfrac": masked_mean((raw_log_ratio != log_ratio).float(), action_mask),
        }
    return loss, stats


def truncated_is_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, cap: float | None) -> Tensor:
    """min(pi_old / pi_behaviour, cap) per token, detached: how much more likely the trainer's weights before this
    update (`old_logprobs`, the PPO ratio's denominator) make a token than the engine that sampled it did
    (`behaviour_logprobs`: older weights one step off-policy, or the same weights computed by another engine). The cap
    bounds the variance a token the engine sampled by a rare chance would add (truncated importance sampling; with
    the clipped ratio on top this is decoupled PPO). `cap` None: the weights uncapped."""
    with torch.no_grad():
        weights = torch.exp((old_logprobs - behaviour_logprobs).clamp(max=50.0))
        return weights.clamp(max=cap) if cap else weights


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    action_mask: Tensor,
    num_tokens: int | float | Tensor | None = None,
    clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The KL penalty as a loss term, for estimators whose advantages come from the scores alone (GRPO, RLOO):
    the k3 estimate of KL(policy || reference) at the current log-probs (its log-ratio bounded by `clip`), summed
    over action tokens and divided by `num_tokens` (DeepSeekMath's GRPO objective). Its gradient pulls the policy
    toward the reference on the tokens it sampled. Returns (loss, the detached masked mean of k3)."""
    k3 = kl_estimate(logprobs, ref_logprobs, "k3", clip)
    loss = masked_sum(k3, action_mask) / _normaliser(action_mask, num_tokens)
    return loss, masked_mean(k3.detach(), action_mask)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    clip_eps: float | None,
    num_tokens: int | float | Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2), over `num_tokens`.

    `clip_eps=None` gives the plain 0.5 * (v - R)^2. Stats: `vf_clipfrac`, the share of tokens where the clipped
    term was larger (local mean, detached).
    """
    vf_loss1 = (values - returns) ** 2
    if clip_eps is None:
        vf_loss = 0.5 * vf_loss1
        clipped = torch.zeros_like(vf_loss1)
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        vf_loss2 = (values_clipped - returns) ** 2
        vf_loss = 0.5 * torch.max(vf_loss1, vf_loss2)
        clipped = (vf_loss2 > vf_loss1).float()
    loss = masked_sum(vf_loss, action_mask) / _normaliser(action_mask, num_tokens)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean(clipped, action_mask)}
    return loss, stats
