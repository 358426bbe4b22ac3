"""Reward-model training on K = 4 ranked lists: ours against TRL's RewardTrainer on the same pairs.

Ours is `rlhf.drivers.rm.run_rm` (a Ray role group of DeepSpeed ranks): each response is encoded once and a list's 6
pairs are formed from its 4 scores. TRL's RewardTrainer gets the same lists expanded into their 6 (chosen, rejected)
pairs, as the exact token ids ours trains on, and encodes both sides of every pair. Both start from the same random
tiny Llama, take the same pairs per optimizer step (lists x 6), epochs, learning rate, warm-up, Adam betas, gradient
clip and threads. Reported: training-loop pairs/s, end-to-end seconds, and held-out pairwise accuracy of both.

    python benchmarks/rm_vs_trl.py [--reps 3] [--lists 256] [--epochs 2] [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (QUALITIES, ROOT, Stopwatch, Workspace, alternate, local_ray,  # noqa: E402
                               medians, parser, set_threads, table, target, workspace, write_record)

GOAL = 2.5  # our pairs/s over TRL's, at equal held-out accuracy
ACCURACY_TOLERANCE = 0.03  # "equal": within this of each other (pairwise accuracy, 0..1)
FIGURES = ("pairs_per_s", "train_s", "wall_s", "accuracy", "sequences_per_step")
K = len(QUALITIES)  # responses per ranked list
PAIRS = K * (K - 1) // 2  # pairs per list: all ranks are distinct


def rm_config(args: argparse.Namespace, ws: Workspace):
    """configs/tiny/rm.yaml with the benchmark's sizes; evaluation only before and after the loop."""
    from rlhf.config import load_config
    return load_config("rm", str(ROOT / "configs/tiny/rm.yaml"), [
        f"seed={args.seed}", f"data.eval={ws.data['ranked4_eval']}", f"train.epochs={args.epochs}",
        f"train.global_batch_size={args.lists_per_step}", f"train.micro_batch_size={args.micro_lists}",
        "train.eval_every=0", "train.save_every=0", "train.log_every=1000", f"optim.lr={args.lr}",
        f"optim.warmup_steps={args.warmup}", f"layout.gpus_per_node={args.ranks}", "layout.cpus_per_rank=1",
        "logging.progress=false", "logging.tensorboard=false"])


def run_ours(args: argparse.Namespace, ws: Workspace, rep: int) -> dict:
    from rlhf.drivers.rm import run_rm
    cfg = rm_config(args, ws)
    cfg.model.path, cfg.data.train = ws.models["llama"], ws.data["ranked4_train"]
    with Stopwatch() as wall:
        summary = run_rm(cfg, f"{ws.root}/ours-{rep}")
    return {"pairs_per_s": summary["train_pairs_per_s"], "train_s": summary["train_seconds"], "wall_s": wall.seconds,
            "accuracy": summary["pairwise_accuracy"], "pairs": summary["train_pairs"],
            "sequences_per_step": args.lists_per_step * K}


def encoded_lists(path: str, ws: Workspace, cfg) -> list:
    from reward.batches import encode_file
    from rlhf.modeling import load_tokenizer
    return encode_file(path, load_tokenizer(ws.models["llama"]), cfg.data, cfg.rm)


def trl_dataset(lists: list):
    """Every (better, worse) pair of every list, as the token ids ours trains on (TRL's tokenized format)."""
    from datasets import Dataset
    rows = [{"chosen_ids": lst.rows[b], "rejected_ids": lst.rows[w]} for lst in lists for b, w in lst.pairs]
    return Dataset.from_list(rows)


def trl_trainer(args: argparse.Namespace, ws: Workspace, cfg, train_lists: list, out: str):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer
    from rlhf.modeling import load_tokenizer
    conf = RewardConfig(
        output_dir=out, num_train_epochs=args.epochs, seed=args.seed, use_cpu=True, report_to="none",
        per_device_train_batch_size=args.micro_lists * PAIRS,
        gradient_accumulation_steps=args.lists_per_step // args.micro_lists,
        learning_rate=args.lr, warmup_steps=args.warmup, lr_scheduler_type="constant_with_warmup",
        adam_beta2=cfg.optim.betas[1], weight_decay=cfg.optim.weight_decay, max_grad_norm=cfg.optim.grad_clip,
        max_length=cfg.data.max_length, save_strategy="no", eval_strategy="no", logging_steps=1000,
        disable_tqdm=True, dataloader_pin_memory=False, center_rewards_coefficient=None,
        bf16=False, gradient_checkpointing=False)  # as ours: float32, no recomputation
    tokenizer = load_tokenizer(ws.models["llama"])
    model = AutoModelForSequenceClassification.from_pretrained(ws.models["llama"], num_labels=1)
    return RewardTrainer(model=model, args=conf, train_dataset=trl_dataset(train_lists), processing_class=tokenizer)


