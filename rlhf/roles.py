"""The role interface: what the controller of a run may ask of each role, every call returning a future.

    rollout = roles.policy.generate(prompts, generation).result()
    ref, score = roles.reference.logprobs(exp), roles.reward.score(exp)   # both run at once
    stats = roles.policy.update(plan, loss).result()

A role wraps a `Group`: N ranks on Ray (`actors.group.RayGroup`) or one rank in this process
(`actors.local.LocalGroup`, for controller tests and the benchmarks' no-Ray baseline). Each worker method declares
how its input splits over ranks and how the results reduce (`actors.dispatch`); nothing here knows about ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

from rlhf.batching import Batch, Experience, TrainBatch


class RankDied(RuntimeError):
    """A rank of a role died (process killed, node lost): the run can rebuild its groups and resume."""

    def __init__(self, who: str, reason: str):
        super().__init__(f"{who} died ({reason})")
        self.who, self.reason = who, reason


class Future(Protocol):
    def result(self) -> Any:
        """Wait for every rank and return their results reduced as the method declares; RankDied if one died."""


class Group(Protocol):
    role: str
    world_size: int

    def call(self, method: str, *args: Any, **kwargs: Any) -> Future: ...
    def node_info(self) -> list[dict]: ...
    def shutdown(self) -> None: ...


@dataclass
class UpdatePlan:
    """One iteration's optimizer steps: the rows of each minibatch (in step order, epochs included), the number of
    action tokens of each (the loss normaliser of the whole minibatch, whatever its split), and for PPO-ptx the SFT
    rows of each step with their loss-token counts."""
    steps: list[TrainBatch]
    tokens: list[int]
    ptx: Optional[list[Batch]] = None
    ptx_tokens: Optional[list[int]] = None

    def epochs(self, n: int) -> list[UpdatePlan]:
        """The plan as `n` plans of one PPO epoch each, in order (an early stop runs them one at a time)."""
        per = len(self.steps) // n
        cut = lambda xs, e: None if xs is None else xs[e * per:(e + 1) * per]  # noqa: E731
        return [UpdatePlan(cut(self.steps, e), cut(self.tokens, e), cut(self.ptx, e), cut(self.ptx_tokens, e))
                for e in range(n)]


@dataclass(frozen=True)
class PolicyLoss:
    clip_eps: float
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    """> 0: the batch carries `ref_logprobs` and the loss adds kl_coef x k3 KL (GRPO, RLOO)."""
    ptx_coef: float = 0.0
    dual_clip: Optional[float] = None
    log_ratio_clip: Optional[float] = None
    kl_clip: Optional[float] = None
    tis_cap: Optional[float] = None
    """Rows with `behaviour_logprobs` (a rollout group's): each token's loss times min(pi_old / pi_engine, tis_cap)."""


@dataclass(frozen=True)
class ValueLoss:
    clip_eps: float
    coef: float = 1.0


@dataclass(frozen=True)
class RankingStep:
    """The settings of one preference-model step (`rlhf rm`)."""
    num_prompts: int
    """Ranked lists of the global batch: the ranking loss is averaged over them, whatever rank holds which."""
    label_smoothing: float
    lm_coef: float
    """> 0: plus lm_coef x the LM loss on each list's best response."""
    num_best_tokens: int
    """Reply tokens of the global batch's best responses: the LM loss's normaliser."""


@dataclass(frozen=True)
class PRMStep:
    """The settings of one process-reward-model step (`rlhf prm`)."""
    num_steps: int
    """Labelled steps of the global batch: the loss is averaged over them, whatever rank holds which."""


@dataclass(frozen=True)
class DPOStep:
    """The settings of one DPO step (`rlhf dpo`; rlhf.dpo_math)."""
    num_prompts: int
    """Ranked lists of the global batch: the loss is summed over them and divided by this."""
    beta: float
    loss: str
    """listwise, pairwise or ipo."""
    label_smoothing: float = 0.0


class _Role:
    def __init__(self, group: Group):
        self.group = group

    def save_checkpoint(self, directory: str) -> Future:
        return self.group.call("save_checkpoint", directory)

    def load_checkpoint(self, directory: str) -> Future:
        return self.group.call("load_checkpoint", directory)


class Policy(_Role):
    def generate(self, prompts: Batch, generation: Any) -> Future:
        """Replies to left-padded prompts, a `rlhf.batching.RolloutBatch`: response_ids, action_mask, response_mask [b, R],
        ended [b]."""
        return self.group.call("generate", prompts, generation)

    def logprobs(self, experience: Experience) -> Future:
        """[b, R] the policy's log-probs of the replies."""
        return self.group.call("logprobs", experience)

    def update(self, plan: UpdatePlan, loss: PolicyLoss) -> Future:
        """PPO epochs over the plan's minibatches; mean stats (and `logprobs` [b, R] when on-policy)."""
        return self.group.call("update", plan, loss)

    def save_pretrained(self, out_dir: str, merge_lora: bool, extra_files: Optional[dict] = None) -> Future:
        return self.group.call("save_pretrained", out_dir, merge_lora, extra_files)


class Reference:
    """The frozen reference: its own group, or the LoRA policy's base with its adapters switched off."""

    def __init__(self, group: Group, adapters_off: bool = False):
        self.group, self.method = group, "reference_logprobs" if adapters_off else "logprobs"

    def logprobs(self, experience: Experience) -> Future:
        return self.group.call(self.method, experience)

    def reply_logprobs(self, lists: list) -> Future:
        """DPO: each ranked list's summed log-probs of its responses' last replies, and the sequences encoded."""
        return self.group.call("reply_logprobs", lists, self.method == "reference_logprobs")


class Reward(_Role):
    def score(self, experience: Experience) -> Future:
        """[b] the preference model's score of each whole dialogue."""
        return self.group.call("score", experience)


class ProcessReward(_Role):
    def step_scores(self, experience: Experience) -> Future:
        """Each reply's steps as the process reward model splits them: {"probs": [b, R] the probability that the
        reply can still reach the right answer after the step ending there (0 elsewhere), "mask": [b, R] 1 at each
        step's last token}."""
        return self.group.call("step_scores", experience)


class Critic(_Role):
    def values(self, experience: Experience) -> Future:
        """[b, R] the value of the state before each reply token."""
        return self.group.call("values", experience)

    def update(self, plan: UpdatePlan, loss: ValueLoss) -> Future:
        return self.group.call("update", plan, loss)


class Rollout:
    """The rollout engine's group: it samples with the policy's weights as of the last `WeightSync.push`."""

    def __init__(self, group: Group):
        self.group = group

    def generate(self, prompts: Batch, generation: Any) -> Future:
        """The policy's `generate` (a `RolloutBatch`), plus `logprobs` [b, R] of the sampled tokens under the engine's
        weights, the `version` [b] of those weights and the `span` [b, 2] (wall-clock start and end) of the
        generation."""
        return self.group.call("generate", prompts, generation)

    def sleep(self) -> Future:
        return self.group.call("sleep")

    def wake(self) -> Future:
        return self.group.call("wake")


class WeightSync:
    """The policy's rank 0 and every rollout rank, joined in a process group of their own; `push` sends the
    policy's current weights (gathered under ZeRO-3, LoRA merged) to every rollout rank (`actors.weight_sync`)."""

    def __init__(self, policy: Group, rollout: Group, bucket_mb: float):
        self.policy, self.rollout, self.bucket_mb = policy, rollout, bucket_mb
        self.manifest = policy.call("weight_manifest").result()
        theirs = rollout.call("weight_manifest").result()
        if [tuple(m[:2]) for m in self.manifest] != [tuple(m[:2]) for m in theirs]:
            ours = {m[0]: tuple(m[1]) for m in self.manifest}
            other = {m[0]: tuple(m[1]) for m in theirs}
            name = next((n for n in ours if ours[n] != other.get(n)), next(iter(set(other) - set(ours)), "?"))
            raise RuntimeError(f"the rollout group's model is not the policy's: {name} is {other.get(name)} there, "
                               f"{ours.get(name)} in the policy")
        nodes = {info["node_id"] for info in policy.node_info()[:1] + rollout.node_info()}
        addr, port = policy.call("weight_sync_endpoint", len(nodes) == 1).result()
        world = 1 + rollout.world_size
        joined = [group.call("join_weight_sync", addr, port, world) for group in (policy, rollout)]
        for future in joined:
            future.result()
        self.version: Optional[int] = 0

    def push(self, version: int) -> None:
        """The policy's weights, as version `version`, into every rollout rank (both sides wait for the whole sync)."""
        sent = self.policy.call("send_weights", self.bucket_mb)
        received = self.rollout.call("receive_weights", version, self.manifest, self.bucket_mb)
        self.version = received.result()  # first: a dead rollout rank is RankDied (the sender then fails on its socket)
        sent.result()


class Trainer(_Role):
    """The one trained group of `rlhf sft`, `rlhf rm` and `rlhf dpo`."""

    def train_step(self, batch: Any, step: Union[int, RankingStep, DPOStep]) -> Future:
        """One optimizer step: SFT's rows with the global batch's loss-token count, RM's or DPO's ranked lists with
        their step's settings."""
        return self.group.call("train_step", batch, step)

    def evaluate(self, batch: Any, *args: Any) -> Future:
        return self.group.call("evaluate", batch, *args)

    def save_pretrained(self, out_dir: str, *args: Any) -> Future:
        return self.group.call("save_pretrained", out_dir, *args)


@dataclass
class PPORoles:
    """The roles of one PPO run; reward and critic are absent when the run needs none (rules only, critic-free)."""
    policy: Policy
    reference: Reference
    reward: Optional[Reward]
    critic: Optional[Critic]
    groups: dict[str, Group]
    rollout: Optional[Rollout] = None
    """A rollout group of its own (ppo.rollout_group); else the policy's ranks generate."""
    sync: Optional[WeightSync] = None
    prm: Optional[ProcessReward] = None
    """A process reward model (--process-reward) that scores every step of each reply."""

    def trained(self) -> list[_Role]:
        return [r for r in (self.policy, self.critic) if r is not None]

    def placement(self) -> dict[str, list[dict]]:
        return {name: group.node_info() for name, group in self.groups.items()}
