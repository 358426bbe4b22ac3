"""Stepwise supervision (process reward models' data): a solution in steps, each labelled good while the solution can
still reach the right answer, read from TRL's stepwise records, this project's own form and Math-Shepherd's; every bad
record named PATH:LINE: FIELD:, a step holding the step separator refused, `rlhf convert` writing our own form, and the
bundled sample's step-by-step arithmetic task with the properties it documents."""

import json
import re
from pathlib import Path

import pytest

from conftest import run_cli
from rlhf.data import DataFileError, StepSolution, load_dialogues, load_prompts, load_records, load_steps, validate
from rlhf.formats import convert
from rlhf.moss import Dialogue, Turn
from rlhf.sample import STEP_PROMPTS, STEP_SFT_SLIP_FRACTION, STEP_SLIP_FRACTION, write_sample

META = "You are MOSS.\n"
STEPS = ["2 + 3 = 5", "5 + 4 = 10", "The answer is 10."]
LABELS = [True, False, False]
SOLUTION = StepSolution(Dialogue([Turn("What is 2 + 3 + 4?")], META), STEPS, LABELS, {"id": 7})

TRL = {"prompt": [{"role": "system", "content": "You are MOSS."}, {"role": "user", "content": "What is 2 + 3 + 4?"}],
       "completions": STEPS, "labels": LABELS, "id": 7}
OURS = {"meta_instruction": META, "turns": [{"human": "What is 2 + 3 + 4?", "steps": STEPS, "step_labels": LABELS}],
        "id": 7}
SHEPHERD = {"input": "What is 2 + 3 + 4? Step 1: 2 + 3 = 5 ки\nStep 2: 5 + 4 = 10 ки\n"
                     "Step 3: The answer is 10. ки",
            "label": "What is 2 + 3 + 4? Step 1: 2 + 3 = 5 +\nStep 2: 5 + 4 = 10 -\nStep 3: The answer is 10. -",
            "task": "GSM8K"}


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def errors_of(load, *args) -> list[str]:
    with pytest.raises(DataFileError) as err:
        load(*args)
    return [str(e) for e in err.value.errors]


def test_a_label_says_whether_the_solution_can_still_reach_the_right_answer():
    assert SOLUTION.first_error == 1  # "5 + 4 = 10" is the slip; the answer after it cannot be right
    assert StepSolution(SOLUTION.prompt, STEPS, [True] * 3).first_error is None
    assert SOLUTION.reply() == "2 + 3 = 5\n5 + 4 = 10\nThe answer is 10."
    dialogue = SOLUTION.dialogue("\n\n")  # the steps joined by the separator are MOSS's reply
    assert dialogue == Dialogue([Turn("What is 2 + 3 + 4?", moss="2 + 3 = 5\n\n5 + 4 = 10\n\nThe answer is 10.")],
                                META, {"id": 7})
    assert SOLUTION.prompt.is_prompt  # the record's own prompt is left as it was


def test_trl_ours_and_math_shepherd_read_named_and_detected(tmp_path: Path, capsys: pytest.CaptureFixture):
    trl = write_lines(tmp_path / "trl.jsonl", [TRL, {"prompt": "2+3?", "completions": ["2 + 3 = 5"], "labels": [True]}])
    assert load_steps(trl, "trl") == load_steps(trl) == [
        SOLUTION, StepSolution(Dialogue([Turn("2+3?")]), ["2 + 3 = 5"], [True])]
    assert capsys.readouterr().err == f"{trl}: read as trl (detected); pass --data-format to choose\n"

    ours = write_lines(tmp_path / "ours.jsonl", [OURS])
    assert load_steps(ours, "moss") == load_steps(ours) == [SOLUTION]
    assert capsys.readouterr().err == ""  # this project's own form: nothing to say

    shepherd = write_lines(tmp_path / "shepherd.jsonl", [SHEPHERD])
    [read] = load_steps(shepherd, "math-shepherd")
    # The question is the text before "Step 1:"; each step keeps its "Step k:", as TRL's trl-lib/math_shepherd does.
    assert read == StepSolution(Dialogue([Turn("What is 2 + 3 + 4?")]),
                                ["Step 1: 2 + 3 = 5", "Step 2: 5 + 4 = 10", "Step 3: The answer is 10."], LABELS,
                                {"task": "GSM8K"})
    assert load_steps(shepherd) == [read]


