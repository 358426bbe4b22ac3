"""`rlhf ppo`: the single controller that drives one PPO iteration after another over the role groups.

`PPOTrainer.iteration` reads like the paper: roll out MOSS replies, score them (the policy's and the reference's
log-probs, the reward and the critic's values asked for at once), shape rewards and compute advantages with the
pure functions of `rlhf.ppo_math` and `rlhf.estimators`, update the policy and the critic, adapt the KL coefficient.
The roles are reached only through `rlhf.roles`; `run_ppo` starts them on Ray (or in this process) and recovers the
run when a rank dies.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from typing import Any, Iterator, Optional

import torch

from actors.lm import PolicyWorker, ReferenceWorker
from actors.rank import RankSpec
from actors.rollout import RolloutWorker
from rlhf import estimators, ppo_math as pm
from rlhf.batching import Batch, Experience, RolloutBatch, TrainBatch, checked, collate_prompts, collate_sft
from rlhf.checkpoint import atomic_write_json
from rlhf.config import PPOConfig, ranks
from rlhf.data import encode_dialogues, load_prompts
from rlhf.drivers.rollouts import rollout_source
from rlhf.drivers.runs import Loop, RunDir, Stage, backend_for, evaluated, open_run, permutation, recover, run_loop
from rlhf.generation import carried_lengths, fit_generation_cap, reply_text
from rlhf.modeling import ModelLoadError, check_model_dir, load_tokenizer
from rlhf.moss import Dialogue, tokenize_prompt
from rlhf.preemption import on_sigterm
from rlhf.roles import PolicyLoss, PPORoles, UpdatePlan, ValueLoss


class PPOTrainer:
    """The controller's state (iteration, KL controller, running score statistics) and one iteration's logic."""

    def __init__(self, cfg: PPOConfig, roles: Optional[PPORoles], tokenizer: Any, prompts: list[Dialogue],
                 prompt_ids: list[list[int]], ptx: Optional[list[dict]], reward_stats: Optional[dict],
                 rules: Optional[dict] = None, eval_rules: Optional[dict] = None):
        from reward.rules import RewardRules  # reward.rules and rlhf.tools import sympy: only when a run starts
        self.cfg, self.roles, self.tokenizer = cfg, roles, tokenizer
        self.prompts, self.prompt_ids, self.ptx = prompts, prompt_ids, ptx
        self.rules = RewardRules(rules or {}, cfg.ppo.reward_rules, cfg.ppo.reward_model_weight, eval_rules or {})
        p = cfg.ppo
        self.estimator = estimators.ESTIMATORS[p.estimator]
        self.kl_ctl = pm.make_kl_controller(p.kl_controller, p.kl_coef, p.kl_target, p.kl_horizon, p.kl_coef_min)
        self.moments = pm.RunningMoments()
        if reward_stats:  # start the running statistics from the preference model's own, so iteration 0 is sane
            self.moments.load_state_dict({"mean": reward_stats["mean"], "var": reward_stats["std"] ** 2,
                                          "count": p.prompts_per_iteration})
        self.iteration_done = 0
        self.phases: list[dict] = []  # what each role did when (timeline.jsonl)
        self.source = None if roles is None else rollout_source(cfg, roles, self.prompts_of, self.phases)

    # --- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"iteration": self.iteration_done, "kl": self.kl_ctl.state_dict(),
                "score_moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration_done = int(state["iteration"])
        self.kl_ctl.load_state_dict(state["kl"])
        if self.cfg.ppo.kl_controller == "fixed":  # a fixed coefficient is the config's (PBT may have mutated it)
            self.kl_ctl.coef = self.cfg.ppo.kl_coef
        self.moments.load_state_dict(state["score_moments"])

    # --- one iteration -----------------------------------------------------------------------------------------
    def iteration(self, it: int) -> dict:
        p, timings, began = self.cfg.ppo, {}, time.time()
        rows = self.prompt_batch(it)
        with timed(timings, "time/generate"):  # with a rollout group one iteration ahead, the wait for it
            ready = self.source.take(it)
        rollout, exp, on_policy = ready.rollout, ready.exp, self.on_policy(len(rows))
        with timed(timings, "time/score", self.phases, "scorers", it):  # every role at once, none waits for another
            pending = ready.started | self.score(exp, on_policy, skip=ready.started)
            rollouts = self.rollouts([self.prompts[i] for i in rows], rollout)
            scored = {name: future.result() for name, future in pending.items()}
        reward, parts = self.rules.reward(scored.get("scores"), rollouts)
        if bad := nonfinite(reward=reward, **scored):
            return self.skipped(it, f"score: {bad}", timings)
        reward, steps, process = self.process_reward(reward, scored.get("steps"))
        mask = exp["action_mask"].float()
        scores = reward + p.no_eom_penalty * (1 - rollout["ended"].float())
        norm = self.normalize(scores)
        rewards = None if on_policy else pm.shape_rewards(norm, scored["old_logprobs"], scored["ref_logprobs"], mask,
                                                          self.kl_ctl.coef, p.kl_estimator, p.kl_clip or None)[0]
        if steps is not None and rewards is not None:  # per-token rewards: each step's on its last token
            rewards = rewards + p.process_reward_weight * steps[0]
        advantages, returns = estimators.advantages(p, norm, rewards, scored.get("values"), mask, steps)
        with timed(timings, "time/train", self.phases, "policy+critic" if self.roles.critic else "policy", it):
            stats = self.update(it, self.train_batch(exp, scored, advantages, returns, rollout))
        if stats.pop("nonfinite"):
            return self.skipped(it, "train: a non-finite loss", timings)
        logp = stats.pop("logprobs") if on_policy else scored["old_logprobs"]
        kl = pm.masked_sum(pm.kl_estimate(logp, scored["ref_logprobs"], p.kl_estimator, p.kl_clip or None) * mask,
                           mask, dim=1)  # [b] per reply
        per_token = float(kl.sum() / mask.sum().clamp(min=1))
        self.kl_ctl.update(per_token if p.kl_target_unit == "token" else float(kl.mean()), len(rows))
        self.iteration_done = it + 1
        return self.metrics(began, reward, scores, norm, kl, logp, mask, advantages, returns, rollout, scored,
                            parts, rollouts, on_policy, it) | process | stats | timings

    def prompts_of(self, iteration: int) -> Batch:
        """The left-padded prompts of an iteration's rows (`prompt_batch`)."""
        return collate_prompts([self.prompt_ids[i] for i in self.prompt_batch(iteration)], self.tokenizer.pad_token_id)

    def score(self, exp: Experience, on_policy: bool, skip: Optional[dict] = None) -> dict:
        """The scoring calls of one rollout, started at once: reference (and, unless on-policy, the policy's own)
        log-probs, the preference model's scores, the process reward model's step scores and the critic's values, as
        each run has them (less those in `skip`, started already)."""
        pending = {}
        if "ref_logprobs" not in (skip or {}):
            pending["ref_logprobs"] = self.roles.reference.logprobs(exp)
        if not on_policy:  # else the update's own forward gives the rollout's log-probs
            pending["old_logprobs"] = self.roles.policy.logprobs(exp)
        if self.roles.reward is not None and "scores" not in (skip or {}):
            pending["scores"] = self.roles.reward.score(exp)
        if self.roles.prm is not None and "steps" not in (skip or {}):
            pending["steps"] = self.roles.prm.step_scores(exp)
        if self.roles.critic is not None:
            pending["values"] = self.roles.critic.values(exp)
        return pending

    def process_reward(self, reward: torch.Tensor, found: Optional[dict]) -> tuple[torch.Tensor, Optional[tuple], dict]:
        """A process reward model's step scores in the reward, as ppo.process_reward_aggregation says: per step
        ((step rewards [b, R], step mask [b, R]) for the estimators), or one number per reply added to `reward`.
        Returns (reward, the per-step rewards (unweighted: `estimators.advantages` weighs them) or None, the
        `process/...` metrics)."""
        if found is None:
            return reward, None, {}
        p = self.cfg.ppo
        probs, marks = found["probs"], found["mask"]
        metrics = {"process/steps_per_reply": float(marks.sum(1).mean()),
                   "process/step_score": float((probs * marks).sum() / marks.sum().clamp(min=1)),
                   "process/min_step_score": float(pm.reply_step_score(probs, marks, "min").mean())}
        if p.process_reward_aggregation in pm.DENSE_AGGREGATIONS:
            per_step = pm.step_rewards(probs, marks, p.process_reward_aggregation, p.process_reward_threshold)
            metrics["process/bad_step_fraction"] = float(((probs < p.process_reward_threshold) * marks).sum()
                                                         / marks.sum().clamp(min=1))
            summed = p.process_reward_weight * per_step.sum(1)
            return reward, (per_step, marks), metrics | {"process/reward": float(summed.mean())}
        per_reply = p.process_reward_weight * pm.reply_step_score(probs, marks, p.process_reward_aggregation)
        return reward + per_reply, None, metrics | {"process/reward": float(per_reply.mean())}

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """Running-statistics normalisation and clipping of the scores (PPO-max), where the config asks."""
        p = self.cfg.ppo
        return pm.normalize_scores(scores, self.moments, p.reward_clip or None) if p.reward_normalize else scores

    def prompt_batch(self, iteration: int) -> list[int]:
        """The rows of an iteration: prompt indices, each prompt's samples together, shortest prompts first (the
        ranks' shards and the micro-batches of every pass then hold prompts of like length, and the all-pad
        columns they share are dropped). A function of (seed, iteration) alone, so a resume takes the same."""
        n = self.cfg.ppo.prompts_per_iteration
        epoch, index = divmod(iteration, len(self.prompt_ids) // n)
        order = permutation(len(self.prompt_ids), self.cfg.seed, epoch)[index * n:(index + 1) * n]
        order = sorted(order, key=lambda i: len(self.prompt_ids[i]))
        return [i for i in order for _ in range(self.cfg.ppo.samples_per_prompt)]

    def on_policy(self, rows: int) -> bool:
        """Whether the iteration's only update runs with the weights that sampled and nothing needs the rollout's
        log-probs before it: one PPO epoch over one minibatch with an estimator whose advantages come from the
        scores alone (GRPO, RLOO; their KL is a loss term). The ratio is then exactly 1, and the update's own
        forward pass returns the log-probs instead of a separate pass before it."""
        p = self.cfg.ppo
        return (not self.estimator.shaped_rewards and not self.estimator.needs_critic and p.ppo_epochs == 1
                and p.train_batch_size >= rows)

    def train_batch(self, exp: Experience, scored: dict, advantages: torch.Tensor, returns: torch.Tensor,
                    rollout: RolloutBatch) -> TrainBatch:
        """What the update reads of each rollout: the experience, its advantages, and per estimator the rollout's
        log-probs (the ratio's denominator), the reference's (a KL loss term) and the critic's values and returns;
        replies of a rollout group also carry the engine's log-probs (the truncated importance weights)."""
        train: TrainBatch = {**exp, "advantages": advantages}
        if "old_logprobs" in scored:
            train["old_logprobs"] = scored["old_logprobs"]
        if "logprobs" in rollout and self.cfg.ppo.tis_cap:
            train["behaviour_logprobs"] = rollout["logprobs"]
        if estimators.kl_in_loss(self.cfg.ppo):
            train["ref_logprobs"] = scored["ref_logprobs"]
        if "values" in scored:
            train |= {"old_values": scored["values"], "returns": returns}
        return checked(train, TrainBatch)

    def update(self, it: int, train: TrainBatch) -> dict:
        """PPO epochs over seeded minibatches; the policy's and the critic's updates run side by side (the policy
        waits while the critic warms up). Returns their mean stats as `ppo/...` (and `logprobs`, `nonfinite`)."""
        p, roles = self.cfg.ppo, self.roles
        plan = self.minibatches(it, train)
        critic = None
        if roles.critic is not None:
            critic = roles.critic.update(plan, ValueLoss(p.value_clip_eps, p.value_loss_coef))
        results, epochs = [], 0
        if not (roles.critic is not None and it < p.critic_warmup_iterations):
            loss = PolicyLoss(p.clip_eps, p.entropy_coef, self.kl_ctl.coef if estimators.kl_in_loss(p) else 0.0,
                              p.ptx_coef if plan.ptx is not None else 0.0, p.dual_clip or None,
                              p.log_ratio_clip or None, p.kl_clip or None, p.tis_cap or None)
            results, epochs = self.policy_epochs(plan, loss)
        outs = results + ([critic.result()] if critic is not None else [])
        stats: dict = {"nonfinite": sum(out["nonfinite"] for out in outs)}
        if results:  # the policy's stats are the mean of the calls it ran
            stats |= {f"ppo/{key}": sum(r[key] for r in results) / len(results)
                      for key in results[0] if key not in ("nonfinite", "logprobs")}
            stats["ppo/policy_epochs"] = float(epochs)
            if "logprobs" in results[0]:  # on-policy: one epoch, whose forward pass gave the rollout's log-probs
                stats["logprobs"] = results[0]["logprobs"]
        if critic is not None:
            stats |= {f"ppo/{key}": value for key, value in outs[-1].items() if key != "nonfinite"}
        return stats

    def policy_epochs(self, plan: UpdatePlan, loss: PolicyLoss) -> tuple[list[dict], int]:
        """The policy's update: the whole plan in one call, or with ppo.early_stop_kl an epoch a call until one's
        mean approx_kl passes it (the later epochs are skipped). Returns each call's stats and the epochs run."""
        p = self.cfg.ppo
        if not p.early_stop_kl or p.ppo_epochs == 1:
            return [self.roles.policy.update(plan, loss).result()], p.ppo_epochs
        results = []
        for epoch in plan.epochs(p.ppo_epochs):
            results.append(self.roles.policy.update(epoch, loss).result())
            if results[-1]["approx_kl"] > p.early_stop_kl:
                break
        return results, len(results)

    def minibatches(self, it: int, train: TrainBatch) -> UpdatePlan:
        """The update's steps: each epoch a seeded shuffle cut into minibatches, each minibatch's rows in rollout
        order (prompt length, so micro-batches hold like lengths), with fresh PPO-ptx rows for every step."""
        p = self.cfg.ppo
        n = train["response_ids"].shape[0]
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + it)
        steps = []
        for _ in range(p.ppo_epochs):
            order = torch.randperm(n, generator=gen)
            steps += [order[start:start + p.train_batch_size].sort().values for start in range(0, n, p.train_batch_size)]
        batches = [{k: v[idx] for k, v in train.items()} for idx in steps]
        plan = UpdatePlan(batches, [int(b["action_mask"].sum()) for b in batches])
        if self.ptx and p.ptx_coef > 0:
            ptx = [self.ptx_batch(it, len(idx), step) for step, idx in enumerate(steps)]
            plan.ptx, plan.ptx_tokens = [b for b, _ in ptx], [t for _, t in ptx]
        return plan

    def ptx_batch(self, it: int, rows: int, step: int) -> tuple[Batch, int]:
        """SFT rows for the PPO-ptx loss of one minibatch step: fresh rows each step, the same on a resume."""
        rng = random.Random(f"{self.cfg.seed}-{it}-{step}")
        batch = collate_sft([self.ptx[rng.randrange(len(self.ptx))] for _ in range(rows)], self.tokenizer.pad_token_id)
        return batch, int(batch["loss_mask"][:, 1:].sum())

    def skipped(self, it: int, phase: str, timings: dict) -> dict:
        """Never train on NaN/inf: the iteration is counted as skipped, and the caller decides when to stop."""
        self.iteration_done = it + 1
        return {"ppo/skipped": 1.0, "ppo/skipped_phase": phase, **timings}

    def metrics(self, began: float, reward: torch.Tensor, scores: torch.Tensor, norm: torch.Tensor,
                kl: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                returns: torch.Tensor, rollout: Batch, scored: dict, parts: dict, rollouts: list,
                on_policy: bool, it: int) -> dict:
        """The iteration's scalars, named as the README lists them."""
        tokens = float(mask.sum())
        out = {
            "ppo/reward_raw": float(reward.mean()), "ppo/reward": float(scores.mean()),
            "ppo/reward_norm": float(norm.mean()), "ppo/kl": float(kl.mean()),
            "ppo/kl_per_token": float(kl.sum() / mask.sum().clamp(min=1)),
            "ppo/kl_coef": float(self.kl_ctl.coef), "ppo/on_policy": float(on_policy),
            "ppo/response_length": float(mask.sum(1).mean()), "ppo/ended_fraction": float(rollout["ended"].float().mean()),
            "ppo/perplexity": math.exp(-float(pm.masked_mean(logp, mask))),
            "ppo/advantage_mean": float(pm.masked_mean(advantages, mask)),
            "ppo/return_mean": float(pm.masked_mean(returns, mask)),
            "ppo/tokens_per_s": tokens / max(1e-9, time.time() - began),
        }
        if "values" in scored:
            out["ppo/value_mean"] = float(pm.masked_mean(scored["values"], mask))
        p = self.cfg.ppo
        if "logprobs" in rollout:  # a rollout group's replies: how far its weights and numbers are from the trainer's
            behaviour = rollout["logprobs"]
            weights = pm.truncated_is_weights(logp, behaviour, None)
            out |= {"rollout/staleness": float(it - rollout["version"].float().mean()),
                    "rollout/logprob_diff": float(pm.masked_mean((logp - behaviour).abs(), mask)),
                    "rollout/is_weight_mean": float(pm.masked_mean(weights, mask))}
            if p.tis_cap:
                out["rollout/is_truncated_frac"] = float(pm.masked_mean((weights > p.tis_cap).float(), mask))
        if p.kl_clip and (p.kl_estimator == "k3" or estimators.kl_in_loss(p)):  # where the k3 bound bit
            far = (logp - scored["ref_logprobs"]).abs() > p.kl_clip
            out["ppo/kl_clipfrac"] = float(pm.masked_mean(far.float(), mask))
        out |= {f"reward/{name}": sum(v) / len(v) for name, v in parts.items()}
        if self.cfg.data.plugin:
            out["ppo/tool_call_fraction"] = sum(r.commands not in ("", "None") for r in rollouts) / len(rollouts)
        return out | {f"ppo/{k}": v for k, v in self.rules.evaluate(rollouts).items()}

    # --- replies -----------------------------------------------------------------------------------------------
    def rollouts(self, prompts: list[Dialogue], rollout: Batch) -> list:
        """What the rules see of each row: the final reply and, for a plugin policy, its commands and results."""
        from reward.rules import Rollout
        eom_id = self.tokenizer.convert_tokens_to_ids("<eom>")
        plugin = self.cfg.data.plugin
        commands = rollout.get("commands") or [""] * len(prompts)
        results = rollout.get("results") or [""] * len(prompts)
        return [Rollout(prompt, reply_text(self.tokenizer, ids, action, eom_id, plugin), c, r, bool(ended))
                for prompt, ids, action, ended, c, r in zip(prompts, rollout["response_ids"], rollout["action_mask"],
                                                            rollout["ended"], commands, results)]

    def replies(self, prompts: list[Dialogue]) -> list:
        """Rollouts of the current policy on held-out prompts, sampled with the run's generation settings."""
        data = self.cfg.data
        ids = [tokenize_prompt(d, self.tokenizer, data.max_prompt_length, data.plugin) for d in prompts]
        rollout = self.roles.policy.generate(collate_prompts(ids, self.tokenizer.pad_token_id),
                                             self.cfg.generation).result()
        return self.rollouts(prompts, rollout)


