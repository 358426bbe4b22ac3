"""What each training command is, in one record: its config, its runner, its flags and the config keys they fill,
the models and files it reads. The command line builds its parser from these records, the sweep and the pipeline
run commands through them, and the tests check every one; the groups a run starts and how far it goes are its
config's (`cfg.layouts()`, `cfg.horizon()`).

A new training command is a config class in rlhf/config.py, a driver, and a record here.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from rlhf import storage
from rlhf.config import CONFIGS, ConfigError, get_key, set_key
from rlhf.data import DataError, DataFileError


@dataclass(frozen=True)
class Flag:
    """A command-line flag that fills one config key."""
    name: str
    """The flag, e.g. --model; a sweep file's `args:` names it without the dashes."""
    key: str
    """The config key it fills, e.g. model.path."""
    help: str
    required: bool = True
    """Optional flags keep the config's value when not given."""

    @property
    def arg(self) -> str:
        """The argparse destination and the sweep file's `args:` name."""
        return self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    runner: str
    """module:function of the driver, `run(cfg, output, resume) -> summary`; imported when the command runs."""
    flags: tuple[Flag, ...]
    models: dict[str, str] = field(default_factory=dict)
    """Config key naming a model -> the kind its role needs (rlhf.modeling.check_model_kind: causal_lm, reward; ""
    any), checked before Ray starts."""
    files: tuple[str, ...] = ("data.train", "data.eval")
    """Config keys naming data files the run reads (checked to exist; made absolute for sweep trials)."""

    @property
    def config(self) -> type:
        return CONFIGS[self.name]

    def run(self) -> Callable[..., dict]:
        module, name = self.runner.split(":")
        return getattr(importlib.import_module(module), name)

    def fill(self, cfg: Any, values: dict[str, str]) -> Any:
        """Set the config keys of the flags given in `values` (by `Flag.arg`); an empty optional flag leaves its key."""
        for flag in self.flags:
            value = values.get(flag.arg) or ""
            if value or flag.required:
                set_key(cfg, flag.key, value)
        return cfg

    def path_keys(self) -> list[str]:
        """Every config key of this command that names a local model, file or tokenizer."""
        return list(dict.fromkeys([f.key for f in self.flags] + list(self.models) + list(self.files)
                                  + ["model.tokenizer"]))

    def check_inputs(self, cfg: Any) -> None:
        """Before Ray starts: every model exists and is the kind its role needs, every data file exists; one line
        naming the flag (or key) otherwise."""
        by_key = {f.key: f.name for f in self.flags}
        for key, kind in self.models.items():
            check_model(get_key(cfg, key), by_key.get(key, key), kind)
        for key in self.files:
            path = get_key(cfg, key)
            if path and not storage.is_uri(path) and not os.path.exists(path):
                raise DataFileError([DataError(path, 0, "file", f"does not exist ({by_key.get(key, key)})")])


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("sft", "supervised fine-tuning on MOSS dialogues", "rlhf.drivers.sft:run_sft",
            (Flag("--model", "model.path", "the model to fine-tune: a directory (rlhf init-model, a run's final/) or "
                                           "a hub id"),
             Flag("--data", "data.train", "MOSS dialogues (JSONL, JSON, Parquet; see --data-format)")),
            models={"model.path": "causal_lm"}),
    Command("rm", "train a preference model from ranked responses", "rlhf.drivers.rm:run_rm",
            (Flag("--model", "model.path", "the model the preference model starts from (usually the SFT's final/); "
                                           "a scalar head is added"),
             Flag("--data", "data.train", "ranked preferences: a prompt and K responses, best first")),
            models={"model.path": ""}),
    Command("prm", "train a process reward model from solutions whose steps are labelled", "rlhf.drivers.prm:run_prm",
            (Flag("--model", "model.path", "the model the process reward model starts from (usually the SFT's "
                                           "final/); a scalar head is added, read at each step's last token"),
             Flag("--data", "data.train", "solutions in labelled steps (TRL's prompt/completions/labels, this "
                                          "project's steps/step_labels, Math-Shepherd's; see --data-format)")),
            models={"model.path": ""}),
    Command("dpo", "listwise DPO of the policy from ranked responses (reference scored once on Ray)",
            "rlhf.drivers.dpo:run_dpo",
            (Flag("--model", "model.path", "the policy to start from (also the reference)"),
             Flag("--data", "data.train", "ranked preferences, as `rlhf rm` reads them")),
            models={"model.path": "causal_lm"}),
    Command("ppo", "PPO on Ray with policy, reference, reward and critic role groups", "rlhf.drivers.ppo:run_ppo",
            (Flag("--policy", "model.path", "the policy to start from (usually the SFT's final/; also the reference)"),
             Flag("--reward", "roles.reward.model", "the preference model (rlhf rm's final/); not needed with "
                                                   "ppo.reward_model_weight=0", required=False),
             Flag("--prompts", "data.train", "MOSS prompts (dialogues ending in a human turn)"),
             Flag("--process-reward", "roles.prm.model", "a process reward model (rlhf prm's final/) that scores every "
                                                         "step of each reply (ppo.process_reward_*)", required=False)),
            # The critic starts as a scalar model: a preference model or a sequence classifier (empty: ppo.critic_init's).
            models={"model.path": "causal_lm", "roles.reward.model": "reward", "roles.reference.model": "causal_lm",
                    "roles.critic.model": "reward", "roles.prm.model": "prm"},
            files=("data.train", "data.eval", "data.ptx")),
)}
"""The training commands: `rlhf sft|rm|prm|dpo|ppo`, what `rlhf sweep` searches and `rlhf pipeline` chains."""


def check_model(path: str, label: str, kind: str = "") -> None:
    """A model path is checked before a command starts Ray, so a typo costs seconds, not a cluster start; and so is
    the kind of model its role needs (rlhf.modeling.check_model_kind; "" any). Nothing to check for an empty path."""
    from rlhf.modeling import check_model_dir, check_model_kind  # torch, transformers: not for `rlhf --help`
    if path:
        source = check_model_dir(path, label)
        if kind:
            check_model_kind(source, label, kind)


def command(name: str, where: str = "") -> Command:
    if name not in COMMANDS:
        raise ConfigError(f"{where}command: {name!r} is not one of {', '.join(COMMANDS)}")
    return COMMANDS[name]
