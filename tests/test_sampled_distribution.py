"""RL trains on the distribution it samples. At temperature 0.7, on real workers in this process: the rollout engine's
log-probs of what it sampled, the policy's scoring pass and its on-policy training pass (each padded and packed), and
the reference's pass give the same numbers; so before any update the KL to the reference is 0 on those tokens and the
PPO ratio is 1. The raw logits' log-probs differ from them: training on those would be off-policy by the gap."""
from __future__ import annotations

import pytest
import torch

from actors.local import LocalGroup
from actors.rank import RankSpec
from rlhf.batching import collate_prompts, experience
from rlhf.config import ConfigError, load_config
from rlhf.data import load_prompts
from rlhf.modeling import load_tokenizer
from rlhf.moss import tokenize_prompt
from rlhf.ppo_math import kl_estimate, masked_mean
from rlhf.roles import PolicyLoss, UpdatePlan

TEMPERATURE = 0.7
BUDGET = 160  # tokens: the packed passes take several micro-batches


def _group(worker_cls, model: str, temperature: float, trainable: bool = False, role: str = "policy") -> LocalGroup:
    cfg = load_config("ppo", "configs/tiny/ppo.yaml", ["roles.policy.optim.lr=0.0"])  # updates leave the weights
    spec = RankSpec(model, getattr(cfg.roles, role), cfg.model, cfg.seed, trainable=trainable, temperature=temperature)
    group = LocalGroup("test", worker_cls, spec)
    group.start()
    return group


@pytest.fixture(scope="module")
def rollout(tiny):
    """A rollout engine's replies at temperature 0.7 to a dozen prompts, as the scoring roles read them."""
    from actors.rollout import RolloutWorker
    tok = load_tokenizer(tiny["tokenizer"])
    prompts = collate_prompts([tokenize_prompt(d, tok, 64) for d in load_prompts(tiny["prompts_train"])[:12]],
                              tok.pad_token_id)
    engine = _group(RolloutWorker, tiny["base"], TEMPERATURE, role="rollout")
    gen = load_config("ppo", "configs/tiny/ppo.yaml", ["generation.max_new_tokens=16",
                                                       f"generation.temperature={TEMPERATURE}"]).generation
    try:
        out = engine.call("generate", prompts, gen).result()
    finally:
        engine.shutdown()
    return experience(prompts, out), out["logprobs"]


def test_engine_scoring_and_training_passes_agree_on_the_sampled_distribution(tiny, rollout):
    from actors.lm import PolicyWorker, ReferenceWorker
    exp, behaviour = rollout
    mask = exp["action_mask"].float()
    assert mask.sum() > 60  # enough sampled tokens to compare
    policy = _group(PolicyWorker, tiny["base"], TEMPERATURE, trainable=True)
    reference = _group(ReferenceWorker, tiny["base"], TEMPERATURE)
    raw = _group(ReferenceWorker, tiny["base"], 1.0)
    try:
        passes = {}
        for budget in (0, BUDGET):
            policy.worker.budget = reference.worker.budget = budget
            name = "packed" if budget else "padded"
            passes[f"policy scoring, {name}"] = policy.call("logprobs", exp).result()
            # With no old log-probs the update is on-policy: its own forward pass gives the ratio's denominator.
            train = {**exp, "advantages": torch.randn(mask.shape) * mask}
            update = policy.call("update", UpdatePlan([train], [int(mask.sum())]), PolicyLoss(0.2)).result()
            passes[f"policy training, {name}"] = update["logprobs"]
            passes[f"reference, {name}"] = reference.call("logprobs", exp).result()
        untempered = raw.call("logprobs", exp).result()
    finally:
        for group in (policy, reference, raw):
            group.shutdown()
    for name, logp in passes.items():
        gap = float(((logp - behaviour) * mask).abs().max())
        assert gap < 1e-4, f"{name}: {gap:.2g} from the engine's log-probs"
    # Iteration 0: the policy is its reference, so the KL on the sampled tokens is 0 (k1 and k3 alike).
    for estimator in ("k1", "k3"):
        kl = kl_estimate(passes["policy scoring, padded"], passes["reference, padded"], estimator, None)
        assert abs(float(masked_mean(kl, mask))) < 1e-5
    # The raw distribution is another one: its log-probs of the same tokens are off by far more than float noise.
    assert float(masked_mean((behaviour - untempered).abs(), mask)) > 0.05


@pytest.mark.parametrize("change", ["generation.top_p=0.8", "generation.top_k=20", "generation.repetition_penalty=1.02",
                                    "generation.do_sample=false"])
def test_rl_sampling_that_the_loss_does_not_score_is_one_line(change):
    with pytest.raises(ConfigError, match="RL samples from the distribution its loss scores"):
        load_config("ppo", "configs/tiny/ppo.yaml", [change])
    with pytest.raises(ConfigError, match="RL samples from the distribution its loss scores"):
        load_config("dpo", "configs/tiny/dpo.yaml", [change])


def test_rl_samples_plainly_and_chat_keeps_the_moss_defaults():
    rl = load_config("ppo", "configs/tiny/ppo.yaml").generation
    assert (rl.temperature, rl.top_p, rl.top_k, rl.repetition_penalty, rl.do_sample) == (1.0, 1.0, 0, 1.0, True)
    chat = load_config("generate").generation
    assert (chat.temperature, chat.top_p, chat.repetition_penalty) == (0.7, 0.8, 1.02)
    # A PPO config handed to rlhf generate keeps its own reply cap; its RL-only sections are not generate's.
    assert load_config("generate", "configs/tiny/ppo.yaml").generation.top_p == 0.8
