"""MOSS plugins in the loop, end to end: a tiny model fine-tuned on the sample's arithmetic dialogues rolls out
well-formed plugin turns around a tool, and a PPO run rolls out through the tools on the policy's ranks with the
preference model and verifiable rules as one weighted reward, each part logged apart."""
from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import run_cli
from rlhf.metrics import read_metrics


pytestmark = pytest.mark.slow

TURN = re.compile(r"<\|Inner Thoughts\|>: [^<]*<eot>\n<\|Commands\|>: (?P<commands>[^<]*)<eoc>\n"
                  r"<\|Results\|>:[ \n](?P<results>[^<]*?)\n?<eor>\n<\|MOSS\|>: [^<]*<eom>")


def test_the_sft_plugin_model_writes_well_formed_turns_around_a_scripted_tool(tiny, plugin_sft):
    from rlhf.batching import collate_prompts
    from rlhf.data import load_prompts
    from rlhf.generation import generate_plugin_replies
    from rlhf.modeling import load_causal_lm, load_tokenizer
    from rlhf.moss import tokenize_prompt
    from rlhf.tools import ToolRegistry

    tokenizer, model = load_tokenizer(plugin_sft), load_causal_lm(plugin_sft)
    tools = ToolRegistry()
    tools.register_tool("Calculator", "Calculate(expression)", "Calculate", lambda expression: "42")
    prompts = load_prompts(tiny["plugin_prompts_eval"])[:16]
    batch = collate_prompts([tokenize_prompt(d, tokenizer, 128, True) for d in prompts], tokenizer.pad_token_id)
    torch.manual_seed(0)
    out, infos = generate_plugin_replies(model, tokenizer, batch, {"max_new_tokens": 28, "do_sample": False},
                                         tools, "cpu", max_results_tokens=24)
    calls = 0
    for ids, seen, info in zip(out["response_ids"], out["response_mask"], infos):
        text = tokenizer.decode(ids[seen.bool()].tolist(), skip_special_tokens=False)
        turn = TURN.fullmatch(text)
        assert turn, text
        assert turn["commands"] == info["commands"] and turn["results"] == info["results"]
        if info["commands"] != "None":
            calls += 1
            expression = re.fullmatch(r'Calculate\("([^"]*)"\)', info["commands"])[1]
            assert info["results"] == f'Calculate("{expression}") => 42'
    assert out["ended"].all()
    assert calls >= 12  # it learnt to call the calculator on arithmetic questions


def test_rlhf_chat_with_the_plugin_model_runs_its_commands_and_keeps_the_conversation(tiny, plugin_sft, tmp_path):
    """A person talks to the plugin model in the terminal: it thinks, runs the calculator (its config.yaml says it
    is a plugin model), reads the result and answers; the next question is asked with the first exchange, plugin
    segments and all, as its history (/save writes it as a dialogue); /reset starts over."""
    import io
    from rlhf.data import load_dialogues, load_prompts
    from rlhf.drivers.chat import run_chat
    [first, second] = load_prompts(tiny["plugin_prompts_eval"])[:2]
    saved = tmp_path / "chat.jsonl"
    typed = io.StringIO(f"{first.turns[0].human}\n\n{second.turns[0].human}\n/save {saved}\n/reset\n"
                        f"{first.turns[0].human}\n")  # the input ends: as Ctrl-D
    shown = io.StringIO()
    assert run_chat(plugin_sft, None, ["generation.do_sample=false"], None, first.meta_instruction, typed, shown) == 0
    lines = shown.getvalue().splitlines()
    assert lines[0].startswith(f"rlhf chat: {plugin_sft} (a plugin model with Calculator, Equation Solver)")
    runs = [line for line in lines if line.strip().startswith("(runs) Calculate(")]
    reads = [line for line in lines if line.strip().startswith("(reads) Calculate(") and " => " in line]
    answers = [line.split("MOSS> ")[1] for line in lines if "MOSS> " in line]
    assert len(answers) == 3 and len(runs) >= 2 and len(reads) == len(runs), lines
    assert answers[2] == answers[0]  # greedy, and after /reset the same question without history
    [conversation] = load_dialogues(str(saved))  # what the model saw: two turns, each with its plugin segments
    assert [t.human for t in conversation.turns] == [first.turns[0].human, second.turns[0].human]
    assert [t.moss for t in conversation.turns] == answers[:2] and conversation.turns[0].commands.startswith("Calc")
    assert conversation.meta_instruction == first.meta_instruction