def test_math_shepherd_questions_without_step_1_and_tags_inside_the_question(tmp_path: Path):
    no_step_1 = {"input": "Tom has 3 apples. How many now? He eats 1, so 3 - 1 = 2. ки The answer is 2. ки",
                 "label": "Tom has 3 apples. How many now? He eats 1, so 3 - 1 = 2. + The answer is 2. +"}
    slip = {"input": "A slip ки in the question? Step 1: 1 + 1 = 2 ки",
            "label": "A slip - in the question? Step 1: 1 + 1 = 2 +"}
    path = write_lines(tmp_path / "shepherd.jsonl", [no_step_1, slip])
    first, second = load_steps(path, "math-shepherd")
    assert first.prompt.turns[0].human == "Tom has 3 apples. How many now?"
    assert first.steps == ["He eats 1, so 3 - 1 = 2.", "The answer is 2."] and first.labels == [True, True]
    # A tag inside the question is an annotation slip of a few Math-Shepherd records: dropped with its label.
    assert second.prompt.turns[0].human == "A slip ки in the question?"
    assert second.steps == ["Step 1: 1 + 1 = 2"] and second.labels == [True]


def test_convert_writes_our_form_which_reads_back_the_same(tmp_path: Path):
    for name, record in (("trl", TRL), ("shepherd", SHEPHERD), ("ours", OURS)):
        source = write_lines(tmp_path / f"{name}.jsonl", [record] * 2)
        out = tmp_path / f"{name}.converted.jsonl"
        assert convert(source, out) == 2  # the kind is told from the records: steps
        assert load_steps(out, "moss") == load_steps(source)
        [line, _] = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
        assert "moss" not in line["turns"][-1] and line["turns"][-1]["step_labels"] == LABELS
    assert json.loads((tmp_path / "ours.converted.jsonl").read_text(encoding="utf-8").splitlines()[0]) == OURS
    assert run_cli("convert", "--from", "trl", tmp_path / "trl.jsonl", "--kind", "steps",
                   "--out", tmp_path / "cli.jsonl") == 0
    assert load_steps(tmp_path / "cli.jsonl") == [SOLUTION] * 2


def test_a_step_holding_the_separator_is_refused_naming_it(tmp_path: Path):
    """Joined into one reply, "3 +\\n4 = 7" would split into two steps for one label."""
    steps = ["2 + 3 = 5", "5 +\n4 = 9", "The answer is 9."]
    trl = write_lines(tmp_path / "trl.jsonl", [{**TRL, "completions": steps}])
    ours = write_lines(tmp_path / "ours.jsonl", [{**OURS, "turns": [{**OURS["turns"][0], "steps": steps}]}])
    shepherd = write_lines(tmp_path / "shepherd.jsonl", [{"input": "Q? Step 1: a ки\nStep 2: b\nc ки",
                                                          "label": "Q? Step 1: a +\nStep 2: b\nc +"}])
    problem = "contains the step separator '\\n', so the reply would split into other steps than the labels are for"
    assert errors_of(load_steps, trl)[0].startswith(f"{trl}:1: completions[1]: {problem}")
    assert errors_of(load_steps, ours)[0].startswith(f"{ours}:1: turns[0].steps[1]: {problem}")
    assert errors_of(load_steps, shepherd)[0].startswith(f"{shepherd}:1: input (step 2): {problem}")
    assert load_steps(trl, "trl", "\n\n")[0].reply("\n\n") == "2 + 3 = 5\n\n5 +\n4 = 9\n\nThe answer is 9."
    with pytest.raises(ValueError, match="the step separator is empty"):
        load_steps(trl, "trl", "")


