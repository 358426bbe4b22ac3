"""The PPO math against hand-computed numbers on small tensors."""

import json
import math

import numpy as np
import pytest
import torch

from rlhf.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    broadcast_to_tokens,
    entropy_from_logits,
    gae,
    grpo_advantages,
    kl_estimate,
    kl_loss,
    logprobs_from_logits,
    make_kl_controller,
    masked_mean,
    masked_var,
    masked_whiten,
    normalize_scores,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    shape_rewards,
    truncated_is_weights,
    value_loss,
)


def approx(x, rel=1e-5, abs=1e-6):
    return pytest.approx(x, rel=rel, abs=abs)


# ---------------------------------------------------------------------------------------------------- masked stats


def test_masked_stats_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -100.0, -100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    real = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert masked_mean(x, mask).item() == approx(real.mean())
    assert masked_var(x, mask).item() == approx(real.var(ddof=1))
    assert masked_var(x, mask, unbiased=False).item() == approx(real.var())
    assert masked_mean(x, mask, dim=1).tolist() == approx([2.0, 4.5])
    white = masked_whiten(x, mask)
    assert masked_mean(white, mask).item() == approx(0.0)
    assert masked_var(white, mask).item() == approx(1.0, rel=1e-4)
    assert white[0, 3].item() == 0.0 and white[1, 2].item() == 0.0
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_logprobs_and_entropy_match_the_definition():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    labels = torch.randint(0, 7, (2, 3))
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, labels), expected, atol=1e-6)
    assert logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32

    probs = torch.softmax(logits, -1)
    assert torch.allclose(entropy_from_logits(logits), -(probs * probs.log()).sum(-1), atol=1e-5)
    # a uniform distribution over 7 tokens has entropy log 7
    assert entropy_from_logits(torch.zeros(1, 1, 7)).item() == approx(math.log(7))


# ---------------------------------------------------------------------------------------------------- KL


def test_kl_estimators_on_known_numbers():
    logprobs = torch.tensor([-1.0, -2.0, -0.3])
    ref_logprobs = torch.tensor([-1.5, -1.0, -0.3])
    # log_ratio = [0.5, -1.0, 0.0]
    assert kl_estimate(logprobs, ref_logprobs, "k1").tolist() == approx([0.5, -1.0, 0.0])
    assert kl_estimate(logprobs, ref_logprobs, "k2").tolist() == approx([0.125, 0.5, 0.0])
    # k3 = exp(-lr) - 1 + lr: exp(-0.5) - 0.5 = 0.1065307, exp(1) - 2 = 0.7182818, 0
    assert kl_estimate(logprobs, ref_logprobs, "k3").tolist() == approx([math.exp(-0.5) - 0.5, math.e - 2, 0.0])
    assert kl_estimate(logprobs, ref_logprobs, "abs").tolist() == approx([0.5, 1.0, 0.0])


def test_k3_is_never_negative():
    torch.manual_seed(0)
    k3 = kl_estimate(torch.randn(1000) * 3, torch.randn(1000) * 3, "k3")
    assert (k3 >= 0).all()


def test_unknown_kl_kind_names_the_allowed_ones():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


def test_adaptive_kl_controller_moves_towards_target_and_clips_the_error():
    ctl = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=1000)  # error = 1.0, clipped to 0.2: coef *= 1 + 0.2 * 0.1
    assert ctl.coef == approx(0.2 * 1.02)
    ctl.update(current_kl=3.0, n_steps=1000)  # error = -0.5, clipped to -0.2: coef *= 0.98
    assert ctl.coef == approx(0.2 * 1.02 * 0.98)
    ctl.update(current_kl=6.6, n_steps=1000)  # error = 0.1, inside the clip: coef *= 1.01
    assert ctl.coef == approx(0.2 * 1.02 * 0.98 * 1.01)
    ctl.update(current_kl=6.0, n_steps=1000)  # on target: unchanged
    assert ctl.coef == approx(0.2 * 1.02 * 0.98 * 1.01)

    restored = make_kl_controller("adaptive", init_coef=1.0, target=1.0, horizon=1.0)
    restored.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert restored.coef == ctl.coef and restored.target == 6.0 and restored.horizon == 10000


