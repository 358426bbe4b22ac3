"""One PPO iteration as `PPOTrainer.iteration` drives it, over the role groups of one process (`actors.local`: the
Ray ranks' own workers, tiny models, no Ray), every call written down as the roles receive it: the paper's order,
generate -> score -> advantages -> update, and what each step hands the next; the roles a run starts (no critic
without GAE, no reference for a LoRA policy that is its own); a rollout group that gets the weights the policy's
update made before it samples the next iteration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from actors.local import LocalBackend
from rlhf import estimators
from rlhf.config import load_config
from rlhf.drivers.ppo import PPOTrainer, start_roles
from rlhf.ppo_math import masked_mean
from rlhf.roles import PolicyLoss, UpdatePlan, ValueLoss

EXPERIENCE = {"sequences", "attention_mask", "response_ids", "action_mask"}
"""What every scoring role reads of a rollout (`rlhf.batching.experience`)."""


@dataclass
class Call:
    name: str
    """role.method, or controller.advantages for the estimator the controller runs itself."""
    args: tuple
    out: Any
    """The call's future (the estimator's result for controller.advantages)."""


class Recorded:
    """A role group as the controller reaches it, with the real one behind it: each call is run there and written
    down, in the order the controller makes them."""

    def __init__(self, group: Any, log: list[Call]):
        self.group, self.log = group, log
        self.role, self.world_size = group.role, group.world_size

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        future = self.group.call(method, *args, **kwargs)
        self.log.append(Call(f"{self.role}.{method}", args, future))
        return future

    def node_info(self) -> list[dict]:
        return self.group.node_info()

    def shutdown(self) -> None:
        self.group.shutdown()


class RecordedBackend(LocalBackend):
    """`ray.in_process`'s backend, its groups recorded."""

    def __init__(self, log: list[Call]):
        self.log = log

    def start(self, roles: dict) -> Any:
        groups = super().start(roles)
        groups.groups = {name: Recorded(group, self.log) for name, group in groups.groups.items()}
        return groups


class InProcessSync:
    """`rlhf.roles.WeightSync` without its process group (the policy's rank 0 and the rollout ranks send and receive
    at once, which one process cannot): `push` copies the policy's weights as `send_weights` gathers them (LoRA
    merged) into the rollout rank's engine, and is written down in the log."""

    def __init__(self, policy: Recorded, rollout: Recorded, bucket_mb: float):
        self.policy, self.rollout, self.log = policy.group.worker, rollout.group.worker, policy.log
        self.version = 0
        self.pushed: list[dict[str, torch.Tensor]] = []

    def push(self, version: int) -> None:
        from actors.weight_sync import trainer_sources
        weights = {s.name: s.full().detach().clone() for s in trainer_sources(self.policy.engine.module)}
        self.rollout.inference.update_weights(version, weights.items())
        self.pushed.append(weights)
        self.version = version
        self.log.append(Call("sync.push", (version,), None))


@pytest.fixture
def log(monkeypatch) -> list[Call]:
    """The calls of a run, the controller's own estimator among them."""
    calls: list[Call] = []
    real = estimators.advantages

    def advantages(p, scores, rewards, values, mask, steps=None):
        out = real(p, scores, rewards, values, mask, steps)
        calls.append(Call("controller.advantages", (scores, rewards, values, mask, steps), out))
        return out

    monkeypatch.setattr(estimators, "advantages", advantages)
    return calls


@pytest.fixture
def run(tiny, log):
    """`run(*overrides)`: the tiny PPO config's roles started in this process from the tiny model (also the
    preference model, with a new head), and the controller over them; every group stopped after the test."""
    from rlhf.data import load_prompts
    from rlhf.modeling import load_tokenizer
    from rlhf.moss import tokenize_prompt
    started = []

    def start(*overrides: str) -> tuple[PPOTrainer, dict]:
        cfg = load_config("ppo", "configs/tiny/ppo.yaml", [
            f"model.path={tiny['base']}", f"roles.reward.model={tiny['base']}", "ppo.prompts_per_iteration=4",
            "ppo.train_batch_size=4", "ppo.ppo_epochs=1", "generation.max_new_tokens=6", *overrides])
        tokenizer = load_tokenizer(tiny["tokenizer"])
        prompts = load_prompts(tiny["prompts_train"])
        ids = [tokenize_prompt(d, tokenizer, cfg.data.max_prompt_length) for d in prompts]
        roles, groups = start_roles(cfg, RecordedBackend(log))
        started.append(groups)
        return PPOTrainer(cfg, roles, tokenizer, prompts, ids, None, None), groups.groups

    yield start
    for groups in started:
        groups.stop()


