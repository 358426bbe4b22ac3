"""Shared fixtures: the bundled sample, an offline tokenizer and a tiny CodeGen model, built once per session,
and a local Ray that a test module starts and shuts down itself."""
from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Sample data, tokenizer and a random tiny CodeGen model (moss-moon-003's architecture)."""
    from rlhf.modeling import init_model
    from rlhf.sample import write_sample
    from rlhf.tokenizer import texts_from_files, train_tokenizer
    root = tmp_path_factory.mktemp("tiny")
    paths = write_sample(str(root / "data"), seed=0)
    train_tokenizer(texts_from_files([paths["sft_train"], paths["prefs_train"], paths["plugin_sft"]]), 800,
                    str(root / "tok"))
    init_model("codegen", "tiny", str(root / "tok"), str(root / "base"), seed=0)
    return {"root": str(root), "tokenizer": str(root / "tok"), "base": str(root / "base"), **paths}


@contextlib.contextmanager
def simulated_cluster(nodes: int, cpus: int, gpus: int):
    """`nodes` Ray nodes on this machine, each declaring GPUs that have no CUDA behind them."""
    import ray
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "num_gpus": gpus})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus, num_gpus=gpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def local_ray():
    import ray
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, namespace="tests",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def run_cli(*argv: str) -> int:
    from rlhf.cli import main
    return main([str(a) for a in argv])


@pytest.fixture(scope="session")
def sft_run(tiny) -> str:
    """`rlhf sft` on the sample (two CPU ranks, ZeRO-2), run once for every test that needs an SFT policy."""
    out = f"{tiny['root']}/sft"
    assert run_cli("sft", "--config", "configs/tiny/sft.yaml", "--model", tiny["base"], "--data", tiny["sft_train"],
                   "--set", f"data.eval={tiny['sft_eval']}", "--set", "logging.progress=false", "--output", out) == 0
    return out


@pytest.fixture(scope="session")
def rm_run(tiny, sft_run) -> str:
    """`rlhf rm` from the SFT model on the sample's ranked lists, run once."""
    out = f"{tiny['root']}/rm"
    assert run_cli("rm", "--config", "configs/tiny/rm.yaml", "--model", f"{sft_run}/final", "--data",
                   tiny["prefs_train"], "--set", f"data.eval={tiny['prefs_eval']}", "--set", "logging.progress=false",
                   "--output", out) == 0
    return out