@contextlib.contextmanager
def timed(timings: dict, name: str, phases: Optional[list] = None, role: str = "", batch: int = 0) -> Iterator[None]:
    """The block's seconds as `timings[name]`; with `phases`, also its wall-clock span as `role`'s phase on `batch`
    (`time/train` -> phase `train`) for timeline.jsonl."""
    began = time.time()
    yield
    timings[name] = time.time() - began
    if phases is not None:
        phases.append({"role": role, "phase": name.split("/")[-1], "batch": batch, "start": began,
                       "end": began + timings[name]})


def nonfinite(**tensors: Any) -> str:
    """The names of the given tensors that hold NaN/inf (checked before the running statistics see them: one
    NaN would poison every later normalisation)."""
    names = {"reward": "reward", "old_logprobs": "policy log-probs", "ref_logprobs": "reference log-probs",
             "values": "critic values", "scores": "reward", "steps": "process reward"}
    each = lambda t: t.values() if isinstance(t, dict) else [t]  # noqa: E731  (step scores: a dict of tensors)
    bad = [names[k] for k, t in tensors.items()
           if t is not None and not all(torch.isfinite(x).all() for x in each(t))]
    return ", ".join(dict.fromkeys(bad))


# --- the run -------------------------------------------------------------------------------------------------------

