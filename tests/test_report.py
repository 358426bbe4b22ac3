"""The run report says whether the run worked: a verdict per stage, warnings of reward hacking and of collapse
computed from PPO's metric rows (made up here, so each warning is seen both firing and staying quiet), the rule
score's two parts per policy, and plots a reader can read. No Ray, no model."""
from __future__ import annotations

import json

from rlhf.report import (PASS, UNCHECKED, WARN, accuracy_verdict, collapse_sign, draw, parts_followed, policy_verdict,
                         ppo_held_out, reward_hacking, sft_verdict, thirds, write_report)


def ppo_rows(reward: list[float], kl: list[float], perplexity: list[float]) -> list[dict]:
    """PPO iteration rows as metrics.jsonl holds them, one per iteration from 1."""
    return [{"step": i + 1, "ppo/reward_raw": r, "ppo/kl": k, "ppo/perplexity": p, "ppo/response_length": 10.0,
             "ppo/ended_fraction": 1.0} for i, (r, k, p) in enumerate(zip(reward, kl, perplexity))]


RISING = [0.0, 0.1, 0.2, 0.8, 1.2, 1.6]
FLAT = [0.5, 0.5, 0.6, 0.5, 0.6, 0.5]


def test_thirds_compare_the_first_and_last_third_of_a_run():
    assert thirds([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == (1.5, 5.5)
    assert thirds([1.0, 3.0]) == (1.0, 3.0)
    assert thirds([1.0]) is None


def test_reward_rising_while_the_held_out_score_stays_flat_is_called_reward_hacking():
    rows = ppo_rows(RISING, FLAT, FLAT)
    status, said = reward_hacking(rows, ("held-out rule score", 0.40, 0.41))
    assert status == WARN and "reward hacking" in said and "0.050 → 1.400" in said
    # A falling held-out score is hacking too.
    assert reward_hacking(rows, ("held-out rule score", 0.40, 0.30))[0] == WARN


def test_reward_matched_by_the_held_out_score_or_a_flat_reward_is_not_reward_hacking():
    assert reward_hacking(ppo_rows(RISING, FLAT, FLAT), ("held-out rule score", 0.40, 0.60))[0] == PASS
    assert reward_hacking(ppo_rows(FLAT, FLAT, FLAT), ("held-out rule score", 0.40, 0.40))[0] == PASS
    assert reward_hacking(ppo_rows(RISING, FLAT, FLAT), None)[0] == UNCHECKED


def test_kl_rising_while_perplexity_falls_is_called_a_sign_of_collapse():
    status, said = collapse_sign(ppo_rows(FLAT, [0.0, 0.5, 1.0, 3.0, 4.0, 5.0], [3.0, 3.0, 2.8, 2.0, 1.8, 1.6]))
    assert status == WARN and "sign of collapse" in said and "KL to reference 0.25 → 4.50" in said


def test_kl_rising_with_steady_perplexity_or_perplexity_falling_near_the_reference_is_not_collapse():
    kl_up, kl_flat = [0.0, 0.5, 1.0, 3.0, 4.0, 5.0], [0.1, 0.2, 0.1, 0.2, 0.3, 0.2]
    ppl_steady, ppl_down = [3.0, 3.0, 2.9, 2.9, 2.95, 2.9], [3.0, 3.0, 2.8, 2.0, 1.8, 1.6]
    assert collapse_sign(ppo_rows(FLAT, kl_up, ppl_steady))[0] == PASS
    assert collapse_sign(ppo_rows(FLAT, kl_flat, ppl_down))[0] == PASS
    assert collapse_sign(ppo_rows(FLAT[:1], kl_up[:1], ppl_down[:1]))[0] == UNCHECKED


def test_a_policy_that_learned_one_part_of_the_rule_alone_is_called_out():
    # The demo's old failure: thanking rose to every reply while naming the topic stayed where SFT left it.
    verdict, said = parts_followed({"on_topic": 0.16, "thanks": 0.34}, {"on_topic": 0.14, "thanks": 1.0})
    assert verdict == WARN and "only part of the task learned" in said
    assert "reward thanking the user but not naming the topic" in said
    assert parts_followed({"on_topic": 0.16, "thanks": 0.34}, {"on_topic": 0.9, "thanks": 0.95})[0] == PASS
    assert parts_followed({"on_topic": 0.5, "thanks": 0.5}, {"on_topic": 0.5, "thanks": 0.52})[0] == WARN
    assert parts_followed(None, {"on_topic": 0.9, "thanks": 0.9})[0] == UNCHECKED


def test_a_verdict_per_stage():
    assert sft_verdict([3.2, 2.5, 2.1])[0] == PASS
    assert sft_verdict([3.2, 3.19])[0] == WARN
    assert sft_verdict([3.2])[0] == UNCHECKED
    # Chance is 0.5; on 40 pairs a coin toss reaches 0.658 one time in 40, so 0.6 is not evidence.
    assert accuracy_verdict("held-out pairwise accuracy", 0.9, 40)[0] == PASS
    assert accuracy_verdict("held-out pairwise accuracy", 0.6, 40)[0] == WARN
    assert accuracy_verdict("held-out pairwise accuracy", 0.6, 1000)[0] == PASS
    assert policy_verdict(("held-out rule score", 0.3, 0.5), kl=2.0)[0] == PASS
    assert policy_verdict(("held-out rule score", 0.3, 0.31), kl=2.0)[0] == WARN
    status, said = policy_verdict(("held-out rule score", 0.3, 0.5), kl=40.0)
    assert status == WARN and "drifted" in said
    assert policy_verdict(None, kl=2.0)[0] == UNCHECKED
    assert policy_verdict(None, kl=40.0)[0] == WARN


def test_ppo_held_out_measure_is_its_eval_rule_score_before_and_after_training():
    rows = [{"step": 0, "eval/rule_score": 0.3, "eval/other": 0.9}, *ppo_rows(RISING, FLAT, FLAT),
            {"step": 6, "eval/rule_score": 0.32, "eval/other": 0.9}]
    assert ppo_held_out(rows) == ("eval/rule_score", 0.3, 0.32)
    assert ppo_held_out(ppo_rows(RISING, FLAT, FLAT)) is None


def test_plots_label_the_y_axis_and_tick_whole_iterations():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    draw(ax, [1, 2, 3], [0.1, 0.4, 0.2], "KL to reference", "KL (nats per reply)")
    fig.canvas.draw()
    assert ax.get_ylabel() == "KL (nats per reply)"
    assert [t for t in ax.get_xticks() if 1 <= t <= 3] == [1, 2, 3]  # no 1.5, 2.5
    plt.close(fig)


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_report_opens_with_a_verdict_per_stage_the_warnings_and_the_rules_parts(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"step": 0, "eval/loss": 3.0}, {"step": 4, "eval/loss": 2.0}])
    # PPO learned the reward model, not the task: the reward climbs, KL climbs, perplexity falls.
    ppo = write_jsonl(tmp_path / "ppo.jsonl", [{"step": 0, "eval/rule_score": 0.40},
                                                *ppo_rows(RISING, [0.0, 0.5, 1.0, 3.0, 4.0, 5.0],
                                                          [3.0, 3.0, 2.8, 2.0, 1.8, 1.6]),
                                                {"step": 6, "eval/rule_score": 0.41}])
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [
        {"step": s, "eval/pairwise_accuracy": a, "eval/pairs": 40, "eval/better_logp": -20.0,
         "eval/worse_logp": -21.0, "eval/kl": k} for s, a, k in ((0, 0.5, 0.0), (4, 0.8, 3.0))])
    path = write_report(str(tmp_path), rm_eval={"pairwise_accuracy": 0.9, "pairs": 40, "mean_margin": 1.0},
                        rules={"SFT": 0.40, "PPO": 0.41, "DPO": 0.70},
                        parts={"SFT": {"on_topic": 0.6, "thanks": 0.2}, "PPO": {"on_topic": 0.62, "thanks": 0.2},
                               "DPO": {"on_topic": 0.6, "thanks": 0.8}},
                        examples=[("What about chess?", ["Chess.", "Chess chess.", "Thanks! Chess."])],
                        sft_metrics=sft, ppo_metrics=ppo, dpo_metrics=dpo)
    text = open(path, encoding="utf-8").read()
    verdicts = text[text.index("## Did it work?"):text.index("## Numbers")]
    assert "- **PASS** SFT: held-out loss fell, 3.000 → 2.000." in verdicts
    assert "- **PASS** reward model: held-out pairwise accuracy 0.900 on 40 pairs" in verdicts
    assert "- **WARN** PPO: held-out rule score did not rise" in verdicts
    assert "- **PASS** DPO: held-out rule score rose over SFT's, 0.400 → 0.700" in verdicts
    assert "- **WARN** PPO: possible reward hacking" in verdicts
    assert "- **WARN** PPO: sign of collapse" in verdicts
    assert "- **WARN** PPO: no part of the rule rose" in verdicts
    assert "0.5 for naming the topic (or the right answer) plus 0.5 for thanking the user" in text
    assert "| policy | rule score | replies naming the topic (or answer) | replies thanking the user |" in text
    assert "| DPO | 0.700 | 60% | 80% |" in text and "| SFT | 0.400 | 60% | 20% |" in text
    assert "rule score, SFT → PPO → DPO" in text  # what tests/test_pipeline.py reads
    for png in ("reward_raw.png", "kl.png", "response_length.png", "perplexity.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_a_healthy_ppo_run_gets_pass_and_no_warning(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"step": 0, "eval/loss": 3.0}, {"step": 4, "eval/loss": 2.0}])
    ppo = write_jsonl(tmp_path / "ppo.jsonl", ppo_rows(RISING, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], FLAT))
    path = write_report(str(tmp_path), rm_eval=None, rules={"SFT": 0.40, "PPO": 0.65}, examples=[], sft_metrics=sft,
                        ppo_metrics=ppo)
    text = open(path, encoding="utf-8").read()
    assert "- **PASS** PPO: held-out rule score rose over SFT's, 0.400 → 0.650" in text
    assert "- **PASS** PPO: no reward hacking" in text and "- **PASS** PPO: no sign of collapse" in text
    assert "WARN" not in text
    assert "| PPO | 0.650 | – | – |" in text  # parts not given: the rule's total still shows
