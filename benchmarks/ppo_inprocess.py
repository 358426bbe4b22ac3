"""The no-Ray baseline: `rlhf ppo`'s own controller (`PPOTrainer.iteration`) over the role interface's one-process
implementation (`actors.local.LocalBackend`), for `ppo_overhead.py` and `grpo_vs_trl.py` to measure Ray against.

The same worker classes, DeepSpeed engines, dispatch declarations and math as on Ray, each role a single rank in
this process; what it leaves out is what Ray adds: actors, object transfers, the roles working side by side.

    python benchmarks/ppo_inprocess.py [--iterations 3] [--prompts 32] [--max-new-tokens 24]
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PHASES, PPOSide, median, parser, ppo_config, set_threads, table, workspace  # noqa: E402


def in_process(cfg: Any, policy: str, reward: str, prompts_path: str) -> PPOSide:
    """PPO's roles built in this process (one rank each), driven by the same controller as on Ray."""
    from actors.local import LocalBackend
    return PPOSide(cfg, policy, reward, prompts_path, LocalBackend())


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], reps=1)
    p.add_argument("--iterations", type=int, default=3, help="timed iterations (after one warm-up)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per iteration")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--arch", default="codegen", choices=["codegen", "llama"])
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    args = p.parse_args(argv)
    set_threads(args.threads)
    cfg = ppo_config([f"seed={args.seed}", f"ppo.prompts_per_iteration={args.prompts}",
                      f"generation.max_new_tokens={args.max_new_tokens}"])
    with workspace(args, [args.arch], seed=args.seed) as ws:
        baseline = in_process(cfg, ws.models[args.arch], ws.models[args.arch], ws.data["prompts_train"])
        baseline.iteration()
        runs = [baseline.iteration() for _ in range(args.iterations)]
        baseline.close()
    keys = ("iteration_s", *PHASES, "response_length")
    print(table(["in-process PPO iteration", *[f"#{i + 1}" for i in range(len(runs))], "median"],
                [[k, *[r[k] for r in runs], median([r[k] for r in runs])] for k in keys]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
