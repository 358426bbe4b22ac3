"""What every training command shares: its output directory, checkpoints and resume, and recovery from a dead rank.

A run's output holds final/, metrics.jsonl, tensorboard/, checkpoints/ and the resolved config.yaml (DESIGN.md).
The output may be an object-store URI (`rlhf.storage`): then the ranks upload their checkpoint parts and final/ there
themselves, and what the driver writes (metrics, TensorBoard, config) goes to a local staging directory that is
uploaded before each checkpoint is sealed and when the run ends.
`recover` runs a command's training from its last complete checkpoint; when a rank dies anywhere (start-up, a
step, an evaluation, a checkpoint save) it stops the groups, starts new ones and goes again from the last complete
checkpoint, at most `ray.max_restarts` times. A checkpoint being written when the rank died was never marked
complete, so it is never taken.
"""
from __future__ import annotations

import os
import random
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from actors.faults import fault_point
from actors.local import LocalBackend
from actors.rank import RankSpec
from rlhf import storage
from rlhf.checkpoint import CheckpointManager, read_meta
from rlhf.config import ConfigError, as_dict, command_of, save_config
from rlhf.metrics import MetricsLogger, Progress, open_wandb, run_tags
from rlhf.preemption import Preempted, on_sigterm, preempted
from rlhf.roles import RankDied, Trainer


STAGED_AWAY = ("checkpoints", "final")
"""What the ranks write to an object-store output themselves; the rest of the run's files are staged by the driver."""


@dataclass
class RunDir:
    root: str
    """The local directory the driver writes metrics, TensorBoard and the config into (the output, or its staging
    directory when the output is a URI)."""
    metrics: MetricsLogger
    checkpoints: CheckpointManager
    resume_from: Optional[str]
    location: str = ""
    """Where the run lives: the output as given (a path or a URI); empty means `root`."""
    cfg: Any = None
    """The run's resolved config (what recovery reads of `ray`)."""

    @property
    def final(self) -> str:
        return storage.join(self.location or self.root, "final")

    def sync(self) -> None:
        """Upload the staged files to the output URI (nothing to do for a local output)."""
        if self.location and storage.is_uri(self.location):
            storage.upload(self.root, self.location)
            storage.mirror(self.root, self.location, "tensorboard")


def open_run(output: str, cfg: Any, resume: bool) -> RunDir:
    """Create (or reopen, with --resume) an output directory and write the resolved config into it."""
    storage.check(output)
    checkpoints = CheckpointManager(storage.join(output, "checkpoints"), keep=cfg.train.keep_checkpoints)
    latest = checkpoints.latest() if resume else None
    if not resume and checkpoints.latest():
        raise SystemExit(f"{storage.display(output)}: holds checkpoints of an earlier run; pass --resume to continue "
                         "it or choose another --output")
    root = output
    if storage.is_uri(output):
        root = tempfile.mkdtemp(prefix="rlhf-run-")
        if latest:  # the metrics and TensorBoard so far, to be cut back to the checkpoint and continued
            storage.download(output, root, skip=STAGED_AWAY)
    os.makedirs(root, exist_ok=True)
    save_config(cfg, os.path.join(root, "config.yaml"))
    metrics = MetricsLogger(root, tensorboard=cfg.logging.tensorboard, resume=latest is not None,
                            tags=run_tags(command_of(cfg), output.partition("?")[0].rstrip("/")))
    if latest:
        metrics.truncate_after(int(read_meta(latest)["step"]))
    if cfg.logging.wandb:
        log = cfg.logging
        metrics.wandb = open_wandb(root, os.path.basename(output.partition("?")[0].rstrip("/")), log.wandb_project,
                                   log.wandb_mode, as_dict(cfg), resume=latest is not None)
    run = RunDir(root, metrics, checkpoints, latest, output, cfg)
    if root != output:
        run.sync()  # the config is there from the start
        metrics.on_close = lambda: (run.sync(), shutil.rmtree(root, ignore_errors=True))
    return run


def save_checkpoint(run: RunDir, trained: Sequence[Any], step: int, meta: dict) -> str:
    """Every trained role writes its engines into one temp dir; the dir becomes a checkpoint only when all are done."""
    tmp = run.checkpoints.begin(step)
    for future in [role.save_checkpoint(tmp) for role in trained]:
        future.result()
    run.sync()  # on an object store, the metrics up to this step are there before the checkpoint is sealed
    fault_point("driver", 0, "commit")  # the fault tests' "driver killed with every part written, unsealed"
    return run.checkpoints.commit(step, tmp, {**meta, "step": step})