def role_model(cfg: PPOConfig, role: str) -> str:
    """The checkpoint a role starts from: the policy's is --policy (model.path), the rollout group's too; others
    their own `roles.ROLE.model`, else the policy (the reference; the critic with `ppo.critic_init: policy`) or the
    reward model (the critic by default)."""
    explicit = getattr(cfg.roles, role, None) and getattr(getattr(cfg.roles, role), "model", "")
    if explicit or role == "reward":
        return explicit or ""
    if role == "critic" and cfg.ppo.critic_init == "reward":
        return cfg.roles.reward.model
    return cfg.model.path


def load_reward_setup(cfg: PPOConfig) -> tuple[dict, dict, Optional[dict]]:
    """The run's reward rules, eval rules and the preference model's score statistics, checked before Ray starts:
    a missing --reward, a rule that does not import or a tool that does not load fails here in one line."""
    from reward.model import load_reward_stats  # imports transformers
    from reward.rules import load_rules
    from rlhf.tools import build_registry
    p = cfg.ppo
    reward = cfg.roles.reward.model
    if "reward" in cfg.derive().roles and not reward:
        raise SystemExit("--reward: needed while ppo.reward_model_weight > 0; give the preference model, or set "
                         "ppo.reward_model_weight=0 and train on ppo.reward_rules alone")
    if reward:
        check_model_dir(reward, "--reward")
    registry = build_registry(cfg.plugins.tools, cfg.plugins.solver, cfg.plugins.timeout)
    rules = load_rules(p.reward_rules, registry)
    eval_rules = load_rules(p.eval_rules, registry, by_value=True)
    # The preference model's own score statistics start the running normalisation when its score is the reward.
    stats = load_reward_stats(reward) if reward and "reward" in cfg.derive().roles and not rules else None
    if stats:
        stats = {"mean": stats["mean"] * p.reward_model_weight, "std": stats["std"] * p.reward_model_weight}
    return rules, eval_rules, stats


