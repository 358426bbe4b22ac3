"""The rollout group: generation-only ranks that follow the policy's weights through a sync group of their own.

On real Ray: a two-rank ZeRO-3 LoRA policy trains one step, pushes its weights (gathered bucket by bucket, adapters
merged) to the rollout rank, and the engine's weights then equal the trainer's exactly; its rollouts record the
version that sampled them; an engine put to sleep refuses to generate until it is woken and synced. The overlapped
PPO run that learns is in test_ppo.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import ConfigError, load_config


def _config(tiny, *extra):
    return load_config("ppo", "configs/tiny/ppo_overlap.yaml", [
        "ppo.estimator=grpo", "ppo.samples_per_prompt=2", "ppo.prompts_per_iteration=4", "ppo.train_batch_size=8",
        "ppo.reward_model_weight=0", "ppo.reward_rules.sample=1.0", "generation.max_new_tokens=8",
        "roles.policy.layout.gpus_per_node=2", "roles.policy.deepspeed.zero_stage=3", "roles.policy.lora.enabled=true",
        "roles.policy.lora.r=4", "roles.policy.micro_batch_size=4", "ppo.weight_sync_bucket_mb=0.05",
        f"model.path={tiny['sft']}", *extra])


@pytest.mark.slow
def test_a_sync_makes_the_engine_hold_the_trainers_merged_weights_exactly(tiny, sft_run, local_ray, tmp_path):
    from actors.group import RayBackend
    from rlhf.drivers.ppo import start_roles
    from rlhf.modeling import load_tokenizer
    from rlhf.batching import collate_prompts, experience
    from rlhf.data import load_prompts
    from rlhf.moss import tokenize_prompt
    from rlhf.roles import PolicyLoss, UpdatePlan
    tiny = {**tiny, "sft": f"{sft_run}/final"}
    cfg = _config(tiny)
    assert cfg.derive().roles == ("policy", "rollout")  # the LoRA policy is its own reference
    roles, groups = start_roles(cfg, RayBackend(cfg.ray, "ppo"))
    try:
        tok = load_tokenizer(tiny["sft"])
        ids = [tokenize_prompt(d, tok, 64) for d in load_prompts(tiny["prompts_train"])[:8]]
        prompts = collate_prompts(ids, tok.pad_token_id)
        rollout = roles.rollout.generate(prompts, cfg.generation).result()
        assert rollout["version"].tolist() == [0] * 8
        exp = experience(prompts, rollout)
        mask = exp["action_mask"].float()
        # The engine's own log-probs of what it sampled are the trainer's, before any update, up to float noise.
        trainer = roles.policy.logprobs(exp).result()
        assert ((trainer - rollout["logprobs"]).abs() * mask).max() < 1e-4

        step = {**exp, "advantages": torch.randn(mask.shape) * mask, "old_logprobs": trainer}
        roles.policy.update(UpdatePlan([step], [int(mask.sum())]), PolicyLoss(0.2)).result()
        roles.sync.push(1)
        assert roles.sync.version == 1
        roles.policy.save_pretrained(str(tmp_path / "merged"), True).result()
        trained = load_file(str(tmp_path / "merged" / "model.safetensors"))
        held = roles.rollout.group.call("weights").result()
        base = load_file(f"{tiny['sft']}/model.safetensors")
        assert set(held) <= set(trained)
        moved = 0
        for name, tensor in held.items():
            assert torch.equal(tensor, trained[name]), name  # exactly, in float32
            moved += not torch.equal(tensor, base[name])
        assert moved > 0  # the LoRA update reached the engine, merged into the base weights
        assert roles.rollout.generate(prompts, cfg.generation).result()["version"].tolist() == [1] * 8

        # Colocated, the engine drops its weights while the trainer trains; it generates again only once synced.
        roles.rollout.sleep().result()
        from actors.inference import EngineAsleep
        with pytest.raises(EngineAsleep):
            roles.rollout.generate(prompts, cfg.generation).result()
        roles.rollout.wake().result()
        roles.sync.push(2)
        again = roles.rollout.group.call("weights").result()
        assert all(torch.equal(again[n], held[n]) for n in held)
    finally:
        groups.stop()


@pytest.mark.parametrize("override, message", [
    (["ppo.rollout_group=false"], "ppo.off_policy_steps: 1 overlaps generation with training"),
    (["ppo.off_policy_steps=2"], "ppo.off_policy_steps: must be 0 or 1"),
    (["ppo.tis_cap=0.5"], "ppo.tis_cap"),
    (["ray.in_process=true"], "ppo.rollout_group: the rollout group's weight sync runs between Ray actors"),
])
def test_rollout_settings_that_cannot_work_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config("ppo", "configs/tiny/ppo_overlap.yaml", override)


def test_keys_a_role_config_no_longer_has_load_with_a_line_saying_why(tmp_path, capsys):
    """The rollout group has no trainer's keys and the frozen roles no optimizer or adapters: an older config that
    still carries them loads, each ignored key named once."""
    old = tmp_path / "old.yaml"
    old.write_text(Path("configs/tiny/ppo_overlap.yaml").read_text(encoding="utf-8").replace(
        "  rollout:\n", "  rollout:\n    micro_batch_size: 32\n    lora: {enabled: false}\n"))
    cfg = load_config("ppo", str(old), ["roles.reference.optim.lr=0.1", "roles.policy.model=elsewhere"])
    said = capsys.readouterr().err.splitlines()
    assert said == [f"{old}: roles.rollout.micro_batch_size: the inference engine batches its own requests; ignored",
                    f"{old}: roles.rollout.lora: the rollout group receives the policy's merged weights; ignored",
                    "--set roles.reference.optim.lr: the reference trains nothing; ignored",
                    "--set roles.policy.model: the policy starts from --policy (model.path); ignored"]
    assert not hasattr(cfg.roles.reference, "optim") and not hasattr(cfg.roles.rollout, "lora")
    assert cfg.roles.policy.optim.lr == load_config("ppo", "configs/tiny/ppo_overlap.yaml").roles.policy.optim.lr