def test_adaptive_kl_controller_never_falls_below_its_floor_and_climbs_from_there():
    ctl = make_kl_controller("adaptive", init_coef=0.05, target=0.1, horizon=32, min_coef=0.02)
    for _ in range(20):  # below target for 20 iterations of 32 rollouts: 20% down each, held at the floor
        ctl.update(current_kl=0.01, n_steps=32)
    assert ctl.coef == approx(0.02)
    ctl.update(current_kl=0.5, n_steps=32)  # above: up 20% from the floor, not from a coefficient worn to ~0
    assert ctl.coef == approx(0.024)


def test_fixed_kl_controller_and_factory():
    ctl = make_kl_controller("fixed", init_coef=0.05)
    assert isinstance(ctl, FixedKLController)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.coef == 0.05
    with pytest.raises(ValueError, match="target and horizon"):
        make_kl_controller("adaptive", init_coef=0.1)
    with pytest.raises(ValueError, match="fixed.*adaptive"):
        make_kl_controller("pid", init_coef=0.1)


# ---------------------------------------------------------------------------------------------------- scores


def test_running_moments_merged_over_batches_equal_numpy_on_the_concatenation():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (3, 5, 1, 8)]
    running = RunningMoments()
    for b in batches:
        batch_mean, batch_std = running.update(torch.tensor(b, dtype=torch.float32))
        assert batch_mean == approx(b.mean()) and batch_std == approx(b.std(), rel=1e-4)
    everything = np.concatenate(batches)
    assert running.count == len(everything)
    assert running.mean == approx(everything.mean())
    assert running.std == approx(everything.std(), rel=1e-5)

    restored = RunningMoments()
    restored.load_state_dict(json.loads(json.dumps(running.state_dict())))
    assert (restored.mean, restored.std, restored.count) == (running.mean, running.std, running.count)


def test_normalize_scores_uses_running_stats_and_clips():
    running = RunningMoments()
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(1.25)  # population std of 1..4 around the mean 2.5
    out = normalize_scores(scores, running, clip=None)
    assert out.tolist() == approx([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std])
    out = normalize_scores(scores, running, clip=1.0, update=False)  # same stats: 1.5 / 1.118 = 1.34 clips to 1
    assert out.tolist() == approx([-1.0, -0.5 / std, 0.5 / std, 1.0])
    assert running.count == 4


def test_shape_rewards_puts_the_score_on_the_last_action_token():
    action_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    scores = torch.tensor([2.0, -3.0, 7.0])
    logprobs = torch.full((3, 4), -1.0)
    rewards, kl = shape_rewards(scores, logprobs, logprobs.clone(), action_mask, kl_coef=0.1)
    expected = torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -3.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(rewards, expected)
    assert torch.equal(kl, torch.zeros(3, 4))

    # with a KL of 0.5 per token: -0.1 * 0.5 on every action token, padding untouched
    rewards, kl = shape_rewards(scores, logprobs, logprobs - 0.5, action_mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, -0.05, 1.95, 0.0], [-0.05, -0.05, -0.05, -3.05], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)
    assert torch.equal(kl, 0.5 * action_mask.float())


# ---------------------------------------------------------------------------------------------------- GAE


def test_gae_on_a_hand_unrolled_three_step_episode_with_right_padding():
    gamma, lam = 0.9, 0.5
    # row 0: three action tokens; row 1: the same three plus two padding tokens holding garbage
    rewards = torch.tensor([[0.1, 0.2, 1.0, 0.0, 0.0], [0.1, 0.2, 1.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.0, 0.0], [0.5, 0.4, 0.3, 5.0, 5.0]])
    action_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    # t=2: delta = 1.0 + 0.9 * 0   - 0.3 =  0.7                A2 = 0.7
    # t=1: delta = 0.2 + 0.9 * 0.3 - 0.4 =  0.07               A1 = 0.07  + 0.45 * 0.7   = 0.385
    # t=0: delta = 0.1 + 0.9 * 0.4 - 0.5 = -0.04               A0 = -0.04 + 0.45 * 0.385 = 0.13325
    # returns = A + V = [0.63325, 0.785, 1.0]
    advantages, returns = gae(rewards, values, action_mask, gamma, lam)
    for row in range(2):
        assert advantages[row].tolist() == approx([0.13325, 0.385, 0.7, 0.0, 0.0])
        assert returns[row].tolist() == approx([0.63325, 0.785, 1.0, 0.0, 0.0])


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.5, 0.9, 3.0]])
    action_mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, action_mask, gamma=1.0, lam=1.0)
    assert returns.tolist() == [approx([1.0, 1.0, 1.0, 0.0])]
    assert advantages.tolist() == [approx([0.8, 0.5, 0.1, 0.0])]