def start_groups(cfg: PPOConfig, backend: Any) -> Any:
    """Every role group the run needs, placed and built: the backend's groups (`stop()` them)."""
    from actors.scalar import CriticWorker, PRMWorker, RewardWorker  # its reward.model imports transformers
    plan = cfg.derive()
    workers = {"policy": PolicyWorker, "reference": ReferenceWorker, "reward": RewardWorker, "prm": PRMWorker,
               "critic": CriticWorker, "rollout": RolloutWorker}
    specs = {}
    for role in plan.roles:
        rc = getattr(cfg.roles, role)
        trainable = role in ("policy", "critic")
        specs[role] = (workers[role], RankSpec(
            role_model(cfg, role), rc, cfg.model, cfg.seed, trainable=trainable,
            grad_accum=plan.grad_accum.get(role, 1), total_steps=plan.optimizer_steps,
            plugins=cfg.plugins if role in ("policy", "rollout") and cfg.data.plugin else None,
            temperature=cfg.generation.temperature if role in ("policy", "reference", "rollout") else 1.0))
    return backend.start(specs)


def roles_of(cfg: PPOConfig, groups: Any) -> PPORoles:
    """The run's roles over its started groups; a rollout group of its own joins the policy's weight sync here."""
    # Here, not at the top, where `Rollout` would read as reward.rules' scored reply (`PPOTrainer.rollouts`).
    from rlhf.roles import Critic, Policy, ProcessReward, Reference, Reward, Rollout, WeightSync
    g = groups.groups
    return PPORoles(policy=Policy(g["policy"]),
                    reference=Reference(g["reference"]) if "reference" in g else Reference(g["policy"], True),
                    reward=Reward(g["reward"]) if "reward" in g else None,
                    critic=Critic(g["critic"]) if "critic" in g else None, groups=g,
                    rollout=Rollout(g["rollout"]) if "rollout" in g else None,
                    sync=WeightSync(g["policy"], g["rollout"], cfg.ppo.weight_sync_bucket_mb) if "rollout" in g
                    else None, prm=ProcessReward(g["prm"]) if "prm" in g else None)


