"""Does PPO's held-out score hold on a task nobody tuned configs/tiny/ppo.yaml for? Long PPO runs on the bundled
sample and on a second task (`second_task.py`: animal sounds, right and brief), several seeds each.

For each task: its data, a tokenizer and a random tiny CodeGen model, SFT and the preference model once
(configs/tiny/sft.yaml, rm.yaml, as `rlhf pipeline` runs them), then PPO with configs/tiny/ppo.yaml for each seed,
all from that SFT policy and preference model. The held-out rule score (`eval/rule_score`) is measured every
`--eval-every` iterations, at 0 and at the end; the table shows it with the KL (per reply and per token, the mean
of the last 5 iterations), the KL coefficient at the end, and whether the score held from the first evaluation
after 0 to the last (|difference| <= 0.15). `--set` overrides go to PPO alone, so KL-control settings compare:

    python benchmarks/kl_hold.py [--iterations 60] [--seeds 0 1 2] [--tasks sample second] [--out DIR]
        [--set ppo.kl_controller=fixed --name fixed] [--dpo]
    # the rollout group's engines compared (vLLM's CPU build wants heads of 32: the tiny32 preset):
    python benchmarks/kl_hold.py --tasks sample --seeds 0 1 --iterations 20 --preset tiny32 \
        --ppo-config configs/tiny/ppo_overlap.yaml --out runs/engines --name hf
    python benchmarks/kl_hold.py ... --out runs/engines --name vllm --set roles.rollout.engine=vllm

With --dpo, DPO (configs/tiny/dpo.yaml) trains from the same SFT policy on the same ranked lists, and the SFT, DPO
and every PPO policy answer the held-out prompts with `rlhf generate`'s chat sampling: one rule score each, the
comparison of the two methods on the same data.

Finished stages are reused when the script runs again with the same --out (SFT, the preference model, and a PPO
run whose settings are the same); an interrupted one resumes from its last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # `second_task:rule`, as ppo.eval_rules imports it
# Ray workers inherit the environment of a local Ray: they import the rule too, should a rule ever reach them.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)

from benchmarks.common import ROOT, fmt, quiet, table, write_record  # noqa: E402

HOLD = 0.15
"""The held-out score holds when the last evaluation is within this of the first one after iteration 0."""
KL_WINDOW = 5
"""Iterations the final KL figures average over."""


@dataclass(frozen=True)
class Task:
    write: Callable[[str, int], dict]
    """Writes the task's six files (sft/prefs/prompts, train and eval) into a directory, for a seed."""
    eval_rules: dict[str, str]
    """ppo.eval_rules for it: `rule_score` and, where the task has them as rules, its parts."""
    score_of: Callable[[list, list], float | None]
    """The task's rule over reply texts to held-out prompts (the --dpo comparison)."""


def _write_sample(out: str, seed: int) -> dict:
    from rlhf.sample import write_sample
    return write_sample(out, seed=seed)


def _write_second(out: str, seed: int) -> dict:
    from second_task import write_task
    return write_task(out, seed=seed)


def _sample_score(prompts: list, replies: list) -> float | None:
    from rlhf.sample import score_of
    return score_of(prompts, replies)


def _second_score(prompts: list, replies: list) -> float | None:
    from second_task import score_of
    return score_of(prompts, replies)


TASKS = {"sample": Task(_write_sample, {"rule_score": "sample"}, _sample_score),
         "second": Task(_write_second, {"rule_score": "second_task:rule", "fact": "second_task:fact_rule",
                                        "brief": "second_task:brief_rule"}, _second_score)}
FILES = ("sft_train", "sft_eval", "prefs_train", "prefs_eval", "prompts_train", "prompts_eval")


def say(msg: str) -> None:
    print(f"[kl_hold] {msg}", flush=True)


def _interrupted(out: str) -> bool:
    """A stage that wrote checkpoints but no final/: resume it (as `rlhf pipeline` does)."""
    return os.path.isdir(os.path.join(out, "checkpoints")) and not os.path.isdir(os.path.join(out, "final"))


