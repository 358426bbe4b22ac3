"""`rlhf sweep`: a Ray Tune sweep over any config key of a training command (rlhf.commands; docs/sweeps.md).

Every trial is a whole run in its own directory, on role groups placed inside the trial's placement group, so
trials queue for the cluster instead of oversubscribing it; a trial the cluster can never hold stops the sweep
before Tune starts. Each logged step reaches Tune through the metrics logger's reporter hook, each committed
checkpoint through the checkpoint manager's commit hook (PBT restores them); the trial's controller and ranks say
in Ray's dashboard which trial they are, and its metrics reach Ray's tagged with the trial id. With an object-store
--output (`rlhf.storage`) Tune keeps its experiment there (`storage_filesystem`) and every trial's run writes there too.
"""
from __future__ import annotations

import json
import numbers
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlhf import storage
from rlhf.commands import COMMANDS, command
from rlhf.config import ConfigError, get_key, load_config, save_config, set_key, to_yaml

SEARCH_TYPES = ("grid", "choice", "uniform", "loguniform")
EXPERIMENT = "tune"
"""Tune's experiment directory under --output (what `--resume` restores)."""
_SCHEDULER_PARAMS = {
    "none": (),
    "asha": ("time_attr", "max_t", "grace_period", "reduction_factor", "brackets"),
    "pbt": ("time_attr", "perturbation_interval", "burn_in_period", "quantile_fraction", "resample_probability",
            "synch"),
}


@dataclass
class SearchParam:
    type: str = MISSING
    """grid (every value, in order), choice (sampled), uniform or loguniform (sampled in [low, high])."""
    values: Optional[list[Any]] = None
    """grid, choice: the values."""
    low: Optional[float] = None
    """uniform, loguniform: the lower bound."""
    high: Optional[float] = None
    """uniform, loguniform: the upper bound."""


@dataclass
class SchedulerSpec:
    type: str = "none"
    """none (every trial runs to the end), asha (stops weak trials early) or pbt (Population Based Training)."""
    time_attr: Optional[str] = None
    """The result field that counts progress; default `step` (the run's optimizer step, PPO: iteration)."""
    max_t: Optional[int] = None
    """asha: the longest a trial runs in time_attr units; default the run's train.max_steps / ppo.iterations."""
    grace_period: Optional[int] = None
    """asha: the least a trial runs before it can be stopped; default 1."""
    reduction_factor: Optional[float] = None
    """asha: 1/reduction_factor of the trials go on at each rung; default 2."""
    brackets: Optional[int] = None
    """asha: number of brackets; default 1."""
    perturbation_interval: Optional[int] = None
    """pbt: steps between exploit/explore; default train.save_every, and must be a multiple of it."""
    burn_in_period: Optional[int] = None
    """pbt: steps before the first perturbation; default 0."""
    quantile_fraction: Optional[float] = None
    """pbt: the share of trials that copy from the best share; default 0.25."""
    resample_probability: Optional[float] = None
    """pbt: chance a value is resampled from the search space instead of perturbed; default 0.25."""
    synch: Optional[bool] = None
    """pbt: every trial waits for the others at each perturbation, so the weakest always copies the best's checkpoint
    of that step (otherwise a trial may find no checkpoint yet to copy); default false."""


@dataclass
class SweepSpec:
    command: str = MISSING
    """The command swept: sft, rm, dpo or ppo."""
    base_config: str = ""
    """The command's YAML config (e.g. configs/tiny/rm.yaml); empty means the defaults."""
    args: dict[str, str] = field(default_factory=dict)
    """The command's flags without the dashes (sft, rm, dpo: model, data; ppo: policy, reward, prompts): paths
    relative to the working directory or the repository root."""
    overrides: list[str] = field(default_factory=list)
    """key.path=value overrides of the base config, the same for every trial."""
    search: dict[str, SearchParam] = field(default_factory=dict)
    """Config key (e.g. optim.lr) -> how to search it."""
    num_samples: int = 1
    """Trials per point of the grid (or in all, without a grid)."""
    metric: str = MISSING
    """The metric to optimise, as the run logs it (e.g. eval/loss, eval/pairwise_accuracy, ppo/reward_raw)."""
    mode: str = "max"
    """max or min."""
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    max_concurrent_trials: int = 0
    """0: as many as the cluster has room for."""
    driver_cpus: float = 1.0
    """CPUs the trial's controller (bundle 0 of its placement group) reserves beside the role groups' bundles."""


