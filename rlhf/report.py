"""The run report a person reads after a pipeline: report.md with PNG plots of PPO's collapse monitors, the
reward model's held-out accuracy, DPO's held-out implicit-reward accuracy, the rule score of the SFT, PPO and DPO
policies, and replies side by side."""
from __future__ import annotations

import os
from typing import Optional

from rlhf.metrics import read_metrics

PLOTS = [("ppo/reward_raw", "reward (raw)"), ("ppo/kl", "KL to reference"),
         ("ppo/response_length", "response length (tokens)"), ("ppo/perplexity", "policy perplexity")]


def plot_ppo(metrics_path: str, out_dir: str) -> list[str]:
    """One PNG per monitor; rising length and KL with falling perplexity are MOSS-RLHF's signs of collapse."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [m for m in read_metrics(metrics_path) if "ppo/reward_raw" in m]
    files = []
    for key, title in PLOTS:
        steps = [m["step"] for m in rows if m.get(key) is not None]
        values = [m[key] for m in rows if m.get(key) is not None]
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = key.split("/")[1] + ".png"
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_report(out_dir: str, *, rm_eval: Optional[dict], rules: dict[str, Optional[float]],
                 examples: list[tuple[str, list[str]]], sft_metrics: str, ppo_metrics: Optional[str] = None,
                 dpo_metrics: Optional[str] = None) -> str:
    """report.md: each stage's numbers, PPO's monitors, and replies side by side. `rules` and each example's replies
    follow the same policies, in order (the SFT policy first, then PPO and/or DPO)."""
    sft_evals = [m["eval/loss"] for m in read_metrics(sft_metrics) if "eval/loss" in m]
    lines = ["# RLHF run report", "", "| stage | measure | value |", "|---|---|---|"]
    if sft_evals:
        lines.append(f"| SFT | held-out loss (start → end) | {sft_evals[0]:.3f} → {sft_evals[-1]:.3f} |")
    if rm_eval:
        lines += [f"| reward model | held-out pairwise accuracy | {rm_eval['pairwise_accuracy']:.3f} ({rm_eval['pairs']} pairs) |",
                  f"| reward model | mean margin (better − worse) | {rm_eval['mean_margin']:.3f} |"]
    ppo_rows = [m for m in read_metrics(ppo_metrics) if "ppo/reward_raw" in m] if ppo_metrics else []
    if ppo_rows:
        first, last = ppo_rows[0], ppo_rows[-1]
        lines += [f"| PPO | reward, first → last iteration | {first['ppo/reward_raw']:.3f} → {last['ppo/reward_raw']:.3f} |",
                  f"| PPO | KL to reference, last iteration | {last['ppo/kl']:.3f} |"]
    dpo_evals = [m for m in read_metrics(dpo_metrics) if "eval/pairwise_accuracy" in m] if dpo_metrics else []
    if dpo_evals:
        first, last = dpo_evals[0], dpo_evals[-1]
        lines += [f"| DPO | held-out implicit-reward pairwise accuracy (start → end) | "
                  f"{first['eval/pairwise_accuracy']:.3f} → {last['eval/pairwise_accuracy']:.3f} |",
                  f"| DPO | held-out log-prob of better / worse responses (start → end) | "
                  f"{first['eval/better_logp']:.2f} / {first['eval/worse_logp']:.2f} → "
                  f"{last['eval/better_logp']:.2f} / {last['eval/worse_logp']:.2f} |"]
    names = list(rules)
    if all(v is not None for v in rules.values()) and len(names) > 1:
        lines.append(f"| held-out prompts | sample's rule score, {' → '.join(names)} | "
                     f"{' → '.join(f'{rules[n]:.3f}' for n in names)} |")
    if ppo_rows:
        plots = plot_ppo(ppo_metrics, out_dir)
        lines += ["", "## PPO monitors", "",
                  "Rising length and KL with falling perplexity are the signs of a collapsing run (MOSS-RLHF).", ""]
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
