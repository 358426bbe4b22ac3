"""Checks that need a CUDA GPU (marked `gpu`; skipped without one, so never in CI): `tests/gpu_checks.sh` runs them
on a machine with one GPU in a few minutes. The vLLM engine on CUDA: vLLM's CUDA build, the weight sync over NCCL from
the policy's rank 0, sleep level 2 while a colocated trainer trains, and a short PPO run on it."""
from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from test_vllm_engine import _config, _gap, _prompts, _update_and_sync

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ON_ONE_GPU = ["model.dtype=float32", "roles.policy.layout.gpu_fraction=0.4", "roles.rollout.layout.gpu_fraction=0.4",
              "roles.rollout.layout.colocate_with=policy", "roles.rollout.vllm.gpu_memory_utilization=0.3"]


def test_vllm_on_cuda_syncs_over_nccl_and_sleeps(tiny, tmp_path, local_ray):
    from actors.group import RayBackend
    from rlhf.drivers.ppo import start_roles
    from rlhf.modeling import init_model, load_tokenizer
    init_model("llama", "tiny32", tiny["tokenizer"], str(tmp_path / "llama"), seed=0)
    cfg = _config(str(tmp_path / "llama"), "ppo.off_policy_steps=0", *ON_ONE_GPU)
    roles, groups = start_roles(cfg, RayBackend(cfg.ray, "ppo"))
    try:
        assert all(info["cuda"] for infos in roles.placement().values() for info in infos)
        prompts = _prompts(tiny, load_tokenizer(str(tmp_path / "llama")))
        gap, _, exp = _gap(roles, prompts, cfg.generation)
        assert gap < 1e-3, gap  # float32 on CUDA: the two engines' kernels differ in summation order only
        _update_and_sync(roles, exp, 1)  # NCCL broadcast from the policy's rank 0
        gap, out, _ = _gap(roles, prompts, cfg.generation)
        assert gap < 1e-3 and out["version"].tolist() == [1] * 12
        roles.rollout.sleep().result()  # vLLM sleep level 2: weights and KV cache freed
        roles.rollout.wake().result()
        roles.sync.push(2)
        gap, out, _ = _gap(roles, prompts, cfg.generation)
        assert gap < 1e-3 and out["version"].tolist() == [2] * 12
    finally:
        groups.stop()


def test_ppo_on_the_vllm_engine_on_cuda(tiny, sft_run, rm_run, tmp_path):
    """The tiny CodeGen policy has heads of 16, which vLLM's CUDA backends serve too (the CPU one does not)."""
    assert run_cli("ppo", "--config", "configs/tiny/ppo_overlap.yaml", "--policy", f"{sft_run}/final", "--reward",
                   f"{rm_run}/final", "--prompts", tiny["prompts_train"], "--output", tmp_path / "ppo",
                   "--set", "ppo.iterations=3", "--set", "roles.rollout.engine=vllm", "--set", "data.eval=",
                   "--set", "logging.progress=false", "--set", "roles.rollout.vllm.gpu_memory_utilization=0.2",
                   *[a for role in ("policy", "reference", "reward", "critic", "rollout")
                     for a in ("--set", f"roles.{role}.layout.gpu_fraction=0.19")]) == 0
