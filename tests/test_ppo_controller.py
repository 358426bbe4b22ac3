"""The PPO controller's own decisions, without role groups: which prompts an iteration takes and in what order,
when an iteration is on-policy, and the SFT rows of the PPO-ptx loss."""
from __future__ import annotations

import pytest

from rlhf.config import load_config
from rlhf.drivers.ppo import PPOTrainer
from rlhf.estimators import kl_in_loss


def _trainer(tiny, *overrides: str, ptx=None) -> PPOTrainer:
    from rlhf.data import load_prompts
    from rlhf.modeling import load_tokenizer
    from rlhf.moss import tokenize_prompt
    cfg = load_config("ppo", "configs/tiny/ppo.yaml", list(overrides))
    tokenizer = load_tokenizer(tiny["tokenizer"])
    prompts = load_prompts(tiny["prompts_train"])
    ids = [tokenize_prompt(d, tokenizer, cfg.data.max_prompt_length) for d in prompts]
    return PPOTrainer(cfg, None, tokenizer, prompts, ids, ptx, None)


def test_an_iteration_takes_its_prompts_shortest_first_with_each_prompts_samples_together(tiny):
    trainer = _trainer(tiny, "ppo.samples_per_prompt=4", "ppo.prompts_per_iteration=8")
    rows = trainer.prompt_batch(3)
    assert len(rows) == 32
    groups = [rows[i:i + 4] for i in range(0, 32, 4)]
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 8
    lengths = [len(trainer.prompt_ids[g[0]]) for g in groups]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    assert trainer.prompt_batch(3) == rows  # the same on a resume
    assert set(trainer.prompt_batch(4)) != set(rows)


@pytest.mark.parametrize("overrides, on_policy", [
    (["ppo.estimator=grpo", "ppo.samples_per_prompt=4", "ppo.ppo_epochs=1", "ppo.train_batch_size=128"], True),
    (["ppo.estimator=rloo", "ppo.samples_per_prompt=2", "ppo.ppo_epochs=1", "ppo.train_batch_size=64"], True),
    (["ppo.estimator=grpo", "ppo.samples_per_prompt=4", "ppo.ppo_epochs=2", "ppo.train_batch_size=128"], False),
    (["ppo.estimator=grpo", "ppo.samples_per_prompt=4", "ppo.ppo_epochs=1", "ppo.train_batch_size=64"], False),
    (["ppo.estimator=gae", "ppo.ppo_epochs=1", "ppo.train_batch_size=32"], False),  # GAE's rewards need them first
    (["ppo.estimator=reinforce_pp", "ppo.ppo_epochs=1", "ppo.train_batch_size=32"], False),
])
def test_on_policy_only_when_one_update_sees_what_was_sampled_and_nothing_needs_log_probs_before(tiny, overrides,
                                                                                                 on_policy):
    trainer = _trainer(tiny, "ppo.prompts_per_iteration=32", *overrides)
    assert trainer.on_policy(len(trainer.prompt_batch(0))) is on_policy


def test_the_kl_penalty_is_a_loss_term_for_grpo_and_rloo_only():
    ppo = lambda *o: load_config("ppo", "configs/tiny/ppo.yaml", list(o)).ppo  # noqa: E731
    assert kl_in_loss(ppo("ppo.estimator=grpo", "ppo.samples_per_prompt=2"))
    assert kl_in_loss(ppo("ppo.estimator=rloo", "ppo.samples_per_prompt=2"))
    assert not kl_in_loss(ppo("ppo.estimator=grpo", "ppo.samples_per_prompt=2", "ppo.kl_coef=0"))
    assert not kl_in_loss(ppo("ppo.estimator=gae"))


def test_each_minibatch_step_gets_fresh_ptx_rows_the_same_on_a_resume(tiny):
    from rlhf.data import encode_dialogues
    from rlhf.modeling import load_tokenizer
    cfg = load_config("ppo", "configs/tiny/ppo.yaml", [f"data.ptx={tiny['sft_train']}", "ppo.ptx_coef=0.1"])
    ptx = encode_dialogues(cfg.data.ptx, load_tokenizer(tiny["tokenizer"]), cfg.data)
    trainer = _trainer(tiny, f"data.ptx={tiny['sft_train']}", "ppo.ptx_coef=0.1", ptx=ptx)
    batches = [trainer.ptx_batch(5, 8, step)[0]["input_ids"] for step in (0, 1, 0)]
    assert not batches[0].equal(batches[1]) and batches[0].equal(batches[2])
    assert not trainer.ptx_batch(6, 8, 0)[0]["input_ids"].equal(batches[0])