def names(log: list[Call]) -> list[str]:
    return [c.name for c in log]


def only(log: list[Call], name: str) -> Call:
    [call] = [c for c in log if c.name == name]
    return call


def test_gae_generates_scores_with_every_role_at_once_then_advantages_then_updates_critic_and_policy(run, log):
    trainer, groups = run("ppo.estimator=gae", "ppo.critic_warmup_iterations=1")
    assert sorted(groups) == ["critic", "policy", "reference", "reward"]
    scorers = {"reference.logprobs", "policy.logprobs", "reward.score", "critic.values"}

    first = trainer.iteration(0)  # the critic warms up: it trains, the policy does not
    assert names(log)[0] == "policy.generate" and set(names(log)[1:5]) == scorers
    assert names(log)[5:] == ["controller.advantages", "critic.update"]
    assert "ppo/pg_loss" not in first and "ppo/vf_loss" in first
    log.clear()

    metrics = trainer.iteration(1)
    calls = names(log)
    assert calls[0] == "policy.generate" and set(calls[1:5]) == scorers
    assert calls[5] == "controller.advantages" and set(calls[6:]) == {"critic.update", "policy.update"}

    # What flows: the replies become one experience that every scorer reads ...
    generate = only(log, "policy.generate")
    rollout = generate.out.result()
    rows, width = rollout["response_ids"].shape
    assert rows == generate.args[0]["input_ids"].shape[0] == 4
    exp = only(log, "reward.score").args[0]
    assert set(exp) == EXPERIENCE and torch.equal(exp["response_ids"], rollout["response_ids"])
    assert all(only(log, name).args[0] is exp for name in scorers)
    # ... GAE's advantages take the scores [b], the KL-shaped rewards and the critic's values [b, R] ...
    scores, rewards, values, mask, steps = only(log, "controller.advantages").args
    assert steps is None and scores.shape == (rows,) and rewards.shape == values.shape == mask.shape == (rows, width)
    assert torch.equal(values, only(log, "critic.values").out.result())
    advantages, returns = only(log, "controller.advantages").out
    # ... and both trainers update on the same plan: the rollout's rows with its advantages, the rollout's own
    # log-probs (the ratio's denominator), the critic's values and the returns it regresses to.
    plan, value_loss = only(log, "critic.update").args
    assert isinstance(plan, UpdatePlan) and isinstance(value_loss, ValueLoss)
    assert only(log, "policy.update").args[0] is plan
    [step] = plan.steps  # one epoch, one minibatch of all 4 rows
    assert set(step) == EXPERIENCE | {"advantages", "old_logprobs", "old_values", "returns"}
    assert torch.equal(step["advantages"], advantages) and torch.equal(step["returns"], returns)
    assert torch.equal(step["old_values"], values)
    assert torch.equal(step["old_logprobs"], only(log, "policy.logprobs").out.result())
    assert plan.tokens == [int(mask.sum())]
    assert only(log, "policy.update").args[1].kl_coef == 0  # GAE's KL penalty is in the rewards, not the loss
    assert metrics["ppo/value_mean"] == pytest.approx(float(masked_mean(values, mask)))
    assert trainer.iteration_done == 2


def test_a_lora_policy_is_its_own_reference_and_grpo_trains_no_critic(run, log):
    trainer, groups = run("roles.policy.lora.enabled=true", "ppo.estimator=grpo", "ppo.samples_per_prompt=2",
                          "ppo.prompts_per_iteration=2")
    assert sorted(groups) == ["policy", "reward"]  # neither a reference nor a critic group started
    metrics = trainer.iteration(0)

    # On-policy (one epoch, one minibatch, advantages from the scores alone): no log-prob pass before the update,
    # the reference's log-probs are the policy's with its adapters off, and the update's own forward gives the
    # rollout's log-probs.
    calls = names(log)
    assert calls[0] == "policy.generate" and set(calls[1:3]) == {"policy.reference_logprobs", "reward.score"}
    assert calls[3:] == ["controller.advantages", "policy.update"]
    scores, rewards, values, mask, steps = only(log, "controller.advantages").args
    assert rewards is None and values is None and steps is None and scores.shape == (4,)
    plan, loss = only(log, "policy.update").args
    [step] = plan.steps
    assert set(step) == EXPERIENCE | {"advantages", "ref_logprobs"}  # GRPO's KL is a loss term
    assert torch.equal(step["ref_logprobs"], only(log, "policy.reference_logprobs").out.result())
    assert isinstance(loss, PolicyLoss) and loss.kl_coef == trainer.cfg.ppo.kl_coef > 0
    assert metrics["ppo/on_policy"] == 1.0 and "ppo/value_mean" not in metrics

    # What decides it: the estimator table, and a LoRA policy asked to keep a reference of its own.
    config = lambda *o: load_config("ppo", "configs/tiny/ppo.yaml", list(o))  # noqa: E731
    for name in estimators.ESTIMATORS:
        assert ("critic" in config(f"ppo.estimator={name}", "ppo.samples_per_prompt=2").derive().roles) == \
            (name == "gae")
    assert "reference" in config("roles.policy.lora.enabled=true", "ppo.reference_from_lora_base=false").derive().roles


