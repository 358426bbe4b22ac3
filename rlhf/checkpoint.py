"""Checkpoints that are never half-written: each is built in a temp directory, marked complete, then renamed into
place, so `latest()` only ever sees whole ones. On an object store (`rlhf.storage`: no renames there) each rank uploads
its own part into step_N/ and the marker, written last, makes it complete; `latest()` takes only marked ones there too.
Also atomic JSON/tensor writes and RNG state for exact resume.

RNG files are written with torch.save and read with torch.load(weights_only=True): they hold only tensors,
lists, ints and floats, so loading one can never run code.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import save_file

from rlhf import files, storage

META_FILE = "meta.json"
COMPLETE_FILE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_SCRATCH_DIR = re.compile(r"^\.(?:tmp|old)-step_(\d+)-(\d+)$")

# Opt-in: a sweep's trial installs one so Ray Tune learns of every committed checkpoint (PBT restores them).
_on_commit: Callable[[int, str], None] | None = None


def set_commit_hook(fn: Callable[[int, str], None] | None) -> Callable[[int, str], None] | None:
    """Install `fn(step, path)` to be called after every `CheckpointManager.commit`; returns the previous one."""
    global _on_commit
    previous, _on_commit = _on_commit, fn
    return previous


class CheckpointError(Exception):
    """A checkpoint could not be read; the message is one line saying what to fix."""


def atomic_write_json(path: str, obj: Any) -> None:
    """Write JSON so a reader sees the old file or the whole new one (`rlhf.storage.write_text`)."""
    storage.write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors as safetensors, atomically (`rlhf.files.replacing`)."""
    with files.replacing(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)


def read_meta(ckpt_dir: str) -> dict:
    """The meta.json of a checkpoint directory (or URI)."""
    path = storage.join(ckpt_dir, META_FILE)
    try:
        meta = json.loads(storage.read_text(path))
    except FileNotFoundError as error:
        raise CheckpointError(f"{ckpt_dir} has no {META_FILE}; it is not a checkpoint, "
                              f"pass a step_N directory") from error
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable ({error}); resume from an older checkpoint") from error
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{path}: expected a JSON object with an integer \"step\"; "
                              f"resume from an older checkpoint")
    return meta