def _where(path: Optional[str]) -> str:
    return f"{path}: " if path else "--set "


def load_spec(path: Optional[str], overrides: list[str]) -> SweepSpec:
    """Read a sweep YAML; `--set` keys of the sweep file apply to it, any other key becomes a base-config override."""
    spec_keys = {f.name for f in fields(SweepSpec)}
    mine, theirs = [], []
    for item in overrides:
        key = item.split("=", 1)[0]
        if key.startswith("search."):
            raise ConfigError(f"--set {key}: change the search block in the sweep file; its keys contain dots")
        (mine if key.split(".")[0] in spec_keys else theirs).append(item)
    try:
        merged = OmegaConf.structured(SweepSpec)
        if path:
            if not os.path.exists(path):
                raise ConfigError(f"{path}: sweep file does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if mine:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(mine))
        spec: SweepSpec = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = " ".join(str(getattr(err, "msg", None) or err).split()).split(" full_key:")[0]
        raise ConfigError(f"{_where(path)}{key + ': ' if key else ''}{msg}") from None
    spec.overrides = list(spec.overrides) + theirs
    _check_spec(spec, path)
    return spec


def _check_spec(spec: SweepSpec, path: Optional[str]) -> None:
    where = _where(path)
    swept = command(spec.command, where)
    takes = {flag.arg: flag for flag in swept.flags}
    for name in spec.args:
        if name not in takes:
            raise ConfigError(f"{where}args.{name}: not a flag of rlhf {spec.command} (it takes {', '.join(takes)})")
    for name, flag in takes.items():
        if flag.required and not spec.args.get(name):
            raise ConfigError(f"{where}args.{name}: `rlhf {spec.command}` needs it ({flag.help})")
    if spec.mode not in ("min", "max"):
        raise ConfigError(f"{where}mode: {spec.mode!r} is not one of min, max")
    if spec.num_samples < 1:
        raise ConfigError(f"{where}num_samples: must be at least 1, got {spec.num_samples}")
    if spec.max_concurrent_trials < 0:
        raise ConfigError(f"{where}max_concurrent_trials: must be 0 (no limit) or more")
    if not spec.search:
        raise ConfigError(f"{where}search: name at least one config key to search, e.g. optim.lr")
    for key, p in spec.search.items():
        if p.type not in SEARCH_TYPES:
            raise ConfigError(f"{where}search.{key}.type: {p.type!r} is not one of {', '.join(SEARCH_TYPES)}")
        if p.type in ("grid", "choice"):
            if not p.values or p.low is not None or p.high is not None:
                raise ConfigError(f"{where}search.{key}: {p.type} takes a non-empty `values` list and no low/high")
        else:
            if p.values is not None or p.low is None or p.high is None or not p.low < p.high:
                raise ConfigError(f"{where}search.{key}: {p.type} takes low < high and no values")
            if p.type == "loguniform" and p.low <= 0:
                raise ConfigError(f"{where}search.{key}.low: loguniform needs low > 0, got {p.low}")
    sched = spec.scheduler
    if sched.type not in _SCHEDULER_PARAMS:
        raise ConfigError(f"{where}scheduler.type: {sched.type!r} is not one of none, asha, pbt")
    for f in fields(SchedulerSpec):
        if f.name != "type" and getattr(sched, f.name) is not None and f.name not in _SCHEDULER_PARAMS[sched.type]:
            takes = ", ".join(_SCHEDULER_PARAMS[sched.type]) or "no parameters"
            raise ConfigError(f"{where}scheduler.{f.name}: not a parameter of {sched.type} (it takes {takes})")


def _override(key: str, value: Any) -> str:
    """`key=value` as load_config reads it; Tune's samples may be numpy scalars."""
    if isinstance(value, bool) or value is None:
        text = {True: "true", False: "false", None: "null"}[value]
    elif isinstance(value, numbers.Integral):
        text = str(int(value))
    elif isinstance(value, numbers.Real):
        text = repr(float(value))
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return f"{key}={text}"


def trial_overrides(config: dict) -> list[str]:
    return [_override(k, v) for k, v in sorted(config.items())]


def _resolve(path: str) -> str:
    """An absolute path: as given, else relative to the working directory, else to the repository root."""
    if not path or os.path.isabs(path):
        return path
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for base in (os.getcwd(), root):
        if os.path.exists(os.path.join(base, path)):
            return os.path.abspath(os.path.join(base, path))
    return path  # a hub id, or a missing file the command itself reports


def _base_config(spec: SweepSpec) -> Any:
    """The base config, the command's flags filled in, every local path made absolute (trials run in other working
    directories) and checked as the command itself checks them, before Tune starts."""
    swept = COMMANDS[spec.command]
    cfg = swept.fill(load_config(spec.command, _resolve(spec.base_config) or None, spec.overrides), spec.args)
    for key in swept.path_keys():
        set_key(cfg, key, _resolve(get_key(cfg, key)))
    spec.args = {name: _resolve(value) for name, value in spec.args.items()}
    swept.check_inputs(cfg)
    return cfg


def _check_search(spec: SweepSpec, where: str) -> None:
    """Every searched key is a real key of the command's config and every value passes the config's own checks."""
    base_path = _resolve(spec.base_config) or None
    for key, p in spec.search.items():
        samples = p.values if p.type in ("grid", "choice") else [p.low, p.high]
        for value in samples:
            try:
                load_config(spec.command, base_path, spec.overrides + [_override(key, value)])
            except ConfigError as err:
                msg = str(err)
                for prefix in (f"{base_path}: ", "--set ", f"{key}: "):
                    msg = msg[len(prefix):] if msg.startswith(prefix) else msg
                raise ConfigError(f"{where}search.{key}: {msg} (value {value!r})") from None


def trial_plan(cfg: Any, use_gpu: bool) -> Any:
    """The role groups' bundles as the planner lays them out for the run (the run takes exactly those bundles of
    the trial's placement group)."""
    from actors.placement import plan_placement
    return plan_placement(cfg.layouts(), use_gpu)


def check_trial_fits(spec: SweepSpec, plan: Any, strategy: str, wait_s: float, started_ray: bool,
                     where: str) -> None:
    """Stop before Tune starts when the cluster can never hold one trial, which Tune would leave PENDING forever
    (after `ray.wait_for_nodes_s` for nodes to join): what a trial needs, what the cluster lacks, what to change."""
    from actors.placement import room_for, show, total, what_to_change
    bundles = plan.trial_bundles(spec.driver_cpus)
    why = room_for([(bundles, strategy)], wait_s)
    if why is None:
        return
    keys = "layout" if "layout" in {f.name for f in fields(COMMANDS[spec.command].config)} else "roles.<role>.layout"
    raise ConfigError(f"{where}one trial needs {show(total(bundles))} ({spec.driver_cpus:g} CPU for its controller, "
                      f"driver_cpus; {plan.describe()}) but {why}; "
                      f"{what_to_change(keys, why, started_ray, ' (overrides), driver_cpus')}")


# --- inside a trial ---------------------------------------------------------------------------------------------

class TuneReporter:
    """Turns a run's logged steps and committed checkpoints into `tune.report` calls.

    A step is reported as soon as it is logged, unless a checkpoint is due at it (every train.save_every steps and
    at the last one): the trainers commit a step's checkpoint just after logging it, and PBT must get a result and
    the checkpoint of the same step in one report. Values carry forward, so every report holds the sweep's metric
    once it has been measured (Tune rejects a result without it)."""

    def __init__(self, metric: str, checkpoint_due: Callable[[int], bool]):
        self.metric = metric
        self.checkpoint_due = checkpoint_due
        self.values: dict[str, float] = {}
        self.step: Optional[int] = None
        self.checkpoint: Optional[str] = None

    def log(self, step: int, values: dict) -> None:
        if self.step is not None and step != self.step:
            self.flush()
        self.values.update(values)
        self.step = step
        if not self.checkpoint_due(step):
            self.flush()

    def commit(self, step: int, path: str) -> None:
        if self.step is not None and step != self.step:
            self.flush()
        self.step, self.checkpoint = step, path
        self.flush()

    def flush(self) -> None:
        if self.step is None or self.metric not in self.values:
            return
        from ray import tune
        checkpoint = None
        if self.checkpoint and storage.is_uri(self.checkpoint):  # Tune copies it within the store
            checkpoint = tune.Checkpoint(*reversed(storage.filesystem(self.checkpoint)))
        elif self.checkpoint:
            checkpoint = tune.Checkpoint.from_directory(self.checkpoint)
        tune.report({**self.values, "step": self.step}, checkpoint=checkpoint)
        self.step, self.checkpoint = None, None


def _prepare_run_dir(run_dir: str, checkpoint: Any) -> Optional[int]:
    """Start the run from Tune's checkpoint (a restore: PBT, a paused or failed trial, `--resume`) or afresh;
    returns the restored step, None when afresh.

    Tune's checkpoint is the truth: it may come from another trial (PBT exploit), so the run's own are dropped."""
    from rlhf.checkpoint import CheckpointManager, read_meta
    ckpts = storage.join(run_dir, "checkpoints")
    storage.remove(ckpts)
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as src:
        step = int(read_meta(src)["step"])
        target = CheckpointManager(ckpts).path(step)
        if storage.is_uri(target):
            storage.upload(src, target)
        else:
            shutil.copytree(src, target)
    return step


def run_trial(config: dict, job: dict) -> None:
    """Tune's function trainable: one whole run of the swept command with this trial's values."""
    from ray import tune
    from rlhf.checkpoint import set_commit_hook
    from rlhf.metrics import set_reporter

    from rlhf.metrics import Trial, set_trial

    ctx = tune.get_context()
    run_dir = storage.join(job["experiment_dir"], ctx.get_trial_id(), "run")
    sweep = os.path.basename(os.path.dirname(job["experiment_dir"].partition("?")[0].rstrip("/")))
    trial = Trial(sweep, ctx.get_trial_id(), searched(config))
    base_config = job["base_config"]
    if not os.path.exists(base_config):  # a node without the driver's filesystem (an object-store --output)
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, encoding="utf-8") as f:
            f.write(job["base_config_yaml"])
        base_config = f.name
    cfg = load_config(job["command"], base_config, trial_overrides(config) + ["logging.progress=false"])
    restored = _prepare_run_dir(run_dir, tune.get_checkpoint())
    if restored is not None:
        print(f"trial {trial.id}: continues from the checkpoint of step {restored} (a restart after a failure, "
              "--resume, or a PBT exploit)", flush=True)
    every, last = cfg.train.save_every, cfg.horizon()
    reporter = TuneReporter(job["metric"], lambda step: step > 0 and (bool(every and step % every == 0)
                                                                       or bool(last and step >= last)))
    previous = set_reporter(reporter.log), set_commit_hook(reporter.commit), set_trial(trial)
    try:
        COMMANDS[job["command"]].run()(cfg, run_dir, restored is not None)
    except SystemExit as err:  # an error inside the run: the trial's error, once FailureConfig's retries are spent
        raise RuntimeError(str(err)) from None
    finally:
        set_reporter(previous[0])
        set_commit_hook(previous[1])
        set_trial(previous[2])
    reporter.flush()


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def searched(config: dict) -> str:
    """A trial's searched values as its actors' reprs show them: `optim.lr=0.0003 rm.label_smoothing=0.1`."""
    return " ".join(f"{key}={_cell(value)}" for key, value in sorted(config.items()))