def test_gae_skips_a_hole_in_the_action_mask():
    # plugin results inside a reply are not actions: GAE must join the action tokens around them
    rewards = torch.tensor([[0.1, 0.0, 0.2, 1.0]])
    values = torch.tensor([[0.5, 7.0, 0.4, 0.3]])
    holed, _ = gae(rewards, values, torch.tensor([[1, 0, 1, 1]]), 0.9, 0.5)
    compact, _ = gae(rewards[:, [0, 2, 3]], values[:, [0, 2, 3]], torch.ones(1, 3), 0.9, 0.5)
    assert holed[0, [0, 2, 3]].tolist() == approx(compact[0].tolist())
    assert holed[0, 1].item() == 0.0


# ---------------------------------------------------------------------------------------------------- losses


def test_policy_loss_is_minus_the_advantage_when_the_ratio_is_one():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    advantages = torch.tensor([[1.0, -2.0, 0.5]])
    action_mask = torch.tensor([[1, 1, 0]])
    loss, stats = policy_loss(logprobs, logprobs.detach(), advantages, action_mask, clip_eps=0.2)
    assert loss.item() == approx(-(1.0 - 2.0) / 2)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == approx(0.0)
    loss.backward()  # d loss / d logprob = -A / num_tokens at ratio 1; padding gets no gradient
    assert logprobs.grad.tolist() == [approx([-0.5, 1.0, 0.0])]


