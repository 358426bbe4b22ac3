"""What a user watches during training: one JSON line per step in metrics.jsonl, the same scalars in TensorBoard,
and a progress bar on a terminal.

metrics.jsonl is the record scripts read back (`read_metrics`); a resumed run drops the lines after its checkpoint.
"""
from __future__ import annotations

import glob
import json
import math
import numbers
import os
import sys
import time
from typing import Any, Callable, Optional

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

Reporter = Callable[[int, dict], None]
# Opt-in: a sweep's trial installs one so every logged step also reaches Ray Tune; None everywhere else.
_reporter: Optional[Reporter] = None


def set_reporter(fn: Optional[Reporter]) -> Optional[Reporter]:
    """Install `fn(step, metrics)` to be called after every `MetricsLogger.log`; returns the previous one."""
    global _reporter
    previous, _reporter = _reporter, fn
    return previous


def _to_number(key: str, value: Any) -> float | int:
    """A plain Python number from an int, float, bool, numpy scalar or one-element tensor."""
    if hasattr(value, "item") and callable(value.item):
        numel = value.numel() if hasattr(value, "numel") else getattr(value, "size", 1)
        if numel != 1:
            raise ValueError(f"metric {key!r} has {numel} elements; log a scalar such as its mean")
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(f"metric {key!r} is a {type(value).__name__}, not a number; log numbers only")


def _json_value(value: float | int) -> float | int | None:
    # JSON has no NaN or Infinity; null keeps the file readable by every JSON parser.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends one JSON object per step to out_dir/metrics.jsonl and mirrors scalars to TensorBoard
    (out_dir/tensorboard)."""

    def __init__(self, out_dir: str, tensorboard: bool = True, resume: bool = False) -> None:
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, METRICS_FILE)
        self.tb_dir = os.path.join(out_dir, TENSORBOARD_DIR)
        os.makedirs(out_dir, exist_ok=True)
        if not resume:
            # A fresh run in an old output directory must not show the old run's curves as its own.
            for event_file in glob.glob(os.path.join(self.tb_dir, "events.out.tfevents.*")):
                os.remove(event_file)
        self._file = open(self.path, "a" if resume else "w", encoding="utf-8")
        self._tensorboard = tensorboard
        self._writer: Any = None
        if tensorboard:
            self._writer = self._open_writer(purge_step=None)

    def _open_writer(self, purge_step: int | None) -> Any:
        from torch.utils.tensorboard import SummaryWriter  # imported late: it pulls in tensorboard

        return SummaryWriter(self.tb_dir, purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        """Write one line {"step", "time", **metrics}; keys get `prefix/` when a prefix is given."""
        values: dict[str, float | int] = {}
        for key, value in metrics.items():
            name = f"{prefix.rstrip('/')}/{key}" if prefix else key
            values[name] = _to_number(name, value)
        record = {"step": int(step), "time": time.time()}
        record.update({key: _json_value(value) for key, value in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        # Flushed per line so `tail -f` and a crash both see every finished step.
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, global_step=int(step))
            self._writer.flush()
        if _reporter is not None:
            _reporter(int(step), values)

    def truncate_after(self, step: int) -> None:
        """For resume: drop the lines (and TensorBoard points) after `step`, the step of the checkpoint resumed."""
        self._file.close()
        kept = [record for record in read_metrics(self.path) if record.get("step", 0) <= step]
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._writer is not None:
            # Rewrite the kept points into fresh event files: TensorBoard's purge_step depends on the order of
            # event files, which files written within one second do not keep.
            self._writer.close()
            for event_file in glob.glob(os.path.join(self.tb_dir, "events.out.tfevents.*")):
                os.remove(event_file)
            self._writer = self._open_writer(purge_step=None)
            for record in kept:
                for key, value in record.items():
                    if key not in ("step", "time") and value is not None:
                        self._writer.add_scalar(key, value, global_step=int(record["step"]))
            self._writer.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (or of out_dir/metrics.jsonl when given a directory), in file order.

    A torn last line (the process died mid-write) is skipped; a bad line elsewhere is an error.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records: list[dict] = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == last:
                break
            raise ValueError(f"{path}:{number + 1}: not a JSON object ({error.msg})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number + 1}: not a JSON object")
        records.append(record)
    return records


class Progress:
    """A thin tqdm wrapper, silent when stderr is not a terminal (logs, Ray workers) or when enabled=False."""

    def __init__(self, total: int | None = None, desc: str = "", enabled: bool = True, initial: int = 0) -> None:
        disable = not enabled or not sys.stderr.isatty()
        self._bar = tqdm(total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if postfix:
            shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
