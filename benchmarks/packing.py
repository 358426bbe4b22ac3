"""Packed, padding-free micro-batches against padded ones: SFT and preference-model training steps on a long-tailed
mix of reply lengths (most replies short, a few long), tokens per second on each side.

Both sides are the real trainers (`actors.lm.SFTWorker.train_step`, `actors.scalar.RMWorker.train_step`, one
DeepSpeed rank in this process, one torch thread) on the same global batches in the same order. Padded is today's
default: `micro_batch_size` records a forward pass, padded to the longest in it (the preference model's lists sorted
by length first). Packed is `max_tokens_per_micro_batch`: records packed end to end without padding, up to as many
tokens as the padded side's largest micro-batch could hold (micro_batch_size x data.max_length), so both are bounded
by the same memory. The long tail: each reply is repeated 8-16 times with probability --long-share.

    python benchmarks/packing.py [--reps 3] [--steps 6] [--long-share 0.1] [--arch codegen --preset small] [--quick]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (ROOT, Stopwatch, Workspace, alternate, medians, parser, set_threads,  # noqa: E402
                               table, target, workspace, write_record)
from rlhf.roles import RankingStep  # noqa: E402

GOAL = 1.5  # packed tokens/s over padded, for each trainer
FIGURES = ("tokens_per_s", "step_s", "positions_per_token")


def long_tailed(records: list, rng: random.Random, share: float, responses: bool) -> list:
    """The records with each reply, with probability `share`, repeated 8-16 times (a few long replies)."""
    def stretch(text: str) -> str:
        return " ".join([text] * rng.randint(8, 16)) if rng.random() < share else text
    out = []
    for rec in records:
        rec = dict(rec)
        if responses:
            rec["responses"] = [stretch(r) for r in rec["responses"]]
        else:
            rec["turns"] = [dict(t, moss=stretch(t["moss"])) for t in rec["turns"]]
        out.append(rec)
    return out


def write_data(ws: Workspace, args: argparse.Namespace) -> dict[str, str]:
    import json
    rng = random.Random(args.seed)
    paths = {}
    for name, source, responses in (("sft", ws.data["sft_train"], False), ("rm", ws.data["ranked4_train"], True)):
        with open(source, encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        paths[name] = f"{ws.root}/data/{name}_long_tail.jsonl"
        with open(paths[name], "w", encoding="utf-8") as f:
            for rec in long_tailed(records, rng, args.long_share, responses):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return paths


class Side:
    """One trainer (SFT or RM) with or without packing, on one rank in this process, and the step batches."""

    def __init__(self, kind: str, args: argparse.Namespace, ws: Workspace, model: str, data: str, budget: int):
        from actors.lm import SFTWorker
        from actors.local import LocalGroup
        from actors.rank import RankSpec
        from actors.scalar import RMWorker
        from rlhf.config import load_config
        from rlhf.modeling import load_tokenizer
        cfg = load_config(kind, str(ROOT / f"configs/tiny/{kind}.yaml"), [
            f"seed={args.seed}", f"data.max_length={args.max_length}", f"train.global_batch_size={args.batch}",
            f"train.micro_batch_size={args.micro}", f"train.max_tokens_per_micro_batch={budget}",
            "layout.gpus_per_node=1", "layout.cpus_per_rank=1", "optim.lr=1e-4", "optim.warmup_steps=0"])
        tokenizer = load_tokenizer(model)
        if kind == "sft":
            from rlhf.data import encode_dialogues
            records = encode_dialogues(data, tokenizer, cfg.data)
        else:
            from reward.batches import encode_file
            records = encode_file(data, tokenizer, cfg.data, cfg.rm)
        rng = random.Random(args.seed)
        self.batches = [rng.sample(records, args.batch) for _ in range(args.steps)]
        self.kind, self.pad_id, self.micro, self.budget = kind, tokenizer.pad_token_id, args.micro, budget
        worker = SFTWorker if kind == "sft" else RMWorker
        self.group = LocalGroup(kind, worker, RankSpec(model, cfg.role(), cfg.model, cfg.seed, trainable=True,
                                                       grad_accum=args.batch // args.micro, total_steps=1000))
        self.group.start()

    def step(self, records: list) -> tuple[int, int]:
        """One optimizer step; returns (real tokens, positions its micro-batches computed, padding included)."""
        import torch
        from reward.batches import collate_ranked, micro_batches_of
        from rlhf.batching import Packing, collate_sft, fill_bins, micro_batches, select, trim_padding
        if self.kind == "sft":
            batch = collate_sft(records, self.pad_id)
            self.group.call("train_step", batch, int(batch["loss_mask"][:, 1:].sum())).result()
            if self.budget:
                groups = fill_bins(batch["attention_mask"].sum(1).tolist(), self.budget)
                masks = [select(batch, torch.tensor(g))["attention_mask"] for g in groups]
            else:
                masks = [trim_padding(mb)["attention_mask"] for mb in micro_batches(batch, self.micro)]
        else:
            best = sum(sum(lst.reply_masks[0][1:]) for lst in records)
            self.group.call("train_step", records, RankingStep(len(records), 0.0, 0.0, best)).result()
            if self.budget:
                groups = fill_bins([sum(map(len, lst.rows)) for lst in records], self.budget)
                masks = [collate_ranked([records[i] for i in g], self.pad_id)["attention_mask"] for g in groups]
            else:
                masks = [mb["attention_mask"] for mb in micro_batches_of(records, self.micro, self.pad_id)]
        packs = [Packing(m) for m in masks] if self.budget else []
        shapes = [(pk.rows, pk.width) for pk in packs] or [m.shape for m in masks]
        return sum(int(m.sum()) for m in masks), sum(r * c for r, c in shapes)

    def run(self, rep: int) -> dict:
        tokens = positions = 0
        with Stopwatch() as sw:
            for records in self.batches:
                t, p = self.step(records)
                tokens, positions = tokens + t, positions + p
        return {"tokens_per_s": tokens / sw.seconds, "step_s": sw.seconds / len(self.batches),
                "positions_per_token": positions / tokens}


def report(args: argparse.Namespace, runs: dict[str, list[dict]], budget: int) -> None:
    med = {name: medians(r, FIGURES) for name, r in runs.items()}
    ratio = {kind: med[f"{kind} packed"]["tokens_per_s"] / med[f"{kind} padded"]["tokens_per_s"]
             for kind in ("sft", "rm")}
    rows = []
    for kind, label in (("sft", "SFT"), ("rm", "preference model (K = 4 lists)")):
        padded, packed = med[f"{kind} padded"], med[f"{kind} packed"]
        rows += [[f"{label}: tokens/s (median of {args.reps})", padded["tokens_per_s"], packed["tokens_per_s"],
                  ratio[kind]],
                 [f"{label}: s per step", padded["step_s"], packed["step_s"], packed["step_s"] / padded["step_s"]],
                 [f"{label}: positions computed per real token", padded["positions_per_token"],
                  packed["positions_per_token"], packed["positions_per_token"] / padded["positions_per_token"]]]
    text = table(["long-tailed lengths", f"padded ({args.micro} records)", f"packed ({budget} tokens)",
                  "packed/padded"], rows)
    worst = min(ratio.values())
    met = worst >= GOAL
    text += (f"\n\ntarget: packed tokens/s >= {GOAL}x padded for SFT and RM: {'met' if met else 'NOT met'} "
             f"(SFT {ratio['sft']:.2f}x, RM {ratio['rm']:.2f}x)")
    write_record("packing", args, {"runs": runs, "medians": med, "ratio": ratio, "max_tokens_per_micro_batch": budget,
                                   "target": target("packed/padded tokens/s (the lower of SFT, RM)", worst,
                                                    f">= {GOAL}", met)}, text)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], reps=3)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per side and repetition")
    p.add_argument("--batch", type=int, default=32, help="records (dialogues, ranked lists) per optimizer step")
    p.add_argument("--micro", type=int, default=8, help="records per padded micro-batch")
    p.add_argument("--max-length", type=int, default=512, help="data.max_length (tokens per record's sequence)")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="packed side's max_tokens_per_micro_batch (default: micro x max-length)")
    p.add_argument("--long-share", type=float, default=0.1, help="share of the replies made 8-16 times longer")
    p.add_argument("--arch", default="codegen")
    p.add_argument("--preset", default="small")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.steps, args.batch, args.micro, args.preset = 1, 2, 16, 4, "tiny"
    budget = args.max_tokens or args.micro * args.max_length
    set_threads(1)
    with workspace(args, [], seed=args.seed) as ws:
        from rlhf.modeling import init_model
        model = init_model(args.arch, args.preset, ws.tokenizer, f"{ws.root}/{args.arch}-{args.preset}", args.seed)
        data = write_data(ws, args)
        sides = {f"{kind} {name}": Side(kind, args, ws, model, data[kind], b)
                 for kind in ("sft", "rm") for name, b in (("padded", 0), ("packed", budget))}
        runs = alternate({name: side.run for name, side in sides.items()}, args.reps)
    report(args, runs, budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