def prepare(name: str, root: str, data_seed: int, preset: str = "tiny") -> tuple[dict, str, str]:
    """The task's data, tokenizer, random model, SFT policy and preference model under root (reused when there);
    returns (files, SFT policy, preference model)."""
    from rlhf.config import load_config
    from rlhf.drivers.rm import run_rm
    from rlhf.drivers.sft import run_sft
    from rlhf.modeling import init_model
    from rlhf.tokenizer import texts_from_files, train_tokenizer
    data = os.path.join(root, "data")
    files = {k: os.path.join(data, f"{k}.jsonl") for k in FILES}
    if not all(os.path.exists(p) for p in files.values()):
        TASKS[name].write(data, data_seed)
        say(f"{name}: data (seed {data_seed}) -> {data}")
    sft_cfg = load_config("sft", str(ROOT / "configs/tiny/sft.yaml"), ["logging.progress=false"])
    rm_cfg = load_config("rm", str(ROOT / "configs/tiny/rm.yaml"), ["logging.progress=false"])
    base, tok = os.path.join(root, "base"), os.path.join(root, "tokenizer")
    if not os.path.exists(os.path.join(base, "config.json")):
        train_tokenizer(texts_from_files([files["sft_train"], files["prefs_train"]]), 800, tok)
        init_model("codegen", preset, tok, base, seed=sft_cfg.seed)
        say(f"{name}: tokenizer and random codegen/{preset} model -> {base}")
    sft, rm = os.path.join(root, "sft"), os.path.join(root, "rm")
    stages = ((sft_cfg, base, "sft", sft, run_sft), (rm_cfg, f"{sft}/final", "prefs", rm, run_rm))
    for cfg, start, kind, out, run in stages:
        if os.path.isdir(os.path.join(out, "final")):
            say(f"{name}: {os.path.basename(out)} reused ({out}/final)")
            continue
        cfg.model.path, cfg.data.train, cfg.data.eval = start, files[f"{kind}_train"], files[f"{kind}_eval"]
        began = time.perf_counter()
        run(cfg, out, resume=_interrupted(out))
        say(f"{name}: {os.path.basename(out)} done in {time.perf_counter() - began:.0f} s -> {out}/final")
    return files, f"{sft}/final", f"{rm}/final"


def run_dpo(name: str, root: str, files: dict, policy: str) -> str:
    """DPO (configs/tiny/dpo.yaml) from the task's SFT policy on its ranked lists, once; its final/."""
    from rlhf.config import load_config
    from rlhf.drivers.dpo import run_dpo as dpo
    out = os.path.join(root, "dpo")
    if not os.path.isdir(os.path.join(out, "final")):
        cfg = load_config("dpo", str(ROOT / "configs/tiny/dpo.yaml"), ["logging.progress=false"])
        cfg.model.path, cfg.data.train, cfg.data.eval = policy, files["prefs_train"], files["prefs_eval"]
        began = time.perf_counter()
        dpo(cfg, out, resume=_interrupted(out))
        say(f"{name}: dpo done in {time.perf_counter() - began:.0f} s -> {out}/final")
    return f"{out}/final"


def chat_scores(task: str, files: dict, policies: dict[str, str]) -> dict[str, float | None]:
    """Each policy's held-out rule score with `rlhf generate`'s chat sampling (the report's), same prompts and seed:
    the comparison of PPO with DPO that does not depend on how either run measured itself."""
    from rlhf.config import load_config
    from rlhf.data import load_prompts
    from rlhf.drivers.generate import generate_texts
    prompts = load_prompts(files["prompts_eval"])
    sampling = load_config("generate", None, [f"generation.lengths_from={files['sft_train']}"])
    sampling.generation.max_new_tokens = "auto"
    return {label: TASKS[task].score_of(prompts, generate_texts(model, prompts, sampling))
            for label, model in policies.items()}


def ppo_overrides(args: argparse.Namespace, task: str, seed: int) -> list[str]:
    """The task's eval rules first, so a user's --set can replace them."""
    rules = [f"ppo.eval_rules.{metric}={rule}" for metric, rule in TASKS[task].eval_rules.items()]
    return [f"seed={seed}", f"ppo.iterations={args.iterations}", f"ppo.eval_every={args.eval_every}",
            "logging.progress=false", *rules, *args.set]


