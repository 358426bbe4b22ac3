"""vLLM as the rollout engine (`roles.rollout.engine: vllm`), for real: vLLM's CPU build in a Ray actor.

- Its log-probs of what it sampled are the policy's own (the tempered distribution), before and after a weight sync
  of a LoRA policy; it stops at `<eom>`; rows of one prompt are one request of n samples; an engine asleep refuses to
  generate until it is woken and synced.
- CodeGen (moss-moon-003's architecture) is served as GPT-J, and its log-probs equal the CodeGen policy's.
- A plugin GRPO run on the vLLM engine, one step off-policy, with the rollout rank killed once while it generates and
  once while it receives weights: the run rebuilds it each time and finishes every iteration, with the engine's and
  the trainer's log-probs on its two-pass plugin rollouts close (`rollout/logprob_diff`).

The models are the `tiny32` presets (attention heads of 32, the smallest vLLM's CPU backend serves).
"""
from __future__ import annotations

import pytest
import torch

from conftest import built_once, run_cli
from rlhf.config import load_config
from rlhf.metrics import read_metrics

pytestmark = pytest.mark.slow

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def llama32(tiny, tmp_path_factory) -> str:
    """A tiny32 Llama taught the plugin dialogues of the sample (`rlhf sft`, in this process): it writes commands,
    stops at `<eoc>` and `<eom>`."""
    from rlhf.modeling import init_model

    def build(out) -> None:
        init_model("llama", "tiny32", tiny["tokenizer"], str(out / "base"), seed=0)
        assert run_cli("sft", "--config", "configs/tiny/plugin_sft.yaml", "--model", out / "base", "--data",
                       tiny["plugin_sft"], "--set", "train.epochs=6", "--set", "logging.progress=false",
                       "--set", "ray.in_process=true", "--set", "layout.cpus_per_rank=1",
                       "--set", "train.max_tokens_per_micro_batch=1536", "--output", out / "sft") == 0
    return f"{built_once(tmp_path_factory, 'llama32-plugin-sft', build)}/sft/final"


def _config(model: str, *extra: str):
    return load_config("ppo", "configs/tiny/ppo_overlap.yaml", [
        "ppo.estimator=grpo", "ppo.samples_per_prompt=2", "ppo.prompts_per_iteration=4", "ppo.train_batch_size=8",
        "ppo.reward_model_weight=0", "ppo.reward_rules.sample=1.0", "generation.max_new_tokens=24",
        f"generation.temperature={TEMPERATURE}", "roles.policy.lora.enabled=true", "roles.policy.lora.r=4",
        "roles.rollout.engine=vllm", "roles.rollout.vllm.enforce_eager=true", f"model.path={model}", *extra])


def _prompts(tiny, tok, plugin: bool = False, n: int = 6):
    from rlhf.batching import collate_prompts
    from rlhf.data import load_prompts
    from rlhf.moss import tokenize_prompt
    source = tiny["plugin_prompts"] if plugin else tiny["prompts_train"]
    ids = [tokenize_prompt(d, tok, 128, plugin) for d in load_prompts(source)[:n] for _ in range(2)]
    return collate_prompts(ids, tok.pad_token_id)


def _gap(roles, prompts, generation) -> tuple[float, dict, dict]:
    """The largest |engine - policy| log-prob over the reply tokens of one rollout, with the rollout."""
    from rlhf.batching import experience
    out = roles.rollout.generate(prompts, generation).result()
    exp = experience(prompts, out)
    mask = exp["action_mask"].float()
    trainer = roles.policy.logprobs(exp).result()
    return float(((trainer - out["logprobs"]).abs() * mask).max()), out, exp


def _update_and_sync(roles, exp, version: int) -> None:
    from rlhf.roles import PolicyLoss, UpdatePlan
    mask = exp["action_mask"].float()
    torch.manual_seed(version)
    step = {**exp, "advantages": torch.randn(mask.shape) * mask}
    roles.policy.update(UpdatePlan([step], [int(mask.sum())]), PolicyLoss(0.2)).result()
    roles.sync.push(version)


