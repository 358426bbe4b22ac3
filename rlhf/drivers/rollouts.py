"""Where a PPO iteration's rollouts come from: the policy's own ranks, or a rollout group that follows its weights.

With a rollout group (`ppo.rollout_group`) the engine holds the policy's weights as of the last sync, versioned by the
iteration whose update made them. `ppo.off_policy_steps: 0` syncs and generates at the start of each iteration (what
the policy's ranks would sample, from another engine). `1` overlaps: once iteration k's replies are in, the engine
takes the weights that will train on them and starts iteration k+1's replies; the reference and the reward model
score those as soon as they arrive, while the policy and the critic still train on iteration k's. Iteration k+1 then
trains on replies one update old (`rollout/staleness` 1), which the policy loss corrects with truncated importance
weights against the engine's own log-probs (`rlhf.ppo_math.truncated_is_weights`).

A colocated rollout group (`roles.rollout.layout.colocate_with: policy`) that does not overlap sleeps while the policy
trains and wakes (then syncs) to generate.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rlhf.batching import Batch, experience
from rlhf.roles import PPORoles


@dataclass
class Ready:
    """One iteration's rollouts: its prompts, the replies, the experience every scoring role reads, and the scoring
    calls already started on it (reference, reward and process reward, when generated ahead)."""
    prompts: Batch
    rollout: Batch
    exp: Batch
    started: dict = field(default_factory=dict)


class PolicyRollouts:
    """The policy's training ranks generate (no rollout group)."""

    def __init__(self, roles: PPORoles, generation: Any, prompts_of: Callable[[int], Batch], phases: list):
        self.roles, self.generation, self.prompts_of, self.phases = roles, generation, prompts_of, phases

    def take(self, it: int) -> Ready:
        prompts = self.prompts_of(it)
        began = time.time()
        rollout = self.roles.policy.generate(prompts, self.generation).result()
        self.phases.append({"role": "policy", "phase": "generate", "batch": it, "start": began, "end": time.time()})
        return Ready(prompts, rollout, experience(prompts, rollout))

    def close(self) -> None:
        pass


class EngineRollouts:
    """The rollout group generates, synced to the policy's weights; with `ahead`, one iteration ahead."""

    def __init__(self, roles: PPORoles, generation: Any, prompts_of: Callable[[int], Batch], phases: list,
                 ahead: bool, iterations: int, sleeps: bool):
        self.roles, self.generation, self.prompts_of, self.phases = roles, generation, prompts_of, phases
        self.ahead, self.iterations, self.sleeps = ahead, iterations, sleeps and not ahead
        self.asleep = False
        self.pending: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rollout-ahead") if ahead else None

    def take(self, it: int) -> Ready:
        """Iteration `it`'s rollouts (generated ahead, or now with the current weights); with `ahead`, the next
        iteration's generation starts before this returns."""
        job = self.pending.pop(it, None)
        if job is None:
            self.sync(it)
            ready = self.generate(it, score_early=False)
        else:
            ready = job.result()
        if self.sleeps:
            self.roles.rollout.sleep().result()
            self.asleep = True
        if self.ahead and it + 1 < self.iterations:
            self.sync(it)
            self.pending[it + 1] = self.pool.submit(self.generate, it + 1, True)
        return ready

    def sync(self, version: int) -> None:
        """The policy's weights after `version` updates into the engine, unless it holds them already."""
        sync = self.roles.sync
        if sync.version == version and not self.asleep:
            return
        began = time.time()
        if self.asleep:
            self.roles.rollout.wake().result()
            self.asleep = False
        sync.push(version)
        self.phases.append({"role": "policy+rollout", "phase": "sync", "batch": version, "start": began,
                            "end": time.time()})

    def generate(self, it: int, score_early: bool) -> Ready:
        prompts = self.prompts_of(it)
        rollout = self.roles.rollout.generate(prompts, self.generation).result()
        span = rollout.pop("span")  # the engine's own clock: when its ranks generated this batch
        self.phases.append({"role": "rollout", "phase": "generate", "batch": it, "start": float(span[:, 0].min()),
                            "end": float(span[:, 1].max())})
        exp = experience(prompts, rollout)
        started = {}
        if score_early:  # the frozen scorers take the replies as they come, while the trainers train
            started["ref_logprobs"] = self.roles.reference.logprobs(exp)
            if self.roles.reward is not None:
                started["scores"] = self.roles.reward.score(exp)
            if self.roles.prm is not None:
                started["steps"] = self.roles.prm.step_scores(exp)
        return Ready(prompts, rollout, exp, started)

    def close(self) -> None:
        """Nothing generated ahead is waited for (a run that stops or restarts drops it)."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.pending.clear()


def rollout_source(cfg: Any, roles: PPORoles, prompts_of: Callable[[int], Batch], phases: list) -> Any:
    if roles.rollout is None:
        return PolicyRollouts(roles, cfg.generation, prompts_of, phases)
    colocated = cfg.roles.rollout.layout.colocate_with == "policy"
    return EngineRollouts(roles, cfg.generation, prompts_of, phases, ahead=cfg.ppo.off_policy_steps > 0,
                          iterations=cfg.ppo.iterations, sleeps=colocated)