def checkpoint_at(run: RunDir, trained: Sequence[Any], step: int, meta: Callable[[], dict]) -> str:
    """The checkpoint of `step`: the latest complete one when it is that step's, else one written now (a preempted
    run's last act)."""
    latest = run.checkpoints.latest()
    if latest and int(read_meta(latest)["step"]) == step:
        return latest
    return save_checkpoint(run, trained, step, meta())


def load_checkpoint(trained: Sequence[Any], checkpoint: str) -> dict:
    """Every trained role reads its engines back; returns the checkpoint's meta."""
    for future in [role.load_checkpoint(checkpoint) for role in trained]:
        future.result()
    return read_meta(checkpoint)


def backend_for(cfg: Any, given: Any = None) -> Any:
    """Where the run's roles live: Ray role groups, or (`ray.in_process`, or a backend the caller gives) one rank
    each in this process; then every layout is one rank, so the batch arithmetic of `derive()` matches."""
    if given is None:
        if cfg.ray.in_process:
            given = LocalBackend()
        else:
            from actors.group import RayBackend  # imports Ray: not for a run in this process
            given = RayBackend(cfg.ray, command_of(cfg))
    if given.local:
        layouts = [getattr(cfg.roles, r).layout for r in ("policy", "reference", "reward", "prm", "critic")] \
            if hasattr(cfg, "roles") else [cfg.layout]
        for layout in layouts:
            layout.num_nodes = layout.gpus_per_node = 1
    return given


def one_group_plan(cfg: Any, records: int, what: str) -> tuple[Any, Any]:
    """The plan and the trained group's rank spec of a one-group run (SFT, RM, DPO); too few records for one global
    batch is one line."""
    if records < cfg.train.global_batch_size:
        raise SystemExit(f"{cfg.data.train}: {records} {what} is fewer than train.global_batch_size "
                         f"({cfg.train.global_batch_size})")
    plan = cfg.derive(records)
    return plan, RankSpec(cfg.model.path, cfg.role(), cfg.model, cfg.seed, trainable=True,
                          grad_accum=plan.grad_accum, total_steps=plan.total_steps)


def permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a function of (seed, epoch) alone, so a resumed run sees the same order."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class Stage:
    """Where a run is: what a dead rank interrupted, and the furthest step begun (what a restart loses)."""

    def __init__(self) -> None:
        self.where = "start-up"
        self.reached = 0

    def now(self, where: str, step: int = 0) -> None:
        self.where = where
        self.reached = max(self.reached, step)


def recover(command: str, run: RunDir, max_restarts: int, start: Callable[[], Any],
            train: Callable[[Any, int, Stage], dict]) -> dict:
    """`train(groups, restarts, stage)` on `start()`ed role groups (a backend's, `actors.group.Groups` or
    `actors.local.LocalGroups`), again on fresh ones after each dead rank; the groups are stopped when it returns or
    raises. When the rank went with its node, the new groups are placed on what is left if they fit there, after waiting up to
    `ray.node_wait_s` for the cluster to hold them again; otherwise the run stops in one line naming what is missing
    and the command that resumes (every committed checkpoint stays)."""
    stage = Stage()
    restarts = 0
    held: list = []  # the bundles the groups held when their rank died
    died = ""
    while True:
        groups = None
        starting = True
        try:
            stage.now("start-up")
            if held:
                _room_again(command, run, held, died)
            groups = start()
            starting = False
            return train(groups, restarts, stage)
        except RankDied as err:
            restarts += 1
            latest = run.checkpoints.latest()
            if restarts > max_restarts:
                raise SystemExit(f"{stage.where}: {err}; gave up after {restarts - 1} restart(s) "
                                 f"(ray.max_restarts={max_restarts}); see the Ray logs of that rank, then rerun "
                                 f"with --resume to continue from {_shown(latest)}") from None
            print(f"{command}: {err.who} died during {stage.where}; rebuilding the role groups from "
                  f"{_shown(latest)} (restart {restarts}/{max_restarts})", flush=True)
            died = f"{stage.where}: {err.who} died"
            if groups is not None:
                held = groups.held_bundles() or held
        except ConfigError as err:
            if not (restarts and starting):
                raise
            # The rebuilt groups could not be placed (the room check passed before the lost node was declared dead).
            raise SystemExit(_lost_line(command, run, died, str(err))) from None
        finally:
            if groups is not None:
                groups.stop()


def _shown(checkpoint: Optional[str]) -> str:
    return storage.display(checkpoint) if checkpoint else "the start"