class CheckpointManager:
    """Checkpoints under root/step_{N:08d}/; each is written into a temp dir and renamed into place, then marked
    complete, so a crash never leaves a half checkpoint as the latest. With a URI root (`rlhf.storage`) there are no
    renames: `begin` clears root/step_N/ (its marker first), every rank uploads its part there, `commit` writes
    meta.json and then the marker; an unmarked step_N/ is never taken and is cleared when that step is written again."""

    def __init__(self, root: str, keep: int = 2) -> None:
        if keep < 0:
            raise ValueError(f"keep={keep} must be >= 0 (0 keeps every checkpoint)")
        self.remote = storage.is_uri(root)
        self.root = root if self.remote else os.path.abspath(root)
        self.keep = keep
        if not self.remote:
            os.makedirs(self.root, exist_ok=True)

    def path(self, step: int) -> str:
        return storage.join(self.root, f"step_{step:08d}")

    def begin(self, step: int) -> str:
        """A fresh, empty temp directory to write checkpoint `step` into; pass it to `commit`."""
        if self.remote:
            target = self.path(step)
            storage.remove(storage.join(target, COMPLETE_FILE))  # unmarked before anything in it changes
            storage.remove(target)
            return target
        tmp = os.path.join(self.root, f".tmp-step_{step:08d}-{os.getpid()}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # left by an earlier, failed attempt of this process
        os.makedirs(tmp)
        return tmp

    def commit(self, step: int, tmp_dir: str, meta: dict) -> str:
        """Seal tmp_dir (meta.json + COMPLETE, all fsynced), rename it to root/step_N, prune; return the final path."""
        if self.remote:
            return self._commit_remote(step, tmp_dir, meta)
        if not os.path.isdir(tmp_dir):
            raise CheckpointError(f"{tmp_dir} does not exist; call begin({step}) and write into "
                                  f"the directory it returns")
        atomic_write_json(os.path.join(tmp_dir, META_FILE), {**meta, "step": int(step)})
        # Everything else in the directory must be on disk before the marker says it is complete.
        for directory, _, names in os.walk(tmp_dir):
            for name in names:
                files.fsync(os.path.join(directory, name))
            files.fsync(directory)
        with open(os.path.join(tmp_dir, COMPLETE_FILE), "w", encoding="utf-8") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        files.fsync(tmp_dir)
        final = self.path(step)
        # An old step_N is moved aside first: a crash leaves it, the new one, or the previous step as the latest.
        files.replace_directory(tmp_dir, final, os.path.join(self.root, f".old-step_{step:08d}-{os.getpid()}"))
        files.fsync(self.root)
        self._prune()
        self._remove_stale(step)
        if _on_commit is not None:
            _on_commit(int(step), final)
        return final

    def _commit_remote(self, step: int, target: str, meta: dict) -> str:
        """Every rank's upload has returned (the caller waited on them); the marker goes last."""
        if target != self.path(step):
            raise CheckpointError(f"{storage.display(target)} is not where begin({step}) put checkpoint {step}")
        atomic_write_json(storage.join(target, META_FILE), {**meta, "step": int(step)})
        storage.write_text(storage.join(target, COMPLETE_FILE), f"{step}\n")
        self._prune()
        if _on_commit is not None:
            _on_commit(int(step), target)
        return target

    def _complete(self) -> list[tuple[int, str]]:
        """(step, path) of every complete checkpoint, oldest first."""
        found: list[tuple[int, str]] = []
        for name in storage.listdir(self.root):
            match = _STEP_DIR.match(name)
            path = storage.join(self.root, name)
            if not match or not storage.exists(storage.join(path, COMPLETE_FILE)):
                continue
            try:
                meta = read_meta(path)
            except CheckpointError:
                continue
            if meta["step"] == int(match.group(1)):
                found.append((meta["step"], path))
        return sorted(found)

    def _prune(self) -> None:
        if self.keep == 0:
            return
        for _, path in self._complete()[:-self.keep]:
            if self.remote:  # unmarked first, so a prune cut short leaves no "complete" half
                storage.remove(storage.join(path, COMPLETE_FILE))
            storage.remove(path)

    def _remove_stale(self, committed_step: int) -> None:
        """Remove temp dirs left by crashed runs; this process's own in-progress later steps are kept."""
        for name in os.listdir(self.root):
            match = _SCRATCH_DIR.match(name)
            if not match:
                continue
            step, pid = int(match.group(1)), int(match.group(2))
            if pid != os.getpid() or step <= committed_step:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def latest(self) -> str | None:
        """The newest complete checkpoint, or None; temp and unmarked directories are never returned."""
        complete = self._complete()
        return complete[-1][1] if complete else None

    def list(self) -> list[str]:
        """Every complete checkpoint, oldest first."""
        return [path for _, path in self._complete()]


def save_rng_state() -> dict:
    """Python, numpy and torch (and CUDA) RNG states as tensors, lists and numbers only, for weights_only loads."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict) -> None:
    """Restore the RNG states from `save_rng_state`; CUDA states are restored only when the device count matches."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_rng(path: str) -> None:
    """Write this process's RNG state to `path` atomically (one file per rank: the caller names it)."""
    with files.replacing(path) as tmp:
        torch.save(save_rng_state(), tmp)


def load_rng(path: str) -> None:
    """Restore the RNG state written by `save_rng`; weights_only=True, so a tampered file cannot run code."""
    try:
        state = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path}: not an RNG state file ({type(error).__name__}); "
                              f"resume from another checkpoint") from error
    load_rng_state(state)
