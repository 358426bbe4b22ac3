"""What a user sees of our runs in Ray's dashboard, on a local 2-CPU Ray: each rank actor and a sweep trial's
controller say what they are (the state API the Actors page reads), a run's metrics reach the node's Prometheus
endpoint with their tags (what the Metrics page graphs), and a sweep the cluster can never hold stops at once; and
the pieces that make them (labels, the room check, the exporter hook), without Ray."""
from __future__ import annotations

import os
import re
import threading
import time
import urllib.request

import pytest
import yaml

from actors.group import RankLabels
from actors.placement import never_placed
from conftest import run_cli
from rlhf.metrics import MetricsLogger, Trial, prometheus_name, read_metrics, run_tags, set_exporter, set_trial


# --- the pieces, without Ray -------------------------------------------------------------------------------------

def test_ranks_say_which_run_trial_and_restart_they_are():
    trial = Trial("sweep_rm_lr", "3f2a1_00001", "optim.lr=0.0003")
    assert RankLabels("ppo").repr("critic", 1, 2) == "ppo/critic rank 1/2"
    assert RankLabels("ppo").name("critic", 1, 2) is None  # no start id: no name
    labels = RankLabels("rm", trial, restart=1, start_id="9c0e4b")
    assert labels.repr("reward", 0, 2) == "rm/reward rank 0/2 of trial 3f2a1_00001 (optim.lr=0.0003), restart 1"
    assert labels.name("reward", 0, 2) == "rm/reward rank 0/2 [3f2a1_00001 9c0e4b]"


def test_a_cluster_that_can_never_hold_a_plan_is_said_in_words():
    two = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert never_placed([([{"CPU": 1.0, "GPU": 1.0}] * 2, "PACK")], two) is None
    assert never_placed([([{"CPU": 1.0}] * 5, "PACK")], two) == "the Ray cluster has 4 CPU in all"
    assert "holds a bundle of (3 CPU, 1 GPU) (at most 2 CPU, 1 GPU per node)" in \
        never_placed([([{"CPU": 3.0, "GPU": 1.0}], "PACK")], two)
    assert never_placed([([{"CPU": 1.0}] * 3, "STRICT_PACK")], two) == \
        "no node of the Ray cluster holds 3 CPU at once, which STRICT_PACK asks for"
    assert never_placed([([{"CPU": 1.0}] * 3, "PACK")], two) is None  # PACK may spill onto a second node
    assert never_placed([([{"CPU": 1.0}] * 3, "STRICT_SPREAD")], two + [{"CPU": 0.0}]) == \
        "2 node(s) of the Ray cluster hold a bundle of (1 CPU), and STRICT_SPREAD puts each of 3 on a node of its own"
    assert never_placed([([{"CPU": 1.0}] * 2, "STRICT_SPREAD")], two + [{"CPU": 0.0}]) is None
    # Groups of one run are placed at once: together they need what they need.
    assert never_placed([([{"GPU": 1.0}], "PACK"), ([{"GPU": 1.0}] * 2, "PACK")], two) == \
        "the Ray cluster has 2 GPU in all"


def test_a_logged_step_reaches_the_exporter_with_the_runs_tags(tmp_path):
    got = []
    previous = set_exporter(lambda step, values, tags: got.append((step, values, dict(tags))))
    try:
        with MetricsLogger(str(tmp_path / "ppo-out"), tensorboard=False,
                           tags=run_tags("ppo", str(tmp_path / "ppo-out"))) as logger:
            logger.log(3, {"ppo/kl": 0.25, "time/generate": 1.5})
        set_trial(Trial("sweep_rm_lr", "3f2a1_00001", "optim.lr=0.0003"))  # what `rlhf sweep` says in a trial
        with MetricsLogger(str(tmp_path / "run"), tensorboard=False, tags=run_tags("rm", str(tmp_path))) as logger:
            logger.log(1, {"train/loss": 0.7})
    finally:
        set_exporter(previous)
        set_trial(None)
    assert got == [
        (3, {"ppo/kl": 0.25, "time/generate": 1.5}, {"command": "ppo", "run": "ppo-out", "trial": "", "role": ""}),
        (1, {"train/loss": 0.7}, {"command": "rm", "run": "sweep_rm_lr", "trial": "3f2a1_00001", "role": ""})]
    assert [prometheus_name(k) for k in ("ppo/kl", "time/generate", "eval/pairwise_accuracy", "ppo/reward-x")] == \
        ["rlhf_ppo_kl", "rlhf_time_generate", "rlhf_eval_pairwise_accuracy", "rlhf_ppo_reward_x"]