def _room_again(command: str, run: RunDir, held: list, died: str) -> None:
    """Wait (ray.node_wait_s, saying for what) until the cluster could hold the groups again, or stop the run."""
    from actors.placement import room_for  # these import Ray, which a run in this process never needs
    from actors.runtime import short_of
    wait_s = run.cfg.ray.node_wait_s if run.cfg is not None else 0.0
    why = room_for(held, wait_s)
    if why is None:
        return
    short = short_of(held)
    raise SystemExit(_lost_line(command, run, died, f"{why}{f', {short} short' if short else ''} after "
                                                    f"ray.node_wait_s={wait_s:g} s"))


def _lost_line(command: str, run: RunDir, died: str, why: str) -> str:
    return (f"{died} and the cluster no longer holds the role groups ({why}); nothing committed is lost: once the "
            f"cluster has room again, continue from {_shown(run.checkpoints.latest())} with {resume_command(command)}")


def resume_command(command: str) -> str:
    """The command line that continues this run: this process's own with --resume when it is `rlhf COMMAND ...`."""
    argv = sys.argv[1:]
    if os.path.basename(sys.argv[0]) in ("rlhf", "__main__.py") and argv[:1] == [command]:
        return "rlhf " + shlex.join(argv + ([] if "--resume" in argv else ["--resume"]))
    return f"`rlhf {command} ... --resume` (the same arguments)"


def resumed(run: RunDir, restarts: int, stage: Stage, step: int, prefix: str, unit: str = "steps") -> None:
    """After a restart: drop what was logged past the checkpoint, and say (and log) what was lost."""
    if not restarts:
        return
    run.metrics.truncate_after(step)
    lost = max(0, stage.reached - step)
    print(f"{prefix}: resumed at {unit[:-1]} {step}, losing {lost} {unit}", flush=True)
    run.metrics.log(step, {f"{prefix}/restarts": restarts, f"{prefix}/{unit}_lost": lost})


@dataclass
class Loop:
    """What a command's training loop differs in; `run_loop` is the loop every command runs (resume, held-out
    evaluations before and after, preemption, periodic and final checkpoints, progress)."""
    command: str
    total: int
    """Steps (PPO: iterations) of the whole run."""
    trained: Sequence[Any]
    """The trained roles, whose engines each checkpoint holds."""
    restore: Callable[[dict], int]
    """A checkpoint's meta, its engines already loaded -> the step it resumes at (restoring the controller's state)."""
    meta: Callable[[int], dict]
    """The meta of a checkpoint at a step (`step` is added)."""
    step: Callable[[int], Optional[dict]]
    """Step i (0-based): train, log what it measured; returns what the progress shows, None when nothing ran."""
    finish: Callable[[dict, dict], dict]
    """After the final checkpoint: write final/ from (the evaluations before and after training); the summary."""
    evaluate: Optional[Callable[[], dict]] = None
    """Held-out metrics (`eval/...`), or None without a held-out file."""
    save_every: int = 0
    prefix: str = "train"
    """Of the restart metrics: `train/restarts`, `ppo/restarts`."""
    unit: str = "steps"
    every_s: float = 30.0
    progress: bool = True
    before: dict = field(default_factory=dict)
    """The evaluation before training, kept across restarts (a restart does not evaluate it again)."""


def run_loop(run: RunDir, stage: Stage, restarts: int, loop: Loop) -> dict:
    """The run from its last complete checkpoint (or the start) to final/. Called again after a rank died, on fresh
    groups (`recover`)."""
    latest = run.checkpoints.latest()
    start = 0
    if latest:
        stage.now(f"the restore of {latest}")
        start = loop.restore(load_checkpoint(loop.trained, latest))
    resumed(run, restarts, stage, start, loop.prefix, loop.unit)
    if loop.evaluate and not latest and not loop.before:
        loop.before = evaluated(run, stage, loop.evaluate, 0, "before training")
    progress = Progress(loop.total, desc=loop.command, enabled=loop.progress, initial=start, every_s=loop.every_s,
                        unit=loop.unit[:-1])
    for step in range(start, loop.total):
        if preempted():
            stage.now(f"the checkpoint of {loop.unit[:-1]} {step}", step)
            raise Preempted(loop.command, step, checkpoint_at(run, loop.trained, step, lambda: loop.meta(step)))
        done = step + 1
        stage.now(f"{loop.unit[:-1]} {done}", done)
        shown = loop.step(step)
        if shown is None:  # a skipped step (PPO: NaN scores) counts, but neither shows nor checkpoints
            continue
        progress.update(1, **shown)
        if loop.save_every and done % loop.save_every == 0 and done < loop.total:
            stage.now(f"the checkpoint of {loop.unit[:-1]} {done}", done)
            save_checkpoint(run, loop.trained, done, loop.meta(done))
    progress.close()
    if start < loop.total or not latest:  # (the checkpoint resumed from may be pruned by now: never re-read it)
        stage.now("the final checkpoint", loop.total)
        save_checkpoint(run, loop.trained, loop.total, loop.meta(loop.total))
    after = evaluated(run, stage, loop.evaluate, loop.total, "after training") if loop.evaluate else {}
    stage.now("the save of final/", loop.total)
    return loop.finish(loop.before, after)


