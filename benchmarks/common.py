"""What every benchmark shares: a tiny workspace (the bundled sample, K = 4 ranked lists, an offline tokenizer,
random tiny models), repetitions run alternately with medians, the printed table and the JSON record.

Scripts run as `python benchmarks/NAME.py`; each puts the repository root on sys.path and imports this module.
Nothing here imports TRL: only the scripts that compare against it do.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
LOAD_AT_START = [round(x, 2) for x in os.getloadavg()]  # how busy the machine was before this script ran

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# --- the K = 4 ranked lists ---------------------------------------------------------------------------------

# The sample's rule gives 0.5 for naming the prompt's topic and 0.5 for thanking the user, so "on topic" and
# "polite" tie at 0.5; naming the topic breaks the tie. Every list then has four distinct ranks and 6 pairs.
QUALITIES = (("best", True, True), ("on_topic", False, True), ("polite", True, False), ("neither", False, False))
_THANKS = {"en": ["Thank you for asking! ", "Thanks for the question. "], "zh": ["谢谢你的问题！", "谢谢提问！"]}
_ABOUT = {"en": ["Here is a thought on {t}.", "People often talk about {t}.", "Let me tell you about {t}."],
          "zh": ["{t}很有意思。", "我来说说{t}。", "大家常常聊{t}。"]}
_VAGUE = {"en": ["I cannot say much here.", "Let us talk another time."], "zh": ["这个我说不好。", "下次再聊吧。"]}


def _reply(rng: random.Random, lang: str, topic: str, polite: bool, on_topic: bool) -> str:
    from rlhf.sample import EN_TOPICS, ZH_TOPICS
    opener = rng.choice(_THANKS[lang]) if polite else ""
    if on_topic:
        return opener + rng.choice(_ABOUT[lang]).format(t=topic)
    if rng.random() < 0.4:  # a reply about another topic: the model must compare it with the prompt
        other = rng.choice([t for t in (EN_TOPICS if lang == "en" else ZH_TOPICS) if t != topic])
        return opener + rng.choice(_ABOUT[lang]).format(t=other)
    return opener + rng.choice(_VAGUE[lang])


def ranked_list(prompt: Any, rng: random.Random) -> dict:
    """A preference record with one reply of each quality, best first, ranks 0..3 (checked against the rule)."""
    from rlhf.sample import rule_score
    lang, topic = prompt.metadata["lang"], prompt.metadata["topic"]
    replies = [_reply(rng, lang, topic, polite, on_topic) for _, polite, on_topic in QUALITIES]
    scores = [rule_score(prompt, r) for r in replies]
    if scores != [1.0, 0.5, 0.5, 0.0]:
        raise AssertionError(f"ranked list breaks the sample's rule: {list(zip(replies, scores))}")
    return {**prompt.to_json(), "responses": replies, "ranks": [0, 1, 2, 3]}


def write_ranked_lists(prompts_path: str, n: int, out: str, seed: int) -> str:
    """n K = 4 lists over the prompts of prompts_path (cycled), written as preference JSONL."""
    from rlhf.data import load_prompts, write_jsonl
    prompts = [p for p in load_prompts(prompts_path) if p.metadata.get("task") == "topic"]
    rng = random.Random(seed)
    write_jsonl(out, [ranked_list(prompts[i % len(prompts)], rng) for i in range(n)])
    return out


# --- the workspace ------------------------------------------------------------------------------------------


@dataclass
class Workspace:
    """Files of one benchmark run: sample data, ranked lists, tokenizer and one random tiny model per arch."""
    root: str
    tokenizer: str
    data: dict[str, str]
    models: dict[str, str] = field(default_factory=dict)


def make_workspace(root: str, archs: Sequence[str], n_prompts: int = 200, n_lists: tuple[int, int] = (256, 64),
                   seed: int = 0, preset: str = "tiny") -> Workspace:
    """The tests' recipe (tests/conftest.py): sample, tokenizer of 800, `init_model(arch, preset)`, plus K = 4 lists."""
    from rlhf.modeling import init_model
    from rlhf.sample import write_sample
    from rlhf.tokenizer import texts_from_files, train_tokenizer
    data = write_sample(f"{root}/data", seed=seed, n_prompts=n_prompts)
    data["ranked4_train"] = write_ranked_lists(data["prompts_train"], n_lists[0], f"{root}/data/ranked4_train.jsonl",
                                               seed)
    data["ranked4_eval"] = write_ranked_lists(data["prompts_eval"], n_lists[1], f"{root}/data/ranked4_eval.jsonl",
                                              seed + 1)
    texts = texts_from_files([data["sft_train"], data["prefs_train"], data["plugin_sft"], data["ranked4_train"]])
    train_tokenizer(texts, 800, f"{root}/tok")
    ws = Workspace(root, f"{root}/tok", data)
    for arch in archs:
        ws.models[arch] = init_model(arch, preset, ws.tokenizer, f"{root}/{arch}", seed=seed)
    return ws


