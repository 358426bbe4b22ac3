"""Runs whose --output is an object store: an S3 API served on loopback by moto (started and stopped here). Every
command runs as its own process that joins the tests' Ray, as a job joins a cluster: the ranks get the store's
settings only through the job's runtime_env, as ranks on other nodes would."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow

KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """An S3 API on 127.0.0.1 with a bucket `runs`; yields (environment for a command, pyarrow filesystem)."""
    from moto.server import ThreadedMotoServer
    from pyarrow import fs
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        store = fs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                                endpoint_override=f"{host}:{port}", allow_bucket_creation=True)
        store.create_dir("runs")
        yield {**KEYS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}, store
    finally:
        server.stop()


def rlhf(env: dict, *argv: str, fault: str = "") -> subprocess.Popen:
    """`python -m rlhf ARGV` joining the tests' Ray, with the store's variables in its environment only."""
    import ray
    full = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | env | {
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    if fault:
        full["RLHF_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "rlhf", *map(str, argv)], env=full, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def read(store, path: str) -> str:
    with store.open_input_stream(path) as f:
        return f.read().decode()


def test_ppo_checkpoints_on_s3_never_half_and_a_second_process_resumes_from_them(tiny, s3, tmp_path):
    """The driver dies while the checkpoint of iteration 2 is being written (every rank's part uploaded, no marker):
    the store holds it unmarked and never takes it; a second process resumes from iteration 1's and finishes."""
    env, store = s3
    args = ["ppo", "--config", "configs/tiny/ppo.yaml", "--policy", tiny["base"], "--prompts", tiny["prompts_train"],
            "--output", "s3://runs/ppo", "--set", "ppo.iterations=3", "--set", "train.save_every=1",
            # one role group: a LoRA policy that is its own reference, rewarded by the sample's rule
            "--set", "ppo.estimator=grpo", "--set", "ppo.samples_per_prompt=2", "--set", "ppo.reward_model_weight=0",
            "--set", "ppo.reward_rules.sample=1.0", "--set", "roles.policy.lora.enabled=true",
            "--set", "ppo.prompts_per_iteration=8", "--set", "ppo.train_batch_size=8",
            "--set", "generation.max_new_tokens=8", "--set", "data.eval=", "--set", "logging.progress=false"]
    code, out = finished(rlhf(env, *args, fault=f"driver:commit:2:{tmp_path / 'driver-killed'}"))
    assert code == -signal.SIGKILL, out
    assert read(store, "runs/ppo/checkpoints/step_00000001/COMPLETE").strip() == "1"
    assert store.get_file_info("runs/ppo/checkpoints/step_00000002/policy").type.name == "Directory"  # uploaded...
    assert store.get_file_info("runs/ppo/checkpoints/step_00000002/COMPLETE").type.name == "NotFound"  # ...unsealed
    steps = [json.loads(line)["step"] for line in read(store, "runs/ppo/metrics.jsonl").splitlines()]
    assert steps == [1, 2]  # synced before each checkpoint was sealed

    code, out = finished(rlhf(env, *args, "--resume"))
    assert code == 0, out
    metrics = [json.loads(line) for line in read(store, "runs/ppo/metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics if "ppo/reward_raw" in m] == [1, 2, 3]
    assert json.loads(read(store, "runs/ppo/checkpoints/step_00000003/meta.json"))["step"] == 3
    assert store.get_file_info("runs/ppo/checkpoints/step_00000001").type.name == "NotFound"  # keep_checkpoints: 2
    for name in ("final/model.safetensors", "final/adapter/adapter_config.json", "config.yaml", "placement.json"):
        assert store.get_file_info(f"runs/ppo/{name}").type.name == "File", name
    assert store.get_file_info(fs_selector("runs/ppo/tensorboard"))
    assert "final=s3://runs/ppo/final" in out


def fs_selector(path: str):
    from pyarrow import fs
    return fs.FileSelector(path, recursive=True)


def test_a_pbt_sweep_on_s3_restores_the_weaker_trial_with_the_mutated_learning_rate(tiny, s3, tmp_path):
    """Two SFT trials of 3 steps, one synchronous perturbation after step 2: the weaker trial continues from the
    stronger one's checkpoint of step 2 with a mutated optim.lr, and its optimizer uses that rate in step 3 (not the
    rate the copied checkpoint was trained with). Tune's experiment and every trial's run live on the store."""
    env, store = s3
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({
        "command": "sft", "base_config": "configs/tiny/sft.yaml",
        "args": {"model": tiny["base"], "data": tiny["sft_train"]},
        # Each trial's rank in its controller's process (ray.in_process): trials on Ray ranks are tested by
        # tests/test_dashboard.py; what this test needs is Tune's restore on the store.
        "overrides": ["train.max_steps=3", "train.save_every=2", "train.log_every=1", "train.global_batch_size=8",
                      "train.micro_batch_size=8", "layout.gpus_per_node=1", "ray.in_process=true",
                      "optim.warmup_steps=0", "optim.schedule=constant"],
        "search": {"optim.lr": {"type": "loguniform", "low": 1.0e-5, "high": 1.0e-2}}, "num_samples": 2,
        "metric": "train/loss", "mode": "min",
        "scheduler": {"type": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5, "synch": True}}))
    code, out = finished(rlhf(env, "sweep", "--config", spec, "--output", "s3://runs/sweep"))
    assert code == 0, out
    rows = [line.split("\t") for line in read(store, "runs/sweep/summary.tsv").splitlines()]
    final_lr = {row[0]: float(row[2]) for row in rows[1:]}  # trial -> its config at the end (6 digits)
    assert len(final_lr) == 2, (rows, out[-4000:])
    rates = {}  # trial -> the optimizer's rate at each step it logged
    for trial in final_lr:
        metrics = [json.loads(line) for line in read(store, f"runs/sweep/tune/{trial}/run/metrics.jsonl").splitlines()]
        rates[trial] = {m["step"]: m["train/lr"] for m in metrics if "train/lr" in m}
        assert sorted(rates[trial]) == [1, 2, 3], (rates, out[-4000:])
    same = lambda a, b: a == pytest.approx(b, rel=1e-5)  # noqa: E731
    perturbed = [t for t in rates if not same(rates[t][1], final_lr[t])]
    assert len(perturbed) == 1, (rates, final_lr)
    (weaker,), (stronger,) = perturbed, set(rates) - set(perturbed)
    assert all(same(lr, final_lr[stronger]) for lr in rates[stronger].values())
    # The weaker trial trained step 3 from the stronger one's checkpoint of step 2, whose optimizer ran at the
    # stronger trial's rate, with its own mutated rate.
    assert same(rates[weaker][3], final_lr[weaker]) and not same(rates[weaker][3], final_lr[stronger])
    assert not same(rates[weaker][3], rates[weaker][2])  # nor its own rate before
    names = {info.path for info in store.get_file_info(fs_selector("runs/sweep"))}
    assert any(p.startswith(f"runs/sweep/tune/{stronger}/checkpoint_") and p.endswith("/COMPLETE") for p in names)
    assert any(p.startswith("runs/sweep/tune/experiment_state") for p in names)
    assert f"runs/sweep/tune/{weaker}/run/final/model.safetensors" in names
    assert {"runs/sweep/best_config.yaml", "runs/sweep/base_config.yaml"} <= names


@pytest.mark.parametrize("output, endpoint, says", [
    ("s3://no-such-bucket/run", "", "bucket 'no-such-bucket' does not exist"),
    ("s3://runs/run", "http://127.0.0.1:9", "s3://runs/run: cannot reach the store"),
    ("nosuch://bucket/run", "", "use a local path, s3://BUCKET/PATH"),
])
def test_an_output_uri_that_cannot_be_used_is_one_line(tiny, s3, output, endpoint, says, capsys):
    env, _ = s3
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (env | ({"AWS_ENDPOINT_URL": endpoint} if endpoint else {})).items():
            mp.setenv(key, value)
        code = run_cli("sft", "--config", "configs/tiny/sft.yaml", "--model", tiny["base"], "--data",
                       tiny["sft_train"], "--output", output)
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
