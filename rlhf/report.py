"""The run report a person reads after a pipeline: report.md says first whether each stage worked (a verdict line
each, then the checks for reward hacking and collapse), then the numbers behind it: the reward model's held-out
accuracy, DPO's held-out implicit-reward accuracy, the rule score of the SFT, PPO and DPO policies with its two
parts, PNG plots of PPO's collapse monitors, and replies side by side."""
from __future__ import annotations

import math
import os
from typing import Optional

from rlhf.metrics import read_metrics

PASS, WARN, UNCHECKED = "PASS", "WARN", "UNCHECKED"
Verdict = tuple[str, str]
"""(PASS, WARN or UNCHECKED; the sentence that says why), one per stage or check."""
HeldOut = tuple[str, float, float]
"""A held-out measure where higher is better: (its name, its value before, its value after)."""

CHANCE = 0.5
"""Held-out pairwise accuracy of a coin toss, which a preference model (or DPO's implicit reward) must beat."""
SFT_MIN_DROP = 0.02
"""Share of its starting value the SFT held-out loss must lose. The held-out set is fixed, so any drop is real; a
drop under 2% is a model that barely moved."""
RULE_GAIN = 0.05
"""Rise of a held-out score (in [0, 1]) over the SFT policy's that counts as learning: on the report's 200 prompts
sampling alone moves a score by about ±0.03."""
KL_BOUND = 10.0
"""KL to the reference (nats per reply) a policy may end at: past it the policy gives its replies e^10 ≈ 22,000
times the reference's probability, far outside what the reward model was trained to judge."""
REWARD_RISE = 0.5
"""Rise of the raw reward (first to last third of the iterations) that is material: under Bradley-Terry the reward
model prefers a late reply to an early one about 62% of the time."""
COLLAPSE_KL_RISE = 1.0
"""Rise of KL (nats per reply, first to last third) that counts as moving away from the reference."""
COLLAPSE_PERPLEXITY_DROP = 0.2
"""Share of its perplexity a policy must lose to count as narrowing: a policy sharpens a little as it learns, a
fifth less while KL rises is the pattern of MOSS-RLHF's collapsed runs."""

RULE_IN_WORDS = ("The **rule score** is the bundled task's own check of a reply, apart from the reward model: each "
                 "prompt asks about a topic word (or an arithmetic question), and a reply earns 0.5 for naming the "
                 "topic (or the right answer) plus 0.5 for thanking the user, so 1.0 is a reply that does both. "
                 "Its two parts below show which of the two a policy learned.")

PART_NAMES = {"on_topic": "naming the topic", "thanks": "thanking the user"}
"""How the report names the parts of the bundled task's rule (`rlhf.sample.parts_of`)."""

PLOTS = [("ppo/reward_raw", "reward (raw)", "reward-model score"),
         ("ppo/kl", "KL to reference", "KL (nats per reply)"),
         ("ppo/response_length", "response length", "tokens"),
         ("ppo/perplexity", "policy perplexity", "perplexity")]


# --- verdicts and checks: pure functions of numbers and metric rows ---------------------------------------------


def series(rows: list[dict], key: str) -> list[float]:
    """The values of `key` in the rows that have it, in order."""
    return [float(m[key]) for m in rows if m.get(key) is not None]


