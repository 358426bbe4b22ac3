"""Each role call of a PPO iteration timed on its own, through Ray and in one process, and what three changes to
the role workers would save (measured in one process, results checked equal to today's).

Ray side: the calls `rlhf.ppo.PPOTrainer.iteration` makes on `rlhf.ppo.Roles` (generate, log-probs, score,
values, one policy and one critic step), on one fixed experience. In-process side: `ppo_inprocess.InProcessPPO`
doing the same. The what-ifs:
- skip the policy's old log-prob pass when an iteration is on-policy (one PPO epoch, one minibatch: GRPO's usual
  setting), as TRL does: its cost is the policy log-prob call;
- `logits_to_keep`: the LM head only on the reply positions (all a log-prob pass reads);
- rows sorted by prompt length and the all-padding left columns of each micro-batch cut before the forward.

    python benchmarks/ppo_calls.py [--reps 5] [--prompts 32] [--max-new-tokens 24]
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (RayPPO, Stopwatch, cpus_needed, local_ray, median, parser, ppo_config,  # noqa: E402
                               set_threads, table, workspace, write_record)
from benchmarks.ppo_inprocess import InProcessPPO  # noqa: E402
from rlhf.batching import Batch, micro_batches, position_ids  # noqa: E402


def seconds(fn: Callable[[], object], reps: int) -> float:
    """Median wall seconds of `reps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        with Stopwatch() as sw:
            fn()
        times.append(sw.seconds)
    return median(times)


def experience(ray_side: RayPPO) -> tuple[Batch, Batch, dict]:
    """One rollout of the run's first prompt batch, and the experience and train batch built from it."""
    import ray
    from rlhf.batching import collate_prompts
    trainer, g = ray_side.trainer, ray_side.roles.groups
    rows = trainer.prompt_batch(0)
    prompts = collate_prompts([trainer.prompt_ids[i] for i in rows], trainer.tokenizer.pad_token_id)
    rollout = g["policy"].run("generate", ray.put(prompts), trainer.gen)
    exp = {"sequences": torch.cat([prompts["input_ids"], rollout["response_ids"]], 1),
           "attention_mask": torch.cat([prompts["attention_mask"],
                                        rollout.get("response_mask", rollout["action_mask"])], 1),
           "response_ids": rollout["response_ids"], "action_mask": rollout["action_mask"]}
    return prompts, exp, {"rows": len(rows)}


def train_batch(exp: Batch, size: int) -> Batch:
    """A minibatch as the controller sends it: random advantages and returns, the rollout's own log-probs."""
    g = torch.Generator().manual_seed(0)
    mb = {k: v[:size] for k, v in exp.items()}
    shape = mb["response_ids"].shape
    mask = mb["action_mask"].float()
    return mb | {"old_logprobs": torch.zeros(shape), "advantages": torch.randn(shape, generator=g) * mask,
                 "old_values": torch.zeros(shape), "returns": torch.randn(shape, generator=g) * mask}


def ray_calls(ray_side: RayPPO, prompts: Batch, exp: Batch, mb: Batch) -> dict[str, Callable[[], object]]:
    import ray
    g, cfg, gen = ray_side.roles.groups, ray_side.trainer.cfg, ray_side.trainer.gen
    p, tokens = cfg.ppo, int(mb["action_mask"].sum())
    exp_ref, prompts_ref = ray.put(exp), ray.put(prompts)
    calls = {"an empty call (round trip)": lambda: ray.get(g["policy"].workers[0].pid.remote()),
             "ray.put of the experience": lambda: ray.put(exp),
             "generate": lambda: g["policy"].run("generate", prompts_ref, gen),
             "policy log-probs (old)": lambda: g["policy"].run("logprobs", exp_ref),
             "reference log-probs": lambda: g["reference"].run("logprobs", exp_ref),
             "reward score": lambda: g["reward"].run("score", exp_ref)}
    if "critic" in g:
        calls["critic values"] = lambda: g["critic"].run("values", exp_ref)
        calls["critic step (one minibatch)"] = lambda: g["critic"].run(
            "value_step", ray.put(mb), tokens, p.value_clip_eps, p.value_loss_coef)
    calls["policy step (one minibatch)"] = lambda: g["policy"].run(
        "ppo_step", ray.put(mb), tokens, p.clip_eps, p.entropy_coef, None, 0, p.ptx_coef)
    return calls


def inprocess_calls(base: InProcessPPO, prompts: Batch, exp: Batch, mb: Batch) -> dict[str, Callable[[], object]]:
    from rlhf.generation import generate_replies
    r, tokens = base.cfg.roles, int(mb["action_mask"].sum())
    calls = {"generate": lambda: generate_replies(base.policy, prompts, base.gen, base.eom_id,
                                                  base.tokenizer.pad_token_id, torch.device("cpu"),
                                                  micro_batch=len(prompts["input_ids"])),
             "policy log-probs (old)": lambda: base.logprobs(base.policy, exp, r.policy.micro_batch_size),
             "reference log-probs": lambda: base.logprobs(base.reference, exp, r.reference.micro_batch_size),
             "reward score": lambda: base.scores(exp)}
    if base.critic is not None:
        calls["critic values"] = lambda: base.values(exp)
        calls["critic step (one minibatch)"] = lambda: base.value_step(mb, tokens)
    calls["policy step (one minibatch)"] = lambda: base.policy_step(mb, tokens)
    return calls


# --- what-ifs: the log-prob pass as the workers run it, and two cheaper forms of it ---------------------------


def logprobs_today(model: torch.nn.Module, exp: Batch, micro: int) -> torch.Tensor:
    from rlhf.ppo_math import logprobs_from_logits
    out = []
    with torch.no_grad():
        for mb in micro_batches(exp, micro):
            width = mb["response_ids"].shape[1]
            logits = model(input_ids=mb["sequences"], attention_mask=mb["attention_mask"],
                           position_ids=position_ids(mb["attention_mask"]), use_cache=False).logits.float()
            out.append(logprobs_from_logits(logits[:, -width - 1:-1], mb["response_ids"]))
    return torch.cat(out)


def logprobs_kept(model: torch.nn.Module, exp: Batch, micro: int) -> torch.Tensor:
    """The LM head (and the float32 copy of its logits) only on the last width + 1 positions."""
    from rlhf.ppo_math import logprobs_from_logits
    out = []
    with torch.no_grad():
        for mb in micro_batches(exp, micro):
            width = mb["response_ids"].shape[1]
            logits = model(input_ids=mb["sequences"], attention_mask=mb["attention_mask"],
                           position_ids=position_ids(mb["attention_mask"]), use_cache=False,
                           logits_to_keep=width + 1).logits.float()
            out.append(logprobs_from_logits(logits[:, :-1], mb["response_ids"]))
    return torch.cat(out)


def logprobs_trimmed(model: torch.nn.Module, exp: Batch, micro: int) -> torch.Tensor:
    """Rows sorted by prompt length, each micro-batch's all-padding left columns cut, results put back in order.
    Positions come from the attention mask, so every row computes what it does today."""
    order = torch.argsort(exp["attention_mask"].sum(1), stable=True)
    ordered = {k: v[order] for k, v in exp.items()}
    parts = []
    for mb in micro_batches(ordered, micro):
        first = int(mb["attention_mask"].any(0).float().argmax())
        mb = {k: (v[:, first:] if k in ("sequences", "attention_mask") else v) for k, v in mb.items()}
        parts.append(logprobs_today(model, mb, micro))
    out = torch.empty_like(torch.cat(parts))
    out[order] = torch.cat(parts)
    return out


def what_ifs(base: InProcessPPO, exp: Batch, reps: int, old_logprobs_s: float, iteration_s: float) -> list[list]:
    model, micro = base.policy.eval(), base.cfg.roles.policy.micro_batch_size
    today = logprobs_today(model, exp, micro)
    for variant in (logprobs_kept, logprobs_trimmed):
        got = variant(model, exp, micro)
        mask = exp["action_mask"].bool()
        if not torch.allclose(got[mask], today[mask], atol=1e-4):
            raise AssertionError(f"{variant.__name__} changes the log-probs; it is not a like-for-like what-if")
    now = seconds(lambda: logprobs_today(model, exp, micro), reps)
    kept = seconds(lambda: logprobs_kept(model, exp, micro), reps)
    trimmed = seconds(lambda: logprobs_trimmed(model, exp, micro), reps)
    padding = 1 - float(exp["attention_mask"].float().mean())
    where = f"policy log-prob pass, micro-batches of {micro}, in-process"
    return [["skip the old log-prob pass when on-policy (the policy's call through Ray)", old_logprobs_s, 0.0,
             old_logprobs_s / iteration_s],
            [f"logits_to_keep ({where})", now, kept, (now - kept) / now],
            [f"length-sorted, left padding cut ({where}; {padding:.0%} of positions are padding)", now, trimmed,
             (now - trimmed) / now]]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], reps=5)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--arch", default="codegen", choices=["codegen", "llama"])
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.prompts = 2, 16
    set_threads(1)
    cfg = ppo_config([f"seed={args.seed}", f"ppo.prompts_per_iteration={args.prompts}",
                      f"generation.max_new_tokens={args.max_new_tokens}"])
    with workspace(args, [args.arch], seed=args.seed) as ws, local_ray(num_cpus=cpus_needed(cfg)):
        model = ws.models[args.arch]
        ray_side = RayPPO(cfg, model, model, ws.data["prompts_train"])
        base = InProcessPPO(cfg, model, model, ws.data["prompts_train"])
        try:
            iteration_s = median([ray_side.iteration()["iteration_s"] for _ in range(3)])
            prompts, exp, _ = experience(ray_side)
            mb = train_batch(exp, cfg.ppo.train_batch_size)
            here = inprocess_calls(base, prompts, exp, mb)
            rows = []
            for name, call in ray_calls(ray_side, prompts, exp, mb).items():
                ray_s = seconds(call, args.reps)
                local_s = seconds(here[name], args.reps) if name in here else float("nan")
                rows.append([name, ray_s, local_s, ray_s / local_s if name in here else ""])
            old_s = next(r[1] for r in rows if r[0] == "policy log-probs (old)")
            changes = what_ifs(base, exp, args.reps, old_s, iteration_s)
        finally:
            ray_side.close()
    text = table([f"one call, {args.prompts} prompts x {args.max_new_tokens} tokens (median of {args.reps})",
                  "Ray (s)", "in-process (s)", "ratio"], rows)
    text += f"\n\nRay iteration: {iteration_s:.3f} s (median of 3)\n\n"
    text += table(["what-if (suggested change to a role worker)", "today (s)", "with it (s)",
                   "saving (share of the call; first row: of the iteration)"], changes)
    write_record("ppo_calls", args, {"calls": rows, "what_ifs": changes, "iteration_s": iteration_s}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