def test_kl_loss_is_k3_over_the_global_tokens_and_pulls_toward_the_reference():
    ref = torch.tensor([[-1.0, -1.0, -1.0]])
    logprobs = torch.tensor([[-0.5, -1.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss, mean_kl = kl_loss(logprobs, ref, mask, num_tokens=4)
    k3 = math.exp(-0.5) - 1 + 0.5  # first token; the second equals the reference; the third is padding
    assert loss.item() == approx(k3 / 4) and mean_kl.item() == approx(k3 / 2)
    loss.backward()  # d k3 / d logp = 1 - exp(ref - logp): positive where the policy is above the reference
    assert logprobs.grad.tolist() == [approx([(1 - math.exp(-0.5)) / 4, 0.0, 0.0])]
    same, _ = kl_loss(ref, ref, mask)
    assert same.item() == 0.0


def test_policy_loss_clips_on_both_sides():
    # ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, +1, -1, -1 and eps 0.2
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    old_logprobs = torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    action_mask = torch.ones(1, 4)
    loss, stats = policy_loss(ratio.log(), old_logprobs, advantages, action_mask, clip_eps=0.2)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2 (clipped)   A>0, r=0.5: max(-0.5, -0.8) = -0.5
    # A<0, r=0.5: max(0.5, 0.8)   =  0.8 (clipped)   A<0, r=1.5: max(1.5, 1.2)   =  1.5
    assert loss.item() == approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert stats["clipfrac"].item() == approx(0.5)
    # approx_kl is k3 of KL(old || new): mean(r - 1 - log r)
    expected_kl = np.mean([r - 1 - math.log(r) for r in (1.5, 0.5, 0.5, 1.5)])
    assert stats["approx_kl"].item() == approx(expected_kl)


def test_dual_clip_caps_the_loss_of_negative_advantages():
    ratio = torch.tensor([[5.0, 5.0]])
    advantages = torch.tensor([[-1.0, 1.0]])
    args = (ratio.log(), torch.zeros(1, 2), advantages, torch.ones(1, 2))
    plain, _ = policy_loss(*args, clip_eps=0.2)
    dual, _ = policy_loss(*args, clip_eps=0.2, dual_clip=3.0)
    assert plain.item() == approx((5.0 - 1.2) / 2)  # A<0: 5.0; A>0: clipped to -1.2
    assert dual.item() == approx((3.0 - 1.2) / 2)  # A<0 capped at 3 * |A|
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(*args, clip_eps=0.2, dual_clip=0.5)


def test_value_loss_clipping():
    old_values = torch.tensor([[1.0, 1.0, 1.0]])
    values = torch.tensor([[1.5, 1.1, 0.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.0, 3.0]])
    action_mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, action_mask, clip_eps=0.2)
    # token 0: v=1.5 clipped to 1.2: max(0.25, 0.64) = 0.64 (clipped term larger)
    # token 1: v=1.1 inside the clip: max(1.21, 1.21) = 1.21
    assert loss.item() == approx(0.5 * (0.64 + 1.21) / 2)
    assert stats["vf_clipfrac"].item() == approx(0.5)
    unclipped, stats = value_loss(values, old_values, returns, action_mask, clip_eps=None)
    assert unclipped.item() == approx(0.5 * (0.25 + 1.21) / 2)
    assert stats["vf_clipfrac"].item() == 0.0


def test_micro_batch_losses_with_the_global_token_count_add_up_to_the_whole_batch():
    torch.manual_seed(0)
    B, T = 6, 5
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    action_mask = (torch.arange(T) < lengths[:, None]).float()  # [batch, response_len]
    logprobs = (torch.randn(B, T) * 0.3 - 1).requires_grad_()
    old_logprobs = logprobs.detach() + torch.randn(B, T) * 0.3
    advantages = torch.randn(B, T)
    values = torch.randn(B, T, requires_grad=True)
    old_values = values.detach() + torch.randn(B, T) * 0.3
    returns = torch.randn(B, T)

    def losses(rows, num_tokens):
        pl, _ = policy_loss(logprobs[rows], old_logprobs[rows], advantages[rows], action_mask[rows], 0.2, num_tokens)
        vl, _ = value_loss(values[rows], old_values[rows], returns[rows], action_mask[rows], 0.2, num_tokens)
        return pl + vl

    whole = losses(slice(0, B), None)
    whole_grads = torch.autograd.grad(whole, [logprobs, values])
    num_tokens = action_mask.sum()  # 20 tokens, unevenly split 9 / 11 between the micro-batches
    split = losses(slice(0, 2), num_tokens) + losses(slice(2, B), num_tokens)
    split_grads = torch.autograd.grad(split, [logprobs, values])
    assert split.item() == approx(whole.item())
    for a, b in zip(whole_grads, split_grads):
        assert torch.allclose(a, b, atol=1e-6)
    # a per-micro-batch mean would weigh the short micro-batch's tokens more: the rule is not a no-op here
    naive = (losses(slice(0, 2), None) + losses(slice(2, B), None)) / 2
    assert naive.item() != approx(whole.item())


# ---------------------------------------------------------------------------------------------------- critic-free


def test_grpo_advantages_on_known_numbers():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 8.0])  # two prompts, three samples each
    adv = grpo_advantages(scores, group_size=3)
    # group 1: mean 2, std 1; group 2: mean 6, std sqrt((1 + 1 + 4) / 2) = sqrt(3)
    s3 = math.sqrt(3)
    assert adv.tolist() == approx([-1.0, 0.0, 1.0, -1 / s3, -1 / s3, 2 / s3], rel=1e-5)
    assert grpo_advantages(scores, 3, scale_by_std=False).tolist() == approx([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0])

    action_mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [0, 0], [1, 0]])
    tokens = grpo_advantages(scores, 3, action_mask=action_mask)
    assert tokens.shape == (6, 2)
    assert tokens[0].tolist() == approx([-1.0, -1.0]) and tokens[1].tolist() == [0.0, 0.0]
    assert tokens[5].tolist() == approx([2 / s3, 0.0])
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(scores, group_size=4)


def test_rloo_advantages_on_known_numbers():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 8.0])
    # 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5; 5 - (5+8)/2 = -1.5 (twice), 8 - 5 = 3
    assert rloo_advantages(scores, group_size=3).tolist() == approx([-1.5, 0.0, 1.5, -1.5, -1.5, 3.0])
    action_mask = torch.tensor([[1, 1, 0]] * 6)
    assert rloo_advantages(scores, 3, action_mask=action_mask)[5].tolist() == approx([3.0, 3.0, 0.0])


