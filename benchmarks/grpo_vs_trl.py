"""One critic-free RL iteration (GRPO): ours on Ray against TRL's GRPOTrainer with a reward model.

Ours is `rlhf.drivers.ppo.PPOTrainer.iteration` with `ppo.estimator: grpo` over Ray role groups: the policy, the reference
and the reward run as separate Ray actors. TRL's GRPOTrainer runs the same roles in one process, with the reward
function a sequence-classification model of the same tiny size. Both sides: the same random tiny Llama policy and
reward model, the same prompts (MOSS-rendered), prompts x samples per iteration, generation length and sampling
(temperature 0.7, top-p 0.8, repetition penalty 1.02), KL coefficient (so both compute reference log-probs), one
optimizer step per iteration over all the samples (learning rate 0 on both sides, see `ppo_config`) and clip.
Reported: seconds per iteration, and the same GRPO computation in one process without Ray (`ppo_inprocess.py`)
to show what Ray itself costs.

    python benchmarks/grpo_vs_trl.py [--reps 3] [--prompts 8] [--samples 4] [--max-new-tokens 24] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (PHASES, PPOSide, alternate, cpus_needed, local_ray, median, medians,  # noqa: E402
                               parser, ppo_config, set_threads, table, target, timed_block, workspace, write_record)
from benchmarks.ppo_inprocess import in_process  # noqa: E402


def grpo_config(args: argparse.Namespace):
    """configs/tiny/ppo.yaml switched to GRPO: no critic, one optimizer step over all samples per iteration."""
    rollouts = args.prompts * args.samples
    return ppo_config([
        f"seed={args.seed}", "ppo.estimator=grpo", f"ppo.prompts_per_iteration={args.prompts}",
        f"ppo.samples_per_prompt={args.samples}", "ppo.ppo_epochs=1", f"ppo.train_batch_size={rollouts}",
        f"ppo.kl_coef={args.kl_coef}", f"generation.max_new_tokens={args.max_new_tokens}",
        f"roles.policy.micro_batch_size={rollouts}", f"roles.reference.micro_batch_size={rollouts}",
        f"roles.reward.micro_batch_size={rollouts}"])


def step_timer():
    """A TrainerCallback that records the wall time of every optimizer step (generation and scoring included)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.last = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.times, self.last = [], time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    return StepTimer()


def trl_vllm(args: argparse.Namespace) -> dict:
    """GRPOConfig settings that make TRL generate with vLLM in its own process (`--trl-vllm`: colocate mode, which
    runs vLLM under torch.distributed: a one-process world on loopback is set up for it)."""
    if not getattr(args, "trl_vllm", False):
        return {}
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    return {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.1}


class Theirs:
    """TRL's GRPOTrainer with a sequence-classification reward model; `train()` is called once per block."""

    def __init__(self, args: argparse.Namespace, cfg, policy: str, reward: str, prompts_path: str, out: str):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        from trl import GRPOConfig, GRPOTrainer
        from rlhf.data import load_prompts
        from rlhf.modeling import load_tokenizer
        from rlhf.moss import render
        tokenizer = load_tokenizer(policy)
        prompts = [render(d, cfg.data.plugin) for d in load_prompts(prompts_path)]
        g, optim = cfg.generation, cfg.roles.policy.optim
        conf = GRPOConfig(
            output_dir=out, seed=args.seed, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1000,
            disable_tqdm=True, dataloader_pin_memory=False, max_steps=args.iterations + 1,
            bf16=False, gradient_checkpointing=False,  # as ours: float32, no recomputation
            per_device_train_batch_size=args.prompts * args.samples, gradient_accumulation_steps=1,
            num_generations=args.samples, max_completion_length=g.max_new_tokens, temperature=g.temperature,
            top_p=g.top_p, top_k=g.top_k, repetition_penalty=g.repetition_penalty, beta=cfg.ppo.kl_coef,
            num_iterations=1, epsilon=cfg.ppo.clip_eps, learning_rate=optim.lr, adam_beta2=optim.betas[1],
            max_grad_norm=optim.grad_clip, lr_scheduler_type="constant", **trl_vllm(args))
        self.timer = step_timer()
        self.trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(policy),
            reward_funcs=[AutoModelForSequenceClassification.from_pretrained(reward, num_labels=1)],
            args=conf, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
            reward_processing_classes=[tokenizer], callbacks=[self.timer])

    def block(self, iterations: int) -> dict:
        """`iterations` + 1 optimizer steps (max_steps); the first is warm-up and not counted."""
        self.trainer.train()
        times = self.timer.times[1:iterations + 1]
        key = "completions/mean_length"
        lengths = [h[key] for h in self.trainer.state.log_history if key in h]
        return {"iteration_s": median(times), **({"response_length": lengths[-1]} if lengths else {})}


def report(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    figures = ("iteration_s", "response_length", *PHASES)
    ours, theirs, alone = (medians(runs[k], figures) for k in ("ours", "trl", "inprocess"))
    ratio = ours["iteration_s"] / theirs["iteration_s"]
    rows = [[f"seconds per iteration (median of {args.reps} x {args.iterations})", ours["iteration_s"],
             theirs["iteration_s"], ratio, alone["iteration_s"]]]
    rows += [[f"  {k}", ours[k], "", "", alone[k]] for k in PHASES]
    rows += [["  mean reply length (tokens)", ours["response_length"], theirs.get("response_length", ""), "",
              alone["response_length"]]]
    text = table([f"GRPO, {args.prompts} prompts x {args.samples} samples, {args.max_new_tokens} new tokens",
                  "ours (Ray actors)", "TRL GRPOTrainer", "ratio (ours/TRL)", "ours in one process, no Ray"], rows)
    met = ratio <= 1.0
    text += f"\n\ntarget: no slower than TRL (ratio <= 1.0): {'met' if met else 'NOT met'} ({ratio:.2f}x)"
    write_record("grpo_vs_trl", args, {"runs": runs, "medians": {"ours": ours, "trl": theirs, "inprocess": alone},
                                       "ratio": ratio,
                                       "target": target("seconds per iteration, ours/TRL", ratio, "<= 1.0", met)},
                 text)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], reps=3)
    p.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (TRL's num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="reply length (TRL's max_completion_length)")
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per repetition and side")
    p.add_argument("--kl-coef", type=float, default=0.02, help="KL coefficient (TRL's beta)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of TRL's process (1, as each of our ranks; see RESULTS.md on 2 threads)")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.iterations, args.prompts = 1, 2, 4
    cfg = grpo_config(args)
    set_threads(args.threads)
    with workspace(args, ["llama"], seed=args.seed) as ws, local_ray(num_cpus=cpus_needed(cfg)):
        model = ws.models["llama"]
        ours = PPOSide(cfg, model, model, ws.data["prompts_train"])
        theirs = Theirs(args, cfg, model, model, ws.data["prompts_train"], f"{ws.root}/trl")
        alone = in_process(cfg, model, model, ws.data["prompts_train"])  # where Ray's share of our time shows
        try:
            runs = alternate({"ours": lambda rep: timed_block(ours.iteration, args.iterations),
                              "trl": lambda rep: theirs.block(args.iterations),
                              "inprocess": lambda rep: timed_block(alone.iteration, args.iterations)}, args.reps)
        finally:
            ours.close()
            alone.close()
    report(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