def evaluated(run: RunDir, stage: Stage, evaluate: Callable[[], dict], step: int, when: str) -> dict:
    """The held-out metrics now, logged at `step`."""
    stage.now(f"the held-out evaluation {when}", step)
    metrics = evaluate()
    if metrics:
        run.metrics.log(step, metrics)
    return metrics


@dataclass
class Supervised:
    """What `rlhf sft`, `rlhf rm` and `rlhf dpo` differ in; `train_supervised` runs the rest."""
    role: str
    """The trained group's name (the checkpoint tag of its engines)."""
    worker: type
    records: list
    """The encoded training records (dialogues, ranked lists), in file order."""
    step: Callable[[Trainer, list, int], dict]
    """One optimizer step on these records in this epoch -> its `train/...` metrics."""
    evaluate: Optional[Callable[[Trainer], dict]]
    """Held-out metrics (`eval/...`), or None without a held-out file."""
    finish: Callable[[Trainer, dict, dict], dict]
    """After the last step: write final/ from (the evaluations before and after training); returns the summary."""
    shown: Callable[[dict], dict]
    """What the progress bar shows of a step's metrics."""
    others: dict = field(default_factory=dict)
    """Groups started beside the trained one: name -> (worker class, RankSpec) (DPO's frozen reference)."""
    started: Optional[Callable[[Any], None]] = None
    """Called with the started groups before training, again after a restart (DPO: the reference's pass)."""


def train_supervised(command: str, cfg: Any, plan: Any, run: RunDir, backend: Any, spec: Any, job: Supervised) -> dict:
    """The loop of a one-group training run: seeded epochs of global batches, held-out evaluations, checkpoints,
    final/; resumed from the last complete checkpoint, and recovered (`recover`) when a rank dies."""
    batch, t = cfg.train.global_batch_size, cfg.train
    run.metrics.tags["role"] = job.role  # every metric of this loop measures the trained group's steps
    before: dict = {}

    def attempt(groups: Any, restarts: int, stage: Stage) -> dict:
        trainer = Trainer(groups.groups[job.role])
        if job.started:
            stage.now("the preparation of the groups")
            job.started(groups)

        def step(i: int) -> dict:
            epoch, index = divmod(i, plan.steps_per_epoch)
            done = i + 1
            order = permutation(len(job.records), cfg.seed, epoch)[index * batch:(index + 1) * batch]
            metrics = job.step(trainer, [job.records[k] for k in order], epoch)
            evaluating = bool(job.evaluate and t.eval_every and done % t.eval_every == 0)
            if evaluating:
                stage.now(f"the held-out evaluation of step {done}", done)
                metrics |= job.evaluate(trainer)
            if done % t.log_every == 0 or done == plan.total_steps or evaluating:
                run.metrics.log(done, metrics)
            return job.shown(metrics)

        loop = Loop(command, plan.total_steps, [trainer], restore=lambda meta: int(meta["step"]),
                    # a checkpoint's epoch: that of the step it resumes at; the final's, the run's last
                    meta=lambda i: {"epoch": t.epochs if i == plan.total_steps else divmod(i, plan.steps_per_epoch)[0]},
                    step=step, finish=lambda before, after: job.finish(trainer, before, after),
                    evaluate=(lambda: job.evaluate(trainer)) if job.evaluate else None, save_every=t.save_every,
                    every_s=cfg.logging.progress_every_s, progress=cfg.logging.progress, before=before)
        try:
            return run_loop(run, stage, restarts, loop)
        finally:
            before.update(loop.before)

    backend.open(plan.world * cfg.layout.cpus_per_rank * (1 + len(job.others)))
    try:
        with on_sigterm(cfg.ray.preempt_grace_s):
            return recover(command, run, cfg.ray.max_restarts,
                           lambda: backend.start({job.role: (job.worker, spec), **job.others}), attempt)
    finally:
        run.metrics.close()
        backend.close()