def test_a_rollout_group_samples_with_the_weights_of_the_last_update(run, log, monkeypatch):
    import rlhf.roles
    monkeypatch.setattr(rlhf.roles, "WeightSync", InProcessSync)
    trainer, groups = run("ppo.rollout_group=true", "roles.policy.lora.enabled=true", "ppo.estimator=grpo",
                          "ppo.samples_per_prompt=2", "ppo.prompts_per_iteration=2")
    assert sorted(groups) == ["policy", "reward", "rollout"]
    sync = trainer.roles.sync
    started_from = groups["rollout"].call("weights").result()
    log.clear()

    trainer.iteration(0)
    metrics = trainer.iteration(1)
    calls = names(log)
    assert "policy.generate" not in calls  # the rollout group samples, the policy's ranks only train
    assert calls.count("rollout.generate") == 2 and calls.count("policy.update") == 2
    # Iteration 0 samples with the starting weights (version 0, what the engine was built from); iteration 1's
    # sync comes after iteration 0's update and before iteration 1's replies.
    first_update, pushed, second_generate = (calls.index("policy.update"), calls.index("sync.push"),
                                             len(calls) - 1 - calls[::-1].index("rollout.generate"))
    assert calls.count("sync.push") == 1 and first_update < pushed < second_generate
    assert only(log, "sync.push").args == (1,)
    versions = [c.out.result()["version"].tolist() for c in log if c.name == "rollout.generate"]
    assert versions == [[0] * 4, [1] * 4]
    assert metrics["rollout/staleness"] == 0.0
    # The weights it got are the update's (the LoRA adapters merged in moved them), and the engine holds them.
    [weights] = sync.pushed
    assert any(not torch.equal(weights[n], started_from[n]) for n in weights)
    held = groups["rollout"].call("weights").result()
    assert all(torch.equal(held[n], weights[n]) for n in weights)


def test_a_process_reward_model_scores_with_the_others_and_its_step_rewards_reach_the_critic(run, log, tiny_prm):
    from rlhf import ppo_math as pm
    trainer, groups = run("ppo.estimator=gae", "ppo.critic_warmup_iterations=0", f"roles.prm.model={tiny_prm}",
                          "ppo.process_reward_weight=2.0", "ppo.process_reward_threshold=0.9",
                          "ppo.process_reward_aggregation=clip",
                          "generation.max_new_tokens=16")
    assert sorted(groups) == ["critic", "policy", "prm", "reference", "reward"]
    coef = trainer.kl_ctl.coef
    metrics = trainer.iteration(0)
    calls = names(log)
    assert set(calls[1:6]) == {"reference.logprobs", "policy.logprobs", "reward.score", "critic.values",
                               "prm.step_scores"}
    exp = only(log, "reward.score").args[0]
    assert only(log, "prm.step_scores").args[0] is exp
    found = only(log, "prm.step_scores").out.result()
    probs, marks = found["probs"], found["mask"]
    assert marks.sum() > 0 and torch.all((probs > 0) == (marks > 0)) and torch.all(probs <= 1)
    assert torch.all(marks <= exp["action_mask"])  # a step ends on a token the policy wrote

    # Each step's reward, 2 x min(p - 0.9, 0), sits on its last token of the per-token rewards the critic's returns
    # are made of, beside the KL penalty and the reply's score on its last token.
    scores, rewards, values, mask, steps = only(log, "controller.advantages").args
    per_step, step_mask = steps
    assert torch.equal(step_mask, marks)
    assert torch.allclose(per_step, (probs - 0.9).clamp(max=0) * marks)
    assert per_step.sum() < 0
    shaped = pm.shape_rewards(scores, only(log, "policy.logprobs").out.result(),
                              only(log, "reference.logprobs").out.result(), mask, coef, "k1", 10.0)[0]
    assert torch.allclose(rewards, shaped + 2.0 * per_step)  # weighted by ppo.process_reward_weight
    advantages, returns = only(log, "controller.advantages").out
    expected = pm.gae(shaped + 2.0 * per_step, values, mask, 1.0, 0.95)
    assert torch.allclose(returns, expected[1])
    [step] = only(log, "critic.update").args[0].steps
    assert torch.equal(step["returns"], returns)
    assert metrics["process/reward"] == pytest.approx(float(2.0 * per_step.sum(1).mean()))
    assert metrics["process/steps_per_reply"] == pytest.approx(float(marks.sum(1).mean()))
    assert 0 < metrics["process/bad_step_fraction"] <= 1