PROMPT = {"turns": [{"human": "Hi", "moss": "Hello!"}, {"human": "2+3?"}]}
BAD = [  # (format, the bad record, FIELD: the start of the message)
    ("moss", {**PROMPT, "turns": [*PROMPT["turns"][:1], {"human": "2+3?"}]},
     "turns[1].steps: missing; the last turn of a stepwise record gives steps and step_labels"),
    ("moss", {"turns": [{"human": "2+3?", "steps": ["5"], "step_labels": [True], "moss": "5"}]},
     "turns[0].moss: not allowed beside steps"),
    ("moss", {"turns": [{"human": "Hi", "moss": "Hello!", "steps": ["x"]}, {"human": "2+3?", "steps": ["5"],
                                                                            "step_labels": [True]}]},
     "turns[0].steps: only the last turn has steps"),
    ("moss", {"turns": [{"human": "2+3?", "steps": ["5"]}]}, "turns[0].step_labels: missing; one label a step"),
    ("moss", {"turns": [{"human": "2+3?", "steps": "5", "step_labels": [True]}]},
     "turns[0].steps: expected a list of strings, got string"),
    ("moss", {"turns": [{"human": "2+3?", "steps": [], "step_labels": []}]}, "turns[0].steps: empty"),
    ("moss", {"turns": [{"human": "2+3?", "steps": ["5", 6], "step_labels": [True, True]}]},
     "turns[0].steps[1]: expected a string, got int"),
    ("moss", {"turns": [{"human": "2+3?", "steps": ["5", " "], "step_labels": [True, True]}]},
     "turns[0].steps[1]: empty; every step needs text"),
    ("moss", {"turns": [{"human": "2+3?", "steps": ["5", "6"], "step_labels": [True]}]},
     "turns[0].step_labels: has 1 labels but there are 2 steps"),
    ("moss", {"turns": [{"human": "2+3?", "steps": ["5"], "step_labels": [1]}]},
     "turns[0].step_labels[0]: expected true or false, got int"),
    ("moss", {"turns": [{"human": 5, "steps": ["5"], "step_labels": [True]}]},
     "turns[0].human: expected a string, got int"),
    ("moss", {"turns": [{"human": "2+3?", "mood": "ok", "steps": ["5"], "step_labels": [True]}]},
     "turns[0].mood: unknown key"),
    ("moss", {"num_turns": 1, "chat": {"turn_1": {"Human": "<|Human|>: 2+3?<eoh>\n"}}},
     "chat: a raw MOSS-003 record has no steps"),
    ("trl", {"completions": ["5"], "labels": [True]}, "prompt: missing"),
    ("trl", {"prompt": "2+3?", "labels": [True]}, "completions: missing"),
    ("trl", {"prompt": "2+3?", "completions": ["5"]}, "labels: missing"),
    ("trl", {"prompt": "2+3?", "completions": [{"content": "5"}], "labels": [True]},
     "completions[0]: expected a string, got object"),
    ("trl", {"prompt": "2+3?", "completions": ["5"], "labels": "true"}, "labels: expected a list of true/false"),
    ("trl", {"prompt": [{"role": "assistant", "content": "5"}], "completions": ["5"], "labels": [True]},
     "prompt[0]: an assistant message before any user message"),
    ("math-shepherd", {"label": "Q? Step 1: a +"}, "input: missing"),
    ("math-shepherd", {"input": "Q? Step 1: a", "label": "Q? Step 1: a"}, "input: no step tag ки"),
    ("math-shepherd", {"input": "Q? Step 1: a ки", "label": "Q? Step 1: a +\n"},
     "label: 15 characters, but input with each of its 1 step tags as one + or - would be 14"),
    ("math-shepherd", {"input": "Q? Step 1: a ки", "label": "Q? Step 1: a 1"},
     "label: expected + or - at character 14, where input has step 1's tag ки, got '1'"),
    ("math-shepherd", {"input": "No question mark here: a ки", "label": "No question mark here: a +"},
     "input: cannot tell the question from the first step"),
    ("math-shepherd", {"input": "Q? Step 1: a ки ки", "label": "Q? Step 1: a + +"},
     "input (step 2): empty; every step needs text before its tag ки"),
]


@pytest.mark.parametrize("data_format, record, expected", BAD, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_each_bad_record_is_named_by_file_line_and_field_and_refuses_the_file(tmp_path: Path, data_format: str,
                                                                             record, expected: str):
    good = {"moss": OURS, "trl": TRL, "math-shepherd": SHEPHERD}[data_format]
    path = write_lines(tmp_path / "bad.jsonl", [good, record, good])
    [error] = errors_of(load_steps, path, data_format)  # the good records around it give none
    assert error.startswith(f"{path}:2: {expected}")


def test_steps_read_as_prompts_but_not_as_sft_or_preferences(tmp_path: Path):
    path = write_lines(tmp_path / "ours.jsonl", [OURS])
    assert load_prompts(path) == [Dialogue([Turn("What is 2 + 3 + 4?")], META, {"id": 7})]
    [error] = errors_of(load_dialogues, path)
    assert error == (f"{path}:1: turns[0].steps: a solution in labelled steps, not an SFT dialogue (its bad steps "
                     "would be trained on); read it as steps, or as prompts")
    [error] = errors_of(load_records, path, "preferences")
    assert error.startswith(f"{path}:1: turns[0].steps: a solution in labelled steps, not a ranked list")
    sft = write_lines(tmp_path / "sft.jsonl", [{"turns": [{"human": "2+3?", "moss": "5"}]}])
    assert errors_of(load_steps, sft) == [f"{sft}:1: turns[0].steps: missing; the last turn of a stepwise record "
                                          "gives steps and step_labels"]
    hh = write_lines(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: 2+3?\n\nAssistant: 5",
                                              "rejected": "\n\nHuman: 2+3?\n\nAssistant: 6"}])
    assert errors_of(load_steps, hh, "hh-rlhf")[0].startswith(f"{hh}:1: rejected: no steps; stepwise supervision")


def test_validate_summarises_steps_and_suggests_the_kind(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = write_lines(tmp_path / "ours.jsonl", [OURS, {**OURS, "turns": [{**OURS["turns"][0],
                                                                          "step_labels": [True] * 3}]}])
    assert validate(path, "steps") == 0
    assert capsys.readouterr().out == f"{path}: 2 solutions, 6 steps, 2 labelled bad, 1 with a bad step, OK\n"
    assert validate(path, "sft") == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"{path}: every record reads as steps (2 solutions, 6 steps, 2 labelled bad, 1 with a bad step); did you mean "
        "--kind steps?")
    assert run_cli("validate", path, "--kind", "steps") == 0


