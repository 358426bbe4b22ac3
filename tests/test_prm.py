"""The process reward model (issue 33): steps found in a reply's own tokens, its loss and metrics as pure functions,
and `rlhf prm` / `rlhf prm-eval` on the bundled step task."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from reward.losses import step_loss
from reward.steps import (EncodedSteps, Pieces, calibrated, collate_steps, encode_solution, fit_calibration, step_ends,
                          step_features, step_metrics)
from rlhf.data import load_steps
from rlhf.records import StepSolution
from rlhf.moss import Dialogue


def pieces_of(texts: list[str]):
    """A vocabulary where token i is texts[i]."""
    return lambda token: texts[token]


@pytest.mark.parametrize("texts, expected", [
    (["9 + 4", " = 13", "\n", "13 + 3", " = 16", "\n", "The answer", " is 16."], [1, 4, 7]),
    (["a", ".\n", "b"], [1, 2]),                   # a token holding a step's end and the separator ends the step
    (["a", "\nb", " c"], [0, 2]),                  # a token holding the separator and the next step's start
    (["a", "\n", "\n", "b", "\n"], [0, 3]),        # no step between two separators, none after the last
    (["a ", " ", "\n", "b"], [0, 3]),              # trailing white space is not the step's end
    (["\n", "\n"], []),
])
def test_a_step_ends_at_the_token_holding_its_last_character(texts, expected):
    assert step_ends(list(range(len(texts))), pieces_of(texts), "\n") == expected


def test_a_separator_of_several_characters_split_over_tokens():
    texts = ["x = 1", " к", "и", " y = 2", " ки"]
    assert step_ends(list(range(len(texts))), pieces_of(texts), " ки") == [0, 3]


def test_a_bundled_solution_is_encoded_with_one_end_per_labelled_step(tiny):
    from rlhf.modeling import load_tokenizer
    tokenizer = load_tokenizer(tiny["tokenizer"])
    solutions = load_steps(tiny["steps_train"])
    pieces = Pieces(tokenizer)
    encoded = [encode_solution(s, tokenizer, 256, False, "\n", pieces) for s in solutions[:50]]
    assert all(e is not None for e in encoded)
    for solution, e in zip(solutions, encoded):
        assert len(e.ends) == len(solution.steps) and e.labels == solution.labels
        for step, end, next_start in zip(solution.steps, e.ends, [*e.ends[1:], len(e.ids)]):
            upto = tokenizer.decode(e.ids[e.reply_start:end + 1])
            assert upto.rstrip().endswith(step), (upto, step)  # the step's text ends at its end token
        assert tokenizer.decode(e.ids[-1:]) == "<eom>"


def test_a_solution_longer_than_the_limit_is_left_out(tiny):
    from rlhf.modeling import load_tokenizer
    tokenizer = load_tokenizer(tiny["tokenizer"])
    solution = StepSolution(Dialogue.from_json({"turns": [{"human": "What is 1 + 2?"}]}), ["1 + 2 = 3"] * 40,
                            [True] * 40)
    assert encode_solution(solution, tokenizer, 64, False, "\n") is None
    assert encode_solution(solution, tokenizer, 2048, False, "\n") is not None


def test_the_loss_of_a_global_batch_does_not_depend_on_how_it_is_split():
    torch.manual_seed(0)
    items = [EncodedSteps(list(range(10 + i)), sorted(torch.randperm(10)[:1 + i % 3].tolist()),
                          [bool(x) for x in torch.randint(0, 2, (1 + i % 3,))]) for i in range(6)]
    logits_of = {i: torch.randn(3) for i in range(6)}

    def loss(parts: list[list[int]]) -> float:
        total = sum(len(e.ends) for e in items)
        out = 0.0
        for part in parts:
            batch = collate_steps([items[i] for i in part], 0)
            logits = torch.stack([logits_of[i][:batch["step_index"].shape[1]] for i in part])
            out += float(step_loss(logits, batch["labels"], batch["step_mask"], total)["loss"])
        return out

    whole = loss([list(range(6))])
    assert loss([[0, 1], [2, 3], [4, 5]]) == pytest.approx(whole, rel=1e-6)
    assert loss([[5], [0, 2, 4], [1, 3]]) == pytest.approx(whole, rel=1e-6)


def test_step_and_first_error_accuracy():
    labels = [[True, True, False], [True, True], [False, False]]
    found = [[0.9, 0.2, 0.1],   # steps: 2 of 3 right; first predicted bad 1, labelled 2: wrong
             [0.6, 0.7],        # 2 of 2; none bad either way: right
             [0.4, 0.8]]        # 1 of 2; first bad 0 both: right
    metrics = step_metrics(found, labels)
    assert metrics["step_accuracy"] == pytest.approx(5 / 7)
    assert metrics["first_error_accuracy"] == pytest.approx(2 / 3)
    assert (metrics["steps"], metrics["solutions"]) == (7, 3)


@pytest.mark.slow
def test_prm_on_two_ranks_packed_with_lora_writes_a_model_that_prm_eval_scores_as_the_run_did(tiny, tmp_path,
                                                                                               capsys):
    from conftest import run_cli
    from rlhf.metrics import read_metrics
    out, held_out = tmp_path / "prm", tmp_path / "steps_eval.jsonl"
    held_out.write_text("".join(open(tiny["steps_eval"], encoding="utf-8").readlines()[:64]), encoding="utf-8")
    assert run_cli("prm", "--config", "configs/tiny/prm.yaml", "--model", tiny["base"], "--data", tiny["steps_train"],
                   "--set", f"data.eval={held_out}", "--set", "train.max_steps=6",
                   "--set", "train.max_tokens_per_micro_batch=512", "--set", "lora.enabled=true",
                   "--set", "deepspeed.zero_stage=2", "--set", "logging.progress=false", "--output", out) == 0
    evals = [m for m in read_metrics(str(out / "metrics.jsonl")) if "eval/step_accuracy" in m]
    assert [m["step"] for m in evals] == [0, 6]
    assert evals[-1]["eval/solutions"] == 64 and evals[-1]["eval/steps"] > 150
    final = out / "final"
    saved = json.loads((final / "prm.json").read_text())
    assert saved["step_separator"] == "\n" and set(saved["calibration"]) == {"value_weight", "logprob_weight", "bias"}
    assert json.loads((final / "reply_lengths.json").read_text())["replies"] == 1500
    capsys.readouterr()
    # One process, padded rows, the LoRA merged into final/: the same step probabilities as the run's two ranks
    # (a step whose probability sits on 0.5 may flip).
    assert run_cli("prm-eval", "--model", final, "--data", held_out) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (printed["steps"], printed["solutions"]) == (evals[-1]["eval/steps"], 64)
    assert abs(printed["step_accuracy"] - evals[-1]["eval/step_accuracy"]) <= 2 / printed["steps"]


def test_best_of_n_with_a_process_reward_model_keeps_the_reply_whose_weakest_step_is_strongest(tiny, tmp_path):
    """A process reward model (its directory has prm.json) as `--scorer`: each reply is split as prm-eval splits a
    solution, and its score is its least likely good step."""
    import shutil
    from reward.model import ScalarHeadModel
    from reward.scorer import PreferenceScorer, ProcessScorer, load_scorer
    from reward.steps import prm_file
    from rlhf.config import load_config
    from rlhf.drivers.generate import run_generate
    from rlhf.modeling import write_text_files
    torch.manual_seed(3)
    model = ScalarHeadModel.from_pretrained(tiny["base"])
    with torch.no_grad():
        model.head.weight.normal_()
    prm = tmp_path / "prm"
    model.save_pretrained(str(prm), classifier="token")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny['base']}/{name}", prm / name)
    cfg = load_config("generate")
    reward_only = load_scorer(dataclasses.replace(cfg.model, path=str(prm)), cfg.data)
    assert type(reward_only) is PreferenceScorer  # without prm.json it is read as a preference model
    write_text_files(str(prm), prm_file("\n"))
    scorer = load_scorer(dataclasses.replace(cfg.model, path=str(prm)), cfg.data)
    assert isinstance(scorer, ProcessScorer)

    solutions = load_steps(tiny["steps_eval"])[:3]
    dialogues = [s.dialogue("\n") for s in solutions]
    found = scorer.step_probabilities(dialogues)
    assert [len(p) for p in found] == [len(s.steps) for s in solutions]
    assert scorer.score(dialogues) == [min(p) for p in found]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(open(tiny["steps_prompts_eval"], encoding="utf-8").readlines()[:6]), encoding="utf-8")
    out = tmp_path / "best.jsonl"
    assert run_generate(tiny["base"], str(prompts), str(out), None,
                        ["generation.max_new_tokens=24"], best_of=3, scorer=str(prm)) == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 6
    for line in lines:
        scores = [c["score"] for c in line["candidates"]]
        assert line["score"] == max(scores) and all(0.0 <= s <= 1.0 for s in scores)
        prompt = Dialogue.from_json({"turns": [{"human": line["turns"][0]["human"]}],
                                     "meta_instruction": line["meta_instruction"]})
        alone = scorer.score([prompt.with_reply(line["response"])])[0]
        assert alone == pytest.approx(line["score"], abs=1e-5)


def test_step_features_are_the_value_and_the_running_minimum_log_prob_at_each_step_end():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0]])
    batch = {"input_ids": ids, "step_index": torch.tensor([[3, 4]]), "reply_start": torch.tensor([2])}
    logits = torch.zeros(1, 6, 10)
    logits[0, 1, 7] = 2.0   # token 7 (position 2) likely
    logits[0, 2, 8] = -3.0  # token 8 (position 3) unlikely
    logits[0, 3, 9] = 1.0
    logp = torch.log_softmax(logits, -1)
    values = torch.arange(6.0)[None]
    found = step_features(values, logits, batch)
    assert found[0, :, 0].tolist() == [3.0, 4.0]
    lowest = min(float(logp[0, 1, 7]), float(logp[0, 2, 8]))  # the prompt's tokens (before position 2) do not count
    assert found[0, :, 1].tolist() == pytest.approx([lowest, lowest])


def test_the_calibration_recovers_the_weights_that_made_the_labels():
    torch.manual_seed(0)
    features = [torch.randn(4, 2) for _ in range(400)]
    truth = {"value_weight": 0.5, "logprob_weight": 2.0, "bias": -1.0}
    labels = [(torch.rand(4) < torch.sigmoid(calibrated(f, truth))).tolist() for f in features]
    fitted = fit_calibration(features, labels)
    assert fitted == pytest.approx(truth, abs=0.25)
    assert calibrated(torch.tensor([[1.0, -2.0]]), None).tolist() == [1.0]  # no calibration: the head's value
