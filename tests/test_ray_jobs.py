"""A real `rlhf` command submitted through Ray's Jobs API, as cluster/submit.sh does on a cluster: a local Ray head
on loopback with its dashboard, `JobSubmissionClient`, and the job's own logs."""
from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import ray

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, seconds: float, poll):
    """poll() until it returns something truthy, at most `seconds`; the last error explains a timeout."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            result = poll()
            if result:
                return result
        except Exception as err:  # the dashboard refuses connections until it is up
            last = err
        time.sleep(1)
    raise AssertionError(f"{what} not ready after {seconds:.0f} s (last error: {last})")


@pytest.fixture(scope="module")
def jobs_client():
    from ray._private import parameter
    from ray.job_submission import JobSubmissionClient

    class AnyAgentPort(parameter.RayParams):
        # ray.init always asks for the dashboard agent's fixed default port (52365); when another Ray on this
        # machine holds it, the agent runs without HTTP and every submission fails with "No available agent to
        # submit job". Port 0 lets the agent take a free one and report it.
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("dashboard_agent_listen_port", 0)
            super().__init__(*args, **kwargs)

    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parameter, "RayParams", AnyAgentPort)
        # address="local": with no address, ray.init joins the newest cluster recorded in /tmp/ray (a simulated
        # cluster of a test on the other worker writes one there) and refuses num_cpus.
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 _node_ip_address="127.0.0.1", num_cpus=2, namespace="jobs-test")
    try:
        yield _wait("Ray dashboard", 90, lambda: JobSubmissionClient(f"http://127.0.0.1:{port}"))
    finally:
        ray.shutdown()


def test_rlhf_command_runs_as_a_ray_job(jobs_client, tmp_path):
    from ray.job_submission import JobStatus
    from rlhf.sample import write_sample
    data = tmp_path / "data"
    write_sample(str(data), seed=0)  # in-process: one command in the job is enough, and each costs seconds
    # Right after start-up the job agent may still be registering ("No available agent"): retry, bounded.
    job = _wait("Ray job agent", 90, lambda: jobs_client.submit_job(
        entrypoint=f"{sys.executable} -m rlhf validate {data}/prefs_train.jsonl --kind preferences",
        # The job's driver runs in this checkout, so `-m rlhf` is this repository's code even where it is not
        # installed; the uploaded copy leaves out what the job does not need.
        runtime_env={"working_dir": str(REPO), "excludes": [".venv/", "runs/", ".git/", "**/__pycache__/",
                                                            ".hypothesis/", ".pytest_cache/"],
                     "env_vars": {"HF_HUB_OFFLINE": "1"}},
    ))
    finished = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    status = _wait(f"job {job}", 180, lambda: (s := jobs_client.get_job_status(job)) in finished and s)
    logs = jobs_client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs
    assert f"{data}/prefs_train.jsonl: " in logs and " preference records, " in logs and logs.rstrip().endswith("OK")


def test_the_kubernetes_prestop_hook_stops_a_running_job_with_sigterm_and_waits_for_it(jobs_client, tmp_path):
    """cluster/stop_jobs.py, what a Ray pod runs before Kubernetes kills it: the job's driver gets SIGTERM (here a
    stand-in that writes a marker and exits 0, as a preempted `rlhf` run does after its checkpoint), and the hook
    returns once the job has stopped."""
    import importlib.util
    from ray.job_submission import JobStatus
    marker = tmp_path / "got-sigterm"
    driver = (f"import signal, sys, time, pathlib\n"
              f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).touch(), sys.exit(0)))\n"
              f"print('running', flush=True)\ntime.sleep(120)\n")
    (tmp_path / "driver.py").write_text(driver)
    job = _wait("Ray job agent", 90, lambda: jobs_client.submit_job(
        entrypoint=f"{sys.executable} {tmp_path / 'driver.py'}"))
    _wait(f"job {job} running", 60, lambda: "running" in jobs_client.get_job_logs(job))
    spec = importlib.util.spec_from_file_location("stop_jobs", REPO / "cluster" / "stop_jobs.py")
    stop_jobs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stop_jobs)
    began = time.monotonic()
    assert stop_jobs.main(["--address", jobs_client.get_address(), "--grace", "60"]) == 0
    assert time.monotonic() - began < 30 and marker.exists()
    assert jobs_client.get_job_status(job) == JobStatus.STOPPED
