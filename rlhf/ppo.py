"""`rlhf ppo`: the single controller that drives one PPO iteration after another over four role groups.

The loop reads like the paper: roll out MOSS replies, score them (reference log-probs, reward and critic values
asked for at once), shape rewards and compute advantages with the pure functions of `rlhf.ppo_math`, then update
the policy and the critic. Experience moves between the groups as Ray object references.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from rlhf import ppo_math as pm
from rlhf.batching import Batch, collate_prompts, collate_sft, pad, pad_rows
from rlhf.config import Config, gradient_accumulation_steps, ranks, to_dict
from rlhf.data import load_prompts
from rlhf.metrics import Progress
from rlhf.moss import Dialogue, tokenize_prompt
from rlhf.checkpoint import read_meta
from rlhf.runs import RunDir, open_run, permutation, save_checkpoint
from reward.rules import Rollout, Rule, combine, plugin_segments, score_rules


@dataclass
class ControllerState:
    """What the controller itself must carry across a resume (the groups save their own engines)."""
    iteration: int = 0
    kl: dict = field(default_factory=dict)
    score_moments: dict = field(default_factory=dict)


def role_model(cfg: Config, role: str, policy: str, reward: Optional[str]) -> str:
    explicit = getattr(cfg.roles, role).model
    if explicit:
        return explicit
    if role == "critic":
        return reward if cfg.ppo.critic_init == "reward" else policy
    return reward if role == "reward" else policy


def needs_reference_group(cfg: Config) -> bool:
    return not (cfg.roles.policy.lora.enabled and cfg.ppo.reference_from_lora_base)


def needs_critic(cfg: Config) -> bool:
    return cfg.ppo.estimator == "gae"


def needs_reward_group(cfg: Config) -> bool:
    """Rule rewards alone (ppo.reward_model_weight 0) need no preference model."""
    return cfg.ppo.reward_model_weight > 0


class Roles:
    """The run's role groups, placed as the config says (own placement groups or colocated on another's)."""

    def __init__(self, cfg: Config, policy: str, reward: Optional[str]):
        from actors.group import RoleGroup
        self.cfg = cfg
        self.groups: dict[str, RoleGroup] = {}
        self.hosts: dict[str, Any] = {}
        try:
            self._start(cfg, policy, reward)
        except BaseException:  # a rank that dies in start-up must not leave the others holding their bundles
            self.shutdown()
            raise

    def _start(self, cfg: Config, policy: str, reward: Optional[str]) -> None:
        import ray
        from actors.group import RoleGroup, cluster_has_gpus, make_placement_group
        from actors.worker import LMWorker, ScalarWorker
        conf = to_dict(cfg)
        use_gpu = cluster_has_gpus()
        wanted = ["policy"] + (["reward"] if needs_reward_group(cfg) else []) + \
                 (["reference"] if needs_reference_group(cfg) else []) + (["critic"] if needs_critic(cfg) else [])
        # Colocated roles share the host role's bundles: one placement group, each rank a fraction of a GPU.
        hosts = self.hosts
        for role in wanted:
            layout = getattr(cfg.roles, role).layout
            if not layout.colocate_with and any(getattr(cfg.roles, r).layout.colocate_with == role for r in wanted):
                guests = [r for r in wanted if getattr(cfg.roles, r).layout.colocate_with == role]
                cpus = layout.cpus_per_rank + sum(getattr(cfg.roles, g).layout.cpus_per_rank for g in guests)
                hosts[role] = make_placement_group(f"{role}-shared", layout, use_gpu, cpus)
        kinds = {"policy": LMWorker, "reference": LMWorker, "reward": ScalarWorker, "critic": ScalarWorker}
        for role in wanted:
            layout = getattr(cfg.roles, role).layout
            host = layout.colocate_with or role
            if layout.colocate_with and host not in wanted:
                raise SystemExit(f"roles.{role}.layout.colocate_with: {host} has no group in this run")
            if layout.colocate_with and ranks(layout) > ranks(getattr(cfg.roles, host).layout):
                raise SystemExit(f"roles.{role}.layout: {ranks(layout)} ranks do not fit the {ranks(getattr(cfg.roles, host).layout)} "
                                 f"bundles of {host}, which it colocates with")
            self.groups[role] = RoleGroup(role, kinds[role], layout, {"config": conf}, placement=hosts.get(host),
                                          use_gpu=use_gpu)
        rollouts = cfg.ppo.prompts_per_iteration * cfg.ppo.samples_per_prompt
        refs = []
        for role, group in self.groups.items():
            rc = getattr(cfg.roles, role)
            trainable = role in ("policy", "critic")
            world = ranks(rc.layout)
            accum = gradient_accumulation_steps(cfg.ppo.train_batch_size, rc.micro_batch_size, world)
            steps = cfg.ppo.iterations * cfg.ppo.ppo_epochs * (rollouts // cfg.ppo.train_batch_size)
            model = role_model(cfg, role, policy, reward)
            refs += group.call("setup", model, trainable, conf["roles"][role]["deepspeed"],
                               conf["roles"][role]["optim"] if trainable else None,
                               conf["roles"][role]["lora"] if role != "reference" else None,
                               rc.micro_batch_size, accum, steps)
        ray.get(refs)

    def who(self, err: Exception) -> str:
        """`critic rank 0` for the error of a dead rank actor (or `a rank` when it names none of ours)."""
        dead = getattr(err, "actor_id", None)
        for role, group in self.groups.items():
            for rank, worker in enumerate(group.workers):
                if dead and worker._actor_id.hex() == dead:
                    return f"{role} rank {rank}"
        return "a rank"

    def placement(self) -> dict[str, list[dict]]:
        return {role: group.node_info() for role, group in self.groups.items()}

    def shutdown(self) -> None:
        from actors.group import release_placement_group
        for group in self.groups.values():
            group.shutdown()
        for pg in self.hosts.values():
            release_placement_group(pg)  # inside a Tune trial this frees bundles of the trial's group, no more


def _experience(prompts: Batch, rollout: Batch) -> Batch:
    """Prompt (left-padded) and reply (right-padded) side by side: what every scoring role reads. Attention
    covers plugin Results too (the policy wrote its answer after reading them); actions cover only what it wrote."""
    return {"sequences": torch.cat([prompts["input_ids"], rollout["response_ids"]], 1),
            "attention_mask": torch.cat([prompts["attention_mask"], rollout["response_mask"]], 1),
            "response_ids": rollout["response_ids"], "action_mask": rollout["action_mask"]}


def kl_in_loss(cfg: Config) -> bool:
    """GRPO and RLOO take their advantages from the scores alone, so the KL penalty is a loss term instead of
    a reward (as in DeepSeekMath); GAE and REINFORCE++ fold it into the per-token rewards."""
    return cfg.ppo.estimator in ("grpo", "rloo") and cfg.ppo.kl_coef > 0


def advantages_for(cfg: Config, scores: torch.Tensor, rewards: Optional[torch.Tensor], values: Optional[torch.Tensor],
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The configured estimator; returns (advantages, returns) [B, R]."""
    p = cfg.ppo
    if p.estimator == "gae":
        adv, ret = pm.gae(rewards, values, mask, p.gamma, p.lam)
    elif p.estimator == "grpo":
        adv = pm.grpo_advantages(scores, p.samples_per_prompt, action_mask=mask)
        ret = adv
    elif p.estimator == "rloo":
        adv = pm.rloo_advantages(scores, p.samples_per_prompt, action_mask=mask)
        ret = adv
    else:
        adv = pm.reinforce_pp_advantages(rewards, mask, p.gamma)
        ret = adv
    if p.whiten_advantages and p.estimator in ("gae", "rloo"):
        adv = pm.masked_whiten(adv, mask)
    return adv, ret