def test_grpo_with_the_answer_reward_raises_held_out_accuracy_over_the_sft_policy(tiny, plugin_sft, tmp_path):
    """The SFT policy calls the calculator but answers with its result only part of the time; GRPO with the
    verifiable answer reward alone (no preference model, no critic) must learn to trust the Results: the
    fraction of correct final answers on the 142 held-out expressions rises, with the KL to the SFT policy bounded.
    In one process: the same workers and numbers as on Ray, without four rank processes to start."""
    out = tmp_path / "answer-ppo"
    assert run_cli("ppo", "--config", "configs/tiny/plugin_ppo.yaml", "--policy", plugin_sft, "--prompts",
                   tiny["plugin_prompts"], "--set", f"data.eval={tiny['plugin_prompts_eval']}",
                   "--set", "logging.progress=false", "--set", "ray.in_process=true", "--output", out) == 0
    metrics = read_metrics(f"{out}/metrics.jsonl")
    evals = {m["step"]: m["eval/answer_accuracy"] for m in metrics if "eval/answer_accuracy" in m}
    assert sorted(evals) == [0, 16]
    assert evals[16] >= evals[0] + 0.1, evals
    rewards = [m["reward/answer"] for m in metrics if "reward/answer" in m]
    assert sum(rewards[-4:]) / 4 >= sum(rewards[:4]) / 4 + 0.1, rewards
    kls = [m["ppo/kl"] for m in metrics if "ppo/kl" in m]
    assert max(kls) < 4.0, kls
    with open(out / "placement.json") as f:
        assert sorted(json.load(f)) == ["policy", "reference"]


def test_plugin_rollouts_with_verifiable_rewards_and_the_preference_model(tiny, plugin_sft, rm_run, tmp_path):
    """The plugin policy rolls out through the tools on its own ranks; the reward is the preference model's score
    plus the answer and command rules, each logged apart; held-out answers are checked before and after. The
    controller's reward, so in one process (the same workers as on Ray)."""
    out = tmp_path / "plugin-ppo"
    assert run_cli("ppo", "--config", "configs/tiny/plugin_ppo.yaml", "--policy", plugin_sft, "--reward",
                   f"{rm_run}/final", "--prompts", tiny["plugin_prompts"], "--set",
                   f"data.eval={tiny['plugin_prompts_eval']}", "--set", "ppo.eval_prompts=16",
                   "--set", "ppo.iterations=2", "--set", "ppo.reward_model_weight=0.5",
                   "--set", "ppo.reward_rules.command=0.25", "--set", "ppo.reward_rules.grounded=0.25",
                   "--set", "logging.progress=false", "--set", "ray.in_process=true", "--output", out) == 0
    metrics = read_metrics(f"{out}/metrics.jsonl")
    iters = [m for m in metrics if "ppo/reward_raw" in m]
    assert len(iters) == 2
    for m in iters:
        parts = 0.5 * m["reward/model"] + m["reward/answer"] + 0.25 * m["reward/command"] + 0.25 * m["reward/grounded"]
        assert m["ppo/reward_raw"] == pytest.approx(parts, abs=1e-5)
        assert m["ppo/tool_call_fraction"] > 0.5 and m["reward/command"] > 0.5
    evals = [m for m in metrics if "eval/answer_accuracy" in m]
    assert [m["step"] for m in evals] == [0, 2]
    with open(out / "placement.json") as f:
        assert sorted(json.load(f)) == ["policy", "reference", "reward"]  # GRPO: no critic
