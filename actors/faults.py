"""Chaos hook for the fault tests: a rank kills itself at a call the test chooses, once.

`RLHF_FAULT=ROLE:METHOD:N:MARKER` in the driver's environment makes rank 0 of ROLE SIGKILL its own process at the
start of its N-th call of METHOD (1-based, counted in that process), unless the file MARKER exists; it writes
MARKER first, so the rank that recovery starts in its place lives. Several faults are separated by commas. A kill,
not an exception: the run sees exactly what a lost process or node gives it. `ROLE:METHOD:N:MARKER:SIGTERM` sends
SIGTERM instead: with `ray.in_process` the rank is the driver's own process, so that is a scheduler's preemption
arriving at a chosen step. Unset (always, outside tests), the hook costs one dictionary lookup per call.
"""
from __future__ import annotations

import os
import signal

ENV = "RLHF_FAULT"

_calls: dict[str, int] = {}


def runtime_env() -> dict:
    """The variable for a rank actor's runtime_env, so the hook reaches ranks of a Ray started elsewhere."""
    spec = os.environ.get(ENV, "")
    return {"env_vars": {ENV: spec}} if spec else {}


def fault_point(role: str, rank: int, method: str) -> None:
    specs = os.environ.get(ENV, "")
    if not specs or rank != 0:
        return
    faults = [(spec.split(":", 4) + ["SIGKILL"])[:5] for spec in specs.split(",")]
    if not any((r, m) == (role, method) for r, m, *_ in faults):
        return
    _calls[method] = _calls.get(method, 0) + 1
    for want_role, want_method, count, marker, sent in faults:
        if (want_role, want_method) == (role, method) and _calls[method] == int(count) and not os.path.exists(marker):
            with open(marker, "w", encoding="utf-8") as f:
                f.write(f"{role}:{method}:{count} pid {os.getpid()}\n")
            os.kill(os.getpid(), getattr(signal, sent))