def test_render_shows_the_steps_as_the_reply_the_model_writes(tmp_path: Path):
    path = write_lines(tmp_path / "ours.jsonl", [OURS])
    assert run_cli("render", path, "--kind", "steps", "--out", tmp_path / "r.jsonl") == 0
    [line] = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()]
    assert line["text"] == f"{META}<|Human|>: What is 2 + 3 + 4?<eoh>\n<|MOSS|>: {SOLUTION.reply()}<eom>\n"
    assert [line["text"][a:b] for a, b in line["trained"]] == [f" {SOLUTION.reply()}<eom>"]
    assert line["labels"] == LABELS and line["id"] == 7


# --- the bundled sample's step-by-step task ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict[str, str]:
    return write_sample(str(tmp_path_factory.mktemp("sample")), seed=0)


def _arithmetic(step: str) -> tuple[int, str, int, int]:
    a, op, b, result = re.fullmatch(r"(\d+) ([-+]) (\d+) = (\d+)", step).groups()
    return int(a), op, int(b), int(result)


def _value(expression: str) -> int:
    first, *rest = expression.split()
    return int(first) + sum(int(x) if op == "+" else -int(x) for op, x in zip(rest[::2], rest[1::2]))


def _first_wrong(steps: list[str], answer: str) -> int | None:
    """The index of the first wrong arithmetic step, read from the text alone; every step computes on from the one
    before (a slipped one too), and the last gives the total as the answer."""
    total, first_wrong = None, None
    for i, step in enumerate(steps[:-1]):
        a, op, b, result = _arithmetic(step)
        assert total is None or a == total
        if result != (a + b if op == "+" else a - b) and first_wrong is None:
            first_wrong = i
        total = result
    assert steps[-1] == f"The answer is {total}."
    assert (str(total) == answer) == (first_wrong is None)
    return first_wrong


def test_the_sample_writes_step_files_that_validate(sample: dict[str, str]):
    assert {"steps_train", "steps_eval", "steps_sft", "steps_prompts", "steps_prompts_eval"} <= set(sample)
    train, held_out = load_steps(sample["steps_train"], "moss"), load_steps(sample["steps_eval"], "moss")
    assert len(train) == 1500 and len(held_out) == 200
    for solutions, fraction in ((train, STEP_SLIP_FRACTION), (held_out, STEP_SLIP_FRACTION)):
        slipped = [s for s in solutions if s.first_error is not None]
        assert len(slipped) == round(fraction * len(solutions)) and 0.3 <= fraction <= 0.4
        for solution in solutions:
            # True up to the slip, False from it on; the slip is the first wrong arithmetic step.
            good = len(solution.steps) if solution.first_error is None else solution.first_error
            assert solution.labels == [True] * good + [False] * (len(solution.steps) - good)
            assert _first_wrong(solution.steps, solution.metadata["answer"]) == solution.first_error
        assert {s.first_error for s in slipped} == {0, 1, 2}  # slips at each arithmetic step, in 3 or 4 steps
        assert {len(s.steps) for s in solutions} == {3, 4}


def test_the_sample_sft_and_prompt_files_for_the_step_task(sample: dict[str, str]):
    sft = load_dialogues(sample["steps_sft"], "moss")
    slipped = [d for d in sft if d.metadata["slipped"]]
    assert len(slipped) == round(STEP_SFT_SLIP_FRACTION * len(sft)) and len(sft) == 1000
    for dialogue in sft:  # the reply is a solution's steps, one a line
        steps = dialogue.turns[-1].moss.split("\n")
        assert (_first_wrong(steps, dialogue.metadata["answer"]) is not None) == dialogue.metadata["slipped"]
    for name, count in (("steps_prompts", STEP_PROMPTS), ("steps_prompts_eval", 200)):
        prompts = load_prompts(sample[name], "moss")
        assert len(prompts) == len({p.metadata["expression"] for p in prompts}) == count  # each sum once
        for prompt in prompts:
            expression = prompt.metadata["expression"]
            assert expression in prompt.turns[-1].human
            assert _value(expression) == int(prompt.metadata["answer"]) >= 0


def test_held_out_step_prompts_are_disjoint_from_training(sample: dict[str, str]):
    def expressions(name: str, load) -> set[str]:
        return {record.metadata["expression"] for record in load(sample[name], "moss")}

    trained = expressions("steps_train", load_steps) | expressions("steps_sft", load_dialogues) | \
        expressions("steps_prompts", load_prompts)
    held_out = expressions("steps_eval", load_steps) | expressions("steps_prompts_eval", load_prompts)
    assert len(held_out) == 200 and not trained & held_out

