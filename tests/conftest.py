"""Shared fixtures: the bundled sample, an offline tokenizer and a tiny CodeGen model, built once per session,
and one local Ray that the slow tests share."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


HEAVIEST_FIRST = (
    "test_ppo.py", "test_plugin_ppo.py",  # one first on each worker: they build sft_run + rm_run, and plugin_sft
    "test_storage.py", "test_strength.py", "test_vllm_engine.py", "test_sweep.py", "test_faults.py", "test_pipeline.py",
    "test_zero3_init.py", "test_ppo_resume.py", "test_faults_trainers.py", "test_ppo_layouts.py", "test_actor_groups.py",
    "test_dashboard.py", "test_bad_input.py", "test_lost_node.py", "test_placement.py", "test_reward_interop.py", "test_rollout.py",
    "test_process_rewards.py", "test_ppo_controller.py", "test_dpo.py", "test_prm.py", "test_ray_jobs.py")
"""`make test` hands whole files to its two workers (`--dist loadfile --no-loadscope-reorder`) in this order, the
longest first, so neither waits on the other's session fixture at the start nor runs a long file alone at the end."""


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(dir)` once per test session, also when pytest-xdist splits the session over worker processes: the
    first to ask builds it under a file lock, the others wait for it and use the same directory."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of one run
    root = base / name
    with FileLock(str(base / f".{name}.lock")):
        if not (root / ".built").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            build(root)
            (root / ".built").touch()
    return root


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Sample data, tokenizer and a random tiny CodeGen model (moss-moon-003's architecture)."""
    from rlhf.modeling import init_model
    from rlhf.sample import write_sample
    from rlhf.tokenizer import texts_from_files, train_tokenizer

    def build(root: Path) -> None:
        paths = write_sample(str(root / "data"), seed=0)
        train_tokenizer(texts_from_files([paths["sft_train"], paths["prefs_train"], paths["plugin_sft"]]), 800,
                        str(root / "tok"))
        init_model("codegen", "tiny", str(root / "tok"), str(root / "base"), seed=0)

    root = built_once(tmp_path_factory, "tiny", build)
    paths = {p.stem: str(p) for p in sorted((root / "data").glob("*.jsonl"))}
    return {"root": str(root), "tokenizer": str(root / "tok"), "base": str(root / "base"), **paths}


NO_DASHBOARD = {"include_dashboard": False}
"""For a simulated node: no dashboard and no dashboard agent, a third of a node's start-up, which no test here reads."""


@contextlib.contextmanager
def simulated_cluster(nodes: int, cpus: int, gpus: int):
    """`nodes` Ray nodes on this machine, each declaring GPUs that have no CUDA behind them."""
    import ray
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "num_gpus": gpus, **NO_DASHBOARD})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus, num_gpus=gpus, **NO_DASHBOARD)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _shared_ray() -> None:
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="tests",
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})


@pytest.fixture(autouse=True)
def shared_ray(request):
    """One local Ray for the whole session, which every command a slow test runs joins (a command starts and stops
    its own only when none is running): started on the first slow test, and again after a test that needed a Ray
    of its own (a simulated cluster, a dashboard) shut it down."""
    if request.node.get_closest_marker("slow") is not None:
        _shared_ray()
    yield


@pytest.fixture(scope="module")
def local_ray():
    _shared_ray()
    yield


def pytest_configure(config):
    """The whole session's processes (xdist workers, Ray workers, commands run as subprocesses) record the config
    keys they read (`rlhf.key_reads`) into one directory, for the dead-key check at the end."""
    from rlhf import key_reads
    if not hasattr(config, "workerinput") and not key_reads.enabled():
        os.environ[key_reads.ENV] = tempfile.mkdtemp(prefix="rlhf-key-reads-")
        config.key_reads_dir = os.environ[key_reads.ENV]


KEYS_READ_ONLY_WITH_CUDA = {"deepspeed.offload_optimizer", "deepspeed.offload_param"}
"""Keys the code reads only on a CUDA device (actors/engine.py: there is nothing to offload to on CPU); the GPU tests
(tests/test_gpu.py) are where they are used."""


def unread_keys(read: set[str]) -> list[str]:
    """Every key (a dotted path of a training command's config) that no process of the session read at that path in
    any command; e.g. `roles.reference.optim.lr` is read only if a reference group's optimizer was, whatever other
    `.lr` was read. The same path in two commands' configs is one setting read by the same code, so one command's run
    that reads it is enough."""
    from rlhf.commands import COMMANDS
    from rlhf.config import config_keys
    paths = {key.partition(":")[2] for key in read}
    unread = []
    for command in COMMANDS.values():
        keys = config_keys(command.config)
        leaves = [k for k in keys if not any(other.startswith(k + ".") for other in keys)]
        unread += [k for k in leaves if k not in paths and k not in unread and k not in KEYS_READ_ONLY_WITH_CUDA]
    return unread


def _whole_suite(session, exitstatus) -> bool:
    option = session.config.option
    return (exitstatus == 0 and session.config.args_source is pytest.Config.ArgsSource.TESTPATHS
            and not option.keyword and not option.markexpr and not option.deselect and not getattr(option, "lf", False))


def pytest_sessionfinish(session, exitstatus):
    """Shut the shared Ray down; after a whole, green suite, fail it if a config key is read by no command run."""
    import sys
    if "ray" in sys.modules:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    directory = getattr(session.config, "key_reads_dir", None)
    if directory and _whole_suite(session, exitstatus):
        from rlhf import key_reads
        unread = unread_keys(key_reads.collected(directory))
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if unread:
            reporter.write_line(f"dead config keys: no command run in the suite read {', '.join(unread)} "
                                "(rlhf/key_reads.py); remove the key, or test what reads it", red=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        else:
            reporter.write_line("dead config keys: none (every key of every command was read by a run)")
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def umask(mask: int):
    """The body runs under this umask (as a teammate's shell sets it)."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def off_umask(root, mask: int) -> dict[str, str]:
    """What under `root` (not `root` itself) has another mode than a plain create under umask `mask` gives (rw for
    files, rwx for directories, for everyone less the mask): relative path -> its octal mode."""
    root = Path(root)
    return {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in root.rglob("*")
            if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~mask}


def run_cli(*argv: str) -> int:
    from rlhf.cli import main
    return main([str(a) for a in argv])


IN_PROCESS = ["--set", "ray.in_process=true", "--set", "layout.cpus_per_rank=1"]
"""A one-group run's rank in the test's own process, on one thread: the same global batches as the configs' two
ranks (its micro-batches accumulated), so the same model (SFT: bit for bit; RM: to 1e-3), in under half the time and
a third of the CPU of starting two rank processes. Runs on Ray ranks: tests/test_faults_trainers.py (SFT and RM, two
ranks, a killed one rebuilt), tests/test_actor_groups.py, tests/test_strength.py, tests/test_dashboard.py."""


@pytest.fixture(scope="session")
def sft_run(tiny, tmp_path_factory) -> str:
    """`rlhf sft` on the sample (configs/tiny/sft.yaml, in this process), run once for every test that needs an SFT
    policy."""
    def build(out: Path) -> None:
        assert run_cli("sft", "--config", "configs/tiny/sft.yaml", "--model", tiny["base"], "--data",
                       tiny["sft_train"], "--set", f"data.eval={tiny['sft_eval']}", "--set", "logging.progress=false",
                       *IN_PROCESS, "--output", out) == 0
    return str(built_once(tmp_path_factory, "sft", build))


@pytest.fixture(scope="session")
def rm_run(tiny, sft_run, tmp_path_factory) -> str:
    """`rlhf rm` from the SFT model on the sample's ranked lists (configs/tiny/rm.yaml, in this process), run once."""
    def build(out: Path) -> None:
        assert run_cli("rm", "--config", "configs/tiny/rm.yaml", "--model", f"{sft_run}/final", "--data",
                       tiny["prefs_train"], "--set", f"data.eval={tiny['prefs_eval']}", "--set",
                       "logging.progress=false", *IN_PROCESS, "--output", out) == 0
    return str(built_once(tmp_path_factory, "rm", build))


@pytest.fixture(scope="session")
def plugin_sft(tiny, tmp_path_factory) -> str:
    """`rlhf sft` of the plugin model on the sample's arithmetic dialogues (configs/tiny/plugin_sft.yaml), once: in
    this process, the quickest way to the model the plugin tests start from (see IN_PROCESS). Packed micro-batches
    (the padded path's gradients, tests/test_packing.py) on one thread: a second thread would save a fifth of its
    time alone and cost the other test worker half a core."""
    def build(out: Path) -> None:
        assert run_cli("sft", "--config", "configs/tiny/plugin_sft.yaml", "--model", tiny["base"], "--data",
                       tiny["plugin_sft"], "--set", "logging.progress=false", "--set", "ray.in_process=true",
                       "--set", "layout.cpus_per_rank=1", "--set", "train.max_tokens_per_micro_batch=1536",
                       "--output", out) == 0
    return f"{built_once(tmp_path_factory, 'plugin-sft', build)}/final"


PRM_CALIBRATION = {"value_weight": 0.7, "logprob_weight": 0.4, "bias": 1.5}
"""The tiny process reward model's step score: both of its features count (reward.steps.calibrated)."""


@pytest.fixture(scope="session")
def tiny_prm(tiny, tmp_path_factory) -> str:
    """A process reward model directory as `rlhf prm` writes one (the tiny model, a random head, the tokenizer and a
    prm.json with a calibration), made once: for what reads a PRM (PPO's prm role, best-of-N), not for what it knows."""
    def build(out: Path) -> None:
        import torch
        from reward.model import ScalarHeadModel
        from reward.steps import prm_file
        from rlhf.modeling import write_text_files
        torch.manual_seed(3)
        model = ScalarHeadModel.from_pretrained(tiny["base"])
        with torch.no_grad():
            model.head.weight.normal_()
        model.save_pretrained(str(out), classifier="token")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f"{tiny['base']}/{name}", out / name)
        write_text_files(str(out), prm_file("\n", PRM_CALIBRATION))
    return str(built_once(tmp_path_factory, "tiny-prm", build))