def test_vllm_samples_what_the_policy_scores_before_and_after_a_sync(tiny, llama32, local_ray):
    from actors.group import RayBackend
    from actors.inference import EngineAsleep
    from rlhf.drivers.ppo import start_roles
    from rlhf.modeling import load_tokenizer
    cfg = _config(llama32)
    roles, groups = start_roles(cfg, RayBackend(cfg.ray, "ppo"))
    try:
        tok = load_tokenizer(llama32)
        prompts = _prompts(tiny, tok)
        gap, out, exp = _gap(roles, prompts, cfg.generation)
        assert gap < 1e-4, gap
        assert out["version"].tolist() == [0] * 12
        assert out["ended"].sum() >= 3  # it stops at <eom>, and the stop token is the reply's last
        eom = tok.convert_tokens_to_ids("<eom>")
        lengths = exp["action_mask"].sum(1).long()
        for row in torch.nonzero(out["ended"]).flatten().tolist():
            assert out["response_ids"][row, lengths[row] - 1] == eom
        # Rows of one prompt are one request of n samples: they differ, as independent samples do.
        assert sum(not torch.equal(out["response_ids"][i], out["response_ids"][i + 1]) for i in range(0, 12, 2)) >= 4

        _update_and_sync(roles, exp, 1)  # LoRA merged into the synced weights
        gap, out, _ = _gap(roles, prompts, cfg.generation)
        assert gap < 1e-4, gap
        assert out["version"].tolist() == [1] * 12

        roles.rollout.sleep().result()
        with pytest.raises(EngineAsleep):
            roles.rollout.generate(prompts, cfg.generation).result()
        roles.rollout.wake().result()
        roles.sync.push(2)
        assert roles.rollout.generate(prompts, cfg.generation).result()["version"].tolist() == [2] * 12
    finally:
        groups.stop()


def test_codegen_is_served_as_gptj_with_the_codegen_policys_log_probs(tiny, tmp_path, local_ray):
    """moss-moon-003's architecture: vLLM has no CodeGen, so the engine serves GPT-J with CodeGen's weights mapped
    onto it (fused qkv split) at start-up and at every sync."""
    from actors.group import RayBackend
    from rlhf.drivers.ppo import start_roles
    from rlhf.modeling import init_model, load_tokenizer
    init_model("codegen", "tiny32", tiny["tokenizer"], str(tmp_path / "codegen"), seed=0)
    cfg = _config(str(tmp_path / "codegen"), "generation.max_new_tokens=12")
    roles, groups = start_roles(cfg, RayBackend(cfg.ray, "ppo"))
    try:
        prompts = _prompts(tiny, load_tokenizer(str(tmp_path / "codegen")), n=4)
        gap, _, exp = _gap(roles, prompts, cfg.generation)
        assert gap < 1e-4, gap
        _update_and_sync(roles, exp, 1)
        gap, out, _ = _gap(roles, prompts, cfg.generation)
        assert gap < 1e-4, gap
        assert out["version"].tolist() == [1] * 8
    finally:
        groups.stop()


def test_plugin_grpo_on_vllm_survives_a_rollout_rank_killed_while_generating_and_while_receiving(
        tiny, llama32, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ppo"
    generating, receiving = tmp_path / "killed-generating", tmp_path / "killed-receiving"
    # Counted per process: the first rank's 2nd generate (iteration 2's batch, ahead, while iteration 1 trains), then the
    # rebuilt rank's first weight sync.
    monkeypatch.setenv("RLHF_FAULT", f"rollout:generate:2:{generating},rollout:receive_weights:1:{receiving}")
    assert run_cli("ppo", "--config", "configs/tiny/plugin_ppo.yaml", "--policy", llama32, "--prompts",
                   tiny["plugin_prompts"], "--output", out, "--set", "ppo.iterations=2",
                   "--set", "ppo.prompts_per_iteration=4", "--set", "ppo.samples_per_prompt=2",
                   "--set", "ppo.train_batch_size=8", "--set", "generation.max_new_tokens=20",
                   "--set", "ppo.rollout_group=true",
                   "--set", "ppo.off_policy_steps=1", "--set", "roles.rollout.engine=vllm",
                   "--set", "roles.rollout.vllm.enforce_eager=true", "--set", "data.eval=",
                   "--set", "logging.progress=false", "--set", "train.save_every=1",
                   "--set", "roles.rollout.layout.cpus_per_rank=1",
                   # LoRA: the policy's base is its reference, so each restart rebuilds two groups, not three
                   "--set", "roles.policy.lora.enabled=true", "--set", "roles.policy.lora.r=8",
                   "--set", "roles.policy.optim.lr=3e-3") == 0
    assert generating.exists() and receiving.exists()  # the rank really died, twice
    printed = capsys.readouterr().out
    assert "rollout rank 0 died" in printed
    metrics = read_metrics(f"{out}/metrics.jsonl")
    iterations = [m for m in metrics if "ppo/reward_raw" in m]
    assert [m["step"] for m in iterations] == [1, 2]
    assert [m["ppo/restarts"] for m in metrics if "ppo/restarts" in m][-1] == 2
    # The engine's log-probs are the trainer's up to the one update it lags (and float noise on the first batch).
    assert all(m["rollout/logprob_diff"] < 0.05 for m in iterations), [m["rollout/logprob_diff"] for m in iterations]
    assert (out / "final" / "model.safetensors").exists()