def trainable(job: dict, resources: Any) -> type:
    """Tune's function trainable of `run_trial`, whose actor (the trial's controller) says in Ray's dashboard which
    trial it is. It keeps Tune's class name, ImplicitFunc, so `ray list actors` reads as Tune's users know it."""
    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function
    base = wrap_function(tune.with_resources(tune.with_parameters(run_trial, job=job), resources))

    class ImplicitFunc(base):  # type: ignore[misc, valid-type]
        def __repr__(self) -> str:
            # Ray asks for the repr once the actor is built, when Tune has given it its trial and values.
            from rlhf.metrics import Trial
            return f"{job['command']} controller of {Trial('', self.trial_id, searched(self.config))}"

    return ImplicitFunc


# --- the driver --------------------------------------------------------------------------------------------------

def _param_space(spec: SweepSpec) -> dict:
    from ray import tune
    make = {"grid": lambda p: tune.grid_search(list(p.values)), "choice": lambda p: tune.choice(list(p.values)),
            "uniform": lambda p: tune.uniform(p.low, p.high), "loguniform": lambda p: tune.loguniform(p.low, p.high)}
    return {key: make[p.type](p) for key, p in spec.search.items()}


def _scheduler(spec: SweepSpec, cfg: Any, where: str) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    s = spec.scheduler
    time_attr = s.time_attr or "step"
    if s.type == "asha":
        max_t = s.max_t or cfg.horizon()
        if not max_t:
            raise ConfigError(f"{where}scheduler.max_t: set it, or set train.max_steps in the overrides")
        # stop_last_trials=False: a trial that reaches max_t finishes its run (final eval, final/) instead of
        # being killed at its last report.
        return ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=s.grace_period or 1,
                             reduction_factor=s.reduction_factor or 2, brackets=s.brackets or 1,
                             stop_last_trials=False)
    if s.type == "pbt":
        every = cfg.train.save_every
        interval = s.perturbation_interval or every
        if not every or interval % every:
            raise ConfigError(f"{where}scheduler.perturbation_interval: PBT restores checkpoints, so it must be a "
                              f"multiple of train.save_every ({every}), which must be above 0")
        mutations = {key: (list(p.values) if p.type in ("grid", "choice") else
                           (tune.uniform if p.type == "uniform" else tune.loguniform)(p.low, p.high))
                     for key, p in spec.search.items()}
        return PopulationBasedTraining(
            time_attr=time_attr, perturbation_interval=interval, burn_in_period=s.burn_in_period or 0,
            hyperparam_mutations=mutations, quantile_fraction=s.quantile_fraction or 0.25,
            resample_probability=s.resample_probability if s.resample_probability is not None else 0.25,
            synch=bool(s.synch))
    return None


