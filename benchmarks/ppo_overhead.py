"""The orchestration overhead of PPO on Ray: one iteration over four role groups against the same computation in
one process without Ray (`ppo_inprocess.py`).

Ours is `rlhf.drivers.ppo.PPOTrainer.iteration` over Ray role groups (policy, reference, reward, critic: one CPU
rank each, as configs/tiny/ppo.yaml lays them out); the baseline is the same controller over the role interface's
one-process implementation (`actors.local`), with one torch thread, as each of our ranks has. Same tiny model, prompts, lengths, batch and micro-batch sizes,
PPO epochs. Blocks of iterations alternate between the two; the first iteration of every block is dropped.

    python benchmarks/ppo_overhead.py [--reps 3] [--iterations 3] [--prompts 32] [--max-new-tokens 24] [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (PHASES, PPOSide, alternate, cpus_needed, local_ray, medians, parser,  # noqa: E402
                               ppo_config, set_threads, table, target, timed_block, workspace, write_record)
from benchmarks.ppo_inprocess import in_process  # noqa: E402

GOAL = 1.15  # Ray's seconds per iteration over the in-process baseline's
FIGURES = ("iteration_s", *PHASES, "response_length")


def report(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    ours, base = medians(runs["ray"], FIGURES), medians(runs["inprocess"], FIGURES)
    ratio = {k: ours[k] / base[k] for k in ("iteration_s", *PHASES)}
    rows = [[f"seconds per iteration (median of {args.reps} x {args.iterations})", ours["iteration_s"],
             base["iteration_s"], ratio["iteration_s"]]]
    rows += [[f"  {k}", ours[k], base[k], ratio[k]] for k in PHASES]
    rows += [["  mean reply length (tokens)", ours["response_length"], base["response_length"], ""]]
    text = table([f"PPO, {args.prompts} prompts, {args.max_new_tokens} new tokens, {args.arch}", "Ray (4 role groups)",
                  "one process, no Ray", "ratio (Ray/in-process)"], rows)
    met = ratio["iteration_s"] <= GOAL
    text += f"\n\ntarget: at most {GOAL}x: {'met' if met else 'NOT met'} ({ratio['iteration_s']:.2f}x)"
    write_record("ppo_overhead", args, {"runs": runs, "medians": {"ray": ours, "inprocess": base}, "ratio": ratio,
                                        "target": target("seconds per iteration, Ray/in-process",
                                                          ratio["iteration_s"], f"<= {GOAL}", met)}, text)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], reps=3)
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per block")
    p.add_argument("--prompts", type=int, default=32, help="prompts per iteration")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--arch", default="codegen", choices=["codegen", "llama"])
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process baseline")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.iterations, args.prompts = 1, 2, 16
    cfg = ppo_config([f"seed={args.seed}", f"ppo.prompts_per_iteration={args.prompts}",
                      f"generation.max_new_tokens={args.max_new_tokens}"])
    set_threads(args.threads)
    with workspace(args, [args.arch], seed=args.seed) as ws, local_ray(num_cpus=cpus_needed(cfg)):
        model = ws.models[args.arch]
        ray_side = PPOSide(cfg, model, model, ws.data["prompts_train"])
        baseline = in_process(cfg, model, model, ws.data["prompts_train"])
        try:
            runs = alternate({"ray": lambda rep: timed_block(ray_side.iteration, args.iterations),
                              "inprocess": lambda rep: timed_block(baseline.iteration, args.iterations)}, args.reps)
        finally:
            ray_side.close()
            baseline.close()
    report(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