def run_seed(args: argparse.Namespace, task: str, seed: int, files: dict, policy: str,
             reward: str) -> tuple[str, int, int]:
    """One PPO run from the task's SFT policy and preference model; its output directory, iterations and eval_every
    (a --set may have changed them)."""
    from rlhf.config import load_config, to_yaml
    from rlhf.drivers.ppo import run_ppo
    from rlhf.generation import fit_generation_cap
    from rlhf.modeling import load_tokenizer
    cfg = load_config("ppo", str(ROOT / args.ppo_config), ppo_overrides(args, task, seed))
    cfg.model.path, cfg.roles.reward.model = policy, reward
    cfg.data.train, cfg.data.eval = files["prompts_train"], files["prompts_eval"]
    # The cap as run_ppo resolves it (`auto` from the policy's final/), so a finished run's config.yaml compares.
    cfg.generation = fit_generation_cap(cfg.generation, load_tokenizer(policy), cfg.generation.lengths_from, "ppo",
                                        models=(policy, reward), fallback=files["sft_train"])
    out = os.path.join(args.out, task, f"{args.name}-seed{seed}")
    saved = os.path.join(out, "config.yaml")
    if os.path.exists(saved) and Path(saved).read_text(encoding="utf-8") != to_yaml(cfg):
        raise SystemExit(f"{out}: holds a PPO run with other settings (its config.yaml); pass another --name or --out")
    if os.path.isdir(os.path.join(out, "final")):
        say(f"{task} seed {seed}: PPO reused ({out})")
        return out, cfg.ppo.iterations, cfg.ppo.eval_every
    began = time.perf_counter()
    say(f"{task} seed {seed}: PPO, {cfg.ppo.iterations} iterations ...")
    run_ppo(cfg, out, resume=_interrupted(out))
    say(f"{task} seed {seed}: PPO done in {time.perf_counter() - began:.0f} s -> {out}")
    return out, cfg.ppo.iterations, cfg.ppo.eval_every


def read_metrics(run: str) -> tuple[dict[int, dict], list[dict]]:
    """A PPO run's held-out evaluations by step (`eval/...` without the prefix) and its iteration rows."""
    evals: dict[int, dict] = {}
    iterations = []
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            scores = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("eval/")}
            if scores:
                evals.setdefault(row["step"], {}).update(scores)
            if "ppo/kl" in row:
                iterations.append(row)
    return evals, iterations


def summarise(run: str, eval_every: int, iterations: int) -> dict:
    """What the table shows of one run."""
    evals, rows = read_metrics(run)
    score = {step: e["rule_score"] for step, e in sorted(evals.items()) if "rule_score" in e}
    last = rows[-KL_WINDOW:]
    first_after = eval_every if 0 < eval_every < iterations else None
    held = None
    if first_after in score and iterations in score:
        held = abs(score[iterations] - score[first_after]) <= HOLD
    parts = {step: {k: v for k, v in e.items() if k != "rule_score"} for step, e in evals.items()}
    return {"score": score, "parts": {s: p for s, p in parts.items() if p}, "iterations": iterations,
            "kl": sum(r["ppo/kl"] for r in last) / len(last) if last else None,
            "kl_per_token": sum(r["ppo/kl_per_token"] for r in last) / len(last) if last else None,
            "kl_coef": rows[-1]["ppo/kl_coef"] if rows else None, "held": held, "iterations_logged": len(rows)}


def show_parts(parts: dict) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in sorted(parts.items())) if parts else "-"