def run_sweep(config_path: str, overrides: list[str], resume: bool, output: str) -> int:
    """Run (or with `resume`, continue) the sweep; prints a table and writes best_config.yaml under `output`."""
    spec = load_spec(config_path, overrides)
    where = _where(config_path)
    # The inputs and every searched value are checked as the swept command checks them, before Ray or Tune start
    # and before anything is written.
    base = _base_config(spec)
    _check_search(spec, where)

    # Every trial's run writes its own TensorBoard under DIR/tune/<trial>/run; Tune's default loggers would write a
    # second copy in Ray's temporary session folder and print that folder as the place to look.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    from ray import tune  # seconds to import: after the checks
    from actors.group import cluster_has_gpus
    from actors.runtime import ensure_ray
    remote = storage.is_uri(output)
    output = output if remote else os.path.abspath(output)
    experiment_dir = storage.join(output, EXPERIMENT)
    # On an object store Tune gets the filesystem and paths inside it (its own URI parsing drops pyarrow's options).
    fs, fs_output = storage.filesystem(output) if remote else (None, output)
    tune_dir = f"{fs_output}/{EXPERIMENT}" if remote else experiment_dir
    restorable = tune.Tuner.can_restore(tune_dir, storage_filesystem=fs) if storage.exists(experiment_dir) else False
    if resume and not restorable:
        raise ConfigError(f"--resume: {storage.display(experiment_dir)} holds no Tune experiment to continue; "
                          "run without --resume")
    if not resume and restorable:
        raise ConfigError(f"--output {storage.display(output)}: holds an earlier sweep; pass --resume to continue it "
                          "or choose another --output")
    local = tempfile.mkdtemp(prefix="rlhf-sweep-") if remote else output  # what the driver writes, uploaded
    os.makedirs(local, exist_ok=True)
    base_path = os.path.join(local, "base_config.yaml")
    save_config(base, base_path)

    bundles_probe = trial_plan(base, False).trial_bundles(spec.driver_cpus)
    started_ray = ensure_ray(base.ray, sum(b["CPU"] for b in bundles_probe))
    plan = trial_plan(base, cluster_has_gpus())
    strategy = base.layout.strategy if hasattr(base, "layout") else "PACK"
    strategy = {"STRICT_SPREAD": "SPREAD"}.get(strategy, strategy)  # bundle 0 (the controller) needs no node of its own
    check_trial_fits(spec, plan, strategy, base.ray.wait_for_nodes_s, started_ray, where)
    bundles = plan.trial_bundles(spec.driver_cpus)
    with open(base_path, encoding="utf-8") as f:
        job = {"command": spec.command, "base_config": base_path, "base_config_yaml": f.read(), "args": spec.args,
               "metric": spec.metric, "experiment_dir": experiment_dir}
    trial_trainable = trainable(job, tune.PlacementGroupFactory(bundles, strategy=strategy))
    if resume:
        tuner = tune.Tuner.restore(tune_dir, trial_trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        scheduler = _scheduler(spec, base, where)
        tuner = tune.Tuner(
            trial_trainable, param_space=_param_space(spec),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                        scheduler=scheduler, max_concurrent_trials=spec.max_concurrent_trials or None,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=fs_output, storage_filesystem=fs,
                                      # PBT may clone any trial's older checkpoint, so it keeps them all.
                                      checkpoint_config=tune.CheckpointConfig(
                                          num_to_keep=None if spec.scheduler.type == "pbt" else 2),
                                      # A trial whose controller dies (its node lost, its process killed) starts
                                      # again from the last checkpoint it reported, as a run's dead ranks are
                                      # rebuilt from theirs; the run's own restarts of its ranks come first.
                                      failure_config=tune.FailureConfig(max_failures=base.ray.max_restarts)))
    results = tuner.fit()
    code = _report(spec, results, output, local)
    if remote:
        storage.upload(local, output)
        shutil.rmtree(local, ignore_errors=True)
    return code