def thirds(values: list[float]) -> Optional[tuple[float, float]]:
    """Means of the first and of the last third of a series (None below two values): a trend one noisy iteration
    does not make."""
    if len(values) < 2:
        return None
    n = max(1, len(values) // 3)
    return sum(values[:n]) / n, sum(values[-n:]) / n


def first_and_last(rows: list[dict], key: str) -> Optional[HeldOut]:
    """A held-out measure logged before and after training (e.g. PPO's eval/rule_score at step 0 and at the end)."""
    values = series(rows, key)
    return (key, values[0], values[-1]) if len(values) >= 2 else None


def ppo_held_out(rows: list[dict]) -> Optional[HeldOut]:
    """PPO's held-out measure from its metrics: eval/rule_score, else any other eval rule (all are scores)."""
    keys = sorted({k for m in rows for k in m if k.startswith("eval/")}, key=lambda k: (k != "eval/rule_score", k))
    measures = (first_and_last(rows, k) for k in keys)
    return next((m for m in measures if m), None)


def sft_verdict(losses: list[float]) -> Verdict:
    """SFT worked when its held-out loss fell."""
    if len(losses) < 2:
        return UNCHECKED, "no held-out loss was logged twice (give the SFT stage a data.eval file)"
    first, last = losses[0], losses[-1]
    if last <= first * (1 - SFT_MIN_DROP):
        return PASS, f"held-out loss fell, {first:.3f} → {last:.3f}"
    return WARN, f"held-out loss did not fall by {SFT_MIN_DROP:.0%}, {first:.3f} → {last:.3f}"


def accuracy_verdict(what: str, accuracy: float, pairs: int) -> Verdict:
    """A preference model worked when its held-out pairwise accuracy beats a coin toss by two standard errors."""
    if not pairs:
        return UNCHECKED, f"no held-out pairs to measure {what} on"
    margin = 2 * math.sqrt(CHANCE * (1 - CHANCE) / pairs)  # a coin toss's accuracy stays within this 95% of the time
    said = f"{what} {accuracy:.3f} on {pairs} pairs"
    if accuracy > CHANCE + margin:
        return PASS, f"{said}, above chance ({CHANCE} + {margin:.3f})"
    return WARN, f"{said}, not clearly above chance ({CHANCE} + {margin:.3f}): it ranks replies about as a coin would"


def policy_verdict(held_out: Optional[HeldOut], kl: Optional[float]) -> Verdict:
    """A policy stage worked when a held-out score rose over the SFT policy's and KL to the reference stayed bounded."""
    bounded = kl is None or kl <= KL_BOUND
    kl_said = "" if kl is None else f"; KL to reference {kl:.2f} nats per reply at the end (bound {KL_BOUND:g})"
    kl_said += "" if bounded else ": the policy drifted far from SFT"
    if held_out is None:
        return (UNCHECKED if bounded else WARN), f"no held-out measure to judge it by{kl_said}"
    name, before, after = held_out
    rose = after - before >= RULE_GAIN
    change = "rose" if rose else f"did not rise by {RULE_GAIN}"
    return (PASS if rose and bounded else WARN), f"{name} {change} over SFT's, {before:.3f} → {after:.3f}{kl_said}"


def reward_hacking(ppo_rows: list[dict], held_out: Optional[HeldOut]) -> Verdict:
    """Reward hacking: the training reward rises materially while the held-out measure stays flat (or falls)."""
    trend = thirds(series(ppo_rows, "ppo/reward_raw"))
    if trend is None or held_out is None:
        return UNCHECKED, "reward hacking: needs two PPO iterations and a held-out measure"
    (start, end), (name, before, after) = trend, held_out
    if end - start >= REWARD_RISE and after - before < RULE_GAIN:
        return WARN, (f"possible reward hacking: the reward rose {start:.3f} → {end:.3f} (first → last third of "
                      f"the iterations) while {name} did not follow, {before:.3f} → {after:.3f}. PPO learned what the "
                      "reward model likes, not the task: read the replies below; a better reward model or a lower "
                      "`ppo.kl_target` (a higher `ppo.kl_coef` with a fixed controller) helps")
    return PASS, f"no reward hacking: reward {start:.3f} → {end:.3f}, {name} {before:.3f} → {after:.3f}"


def parts_followed(before: Optional[dict[str, float]], after: Optional[dict[str, float]]) -> Verdict:
    """Whether a policy learned every part of the task's rule, not one part alone: a part that gained less than
    RULE_GAIN over the SFT policy's while another rose by more is half a task learned (a reward model that rewards
    the easy half; the demo once learned to thank while it still missed the topic)."""
    if not before or not after:
        return UNCHECKED, "the rule's parts: needs them for the SFT policy and this one"
    gains = {name: after[name] - before[name] for name in before if name in after}
    said = ", ".join(f"{PART_NAMES.get(n, n)} {before[n]:.0%} → {after[n]:.0%}" for n in gains)
    flat = [n for n, gain in gains.items() if gain < RULE_GAIN]
    if flat and len(flat) < len(gains):
        return WARN, (f"only part of the task learned: {said}. The reward model may reward "
                      f"{' and '.join(PART_NAMES.get(n, n) for n in gains if n not in flat)} but not "
                      f"{' and '.join(PART_NAMES.get(n, n) for n in flat)} (check it on replies that differ in that "
                      "part alone)")
    return (PASS, f"every part of the rule rose: {said}") if not flat else (WARN, f"no part of the rule rose: {said}")


def collapse_sign(ppo_rows: list[dict]) -> Verdict:
    """MOSS-RLHF's sign of collapse: KL to the reference rises while the policy's perplexity falls."""
    kl, ppl = thirds(series(ppo_rows, "ppo/kl")), thirds(series(ppo_rows, "ppo/perplexity"))
    if kl is None or ppl is None:
        return UNCHECKED, "collapse: needs KL and perplexity from two PPO iterations"
    said = (f"KL to reference {kl[0]:.2f} → {kl[1]:.2f} nats per reply, perplexity {ppl[0]:.2f} → {ppl[1]:.2f} "
            "(first → last third of the iterations)")
    if kl[1] - kl[0] >= COLLAPSE_KL_RISE and ppl[1] <= ppl[0] * (1 - COLLAPSE_PERPLEXITY_DROP):
        return WARN, (f"sign of collapse: {said}: the policy narrows onto a few replies the reward model likes. "
                      "Lower `ppo.kl_target` (with `ppo.kl_controller: adaptive`; or raise a fixed `ppo.kl_coef`) "
                      "or the policy's learning rate")
    return PASS, f"no sign of collapse: {said}"


# --- report.md -----------------------------------------------------------------------------------------------


def draw(ax, steps: list[int], values: list[float], title: str, ylabel: str) -> None:
    """One monitor on an Axes: a labelled y-axis, and ticks only at whole iterations."""
    from matplotlib.ticker import MaxNLocator
    ax.plot(steps, values, marker="o", markersize=3)
    ax.set_title(title)
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_ppo(metrics_path: str, out_dir: str) -> list[str]:
    """One PNG per monitor; rising length and KL with falling perplexity are MOSS-RLHF's signs of collapse."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [m for m in read_metrics(metrics_path) if "ppo/reward_raw" in m]
    files = []
    for key, title, ylabel in PLOTS:
        fig, ax = plt.subplots(figsize=(4.5, 3))
        draw(ax, [m["step"] for m in rows if m.get(key) is not None], series(rows, key), title, ylabel)
        fig.tight_layout()
        name = key.split("/")[1] + ".png"
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _verdict_line(stage: str, verdict: Verdict) -> str:
    return f"- **{verdict[0]}** {stage}: {verdict[1]}."


def _share(parts: Optional[dict[str, float]], name: str) -> str:
    return f"{parts[name]:.0%}" if parts else "–"


def write_report(out_dir: str, *, rm_eval: Optional[dict], rules: dict[str, Optional[float]],
                 examples: list[tuple[str, list[str]]], sft_metrics: str, ppo_metrics: Optional[str] = None,
                 dpo_metrics: Optional[str] = None, parts: Optional[dict[str, Optional[dict]]] = None) -> str:
    """report.md: a verdict per stage and the checks, each stage's numbers, PPO's monitors, and replies side by side.
    `rules`, `parts` (`rlhf.sample.parts_of` per policy) and each example's replies follow the same policies, in
    order (the SFT policy first, then PPO and/or DPO)."""
    parts = parts or {}
    sft_evals = [m["eval/loss"] for m in read_metrics(sft_metrics) if "eval/loss" in m]
    ppo_all = read_metrics(ppo_metrics) if ppo_metrics else []
    ppo_rows = [m for m in ppo_all if "ppo/reward_raw" in m]
    dpo_evals = [m for m in read_metrics(dpo_metrics) if "eval/pairwise_accuracy" in m] if dpo_metrics else []
    names = list(rules)
    scored = len(names) > 1 and all(v is not None for v in rules.values())

    def against_sft(label: str) -> Optional[HeldOut]:
        """The report's own comparison: the same held-out prompts answered by the SFT policy and by `label`'s."""
        return ("held-out rule score", rules["SFT"], rules[label]) if scored and label in rules else None

    verdicts = [_verdict_line("SFT", sft_verdict(sft_evals))]
    if rm_eval:
        verdicts.append(_verdict_line("reward model", accuracy_verdict(
            "held-out pairwise accuracy", rm_eval["pairwise_accuracy"], rm_eval["pairs"])))
    checks = []
    if ppo_metrics:
        held_out = against_sft("PPO") or ppo_held_out(ppo_all)
        verdicts.append(_verdict_line("PPO", policy_verdict(held_out, ppo_rows[-1]["ppo/kl"] if ppo_rows else None)))
        checks = [_verdict_line("PPO", reward_hacking(ppo_rows, held_out)),
                  _verdict_line("PPO", collapse_sign(ppo_rows))]
        if parts.get("SFT") and parts.get("PPO"):
            checks.append(_verdict_line("PPO", parts_followed(parts["SFT"], parts["PPO"])))
    if dpo_metrics:
        held_out = against_sft("DPO") or first_and_last(dpo_evals, "eval/pairwise_accuracy")
        kl = series(dpo_evals, "eval/kl")
        verdicts.append(_verdict_line("DPO", policy_verdict(held_out, kl[-1] if kl else None)))

    lines = ["# RLHF run report", "", "## Did it work?", "", *verdicts]
    if checks:
        lines += ["", "Checks of PPO's run against its failure modes:", "", *checks]
    lines += ["", "## Numbers", "", "| stage | measure | value |", "|---|---|---|"]
    if sft_evals:
        lines.append(f"| SFT | held-out loss (start → end) | {sft_evals[0]:.3f} → {sft_evals[-1]:.3f} |")
    if rm_eval:
        lines += [f"| reward model | held-out pairwise accuracy | "
                  f"{rm_eval['pairwise_accuracy']:.3f} ({rm_eval['pairs']} pairs) |",
                  f"| reward model | mean margin (better − worse) | {rm_eval['mean_margin']:.3f} |"]
    if ppo_rows:
        first, last = ppo_rows[0], ppo_rows[-1]
        lines += [f"| PPO | reward, first → last iteration | "
                  f"{first['ppo/reward_raw']:.3f} → {last['ppo/reward_raw']:.3f} |",
                  f"| PPO | KL to reference, last iteration | {last['ppo/kl']:.3f} |"]
    if dpo_evals:
        first, last = dpo_evals[0], dpo_evals[-1]
        lines += [f"| DPO | held-out implicit-reward pairwise accuracy (start → end) | "
                  f"{first['eval/pairwise_accuracy']:.3f} → {last['eval/pairwise_accuracy']:.3f} |",
                  f"| DPO | held-out log-prob of better / worse responses (start → end) | "
                  f"{first['eval/better_logp']:.2f} / {first['eval/worse_logp']:.2f} → "
                  f"{last['eval/better_logp']:.2f} / {last['eval/worse_logp']:.2f} |"]
    if scored:
        lines.append(f"| held-out prompts | sample's rule score, {' → '.join(names)} | "
                     f"{' → '.join(f'{rules[n]:.3f}' for n in names)} |")
        lines += ["", "## Rule score on held-out prompts", "", RULE_IN_WORDS, "",
                  "| policy | rule score | replies naming the topic (or answer) | replies thanking the user |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {rules[n]:.3f} | {_share(parts.get(n), 'on_topic')} | {_share(parts.get(n), 'thanks')} |"
                  for n in names]
    if ppo_rows:
        plots = plot_ppo(ppo_metrics, out_dir)
        lines += ["", "## PPO monitors", "",
                  "Rising length and KL with falling perplexity are the signs of a collapsing run (MOSS-RLHF); the "
                  "check above compares the first and last third of the iterations.", ""]
        cut = [m["step"] for m in ppo_rows if m.get("ppo/cut_short")]
        lines += [f"![{p}]({p})" for p in plots[:1]]
        if cut:
            lines += ["", f"**Replies cut short**: from iteration {cut[0]} most replies did not reach `<eom>` "
                          f"(`ppo/ended_fraction` {min(m['ppo/ended_fraction'] for m in ppo_rows):.0%} at its lowest): "
                          "the generation cap may be below the replies the reward model prefers, and PPO then learns "
                          "the ones that fit. Raise `generation.max_new_tokens` (or set it to `auto`).", ""]
        lines += [f"![{p}]({p})" for p in plots[1:]]
    lines += ["", "## Replies side by side", "", "| prompt | " + " | ".join(f"{n} policy" for n in names) + " |",
              "|---" * (len(names) + 1) + "|"]
    lines += [f"| {_cell(p)} | " + " | ".join(_cell(r) for r in replies) + " |" for p, replies in examples]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