def start_roles(cfg: PPOConfig, backend: Any) -> tuple[PPORoles, Any]:
    """`start_groups` and their `roles_of`, for a caller that drives the roles itself (tests, benchmarks); the groups
    are stopped when the roles cannot be made."""
    groups = start_groups(cfg, backend)
    try:
        return roles_of(cfg, groups), groups
    except BaseException:
        groups.stop()
        raise


def run_ppo(cfg: PPOConfig, output: str, resume: bool = False, backend: Optional[Any] = None) -> dict:
    """PPO from the policy `cfg.model.path` with the preference model `cfg.roles.reward.model` (unless rules alone
    reward) on the prompts `cfg.data.train`; returns the command's summary."""
    check_model_dir(cfg.model.path, "--policy")
    backend = backend_for(cfg, backend)
    for role in ("reference", "critic", "prm"):
        if getattr(cfg.roles, role).model:
            check_model_dir(getattr(cfg.roles, role).model, f"roles.{role}.model")
    rules, eval_rules, reward_stats = load_reward_setup(cfg)
    plan = cfg.derive()
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code)
    reward = cfg.roles.reward.model
    scorers = []  # the models that read the policy's token ids
    if reward and ("reward" in plan.roles or role_model(cfg, "critic") == reward):
        scorers.append((reward, "reward model"))
    if "prm" in plan.roles:
        scorers.append((cfg.roles.prm.model, "process reward model"))
    for path, what in scorers:
        if load_tokenizer(path, cfg.model.trust_remote_code).get_vocab() != tokenizer.get_vocab():
            raise ModelLoadError(f"{path}: the {what}'s tokenizer differs from the policy's ({cfg.model.path}); PPO "
                                 f"scores the policy's token ids, so train the {what} from the same tokenizer")
    prompts = load_prompts(cfg.data.train, cfg.data.format)
    held_out = load_prompts(cfg.data.eval, cfg.data.format)[: cfg.ppo.eval_prompts] if cfg.data.eval else []
    ptx = encode_dialogues(cfg.data.ptx, tokenizer, cfg.data) if cfg.data.ptx and cfg.ppo.ptx_coef > 0 else None
    if len(prompts) < cfg.ppo.prompts_per_iteration:
        raise SystemExit(f"{cfg.data.train}: {len(prompts)} prompts is fewer than ppo.prompts_per_iteration "
                         f"({cfg.ppo.prompts_per_iteration})")
    cfg.generation = fit_generation_cap(cfg.generation, tokenizer, cfg.generation.lengths_from, "ppo", cfg.data.format,
                                        models=(cfg.model.path, cfg.roles.reward.model), fallback=cfg.data.ptx)
    prompt_ids = [tokenize_prompt(d, tokenizer, cfg.data.max_prompt_length, cfg.data.plugin) for d in prompts]
    run = open_run(output, cfg, resume)
    before: dict = {}

    def train(groups: Any, restarts: int, stage: Stage) -> dict:
        roles = roles_of(cfg, groups)
        trainer = PPOTrainer(cfg, roles, tokenizer, prompts, prompt_ids, ptx, reward_stats, rules, eval_rules)
        _record_placement(run.root, roles)
        try:
            return _train(cfg, run, roles, trainer, held_out, before, stage, restarts)
        finally:
            trainer.source.close()

    backend.open(sum(getattr(cfg.roles, r).layout.cpus_per_rank * _ranks(cfg, r) for r in plan.roles))
    try:
        with on_sigterm(cfg.ray.preempt_grace_s):
            return recover("ppo", run, cfg.ray.max_restarts, lambda: start_groups(cfg, backend), train)
    finally:
        run.metrics.close()
        backend.close()


