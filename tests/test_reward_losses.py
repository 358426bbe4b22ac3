"""The ranked-list preference loss against a naive loop over explicit pairs and hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from reward.losses import ranking_loss


def ranked_batch():
    """Three prompts with K = 2, 3 and 4 responses (the last with a tie); lower rank is better."""
    ranks = [[0, 1], [0, 1, 2], [0, 1, 1, 2]]
    pairs, pair_prompt, offset = [], [], 0
    for prompt, prompt_ranks in enumerate(ranks):
        for i in range(len(prompt_ranks)):
            for j in range(len(prompt_ranks)):
                if prompt_ranks[i] < prompt_ranks[j]:  # equal ranks make no pair
                    pairs.append((offset + i, offset + j))
                    pair_prompt.append(prompt)
        offset += len(prompt_ranks)
    return offset, torch.tensor(pairs), torch.tensor(pair_prompt)


def naive_loss(scores, pairs, pair_prompt, margins, alpha):
    """Mean over prompts of the mean over each prompt's explicit pairs, one pair at a time."""
    per_prompt = {}
    for k, ((b, w), prompt) in enumerate(zip(pairs.tolist(), pair_prompt.tolist())):
        m = margins[k] if isinstance(margins, list) else margins
        d = scores[b] - scores[w] - m
        loss = -(1 - alpha) * F.logsigmoid(d) - alpha * F.logsigmoid(-d)
        per_prompt.setdefault(prompt, []).append(loss)
    return sum(sum(losses) / len(losses) for losses in per_prompt.values()) / len(per_prompt)


def test_ranked_list_loss_equals_the_naive_loop_over_explicit_pairs():
    n, pairs, pair_prompt = ranked_batch()
    # 1 pair for K=2, 3 for K=3, 5 for K=4 with one tie (6 - 1)
    assert pair_prompt.bincount().tolist() == [1, 3, 5]
    torch.manual_seed(0)
    scores = torch.randn(n)
    margins = torch.rand(len(pairs))
    for m, alpha in [(0.0, 0.0), (margins, 0.0), (0.0, 0.1), (margins, 0.2)]:
        out = ranking_loss(scores, pairs, pair_prompt, margins=m, label_smoothing=alpha)
        expected = naive_loss(scores, pairs, pair_prompt, m.tolist() if torch.is_tensor(m) else m, alpha)
        assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
        assert out["num_pairs"] == 9


def test_prompts_with_many_responses_do_not_dominate():
    # prompt 0: one pair with loss log 2; prompt 1: five pairs, all with the same loss
    scores = torch.tensor([0.0, 0.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    pairs = torch.tensor([[0, 1], [2, 3], [2, 4], [2, 5], [2, 6], [2, 7]])
    pair_prompt = torch.tensor([0, 1, 1, 1, 1, 1])
    out = ranking_loss(scores, pairs, pair_prompt)
    lossy = -F.logsigmoid(torch.tensor(2.0)).item()
    assert out["loss"].item() == pytest.approx((math.log(2) + lossy) / 2)


def test_margin_and_label_smoothing_against_hand_computed_values():
    pairs, pair_prompt = torch.tensor([[0, 1]]), torch.tensor([0])
    # d = 1 - 0 - margin 1 = 0: -log sigmoid(0) = log 2, whatever the smoothing
    for alpha in (0.0, 0.1, 0.3):
        out = ranking_loss(torch.tensor([1.0, 0.0]), pairs, pair_prompt, margins=1.0, label_smoothing=alpha)
        assert out["loss"].item() == pytest.approx(math.log(2))
    # d = 2, alpha 0.1: 0.9 * 0.126928 + 0.1 * 2.126928 = 0.326928 (log sigmoid(-d) = log sigmoid(d) - d)
    out = ranking_loss(torch.tensor([2.0, 0.0]), pairs, pair_prompt, label_smoothing=0.1)
    assert out["loss"].item() == pytest.approx(0.3269280, rel=1e-6)
    # per-pair margins: d = 2 - 0.5 = 1.5 and d = 1 - 3 = -2
    scores = torch.tensor([2.0, 0.0, 1.0, 0.0])
    out = ranking_loss(scores, torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 0]), margins=torch.tensor([0.5, 3.0]))
    expected = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(2.0))) / 2
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        ranking_loss(scores, pairs, pair_prompt, label_smoothing=0.7)


def test_gradient_flows_to_every_ranked_score():
    n, pairs, pair_prompt = ranked_batch()
    scores = torch.zeros(n, requires_grad=True)
    ranking_loss(scores, pairs, pair_prompt)["loss"].backward()
    # at equal scores the better of a pair is pushed up, the worse down; the best of each prompt goes up
    assert scores.grad[0] < 0 and scores.grad[1] > 0
    assert scores.grad[2] < 0 and scores.grad[4] > 0
    assert scores.grad[5] < 0 and scores.grad[8] > 0
    # a middle response is pushed up by its worse and down by its better neighbours: at equal scores they cancel
    assert scores.grad[3].item() == pytest.approx(0.0)
    assert scores.grad[6].item() == pytest.approx(scores.grad[7].item())

    # away from equal scores, every response gets the gradient of the naive loop over pairs
    torch.manual_seed(2)
    start = torch.randn(n)
    scores = start.clone().requires_grad_()
    ranking_loss(scores, pairs, pair_prompt, margins=0.3, label_smoothing=0.1)["loss"].backward()
    naive_scores = start.clone().requires_grad_()
    naive_loss(naive_scores, pairs, pair_prompt, 0.3, 0.1).backward()
    assert torch.allclose(scores.grad, naive_scores.grad, atol=1e-6)
    assert (scores.grad != 0).all()


def test_accuracy_and_mean_margin():
    scores = torch.tensor([2.0, 1.0, 0.0, 1.0, 5.0, 5.0], requires_grad=True)
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5]])  # right (+1), wrong (-1), a tie in score counts as wrong (0)
    out = ranking_loss(scores, pairs, torch.tensor([0, 1, 2]))
    assert out["accuracy"].item() == pytest.approx(1 / 3)
    assert out["mean_margin"].item() == pytest.approx(0.0)
    assert not out["accuracy"].requires_grad and not out["mean_margin"].requires_grad
    assert out["loss"].requires_grad


def test_global_prompt_count_makes_shards_add_up_to_the_whole_batch():
    n, pairs, pair_prompt = ranked_batch()
    torch.manual_seed(1)
    scores = torch.randn(n)
    whole = ranking_loss(scores, pairs, pair_prompt)["loss"]
    # shard A holds prompt 0, shard B prompts 1 and 2 (re-indexed locally); both divide by the global 3 prompts
    in_a = pair_prompt == 0
    shard_a = ranking_loss(scores, pairs[in_a], pair_prompt[in_a], num_prompts=3)["loss"]
    shard_b = ranking_loss(scores, pairs[~in_a], pair_prompt[~in_a] - 1, num_prompts=3)["loss"]
    assert (shard_a + shard_b).item() == pytest.approx(whole.item(), rel=1e-6)


def test_no_pairs_gives_a_zero_loss_that_still_backpropagates():
    scores = torch.tensor([1.0, 1.0], requires_grad=True)
    out = ranking_loss(scores, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and out["num_pairs"] == 0
    assert scores.grad.tolist() == [0.0, 0.0]
