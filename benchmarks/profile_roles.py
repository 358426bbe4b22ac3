"""Where the time goes: py-spy on the controller and on every role's rank while the real code runs.

`ppo`: PPO iterations on Ray (`rlhf.drivers.ppo.start_roles` + `PPOTrainer`), sampled after one warm-up iteration.
`rm`: `rlhf.drivers.rm.run_rm` on the K = 4 lists; the rank is sampled from the moment it starts, and the summary
keeps the stacks under `rm_step` (the training steps) apart from setup.

Each process gets py-spy's raw stacks (collapsed format: feed them to flamegraph.pl or speedscope) and
summary.txt lists, per process, the functions with the most samples of their own and in total.

    python benchmarks/profile_roles.py ppo [--iterations 4] [--prompts 32] [--max-new-tokens 24] [--set KEY=VALUE]
    python benchmarks/profile_roles.py rm [--epochs 2]
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, PPOSide, cpus_needed, local_ray, parser, ppo_config, workspace  # noqa: E402


RATE = 100  # samples per second and process


class Spy:
    """py-spy record on a set of processes, raw stacks to out_dir/<name>.txt; `stop()` makes them write."""

    def __init__(self, out_dir: Path, rate: int = RATE):
        self.out_dir, self.rate = out_dir, rate
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not os.path.exists(exe):
            raise SystemExit("py-spy is not installed; `pip install py-spy` into the virtualenv")
        self.exe = exe
        self.procs: dict[str, subprocess.Popen] = {}
        out_dir.mkdir(parents=True, exist_ok=True)

    def attach(self, name: str, pid: int) -> None:
        # Non-blocking sampling: the target is never paused, so the profile does not slow what it measures.
        self.procs[name] = subprocess.Popen(
            [self.exe, "record", "--pid", str(pid), "--format", "raw", "--nolineno", "--nonblocking",
             "--rate", str(self.rate), "--output", str(self.out_dir / f"{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def read_stacks(path: Path, under: str = "") -> collections.Counter:
    """Collapsed stacks (root first) and their sample counts; with `under`, only stacks through that function,
    cut so they start there."""
    stacks: collections.Counter = collections.Counter()
    if not path.exists():
        return stacks
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if under:
            hits = [i for i, f in enumerate(frames) if _name(f) == under]
            if not hits:
                continue
            frames = frames[hits[0]:]
        stacks[tuple(frames)] += int(count)
    return stacks


# Worker and controller methods whose share of a process's samples says which phase its time goes to.
METHODS = ("generate", "logprobs", "reference_logprobs", "score", "values", "ppo_step", "value_step", "rm_step",
           "backward_step", "update", "gae", "rollouts")


def _name(frame: str) -> str:
    return frame.split(" ")[0].rsplit(".", 1)[-1]


def _method(frame: str) -> str:
    """The frame's function name when it is one of METHODS in this repository's code (or Ray's `put`), else ""."""
    name, where = _name(frame), frame[frame.rfind("(") + 1:-1]
    if name in METHODS and where.startswith(("actors/", "rlhf/", "reward/")):
        return name
    return "ray.put" if name == "put" and where.startswith("ray/") else ""


def summarize(name: str, stacks: collections.Counter, top: int = 12, per: float = 0.0) -> str:
    """The worker methods' shares, then the functions with the most samples of their own and in total (a frame
    counted once per stack); with `per` (sampled iterations x rate), also seconds per iteration."""
    total = sum(stacks.values())
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    methods: collections.Counter = collections.Counter()
    for frames, count in stacks.items():
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        for method in {_method(f) for f in frames} - {""}:
            methods[method] += count
    seconds = f", {total / per:.3f} s of samples per iteration" if per else ""
    lines = [f"== {name}: {total} samples{seconds}"]
    if methods:
        shares = (f"{m} {100 * c / max(1, total):.0f}%" for m, c in methods.most_common())
        lines.append("  by method: " + ", ".join(shares))
    for title, counter in (("own", own), ("total", inclusive)):
        lines.append(f"  top by {title} samples:")
        lines += [f"    {100 * c / max(1, total):5.1f}%  {frame}" for frame, c in counter.most_common(top)]
    return "\n".join(lines)


def profile_ppo(args: argparse.Namespace, out_dir: Path) -> str:
    cfg = ppo_config([f"seed={args.seed}", f"ppo.prompts_per_iteration={args.prompts}",
                      f"generation.max_new_tokens={args.max_new_tokens}", *args.set])
    with workspace(args, [args.arch], seed=args.seed) as ws, local_ray(num_cpus=cpus_needed(cfg)):
        ray_side = PPOSide(cfg, ws.models[args.arch], ws.models[args.arch], ws.data["prompts_train"])
        try:
            ray_side.iteration()  # warm-up, not sampled
            spy = Spy(out_dir)
            spy.attach("controller", os.getpid())
            for role, ranks in ray_side.roles.placement().items():
                for rank, info in enumerate(ranks):
                    spy.attach(f"{role}{rank}", info["pid"])
            time.sleep(1.0)  # let py-spy attach before the first sampled iteration
            runs = [ray_side.iteration() for _ in range(args.iterations)]
            spy.stop()
        finally:
            ray_side.close()
    phases = "\n".join(f"iteration {i + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in r.items())
                       for i, r in enumerate(runs))
    per = args.iterations * RATE
    files = [p for p in sorted(out_dir.glob("*.txt")) if p.name != "summary.txt"]
    parts = [summarize(p.stem, read_stacks(p), per=per) for p in files]
    return phases + "\n\n" + "\n\n".join(parts)


def _watch_for(name: str, spy: Spy, stop: threading.Event) -> None:
    """Attach to the first descendant process whose title starts with `name` (a Ray actor of this driver)."""
    import psutil
    me = psutil.Process()
    while not stop.is_set():
        for child in me.children(recursive=True):
            try:
                if " ".join(child.cmdline()).startswith(name):
                    spy.attach("reward0", child.pid)
                    return
            except psutil.Error:
                continue
        time.sleep(0.05)


def profile_rm(args: argparse.Namespace, out_dir: Path) -> str:
    from benchmarks.rm_vs_trl import rm_config
    from rlhf.drivers.rm import run_rm
    with workspace(args, ["llama"], seed=args.seed) as ws, local_ray(num_cpus=2):
        rm_args = argparse.Namespace(seed=args.seed, epochs=args.epochs, lists_per_step=16, micro_lists=4, lr=1e-3,
                                     warmup=5, ranks=1)
        spy, stop = Spy(out_dir), threading.Event()
        spy.attach("controller", os.getpid())
        watcher = threading.Thread(target=_watch_for, args=("ray::RMWorker", spy, stop), daemon=True)
        watcher.start()
        cfg = rm_config(rm_args, ws)
        cfg.model.path, cfg.data.train = ws.models["llama"], ws.data["ranked4_train"]
        summary = run_rm(cfg, f"{ws.root}/rm")
        stop.set()
        spy.stop()
    head = f"run_rm: {summary['train_pairs']} pairs in {summary['train_seconds']:.2f} s " \
           f"({summary['train_pairs_per_s']:.0f} pairs/s), held-out accuracy {summary['pairwise_accuracy']:.3f}"
    parts = [summarize("controller (training loop)", read_stacks(out_dir / "controller.txt", under="run_rm")),
             summarize("reward rank 0 (rm_step only)", read_stacks(out_dir / "reward0.txt", under="rm_step"))]
    return head + "\n\n" + "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], reps=1)
    p.add_argument("what", choices=["ppo", "rm"])
    p.add_argument("--iterations", type=int, default=4, help="ppo: sampled iterations")
    p.add_argument("--prompts", type=int, default=32, help="ppo: prompts per iteration")
    p.add_argument("--max-new-tokens", type=int, default=24, help="ppo: reply length")
    p.add_argument("--arch", default="codegen", choices=["codegen", "llama"], help="ppo: model architecture")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="ppo: a config override, as `rlhf ppo --set` (e.g. ppo.estimator=grpo)")
    p.add_argument("--epochs", type=int, default=2, help="rm: epochs over 256 K = 4 lists")
    args = p.parse_args(argv)
    out_dir = (Path(args.out) if args.out else RESULTS_DIR) / f"profile-{args.what}"
    shutil.rmtree(out_dir, ignore_errors=True)
    text = profile_ppo(args, out_dir) if args.what == "ppo" else profile_rm(args, out_dir)
    (out_dir / "summary.txt").write_text(text + "\n", encoding="utf-8")
    print(f"{text}\n\n-> {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
