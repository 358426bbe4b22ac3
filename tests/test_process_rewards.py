"""PPO with a process reward model (issue 33): the step rewards as pure functions, a policy's reply split into steps
as a training solution is, the prm role's step probabilities equal to `rlhf prm-eval`'s, and `rlhf ppo
--process-reward` on Ray with a rollout group that scores ahead. How the step rewards reach the advantages of each
estimator is in tests/test_ppo_iteration.py."""
from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf import estimators, ppo_math as pm
from reward.steps import reply_features, reply_step_mask, step_ends

P = torch.tensor([[0.9, 0.0, 0.2, 0.0], [0.0, 0.6, 0.0, 0.0]])
MARKS = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])


def test_per_step_rewards_clip_at_the_threshold_or_centre_on_it():
    assert torch.allclose(pm.step_rewards(P, MARKS, "clip", 0.5),
                          torch.tensor([[0.0, 0.0, -0.3, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(pm.step_rewards(P, MARKS, "step", 0.5),
                          torch.tensor([[0.4, 0.0, -0.3, 0.0], [0.0, 0.1, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="per-step"):
        pm.step_rewards(P, MARKS, "min", 0.5)


def test_per_reply_scores_are_the_weakest_or_the_last_step_and_zero_without_steps():
    marks = torch.cat([MARKS, torch.zeros(1, 4)])
    probs = torch.cat([P, torch.zeros(1, 4)])
    assert torch.allclose(pm.reply_step_score(probs, marks, "min"), torch.tensor([0.2, 0.6, 0.0]))
    assert torch.allclose(pm.reply_step_score(probs, marks, "last"), torch.tensor([0.2, 0.6, 0.0]))
    early = torch.tensor([[0.3, 0.0, 0.8, 0.0]])
    assert torch.allclose(pm.reply_step_score(early, MARKS[:1], "min"), torch.tensor([0.3]))
    assert torch.allclose(pm.reply_step_score(early, MARKS[:1], "last"), torch.tensor([0.8]))


def test_process_advantages_sum_the_group_normalised_rewards_of_the_steps_to_come():
    """DeepSeekMath's process supervision, by hand: a group of two replies with three steps in all."""
    rewards = torch.tensor([[0.0, 1.0, 0.0, 3.0], [2.0, 0.0, 0.0, 0.0]])
    marks = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    action = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    std = math.sqrt(2 / 3)  # of 1, 3, 2 (mean 2), over the group's steps
    n1, n3, n2 = -1 / std, 1 / std, 0.0
    expected = torch.tensor([[n1 + n3, n1 + n3, n3, n3], [n2, 0.0, 0.0, 0.0]])
    assert torch.allclose(pm.process_advantages(rewards, marks, action, 2), expected, atol=1e-5)
    centred = pm.process_advantages(rewards, marks, action, 2, scale_by_std=False)
    assert torch.allclose(centred, torch.tensor([[2.0 - 2.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    # A group whose steps all score the same adds nothing; and the group size is checked as the scores' is.
    same = pm.process_advantages(torch.full((2, 4), -0.2) * marks, marks, action, 2)
    assert torch.allclose(same, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="group_size"):
        pm.process_advantages(rewards, marks, action, 3)


def test_an_estimator_with_per_token_rewards_takes_the_steps_there_and_not_again():
    class P_:
        estimator, gamma, lam, whiten_advantages, samples_per_prompt = "gae", 1.0, 1.0, False, 2
    rewards = torch.tensor([[0.0, -0.5, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    steps = (torch.tensor([[0.0, -0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), MARKS)
    values = torch.zeros(2, 4)
    with_steps = estimators.advantages(P_, torch.zeros(2), rewards, values, mask, steps)
    assert all(torch.equal(a, b) for a, b in zip(with_steps, estimators.advantages(P_, torch.zeros(2), rewards,
                                                                                   values, mask)))
    assert torch.allclose(with_steps[1][0], torch.tensor([0.5, 0.5, 1.0, 1.0]))  # the step's -0.5 in the returns
    assert {name for name, e in estimators.ESTIMATORS.items() if e.process is not None} == \
        {name for name, e in estimators.ESTIMATORS.items() if not e.shaped_rewards}


def test_a_policys_reply_ends_a_step_at_each_separator_and_at_each_stretch_it_wrote():
    """Token i's text is TEXTS[i]; the <eom> (id 9) is no step, and a plugin reply's Results (not written by the
    policy) split its Inner Thoughts and Commands from the final reply."""
    texts = ["1 + 2", " = 3", "\n", "3 + 4 = 7", "\n", "The answer is 7.", "<|Commands|>: calc", "<eoc>",
             "Results: 7", "<eom>", "<pad>"]
    pieces = lambda token: texts[token]  # noqa: E731
    plain = torch.tensor([[0, 1, 2, 3, 4, 5, 9, 10]])
    written = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    assert reply_step_mask(plain, written, pieces, "\n", 9).tolist() == [[0, 1, 0, 1, 0, 1, 0, 0]]
    assert step_ends([0, 1, 2, 3, 4, 5], pieces, "\n") == [1, 3, 5]  # what a training solution's split gives
    plugin = torch.tensor([[6, 7, 8, 0, 1, 9]])
    acts = torch.tensor([[1, 1, 0, 1, 1, 1]])
    assert reply_step_mask(plugin, acts, pieces, "\n", 9).tolist() == [[0, 1, 0, 0, 1, 0]]


def test_the_running_minimum_reads_only_the_tokens_the_policy_wrote():
    values = torch.tensor([[0.5, 1.0, 2.0, 3.0]])
    logp = torch.tensor([[-1.0, -9.0, -2.0, -0.5]])
    acts = torch.tensor([[1, 0, 1, 1]])
    features = reply_features(values, logp, acts)
    assert features[0, :, 0].tolist() == [0.5, 1.0, 2.0, 3.0]
    assert features[0, :, 1].tolist() == [-1.0, -1.0, -2.0, -2.0]


def test_the_prm_role_gives_a_reply_the_step_probabilities_prm_eval_gives_the_same_solution(tiny, tiny_prm):
    """A solution's dialogue as PPO holds it (the prompt left-padded, the reply right-padded beside it): the prm role
    finds the same step ends and the same calibrated probabilities as the scorer `rlhf prm-eval` and best-of-N use."""
    import dataclasses
    from actors.local import LocalBackend
    from actors.rank import RankSpec
    from actors.scalar import PRMWorker
    from reward.scorer import ProcessScorer
    from reward.steps import encode_reply
    from rlhf.batching import experience, pad
    from rlhf.config import load_config
    from rlhf.data import load_steps
    from rlhf.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_prm)
    solutions = load_steps(tiny["steps_eval"])[:5]
    dialogues = [s.dialogue("\n") for s in solutions]
    encoded = [encode_reply(d, tokenizer, 256, False, "\n")[0] for d in dialogues]
    pad_id = tokenizer.pad_token_id
    prompts = [e.ids[:e.reply_start] for e in encoded]
    width = max(map(len, prompts))
    prompt_batch = {"input_ids": torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts]),
                    "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])}
    replies = [e.ids[e.reply_start:] for e in encoded]
    written = pad([[1] * len(r) for r in replies], 0)
    rollout = {"response_ids": pad(replies, pad_id), "action_mask": written, "response_mask": written}
    exp = experience(prompt_batch, rollout)

    cfg = load_config("ppo", "configs/tiny/ppo.yaml", [f"roles.prm.model={tiny_prm}", "roles.prm.micro_batch_size=2"])
    groups = LocalBackend().start({"prm": (PRMWorker, RankSpec(tiny_prm, cfg.roles.prm, cfg.model, 0))})
    try:
        found = groups.groups["prm"].call("step_scores", exp).result()
    finally:
        groups.stop()
    scorer = ProcessScorer.load(dataclasses.replace(cfg.model, path=tiny_prm), load_config("prm").data)
    expected = scorer.step_probabilities(dialogues)
    for row, (e, probs) in enumerate(zip(encoded, expected)):
        ends = found["mask"][row].nonzero().flatten().tolist()
        assert ends == [end - e.reply_start for end in e.ends] and len(ends) == len(solutions[row].steps)
        assert found["probs"][row, ends].tolist() == pytest.approx(probs, abs=1e-5)
    assert len({round(p, 3) for ps in expected for p in ps}) > 5  # the probabilities differ from step to step


@pytest.mark.slow
def test_ppo_with_a_process_reward_on_ray_scores_every_step_of_a_rollout_groups_replies_ahead(tiny, tiny_prm,
                                                                                               tmp_path):
    """`rlhf ppo --process-reward` with answer-rule rewards and no preference model: a prm group of two ranks scores
    the replies the rollout group generates one iteration ahead, and the run logs the step
    rewards."""
    from conftest import run_cli
    from rlhf.metrics import read_metrics
    out = tmp_path / "ppo"
    assert run_cli("ppo", "--config", "configs/tiny/ppo_overlap.yaml", "--policy", tiny["base"], "--process-reward",
                   tiny_prm, "--prompts", tiny["steps_prompts"], "--set", f"data.eval={tiny['steps_prompts_eval']}",
                   "--set", "ppo.reward_model_weight=0", "--set", "ppo.reward_rules.answer=1.0",
                   "--set", "ppo.eval_rules={answer_accuracy: answer}", "--set", "ppo.estimator=grpo",
                   "--set", "ppo.samples_per_prompt=2", "--set", "ppo.prompts_per_iteration=4",
                   "--set", "ppo.train_batch_size=8", "--set", "ppo.ppo_epochs=1", "--set", "ppo.iterations=2",
                   "--set", "ppo.eval_prompts=4", "--set", "generation.max_new_tokens=16",
                   "--set", "roles.prm.layout.gpus_per_node=2", "--set", "roles.prm.layout.cpus_per_rank=0.25",
                   "--set", "roles.prm.micro_batch_size=2", "--set", "logging.progress=false",
                   "--set", "roles.policy.lora.enabled=true",  # its own reference: one process fewer to start
                   "--set", "ppo.process_reward_aggregation=clip",
                   "--output", out) == 0
    with open(out / "placement.json") as f:
        placement = json.load(f)
    assert sorted(placement) == ["policy", "prm", "rollout"] and len(placement["prm"]) == 2
    iters = [m for m in read_metrics(f"{out}/metrics.jsonl") if "ppo/reward_raw" in m]
    assert len(iters) == 2 and [m["rollout/staleness"] for m in iters] == [0.0, 1.0]
    for m in iters:
        assert m["process/steps_per_reply"] >= 1 and 0 < m["process/step_score"] < 1
        assert m["process/reward"] <= 0 and math.isfinite(m["ppo/pg_loss"])
