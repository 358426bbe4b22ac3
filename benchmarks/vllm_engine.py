"""The rollout group's inference engines: vLLM against transformers' `generate`, inside the rollout role, on Ray.

A random ~30M-parameter Llama (`init-model --preset medium`: 8 layers of 512, heads of 64) as policy, reference,
reward model and critic, learning rate 0 (`common.ppo_config`: every reply runs to the cap, on both sides). Three
sides, each its own role groups with a rollout group, alternated repetition by repetition:

- `hf`: `roles.rollout.engine: hf`, `ppo.off_policy_steps: 0` (sync, generate, score, train in turn);
- `vllm`: the same with `roles.rollout.engine: vllm` (compiled, as a user runs it; `--eager` for enforce_eager);
- `vllm overlapped`: vLLM with `ppo.off_policy_steps: 1` (generating iteration k+1 while training on k).

Reported per side: rollout tokens/s of one `generate` call on the rollout group (the prompts of one iteration,
`--new-tokens` each), and seconds per PPO iteration (median over blocks; each block's first iteration dropped).
Targets (issue 31): vLLM's rollout tokens/s >= 4x transformers'; a vLLM iteration <= 0.6x a transformers one.

    python benchmarks/vllm_engine.py [--reps 2] [--iterations 2] [--prompts 16] [--new-tokens 128] [--eager]
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (PPOSide, Stopwatch, alternate, cpus_needed, local_ray, medians, parser,  # noqa: E402
                               ppo_config, set_threads, table, target, workspace, write_record)

GOAL = {"tokens": 4.0, "iteration": 0.6}


class Side(PPOSide):
    """A PPO side with a rollout group; `block` times one rollout-group generate, then PPO iterations."""

    def block(self, iterations: int) -> dict:
        import torch
        from rlhf.batching import collate_prompts
        cfg = self.trainer.cfg
        ids = self.trainer.prompt_ids[:cfg.ppo.prompts_per_iteration]
        prompts = collate_prompts(ids, self.trainer.tokenizer.pad_token_id)
        self.roles.rollout.generate(prompts, cfg.generation).result()  # warm-up
        with Stopwatch() as sw:
            out = self.roles.rollout.generate(prompts, cfg.generation).result()
        tokens = int(torch.as_tensor(out["action_mask"]).sum())
        self.iteration()  # warm-up (and, overlapped, the first generation ahead)
        runs = [self.iteration() for _ in range(iterations)]
        for job in list(getattr(self.trainer.source, "pending", {}).values()):
            job.result()
        return {"rollout_tokens_per_s": tokens / sw.seconds, "rollout_tokens": tokens,
                **medians(runs, list(runs[0]))}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], reps=2)
    p.add_argument("--iterations", type=int, default=2, help="timed PPO iterations per block")
    p.add_argument("--prompts", type=int, default=16, help="prompts per iteration")
    p.add_argument("--new-tokens", type=int, default=128, help="reply length (every reply runs to it)")
    p.add_argument("--preset", default="medium", help="init-model preset of the Llama (medium: ~30M parameters)")
    p.add_argument("--eager", action="store_true", help="vLLM with enforce_eager (no compiled graphs)")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.iterations, args.prompts, args.new_tokens, args.preset = 1, 1, 8, 32, "tiny32"
    base = ppo_config([f"seed={args.seed}", f"ppo.prompts_per_iteration={args.prompts}",
                       f"ppo.train_batch_size={args.prompts}", f"generation.max_new_tokens={args.new_tokens}",
                       "ppo.ppo_epochs=1", "ppo.rollout_group=true", "ppo.off_policy_steps=0",
                       f"roles.rollout.micro_batch_size={args.prompts}", "model.dtype=float32"])
    sides_cfg = {"hf": base}
    vllm = copy.deepcopy(base)
    vllm.roles.rollout.engine, vllm.roles.rollout.vllm.enforce_eager = "vllm", args.eager
    sides_cfg["vllm"] = vllm
    overlapped = copy.deepcopy(vllm)
    overlapped.ppo.off_policy_steps = 1
    sides_cfg["vllm overlapped"] = overlapped
    from rlhf.config import check
    for cfg in sides_cfg.values():
        check(cfg)
    set_threads(1)
    with workspace(args, ["llama"], seed=args.seed, preset=args.preset) as ws, \
            local_ray(num_cpus=sum(cpus_needed(c) for c in sides_cfg.values())):
        model = ws.models["llama"]
        began = time.time()
        sides = {name: Side(cfg, model, model, ws.data["prompts_train"]) for name, cfg in sides_cfg.items()}
        print(f"  role groups of {len(sides)} sides started ({time.time() - began:.0f} s)", flush=True)
        try:
            began = time.time()
            runs = alternate({name: (lambda rep, s=side: s.block(args.iterations)) for name, side in sides.items()},
                             args.reps)
            print(f"  ({time.time() - began:.0f} s)", flush=True)
        finally:
            for side in sides.values():
                side.close()
    figures = ("rollout_tokens_per_s", "iteration_s", "time/generate", "time/score", "time/train")
    med = {name: medians(r, figures) for name, r in runs.items()}
    tokens = med["vllm"]["rollout_tokens_per_s"] / med["hf"]["rollout_tokens_per_s"]
    iteration = med["vllm"]["iteration_s"] / med["hf"]["iteration_s"]
    overlap = med["vllm overlapped"]["iteration_s"] / med["hf"]["iteration_s"]
    header = [f"{args.preset} Llama, {args.prompts} prompts x {args.new_tokens} new tokens", *sides_cfg,
              "vllm / hf"]
    rows = [[k, *(med[n][k] for n in sides_cfg), med["vllm"][k] / med["hf"][k]] for k in figures]
    text = table(header, rows)
    text += (f"\n\ntarget: rollout tokens/s vllm/hf >= {GOAL['tokens']}: "
             f"{'met' if tokens >= GOAL['tokens'] else 'NOT met'} ({tokens:.2f}x)"
             f"\ntarget: seconds per iteration vllm/hf <= {GOAL['iteration']}: "
             f"{'met' if iteration <= GOAL['iteration'] else 'NOT met'} ({iteration:.2f}x; overlapped {overlap:.2f}x)")
    write_record("vllm_engine", args, {"runs": runs, "medians": med, "ratio_tokens": tokens,
                                       "ratio_iteration": iteration, "ratio_overlapped": overlap,
                                       "targets": [target("rollout tokens/s, vllm/hf", tokens, f">= {GOAL['tokens']}",
                                                          tokens >= GOAL["tokens"]),
                                                   target("seconds per iteration, vllm/hf", iteration,
                                                          f"<= {GOAL['iteration']}", iteration <= GOAL["iteration"])]},
                 text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
