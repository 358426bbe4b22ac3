"""The no-Ray baseline: one PPO iteration computed in one process, for `ppo_overhead.py` to measure Ray against.

The same computation as `rlhf.ppo.PPOTrainer.iteration` over four role groups, with the same model classes and
functions: replies from `rlhf.generation.generate_replies`, log-probs from `rlhf.ppo_math.logprobs_from_logits`,
reward and critic values from `reward.model.ScalarHeadModel`, reward shaping, GAE and the losses from
`rlhf.ppo_math` (`rlhf.ppo.advantages_for`), and the policy and critic updated over the same micro-batches with
AdamW and gradient clipping. What it leaves out is what Ray and DeepSpeed add: actors, object transfers, engines.

    python benchmarks/ppo_inprocess.py [--iterations 3] [--prompts 32] [--max-new-tokens 24]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (PHASES, load_prompt_ids, median, parser, ppo_config, set_threads,  # noqa: E402
                               table, workspace)
from rlhf.batching import Batch, micro_batches, position_ids, trim_left_padding  # noqa: E402


class InProcessPPO:
    """Policy, reference, reward and critic as plain modules in this process; `iteration()` as PPOTrainer's."""

    def __init__(self, cfg: Any, policy: str, reward: str, prompts_path: str):
        from reward.model import ScalarHeadModel, load_reward_stats
        from rlhf import ppo_math as pm
        from rlhf.config import to_dict
        from rlhf.modeling import load_causal_lm, load_tokenizer
        from rlhf.ppo import needs_critic, role_model
        self.cfg = cfg
        self.tokenizer = load_tokenizer(policy)
        self.prompts, self.prompt_ids = load_prompt_ids(cfg, self.tokenizer, prompts_path)
        self.policy = load_causal_lm(policy)
        self.reference = load_causal_lm(policy).eval().requires_grad_(False)
        self.reward = ScalarHeadModel.from_pretrained(reward).eval().requires_grad_(False)
        self.critic = ScalarHeadModel.from_pretrained(role_model(cfg, "critic", policy, reward)) \
            if needs_critic(cfg) else None
        self.optimizers = {"policy": _adamw(self.policy, cfg.roles.policy.optim)}
        if self.critic is not None:
            self.optimizers["critic"] = _adamw(self.critic, cfg.roles.critic.optim)
        self.kl_ctl = pm.make_kl_controller(cfg.ppo.kl_controller, cfg.ppo.kl_coef, cfg.ppo.kl_target,
                                            cfg.ppo.kl_horizon)
        self.moments = pm.RunningMoments()
        stats = load_reward_stats(reward)
        if stats:
            self.moments.load_state_dict({"mean": stats["mean"], "var": stats["std"] ** 2,
                                          "count": cfg.ppo.prompts_per_iteration})
        self.eom_id = self.tokenizer.convert_tokens_to_ids("<eom>")
        self.gen = to_dict(cfg)["generation"]
        self.it = 0

    # --- the roles' forward passes, as the workers run them --------------------------------------------------
    def response_logprobs(self, model: torch.nn.Module, mb: Batch, with_entropy: bool = False):
        from rlhf.ppo_math import entropy_from_logits, logprobs_from_logits
        width = mb["response_ids"].shape[1]
        mb = trim_left_padding(mb)
        out = model(input_ids=mb["sequences"], attention_mask=mb["attention_mask"],
                    position_ids=position_ids(mb["attention_mask"]), use_cache=False, logits_to_keep=width + 1)
        logits = out.logits.float()[:, :-1]
        logp = logprobs_from_logits(logits, mb["response_ids"])
        return logp, (entropy_from_logits(logits) if with_entropy else None)

    def logprobs(self, model: torch.nn.Module, exp: Batch, micro: int) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return torch.cat([self.response_logprobs(model, mb)[0] for mb in micro_batches(exp, micro)])

    def scores(self, exp: Batch) -> torch.Tensor:
        with torch.no_grad():
            parts = [trim_left_padding(mb) for mb in micro_batches(exp, self.cfg.roles.reward.micro_batch_size)]
            return torch.cat([self.reward.score(mb["sequences"], mb["attention_mask"],
                                                position_ids(mb["attention_mask"])).float() for mb in parts])

    def response_values(self, mb: Batch) -> torch.Tensor:
        width = mb["response_ids"].shape[1]
        mb = trim_left_padding(mb)
        return self.critic(mb["sequences"], mb["attention_mask"], position_ids(mb["attention_mask"]))[:, -width - 1:-1]

    def values(self, exp: Batch) -> Optional[torch.Tensor]:
        if self.critic is None:
            return None
        self.critic.eval()
        with torch.no_grad():
            return torch.cat([self.response_values(mb)
                              for mb in micro_batches(exp, self.cfg.roles.critic.micro_batch_size)])

    # --- one iteration ---------------------------------------------------------------------------------------
    def iteration(self) -> dict:
        """One PPO iteration; returns its wall seconds, the phase timings (as PPO's metrics) and reply length."""
        from rlhf.batching import collate_prompts
        from rlhf.generation import generate_replies
        from rlhf.runs import permutation
        cfg, p = self.cfg, self.cfg.ppo
        began = time.perf_counter()
        n = p.prompts_per_iteration
        epoch, index = divmod(self.it, len(self.prompt_ids) // n)
        order = permutation(len(self.prompt_ids), cfg.seed, epoch)[index * n:(index + 1) * n]
        order = sorted(order, key=lambda i: len(self.prompt_ids[i]))  # as PPOTrainer.prompt_batch
        rows = [i for i in order for _ in range(p.samples_per_prompt)]
        prompts = collate_prompts([self.prompt_ids[i] for i in rows], self.tokenizer.pad_token_id)
        rollout = generate_replies(self.policy, prompts, self.gen, self.eom_id, self.tokenizer.pad_token_id,
                                   torch.device("cpu"), micro_batch=len(rows))
        timings = {"time/generate": time.perf_counter() - began}

        t = time.perf_counter()
        exp = {"sequences": torch.cat([prompts["input_ids"], rollout["response_ids"]], 1),
               "attention_mask": torch.cat([prompts["attention_mask"],
                                            rollout.get("response_mask", rollout["action_mask"])], 1),
               "response_ids": rollout["response_ids"], "action_mask": rollout["action_mask"]}
        old = self.logprobs(self.policy, exp, cfg.roles.policy.micro_batch_size)
        ref = self.logprobs(self.reference, exp, cfg.roles.reference.micro_batch_size)
        raw, values = self.scores(exp), self.values(exp)
        timings["time/score"] = time.perf_counter() - t

        train = self.advantages(exp, rollout, old, ref, raw, values)
        t = time.perf_counter()
        self.update(train)
        timings["time/train"] = time.perf_counter() - t
        self.decode_and_score(rows, rollout)
        self.it += 1
        return {"iteration_s": time.perf_counter() - began,
                "response_length": float(rollout["action_mask"].sum(1).float().mean()), **timings}

    def advantages(self, exp: Batch, rollout: Batch, old: torch.Tensor, ref: torch.Tensor, raw: torch.Tensor,
                   values: Optional[torch.Tensor]) -> Batch:
        """Shaped rewards and the configured estimator, as the controller computes them."""
        from rlhf import ppo_math as pm
        from rlhf.ppo import advantages_for
        p = self.cfg.ppo
        mask = exp["action_mask"].float()
        scores = raw + p.no_eom_penalty * (1 - rollout["ended"].float())
        norm = pm.normalize_scores(scores, self.moments, p.reward_clip or None) if p.reward_normalize else scores
        rewards, kl = pm.shape_rewards(norm, old, ref, mask, self.kl_ctl.coef, p.kl_estimator)
        advantages, returns = advantages_for(self.cfg, norm, rewards, values, mask)
        self.kl_ctl.update(float(pm.masked_sum(kl, mask, dim=1).mean()), len(raw))
        train = {**exp, "old_logprobs": old, "advantages": advantages}
        if values is not None:
            train |= {"old_values": values, "returns": returns}
        return train

    def update(self, train: Batch) -> None:
        """PPO epochs over shuffled minibatches; a policy step and a critic step per minibatch."""
        p = self.cfg.ppo
        n = train["response_ids"].shape[0]
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.it)
        for _ in range(p.ppo_epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, p.train_batch_size):
                mb = {k: v[order[start:start + p.train_batch_size].sort().values] for k, v in train.items()}
                num_tokens = int(mb["action_mask"].sum())
                self.policy_step(mb, num_tokens)
                if self.critic is not None:
                    self.value_step(mb, num_tokens)

    def policy_step(self, batch: Batch, num_tokens: int) -> None:
        from rlhf.ppo_math import masked_sum, policy_loss
        p, micro = self.cfg.ppo, self.cfg.roles.policy.micro_batch_size
        self.policy.train()
        for mb in micro_batches(batch, micro):
            mask = mb["action_mask"].float()
            logp, entropy = self.response_logprobs(self.policy, mb, with_entropy=True)
            loss, _ = policy_loss(logp, mb["old_logprobs"], mb["advantages"], mask, p.clip_eps, num_tokens=num_tokens)
            ent = masked_sum(entropy, mask) / num_tokens
            (loss - p.entropy_coef * ent if p.entropy_coef else loss).backward()
        _step(self.policy, self.optimizers["policy"], self.cfg.roles.policy.optim.grad_clip)

    def value_step(self, batch: Batch, num_tokens: int) -> None:
        from rlhf.ppo_math import value_loss
        p, micro = self.cfg.ppo, self.cfg.roles.critic.micro_batch_size
        self.critic.train()
        for mb in micro_batches(batch, micro):
            loss, _ = value_loss(self.response_values(mb).float(), mb["old_values"], mb["returns"],
                                 mb["action_mask"].float(), p.value_clip_eps or None, num_tokens=num_tokens)
            (p.value_loss_coef * loss).backward()
        _step(self.critic, self.optimizers["critic"], self.cfg.roles.critic.optim.grad_clip)

    def decode_and_score(self, rows: list[int], rollout: Batch) -> float:
        """The replies' text and rule score, which the controller logs every iteration."""
        from rlhf.moss import split_reply
        from rlhf.sample import rule_score
        texts = [split_reply(self.tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=False))
                 for ids, m in zip(rollout["response_ids"], rollout["action_mask"])]
        return sum(rule_score(self.prompts[i], t) for i, t in zip(rows, texts)) / len(texts)


def _adamw(model: torch.nn.Module, optim: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=optim.lr,
                             betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip: float) -> None:
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], reps=1)
    p.add_argument("--iterations", type=int, default=3, help="timed iterations (after one warm-up)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per iteration")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--arch", default="codegen", choices=["codegen", "llama"])
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    args = p.parse_args(argv)
    set_threads(args.threads)
    cfg = ppo_config([f"seed={args.seed}", f"ppo.prompts_per_iteration={args.prompts}",
                      f"generation.max_new_tokens={args.max_new_tokens}"])
    with workspace(args, [args.arch], seed=args.seed) as ws:
        baseline = InProcessPPO(cfg, ws.models[args.arch], ws.models[args.arch], ws.data["prompts_train"])
        baseline.iteration()
        runs = [baseline.iteration() for _ in range(args.iterations)]
    keys = ("iteration_s", *PHASES, "response_length")
    print(table(["in-process PPO iteration", *[f"#{i + 1}" for i in range(len(runs))], "median"],
                [[k, *[r[k] for r in runs], median([r[k] for r in runs])] for k in keys]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