def quiet() -> None:
    """No progress bars or deprecation chatter between the table rows (errors still show)."""
    import importlib.util
    import warnings
    from transformers.utils import logging as hf_logging
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if importlib.util.find_spec("datasets") is not None:
        import datasets
        datasets.disable_progress_bars()


@contextlib.contextmanager
def workspace(args: argparse.Namespace, archs: Sequence[str], **sizes: Any) -> Iterator[Workspace]:
    """A workspace in --workdir, or in a temp dir removed afterwards (kept with --keep)."""
    quiet()
    root = args.workdir or tempfile.mkdtemp(prefix="rlhf-bench-")
    began = time.perf_counter()
    ws = make_workspace(root, archs, **sizes)
    print(f"workspace: {root} ({time.perf_counter() - began:.0f} s)", flush=True)
    try:
        yield ws
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A local Ray for this script alone, shut down at the end (other drivers' clusters are left alone)."""
    import ray
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace="benchmarks", log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}})
    try:
        yield
    finally:
        ray.shutdown()


def set_threads(n: int) -> None:
    """Torch threads of this process (the in-process side of a comparison)."""
    import torch
    torch.set_num_threads(n)


# --- PPO on Ray, as `rlhf ppo` runs it ------------------------------------------------------------------------

PHASES = ("time/generate", "time/score", "time/train")


def ppo_config(overrides: Sequence[str]):
    """configs/tiny/ppo.yaml for timing. The policy and critic step from the first iteration but with learning
    rate 0: the optimizer does all its work, the weights stay at their random start, so every iteration (and every
    side of a comparison) samples replies of the same length instead of drifting as a policy learns to stop early."""
    from rlhf.config import load_config
    return load_config("ppo", str(ROOT / "configs/tiny/ppo.yaml"), [
        "ppo.critic_warmup_iterations=0", "ppo.iterations=100000", "roles.policy.optim.lr=0",
        "roles.critic.optim.lr=0", "logging.progress=false", "logging.tensorboard=false", *overrides])


def cpus_needed(cfg: Any) -> int:
    """Logical CPUs for the run's roles, as `rlhf ppo` sizes its local Ray (at least the machine's cores)."""
    from rlhf.config import ranks
    total = sum(getattr(cfg.roles, r).layout.cpus_per_rank * ranks(getattr(cfg.roles, r).layout)
                for r in cfg.derive().roles)
    return max(os.cpu_count() or 1, math.ceil(total))


def load_prompt_ids(cfg: Any, tokenizer: Any, prompts_path: str) -> tuple[list, list[list[int]]]:
    """The prompts and their token ids, as `run_ppo` makes them."""
    from rlhf.data import load_prompts
    from rlhf.moss import tokenize_prompt
    prompts = load_prompts(prompts_path)
    return prompts, [tokenize_prompt(d, tokenizer, cfg.data.max_prompt_length, cfg.data.plugin) for d in prompts]