class PPOTrainer:
    """Holds the controller's state; `iteration()` is one pass of generate, score, advantages, update."""

    def __init__(self, cfg: Config, roles: Roles, tokenizer, prompts: list[Dialogue], prompt_ids: list[list[int]],
                 ptx: Optional[list[dict]], reward_stats: Optional[dict], rules: Optional[dict[str, Rule]] = None):
        self.cfg, self.roles, self.tokenizer = cfg, roles, tokenizer
        self.prompts, self.prompt_ids, self.ptx = prompts, prompt_ids, ptx
        self.rules = rules or {}
        self.eom_id = tokenizer.convert_tokens_to_ids("<eom>")
        p = cfg.ppo
        self.kl_ctl = pm.make_kl_controller(p.kl_controller, p.kl_coef, p.kl_target, p.kl_horizon)
        self.moments = pm.RunningMoments()
        if reward_stats:  # start the running statistics from the preference model's own, so iteration 0 is sane
            self.moments.load_state_dict({"mean": reward_stats["mean"], "var": reward_stats["std"] ** 2,
                                          "count": p.prompts_per_iteration})
        self.state = ControllerState()
        self.gen = to_dict(cfg)["generation"]

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"iteration": self.state.iteration, "kl": self.kl_ctl.state_dict(),
                "score_moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.state.iteration = int(state["iteration"])
        self.kl_ctl.load_state_dict(state["kl"])
        if self.cfg.ppo.kl_controller == "fixed":  # a fixed coefficient is the config's (PBT may have mutated it)
            self.kl_ctl.coef = self.cfg.ppo.kl_coef
        self.moments.load_state_dict(state["score_moments"])

    # --- one iteration ---------------------------------------------------------------------------------
    def prompt_batch(self, iteration: int) -> list[int]:
        n = self.cfg.ppo.prompts_per_iteration
        per_epoch = len(self.prompt_ids) // n
        epoch, index = divmod(iteration, per_epoch)
        order = permutation(len(self.prompt_ids), self.cfg.seed, epoch)[index * n:(index + 1) * n]
        # Shortest prompts first (each prompt's samples stay together): the ranks' chunks and the micro-batches
        # of every pass then hold prompts of like length, and the all-pad columns they share are dropped.
        order = sorted(order, key=lambda i: len(self.prompt_ids[i]))
        return [i for i in order for _ in range(self.cfg.ppo.samples_per_prompt)]

    def iteration(self, it: int) -> dict:
        import ray
        cfg, p, g = self.cfg, self.cfg.ppo, self.roles.groups
        timings: dict[str, float] = {}
        began = time.time()
        rows = self.prompt_batch(it)
        prompts = collate_prompts([self.prompt_ids[i] for i in rows], self.tokenizer.pad_token_id)
        rollout = g["policy"].run("generate", ray.put(prompts), self.gen)
        timings["time/generate"] = time.time() - began

        t = time.time()
        exp = _experience(prompts, rollout)
        exp_ref = ray.put(exp)
        # Nothing waits on what it does not need: all four roles read the same experience at once, and the
        # controller reads the rollouts' text for the rule rewards meanwhile.
        # On-policy (one epoch, one minibatch, critic-free) the update's own forward gives the rollout's log-probs.
        on_policy = self.on_policy(len(rows))
        calls = {} if on_policy else {"old_logprobs": ("policy", "logprobs")}
        if "reward" in g:
            calls["scores"] = ("reward", "score")
        calls["ref_logprobs"] = ("reference", "logprobs") if "reference" in g else ("policy", "reference_logprobs")
        if "critic" in g:
            calls["values"] = ("critic", "values")
        pending = {name: (role, method, g[role].call(method, exp_ref)) for name, (role, method) in calls.items()}
        rollouts = self.rollouts([self.prompts[i] for i in rows], rollout)
        rule_scores = score_rules(self.rules, rollouts)
        got = {name: g[role].gather(method, refs) for name, (role, method, refs) in pending.items()}
        timings["time/score"] = time.time() - t

        mask = exp["action_mask"].float()
        model_scores = got["scores"].float().tolist() if "scores" in got else None
        raw = torch.tensor(combine(model_scores, rule_scores, p.reward_model_weight, p.reward_rules))
        values = got.get("values")
        # Checked before the running statistics see them: one NaN would poison every later normalisation.
        bad = [name for name, tensor in (("reward", raw), ("policy log-probs", got.get("old_logprobs")),
                                         ("reference log-probs", got["ref_logprobs"]), ("critic values", values))
               if tensor is not None and not torch.isfinite(tensor).all()]
        if bad:  # never train on NaN/inf: skip the update, count it, let the caller decide when to stop
            self.state.iteration = it + 1
            return {"ppo/skipped": 1.0, "ppo/skipped_phase": "score: " + ", ".join(bad), **timings}
        ended = rollout["ended"].float()
        scores = raw + p.no_eom_penalty * (1 - ended)
        norm = pm.normalize_scores(scores, self.moments, p.reward_clip or None) if p.reward_normalize else scores
        rewards = None if on_policy else self.shaped(norm, got["old_logprobs"], got["ref_logprobs"], mask)[0]
        advantages, returns = advantages_for(cfg, norm, rewards, values, mask)
        train = {**exp, "advantages": advantages}
        if not on_policy:
            train["old_logprobs"] = got["old_logprobs"]
        if kl_in_loss(cfg):  # GRPO/RLOO: their advantages never see the shaped rewards, so the KL goes in the loss
            train["ref_logprobs"] = got["ref_logprobs"]
        if values is not None:
            train |= {"old_values": values, "returns": returns}

        t = time.time()
        stats, fresh = self.update(train, warmup="critic" in g and it < p.critic_warmup_iterations)
        timings["time/train"] = time.time() - t
        if stats.pop("nonfinite", 0.0):
            self.state.iteration = it + 1
            return {"ppo/skipped": 1.0, "ppo/skipped_phase": "train: a non-finite loss", **timings}
        logp = got["old_logprobs"] if not on_policy else fresh
        _, kl = self.shaped(norm, logp, got["ref_logprobs"], mask)

        kl_per_reply = pm.masked_sum(kl, mask, dim=1)
        self.kl_ctl.update(float(kl_per_reply.mean()), len(rows))
        lengths = mask.sum(1)
        tokens = float(mask.sum())
        metrics = {
            "ppo/reward_raw": float(raw.mean()), "ppo/reward": float(scores.mean()), "ppo/reward_norm": float(norm.mean()),
            "ppo/kl": float(kl_per_reply.mean()), "ppo/kl_coef": float(self.kl_ctl.coef), "ppo/on_policy": float(on_policy),
            "ppo/response_length": float(lengths.mean()), "ppo/ended_fraction": float(ended.mean()),
            "ppo/perplexity": math.exp(-float(pm.masked_mean(logp, mask))),
            "ppo/advantage_mean": float(pm.masked_mean(advantages, mask)),
            "ppo/return_mean": float(pm.masked_mean(returns, mask)),
            "ppo/tokens_per_s": tokens / max(1e-9, time.time() - began), **stats, **timings,
        }
        if values is not None:
            metrics["ppo/value_mean"] = float(pm.masked_mean(values, mask))
        if model_scores is not None:
            metrics["reward/model"] = sum(model_scores) / len(model_scores)
        metrics |= {f"reward/{name}": sum(v) / len(v) for name, v in rule_scores.items()}
        if self.cfg.data.plugin:
            metrics["ppo/tool_call_fraction"] = sum(_called_tool(r) for r in rollouts) / len(rollouts)
        metrics |= {f"ppo/{k}": v for k, v in task_scores(rollouts).items()}
        self.state.iteration = it + 1
        return metrics

    def on_policy(self, rows: int) -> bool:
        """Whether the iteration's only update runs with the weights that sampled and nothing needs the
        rollout's log-probs before it: one PPO epoch over one minibatch with GRPO or RLOO (whose advantages come
        from the scores and whose KL is a loss term). The ratio is then exactly 1, and the update's own forward
        pass returns the log-probs instead of a separate pass before it."""
        p = self.cfg.ppo
        return p.estimator in ("grpo", "rloo") and p.ppo_epochs == 1 and p.train_batch_size >= rows

    def shaped(self, scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pm.shape_rewards(scores, logp, ref_logp, mask, self.kl_ctl.coef, self.cfg.ppo.kl_estimator)

    def update(self, train: Batch, warmup: bool) -> tuple[dict, Optional[torch.Tensor]]:
        """PPO epochs over shuffled minibatches of the rollouts; policy and critic step side by side. Returns the
        mean stats and, when the batch has no `old_logprobs` (on-policy), the log-probs the update computed."""
        import ray
        cfg, p, g = self.cfg, self.cfg.ppo, self.roles.groups
        n = train["response_ids"].shape[0]
        fresh = None if "old_logprobs" in train else torch.zeros_like(train["response_ids"], dtype=torch.float)
        sums: dict[str, float] = {}
        steps = 0
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.state.iteration)
        for epoch in range(p.ppo_epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, p.train_batch_size):
                # A random minibatch, its rows in rollout order (prompt length): like-length micro-batches, same sums.
                idx = order[start:start + p.train_batch_size].sort().values
                mb = {k: v[idx] for k, v in train.items()}
                num_tokens = int(mb["action_mask"].sum())
                mb_ref = ray.put(mb)
                refs = {}
                if not warmup:
                    ptx, ptx_tokens = self.ptx_batch(len(idx), steps)
                    kl_coef = self.kl_ctl.coef if kl_in_loss(cfg) else 0.0
                    refs["policy"] = g["policy"].call("ppo_step", mb_ref, num_tokens, p.clip_eps, p.entropy_coef,
                                                      ptx, ptx_tokens, p.ptx_coef, kl_coef)
                if "critic" in g:
                    refs["critic"] = g["critic"].call("value_step", mb_ref, num_tokens, p.value_clip_eps,
                                                      p.value_loss_coef)
                for role, r in refs.items():
                    out = g[role].gather("ppo_step" if role == "policy" else "value_step", r)
                    if fresh is not None and role == "policy":
                        fresh[idx] = out.pop("logprobs")
                    for k, v in out.items():
                        key = "nonfinite" if k == "nonfinite" else f"ppo/{k}"
                        sums[key] = sums.get(key, 0.0) + (float(v.mean()) if "grad_norm" in k else float(v.sum()))
                steps += 1
        return {k: v / max(1, steps) for k, v in sums.items()}, fresh

    def ptx_batch(self, rows: int, step: int = 0) -> tuple[Optional[Any], int]:
        """SFT rows for the PPO-ptx loss of one minibatch step: fresh rows each step, the same on a resume."""
        if not self.ptx or self.cfg.ppo.ptx_coef <= 0:
            return None, 0
        import random
        import ray
        rng = random.Random(f"{self.cfg.seed}-{self.state.iteration}-{step}")
        batch = collate_sft([self.ptx[rng.randrange(len(self.ptx))] for _ in range(rows)], self.tokenizer.pad_token_id)
        return ray.put(batch), int(batch["loss_mask"][:, 1:].sum())

    def rollouts(self, prompts: list[Dialogue], rollout: Batch) -> list[Rollout]:
        """What the rules see of each row: the final reply and, for a plugin policy, its commands and results."""
        from rlhf.generation import reply_text
        plugin = self.cfg.data.plugin
        out = []
        for prompt, ids, action, seen, ended in zip(prompts, rollout["response_ids"], rollout["action_mask"],
                                                    rollout["response_mask"], rollout["ended"]):
            reply = reply_text(self.tokenizer, ids, action, self.eom_id, plugin)
            commands, results = (plugin_segments(self.tokenizer.decode(ids[seen.bool()].tolist(),
                                                                       skip_special_tokens=False))
                                 if plugin else ("", ""))
            out.append(Rollout(prompt, reply, commands, results, bool(ended)))
        return out

    def replies(self, prompts: list[Dialogue], greedy: bool = False) -> list[Rollout]:
        """Rollouts of the current policy on held-out prompts, sampled with the run's generation settings."""
        import ray
        world = ranks(self.cfg.roles.policy.layout)
        ids = [tokenize_prompt(d, self.tokenizer, self.cfg.data.max_prompt_length, self.cfg.data.plugin) for d in prompts]
        batch, real = pad_rows(collate_prompts(ids, self.tokenizer.pad_token_id), world)
        gen = dict(self.gen, do_sample=not greedy)
        rollout = self.roles.groups["policy"].run("generate", ray.put(batch), gen)
        return self.rollouts(prompts, {k: v[:real] for k, v in rollout.items()})