def test_reinforce_pp_advantages_on_known_numbers():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    action_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # returns-to-go with gamma 1: [1, 1, 1] and [2, 2, -]; over the 5 tokens mean 1.4, unbiased var 0.3
    adv = reinforce_pp_advantages(rewards, action_mask)
    s = math.sqrt(0.3)
    assert adv[0].tolist() == approx([-0.4 / s] * 3, rel=1e-4)
    assert adv[1].tolist() == approx([0.6 / s, 0.6 / s, 0.0], rel=1e-4)

    # the discount: gamma 0.5 gives returns [0.25, 0.5, 1] before whitening
    one = reinforce_pp_advantages(torch.tensor([[0.0, 0.0, 1.0]]), torch.ones(1, 3), gamma=0.5)
    r = np.array([0.25, 0.5, 1.0])
    assert one[0].tolist() == approx(((r - r.mean()) / r.std(ddof=1)).tolist(), rel=1e-4)


def test_broadcast_to_tokens():
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


def test_a_far_off_reference_gives_a_bounded_k3_penalty_and_a_finite_gradient():
    """One token where the reference is 60 nats above the policy: unclamped, k3 = e^60 (and its gradient) swamps
    the batch; with the default bound of 10 the penalty stays below e^10 and the gradient is finite."""
    logprobs = torch.tensor([[-70.0, -1.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-10.0, -1.2, -0.4]])
    mask = torch.ones(1, 3)
    assert kl_estimate(logprobs, ref, "k3")[0, 0] > 1e25
    bounded = kl_estimate(logprobs, ref, "k3", clip=10.0)
    assert float(bounded.max()) < math.exp(10) and bounded[0, 1:].tolist() == approx(
        kl_estimate(logprobs, ref, "k3")[0, 1:].tolist())  # tokens inside the bound are unchanged
    loss, _ = kl_loss(logprobs, ref, mask, clip=10.0)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all() and float(logprobs.grad.abs().max()) < math.exp(10)


def test_the_policy_log_ratio_is_bounded_and_the_bound_is_reported():
    old = torch.tensor([[-100.0, -1.0]])
    logprobs = torch.tensor([[-1.0, -1.1]], requires_grad=True)
    advantages, mask = torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    free, free_stats = policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    assert not torch.isfinite(torch.exp(logprobs - old)).all()  # e^99 overflows float32
    bounded, stats = policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, log_ratio_clip=20.0)
    bounded.backward()
    assert torch.isfinite(bounded) and torch.isfinite(logprobs.grad).all()
    assert float(stats["log_ratio_clipfrac"]) == approx(0.5) and float(free_stats["log_ratio_clipfrac"]) == 0.0


def test_truncated_importance_weights_correct_for_the_sampler_and_are_capped():
    """Decoupled PPO: a token the engine sampled at half the trainer's probability counts double; one it sampled
    at a tenth counts at most `cap`; the weights carry no gradient and scale each token's clipped loss."""
    old = torch.log(torch.tensor([[0.5, 0.5, 0.9]]))
    behaviour = torch.log(torch.tensor([[0.25, 0.05, 0.9]]))
    weights = truncated_is_weights(old, behaviour, 2.0)
    assert torch.allclose(weights, torch.tensor([[2.0, 2.0, 1.0]]))
    assert torch.allclose(truncated_is_weights(old, behaviour, None), torch.tensor([[2.0, 10.0, 1.0]]))
    logp = old.clone().requires_grad_(True)
    adv, mask = torch.tensor([[1.0, -1.0, 0.5]]), torch.ones(1, 3)
    plain, _ = policy_loss(logp, old, adv, mask, 0.2)
    weighted, _ = policy_loss(logp, old, adv, mask, 0.2, is_weights=weights)
    assert float(weighted) == pytest.approx(-(2.0 * 1.0 - 2.0 * 1.0 + 0.5) / 3)  # ratio 1: loss = -mean(w * A)
    assert float(plain) == pytest.approx(-(1.0 - 1.0 + 0.5) / 3)
    weighted.backward()
    assert torch.allclose(logp.grad, -(weights * adv) / 3)
