"""Starting or joining Ray for a run, and what a run's layout needs from it."""
from __future__ import annotations

import os

import ray

from rlhf.config import RayConfig


def ensure_ray(cfg: RayConfig, cpus_needed: float) -> bool:
    """Join cfg.address, or start a local Ray sized for the layout; returns True when this call started it."""
    if ray.is_initialized():
        return False
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}}
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")  # set by `ray job submit` and cluster launchers
    if address:
        ray.init(address=address, namespace=cfg.namespace, runtime_env=env, log_to_driver=True)
        return True
    # Logical CPUs, not cores: roles that mostly wait (reference, reward) may share a core on a small machine.
    num_cpus = cfg.num_cpus or max(os.cpu_count() or 1, int(cpus_needed + 0.999))
    # address="local": a Ray of this run's own, never one that another process on this machine happens to run.
    ray.init(address="local", num_cpus=num_cpus, namespace=cfg.namespace, include_dashboard=cfg.include_dashboard,
             dashboard_host=cfg.dashboard_host, runtime_env=env, log_to_driver=True)
    return True
