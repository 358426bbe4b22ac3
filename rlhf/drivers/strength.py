"""`rlhf rm-strength`: each labelled pair's preference strength, measured by an ensemble of reward models on Ray
(Secrets of RLHF Part II), so that `rlhf rm` can flip, drop or down-weight the labels the ensemble distrusts.

`rm.ensemble.members` reward models train side by side, each `rlhf rm` as it is, run by a thread of this driver on
the one Ray it starts or joins: each member its own role group, placement group and output (`member-K/`), differing
by seed and, with `rm.ensemble.bootstrap`, by a resample of the ranked lists (encoded once for all of them). Once
trained, each member's group scores every pair of every list before it stops; `strength.jsonl` holds each pair's
mean and std of r_better - r_worse over the members, `strength.json` the summary and `strength.png` the histogram.
"""
from __future__ import annotations

import copy
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
import torch

from reward.batches import EncodedList, encode_file
from reward.strength import (Member, ensemble_members, pair_keys, pair_strength, record_lines, strength_rows,
                             summarize)
from rlhf.checkpoint import atomic_write_json
from rlhf.config import RMConfig, ranks, save_config
from rlhf.data import write_jsonl
from rlhf.drivers.rm import run_rm
from rlhf.modeling import check_model_dir, load_tokenizer
from rlhf.preemption import on_sigterm


def run_strength(cfg: RMConfig, output: str, resume: bool = False) -> dict:
    """Train the ensemble on `cfg.data.train`, score its pairs, write strength.jsonl; returns the summary."""
    check_model_dir(cfg.model.path, "--model")
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code)
    lists = encode_file(cfg.data.train, tokenizer, cfg.data, cfg.rm)
    keys = pair_keys(lists, record_lines(cfg.data.train, cfg.data.format))
    try:
        members = ensemble_members(cfg.rm.ensemble, cfg.seed, len(lists))
    except ValueError as err:
        raise SystemExit(str(err)) from None
    os.makedirs(output, exist_ok=True)
    save_config(cfg, os.path.join(output, "config.yaml"))

    began = time.time()
    with on_sigterm(cfg.ray.preempt_grace_s):  # every member's loop stops at its next step, checkpoint written
        results = train_members(cfg, members, lists, output, resume)
    diffs = torch.stack([scores for _, scores in results])  # [members, pairs]
    if diffs.shape[1] != len(keys):
        raise RuntimeError(f"the members scored {diffs.shape[1]} pairs of {cfg.data.train}, which has {len(keys)}")
    mean, std = pair_strength(diffs)
    write_jsonl(os.path.join(output, "strength.jsonl"), strength_rows(keys, mean.tolist(), std.tolist()))
    summary = summarize(mean.tolist(), std.tolist(), cfg.rm.flip_below) | {
        "data": os.path.abspath(cfg.data.train), "members": len(members), "bootstrap": cfg.rm.ensemble.bootstrap,
        # How often each member agrees with the labels: far below the others' means a member that did not learn.
        "member_agreement": [float((d > 0).double().mean()) for d in diffs],
        "member_seconds": [float(s["train_seconds"]) for s, _ in results], "seconds": time.time() - began}
    plot_strength(mean.tolist(), std.tolist(), cfg.rm.flip_below, os.path.join(output, "strength.png"),
                  f"{os.path.basename(cfg.data.train)}, {len(members)} reward models")
    atomic_write_json(os.path.join(output, "strength.json"), summary)
    return summary


def member_config(cfg: RMConfig, member: Member) -> RMConfig:
    """`rlhf rm`'s config for one member: its own seed; the labels as given (the ensemble measures them); no
    progress bar (the members train at once)."""
    mine = copy.deepcopy(cfg)
    mine.seed = member.seed
    mine.rm.preference_strength, mine.rm.weak_pairs = "", "keep"
    mine.logging.progress = False
    return mine


def train_members(cfg: RMConfig, members: list[Member], lists: list[EncodedList], output: str,
                  resume: bool) -> list[tuple[dict, torch.Tensor]]:
    """(run_rm's summary, [P] scores of every pair) of each member: side by side, one thread each, on one Ray; one
    after the other with `ray.in_process` (one process holds one torch.distributed group)."""
    def member(m: Member) -> tuple[dict, torch.Tensor]:
        # Placement groups are named after their role and a name is unique in a Ray namespace: each member has its own.
        summary = run_rm(member_config(cfg, m), os.path.join(output, f"member-{m.index}"), resume,
                         encoded=[lists[i] for i in m.lists], role=f"reward-{m.index}", score=lists)
        scores = summary.pop("pair_margins").double()
        print(f"rm-strength: member {m.index} (seed {m.seed}) trained in {summary['train_seconds']:.0f} s; agrees "
              f"with {float((scores > 0).double().mean()):.1%} of the labelled pairs", flush=True)
        return summary, scores

    if cfg.ray.in_process:
        return [member(m) for m in members]
    from actors.runtime import ensure_ray  # imports Ray: not for a run in this process
    # Ray starts (or is joined) here, once: each member's run finds it up and leaves it up.
    started = ensure_ray(cfg.ray, len(members) * ranks(cfg.layout) * cfg.layout.cpus_per_rank)
    pool = ThreadPoolExecutor(max_workers=len(members), thread_name_prefix="rm-strength-member")
    try:
        futures: list[Future] = [pool.submit(member, m) for m in members]
        wait(futures)
        return [f.result() for f in futures]  # the first member that failed says why
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if started:
            import ray
            ray.shutdown()


def plot_strength(means: list[float], stds: list[float], flip_below: float, path: str, title: str) -> None:
    """strength.png: the histogram of the pairs' mean strength (left of the line: the labels the ensemble
    contradicts) and each pair's std against its mean (how much the members agree about it)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe in any thread or headless node
    negative = sum(m < 0 for m in means)
    fig = Figure(figsize=(10, 4))
    hist, spread = fig.subplots(1, 2)
    hist.hist(means, bins=50, color="#4c72b0")
    hist.axvline(0.0, color="black", linewidth=1)
    if flip_below != 0.0:
        hist.axvline(flip_below, color="#c44e52", linestyle="--", linewidth=1, label=f"rm.flip_below = {flip_below:g}")
        hist.legend()
    hist.set_xlabel("mean preference strength: r(better) - r(worse), over the members")
    hist.set_ylabel("pairs")
    hist.set_title(f"{negative} of {len(means)} pairs ({negative / max(1, len(means)):.1%}) below 0")
    spread.scatter(means, stds, s=6, alpha=0.4, color="#4c72b0")
    spread.axvline(0.0, color="black", linewidth=1)
    spread.set_xlabel("mean preference strength")
    spread.set_ylabel("std over the members")
    spread.set_title("the members' disagreement")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