@pytest.mark.slow
def test_replies_cut_short_for_three_iterations_are_named_and_marked_for_the_report(tiny, sft_run, rm_run, tmp_path,
                                                                                      capsys):
    from conftest import run_cli
    from rlhf.metrics import read_metrics
    from rlhf.report import write_report
    out = tmp_path / "ppo"
    assert run_cli("ppo", "--config", "configs/tiny/ppo.yaml", "--policy", f"{sft_run}/final", "--reward",
                   f"{rm_run}/final", "--prompts", tiny["prompts_train"], "--output", out, "--set", "data.eval=",
                   "--set", "ppo.iterations=3", "--set", "ppo.prompts_per_iteration=8", "--set", "ppo.train_batch_size=8",
                   "--set", "generation.max_new_tokens=3", "--set", f"generation.lengths_from={tiny['sft_train']}",
                   "--set", "logging.progress=false", "--set", "ray.in_process=true") == 0
    printed = capsys.readouterr().out
    assert "generation.max_new_tokens=3 is below" in printed  # said at start-up ...
    assert "of the replies reached <eom> in each of the last 3 iterations" in printed  # ... and when it showed
    iters = [m for m in read_metrics(f"{out}/metrics.jsonl") if "ppo/reward_raw" in m]
    assert [m.get("ppo/cut_short") for m in iters] == [None, None, 1.0]
    report = write_report(str(tmp_path), rm_eval={"pairwise_accuracy": 0.9, "pairs": 10, "mean_margin": 1.0},
                          rules={"SFT": None, "PPO": None}, examples=[], ppo_metrics=f"{out}/metrics.jsonl",
                          sft_metrics=f"{sft_run}/metrics.jsonl")
    text = open(report, encoding="utf-8").read()
    assert text.index("reward_raw.png") < text.index("Replies cut short") < text.index("kl.png")


def test_an_update_stops_its_epochs_once_approx_kl_passes_the_bound(tiny):
    """A real policy in this process takes large steps (two minibatches an epoch, so the first epoch already sees
    its first step): with ppo.early_stop_kl below the first epoch's approx_kl
    the later epochs are skipped (and the weights move less); with it off, every epoch runs."""
    import torch
    from actors.lm import PolicyWorker
    from actors.local import LocalGroup
    from actors.rank import RankSpec
    from rlhf.batching import collate_prompts, experience
    from rlhf.roles import Policy, PPORoles, Reference

    def run(early_stop_kl: float) -> tuple[dict, torch.Tensor]:
        trainer = _trainer(tiny, "ppo.ppo_epochs=4", "ppo.train_batch_size=4", "ppo.prompts_per_iteration=8",
                           f"ppo.early_stop_kl={early_stop_kl}", "ppo.critic_warmup_iterations=0",
                           "roles.policy.optim.lr=0.05", "roles.policy.micro_batch_size=4",
                           "generation.max_new_tokens=12")
        cfg = trainer.cfg
        group = LocalGroup("policy", PolicyWorker, RankSpec(tiny["base"], cfg.roles.policy, cfg.model, cfg.seed,
                                                            trainable=True, total_steps=8))
        group.start()
        try:
            trainer.roles = PPORoles(Policy(group), Reference(group), None, None, {"policy": group})
            prompts = collate_prompts([trainer.prompt_ids[i] for i in range(8)], trainer.tokenizer.pad_token_id)
            torch.manual_seed(0)
            exp = experience(prompts, trainer.roles.policy.generate(prompts, cfg.generation).result())
            mask = exp["action_mask"].float()
            train = {**exp, "old_logprobs": trainer.roles.policy.logprobs(exp).result(),
                     "advantages": torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask}
            stats = trainer.update(0, train)
            return stats, trainer.roles.policy.logprobs(exp).result() - train["old_logprobs"]
        finally:
            group.shutdown()

    stopped, moved_stopped = run(1e-4)
    full, moved_full = run(0.0)
    assert stopped["ppo/policy_epochs"] == 1 and full["ppo/policy_epochs"] == 4
    assert stopped["ppo/approx_kl"] > 1e-4
    assert moved_stopped.abs().sum() < moved_full.abs().sum()
