"""Does PPO with process rewards write more fully right held-out solutions than PPO rewarded on the answer alone
(issue 33)? Arms at the same budget and seeds, on the bundled step-by-step arithmetic, from one SFT policy.

Once, under --out (reused when there): `rlhf sample`, the sample's 800-token tokenizer, a random tiny Llama, its SFT
on steps_sft.jsonl (configs/tiny/sft.yaml, --sft-epochs), the process reward model on steps_train.jsonl
(configs/tiny/prm.yaml) and its `rlhf prm-eval` on steps_eval.jsonl. Then, per seed, `rlhf ppo` with
configs/tiny/ppo_steps.yaml for each arm:

- `outcome`: the `answer` rule alone (1 when the reply's last number is the prompt's answer);
- `process-AGG`, one per --aggregations: the same rule plus the PRM's step scores (`--process-reward PRM`,
  `ppo.process_reward_weight`, `ppo.process_reward_aggregation` AGG, `ppo.process_reward_threshold`).

Each run is the CLI, as a user types it, so its wall seconds are the command's. The table shows, per arm and seed, the
held-out accuracy before training (the SFT policy) and after, sampled as the run samples its rollouts: `answer`
(the `answer` rule) and `fully right` (every step and the answer exactly the worked solution: this module's
`fully_right`), the last ppo/kl_per_token, the mean ended fraction, and the seconds.

    python benchmarks/process_reward_ppo.py [--arms outcome,process] [--aggregations clip,min] [--seeds 0 1]
        [--out /tmp/prmexp] [--ray] [--set ppo.iterations=100]

Issue 33's targets: fully right held-out solutions +0.2 over the SFT policy and at least 0.75 after PPO.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, fmt, table, target, write_record  # noqa: E402

PPO_CONFIG = "configs/tiny/ppo_steps.yaml"
FULLY_RIGHT_RULE = "benchmarks.process_reward_ppo:fully_right"
"""The eval rule each run measures beside `answer`; the CLI runs with the repository root on PYTHONPATH."""
GAIN_TARGET, AFTER_TARGET = 0.2, 0.75
KL_WINDOW = 5
"""Iterations the ended fraction averages over (the KL is the last iteration's)."""


# --- the measure -------------------------------------------------------------------------------------------------


def worked_solution(expression: str) -> list[str]:
    """The steps `rlhf sample` writes for an expression with no slip: "3 + 3 - 4" -> ["3 + 3 = 6", "6 - 4 = 2",
    "The answer is 2."]."""
    tokens = expression.split()
    total, steps = int(tokens[0]), []
    for op, x in zip(tokens[1::2], tokens[2::2]):
        after = total + int(x) if op == "+" else total - int(x)
        steps.append(f"{total} {op} {x} = {after}")
        total = after
    return [*steps, f"The answer is {total}."]


def fully_right(rollout: Any) -> Optional[float]:
    """1.0 when the reply is the prompt's worked solution line for line (every step right, the answer right, nothing
    else), else 0.0; None for a prompt that is not the step task's. A PPO eval rule: `ppo.eval_rules`."""
    expression = rollout.prompt.metadata.get("expression")
    if rollout.prompt.metadata.get("task") != "steps" or not expression:
        return None
    lines = [line.strip() for line in rollout.reply.strip().splitlines() if line.strip()]
    return float(rollout.ended and lines == worked_solution(expression))


# --- the stages, each a CLI command --------------------------------------------------------------------------------


def say(msg: str) -> None:
    print(f"[process_reward_ppo] {msg}", flush=True)


def rlhf(args: list[str], log: str) -> float:
    """`python -m rlhf ARGS` from the repository root, its output in `log`; its wall seconds. A failure stops the
    benchmark, naming the log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    began = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run([sys.executable, "-m", "rlhf", *args], cwd=ROOT, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"rlhf {args[0]} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - began


def prepare(args: argparse.Namespace) -> tuple[dict, dict]:
    """Data, tokenizer, tiny Llama, SFT policy and PRM under args.out, each made once; (paths, PRM held-out metrics)."""
    out = args.out
    data, tok, base, sft, prm = (f"{out}/{d}" for d in ("data", "tok", "base", "sft", "prm"))
    paths = {"data": data, "sft": f"{sft}/final", "prm": f"{prm}/final"}
    one_rank = ["--set", "ray.in_process=true"]
    stages = [
        (f"{data}/steps_prompts_eval.jsonl", ["sample", "--out", data, "--seed", str(args.data_seed)]),
        (f"{tok}/tokenizer.json", ["tokenizer", "--data", f"{data}/sft_train.jsonl", f"{data}/prefs_train.jsonl",
                                   f"{data}/plugin_sft.jsonl", "--vocab-size", "800", "--out", tok]),
        (f"{base}/config.json", ["init-model", "--arch", "llama", "--preset", "tiny", "--tokenizer", tok,
                                 "--out", base]),
        (f"{sft}/final", ["sft", "--config", "configs/tiny/sft.yaml", "--model", base, "--data",
                          f"{data}/steps_sft.jsonl", "--output", sft, "--set", f"train.epochs={args.sft_epochs}",
                          *one_rank]),
        (f"{prm}/final", ["prm", "--config", "configs/tiny/prm.yaml", "--model", f"{sft}/final", "--data",
                          f"{data}/steps_train.jsonl", "--set", f"data.eval={data}/steps_eval.jsonl", "--output", prm,
                          *one_rank]),
    ]
    os.makedirs(out, exist_ok=True)
    for made, command in stages:
        if os.path.exists(made):
            say(f"{command[0]}: reused ({made})")
            continue
        seconds = rlhf(command, f"{out}/{command[0]}.log")
        say(f"{command[0]}: {seconds:.0f} s -> {made}")
    prm_eval = f"{out}/prm_eval.json"
    if not os.path.exists(prm_eval):
        rlhf(["prm-eval", "--model", f"{prm}/final", "--data", f"{data}/steps_eval.jsonl"], f"{out}/prm-eval.log")
        lines = Path(f"{out}/prm-eval.log").read_text(encoding="utf-8").splitlines()
        Path(prm_eval).write_text(next(line for line in reversed(lines) if line.startswith("{")) + "\n")
    return paths, json.loads(Path(prm_eval).read_text(encoding="utf-8"))


def arm_flags(arm: str, args: argparse.Namespace, paths: dict) -> list[str]:
    """What an arm adds to the shared PPO command."""
    if arm == "outcome":
        return []
    aggregation = arm.split("-", 1)[1]
    return ["--process-reward", paths["prm"], "--set", f"ppo.process_reward_weight={args.process_weight}",
            "--set", f"ppo.process_reward_aggregation={aggregation}",
            "--set", f"ppo.process_reward_threshold={args.process_threshold}"]


def run_arm(args: argparse.Namespace, paths: dict, arm: str, seed: int) -> dict:
    """One PPO run, reused when a finished one with the same command is there; what the table shows of it."""
    run, data = f"{args.out}/ppo/{arm}-seed{seed}", paths["data"]
    sets = [f"seed={seed}", f"data.eval={data}/steps_prompts_eval.jsonl",
            f"ppo.eval_rules.fully_right={FULLY_RIGHT_RULE}", "logging.tensorboard=false",
            f"ray.in_process={str(not args.ray).lower()}", *args.set]
    command = ["ppo", "--config", PPO_CONFIG, "--policy", paths["sft"], "--prompts", f"{data}/steps_prompts.jsonl",
               "--output", run, *[x for s in sets for x in ("--set", s)], *arm_flags(arm, args, paths)]
    done = Path(f"{run}/benchmark.json")  # written after the command finished: its command line and seconds
    if done.exists() and json.loads(done.read_text(encoding="utf-8"))["command"] == command:
        say(f"{arm} seed {seed}: reused ({run})")
        return summarise(run, json.loads(done.read_text(encoding="utf-8"))["seconds"])
    if os.path.exists(run):  # another command's run, or one cut short (the config saves no checkpoint): start over
        say(f"{arm} seed {seed}: {run} holds an unfinished run or other settings; removed")
        shutil.rmtree(run)
    os.makedirs(os.path.dirname(run), exist_ok=True)
    say(f"{arm} seed {seed}: rlhf {' '.join(command)}")
    seconds = rlhf(command, f"{run}.log")
    done.write_text(json.dumps({"command": command, "seconds": round(seconds, 1)}) + "\n", encoding="utf-8")
    return summarise(run, seconds)


def summarise(run: str, seconds: float) -> dict:
    """The held-out accuracies before (step 0: the SFT policy) and at the end, and the run's last KL."""
    rows = [json.loads(line) for line in Path(f"{run}/metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [r for r in rows if "eval/answer_accuracy" in r]
    iterations = [r for r in rows if "ppo/kl_per_token" in r]
    last = iterations[-KL_WINDOW:]
    return {"answer_sft": evals[0]["eval/answer_accuracy"], "answer_ppo": evals[-1]["eval/answer_accuracy"],
            "fully_right_sft": evals[0].get("eval/fully_right"), "fully_right_ppo": evals[-1].get("eval/fully_right"),
            "kl_per_token": iterations[-1]["ppo/kl_per_token"], "iterations": len(iterations),
            "ended_fraction": sum(r["ppo/ended_fraction"] for r in last) / len(last), "seconds": seconds,
            "run": run}


# --- the report ----------------------------------------------------------------------------------------------------


def report(args: argparse.Namespace, prm_metrics: dict, results: dict[str, dict[int, dict]]) -> None:
    header = ["arm", "seed", "SFT answer", "PPO answer", "SFT fully right", "PPO fully right", "gain fully right",
              "ppo/kl_per_token (last)", f"ended (last {KL_WINDOW})", "iterations", "seconds"]
    rows, targets = [], []
    for arm, by_seed in results.items():
        for seed, r in by_seed.items():
            gain = r["fully_right_ppo"] - r["fully_right_sft"]
            rows.append([arm, seed, r["answer_sft"], r["answer_ppo"], r["fully_right_sft"], r["fully_right_ppo"],
                         round(gain, 3), r["kl_per_token"], r["ended_fraction"], r["iterations"], r["seconds"]])
            targets += [target(f"{arm} seed {seed}: fully right gain over SFT", gain, f">= {GAIN_TARGET}",
                               gain >= GAIN_TARGET),
                        target(f"{arm} seed {seed}: fully right after PPO", r["fully_right_ppo"], f">= {AFTER_TARGET}",
                               r["fully_right_ppo"] >= AFTER_TARGET)]
    text = table(header, rows)
    text += (f"\n\nPPO: {PPO_CONFIG}, {'Ray' if args.ray else 'in process'}, --set {' '.join(args.set) or '(none)'}; "
             f"held-out accuracies sampled as the rollouts are, on steps_prompts_eval.jsonl")
    text += "\nPRM (prm-eval, steps_eval.jsonl): " + ", ".join(f"{k} {fmt(v)}" for k, v in prm_metrics.items())
    met = sum(t["met"] for t in targets)
    text += f"\nissue 33 targets met: {met} of {len(targets)} (fully right +{GAIN_TARGET} over SFT, >= {AFTER_TARGET})"
    write_record("process_reward_ppo", args, {"prm": prm_metrics, "results": results, "targets": targets}, text)


def arms_of(args: argparse.Namespace, p: argparse.ArgumentParser) -> list[str]:
    """--arms with `process` spelled out per aggregation: outcome, process-clip, process-min, ..."""
    arms = []
    for arm in (a.strip() for a in args.arms.split(",") if a.strip()):
        if arm == "outcome":
            arms.append(arm)
        elif arm == "process":
            arms += [f"process-{g.strip()}" for g in args.aggregations.split(",") if g.strip()]
        else:
            p.error(f"--arms: unknown arm {arm!r}; use outcome and/or process (with --aggregations)")
    from rlhf.ppo_math import PROCESS_AGGREGATIONS
    bad = [a for a in arms if a.startswith("process-") and a.split("-", 1)[1] not in PROCESS_AGGREGATIONS]
    if bad:
        p.error(f"--aggregations: {', '.join(a.split('-', 1)[1] for a in bad)}; use one of "
                f"{', '.join(PROCESS_AGGREGATIONS)}")
    return arms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="outcome,process", help="comma-separated: outcome, process")
    p.add_argument("--aggregations", default="clip,min",
                   help="ppo.process_reward_aggregation of each process arm, comma-separated: clip, step, min, last")
    p.add_argument("--process-weight", type=float, default=1.0, help="ppo.process_reward_weight of the process arms")
    p.add_argument("--process-threshold", type=float, default=0.5, help="ppo.process_reward_threshold")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="PPO seeds: every arm runs each")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a PPO config override for every arm (repeatable), e.g. ppo.iterations=100")
    p.add_argument("--ray", action="store_true", help="PPO on a local Ray (default: ray.in_process, one process)")
    p.add_argument("--sft-epochs", type=int, default=20, help="SFT epochs on steps_sft.jsonl")
    p.add_argument("--data-seed", type=int, default=0, help="seed of `rlhf sample`")
    p.add_argument("--out", default=str(ROOT / "runs" / "process_reward_ppo"),
                   help="work directory (data, models, runs; reused) and the record process_reward_ppo.json")
    args = p.parse_args(argv)
    arms = arms_of(args, p)
    args.out = os.path.abspath(args.out)
    began = time.perf_counter()
    paths, prm_metrics = prepare(args)
    say("PRM held out: " + ", ".join(f"{k} {fmt(v)}" for k, v in prm_metrics.items()))
    results: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for seed in args.seeds:
        for arm in arms:
            r = results[arm][seed] = run_arm(args, paths, arm, seed)
            say(f"{arm} seed {seed}: answer {fmt(r['answer_sft'])} -> {fmt(r['answer_ppo'])}, fully right "
                f"{fmt(r['fully_right_sft'])} -> {fmt(r['fully_right_ppo'])}, kl/token {fmt(r['kl_per_token'])}, "
                f"{r['seconds']:.0f} s")
    say(f"total {time.perf_counter() - began:.0f} s")
    report(args, prm_metrics, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
