"""Preference strength (Secrets of RLHF Part II): an ensemble of reward models trained side by side on Ray finds the
labels to distrust, and `rlhf rm` with those pairs flipped learns what clean labels teach. First the math and the
weak-pair rules without Ray, then the story on the bundled ranked lists with a quarter of them reversed."""
from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from reward.batches import EncodedList, collate_ranked
from reward.losses import ranking_loss
from reward.strength import (Strength, apply_weak_pairs, ensemble_members, pair_keys, pair_strength, read_strength,
                             record_lines, weak_pair_rule)
from rlhf.config import EnsembleConfig
from rlhf.data import DataFileError
from rlhf.metrics import read_metrics

CONFIG = "configs/tiny/strength_rm.yaml"


# --- the math, no Ray ---------------------------------------------------------------------------------------------


def test_strength_is_the_members_mean_and_sample_spread():
    diffs = torch.tensor([[2.0, -1.0, 0.5], [4.0, -3.0, 0.5], [0.0, -2.0, 0.5]])  # [members, pairs]
    mean, std = pair_strength(diffs)
    assert mean.tolist() == pytest.approx([2.0, -2.0, 0.5])
    assert std.tolist() == pytest.approx([2.0, 1.0, 0.0])  # n - 1: ((0^2 + 2^2 + 2^2) / 2) ** 0.5 = 2
    one_mean, one_std = pair_strength(diffs[:1])
    assert one_mean.tolist() == pytest.approx([2.0, -1.0, 0.5]) and one_std.tolist() == [0.0, 0.0, 0.0]


def test_each_rule_touches_only_the_weak_pairs():
    pairs, means = [(0, 1), (0, 2), (1, 2)], [1.5, -0.4, -2.0]  # a K = 3 list; the ensemble contradicts two pairs
    assert weak_pair_rule(pairs, means, "keep", 0.0, 0.3) == (pairs, [0.3, 0.3, 0.3])
    assert weak_pair_rule(pairs, means, "flip", 0.0, 0.3) == ([(0, 1), (2, 0), (2, 1)], [0.3, 0.3, 0.3])
    assert weak_pair_rule(pairs, means, "drop", 0.0, 0.3) == ([(0, 1)], [0.3])
    flipped_pairs, _ = weak_pair_rule(pairs, means, "flip", -1.0, 0.0)  # only what the ensemble is sure of
    assert flipped_pairs == [(0, 1), (0, 2), (2, 1)]
    margin_pairs, margins = weak_pair_rule(pairs, means, "margin", 0.0, 0.3)
    assert margin_pairs == pairs and margins == pytest.approx([1.8, -0.1, -1.7])  # Part II's adaptive margin
    with pytest.raises(ValueError, match="rm.weak_pairs"):
        weak_pair_rule(pairs, means, "soften", 0.0, 0.0)


def _list(k: int, ranks: list[int], margin: float = 0.0) -> EncodedList:
    rows = [[5, 6, 7 + i] for i in range(k)]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k) if ranks[i] < ranks[j]]
    return EncodedList(rows, [[0, 1, 1]] * k, pairs, margin)


