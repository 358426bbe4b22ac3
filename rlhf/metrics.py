"""What a user watches during training: one JSON line per step in metrics.jsonl, the same scalars in TensorBoard and,
when the run is on Ray, in Ray's metrics (Prometheus gauges the dashboard's Metrics view shows), and a progress bar.

metrics.jsonl is the record scripts read back (`read_metrics`); a resumed run drops the lines after its checkpoint.
A run is named the same way everywhere outside its own files: its command, its output directory's name and, in a
sweep, its trial (`run_tags`, `Trial`); Ray's gauges (exported by the Ray side, `set_exporter`) carry those tags and
the actors' reprs say them.
"""
from __future__ import annotations

import glob
import json
import math
import numbers
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tqdm import tqdm

from rlhf import files

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


@dataclass(frozen=True)
class Trial:
    """The sweep trial a run is (set by `rlhf sweep` inside the trial, None elsewhere)."""
    sweep: str
    """The sweep's output directory name: the `run` tag of every trial's metrics."""
    id: str
    """Tune's trial id, e.g. 3f2a1_00001."""
    searched: str
    """The trial's searched values, `optim.lr=0.0003 rm.label_smoothing=0.1`."""

    def __str__(self) -> str:
        """`trial 3f2a1_00001 (optim.lr=0.0003)`, as the actors of the trial say in Ray's dashboard."""
        return f"trial {self.id}" + (f" ({self.searched})" if self.searched else "")


_trial: Optional[Trial] = None


def set_trial(trial: Optional[Trial]) -> Optional[Trial]:
    """Say which sweep trial this process runs (None: none); returns the previous one."""
    global _trial
    previous, _trial = _trial, trial
    return previous


def current_trial() -> Optional[Trial]:
    return _trial


TAG_KEYS = ("command", "run", "trial", "role")
"""The tags of every exported gauge: sft/rm/dpo/ppo, the output directory's name (a sweep's, in a trial), the trial
id (empty outside a sweep), the trained group (sft, reward, policy) whose step it measures (empty for PPO, whose
metrics are the controller's, made from every role's results)."""


def run_tags(command: str, output: str) -> dict[str, str]:
    trial = current_trial()
    return {"command": command, "run": trial.sweep if trial else os.path.basename(os.path.abspath(output)),
            "trial": trial.id if trial else "", "role": ""}


def prometheus_name(key: str) -> str:
    """The gauge of a metric: `ppo/kl` -> `rlhf_ppo_kl` (Prometheus shows it as `ray_rlhf_ppo_kl`: Ray prefixes
    every application metric with its namespace)."""
    return "rlhf_" + re.sub(r"[^A-Za-z0-9_]", "_", key)


Exporter = Callable[[int, dict, dict], None]
# Installed while a run's Ray backend is open (`actors.group.RayBackend`): every logged step then also reaches Ray's
# metrics. The core never imports Ray; the one-process path (`ray.in_process`) installs none.
_exporter: Optional[Exporter] = None


def set_exporter(fn: Optional[Exporter]) -> Optional[Exporter]:
    """Install `fn(step, metrics, tags)` to be called after every `MetricsLogger.log`; returns the previous one."""
    global _exporter
    previous, _exporter = _exporter, fn
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
    (out_dir/tensorboard) and, on Ray, to Ray's metrics with `tags` (`TAG_KEYS`, through the installed exporter)."""

    def __init__(self, out_dir: str, tensorboard: bool = True, resume: bool = False,
                 tags: Optional[dict[str, str]] = None) -> None:
        self.out_dir = out_dir
        self.tags = {key: "" for key in TAG_KEYS} | (tags or {})
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
        self.on_close: Optional[Callable[[], Any]] = None
        """Called once the file and TensorBoard are closed (a run on an object store uploads them then)."""
        self.wandb: Any = None
        """A Weights & Biases run every logged step also goes to (`open_wandb`), or None."""
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
        if self.wandb is not None:
            self.wandb.log(values, step=int(step))
        if _exporter is not None:
            _exporter(int(step), values, self.tags)
        if _reporter is not None:
            _reporter(int(step), values)

    def truncate_after(self, step: int) -> None:
        """For resume: drop the lines (and TensorBoard points) after `step`, the step of the checkpoint resumed."""
        self._file.close()
        kept = [record for record in read_metrics(self.path) if record.get("step", 0) <= step]
        with files.replacing(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record, allow_nan=False) + "\n")
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
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.on_close is not None:
            done, self.on_close = self.on_close, None
            done()

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
    """A run's progress: a tqdm bar on a terminal; where output is not one (Ray job logs, SLURM, CI), a line on stdout
    every `every_s` seconds and at the last step: `sft: step 12/60 (20%), loss=2.31; 0.8 steps/s, 1m00s left`.
    Nothing with enabled=False."""

    def __init__(self, total: int | None = None, desc: str = "", enabled: bool = True, initial: int = 0,
                 every_s: float = 30.0, stream: Any = None, unit: str = "step") -> None:
        terminal = sys.stderr.isatty()
        self._bar = tqdm(total=total, desc=desc, initial=initial, disable=not enabled or not terminal,
                         dynamic_ncols=True)
        self.lines = enabled and not terminal and every_s >= 0
        self.total, self.desc, self.every_s, self.stream, self.unit = total, desc, every_s, stream, unit
        self.step, self.began_at, self.began, self.said = initial, initial, time.monotonic(), time.monotonic()

    def update(self, n: int = 1, **postfix: Any) -> None:
        shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}
        if shown:
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)
        self.step += n
        now = time.monotonic()
        if self.lines and (now - self.said >= self.every_s or self.step == self.total):
            self.said = now
            print(self.line(shown, now - self.began), file=self.stream or sys.stdout, flush=True)

    def line(self, shown: dict, elapsed: float) -> str:
        done = self.step - self.began_at
        rate = done / elapsed if elapsed > 0 else 0.0
        where = f"{self.unit} {self.step}" + (f"/{self.total} ({self.step / self.total:.0%})" if self.total else "")
        values = ", ".join(f"{k}={v}" for k, v in shown.items())
        to_go = (self.total or 0) - self.step
        left = f", {_duration(to_go / rate)} left" if to_go > 0 and rate > 0 else ""
        return f"{self.desc}: {where}{', ' + values if values else ''}; {rate:.3g} {self.unit}s/s{left}"

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WANDB_ID_FILE = "wandb_run_id"
"""Beside the run's metrics: the W&B run's id, which --resume continues."""


def open_wandb(root: str, name: str, project: str, mode: str, config: dict, resume: bool) -> Any:
    """A Weights & Biases run writing under `root`/wandb: the same run again on --resume (its id kept beside the
    metrics), a new one otherwise. W&B is an optional dependency, imported only here."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("logging.wandb: Weights & Biases is not installed; pip install 'moss-rlhf-ray[wandb]' (or "
                         "wandb), or set logging.wandb=false") from None
    id_file = os.path.join(root, WANDB_ID_FILE)
    run_id = None
    if resume and os.path.exists(id_file):
        with open(id_file, encoding="utf-8") as f:
            run_id = f.read().strip() or None
    run = wandb.init(project=project, name=name, dir=root, config=config, id=run_id,
                     resume="allow" if run_id else None, mode=mode or None)
    files.write_text(id_file, run.id)
    return run


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
