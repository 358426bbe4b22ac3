"""Role groups on real Ray with real DeepSpeed ranks: replicas stay identical, ZeRO stages agree, the gradient is
the global batch's whatever the split, and placement follows the strategy."""
from __future__ import annotations

import pytest
import ray
import torch

from actors.group import RoleGroup
from actors.worker import LMWorker
from rlhf.batching import collate_sft
from rlhf.config import load_config, to_dict
from rlhf.data import load_dialogues
from rlhf.modeling import load_tokenizer
from rlhf.moss import tokenize_dialogue

pytestmark = pytest.mark.slow


def _batch(tiny, n=16):
    tok = load_tokenizer(tiny["tokenizer"])
    dialogues = load_dialogues(tiny["sft_train"])[:n]
    return collate_sft([tokenize_dialogue(d, tok, 128) for d in dialogues], tok.pad_token_id)


def _group(tiny, ranks: int, zero: int, micro: int, global_batch: int = 16, lr: float = 1e-3) -> RoleGroup:
    cfg = load_config(None, [f"layout.gpus_per_node={ranks}", "layout.cpus_per_rank=1", f"deepspeed.zero_stage={zero}",
                             f"train.micro_batch_size={micro}", f"train.global_batch_size={global_batch}",
                             f"optim.lr={lr}"])
    conf = to_dict(cfg)
    group = RoleGroup("sft", LMWorker, cfg.layout, {"config": conf})
    accum = global_batch // (micro * ranks)
    group.run("setup", tiny["base"], True, conf["deepspeed"], conf["optim"], conf["lora"], micro, accum, 100)
    return group


def _train(group, batch, steps: int) -> list[float]:
    tokens = int(batch["loss_mask"][:, 1:].sum())
    ref = ray.put(batch)
    losses = []
    for _ in range(steps):
        out = group.run("sft_step", ref, tokens)
        losses.append(float(out["loss_sum"].sum()) / tokens)
    return losses


def test_two_ranks_learn_and_stay_identical(tiny, local_ray):
    batch = _batch(tiny)
    group = _group(tiny, ranks=2, zero=2, micro=4)
    try:
        losses = _train(group, batch, 6)
        digests = ray.get(group.call("weights_digest"))
        nodes = group.node_info()
    finally:
        group.shutdown()
    assert losses[-1] < losses[0] - 0.3, losses
    assert digests[0] == pytest.approx(digests[1], rel=0, abs=1e-9)
    assert len({n["pid"] for n in nodes}) == 2


def test_zero_stages_give_the_same_loss_curve(tiny, local_ray):
    batch = _batch(tiny)
    curves = {}
    for zero in (0, 3):
        group = _group(tiny, ranks=2, zero=zero, micro=4)
        try:
            curves[zero] = _train(group, batch, 4)
        finally:
            group.shutdown()
    assert curves[0] == pytest.approx(curves[3], rel=2e-3), curves


def test_gradient_is_the_global_batch_mean_whatever_the_split(tiny, local_ray):
    """The same 16 dialogues give the same gradient on 1 rank x 4 micro-batches and 2 ranks x 1 micro-batch."""
    batch = _batch(tiny)
    norms = []
    for ranks, micro in ((1, 4), (2, 8)):
        group = _group(tiny, ranks=ranks, zero=0, micro=micro)
        try:
            tokens = int(batch["loss_mask"][:, 1:].sum())
            out = group.run("sft_step", ray.put(batch), tokens)
            norms.append(float(out["grad_norm"][0]))
        finally:
            group.shutdown()
    assert norms[0] == pytest.approx(norms[1], rel=1e-4), norms
