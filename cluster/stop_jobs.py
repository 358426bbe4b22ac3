"""Preemption on Kubernetes: the preStop hook of a Ray pod (cluster/kuberay/raycluster.yaml).

Asks every running Ray job to stop, which makes Ray send its driver SIGTERM (an `rlhf` run then finishes its step,
writes a checkpoint and exits 0 within `ray.preempt_grace_s`; docs/reliability.md), and waits until none runs, at
most --grace seconds, so that the pod, and the ranks it holds, stay up while the run writes its checkpoint. A head
that cannot be reached (already gone) ends the hook at once.

    python cluster/stop_jobs.py --address http://moss-rlhf-head-svc:8265 --grace 300
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default="http://127.0.0.1:8265", help="the head's dashboard (Jobs API)")
    p.add_argument("--grace", type=float, default=300.0, help="seconds to wait for the jobs to stop")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.grace
    try:
        client = JobSubmissionClient(args.address)

        def running() -> list[str]:
            return [j.submission_id for j in client.list_jobs() if j.status == JobStatus.RUNNING and j.submission_id]

        jobs = running()
        for job in jobs:
            print(f"stop_jobs: stopping {job} (SIGTERM to its driver; grace {args.grace:.0f} s)", flush=True)
            client.stop_job(job)
        while jobs and time.monotonic() < deadline:
            time.sleep(2)
            jobs = running()
    except (ConnectionError, RuntimeError) as err:  # the head is gone or refuses: nothing left to wait for
        print(f"stop_jobs: {args.address}: {' '.join(str(err).split())[:200]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
