"""The run report a person reads after a pipeline: report.md with PNG plots of PPO's collapse monitors, the
reward model's held-out accuracy, the rule score of the SFT and PPO policies, and replies side by side."""
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


def write_report(out_dir: str, *, rm_eval: dict, rule_sft: Optional[float], rule_ppo: Optional[float],
                 examples: list[tuple[str, str, str]], ppo_metrics: str, sft_metrics: str) -> str:
    plots = plot_ppo(ppo_metrics, out_dir)
    ppo_rows = [m for m in read_metrics(ppo_metrics) if "ppo/reward_raw" in m]
    sft_evals = [m["eval/loss"] for m in read_metrics(sft_metrics) if "eval/loss" in m]
    first, last = ppo_rows[0], ppo_rows[-1]
    lines = ["# RLHF run report", "",
             "| stage | measure | value |", "|---|---|---|"]
    if sft_evals:
        lines.append(f"| SFT | held-out loss (start → end) | {sft_evals[0]:.3f} → {sft_evals[-1]:.3f} |")
    lines += [f"| reward model | held-out pairwise accuracy | {rm_eval['pairwise_accuracy']:.3f} ({rm_eval['pairs']} pairs) |",
              f"| reward model | mean margin (better − worse) | {rm_eval['mean_margin']:.3f} |",
              f"| PPO | reward, first → last iteration | {first['ppo/reward_raw']:.3f} → {last['ppo/reward_raw']:.3f} |",
              f"| PPO | KL to reference, last iteration | {last['ppo/kl']:.3f} |"]
    if rule_sft is not None and rule_ppo is not None:
        lines.append(f"| held-out prompts | sample's rule score, SFT → PPO | {rule_sft:.3f} → {rule_ppo:.3f} |")
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
    lines += ["", "## Replies before and after PPO", "", "| prompt | SFT policy | PPO policy |", "|---|---|---|"]
    lines += [f"| {_cell(p)} | {_cell(a)} | {_cell(b)} |" for p, a, b in examples]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