def held_out_accuracy(model, lists: list, pad_id: int, batch: int = 16) -> float:
    """Pairwise accuracy of a sequence-classification model on the same held-out pairs ours is scored on."""
    import torch
    from reward.batches import collate_ranked
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for i in range(0, len(lists), batch):
            mb = collate_ranked(lists[i:i + batch], pad_id)
            scores = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits.squeeze(-1)
            diff = scores[mb["pairs"][:, 0]] - scores[mb["pairs"][:, 1]]
            correct += int((diff > 0).sum())
            total += len(diff)
    return correct / max(1, total)


def run_trl(args: argparse.Namespace, ws: Workspace, rep: int) -> dict:
    cfg = rm_config(args, ws)
    with Stopwatch() as wall:
        train = encoded_lists(ws.data["ranked4_train"], ws, cfg)
        held_out = encoded_lists(ws.data["ranked4_eval"], ws, cfg)
        trainer = trl_trainer(args, ws, cfg, train, f"{ws.root}/trl-{rep}")
        with Stopwatch() as loop:
            trainer.train()
        accuracy = held_out_accuracy(trainer.model, held_out, trainer.processing_class.pad_token_id)
        trainer.save_model(f"{ws.root}/trl-{rep}/final")
    pairs = len(trainer.train_dataset) * args.epochs
    return {"pairs_per_s": pairs / loop.seconds, "train_s": loop.seconds, "wall_s": wall.seconds,
            "accuracy": accuracy, "pairs": pairs, "sequences_per_step": args.lists_per_step * PAIRS * 2}


def report(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    ours, theirs = medians(runs["ours"], FIGURES), medians(runs["trl"], FIGURES)
    ratio = {k: ours[k] / theirs[k] for k in ("pairs_per_s", "train_s", "wall_s")}
    gap = abs(ours["accuracy"] - theirs["accuracy"])
    rows = [[f"pairs/s, training loop (median of {args.reps})", ours["pairs_per_s"], theirs["pairs_per_s"],
             ratio["pairs_per_s"]],
            ["training loop, s", ours["train_s"], theirs["train_s"], ratio["train_s"]],
            ["end to end, s (start, train, eval, save)", ours["wall_s"], theirs["wall_s"], ratio["wall_s"]],
            ["sequences encoded per step", int(ours["sequences_per_step"]), int(theirs["sequences_per_step"]),
             ours["sequences_per_step"] / theirs["sequences_per_step"]],
            ["held-out pairwise accuracy", ours["accuracy"], theirs["accuracy"], ours["accuracy"] - theirs["accuracy"]]]
    text = table(["reward model, K = 4 lists", "ours", "TRL RewardTrainer", "ratio (ours/TRL; accuracy: diff)"], rows)
    met = ratio["pairs_per_s"] >= GOAL and gap <= ACCURACY_TOLERANCE
    text += (f"\n\ntarget: pairs/s >= {GOAL}x TRL at equal accuracy (|diff| <= {ACCURACY_TOLERANCE}): "
             f"{'met' if met else 'NOT met'} ({ratio['pairs_per_s']:.2f}x, accuracy diff {gap:.3f})")
    write_record("rm_vs_trl", args, {"runs": runs, "medians": {"ours": ours, "trl": theirs}, "ratio": ratio,
                                     "target": target("pairs_per_s ratio at equal accuracy", ratio["pairs_per_s"],
                                                       f">= {GOAL}, accuracy within {ACCURACY_TOLERANCE}", met)}, text)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], reps=3)
    p.add_argument("--lists", type=int, default=256, help="K = 4 training lists (6 pairs each)")
    p.add_argument("--eval-lists", type=int, default=64, help="held-out K = 4 lists")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lists-per-step", type=int, default=16, help="lists per optimizer step (x 6 pairs)")
    p.add_argument("--micro-lists", type=int, default=4, help="lists per forward pass (ours); x 6 pairs for TRL")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ranks", type=int, default=1, help="our ranks (1 CPU each); TRL gets as many torch threads")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.lists, args.eval_lists, args.epochs = 1, 64, 16, 1
    set_threads(args.ranks)
    with workspace(args, ["llama"], n_lists=(args.lists, args.eval_lists), seed=args.seed) as ws, \
            local_ray(num_cpus=max(2, args.ranks)):
        runs = alternate({"ours": lambda rep: run_ours(args, ws, rep), "trl": lambda rep: run_trl(args, ws, rep)},
                         args.reps)
    report(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
