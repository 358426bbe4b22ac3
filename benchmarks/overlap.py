"""Generation overlapped with training: PPO (and GRPO) iterations with `ppo.off_policy_steps` 0 and 1 side by side.

Sequential is today's default: the policy's training ranks generate, then every role scores, then the policy and the
critic train. Overlapped is configs/tiny/ppo_overlap.yaml's layout: a rollout group of its own generates iteration
k+1's replies (weights synced after each update) while the policy and the critic train on iteration k's, and the
reference and the reward model score them as they arrive. Both sides: the same tiny model, prompts, reply length,
batch sizes and PPO epochs (learning rate 0, see `common.ppo_config`, so both sample replies of the same length);
blocks of iterations alternate between the sides, the first iteration of each block dropped, and an overlapped
block's generation ahead is waited for before the other side starts. With `--grpo`, the same for GRPO, and TRL's
GRPOTrainer as a third side. The phase timeline of one overlapped iteration (which role is busy when) is printed from
the run's own records.

    python benchmarks/overlap.py [--reps 3] [--iterations 3] [--prompts 32] [--max-new-tokens 48] [--ppo-epochs 2]
    python benchmarks/overlap.py --grpo [--prompts 8] [--samples 4] [--max-new-tokens 24]
    python benchmarks/overlap.py --grpo --engine vllm --preset tiny32 [--trl-vllm]  # vLLM (for TRL too)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (PHASES, PPOSide, alternate, cpus_needed, local_ray, medians, parser,  # noqa: E402
                               ppo_config, set_threads, table, target, workspace, write_record)

GOAL = {"ppo": 0.75, "grpo": 0.7}  # overlapped seconds per iteration over sequential's (GRPO: over TRL's)


class Side(PPOSide):
    """A PPO side whose blocks leave nothing running behind them (an overlapped block's generation ahead)."""

    def block(self, iterations: int) -> dict:
        self.iteration()  # warm-up (and, overlapped, the first generation ahead)
        runs = [self.iteration() for _ in range(iterations)]
        for job in list(getattr(self.trainer.source, "pending", {}).values()):
            job.result()
        self.phases = list(self.trainer.phases)
        self.trainer.phases.clear()
        return medians(runs, list(runs[0]))


def timeline(phases: list[dict], it: int) -> list[str]:
    """Rows `role phase batch  start-end  bar` of everything that ran between the start of iteration `it` (its weight
    sync, or its scoring) and the end of its training (the next batch's generation included), in seconds from then."""
    t0 = min(p["start"] for p in phases if p["batch"] == it and p["phase"] in ("score", "sync"))
    end = max(p["end"] for p in phases if p["batch"] == it and p["phase"] == "train")
    shown = sorted((p for p in phases if p["end"] > t0 and p["start"] < end), key=lambda p: p["start"])
    t1 = max(p["end"] for p in shown)
    scale = 60 / max(1e-9, t1 - t0)
    rows = []
    for p in shown:
        a, b = max(0, int((p["start"] - t0) * scale)), min(60, int((p["end"] - t0) * scale))
        bar = " " * a + "#" * max(1, b - a) + " " * (60 - max(a + 1, b))
        rows.append(f"{p['role']:<15} {p['phase']:<9} batch {p['batch']:<3} "
                    f"{p['start'] - t0:6.2f}-{p['end'] - t0:5.2f} s |{bar}|")
    return rows


def report(args: argparse.Namespace, runs: dict[str, list[dict]], kind: str, phases: list[dict]) -> None:
    figures = ("iteration_s", *PHASES)
    seq, ovl = medians(runs["sequential"], figures), medians(runs["overlapped"], figures)
    ratio = ovl["iteration_s"] / seq["iteration_s"]
    rows = [[f"seconds per iteration (median of {args.reps} x {args.iterations})", seq["iteration_s"],
             ovl["iteration_s"], ratio]]
    rows += [[f"  {k}" + (" (overlapped: the wait)" if k == "time/generate" else ""), seq[k], ovl[k], ""]
             for k in PHASES]
    header = [f"{kind.upper()}, {args.prompts} prompts x {args.samples if kind == 'grpo' else 1}, "
              f"{args.max_new_tokens} new tokens" + ("" if kind == "grpo" else f", {args.ppo_epochs} epochs"),
              "off_policy_steps 0 (policy generates)",
              f"off_policy_steps 1 (rollout group, {args.engine})", "ratio (1/0)"]
    record = {"runs": runs, "medians": {"sequential": seq, "overlapped": ovl}, "ratio": ratio}
    value, name = ratio, "seconds per iteration, overlapped/sequential"
    if "trl" in runs:
        trl = medians(runs["trl"], ("iteration_s",))
        header.append("TRL GRPOTrainer" + (" (vLLM colocate)" if args.trl_vllm else ""))
        rows = [rows[0] + [trl["iteration_s"]]] + [row + [""] for row in rows[1:]]
        value, name = ovl["iteration_s"] / trl["iteration_s"], "seconds per iteration, overlapped/TRL"
        record |= {"trl": trl, "ratio_trl": value, "ratio_trl_sequential": seq["iteration_s"] / trl["iteration_s"]}
    met = value <= GOAL[kind]
    text = table(header, rows)
    text += f"\n\ntarget: {name} <= {GOAL[kind]}: {'met' if met else 'NOT met'} ({value:.2f}x)"
    if "trl" in runs:
        text += f" (sequential/TRL {record['ratio_trl_sequential']:.2f}x)"
    lines = timeline(phases, max(p["batch"] for p in phases if p["phase"] == "train") - 1)
    text += "\n\none overlapped iteration (from its weight sync):\n" + "\n".join(lines)
    record["timeline"] = lines
    suffix = ("" if args.engine == "hf" else f"_{args.engine}") + ("_trl_vllm" if args.trl_vllm else "")
    write_record(f"overlap_{kind}{suffix}", args,
                 record | {"target": target(name, value, f"<= {GOAL[kind]}", met)}, text)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], reps=3)
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per block")
    p.add_argument("--prompts", type=int, default=0, help="prompts per iteration (PPO 32, GRPO 8)")
    p.add_argument("--samples", type=int, default=4, help="GRPO: samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=0, help="reply length (PPO 48, GRPO 24)")
    p.add_argument("--ppo-epochs", type=int, default=2, help="PPO: passes over each iteration's rollouts")
    p.add_argument("--grpo", action="store_true", help="GRPO (against TRL's GRPOTrainer too) instead of PPO")
    p.add_argument("--kl-coef", type=float, default=0.02, help="GRPO: KL coefficient (TRL's beta)")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="the rollout group's inference engine")
    p.add_argument("--preset", default="tiny", help="init-model preset (vllm on CPU needs heads of 32: tiny32)")
    p.add_argument("--trl-vllm", action="store_true", help="GRPO: TRL's GRPOTrainer generates with vLLM too")
    args = p.parse_args(argv)
    if args.grpo:  # grpo_vs_trl.py's sizes, where ours was 0.88-0.94x TRL's time sequentially
        args.prompts = args.prompts or 8
        args.max_new_tokens = args.max_new_tokens or 24
    args.prompts, args.max_new_tokens = args.prompts or 32, args.max_new_tokens or 48
    if args.quick:
        args.reps, args.iterations, args.prompts = 1, 2, min(args.prompts, 16)
    kind = "grpo" if args.grpo else "ppo"
    if args.grpo:
        from benchmarks.grpo_vs_trl import grpo_config
        base = grpo_config(args)
    else:
        base = ppo_config([f"seed={args.seed}", f"ppo.prompts_per_iteration={args.prompts}",
                           f"generation.max_new_tokens={args.max_new_tokens}", f"ppo.ppo_epochs={args.ppo_epochs}"])
    import copy
    from rlhf.config import check
    overlapped = copy.deepcopy(base)  # the same settings, with a rollout group one iteration ahead
    overlapped.ppo.rollout_group, overlapped.ppo.off_policy_steps = True, 1
    overlapped.roles.rollout.engine = args.engine
    check(overlapped)
    set_threads(1)
    archs = ["llama"] if args.grpo else ["codegen"]
    with workspace(args, archs, seed=args.seed, preset=args.preset) as ws, \
            local_ray(num_cpus=cpus_needed(base) + cpus_needed(overlapped)):
        model = ws.models[archs[0]]
        sides = {"sequential": Side(base, model, model, ws.data["prompts_train"]),
                 "overlapped": Side(overlapped, model, model, ws.data["prompts_train"])}
        blocks = {name: (lambda rep, s=side: s.block(args.iterations)) for name, side in sides.items()}
        if args.grpo:
            from benchmarks.grpo_vs_trl import Theirs
            theirs = Theirs(args, base, model, model, ws.data["prompts_train"], f"{ws.root}/trl")
            blocks["trl"] = lambda rep: theirs.block(args.iterations)
        try:
            began = time.time()
            runs = alternate(blocks, args.reps)
            print(f"  ({time.time() - began:.0f} s)", flush=True)
            phases = sides["overlapped"].phases
        finally:
            for side in sides.values():
                side.close()
    report(args, runs, kind, phases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