def rule_score_of(prompts: list[Dialogue], replies: list[str]) -> Optional[float]:
    """The sample's rule over reply texts, or None when some prompt has nothing the rule can check."""
    from rlhf.sample import prompt_key, score_responses
    if not prompts or any(prompt_key(d) is None for d in prompts):
        return None
    return score_responses(prompts, replies)


def _called_tool(rollout: Rollout) -> bool:
    return rollout.commands not in ("", "None")


def task_scores(rollouts: list[Rollout]) -> dict[str, float]:
    """The bundled task's checks where every prompt allows them: `rule_score` (the sample's rule) and
    `answer_accuracy` (the final number equals the prompt's known answer)."""
    from rlhf.plugins import answer_reward
    from rlhf.sample import prompt_key, rule_score
    out: dict[str, float] = {}
    if not rollouts:
        return out
    if all(prompt_key(r.prompt) is not None for r in rollouts):
        out["rule_score"] = sum(rule_score(r.prompt, r.reply) for r in rollouts) / len(rollouts)
    if all(r.prompt.metadata.get("answer") is not None for r in rollouts):
        out["answer_accuracy"] = sum(answer_reward(r.prompt.metadata, r.reply) for r in rollouts) / len(rollouts)
    return out


def load_reward_setup(cfg: Config, reward: Optional[str]) -> tuple[dict[str, Rule], Optional[dict]]:
    """The run's rules and the preference model's score statistics, checked before Ray starts: a missing
    --reward, a rule that does not import or a tool that does not load fails here in one line."""
    from reward.model import load_reward_stats
    from reward.rules import load_rules
    from rlhf.modeling import check_model_dir
    from rlhf.plugins import build_registry
    p = cfg.ppo
    if needs_reward_group(cfg) and not (reward or cfg.roles.reward.model):
        raise SystemExit("--reward: needed while ppo.reward_model_weight > 0; give the preference model, or set "
                         "ppo.reward_model_weight=0 and train on ppo.reward_rules alone")
    if reward:
        check_model_dir(reward, "--reward")
    registry = build_registry(cfg.plugins.tools, cfg.plugins.solver, cfg.plugins.timeout)
    rules = load_rules(p.reward_rules, registry)
    # The preference model's own score statistics start the running normalisation when its score is the reward.
    stats = load_reward_stats(reward) if reward and needs_reward_group(cfg) and not rules else None
    if stats:
        stats = {"mean": stats["mean"] * p.reward_model_weight, "std": stats["std"] * p.reward_model_weight}
    return rules, stats