class PPOSide:
    """`rlhf ppo`'s role groups set up once on a backend (Ray role groups, or `actors.local.LocalBackend`: every
    role in this process, the no-Ray baseline), then `PPOTrainer.iteration` timed from the controller."""

    def __init__(self, cfg: Any, policy: str, reward: str, prompts_path: str, backend: Any = None):
        from rlhf.drivers.ppo import start_roles
        from rlhf.drivers.runs import backend_for
        self.policy, self.reward, self.prompts_path = policy, reward, prompts_path
        cfg.model.path, cfg.roles.reward.model = policy, reward
        self.roles, self.groups = start_roles(cfg, backend_for(cfg, backend))
        self.use(cfg)

    def use(self, cfg: Any) -> None:
        """A new controller over the same role groups: batch sizes and generation length are the controller's
        (the ranks take them with each call), so a sweep need not restart the groups."""
        from reward.model import load_reward_stats
        from rlhf.drivers.ppo import PPOTrainer
        from rlhf.modeling import load_tokenizer
        cfg.model.path, cfg.roles.reward.model = self.policy, self.reward
        tokenizer = load_tokenizer(self.policy)
        prompts, ids = load_prompt_ids(cfg, tokenizer, self.prompts_path)
        self.trainer = PPOTrainer(cfg, self.roles, tokenizer, prompts, ids, None, load_reward_stats(self.reward))
        self.it = 0

    def iteration(self) -> dict:
        """One iteration: its wall seconds (`iteration_s`), PPO's phase timings and reply length."""
        with Stopwatch() as sw:
            metrics = self.trainer.iteration(self.it)
        self.it += 1
        return {"iteration_s": sw.seconds, "response_length": metrics["ppo/response_length"],
                **{k: metrics[k] for k in PHASES}}

    def close(self) -> None:
        self.groups.stop()


def timed_block(step: Callable[[], dict], iterations: int) -> dict:
    """`iterations` + 1 calls of `step`; the first warms up and is dropped; the medians of the rest."""
    step()
    runs = [step() for _ in range(iterations)]
    return medians(runs, list(runs[0]))


# --- timing -------------------------------------------------------------------------------------------------


def alternate(sides: dict[str, Callable[[int], dict]], reps: int) -> dict[str, list[dict]]:
    """Run every side once per repetition, the order reversed every other repetition so drift and other jobs on
    the machine hit all sides alike. Each side returns a dict of figures; returns them per side, in run order."""
    names = list(sides)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            figures = sides[name](rep)
            runs[name].append(figures)
            shown = ", ".join(f"{k}={fmt(v)}" for k, v in figures.items() if isinstance(v, (int, float)))
            print(f"  rep {rep + 1}/{reps} {name}: {shown}", flush=True)
    return runs


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def medians(runs: Sequence[dict], keys: Sequence[str]) -> dict[str, float]:
    """The median of each key over the runs that have it."""
    return {k: median([r[k] for r in runs if k in r]) for k in keys if any(k in r for r in runs)}


class Stopwatch:
    """`with Stopwatch() as sw:` ... `sw.seconds`."""

    def __enter__(self) -> "Stopwatch":
        self.began = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.began


# --- output -------------------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pasteable into RESULTS.md), columns padded for the terminal."""
    cells = [list(header)] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def machine() -> dict:
    """Where the figures come from; the load average says how busy the machine was with other jobs."""
    import torch
    return {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "platform": platform.platform(),
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "versions": {p: _version(p) for p in ("torch", "transformers", "deepspeed", "ray", "trl", "accelerate")},
            "load_average_at_start": LOAD_AT_START, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}


def write_record(name: str, args: argparse.Namespace, record: dict, text: str) -> Path:
    """benchmarks/results/<name>.json (or --out): the command, the machine, the settings, both sides' figures."""
    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    payload = {"benchmark": name, "command": f"python {command}", "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
               "machine": machine(), "settings": dict(vars(args)), **record, "table": text}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\n{text}\n\n-> {path}", flush=True)
    return path


def parser(description: str, reps: int) -> argparse.ArgumentParser:
    """The flags every benchmark takes; scripts add their size flags."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--reps", type=int, default=reps, help="repetitions per side (medians are reported)")
    p.add_argument("--quick", action="store_true", help="smallest sizes and 1 repetition: a smoke run")
    p.add_argument("--out", default="", help=f"directory for the JSON record (default {RESULTS_DIR})")
    p.add_argument("--workdir", default="", help="build the workspace here and keep it (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp workspace")
    p.add_argument("--seed", type=int, default=0)
    return p


def target(name: str, value: float, goal: str, met: bool) -> dict:
    return {"name": name, "value": value, "goal": goal, "met": bool(met)}
