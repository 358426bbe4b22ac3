"""Starting or joining Ray for a run, and what a run's layout needs from it (also after a node of it was lost)."""
from __future__ import annotations

import json
import logging
import os

import ray

from actors import faults
from actors.placement import cluster_nodes, show, total
from rlhf import storage
from rlhf.config import RayConfig


def ensure_ray(cfg: RayConfig, cpus_needed: float) -> bool:
    """Join cfg.address, or start a local Ray sized for the layout; returns True when this call started it."""
    if ray.is_initialized():
        return False
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}}
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")  # set by `ray job submit` and cluster launchers
    if address:
        # Ranks on other nodes do not inherit this process's environment: give them the object-store settings of
        # an --output URI (a local Ray's workers inherit them). Those a submitted job already sets are its own.
        # The fault tests' hook too (actors/faults.py), so it reaches the job's actors, a sweep's trial controllers
        # among them (unset outside tests).
        env["env_vars"] |= {k: v for k, v in (storage.environment() | faults.runtime_env().get("env_vars", {})).items()
                            if k not in _job_env_vars()}
        ray.init(address=address, namespace=cfg.namespace, runtime_env=env, log_to_driver=True)
        return True
    # Logical CPUs, not cores: roles that mostly wait (reference, reward) may share a core on a small machine.
    num_cpus = cfg.num_cpus or max(os.cpu_count() or 1, int(cpus_needed + 0.999))
    # Ray turns token authentication on for a local cluster and says so on every start; a run's own Ray keeps it on,
    # and its users are spared the notice.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # address="local": a Ray of this run's own, never one that another process on this machine happens to run.
    ray.init(address="local", num_cpus=num_cpus, namespace=cfg.namespace, include_dashboard=cfg.include_dashboard,
             dashboard_host=cfg.dashboard_host, runtime_env=env, log_to_driver=True)
    return True


def _job_env_vars() -> set[str]:
    """The variables the submitted job's own runtime_env sets (`ray job submit --runtime-env-json`): Ray refuses a
    ray.init that sets one of them again."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "") or "{}")
        return set(((config.get("runtime_env") or {}).get("env_vars") or {}))
    except (ValueError, AttributeError):
        return set()


def short_of(held: list[tuple[list[dict], str]]) -> str:
    """What the cluster's live nodes lack of `held` in all, `1 GPU, 2 CPU` (empty when only the shape is wrong)."""
    needed, have = total([b for bundles, _ in held for b in bundles]), total(cluster_nodes())
    return show({k: v - have.get(k, 0.0) for k, v in needed.items() if v > have.get(k, 0.0) + 1e-9})
