"""Packed, padding-free micro-batches (`max_tokens_per_micro_batch`): the same per-token numbers, losses and gradients
as padded micro-batches for SFT, the preference model, DPO and PPO's policy and critic, on real workers in this
process; and attention that never crosses from one packed sequence into another."""
from __future__ import annotations

import pytest
import torch

from actors.engine import Engine
from actors.local import LocalGroup
from actors.rank import RankSpec
from rlhf.batching import Packing, collate_prompts, collate_sft, fill_bins, pad
from rlhf.config import DPOLossConfig, load_config
from rlhf.data import load_dialogues
from rlhf.modeling import load_tokenizer
from rlhf.moss import tokenize_dialogue
from rlhf.roles import DPOStep, PolicyLoss, RankingStep, UpdatePlan, ValueLoss

BUDGET = 160  # tokens: several micro-batches of unequal row counts for every batch below


@pytest.fixture()
def gradients(monkeypatch):
    """Backward passes accumulate into .grad and never step, so one worker's padded and packed passes see the same
    weights and their whole-step gradients can be compared."""
    def backward_step(self, loss, real=True):
        if real:
            self.engine.backward(loss, scale_wrt_gas=False)  # one rank: DeepSpeed's averaging changes nothing
        return True
    monkeypatch.setattr(Engine, "backward_step", backward_step)

    def take(worker) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in worker.engine.module.named_parameters():
            if p.grad is not None:
                out[name] = p.grad.detach().clone()
                p.grad = None
        return out
    return take


def _worker(worker_cls, model: str, micro: int = 4, trainable: bool = True):
    cfg = load_config("sft", None, ["layout.cpus_per_rank=1", f"train.micro_batch_size={micro}",
                                    f"train.global_batch_size={4 * micro}", "optim.lr=1e-3"])
    group = LocalGroup("test", worker_cls, RankSpec(model, cfg.role(), cfg.model, cfg.seed, trainable=trainable))
    group.start()
    return group


def _both(group, method: str, *args, grads=None):
    """`method` padded, then packed, on the same worker: (padded result, packed result[, padded grads, packed])."""
    worker, out = group.worker, []
    for budget in (0, BUDGET):
        worker.budget = budget
        out.append(group.call(method, *args).result())
        if grads is not None:
            out.append(grads(worker))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), f"{what}: largest difference {(a - b).abs().max():.3g}"


def _same_grads(padded: dict, packed: dict) -> None:
    assert padded.keys() == packed.keys() and padded
    for name in padded:
        _close(padded[name], packed[name], name)


def _sft_batch(tiny, n: int = 12):
    tok = load_tokenizer(tiny["tokenizer"])
    return collate_sft([tokenize_dialogue(d, tok, 128) for d in load_dialogues(tiny["sft_train"])[:n]],
                       tok.pad_token_id)