def run_ppo(cfg: Config, policy: str, reward: Optional[str], prompts_path: str, output: str,
            resume: bool = False) -> dict:
    import ray
    from actors.runtime import ensure_ray
    from rlhf.modeling import ModelLoadError, load_tokenizer
    from rlhf.sft import encode_dialogues

    from rlhf.modeling import check_model_dir
    cfg.model.path, cfg.data.train = policy, prompts_path
    check_model_dir(policy, "--policy")
    for role in ("policy", "reference", "reward", "critic"):
        if getattr(cfg.roles, role).model:
            check_model_dir(getattr(cfg.roles, role).model, f"roles.{role}.model")
    rules, reward_stats = load_reward_setup(cfg, reward)
    tokenizer = load_tokenizer(cfg.model.tokenizer or policy, cfg.model.trust_remote_code)
    if reward and (needs_reward_group(cfg) or role_model(cfg, "critic", policy, reward) == reward):
        reward_tokenizer = load_tokenizer(reward, cfg.model.trust_remote_code)
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ModelLoadError(f"{reward}: the reward model's tokenizer differs from the policy's ({policy}); "
                                 "PPO scores the policy's token ids, so train the reward model from the same tokenizer")
    prompts = load_prompts(prompts_path)
    held_out = load_prompts(cfg.data.eval)[: cfg.ppo.eval_prompts] if cfg.data.eval else []
    ptx = encode_dialogues(cfg.data.ptx, tokenizer, cfg) if cfg.data.ptx and cfg.ppo.ptx_coef > 0 else None
    if len(prompts) < cfg.ppo.prompts_per_iteration:
        raise SystemExit(f"{prompts_path}: {len(prompts)} prompts is fewer than ppo.prompts_per_iteration "
                         f"({cfg.ppo.prompts_per_iteration})")
    prompt_ids = [tokenize_prompt(d, tokenizer, cfg.data.max_prompt_length, cfg.data.plugin) for d in prompts]
    run = open_run(output, cfg, resume)

    cpus = sum(getattr(cfg.roles, r).layout.cpus_per_rank * ranks(getattr(cfg.roles, r).layout)
               for r in ("policy", "reference", "reward", "critic"))
    started = ensure_ray(cfg.ray, cpus)
    roles: Optional[Roles] = None
    summary: dict = {}
    stage = Stage()
    restarts = 0
    try:
        while True:
            try:
                stage.now("start-up")
                roles = Roles(cfg, policy, reward)
                trainer = PPOTrainer(cfg, roles, tokenizer, prompts, prompt_ids, ptx, reward_stats, rules)
                _record_placement(output, roles)
                return _train(cfg, run, roles, trainer, held_out, summary, stage, restarts)
            except ray.exceptions.RayActorError as err:
                # A rank died (process killed, node lost) anywhere: in start-up, an iteration, an evaluation or a
                # checkpoint save. Rebuild every group and go back to the last complete checkpoint; a half-written
                # one was never committed, so it is not taken.
                restarts += 1
                who = roles.who(err) if roles is not None else "a rank"
                latest = run.checkpoints.latest()
                if restarts > cfg.ray.max_restarts:
                    reason = " ".join(str(err).split())[:160]
                    raise SystemExit(f"{stage.where}: {who} died ({reason}); gave up after {restarts - 1} "
                                     f"restart(s) (ray.max_restarts={cfg.ray.max_restarts}); see the Ray logs of "
                                     f"that rank, then rerun with --resume to continue from "
                                     f"{latest or 'the start'}") from None
                print(f"ppo: {who} died during {stage.where}; rebuilding the role groups from "
                      f"{latest or 'the start'} (restart {restarts}/{cfg.ray.max_restarts})", flush=True)
                if roles is not None:
                    roles.shutdown()
                    roles = None
    finally:
        run.metrics.close()
        if roles is not None:
            roles.shutdown()
        if started:
            ray.shutdown()