# --- on a local Ray ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ray():
    """A Ray of this module's own with 2 CPUs, pushing metrics every second. Its node address is loopback, so its
    servers (the metrics endpoint scraped here included) listen on 127.0.0.1 only: Ray's switch for a machine that
    is no cluster, read from the environment by Ray's processes and from ray_constants by this one."""
    import ray
    from ray._private import ray_constants
    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=0,
                 namespace="tests", runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
                 _system_config={"metrics_report_interval_ms": 1000})
        node = ray.nodes()[0]
        yield {"gcs": ray.get_runtime_context().gcs_address,
               "metrics": f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"}
        ray.shutdown()


def gauges(url: str, name: str) -> list[tuple[dict, float]]:
    """(labels, value) of each sample of `name` in a Prometheus text scrape."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = []
    for line in text.splitlines():
        match = re.match(rf"{name}{{(.*)}} (\S+)$", line)
        if match:
            found.append((dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1))), float(match.group(2))))
    return found


def actors_while(running: threading.Thread, gcs: str, enough) -> list:
    """The live actors (state API, as the dashboard lists them), polled until `enough(actors)` or the run ends."""
    from ray.util.state import list_actors
    seen: dict = {}
    while running.is_alive() and not enough(list(seen.values())):
        for actor in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], detail=True, limit=1000):
            seen[actor.actor_id] = actor
        time.sleep(0.5)
    return list(seen.values())


def in_thread(fn) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(rc=fn()))
    thread.start()
    return thread, result


@pytest.mark.slow
def test_a_ppo_run_names_its_ranks_and_exports_its_metrics(tiny, small_ray, tmp_path):
    # GRPO rewarded by a rule: a policy group of two ranks and a reference group of one, no reward model or critic.
    out = tmp_path / "ppo-dash"
    run, result = in_thread(lambda: run_cli(
        "ppo", "--config", "configs/tiny/ppo.yaml", "--policy", tiny["base"],
        "--prompts", tiny["prompts_train"], "--output", out,
        *[x for kv in ["ppo.iterations=2", "ppo.prompts_per_iteration=4", "ppo.train_batch_size=8",
                       "ppo.ppo_epochs=1", "ppo.estimator=grpo", "ppo.samples_per_prompt=2",
                       "ppo.reward_model_weight=0", "ppo.reward_rules.sample=1.0", "generation.max_new_tokens=8",
                       "roles.policy.layout.gpus_per_node=2", "roles.policy.layout.cpus_per_rank=0.5",
                       "roles.policy.micro_batch_size=4", "train.save_every=0", "logging.progress=false"]
           for x in ("--set", kv)]))
    wanted = {"ppo/policy rank 0/2", "ppo/policy rank 1/2", "ppo/reference rank 0/1"}
    actors = actors_while(run, small_ray["gcs"], lambda seen: wanted <= {a.repr_name for a in seen})
    run.join(timeout=300)
    assert result.get("rc") == 0

    ranks = {a.repr_name: a for a in actors if a.repr_name in wanted}
    assert set(ranks) == wanted, f"rank actors seen: {[(a.class_name, a.name, a.repr_name) for a in actors]}"
    for text, actor in ranks.items():
        assert actor.class_name == ("PolicyWorker" if "policy" in text else "ReferenceWorker")
        assert actor.name.startswith(f"{text} [")  # unique per start of the group, so a rebuilt one never collides
    assert len({a.name.split("[")[1] for a in ranks.values()}) == 1  # one start of the run

    # The driver's gauges, tagged with the run, once Ray has pushed the last iteration's: what metrics.jsonl has.
    last = [r for r in read_metrics(str(out)) if "ppo/kl" in r][-1]
    tags = {"command": "ppo", "run": "ppo-dash", "trial": "", "role": ""}
    deadline, found = time.time() + 60, {}
    while time.time() < deadline and not (len(found) == 4 and found["step"] == last["step"]):
        for key in ("ppo/kl", "ppo/tokens_per_s", "time/generate", "step"):
            name = "ray_rlhf_" + key.replace("/", "_")
            found |= {key: v for labels, v in gauges(small_ray["metrics"], name)
                      if {k: labels.get(k) for k in tags} == tags}
        time.sleep(1)
    assert set(found) == {"ppo/kl", "ppo/tokens_per_s", "time/generate", "step"}, found
    assert found["step"] == last["step"] == 2
    assert found["ppo/kl"] == pytest.approx(last["ppo/kl"], rel=1e-6, abs=1e-9)
    assert found["ppo/tokens_per_s"] > 0 and found["time/generate"] > 0


def write_spec(tmp_path, **spec) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.slow
def test_a_sweep_trial_names_its_controller_and_ranks_and_tags_its_metrics(tiny, small_ray, tmp_path):
    from rlhf.drivers.sweep import run_sweep
    spec = write_spec(tmp_path, command="rm", base_config="configs/tiny/rm.yaml",
                      args={"model": tiny["base"], "data": tiny["prefs_train"]},
                      overrides=["train.max_steps=3", "layout.gpus_per_node=1", "train.global_batch_size=8",
                                 "train.micro_batch_size=8", "train.log_every=1"],
                      search={"optim.lr": {"type": "choice", "values": [1.0e-3]}}, metric="train/loss", mode="min")
    out = tmp_path / "rm-sweep"
    sweep, result = in_thread(lambda: run_sweep(spec, [], False, str(out)))

    def both(seen: list) -> bool:
        return any(a.repr_name.startswith("rm controller of trial ") for a in seen) and \
            any(a.repr_name.startswith("rm/reward rank 0/1 of trial ") for a in seen)
    actors = actors_while(sweep, small_ray["gcs"], both)
    sweep.join(timeout=300)
    assert result.get("rc") == 0

    controller = [a for a in actors if a.repr_name.startswith("rm controller of trial ")]
    ranks = [a for a in actors if a.repr_name.startswith("rm/reward rank 0/1 of trial ")]
    assert controller and ranks, f"actors seen: {[(a.class_name, a.repr_name) for a in actors]}"
    trial = controller[0].repr_name.split()[4]
    assert controller[0].repr_name == f"rm controller of trial {trial} (optim.lr=0.001)"
    assert controller[0].class_name.endswith("ImplicitFunc")
    assert ranks[0].repr_name == f"rm/reward rank 0/1 of trial {trial} (optim.lr=0.001)"
    assert ranks[0].class_name == "RMWorker" and ranks[0].placement_group_id == controller[0].placement_group_id
    assert trial in ranks[0].name

    # The trial's gauges (set in its controller's process) stay on the node's endpoint after the trial ends.
    last = [r for r in read_metrics(str(out / "tune" / trial / "run")) if "train/loss" in r][-1]
    deadline, losses = time.time() + 60, []
    while time.time() < deadline and not losses:
        losses = [(labels, v) for labels, v in gauges(small_ray["metrics"], "ray_rlhf_train_loss")
                  if labels.get("trial") == trial and v == pytest.approx(last["train/loss"])]
        time.sleep(1)
    assert losses, f"no ray_rlhf_train_loss gauge of trial {trial} at {last['train/loss']}"
    labels = losses[0][0]
    assert labels["command"] == "rm" and labels["run"] == "rm-sweep" and labels["role"] == "reward"


@pytest.mark.slow
def test_a_sweep_or_run_the_cluster_cannot_hold_stops_at_once_in_one_line(tiny, small_ray, tmp_path, capsys):
    # configs/tiny/rm.yaml: two ranks of 1 CPU, plus the trial's controller: 3 CPUs for a Ray of 2.
    spec = write_spec(tmp_path, command="rm", base_config="configs/tiny/rm.yaml",
                      args={"model": tiny["base"], "data": tiny["prefs_train"]}, overrides=["train.max_steps=2"],
                      search={"optim.lr": {"type": "grid", "values": [3.0e-4, 1.0e-3]}}, metric="train/loss",
                      mode="min")
    began = time.time()
    assert run_cli("sweep", "--config", spec, "--output", tmp_path / "sweep") == 2
    assert time.time() - began < 60
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlhf sweep:")]
    assert len(err) == 1, err
    assert "one trial needs 3 CPU" in err[0] and "the Ray cluster has 2 CPU in all" in err[0]
    assert "layout.gpus_per_node" in err[0] and "driver_cpus" in err[0]
    assert not os.path.exists(tmp_path / "sweep" / "tune")  # Tune never started

    # The same run on its own joins this Ray and stops before any rank starts.
    assert run_cli("rm", "--config", "configs/tiny/rm.yaml", "--model", tiny["base"], "--data", tiny["prefs_train"],
                   "--set", "layout.cpus_per_rank=1.5", "--set", "logging.progress=false",
                   "--output", tmp_path / "rm") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlhf rm:")]
    assert len(err) == 1, err
    assert "the role groups need 3 CPU (reward 2 x (1.5 CPU))" in err[0] and "2 CPU in all" in err[0]
    assert "layout.cpus_per_rank" in err[0]