def _ranks(cfg: PPOConfig, role: str) -> int:
    return ranks(getattr(cfg.roles, role).layout)


def _train(cfg: PPOConfig, run: RunDir, roles: PPORoles, trainer: PPOTrainer, held_out: list[Dialogue],
           before: dict, stage: Stage, restarts: int) -> dict:
    """The run from its last complete checkpoint (or the start) to final/ (`run_loop`): PPO's iteration as its step.
    Called again after a rank died, on fresh role groups; `before` keeps the evaluation before training."""
    iterations, skipped_in_row, cut_short = cfg.ppo.iterations, 0, 0

    def evaluate() -> dict:
        """The held-out rule scores of the policy's replies now."""
        return {f"eval/{k}": v for k, v in trainer.rules.evaluate(trainer.replies(held_out)).items()}

    def restore(meta: dict) -> int:
        trainer.load_state_dict(meta["controller"])
        return trainer.iteration_done

    def step(i: int) -> Optional[dict]:
        nonlocal skipped_in_row, cut_short
        done = i + 1
        metrics = trainer.iteration(i)
        if metrics.get("ppo/skipped"):
            skipped_in_row += 1
            phase = metrics.pop("ppo/skipped_phase")
            print(f"ppo: iteration {done} skipped ({phase})", flush=True)
            if skipped_in_row >= cfg.ppo.max_skipped_in_row:
                raise SystemExit(f"iteration {done}: {skipped_in_row} iterations in a row were skipped for NaN/inf "
                                 f"in {phase}; lower the learning rate or check the reward model")
            run.metrics.log(done, metrics)
            _record_phases(run.root, done, trainer.phases)
            return None
        skipped_in_row = 0
        cut_short = cut_short + 1 if metrics["ppo/ended_fraction"] < cfg.ppo.min_ended_fraction else 0
        if cut_short == CUT_SHORT_ITERATIONS:  # once per stretch: the line, and a mark the report shows
            print(f"ppo: only {metrics['ppo/ended_fraction']:.0%} of the replies reached <eom> in each of the last "
                  f"{cut_short} iterations: generation.max_new_tokens={cfg.generation.max_new_tokens} may cut the "
                  "replies the reward model prefers; raise it (or set it to auto)", flush=True)
            metrics["ppo/cut_short"] = 1.0
        run.metrics.log(done, metrics)
        _record_phases(run.root, done, trainer.phases)
        if held_out and cfg.ppo.eval_every and done % cfg.ppo.eval_every == 0 and done < iterations:
            evaluated(run, stage, evaluate, done, f"at iteration {done}")
        return {"reward": f"{metrics['ppo/reward_raw']:.3f}", "kl": f"{metrics['ppo/kl']:.3f}"}

    def finish(start: dict, after: dict) -> dict:
        # The starting policy's reply lengths go with it, for a later run's `auto` generation cap.
        roles.policy.save_pretrained(run.final, cfg.roles.policy.lora.merge_on_save,
                                     carried_lengths(cfg.model.path)).result()
        return {f"{k}_start": v for k, v in start.items()} | after | {"final": run.final}

    loop = Loop("ppo", iterations, roles.trained(), restore, meta=lambda i: {"controller": trainer.state_dict()},
                step=step, finish=finish, evaluate=evaluate if held_out else None, save_every=cfg.train.save_every,
                prefix="ppo", unit="iterations", every_s=cfg.logging.progress_every_s, progress=cfg.logging.progress,
                before=before)
    try:
        return run_loop(run, stage, restarts, loop)
    finally:
        before.update(loop.before)


CUT_SHORT_ITERATIONS = 3
"""Iterations in a row below ppo.min_ended_fraction before the run says the generation cap may be too low."""


def _record_phases(output: str, iteration: int, phases: list[dict]) -> None:
    """What each role did when during the iteration (wall-clock spans, a batch generated ahead included), one line
    per iteration in timeline.jsonl: docs/rollout.md and benchmarks/overlap.py draw it."""
    with open(f"{output}/timeline.jsonl", "a") as f:
        f.write(json.dumps({"iteration": iteration, "phases": list(phases)}) + "\n")
    phases.clear()


def _record_placement(output: str, roles: PPORoles) -> None:
    """Where each rank ran (node, GPU ids, pid): for the user, and for tests that check the layout."""
    atomic_write_json(f"{output}/placement.json", roles.placement())