class Stage:
    """Where the run is, for the line that says what a dead rank interrupted."""

    def __init__(self) -> None:
        self.where = "start-up"
        self.reached = 0
        """The furthest iteration begun, to count what a restart loses."""

    def now(self, where: str, iteration: int = 0) -> None:
        self.where = where
        self.reached = max(self.reached, iteration)


def _train(cfg: Config, run: RunDir, roles: Roles, trainer: "PPOTrainer", held_out: list[Dialogue], summary: dict,
           stage: Stage, restarts: int) -> dict:
    """The run from its last complete checkpoint (or the start) to final/: iterations, checkpoints, evaluations.
    Called again after a rank died, on fresh role groups; `summary` keeps what earlier attempts measured."""
    import ray
    latest = run.checkpoints.latest()
    if latest:
        stage.now(f"the restore of {latest}")
        _restore(roles, trainer, latest)
    if restarts:
        run.metrics.truncate_after(trainer.state.iteration)
        lost = max(0, stage.reached - trainer.state.iteration)
        print(f"ppo: resumed at iteration {trainer.state.iteration}, losing {lost} iteration(s)", flush=True)
        run.metrics.log(trainer.state.iteration, {"ppo/restarts": restarts, "ppo/iterations_lost": lost})
    elif held_out and not latest:
        stage.now("the held-out evaluation before training")
        start = {f"eval/{k}": v for k, v in task_scores(trainer.replies(held_out)).items()}
        summary |= {f"{k}_start": v for k, v in start.items()}
        if start:
            run.metrics.log(0, start)
    progress = Progress(cfg.ppo.iterations, desc="ppo", enabled=cfg.logging.progress,
                        initial=trainer.state.iteration)
    skipped_in_row = 0
    while trainer.state.iteration < cfg.ppo.iterations:
        done = trainer.state.iteration + 1
        stage.now(f"iteration {done}", done)
        metrics = trainer.iteration(done - 1)
        if metrics.get("ppo/skipped"):
            skipped_in_row += 1
            phase = metrics.pop("ppo/skipped_phase")
            print(f"ppo: iteration {done} skipped ({phase})", flush=True)
            if skipped_in_row >= cfg.ppo.max_skipped_in_row:
                raise SystemExit(f"iteration {done}: {skipped_in_row} iterations in a row were skipped for NaN/inf "
                                 f"in {phase}; lower the learning rate or check the reward model")
            run.metrics.log(done, metrics)
            continue
        skipped_in_row = 0
        run.metrics.log(done, metrics)
        progress.update(1, reward=f"{metrics['ppo/reward_raw']:.3f}", kl=f"{metrics['ppo/kl']:.3f}")
        if cfg.train.save_every and done % cfg.train.save_every == 0 and done < cfg.ppo.iterations:
            stage.now(f"the checkpoint of iteration {done}", done)
            _checkpoint(run, roles, trainer, done)
    progress.close()
    if not (latest and read_meta(latest)["step"] == cfg.ppo.iterations):
        stage.now("the final checkpoint", cfg.ppo.iterations)
        _checkpoint(run, roles, trainer, cfg.ppo.iterations)
    if held_out:
        stage.now("the held-out evaluation after training", cfg.ppo.iterations)
        end = {f"eval/{k}": v for k, v in task_scores(trainer.replies(held_out)).items()}
        summary |= end
        if end:
            run.metrics.log(cfg.ppo.iterations, end)
    stage.now("the save of final/", cfg.ppo.iterations)
    ray.get(roles.groups["policy"].call("save_pretrained", run.final, cfg.roles.policy.lora.merge_on_save))
    return summary | {"final": run.final}


def _record_placement(output: str, roles: Roles) -> None:
    """Where each rank ran (node, GPU ids, pid): for the user, and for tests that check the layout."""
    from rlhf.checkpoint import atomic_write_json
    atomic_write_json(f"{output}/placement.json", roles.placement())


def _restore(roles: Roles, trainer: "PPOTrainer", checkpoint: str) -> None:
    import ray
    ray.get([r for grp in roles.groups.values() for r in grp.call("load_checkpoint", checkpoint)])
    trainer.load_state_dict(read_meta(checkpoint)["controller"])


def _checkpoint(run: RunDir, roles: Roles, trainer: PPOTrainer, step: int) -> str:
    trained = [(roles.groups[r], {}) for r in ("policy", "critic") if r in roles.groups]
    return save_checkpoint(run, trained, step, {"controller": trainer.state_dict()})
