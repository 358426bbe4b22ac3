"""The DPO losses against hand computations: Plackett-Luce over a ranking, its K = 2 case, ties, IPO, cDPO."""
import math

import pytest
import torch

from rlhf.data import Preference
from rlhf.dpo_math import dpo_loss, implicit_rewards
from rlhf.moss import Dialogue, Turn

BETA = 0.5


def lists(*ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pairs [P, 2], pair_prompt [P], row_prompt [N] of ranked lists (ranks per list, lower is better), the pairs
    formed as the preference model forms them."""
    pairs, pair_prompt, row_prompt = [], [], []
    for p, r in enumerate(ranks):
        offset = len(row_prompt)
        pref = Preference(Dialogue([Turn("q")]), [str(i) for i in range(len(r))], list(r))
        pairs += [(offset + b, offset + w) for b, w in pref.pairs()]
        pair_prompt += [p] * len(pref.pairs())
        row_prompt += [p] * len(r)
    return torch.tensor(pairs).view(-1, 2), torch.tensor(pair_prompt), torch.tensor(row_prompt)


def naive_plackett_luce(r: list[float]) -> float:
    """-log P(ranking) with r listed best first: the best is chosen among all, the next among the rest, ..."""
    return -sum(r[k] - math.log(sum(math.exp(x) for x in r[k:])) for k in range(len(r) - 1))


def test_listwise_is_the_plackett_luce_likelihood_of_the_ranking():
    policy = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.2, -1.0, 4.0])
    ref = torch.tensor([0.0, -1.0, 1.5, 1.0, 0.0, 2.0, -3.0])
    pairs, pair_prompt, row_prompt = lists([0, 1, 2, 3], [0, 1, 2])
    out = dpo_loss(policy, ref, pairs, pair_prompt, row_prompt, BETA, "listwise")
    r = implicit_rewards(policy, ref, BETA).tolist()
    expected = (naive_plackett_luce(r[:4]) + naive_plackett_luce(r[4:])) / 2
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["num_pairs"] == 6 + 3


def test_with_two_responses_listwise_equals_pairwise_dpo():
    policy, ref = torch.tensor([0.3, -0.7, 2.0, 2.5]), torch.tensor([0.1, 0.4, 1.0, 1.0])
    pairs, pair_prompt, row_prompt = lists([0, 1], [0, 1])
    r = implicit_rewards(policy, ref, BETA)
    dpo = -(torch.nn.functional.logsigmoid(r[0] - r[1]) + torch.nn.functional.logsigmoid(r[2] - r[3])) / 2
    for smoothing in (0.0, 0.1):
        listwise = dpo_loss(policy, ref, pairs, pair_prompt, row_prompt, BETA, "listwise", smoothing)["loss"]
        pairwise = dpo_loss(policy, ref, pairs, pair_prompt, row_prompt, BETA, "pairwise", smoothing)["loss"]
        assert listwise.item() == pytest.approx(pairwise.item(), rel=1e-6)
    assert dpo_loss(policy, ref, pairs, pair_prompt, row_prompt, BETA, "pairwise")["loss"].item() == \
        pytest.approx(dpo.item(), rel=1e-6)


def test_ties_make_no_term():
    policy, ref = torch.tensor([1.0, 0.0, 0.5, -1.0]), torch.zeros(4)
    # Ranks 0, 1, 1, 2: the two middle responses are tied and never compete.
    pairs, pair_prompt, row_prompt = lists([0, 1, 1, 2])
    out = dpo_loss(policy, ref, pairs, pair_prompt, row_prompt, BETA, "listwise")
    r = implicit_rewards(policy, ref, BETA).tolist()
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    expected = -(r[0] - lse(r)) - (r[1] - lse([r[1], r[3]])) - (r[2] - lse([r[2], r[3]]))
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    # A list that is all ties gives no pair and a zero loss that still backpropagates.
    policy.requires_grad_(True)
    pairs, pair_prompt, row_prompt = lists([0, 0])
    tied = dpo_loss(policy[:2], ref[:2], pairs, pair_prompt, row_prompt, BETA, "listwise")
    assert tied["num_pairs"] == 0 and tied["loss"].item() == 0.0
    tied["loss"].backward()


def test_pairwise_averages_a_prompts_pairs_and_ipo_uses_per_token_log_ratios():
    policy, ref = torch.tensor([-4.0, -6.0, -9.0]), torch.tensor([-5.0, -5.0, -8.0])
    tokens = torch.tensor([2, 4, 5])
    pairs, pair_prompt, row_prompt = lists([0, 1, 2])
    r = implicit_rewards(policy, ref, BETA)
    pairwise = dpo_loss(policy, ref, pairs, pair_prompt, row_prompt, BETA, "pairwise")
    sig = torch.nn.functional.logsigmoid
    assert pairwise["loss"].item() == pytest.approx(-(sig(r[0] - r[1]) + sig(r[0] - r[2]) + sig(r[1] - r[2])).item() / 3)
    assert pairwise["accuracy"] == pytest.approx(2 / 3)  # the (1, 2) pair's rewards are equal: not correct
    ratio = [(p - q) / t for p, q, t in zip(policy.tolist(), ref.tolist(), tokens.tolist())]
    h = [ratio[0] - ratio[1], ratio[0] - ratio[2], ratio[1] - ratio[2]]
    ipo = dpo_loss(policy, ref, pairs, pair_prompt, row_prompt, BETA, "ipo", reply_tokens=tokens)
    assert ipo["loss"].item() == pytest.approx(sum((x - 1 / (2 * BETA)) ** 2 for x in h) / 3, rel=1e-6)


def test_micro_batches_add_up_to_the_whole_batch_and_extreme_rewards_stay_finite():
    policy = torch.tensor([300.0, -200.0, 5.0, 1.0, 0.0], requires_grad=True)
    ref = torch.zeros(5)
    pairs, pair_prompt, row_prompt = lists([0, 1, 2], [0, 1])
    whole = dpo_loss(policy, ref, pairs, pair_prompt, row_prompt, BETA, "listwise", 0.1)
    first = dpo_loss(policy[:3], ref[:3], *lists([0, 1, 2]), BETA, "listwise", 0.1, num_prompts=2)
    second = dpo_loss(policy[3:], ref[3:], *lists([0, 1]), BETA, "listwise", 0.1, num_prompts=2)
    assert (first["loss"] + second["loss"]).item() == pytest.approx(whole["loss"].item(), rel=1e-6)
    whole["loss"].backward()
    assert torch.isfinite(whole["loss"]) and torch.isfinite(policy.grad).all()
