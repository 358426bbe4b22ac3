"""Preemption: SIGTERM (what SLURM and Kubernetes send before they kill a job) makes a run stop at its next step
boundary with a checkpoint, and exit 0, so `--resume` continues it exactly.

A training loop asks `preempted()` after each step; when it is true the loop writes its checkpoint and raises
`Preempted`, which the command line turns into one line and exit code 0. If the step boundary does not come within
the grace period, the main thread is interrupted instead: the run ends as an interrupted one, and its last complete
checkpoint is where `--resume` starts.
"""
from __future__ import annotations

import _thread
import contextlib
import signal
import threading
import time
from typing import Iterator, Optional


class Preempted(Exception):
    """The run stopped for a SIGTERM at a step boundary, its checkpoint written: resume it with --resume."""

    def __init__(self, command: str, step: int, checkpoint: str):
        super().__init__(f"{command}: preempted (SIGTERM) after step {step}; checkpoint {checkpoint} written, rerun "
                         "with --resume to continue")
        self.step, self.checkpoint = step, checkpoint


_state: dict = {"since": None, "timer": None}


def preempted() -> bool:
    """True once a SIGTERM arrived inside `on_sigterm`."""
    return _state["since"] is not None


@contextlib.contextmanager
def on_sigterm(grace_s: float) -> Iterator[None]:
    """Within this block a SIGTERM asks the run to stop at its next step boundary; after `grace_s` seconds without
    one, the main thread gets a KeyboardInterrupt. Outside the main thread (a Tune trial) it does nothing: there
    the caller's own handler decides."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Optional[object]) -> None:
        if _state["since"] is not None:
            return
        _state["since"] = time.time()
        print(f"SIGTERM: stopping at the next step boundary with a checkpoint (grace {grace_s:.0f} s)", flush=True)
        timer = threading.Timer(grace_s, _thread.interrupt_main)
        timer.daemon = True
        timer.start()
        _state["timer"] = timer

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if _state["timer"] is not None:
            _state["timer"].cancel()
        _state.update(since=None, timer=None)