def test_rules_reach_the_loss_as_pairs_and_per_pair_margins():
    # Lists of K = 2, 3 and 4 (with a tie, which makes no pair), on record lines 1, 3 and 4 (line 2 was blank).
    lists = [_list(2, [0, 1]), _list(3, [0, 1, 2], margin=0.5), _list(4, [0, 1, 1, 2])]
    lines = [1, 3, 4]
    keys = pair_keys(lists, lines)
    assert keys[:4] == [(1, 0, 1), (3, 0, 1), (3, 0, 2), (3, 1, 2)] and len(keys) == 1 + 3 + 5
    strength = dict.fromkeys(keys, Strength(1.0, 0.2)) | {(1, 0, 1): Strength(-3.0, 0.5),
                                                        (3, 1, 2): Strength(-0.5, 1.0)}

    flipped, counts = apply_weak_pairs(lists, lines, strength, "flip", 0.0)
    assert flipped[0].pairs == [(1, 0)] and flipped[1].pairs == [(0, 1), (0, 2), (2, 1)]
    assert flipped[2].pairs == lists[2].pairs and lists[0].pairs == [(0, 1)]  # the caller's lists are untouched
    assert counts == {"pairs_labelled": 9, "pairs_weak": 2, "pairs_flipped": 2, "pairs_dropped": 0,
                      "pairs_margined": 0, "lists_dropped": 0}

    dropped, counts = apply_weak_pairs(lists, lines, strength, "drop", 0.0)
    assert len(dropped) == 2 and dropped[0].pairs == [(0, 1), (0, 2)]  # the K = 2 list lost its only pair
    assert counts["pairs_dropped"] == 2 and counts["lists_dropped"] == 1

    margined, counts = apply_weak_pairs(lists, lines, strength, "margin", 0.0)
    batch = collate_ranked(margined, pad_id=0)
    expected = [-3.0, 1.5, 1.5, 0.0] + [1.0] * 5  # each list's own margin plus the pair's mean strength
    assert batch["margins"].tolist() == pytest.approx(expected) and counts["pairs_margined"] == 9
    scores = torch.randn(len(batch["row_prompt"]))
    loss = ranking_loss(scores, batch["pairs"], batch["pair_prompt"], batch["margins"])["loss"]
    by_hand = []
    for p in range(3):
        ks = [k for k in range(9) if batch["pair_prompt"][k] == p]
        by_hand.append(sum(-torch.nn.functional.logsigmoid(scores[batch["pairs"][k, 0]] - scores[batch["pairs"][k, 1]]
                                                            - expected[k]) for k in ks) / len(ks))
    assert float(loss) == pytest.approx(float(sum(by_hand) / 3), rel=1e-5)


def test_a_strength_file_of_other_data_is_refused_in_one_line_naming_both():
    lists, lines = [_list(3, [0, 1, 2])], [7]
    wrong = {(7, 0, 1): Strength(1.0, 0.0), (7, 0, 2): Strength(1.0, 0.0), (8, 1, 2): Strength(1.0, 0.0)}
    with pytest.raises(SystemExit) as err:
        apply_weak_pairs(lists, lines, wrong, "flip", 0.0, ("runs/s/strength.jsonl", "data/prefs.jsonl"))
    message = str(err.value.code)
    assert "\n" not in message and "runs/s/strength.jsonl" in message and "data/prefs.jsonl" in message
    assert "record line 7, better 1, worse 2" in message


def test_bad_strength_lines_are_each_reported_as_path_line_field(tmp_path: Path):
    path = tmp_path / "strength.jsonl"
    path.write_text('{"line": 1, "better": 0, "worse": 1, "mean": 0.5, "std": 0.1}\n'
                    '{"line": 2, "better": "0", "worse": 1, "mean": 0.5, "std": 0.1}\n\n'
                    '{"line": 3, "better": 0, "worse": 1, "mean": NaN}\n'
                    '{"line": 1, "better": 0, "worse": 1, "mean": 0.2, "std": 0.1}\n', encoding="utf-8")
    with pytest.raises(DataFileError) as err:
        read_strength(str(path))
    assert [str(e).split(": ", 2)[:2] for e in err.value.errors] == [
        [f"{path}:2", "better"], [f"{path}:4", "mean"], [f"{path}:5", "line"]]


def test_members_differ_by_seed_and_by_a_seeded_bootstrap():
    plain = ensemble_members(EnsembleConfig(members=3, bootstrap=False), seed=10, num_lists=50)
    assert [m.seed for m in plain] == [10, 11, 12] and all(m.lists == list(range(50)) for m in plain)
    drawn = ensemble_members(EnsembleConfig(members=3, bootstrap=True), seed=10, num_lists=50)
    assert drawn == ensemble_members(EnsembleConfig(members=3, bootstrap=True), seed=10, num_lists=50)
    for m in drawn:
        assert len(m.lists) == 50 and len(set(m.lists)) < 50 and set(m.lists) <= set(range(50))  # with repeats
    assert drawn[0].lists != drawn[1].lists != drawn[2].lists
    with pytest.raises(ValueError, match="rm.ensemble.members"):
        ensemble_members(EnsembleConfig(members=0), seed=0, num_lists=5)