def _experience(tiny, n: int = 10, reply: int = 12, seed: int = 0) -> dict:
    """PPO experience as the controller builds it: left-padded prompts of very different lengths, right-padded
    replies, advantages, the rollout's and reference's log-probs, the critic's values and returns."""
    tok = load_tokenizer(tiny["tokenizer"])
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    prompts = [torch.randint(5, 700, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    replies = [torch.randint(5, 700, (int(torch.randint(1, reply + 1, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    p = collate_prompts(prompts, tok.pad_token_id)
    response_mask = pad([[1] * len(r) for r in replies], 0, length=reply)
    action = response_mask.float()
    return {"sequences": torch.cat([p["input_ids"], pad(replies, tok.pad_token_id, length=reply)], 1),
            "attention_mask": torch.cat([p["attention_mask"], response_mask], 1),
            "response_ids": pad(replies, tok.pad_token_id, length=reply), "action_mask": action,
            "advantages": rand(n, reply) * action, "old_logprobs": (-6 + rand(n, reply)) * action,
            "ref_logprobs": (-6 + rand(n, reply)) * action, "old_values": rand(n, reply) * action,
            "returns": rand(n, reply) * action}


def _lists(tiny, n: int = 8):
    from reward.batches import encode_file
    cfg = load_config("rm")
    lists = encode_file(tiny["prefs_train"], load_tokenizer(tiny["tokenizer"]), cfg.data, cfg.rm)[:n]
    g = torch.Generator().manual_seed(1)
    for lst in lists:  # DPO reads the reference's log-probs from the lists
        lst.ref_logps = (-20 + torch.randn(len(lst.rows), generator=g)).tolist()
    return lists


# --- the layout ---------------------------------------------------------------------------------------------------

def test_fill_bins_keeps_every_item_once_and_within_the_budget():
    sizes = [5, 120, 30, 30, 7, 200, 64, 1, 90]
    bins = fill_bins(sizes, 128)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= 128 or len(b) == 1 for b in bins)
    assert bins == [[5], [1, 4, 7], [0, 2, 8], [3, 6]]  # 200 alone; 120+7+1, 90+30+5, 64+30: first fit, largest first


@pytest.mark.parametrize("arch", ["codegen", "llama"])
def test_packed_sequences_get_the_padded_outputs_and_never_see_each_other(arch):
    from transformers import AutoConfig, AutoModelForCausalLM
    from rlhf.modeling import PRESETS
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=50, **PRESETS[arch]["tiny"])).eval()
    rows = [torch.randint(1, 50, (n,)).tolist() for n in (5, 17, 3, 9, 12, 2)]
    ids, mask = pad(rows, 0, left=True), pad([[1] * len(r) for r in rows], 0, left=True)  # as PPO's prompts are
    padded = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits

    def packed_logits(ids: torch.Tensor) -> torch.Tensor:
        pk = Packing(mask)
        out = model(input_ids=pk.pack(ids), attention_mask=pk.attention_mask(torch.float32),
                    position_ids=pk.position_ids).logits
        flat, ok = pk.locate(torch.arange(ids.shape[1]).expand(len(rows), -1))
        return out.flatten(0, 1)[flat], ok

    pk = Packing(mask)
    assert pk.rows < len(rows) and pk.width == 17 and pk.tokens == sum(map(len, rows))
    logits, ok = packed_logits(ids)
    _close(logits[ok], padded[ok.bool()], f"{arch} logits")
    changed = ids.clone()
    changed[1][mask[1].bool()] = 7  # another sequence, perhaps in the same packed row: nothing else moves
    again, _ = packed_logits(changed)
    others = ok.clone()
    others[1] = False
    _close(again[others], logits[others], "the other sequences' logits")


# --- the trainers: the same losses and gradients ------------------------------------------------------------------

def test_sft_step_packed_equals_padded(tiny, gradients):
    from actors.lm import SFTWorker
    batch = _sft_batch(tiny)
    tokens = int(batch["loss_mask"][:, 1:].sum())
    group = _worker(SFTWorker, tiny["base"])
    padded, g_padded, packed, g_packed = _both(group, "train_step", batch, tokens, grads=gradients)
    assert packed["loss_sum"] == pytest.approx(padded["loss_sum"], rel=1e-5)
    _same_grads(g_padded, g_packed)
    padded, packed = _both(group, "evaluate", batch)
    _close(padded["loss_sum"], packed["loss_sum"], "held-out loss per row")
    assert torch.equal(padded["tokens"], packed["tokens"])


def test_preference_model_step_packed_equals_padded(tiny, gradients):
    from actors.scalar import RMWorker
    lists = _lists(tiny)
    best = sum(sum(lst.reply_masks[0][1:]) for lst in lists)
    group = _worker(RMWorker, tiny["base"], micro=2)
    padded, g_padded, packed, g_packed = _both(group, "train_step", lists, RankingStep(len(lists), 0.1, 0.5, best),
                                               grads=gradients)
    for key in ("loss", "correct", "pairs", "lm_loss", "encoded"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-5), key
    _close(padded["rewards"].sort().values, packed["rewards"].sort().values, "scores")
    _same_grads(g_padded, g_packed)
    padded, packed = _both(group, "evaluate", lists)
    _close(torch.cat(padded["rewards"]), torch.cat(packed["rewards"]), "held-out scores")


def test_dpo_step_packed_equals_padded(tiny, gradients):
    from actors.lm import DPOWorker
    lists = _lists(tiny)
    group = _worker(DPOWorker, tiny["base"], micro=2)
    loss = DPOLossConfig()
    padded, g_padded, packed, g_packed = _both(group, "train_step", lists,
                                               DPOStep(len(lists), loss.beta, loss.loss, loss.label_smoothing),
                                               grads=gradients)
    for key in ("loss", "correct", "pairs", "margin_sum", "better_logp_sum", "encoded"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-5), key
    _same_grads(g_padded, g_packed)
    padded, packed = _both(group, "reply_logprobs", lists)
    assert torch.tensor(sum(packed["logps"], [])) == pytest.approx(torch.tensor(sum(padded["logps"], [])), rel=1e-5)


@pytest.mark.parametrize("on_policy", [False, True])
def test_ppo_policy_update_packed_equals_padded(tiny, gradients, on_policy):
    """The clipped surrogate with dual clip, the entropy bonus, the k3 KL loss and PPO-ptx; on-policy, the update's
    own log-probs come back in the minibatch's row order."""
    from actors.lm import PolicyWorker
    exp = _experience(tiny)
    if on_policy:
        exp.pop("old_logprobs")
    ptx = _sft_batch(tiny, n=len(exp["sequences"]))
    plan = UpdatePlan([exp], [int(exp["action_mask"].sum())], [ptx], [int(ptx["loss_mask"][:, 1:].sum())])
    loss = PolicyLoss(0.2, entropy_coef=0.01, kl_coef=0.05, ptx_coef=0.5, dual_clip=3.0, log_ratio_clip=20.0,
                      kl_clip=10.0)
    group = _worker(PolicyWorker, tiny["base"], micro=5)
    padded, g_padded, packed, g_packed = _both(group, "update", plan, loss, grads=gradients)
    for key in ("pg_loss", "clipfrac", "approx_kl", "entropy", "kl_loss", "ptx_loss"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-7), key
    _same_grads(g_padded, g_packed)
    if on_policy:
        _close(padded["logprobs"] * exp["action_mask"], packed["logprobs"], "on-policy log-probs")
    padded, packed = _both(group, "logprobs", exp)
    _close(padded * exp["action_mask"], packed, "log-probs of the replies")


def test_critic_update_and_scores_packed_equal_padded(tiny, gradients):
    from actors.scalar import CriticWorker, RewardWorker
    exp = _experience(tiny, seed=3)
    plan = UpdatePlan([exp], [int(exp["action_mask"].sum())])
    group = _worker(CriticWorker, tiny["base"], micro=3)
    padded, g_padded, packed, g_packed = _both(group, "update", plan, ValueLoss(0.2), grads=gradients)
    assert packed["vf_loss"] == pytest.approx(padded["vf_loss"], rel=1e-5)
    assert packed["vf_clipfrac"] == pytest.approx(padded["vf_clipfrac"], rel=1e-5)
    _same_grads(g_padded, g_packed)
    padded, packed = _both(group, "values", exp)
    _close(padded * exp["action_mask"], packed * exp["action_mask"], "values")
    reward = _worker(RewardWorker, tiny["base"], trainable=False)
    padded, packed = _both(reward, "score", exp)
    _close(padded, packed, "rewards")


def test_a_budget_is_a_config_key_of_every_trainer_and_role():
    cfg = load_config("sft", None, ["train.max_tokens_per_micro_batch=4096"])
    assert cfg.role().max_tokens_per_micro_batch == 4096
    ppo = load_config("ppo", None, ["roles.critic.max_tokens_per_micro_batch=2048"])
    assert ppo.roles.critic.max_tokens_per_micro_batch == 2048 and ppo.roles.policy.max_tokens_per_micro_batch == 0
    from rlhf.config import ConfigError
    with pytest.raises(ConfigError, match="train.max_tokens_per_micro_batch"):
        load_config("rm", None, ["train.max_tokens_per_micro_batch=-1"])
