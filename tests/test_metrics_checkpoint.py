"""What a user relies on when a run is watched, killed and resumed: metrics.jsonl and TensorBoard agree, NaN
never breaks the file, checkpoints are whole or invisible, and RNG state resumes the same random numbers."""

import glob
import io
import json
import os
import re
import random
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import off_umask, umask
from rlhf.checkpoint import (CheckpointError, CheckpointManager, atomic_save_tensors, atomic_write_json, load_rng,
                             read_meta, save_rng)
from rlhf.config import SFTConfig, save_config
from rlhf.data import write_jsonl
from rlhf.metrics import MetricsLogger, Progress, read_metrics


def tensorboard_scalars(out_dir):
    events = EventAccumulator(os.path.join(out_dir, "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    out = str(tmp_path / "run")
    with MetricsLogger(out) as logger:
        for step in range(1, 4):
            logger.log(step, {"loss": torch.tensor(1.0 / step), "tokens": 10 * step}, prefix="train")
        logger.log(3, {"kl": np.float32(0.5)}, prefix="ppo/")

    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    assert records[1]["train/loss"] == pytest.approx(0.5) and records[1]["train/tokens"] == 20
    assert records[3]["ppo/kl"] == pytest.approx(0.5)
    assert all(isinstance(r["time"], float) for r in records)

    assert glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    scalars = tensorboard_scalars(out)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3]
    assert scalars["train/loss"][2][1] == pytest.approx(1 / 3)
    assert scalars["ppo/kl"] == [(3, pytest.approx(0.5))]


def test_non_finite_values_are_written_as_null(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False) as logger:
        logger.log(1, {"loss": float("nan"), "grad_norm": torch.tensor(float("inf")), "lr": 1e-4})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    record = json.loads(line)  # strict JSON: no NaN/Infinity tokens
    assert "NaN" not in line and "Infinity" not in line
    assert record["loss"] is None and record["grad_norm"] is None and record["lr"] == 1e-4


def test_a_non_scalar_metric_is_a_one_line_error(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False) as logger:
        with pytest.raises(ValueError, match="'loss' has 3 elements"):
            logger.log(1, {"loss": torch.ones(3)})


def test_resume_truncates_metrics_after_the_checkpoint_step(tmp_path):
    out = str(tmp_path)
    with MetricsLogger(out) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    # The run died after step 5; the last checkpoint is step 3.
    with MetricsLogger(out, resume=True) as logger:
        assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
        logger.truncate_after(3)
        assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
        logger.log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(out)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    # TensorBoard shows the resumed curve, not both runs on top of each other.
    assert tensorboard_scalars(out)["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]

    # A fresh (not resumed) run in the same directory starts from nothing.
    with MetricsLogger(out) as logger:
        logger.log(1, {"loss": 9.0})
    assert [r["loss"] for r in read_metrics(out)] == [9.0]
    assert tensorboard_scalars(out)["loss"] == [(1, 9.0)]


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert read_metrics(str(path)) == [{"step": 1, "loss": 1.0}]
    path.write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1:"):
        read_metrics(str(path))


class Terminal(io.StringIO):
    """stderr as a terminal shows it."""

    def isatty(self) -> bool:
        return True


def run_bar(enabled: bool = True, every_s: float = 30.0) -> None:
    with Progress(total=3, desc="ppo", enabled=enabled, every_s=every_s, unit="iteration") as bar:
        bar.update(1, reward=0.5, kl=0.01)
        bar.update(2)


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log(capsys, monkeypatch):
    run_bar()  # stdout and stderr are pytest's capture here, as they are a job's log file
    out, err = capsys.readouterr()
    assert err == "" and out.splitlines() == [out.strip()]  # no bar; within 30 s, only the last step's line
    assert re.fullmatch(r"ppo: iteration 3/3 \(100%\); [0-9.e+]+ iterations/s", out.strip()), out
    run_bar(every_s=0)  # a line at every update
    assert [line.split(";")[0] for line in capsys.readouterr().out.splitlines()] == [
        "ppo: iteration 1/3 (33%), reward=0.5, kl=0.01", "ppo: iteration 3/3 (100%)"]

    monkeypatch.setattr(sys, "stderr", Terminal())
    run_bar()  # the same bar on a terminal draws, with its postfix, and prints no lines
    drawn = sys.stderr.getvalue()
    assert "ppo" in drawn and "3/3" in drawn and "reward=0.5" in drawn
    assert capsys.readouterr().out == ""

    monkeypatch.setattr(sys, "stderr", Terminal())
    run_bar(enabled=False)  # logging.progress: false silences it there too
    assert sys.stderr.getvalue() == ""
    monkeypatch.undo()
    run_bar(enabled=False)  # and in a log
    assert capsys.readouterr() == ("", "")


def write_checkpoint(manager, step, payload=1.0):
    tmp = manager.begin(step)
    atomic_save_tensors(os.path.join(tmp, "weights.safetensors"), {"w": torch.full((2,), payload)})
    return manager.commit(step, tmp, {"iteration": step, "note": "test"})


def test_commit_latest_and_prune(tmp_path):
    manager = CheckpointManager(str(tmp_path / "ckpt"), keep=2)
    assert manager.latest() is None and manager.list() == []
    paths = [write_checkpoint(manager, step) for step in (10, 20, 30)]
    assert paths[2] == str(tmp_path / "ckpt" / "step_00000030")
    assert manager.latest() == paths[2]
    assert manager.list() == paths[1:]  # step 10 pruned
    assert not os.path.exists(paths[0])
    assert read_meta(paths[2]) == {"iteration": 30, "note": "test", "step": 30}
    assert os.path.exists(os.path.join(paths[2], "COMPLETE"))
    # Only the checkpoints are left in the root: no temp or moved-aside directories.
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_00000020", "step_00000030"]


def test_recommitting_a_step_replaces_it(tmp_path):
    from safetensors.torch import load_file

    manager = CheckpointManager(str(tmp_path), keep=0)
    write_checkpoint(manager, 5, payload=1.0)
    path = write_checkpoint(manager, 5, payload=2.0)
    assert load_file(os.path.join(path, "weights.safetensors"))["w"].tolist() == [2.0, 2.0]
    assert manager.list() == [path]


def test_a_crashed_checkpoint_is_never_the_latest(tmp_path):
    root = tmp_path / "ckpt"
    manager = CheckpointManager(str(root))
    good = write_checkpoint(manager, 1)

    # Crash 1: begin() and some files, no commit.
    tmp = manager.begin(2)
    with open(os.path.join(tmp, "weights.safetensors"), "wb") as f:
        f.write(b"half")
    # Crash 2: a step directory that was never marked complete (an older writer, or a copy cut short).
    os.makedirs(root / "step_00000003")
    atomic_write_json(str(root / "step_00000003" / "meta.json"), {"step": 3})
    # Crash 3: marked complete but its meta.json is garbage.
    os.makedirs(root / "step_00000004")
    (root / "step_00000004" / "COMPLETE").write_text("4\n")
    (root / "step_00000004" / "meta.json").write_text("{not json")

    assert manager.latest() == good
    assert CheckpointManager(str(root)).latest() == good  # a restarted process sees the same
    assert manager.list() == [good]

    # A temp dir from a dead process is cleaned up by the next commit.
    stale = root / ".tmp-step_00000007-999999999"
    os.makedirs(stale)
    write_checkpoint(manager, 2)
    assert not stale.exists() and not os.path.exists(tmp)
    assert manager.latest() == str(root / "step_00000002")


def test_what_a_run_writes_follows_the_umask(tmp_path):
    # mkstemp and safetensors create files only their owner can read, and a rename keeps that mode.
    with umask(0o022):
        manager = CheckpointManager(str(tmp_path / "ckpt"))
        tmp = manager.begin(1)
        os.makedirs(os.path.join(tmp, "policy"))
        save_rng(os.path.join(tmp, "policy", "rng_rank0.pt"))
        atomic_save_tensors(os.path.join(tmp, "policy", "weights.safetensors"), {"w": torch.ones(2)})
        manager.commit(1, tmp, {})
        write_checkpoint(manager, 1)  # replacing a step moves the old one aside
        atomic_write_json(str(tmp_path / "placement.json"), {"policy": [0]})
        save_config(SFTConfig(), str(tmp_path / "config.yaml"))
        write_jsonl(tmp_path / "data" / "out.jsonl", [{"prompt": "hi"}])
        logger = MetricsLogger(str(tmp_path / "run"), tensorboard=False)
        logger.log(1, {"loss": 1.0})
        logger.truncate_after(0)
        logger.close()
    assert off_umask(tmp_path, 0o022) == {}
    assert os.path.exists(tmp_path / "ckpt" / "step_00000001" / "weights.safetensors")


def test_read_meta_of_a_non_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="has no meta.json"):
        read_meta(str(tmp_path))


def draw():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), random.gauss(0, 1)


def test_rng_state_round_trip_reproduces_python_numpy_and_torch(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw()
    path = str(tmp_path / "rng.pt")
    save_rng(path)
    expected = draw()
    draw()  # move every generator on
    load_rng(path)
    assert draw() == expected
    # The file holds only tensors and plain values, so the safe loader accepts it.
    assert isinstance(torch.load(path, weights_only=True), dict)
