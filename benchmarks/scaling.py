"""Scaling of one PPO iteration on Ray: seconds per iteration as prompts per iteration double (64 -> 512) and as
the reply length doubles, split into PPO's own phase timings (`time/generate`, `time/score`, `time/train`).

configs/tiny/ppo.yaml's roles and batch sizes throughout (train_batch_size 16, so more prompts mean more optimizer
steps); one set of role groups serves every point (`PPOSide.use`). Points run in turn, the order reversed every
repetition. The slope column is d log(time) / d log(size) between neighbouring points: 1 is linear, below 1 means
a fixed cost is being amortised.

    python benchmarks/scaling.py [--reps 2] [--prompts 64 128 256 512] [--lengths 16 32 64 128] [--quick]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (PHASES, PPOSide, alternate, cpus_needed, local_ray, medians, parser,  # noqa: E402
                               ppo_config, table, timed_block, workspace, write_record)

FIGURES = ("iteration_s", *PHASES, "response_length")


def point_config(args: argparse.Namespace, prompts: int, length: int):
    return ppo_config([f"seed={args.seed}", f"ppo.prompts_per_iteration={prompts}",
                       f"generation.max_new_tokens={length}", f"data.max_prompt_length={args.max_prompt_length}"])


def points(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """name -> (prompts, reply length): the prompt sweep at the first length, then the length sweep at the first
    prompt count (their shared point once)."""
    out = {f"prompts={n},len={args.lengths[0]}": (n, args.lengths[0]) for n in args.prompts}
    out |= {f"prompts={args.prompts[0]},len={n}": (args.prompts[0], n) for n in args.lengths}
    return out


def run_point(ray_side: PPOSide, args: argparse.Namespace, prompts: int, length: int) -> dict:
    ray_side.use(point_config(args, prompts, length))
    return timed_block(ray_side.iteration, args.iterations)


def slope(t0: float, t1: float, s0: float, s1: float) -> float:
    return math.log(t1 / t0) / math.log(s1 / s0) if t0 > 0 and t1 > 0 and s1 != s0 else float("nan")


def sweep_rows(name: str, sizes: list[int], figures: list[dict]) -> list[list]:
    rows = []
    for i, (size, f) in enumerate(zip(sizes, figures)):
        grow = slope(figures[i - 1]["iteration_s"], f["iteration_s"], sizes[i - 1], size) if i else ""
        shares = " / ".join(f"{100 * f[k] / f['iteration_s']:.0f}" for k in PHASES)
        rows.append([f"{name}={size}", f["iteration_s"], *[f[k] for k in PHASES], shares, grow, f["response_length"]])
    return rows


def report(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    figures = {name: medians(r, FIGURES) for name, r in runs.items()}
    by_prompts = [figures[f"prompts={n},len={args.lengths[0]}"] for n in args.prompts]
    by_length = [figures[f"prompts={args.prompts[0]},len={n}"] for n in args.lengths]
    rows = sweep_rows("prompts", args.prompts, by_prompts) + sweep_rows("reply tokens", args.lengths, by_length)
    header = [f"PPO on Ray (median of {args.reps} x {args.iterations})", "s / iteration", *PHASES,
              "% generate / score / train", "slope vs previous", "mean reply length"]
    text = table(header, rows)
    text += (f"\n\nprompt sweep at {args.lengths[0]} new tokens; length sweep at {args.prompts[0]} prompts. "
             "Slope = d log(time) / d log(size): 1 is linear in the size.")
    phase_slopes = {sweep: {k: slope(f[0][k], f[-1][k], sizes[0], sizes[-1]) for k in ("iteration_s", *PHASES)}
                    for sweep, f, sizes in (("prompts", by_prompts, args.prompts), ("length", by_length, args.lengths))}
    write_record("scaling", args, {"runs": runs, "medians": figures, "end_to_end_slopes": phase_slopes}, text)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], reps=2)
    p.add_argument("--prompts", type=int, nargs="+", default=[64, 128, 256, 512], help="prompts per iteration")
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128], help="new tokens per reply")
    p.add_argument("--iterations", type=int, default=2, help="timed iterations per point and repetition")
    p.add_argument("--max-prompt-length", type=int, default=128)
    p.add_argument("--arch", default="codegen", choices=["codegen", "llama"])
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.iterations, args.prompts, args.lengths = 1, 1, [16, 32], [8, 16]
    cfg = point_config(args, args.prompts[0], args.lengths[0])
    with workspace(args, [args.arch], n_prompts=max(200, max(args.prompts)), seed=args.seed) as ws, \
            local_ray(num_cpus=cpus_needed(cfg)):
        model = ws.models[args.arch]
        ray_side = PPOSide(cfg, model, model, ws.data["prompts_train"])
        try:
            sides = {name: (lambda rep, n=n, length=length: run_point(ray_side, args, n, length))
                     for name, (n, length) in points(args).items()}
            runs = alternate(sides, args.reps)
        finally:
            ray_side.close()
    report(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