def test_records_are_named_by_their_line_in_the_file(tiny, tmp_path: Path):
    records = Path(tiny["prefs_eval"]).read_text(encoding="utf-8").splitlines()[:3]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(f"{records[0]}\n\n{records[1]}\n{records[2]}\n", encoding="utf-8")
    assert record_lines(str(jsonl)) == [1, 3, 4]
    array = tmp_path / "p.json"
    array.write_text("[" + ",".join(records) + "]", encoding="utf-8")
    assert record_lines(str(array)) == [1, 2, 3]  # a JSON array's records are its elements


# --- on Ray: the bundled ranked lists with a quarter of them reversed -----------------------------------------------


def reversed_record(record: dict) -> dict:
    """The same record with its ranking turned upside down: every pair it makes is a wrong label."""
    out = dict(record)
    if "chosen" in record:
        out["chosen"], out["rejected"] = record["rejected"], record["chosen"]
        return out
    ranks = record.get("ranks") or list(range(len(record["responses"])))
    out["responses"] = record["responses"][::-1]
    out["ranks"] = [max(ranks) - r for r in ranks[::-1]]  # ties stay ties
    return out


@pytest.fixture(scope="module")
def noisy(tiny, tmp_path_factory) -> dict:
    """prefs_train with 25% of its lists reversed (seed 0), and the (line, better, worse) of each wrong pair."""
    from rlhf.data import load_preferences
    out = tmp_path_factory.mktemp("noisy") / "prefs_noisy.jsonl"
    rng = random.Random(0)
    lines, reversed_lines = [], set()
    for number, text in enumerate(Path(tiny["prefs_train"]).read_text(encoding="utf-8").splitlines(), 1):
        record = json.loads(text)
        if rng.random() < 0.25:
            record = reversed_record(record)
            reversed_lines.add(number)
        lines.append(json.dumps(record, ensure_ascii=False))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prefs = load_preferences(str(out))
    wrong = {(n, b, w) for n, p in enumerate(prefs, 1) if n in reversed_lines for b, w in p.pairs()}
    pairs = sum(len(p.pairs()) for p in prefs)
    return {"train": str(out), "wrong": wrong, "pairs": pairs}


@pytest.fixture(scope="module")
def ensemble(tiny, sft_run, noisy, local_ray, tmp_path_factory) -> dict:
    """`rlhf rm-strength` on the noisy lists: three members of one rank each, while a thread watches Ray's placement
    groups for the members' own."""
    import ray.util
    out = tmp_path_factory.mktemp("strength") / "run"
    most, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            table = ray.util.placement_group_table()
            held = {v["name"] for v in table.values() if v["state"] == "CREATED" and v["name"].startswith("reward-")}
            most[0] = max(most[0], len(held))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    began = time.time()
    try:
        assert run_cli("rm-strength", "--config", CONFIG, "--model", f"{sft_run}/final", "--data", noisy["train"],
                       "--set", "train.log_every=1", "--set", "logging.progress=false", "--output", out) == 0
    finally:
        stop.set()
        watcher.join()
    return {"out": out, "most_groups_at_once": most[0], "seconds": time.time() - began}


@pytest.mark.slow
def test_members_train_side_by_side_each_in_its_own_placement_group(ensemble):
    out = ensemble["out"]
    assert ensemble["most_groups_at_once"] == 3, "the three members' placement groups were never held at once"
    windows = []
    for k in range(3):
        steps = [m for m in read_metrics(f"{out}/member-{k}/metrics.jsonl") if "train/loss" in m]
        assert len(steps) == 50 and (out / f"member-{k}" / "final" / "value_head.safetensors").exists()
        windows.append((steps[0]["time"], steps[-1]["time"]))
    # Every member was between its first and last step while every other one was too.
    assert max(start for start, _ in windows) < min(end for _, end in windows), windows