def test_grpo_adds_the_group_normalised_step_rewards_of_the_steps_to_come_and_min_joins_the_score(run, log,
                                                                                                  tiny_prm):
    from rlhf import ppo_math as pm
    trainer, groups = run("ppo.estimator=grpo", "ppo.samples_per_prompt=2", "ppo.prompts_per_iteration=2",
                          f"roles.prm.model={tiny_prm}", "ppo.process_reward_aggregation=step",
                          "ppo.process_reward_weight=0.5", "generation.max_new_tokens=16")
    assert sorted(groups) == ["policy", "prm", "reference", "reward"]
    trainer.iteration(0)
    scores, rewards, values, mask, steps = only(log, "controller.advantages").args
    assert rewards is None and values is None  # on-policy: advantages from the scores and the steps alone
    found = only(log, "prm.step_scores").out.result()
    per_step, step_mask = steps
    assert torch.allclose(per_step, (found["probs"] - 0.5) * found["mask"])
    advantages, _ = only(log, "controller.advantages").out
    outcome = pm.grpo_advantages(scores, 2, action_mask=mask)
    process = pm.process_advantages(per_step, step_mask, mask, 2)
    # The weight scales the group-normalised step advantages (inside the rewards it would be normalised away).
    assert torch.allclose(advantages, outcome + 0.5 * process) and process.abs().sum() > 0
    log.clear()

    # Per reply: the weakest step's probability joins the reply's score; no per-step rewards.
    trainer, _ = run("ppo.estimator=grpo", "ppo.samples_per_prompt=2", "ppo.prompts_per_iteration=2",
                     f"roles.prm.model={tiny_prm}", "ppo.process_reward_aggregation=min", "ppo.reward_normalize=false",
                     "generation.max_new_tokens=16")
    metrics = trainer.iteration(0)
    scores, _, _, _, steps = only(log, "controller.advantages").args
    found = only(log, "prm.step_scores").out.result()
    rollout = only(log, "policy.generate").out.result()
    model = only(log, "reward.score").out.result()
    weakest = pm.reply_step_score(found["probs"], found["mask"], "min")
    assert steps is None
    assert torch.allclose(scores, model + weakest - 1.0 * (1 - rollout["ended"].float()))
    assert metrics["process/reward"] == pytest.approx(float(weakest.mean()))


def test_a_rollout_group_one_iteration_ahead_starts_the_step_scores_with_the_replies(run, log, monkeypatch, tiny_prm):
    """With ppo.off_policy_steps=1 the next iteration's replies are scored as they arrive, the process reward model's
    step scores among them; the iteration that takes them asks no scorer again."""
    import rlhf.roles
    monkeypatch.setattr(rlhf.roles, "WeightSync", InProcessSync)
    trainer, groups = run("ppo.rollout_group=true", "ppo.off_policy_steps=1", "roles.policy.lora.enabled=true",
                          "ppo.estimator=grpo", "ppo.samples_per_prompt=2", "ppo.prompts_per_iteration=2",
                          f"roles.prm.model={tiny_prm}", "ppo.iterations=3")
    assert "prm" in groups
    ahead = trainer.source.generate(1, score_early=True)
    assert set(ahead.started) == {"ref_logprobs", "scores", "steps"}
    assert set(trainer.score(ahead.exp, on_policy=True, skip=ahead.started)) == set()
    trainer.source.close()