def rm_accuracy(root: str) -> float | None:
    """The preference model's last held-out pairwise accuracy (its metrics.jsonl), or None."""
    accuracy = None
    with open(os.path.join(root, "rm", "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            accuracy = json.loads(line).get("eval/pairwise_accuracy", accuracy)
    return accuracy


def report(args: argparse.Namespace, results: dict[str, dict[int, dict]], compared: dict, seconds: dict) -> None:
    steps = sorted({s for by_seed in results.values() for r in by_seed.values() for s in r["score"]})
    header = ["task", "seed", *[f"score@{s}" for s in steps], f"ppo/kl (last {KL_WINDOW})",
              f"ppo/kl_per_token (last {KL_WINDOW})", "ppo/kl_coef (end)",
              f"held: score@end within {HOLD} of score@{args.eval_every}", "parts@0", "parts@end"]
    rows = []
    for task, by_seed in results.items():
        for seed, r in by_seed.items():
            held = "n/a" if r["held"] is None else ("yes" if r["held"] else "NO")
            rows.append([task, seed, *[r["score"].get(s, "-") for s in steps], r["kl"], r["kl_per_token"],
                         r["kl_coef"], held, show_parts(r["parts"].get(0, {})),
                         show_parts(r["parts"].get(r["iterations"], {}))])
    text = table(header, rows)
    text += (f"\n\nPPO: configs/tiny/ppo.yaml, {args.iterations} iterations, eval every {args.eval_every}, "
             f"--set {' '.join(args.set) or '(none)'}")
    accuracy = {task: rm_accuracy(os.path.join(args.out, task)) for task in results}
    text += "\npreference model, held-out pairwise accuracy: " + ", ".join(f"{t} {fmt(a)}" for t, a in accuracy.items())
    for task, scores in compared.items():
        sft = scores["SFT"]
        text += (f"\n{task}: held-out rule score with rlhf generate's chat sampling (gain over SFT): " +
                 ", ".join(f"{label} {fmt(v)}" + ("" if label == "SFT" or v is None or sft is None else
                                                   f" ({v - sft:+.2f})") for label, v in scores.items()))
    text += "\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
    write_record("kl_hold", args, {"results": results, "dpo_comparison": compared, "rm_accuracy": accuracy,
                                   "seconds": seconds}, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=60, help="PPO iterations of each run")
    p.add_argument("--eval-every", type=int, default=20, help="ppo.eval_every: held-out evaluation every N iterations")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="PPO seeds, each a run of its own")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a PPO config override (repeatable), e.g. ppo.kl_target_unit=token")
    p.add_argument("--name", default="ppo", help="PPO runs go to OUT/TASK/NAME-seedS: one name per set of --set")
    p.add_argument("--data-seed", type=int, default=0, help="seed of each task's data")
    p.add_argument("--preset", default="tiny", help="init-model preset of the CodeGen model (tiny32 for vLLM on CPU)")
    p.add_argument("--ppo-config", default="configs/tiny/ppo.yaml", help="the PPO config of every run")
    p.add_argument("--dpo", action="store_true", help="also train DPO (configs/tiny/dpo.yaml) from each task's SFT "
                   "policy and compare the held-out rule scores of SFT, DPO and every PPO run, sampled alike")
    p.add_argument("--out", default=str(ROOT / "runs" / "kl_hold"),
                   help="work directory: data, models, runs, and the record kl_hold.json")
    args = p.parse_args(argv)
    if args.eval_every < 1 or args.iterations < 1:
        p.error("--iterations and --eval-every must be at least 1")
    quiet()
    import ray

    from actors.runtime import ensure_ray
    from rlhf.config import load_config
    started = ensure_ray(load_config("ppo", str(ROOT / "configs/tiny/ppo.yaml")).ray, 4)
    results: dict[str, dict[int, dict]] = {}
    compared: dict[str, dict[str, float | None]] = {}
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    try:
        for task in args.tasks:
            t0 = time.perf_counter()
            files, policy, reward = prepare(task, os.path.join(args.out, task), args.data_seed, args.preset)
            seconds[f"{task} data+sft+rm"] = time.perf_counter() - t0
            results[task] = {}
            for seed in args.seeds:
                t0 = time.perf_counter()
                run, iterations, eval_every = run_seed(args, task, seed, files, policy, reward)
                seconds[f"{task} ppo seed {seed}"] = time.perf_counter() - t0
                r = results[task][seed] = summarise(run, eval_every, iterations)
                say(f"{task} seed {seed}: eval/rule_score " +
                    " -> ".join(f"{s}: {fmt(v)}" for s, v in r["score"].items()) +
                    f"; ppo/kl {fmt(r['kl'])}, per token {fmt(r['kl_per_token'])}, kl_coef {fmt(r['kl_coef'])}")
                r["final"] = os.path.join(run, "final")
            if args.dpo:
                policies = {"SFT": policy, "DPO": run_dpo(task, os.path.join(args.out, task), files, policy),
                            **{f"PPO seed {s}": r["final"] for s, r in results[task].items()}}
                compared[task] = chat_scores(task, files, policies)
                say(f"{task}: held-out rule score, chat sampling: " +
                    ", ".join(f"{k} {fmt(v)}" for k, v in compared[task].items()))
    finally:
        if started:
            ray.shutdown()
    seconds["total"] = time.perf_counter() - began
    report(args, results, compared, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