@pytest.mark.slow
def test_strength_file_has_every_pair_once_and_a_readable_summary(ensemble, noisy):
    out = ensemble["out"]
    rows = [json.loads(line) for line in (out / "strength.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"line", "better", "worse", "mean", "std"} for r in rows)
    assert len({(r["line"], r["better"], r["worse"]) for r in rows}) == len(rows) == noisy["pairs"]
    assert min(r["line"] for r in rows) == 1 and all(r["better"] != r["worse"] and r["std"] >= 0 for r in rows)
    summary = json.loads((out / "strength.json").read_text(encoding="utf-8"))
    assert summary["members"] == 3 and summary["pairs"] == len(rows)
    assert summary["negative"] == sum(r["mean"] < 0 for r in rows) > 0
    assert (out / "strength.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_negative_strength_marks_the_reversed_pairs(ensemble, noisy):
    rows = [json.loads(line) for line in (ensemble["out"] / "strength.jsonl").read_text(encoding="utf-8").splitlines()]
    flagged = {(r["line"], r["better"], r["worse"]) for r in rows if r["mean"] < 0}
    wrong = noisy["wrong"]
    precision = len(flagged & wrong) / len(flagged)
    recall = len(flagged & wrong) / len(wrong)
    # Chance: a random flag is wrong as often as pairs are (precision), and finds the share flagged (recall).
    chance_precision, chance_recall = len(wrong) / len(rows), len(flagged) / len(rows)
    print(f"reversed {len(wrong)} of {len(rows)} pairs; flagged {len(flagged)}: precision {precision:.3f} "
          f"(chance {chance_precision:.3f}), recall {recall:.3f} (chance {chance_recall:.3f}); "
          f"rm-strength took {ensemble['seconds']:.0f} s")
    assert precision >= 0.65 and precision >= 3 * chance_precision
    assert recall >= 0.65 and recall >= 3 * chance_recall


def _rm(out: Path, model: str, data: str, held_out: str, *sets: str) -> dict:
    """`rlhf rm` for 3 epochs (long enough for wrong labels to cost accuracy); its held-out numbers after training."""
    # One process: the same loss and updates as the Ray group's ranks (a batch's gradient does not depend on its split).
    overrides = [a for s in ("train.epochs=3", "train.eval_every=0", "logging.progress=false", "ray.in_process=true",
                             f"data.eval={held_out}", *sets) for a in ("--set", s)]
    assert run_cli("rm", "--config", CONFIG, "--model", model, "--data", data, *overrides, "--output", out) == 0
    final = [m for m in read_metrics(f"{out}/metrics.jsonl") if "eval/pairwise_accuracy" in m][-1]
    return {"accuracy": final["eval/pairwise_accuracy"], "margin": final["eval/mean_margin"],
            "touched": next((m for m in read_metrics(f"{out}/metrics.jsonl") if "train/pairs_flipped" in m), {})}


@pytest.mark.slow
def test_flipping_the_weak_pairs_gives_back_what_clean_labels_teach(tiny, sft_run, noisy, ensemble, tmp_path):
    model, held_out = f"{sft_run}/final", tiny["prefs_eval"]  # prefs_eval is clean
    clean = _rm(tmp_path / "clean", model, tiny["prefs_train"], held_out)
    as_is = _rm(tmp_path / "noisy", model, noisy["train"], held_out)
    flip = _rm(tmp_path / "flip", model, noisy["train"], held_out,
               f"rm.preference_strength={ensemble['out']}/strength.jsonl", "rm.weak_pairs=flip")
    print({"clean": clean, "noisy": as_is, "flip": flip})
    negative = json.loads((ensemble["out"] / "strength.json").read_text(encoding="utf-8"))["negative"]
    assert flip["touched"]["train/pairs_flipped"] == negative and flip["touched"]["train/pairs_dropped"] == 0
    assert flip["accuracy"] >= as_is["accuracy"]
    # Wrong labels shrink the margin (the model learns a 3:1 chance, not a certainty); flipping gives it back.
    assert as_is["margin"] < clean["margin"] / 2
    assert abs(flip["margin"] - clean["margin"]) < abs(as_is["margin"] - clean["margin"])


@pytest.mark.slow
def test_lora_members_on_two_ranks_score_as_one_process_does_and_feed_the_margin_rule(tiny, sft_run, noisy,
                                                                                     local_ray, tmp_path, capsys):
    from reward.batches import encode_file
    from reward.model import ScalarHeadModel
    from rlhf.batching import position_ids
    from rlhf.config import load_config
    from rlhf.modeling import load_tokenizer
    model, out = f"{sft_run}/final", tmp_path / "lora"
    data = tmp_path / "prefs_64.jsonl"  # 64 of the noisy lists: 4 steps an epoch, scored in seconds
    data.write_text("".join(Path(noisy["train"]).read_text(encoding="utf-8").splitlines(True)[:64]), encoding="utf-8")
    quick = [a for s in ("train.max_steps=2", "train.eval_every=0", "logging.progress=false", "lora.enabled=true",
                         "layout.gpus_per_node=2") for a in ("--set", s)]
    assert run_cli("rm-strength", "--config", CONFIG, "--model", model, "--data", data, *quick,
                   "--set", "rm.ensemble.members=2", "--set", "rm.ensemble.bootstrap=true", "--output", out) == 0

    # Each member's pairs scored again here, in one process: the two-rank scoring groups kept every pair in place.
    cfg = load_config("rm", CONFIG)
    tokenizer = load_tokenizer(model)
    lists = encode_file(str(data), tokenizer, cfg.data, cfg.rm)
    diffs = []
    for k in range(2):
        member = ScalarHeadModel.from_pretrained(f"{out}/member-{k}/final").eval()
        with torch.no_grad():
            mine = []
            for i in range(0, len(lists), 16):
                mb = collate_ranked(lists[i:i + 16], pad_id=tokenizer.pad_token_id)
                scores = member.score(mb["input_ids"], mb["attention_mask"], position_ids(mb["attention_mask"]))
                mine.append(scores[mb["pairs"][:, 0]] - scores[mb["pairs"][:, 1]])
        diffs.append(torch.cat(mine))
    mean, std = pair_strength(torch.stack(diffs))
    table = read_strength(f"{out}/strength.jsonl")
    keys = pair_keys(lists, record_lines(str(data)))
    assert [table[k].mean for k in keys] == pytest.approx(mean.tolist(), abs=1e-4)
    assert [table[k].std for k in keys] == pytest.approx(std.tolist(), abs=1e-4)

    # The adaptive margin on a LoRA model: every pair kept, each with its strength as margin, logged at step 0 (in
    # this process: the rule is the driver's; test_rules_reach_the_loss_as_pairs_and_per_pair_margins has the loss).
    assert run_cli("rm", "--config", CONFIG, "--model", model, "--data", data, *quick, "--set", "ray.in_process=true",
                   "--set", f"rm.preference_strength={out}/strength.jsonl", "--set", "rm.weak_pairs=margin",
                   "--output", tmp_path / "margin") == 0
    logged = read_metrics(f"{tmp_path}/margin/metrics.jsonl")
    assert logged[0]["step"] == 0 and logged[0]["train/pairs_margined"] == len(keys)
    assert [m["step"] for m in logged if "train/loss" in m][-1] == 2

    # A strength file of other data is refused before anything starts, in one line naming both files.
    capsys.readouterr()
    assert run_cli("rm", "--config", CONFIG, "--model", model, "--data", tiny["prefs_eval"], *quick,
                   "--set", f"rm.preference_strength={out}/strength.jsonl", "--set", "rm.weak_pairs=flip",
                   "--output", tmp_path / "mismatch") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out}/strength.jsonl" in err[0] and tiny["prefs_eval"] in err[0]
