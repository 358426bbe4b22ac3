"""The one typed configuration tree of every command: dataclasses checked by OmegaConf.

YAML files under `configs/` fill it, `--set key.path=value` overrides it, and derived values are computed once in
`derive()`. An unknown key or a wrong type is a one-line `ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override the user must fix; the message is one line."""


@dataclass
class DataConfig:
    train: str = ""
    """Training file (JSONL): dialogues for SFT, preferences for RM, prompts for PPO."""
    eval: str = ""
    """Held-out file of the same kind; empty means no evaluation."""
    ptx: str = ""
    """SFT dialogues for PPO's pretraining (ptx) loss; empty turns the loss off."""
    max_length: int = 512
    """Tokens per training sequence; longer dialogues lose their oldest turns."""
    max_prompt_length: int = 256
    """Tokens per PPO prompt; longer prompts lose their oldest turns."""
    plugin: bool = False
    """Render in the MOSS-003-plugin style (absent plugin segments written as None)."""


@dataclass
class ModelConfig:
    path: str = ""
    """Model directory or hub id; the command line's --model/--policy fills it."""
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
class TrainConfig:
    epochs: int = 1
    """Passes over the training file (SFT, RM)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 means epochs decide."""
    global_batch_size: int = 16
    """Records per optimizer step across all ranks (dialogues for SFT, prompts for RM)."""
    micro_batch_size: int = 4
    """Records per forward pass on one rank."""
    eval_every: int = 50
    """Evaluate on data.eval every N steps (0: only at the end)."""
    save_every: int = 100
    """Write a checkpoint every N steps (PPO: iterations); 0: only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted first)."""
    log_every: int = 10
    """Log training metrics every N steps."""


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


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    """Tokens a reply may have; a reply that never reaches <eom> stops here."""
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
    model: str = ""
    """Checkpoint of this role; empty means the default (policy: --policy, reference: the policy, reward: --reward)."""
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    micro_batch_size: int = 4
    """Sequences per forward pass on one rank of this role."""


@dataclass
class PPOConfig:
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
    kl_controller: str = "fixed"
    """fixed or adaptive (Ziegler et al.)."""
    kl_target: float = 6.0
    """Adaptive controller's target KL per reply."""
    kl_horizon: int = 10000
    """Adaptive controller's horizon in samples."""
    reward_normalize: bool = True
    """Normalise scores with running statistics (PPO-max)."""
    reward_clip: float = 5.0
    """Clip normalised scores to +-this; 0 turns it off."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch's action tokens."""
    no_eom_penalty: float = -1.0
    """Added to the score of a reply that never reaches <eom>; 0 turns it off."""
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
    """Held-out prompts whose rule score is measured at the end (data.eval)."""
    max_skipped_in_row: int = 3
    """Iterations in a row whose scores or losses are NaN/inf (and so are skipped) before the run stops."""
    reward_model_weight: float = 1.0
    """Weight of the preference model's score in the reward; 0 starts no reward group (rules alone)."""
    reward_rules: dict[str, float] = field(default_factory=dict)
    """Rule rewards and their weights, added to the model's: answer, command, grounded, sample, module:function."""


@dataclass
class RolesConfig:
    policy: RoleConfig = field(default_factory=RoleConfig)
    reference: RoleConfig = field(default_factory=RoleConfig)
    reward: RoleConfig = field(default_factory=RoleConfig)
    critic: RoleConfig = field(default_factory=RoleConfig)


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
    """Times PPO rebuilds a dead role group and reloads the last checkpoint before giving up."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard events under output/tensorboard."""
    progress: bool = True
    """Show a progress bar on the terminal."""


