"""`rlhf pipeline`: data → tokenizer → model → SFT → preference model → PPO (and/or DPO) → generations and a
report, as one command. Each stage writes its own output directory; rerunning (or `--resume`) skips finished stages
and resumes an interrupted one from its last checkpoint."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlhf.commands import COMMANDS
from rlhf.config import ConfigError, load_config
from rlhf.data import load_prompts
from rlhf.modeling import init_model
from rlhf.report import write_report
from rlhf.sample import parts_of, score_of, write_sample


@dataclass
class StageConfigs:
    sft: str = "configs/tiny/sft.yaml"
    """Config of the SFT stage."""
    rm: str = "configs/tiny/rm.yaml"
    """Config of the preference-model stage."""
    ppo: str = "configs/tiny/ppo.yaml"
    """Config of the PPO stage; empty: no PPO (and no preference model, which only PPO needs)."""
    dpo: str = ""
    """Config of a DPO stage from the SFT model on the same ranked lists (configs/tiny/dpo.yaml); empty: no DPO.
    With PPO too, the report compares the two."""


@dataclass
class StageOverrides:
    sft: list[str] = field(default_factory=list)
    rm: list[str] = field(default_factory=list)
    ppo: list[str] = field(default_factory=list)
    dpo: list[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    data: str = ""
    """Directory with sft_train/sft_eval/prefs_train/prefs_eval/prompts_train/prompts_eval .jsonl; empty: the bundled sample."""
    sample_seed: int = 0
    """Seed of the bundled sample when data is empty."""
    model: str = ""
    """Start from this model (path or hub id); empty: train a tokenizer and build a random model."""
    arch: str = "codegen"
    """Architecture of the random model: codegen (moss-moon-003's), llama, qwen2 or gpt_neox."""
    preset: str = "tiny"
    """Size of the random model."""
    vocab_size: int = 800
    """Vocabulary of the trained tokenizer."""
    stages: StageConfigs = field(default_factory=StageConfigs)
    overrides: StageOverrides = field(default_factory=StageOverrides)
    report_examples: int = 6
    """Prompts shown with their SFT, PPO and DPO replies in the report."""
    eval_prompts: int = 200
    """Held-out prompts whose replies are scored for the report."""


def load_pipeline_config(path: str, overrides: list[str]) -> PipelineConfig:
    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file does not exist")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "")
        raise ConfigError(f"{path}: {key}: {' '.join(str(getattr(err, 'msg', err)).split())}") from None


def _stage_args(out: str, resume: bool) -> bool:
    """Whether a stage must run, and with --resume: finished stages are skipped, interrupted ones resumed."""
    return os.path.isdir(os.path.join(out, "checkpoints")) and not os.path.isdir(os.path.join(out, "final"))


def run_pipeline(config: str, output: str, overrides: list[str], resume: bool = False) -> int:
    # Ray, torch and transformers load when a pipeline runs, not when `rlhf` starts.
    import ray

    from actors.runtime import ensure_ray
    from reward.evaluate import evaluate
    from rlhf.drivers.generate import generate_texts
    from rlhf.tokenizer import texts_from_files, train_tokenizer

    pc = load_pipeline_config(config, overrides)
    if not pc.stages.ppo and not pc.stages.dpo:
        raise ConfigError(f"{config}: stages: give ppo, dpo or both (the policy stages after SFT)")
    aligned = [name for name in ("ppo", "dpo") if getattr(pc.stages, name)]
    wanted = ["sft"] + (["rm"] if pc.stages.ppo else []) + aligned
    cfgs = {name: load_config(name, getattr(pc.stages, name), getattr(pc.overrides, name)) for name in wanted}
    os.makedirs(output, exist_ok=True)
    say = lambda msg: print(f"[pipeline] {msg}", flush=True)  # noqa: E731

    data = pc.data or os.path.join(output, "data")
    if not pc.data and not os.path.exists(os.path.join(data, "prompts_eval.jsonl")):
        write_sample(data, seed=pc.sample_seed)
        say(f"sample data -> {data}")
    files = {k: os.path.join(data, f"{k}.jsonl") for k in
             ("sft_train", "sft_eval", "prefs_train", "prefs_eval", "prompts_train", "prompts_eval")}
    for path in files.values():
        if not os.path.exists(path):
            raise ConfigError(f"{path}: missing; data must hold {', '.join(os.path.basename(p) for p in files.values())}")

    model = pc.model
    if not model:
        model, tok = os.path.join(output, "base"), os.path.join(output, "tokenizer")
        if not os.path.exists(os.path.join(model, "config.json")):
            plugin = os.path.join(data, "plugin_sft.jsonl")  # so the same base model serves docs/plugins.md
            texts = [files["sft_train"], files["prefs_train"]] + ([plugin] if os.path.exists(plugin) else [])
            train_tokenizer(texts_from_files(texts), pc.vocab_size, tok)
            init_model(pc.arch, pc.preset, tok, model, seed=cfgs["sft"].seed)
            say(f"tokenizer and random {pc.arch}/{pc.preset} model -> {model}")

    started = ensure_ray(cfgs["sft"].ray, 4)
    try:
        stage = {name: os.path.join(output, name) for name in wanted}
        if "ppo" in cfgs:
            cfgs["ppo"].roles.reward.model = f"{stage['rm']}/final"
        # Each stage: what it starts from, what it trains on, what it holds out, the line it says.
        sft = f"{stage['sft']}/final"
        stages = [("sft", model, "sft", "SFT ..."), ("rm", sft, "prefs", "preference model ..."),
                  ("ppo", sft, "prompts", "PPO ..."), ("dpo", sft, "prefs", "DPO ...")]
        for name, start, data_kind, line in [s for s in stages if s[0] in cfgs]:
            if os.path.isdir(os.path.join(stage[name], "final")):
                continue
            cfg = cfgs[name]
            cfg.model.path, cfg.data.train = start, files[f"{data_kind}_train"]
            cfg.data.eval = cfg.data.eval or files[f"{data_kind}_eval"]
            say(line)
            COMMANDS[name].run()(cfg, stage[name], resume=_stage_args(stage[name], resume))
    finally:
        if started:
            ray.shutdown()

    say(f"generations before and after {' and '.join(n.upper() for n in aligned)} ...")
    # Every policy answers with rlhf generate's chat defaults (PPO's model, data and tools settings, its reply cap),
    # so the replies compare, and compare with what a user of the model sees.
    sampling = load_config("generate", None, [])
    if "ppo" in cfgs:
        ppo = cfgs["ppo"]
        sampling.seed, sampling.model, sampling.data, sampling.plugins = ppo.seed, ppo.model, ppo.data, ppo.plugins
        sampling.generation.max_new_tokens = ppo.generation.max_new_tokens
        sampling.generation.lengths_from = ppo.generation.lengths_from
    sampling.generation.lengths_from = sampling.generation.lengths_from or files["sft_train"]
    prompts = load_prompts(files["prompts_eval"])[: pc.eval_prompts]
    policies = {name.upper(): name for name in ["sft", *aligned]}
    replies = {label: generate_texts(f"{stage[name]}/final", prompts, sampling) for label, name in policies.items()}
    rules = {label: score_of(prompts, texts) for label, texts in replies.items()}
    parts = {label: parts_of(prompts, texts) for label, texts in replies.items()}  # which half of the rule each learned
    rm_eval = evaluate(f"{stage['rm']}/final", files["prefs_eval"], cfgs["rm"]) if "rm" in cfgs else None
    examples = [(p.turns[-1].human, [replies[label][i] for label in policies])
                for i, p in enumerate(prompts[: pc.report_examples])]
    metrics = {f"{name}_metrics": f"{stage[name]}/metrics.jsonl" for name in ("sft", *aligned)}
    report = write_report(output, rm_eval=rm_eval, rules=rules, parts=parts, examples=examples, **metrics)
    say("rule score on held-out prompts: " + " -> ".join(f"{label} {score}" for label, score in rules.items()) +
        (f"; reward model accuracy {rm_eval['pairwise_accuracy']:.3f}" if rm_eval else ""))
    print(f"Report: {report}")
    print(f"TensorBoard: tensorboard --logdir {output}")
    return 0
