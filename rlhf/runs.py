"""What every training command shares: its output directory, checkpoints and resume, and the role group it trains.

A run's output holds final/, metrics.jsonl, tensorboard/, checkpoints/ and the resolved config.yaml (DESIGN.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from rlhf.checkpoint import CheckpointManager, read_meta
from rlhf.config import Config, save_config
from rlhf.metrics import MetricsLogger


@dataclass
class RunDir:
    root: str
    metrics: MetricsLogger
    checkpoints: CheckpointManager
    resume_from: Optional[str]

    @property
    def final(self) -> str:
        return os.path.join(self.root, "final")


def open_run(output: str, cfg: Config, resume: bool) -> RunDir:
    """Create (or reopen, with --resume) an output directory and write the resolved config into it."""
    os.makedirs(output, exist_ok=True)
    checkpoints = CheckpointManager(os.path.join(output, "checkpoints"), keep=cfg.train.keep_checkpoints)
    latest = checkpoints.latest() if resume else None
    if not resume and checkpoints.latest():
        raise SystemExit(f"{output}: holds checkpoints of an earlier run; pass --resume to continue it "
                         "or choose another --output")
    save_config(cfg, os.path.join(output, "config.yaml"))
    metrics = MetricsLogger(output, tensorboard=cfg.logging.tensorboard, resume=latest is not None)
    if latest:
        metrics.truncate_after(int(read_meta(latest)["step"]))
    return RunDir(output, metrics, checkpoints, latest)


def save_checkpoint(run: RunDir, group_calls: list[tuple[Any, dict]], step: int, meta: dict) -> str:
    """Every group writes its engine state into one temp dir; the dir becomes a checkpoint only when all are done."""
    import ray
    tmp = run.checkpoints.begin(step)
    refs = []
    for group, client_state in group_calls:
        refs += group.call("save_checkpoint", tmp, client_state)
    ray.get(refs)
    return run.checkpoints.commit(step, tmp, {**meta, "step": step})


def permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a function of (seed, epoch) alone, so a resumed run sees the same order."""
    import random
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
