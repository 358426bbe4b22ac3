"""Role groups on real Ray with real DeepSpeed ranks: replicas stay identical, the gradient is the global batch's
whatever the split, and placement follows the strategy (ZeRO-3 against ZeRO-0: tests/test_zero3_init.py)."""
from __future__ import annotations

import pytest

from actors.group import RayBackend
from actors.local import LocalBackend
from actors.lm import SFTWorker
from actors.rank import RankSpec
from rlhf.batching import collate_sft
from rlhf.config import load_config
from rlhf.data import load_dialogues
from rlhf.modeling import load_tokenizer
from rlhf.moss import tokenize_dialogue

pytestmark = pytest.mark.slow


def _batch(tiny, n=16):
    tok = load_tokenizer(tiny["tokenizer"])
    dialogues = load_dialogues(tiny["sft_train"])[:n]
    return collate_sft([tokenize_dialogue(d, tok, 128) for d in dialogues], tok.pad_token_id)


class _Started:
    """One SFT role group on the test's Ray, stopped with `shutdown()`."""

    def __init__(self, groups):
        self.groups, self.group = groups, groups.groups["sft"]

    def call(self, method, *args):
        return self.group.call(method, *args).result()

    def node_info(self):
        return self.group.node_info()

    def shutdown(self):
        self.groups.stop()


def _group(tiny, ranks: int, zero: int, micro: int, global_batch: int = 16, lr: float = 1e-3) -> _Started:
    cfg = load_config("sft", None, [f"layout.gpus_per_node={ranks}", "layout.cpus_per_rank=1",
                                    f"deepspeed.zero_stage={zero}", f"train.micro_batch_size={micro}",
                                    f"train.global_batch_size={global_batch}", f"optim.lr={lr}"])
    spec = RankSpec(tiny["base"], cfg.role(), cfg.model, cfg.seed, trainable=True,
                    grad_accum=global_batch // (micro * ranks), total_steps=100)
    backend = RayBackend(cfg.ray) if ranks > 1 else LocalBackend()  # one rank: in this process, no rank to start
    return _Started(backend.start({"sft": (SFTWorker, spec)}))


def _train(group, batch, steps: int) -> list[float]:
    tokens = int(batch["loss_mask"][:, 1:].sum())
    losses = []
    for _ in range(steps):
        out = group.call("train_step", batch, tokens)
        losses.append(out["loss_sum"] / tokens)
    return losses


def test_two_ranks_learn_and_stay_identical(tiny, local_ray):
    batch = _batch(tiny)
    group = _group(tiny, ranks=2, zero=2, micro=4)
    try:
        losses = _train(group, batch, 6)
        digests = group.call("weights_digest")
        nodes = group.node_info()
    finally:
        group.shutdown()
    assert losses[-1] < losses[0] - 0.3, losses
    assert digests[0] == pytest.approx(digests[1], rel=0, abs=1e-9)
    assert len({n["pid"] for n in nodes}) == 2


def test_gradient_is_the_global_batch_mean_whatever_the_split(tiny, local_ray):
    """The same 16 dialogues give the same gradient on 1 rank x 4 micro-batches (in this process) and 2 ranks x 1
    micro-batch (on Ray)."""
    batch = _batch(tiny)
    norms = []
    for ranks, micro in ((1, 4), (2, 8)):
        group = _group(tiny, ranks=ranks, zero=0, micro=micro)
        try:
            tokens = int(batch["loss_mask"][:, 1:].sum())
            out = group.call("train_step", batch, tokens)
            norms.append(out["grad_norm"])
            if ranks == 1:  # this process's rank: its DeepSpeed backend compiled no shared-memory op (a CPU rank)
                from deepspeed.comm import comm
                assert comm.cdb is not None and comm.cdb.shm_comm_op is None
        finally:
            group.shutdown()
    assert norms[0] == pytest.approx(norms[1], rel=1e-4), norms