def _report(spec: SweepSpec, results: Any, output: str, local: str) -> int:
    """Print the summary table and write summary.tsv and best_config.yaml (into `local`, the output or its staging
    directory); 0 when some trial measured the metric."""
    keys = list(spec.search)
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = os.path.basename(result.path)  # its own directory (after a PBT exploit, metrics may be the clone's)
        config = result.config or {}
        rows.append({"trial": trial_id, "status": "error" if result.error else "ok",
                     **{k: config.get(k) for k in keys}, "step": metrics.get("step"),
                     spec.metric: metrics.get(spec.metric), "_config": config, "_error": result.error,
                     "_run": storage.join(output, EXPERIMENT, os.path.basename(result.path), "run")})
    measured = [r for r in rows if isinstance(r[spec.metric], (int, float))]
    measured.sort(key=lambda r: r[spec.metric], reverse=spec.mode == "max")
    ordered = measured + [r for r in rows if r not in measured]
    import pandas  # with Ray Tune, whose results are data frames too
    columns = ["trial", "status", *keys, "step", spec.metric]
    table = pandas.DataFrame([[_cell(r[c]) for c in columns] + [storage.display(r["_run"])] for r in ordered],
                             columns=columns + ["run_dir"])
    widths = {c: max(len(c), *table[c].str.len()) if len(table) else len(c) for c in columns}
    print(table[columns].to_string(index=False, justify="left",
                                   formatters={c: f"{{:<{w}}}".format for c, w in widths.items()}))
    table.to_csv(os.path.join(local, "summary.tsv"), sep="\t", index=False)
    for r in rows:
        if r["_error"] is not None:
            last = [line.strip() for line in str(r["_error"]).splitlines() if line.strip()][-1:] or ["?"]
            print(f"trial {r['trial']} failed: {last[0][:300]} (its run: {storage.display(r['_run'])})")
    if not measured:
        print(f"rlhf sweep: no trial reported {spec.metric!r}; the names a run logs are in its metrics.jsonl "
              f"under {storage.display(storage.join(output, EXPERIMENT))}/*/run/")
        return 1
    best = measured[0]
    cfg = load_config(spec.command, os.path.join(local, "base_config.yaml"), trial_overrides(best["_config"]))
    path = storage.join(output, "best_config.yaml")
    rerun = _command_line(spec, path, storage.join(output, "best"))
    values = ", ".join(f"{k}={_cell(best[k])}" for k in keys)
    with open(os.path.join(local, "best_config.yaml"), "w", encoding="utf-8") as f:
        f.write(f"# Best trial {best['trial']} of the sweep in {storage.display(output)}: "
                f"{spec.metric}={_cell(best[spec.metric])} ({spec.mode}) with {values}\n# Run it: {rerun}\n{to_yaml(cfg)}")
    print(f"best: trial {best['trial']}, {spec.metric}={_cell(best[spec.metric])} with {values}")
    print(f"best config: {storage.display(path)}\nrun it: {rerun}")
    print(f"TensorBoard: tensorboard --logdir {storage.display(storage.join(output, EXPERIMENT))}")
    return 0


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def _command_line(spec: SweepSpec, config: str, output: str) -> str:
    pairs = [(flag.name, spec.args[flag.arg]) for flag in COMMANDS[spec.command].flags if spec.args.get(flag.arg)]
    parts = ["rlhf", spec.command, "--config", config] + [x for p in pairs for x in p] + ["--output", output]
    return " ".join(shlex.quote(p) for p in parts)
