"""The advantage estimators as one table: what each needs and how it turns scores into advantages.

GAE is PPO with a critic over per-token rewards (the KL penalty folded into them); REINFORCE++ takes the same
shaped rewards without a critic; GRPO and RLOO compare the samples of one prompt by their scores alone, so their KL
penalty is a loss term instead (DeepSeekMath). The functions are in `rlhf.ppo_math`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from rlhf import ppo_math as pm


@dataclass(frozen=True)
class Estimator:
    needs_critic: bool
    """Starts a critic group, whose values the advantages need."""
    shaped_rewards: bool
    """Advantages come from per-token rewards with the KL penalty in them (so from the rollout's log-probs);
    otherwise from the scores alone, and the KL penalty is a loss term."""
    whiten: bool
    """`ppo.whiten_advantages` applies (GRPO is normalised per group already, REINFORCE++ whitens itself)."""
    advantages: Callable[..., tuple[Tensor, Tensor]]
    """(scores [B], rewards [B, R] or None, values [B, R] or None, mask [B, R], ppo settings) -> (advantages,
    returns), both [B, R]."""
    process: Optional[Callable[..., Tensor]] = None
    """For an estimator without per-token rewards: (step rewards [B, R], step mask [B, R], mask [B, R], ppo settings)
    -> the advantages a process reward model's per-step rewards add, ppo.process_reward_weight times the group-
    normalised ones (a weight inside the rewards would be normalised away); with per-token rewards they are in
    those."""


def _gae(scores, rewards, values, mask, p):
    return pm.gae(rewards, values, mask, p.gamma, p.lam)


def _grpo(scores, rewards, values, mask, p):
    adv = pm.grpo_advantages(scores, p.samples_per_prompt, action_mask=mask)
    return adv, adv


def _rloo(scores, rewards, values, mask, p):
    adv = pm.rloo_advantages(scores, p.samples_per_prompt, action_mask=mask)
    return adv, adv


def _grpo_steps(step_rewards, step_mask, mask, p):
    return p.process_reward_weight * pm.process_advantages(step_rewards, step_mask, mask, p.samples_per_prompt,
                                                           scale_by_std=True)


def _rloo_steps(step_rewards, step_mask, mask, p):
    return p.process_reward_weight * pm.process_advantages(step_rewards, step_mask, mask, p.samples_per_prompt,
                                                           scale_by_std=False)


def _reinforce_pp(scores, rewards, values, mask, p):
    adv = pm.reinforce_pp_advantages(rewards, mask, p.gamma)
    return adv, adv


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(needs_critic=True, shaped_rewards=True, whiten=True, advantages=_gae),
    "grpo": Estimator(needs_critic=False, shaped_rewards=False, whiten=False, advantages=_grpo, process=_grpo_steps),
    "rloo": Estimator(needs_critic=False, shaped_rewards=False, whiten=True, advantages=_rloo, process=_rloo_steps),
    "reinforce_pp": Estimator(needs_critic=False, shaped_rewards=True, whiten=False, advantages=_reinforce_pp),
}


def advantages(p, scores: Tensor, rewards: Optional[Tensor], values: Optional[Tensor], mask: Tensor,
               steps: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """The configured estimator's (advantages, returns) [B, R], whitened where the settings and estimator say.
    `steps`: a process reward model's per-step rewards, unweighted, and where the steps end ([B, R] each); in
    `rewards` (weighted) for the estimators that have per-token rewards, added to the advantages as the estimator
    says otherwise."""
    estimator = ESTIMATORS[p.estimator]
    adv, ret = estimator.advantages(scores, rewards, values, mask, p)
    if steps is not None and estimator.process is not None:
        adv = adv + estimator.process(*steps, mask, p)
        ret = adv
    if p.whiten_advantages and estimator.whiten:
        adv = pm.masked_whiten(adv, mask)
    return adv, ret


def kl_in_loss(p) -> bool:
    """Whether the KL penalty is a term of the policy's loss (GRPO, RLOO with a KL coefficient)."""
    return not ESTIMATORS[p.estimator].shaped_rewards and p.kl_coef > 0
