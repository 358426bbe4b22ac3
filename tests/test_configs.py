"""Every config under configs/ loads, asks for the GPUs its comments promise, and colocates roles only where they
fit; every `rlhf` command in cluster/ names a real subcommand, real flags and a config that exists."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from actors.placement import PlacementError, plan_placement
from rlhf.cli import build_parser
from rlhf.config import ROLE_NAMES, load_config, ranks

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*") if p.suffix in (".yaml", ".yml"))
CLUSTER_FILES = sorted(p for p in (REPO / "cluster").rglob("*") if p.is_file())
STATED_GPUS = re.compile(r"^#\s*gpus:\s*(\d+)\s*$", re.MULTILINE)


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


def ppo_gpus(cfg) -> int:
    """GPUs a PPO layout asks for, as the placement planner lays out the groups `rlhf ppo` starts (it checks that
    every colocated role fits its host's GPUs)."""
    plan = plan_placement({r: getattr(cfg.roles, r).layout for r in cfg.derive().roles}, use_gpu=True)
    return sum(b["GPU"] for group in plan.bundles.values() for b in group)


def gpus(cfg, command: str) -> int:
    return ppo_gpus(cfg) if command == "ppo" else 0 if command == "generate" else ranks(cfg.layout)


def _command(path: Path) -> str:
    return next(c for c in ("ppo", "sft", "rm", "dpo", "generate")
                if path.stem.endswith(c) or path.stem.startswith(f"{c}_"))


def configs_in(path: Path) -> list:
    """(command, config) of every training config a YAML file under configs/ stands for: itself, the stage
    configs of a pipeline file, or the base config of a sweep with its overrides and every searched value."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if "command" in raw and "search" in raw:
        from rlhf.drivers.sweep import load_spec
        spec = load_spec(str(path), [])
        base = str(REPO / spec.base_config) if spec.base_config else None
        found = [(spec.command, load_config(spec.command, base, spec.overrides))]
        for key, param in spec.search.items():
            for value in (param.values if param.values is not None else [param.low, param.high]):
                found.append((spec.command, load_config(spec.command, base, spec.overrides + [f"{key}={value}"])))
        return found
    if "stages" in raw:
        from rlhf.drivers.pipeline import load_pipeline_config
        pipe = load_pipeline_config(str(path), [])
        return [(stage, load_config(stage, str(REPO / getattr(pipe.stages, stage)), getattr(pipe.overrides, stage)))
                for stage in ("sft", "rm", "ppo")]
    return [(_command(path), load_config(_command(path), str(path)))]


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_config_loads_and_its_gpus_add_up(path: Path):
    found = configs_in(path)
    totals = {gpus(cfg, command) for command, cfg in found}  # also checks every colocation
    stated = STATED_GPUS.findall(path.read_text(encoding="utf-8"))
    if path.parent.name in ("tiny", "sweeps") and not stated:
        return  # CPU configs promise no GPU count
    assert len(stated) == 1, f"{_id(path)}: a real config states its GPUs on one '# gpus: N' line"
    assert totals == {int(stated[0])}, f"{_id(path)}: comments say {stated[0]} GPUs, the layout asks for {totals}"
    for command, cfg in found:
        for layout in ([getattr(cfg.roles, r).layout for r in ROLE_NAMES] if command == "ppo" else
                       [] if command == "generate" else [cfg.layout]):
            assert layout.gpus_per_node <= 8, f"{_id(path)}: a layout wants more than the 8 GPUs of a node"


def test_real_configs_cover_both_models_and_every_stage():
    real = {_id(p) for p in CONFIGS if "tiny" not in p.parts}
    for model in ("moss-moon-003", "llama-7b"):
        for stage in ("sft", "rm", "ppo"):
            assert f"configs/{model}/{stage}.yaml" in real


def test_moss_runs_converted_checkpoints_in_bf16_and_llama_policy_uses_lora_base_as_reference():
    for stage in ("sft", "rm", "ppo"):
        moss = load_config(stage, str(REPO / f"configs/moss-moon-003/{stage}.yaml"))
        # `rlhf convert --from moss-checkpoint` makes native CodeGen: no checkpoint code runs.
        assert not moss.model.trust_remote_code and moss.model.dtype == "bfloat16"
    llama = load_config("ppo", str(REPO / "configs/llama-7b/ppo.yaml"))
    assert llama.roles.policy.lora.enabled and llama.ppo.reference_from_lora_base
    assert "reference" not in llama.derive().roles


def test_a_colocation_that_overfills_a_gpu_is_caught():
    cfg = load_config("ppo", str(REPO / "configs/llama-7b/ppo.yaml"), ["roles.critic.layout.gpu_fraction=0.5"])
    with pytest.raises(PlacementError, match="GPU 0 of policy"):
        ppo_gpus(cfg)


# --- cluster/: every `rlhf` command must be one the command line accepts ----------------------------------
INVOCATION = re.compile(r"(?:^|[\s'\"`(;&|])rlhf[ \t]+([A-Za-z][\w-]*)(.*)")
END_OF_COMMAND = {"&&", "||", ";", "|"}


def _texts(path: Path) -> list[str]:
    """The text to search: for YAML the parsed strings (folded scalars joined) and the comment lines."""
    text = path.read_text(encoding="utf-8")
    if path.suffix not in (".yaml", ".yml"):
        return [text]
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert docs, f"{_id(path)}: no YAML document"
    strings: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            strings.append(node)

    for doc in docs:
        walk(doc)
    comments = [line.strip().lstrip("#") for line in text.splitlines() if line.strip().startswith("#")]
    return strings + ["\n".join(comments)]


def invocations(path: Path) -> list[tuple[str, list[str]]]:
    """(subcommand, argument tokens) of every `rlhf SUB ...` in a file, shell line continuations joined."""
    found = []
    for text in _texts(path):
        # A continuation may sit in a comment ("#   --data ..."): drop the leading '#' of the joined line.
        text = re.sub(r"\\\n\s*#?", " ", text)
        for line in text.splitlines():
            for m in INVOCATION.finditer(line):
                tokens = []
                for token in m.group(2).split():
                    if token in END_OF_COMMAND:
                        break
                    tokens.append(token.strip("'\"`"))
                found.append((m.group(1), tokens))
    return found


def _subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(action.choices)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_id)
def test_cluster_files_call_real_commands_and_configs(path: Path):
    subparsers = _subparsers()
    calls = invocations(path)
    for sub, tokens in calls:
        assert sub in subparsers, f"{_id(path)}: `rlhf {sub}` is not a subcommand ({', '.join(subparsers)})"
        options = subparsers[sub]._option_string_actions
        for i, token in enumerate(tokens):
            if not token.startswith("--"):
                continue
            flag, _, inline = token.partition("=")
            assert flag in options, f"{_id(path)}: `rlhf {sub}` has no option {flag}"
            if flag == "--config":
                value = inline or (tokens[i + 1] if i + 1 < len(tokens) else "")
                assert "$" not in value, f"{_id(path)}: write the --config path out, not {value}"
                assert (REPO / value).is_file(), f"{_id(path)}: --config {value} does not exist"
        if "..." not in tokens:  # an abbreviated example may leave arguments out
            given = {t.partition("=")[0] for t in tokens}
            for action in subparsers[sub]._actions:
                if action.required and action.option_strings:
                    assert given & set(action.option_strings), \
                        f"{_id(path)}: `rlhf {sub}` lacks its required {action.option_strings[0]}"
    if path.suffix in (".sh", ".sbatch") or path.name == "rayjob.yaml":
        assert calls, f"{_id(path)}: runs no rlhf command"


def test_the_invocation_finder_sees_what_a_reader_sees(tmp_path: Path):
    script = tmp_path / "x.sh"
    script.write_text("# rlhf.sbatch and moss-rlhf-ray are names, not commands\n"
                      "ray job submit -- bash -c \"cd /r && rlhf ppo --config a.yaml \\\n"
                      "    --output '/o'\" || true\npython -m rlhf validate f --kind prompts\n")
    assert invocations(script) == [("ppo", ["--config", "a.yaml", "--output", "/o"]),
                                   ("validate", ["f", "--kind", "prompts"])]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=_id)
def test_a_shipped_sweep_reads_what_the_readmes_steps_write(path: Path, tmp_path: Path):
    from rlhf.drivers.sweep import load_spec
    from rlhf.sample import write_sample
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    sample_dir = re.search(r"rlhf sample --out (\S+)", readme).group(1)
    written = {f"{sample_dir}/{os.path.basename(p)}" for p in write_sample(str(tmp_path), seed=0).values()}
    written |= {f"{out}/final" for out in re.findall(r"--output (runs/\S+)", readme)}
    written |= set(re.findall(r"rlhf init-model .*--out (\S+)", readme))
    spec = load_spec(str(path), [])
    paths = list(spec.args.values()) + [o.split("=", 1)[1] for o in spec.overrides if o.startswith("data.")]
    assert paths and all(p in written for p in paths), f"{_id(path)} reads {paths}; the README writes {written}"