@dataclass
class Config:
    seed: int = 0
    """Seeds Python, NumPy and torch on every rank."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rm: RewardLossConfig = field(default_factory=RewardLossConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


_CHOICES = {
    "layout.strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "optim.schedule": ("constant", "cosine"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "ppo.estimator": ("gae", "grpo", "rloo", "reinforce_pp"),
    "ppo.kl_estimator": ("k1", "k2", "k3"),
    "ppo.kl_controller": ("fixed", "adaptive"),
    "ppo.critic_init": ("reward", "policy"),
}


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _layouts(cfg: Config) -> dict[str, LayoutConfig]:
    return {"layout": cfg.layout, **{f"roles.{r}.layout": getattr(cfg.roles, r).layout for r in ROLE_NAMES}}


ROLE_NAMES = ("policy", "reference", "reward", "critic")


def check(cfg: Config) -> Config:
    """Value checks OmegaConf's types cannot express; raises ConfigError naming the key."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    for prefix, layout in _layouts(cfg).items():
        if layout.strategy not in _CHOICES["layout.strategy"]:
            raise ConfigError(f"{prefix}.strategy: {layout.strategy!r} is not one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD")
        if layout.num_nodes < 1 or layout.gpus_per_node < 1:
            raise ConfigError(f"{prefix}: num_nodes and gpus_per_node must be at least 1 (ranks per node on CPU)")
        if not 0 < layout.gpu_fraction <= 1:
            raise ConfigError(f"{prefix}.gpu_fraction: must be in (0, 1], got {layout.gpu_fraction}")
    for prefix, ds in [("deepspeed", cfg.deepspeed)] + [(f"roles.{r}.deepspeed", getattr(cfg.roles, r).deepspeed) for r in ROLE_NAMES]:
        if ds.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{prefix}.zero_stage: must be 0, 1, 2 or 3, got {ds.zero_stage}")
        if ds.offload_param and ds.zero_stage != 3:
            raise ConfigError(f"{prefix}.offload_param: needs zero_stage 3")
    for r in ROLE_NAMES:
        other = getattr(cfg.roles, r).layout.colocate_with
        if other and (other not in ROLE_NAMES or other == r):
            raise ConfigError(f"roles.{r}.layout.colocate_with: {other!r} must name another role ({', '.join(ROLE_NAMES)})")
    world = ranks(cfg.layout)
    if cfg.train.global_batch_size % (cfg.train.micro_batch_size * world):
        raise ConfigError(
            f"train.global_batch_size: {cfg.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size ({cfg.train.micro_batch_size}) x ranks ({world})")
    policy_ranks = ranks(cfg.roles.policy.layout)
    rollouts = cfg.ppo.prompts_per_iteration * cfg.ppo.samples_per_prompt
    if rollouts % cfg.ppo.train_batch_size:
        raise ConfigError(f"ppo.train_batch_size: {cfg.ppo.train_batch_size} must divide the rollouts per "
                          f"iteration ({rollouts} = prompts_per_iteration x samples_per_prompt)")
    if cfg.ppo.prompts_per_iteration % policy_ranks:
        raise ConfigError(f"ppo.prompts_per_iteration: {cfg.ppo.prompts_per_iteration} must be a multiple of the "
                          f"policy's ranks ({policy_ranks})")
    if cfg.ppo.estimator in ("grpo", "rloo") and cfg.ppo.samples_per_prompt < 2:
        raise ConfigError(f"ppo.samples_per_prompt: {cfg.ppo.estimator} needs at least 2 replies per prompt")
    _check_rewards(cfg)
    return cfg


def _check_rewards(cfg: Config) -> None:
    p = cfg.ppo
    if p.reward_model_weight < 0:
        raise ConfigError(f"ppo.reward_model_weight: must be >= 0, got {p.reward_model_weight}")
    for name in p.reward_rules:
        if name not in ("answer", "command", "grounded", "sample") and (":" not in name or name.startswith(":")):
            raise ConfigError(f"ppo.reward_rules.{name}: not a built-in rule (answer, command, grounded, sample) nor "
                              "module:function")
    if p.reward_model_weight == 0 and not any(p.reward_rules.values()):
        raise ConfigError("ppo.reward_model_weight: 0 leaves no reward; give ppo.reward_rules (e.g. answer: 1.0)")
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


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config over the defaults, apply `key.path=value` overrides, and check the result."""
    schema = OmegaConf.structured(Config)
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
            merged = OmegaConf.merge(merged, loaded)
        where = "--set "
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"--set {item}: expected key.path=value")
            key, value = item.split("=", 1)
            if OmegaConf.select(merged, key, default=MISSING) is MISSING and not _is_known(key):
                raise ConfigError(f"--set {key}: unknown config key")
            # `key=` means the empty string (turning off an optional path), not null.
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value or chr(34) * 2}"]))
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = _one_line(getattr(err, "msg", None) or err).split(" full_key:")[0]
        raise ConfigError(f"{where}{key + ': ' if key else ''}{msg}") from None
    return check(cfg)


def _is_known(key: str) -> bool:
    node: Any = Config
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return False
        node = fields[part].type
        if isinstance(node, str) and node.startswith("dict["):  # a mapping takes any key (ppo.reward_rules.X)
            return True
        if isinstance(node, str):  # postponed annotations: resolve dataclass names defined here
            node = globals().get(node.split("[")[0], None) or str
    return True


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config; a temp file renamed into place so a crash never leaves half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, path)


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def from_dict(data: dict) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))  # type: ignore[return-value]
