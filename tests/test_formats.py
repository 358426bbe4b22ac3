"""Readers for the files users already have: each format, in its documented shape, reads into this project's records,
from JSONL, JSON, Parquet and saved datasets; `convert` writes files the default reader loads to the same records; a
bad record is named PATH:RECORD: FIELD:, and a file with one is never half-used."""

import json
from pathlib import Path

import pytest

from rlhf.data import (DataFileError, Preference, StepSolution, load_dialogues, load_preferences, load_prompts,
                       load_records, validate)
from rlhf.formats import FORMATS, convert
from rlhf.moss import Dialogue, Turn
from rlhf.tools import default_registry, parse_command

SYSTEM = {"role": "system", "content": "You are MOSS."}
HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
ASK = {"role": "user", "content": "2+3?"}


def say(text: str) -> dict:
    return {"role": "assistant", "content": text}


def history(*turns) -> Dialogue:
    """Hi/Hello! then the given turns."""
    return Dialogue([Turn("Hi", moss="Hello!"), *turns])


# (format, kind, records in the format's documented shape, the records they read as)
CASES = {
    "moss-rlhf prompts": ("moss-rlhf", "prompts", [["2+3?"], ["Hi", "Hello!", "2+3?"], ["Sure, 5.", "And 2+4?"]],
                          # an even count is a cut history, as MOSS-RLHF reads it: the last utterance is the human's
                          [Dialogue([Turn("2+3?")]), history(Turn("2+3?")),
                           Dialogue([Turn("", moss="Sure, 5."), Turn("And 2+4?")])]),
    "moss-rlhf sft": ("moss-rlhf", "sft", [["Hi", "Hello!", "2+3?", "5"]], [history(Turn("2+3?", moss="5"))]),
    "moss-rlhf reward": ("moss-rlhf", "preferences",
                         [{"chosen": ["Hi", "Hello!", "2+3?", "5"], "rejected": ["Hi", "Hello!", "2+3?", "6"]}],
                         [Preference(history(Turn("2+3?")), ["5", "6"])]),
    "trl strings": ("trl", "preferences", [{"prompt": "2+3?", "chosen": "5", "rejected": "6", "margin": 2}],
                    [Preference(Dialogue([Turn("2+3?")]), ["5", "6"], margin=2.0)]),
    "trl messages": ("trl", "preferences",
                     [{"prompt": [SYSTEM, *HI, ASK], "chosen": [say("5")], "rejected": [say("6")], "id": 7}],
                     [Preference(Dialogue(history(Turn("2+3?")).turns, "You are MOSS.\n"), ["5", "6"],
                                 metadata={"id": 7})]),
    "trl implicit prompt": ("trl", "preferences", [{"chosen": [*HI, ASK, say("5")], "rejected": [*HI, ASK, say("6")]}],
                            [Preference(history(Turn("2+3?")), ["5", "6"])]),
    "trl prompt-only": ("trl", "prompts", [{"prompt": [ASK]}], [Dialogue([Turn("2+3?")])]),
    "trl prompt-completion": ("trl", "sft", [{"prompt": "2+3?", "completion": "5"}],
                              [Dialogue([Turn("2+3?", moss="5")])]),
    "trl stepwise": ("trl", "steps", [{"prompt": "2+3+4?", "completions": ["2 + 3 = 5", "5 + 4 = 10"],
                                       "labels": [True, False], "id": 3}],
                     [StepSolution(Dialogue([Turn("2+3+4?")]), ["2 + 3 = 5", "5 + 4 = 10"], [True, False], {"id": 3})]),
    "hh-rlhf": ("hh-rlhf", "preferences",
                [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+3?\n\nAssistant: 5",
                  "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+3?\n\nAssistant: 6"}],
                [Preference(history(Turn("2+3?")), ["5", "6"])]),
    "ultrafeedback": ("ultrafeedback", "preferences",
                      [{"source": "evol_instruct", "instruction": "2+3?", "models": ["a", "b", "c"],
                        "completions": [{"model": "a", "response": "6", "overall_score": 3.0},
                                        {"model": "b", "response": "5", "overall_score": 9.0},
                                        {"model": "c", "response": "five", "overall_score": 9.0}]}],
                      [Preference(Dialogue([Turn("2+3?")]), ["5", "five", "6"], [0, 0, 1], metadata={
                          "source": "evol_instruct", "models": ["a", "b", "c"],
                          "response_metadata": [{"model": "b"}, {"model": "c"}, {"model": "a"}]})]),
    "ultrafeedback binarized": ("ultrafeedback", "preferences",
                                [{"prompt": "2+3?", "chosen": [ASK, say("5")], "rejected": [ASK, say("6")],
                                  "score_chosen": 8.0, "score_rejected": 5.0}],
                                [Preference(Dialogue([Turn("2+3?")]), ["5", "6"],
                                            metadata={"score_chosen": 8.0, "score_rejected": 5.0})]),
    "nectar": ("nectar", "preferences",
               [{"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+3?\n\nAssistant:", "turns": 2,
                 "answers": [{"answer": " 6", "model": "m2", "rank": 2.0}, {"answer": " 5", "model": "m1", "rank": 1.0},
                             {"answer": "four", "model": "m3", "rank": 2.0}]}],
               [Preference(history(Turn("2+3?")), ["5", "6", "four"], [0, 1, 1], metadata={
                   "source_turns": 2, "response_metadata": [{"model": "m1"}, {"model": "m2"}, {"model": "m3"}]})]),
    "openai with a tool call": (
        "openai", "sft",
        [{"messages": [SYSTEM, ASK,
                       {"role": "assistant", "content": "I should calculate it.", "tool_calls": [
                           {"id": "c1", "type": "function",
                            "function": {"name": "Calculate", "arguments": json.dumps({"expression": "2+3"})}}]},
                       {"role": "tool", "tool_call_id": "c1", "content": "5"},
                       say("2+3 is 5.")],
          "tools": [{"type": "function", "function": {"name": "Calculate"}}]}],
        [Dialogue([Turn("2+3?", inner_thoughts="I should calculate it.", commands='Calculate("2+3")',
                        results='Calculate("2+3") => 5', moss="2+3 is 5.")], "You are MOSS.\n",
                  {"tools": [{"type": "function", "function": {"name": "Calculate"}}]})]),
    "math-shepherd": ("math-shepherd", "steps",
                      [{"input": "2+3+4? Step 1: 2 + 3 = 5 ки\nStep 2: 5 + 4 = 10 ки",
                        "label": "2+3+4? Step 1: 2 + 3 = 5 +\nStep 2: 5 + 4 = 10 -", "task": "GSM8K"}],
                      [StepSolution(Dialogue([Turn("2+3+4?")]), ["Step 1: 2 + 3 = 5", "Step 2: 5 + 4 = 10"],
                                    [True, False], {"task": "GSM8K"})]),
}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def errors_of(load, *args) -> list[str]:
    with pytest.raises(DataFileError) as err:
        load(*args)
    return [str(e) for e in err.value.errors]


@pytest.mark.parametrize("case", list(CASES))
def test_each_format_reads_into_our_records_named_or_detected(case: str, tmp_path: Path, capsys):
    data_format, kind, records, expected = CASES[case]
    # MOSS-RLHF's files are JSON arrays; the hub's are JSON Lines.
    path = write_json(tmp_path / "data.json", records) if data_format == "moss-rlhf" \
        else write_jsonl(tmp_path / "data.jsonl", records)
    assert load_records(path, kind, data_format) == expected
    assert capsys.readouterr().err == ""
    assert load_records(path, kind) == expected
    assert capsys.readouterr().err == f"{path}: read as {data_format} (detected); pass --data-format to choose\n"


def test_every_format_a_user_can_name_reads_and_converts_a_file_of_its_own(tmp_path: Path):
    """FORMATS is what `--data-format` and `rlhf convert --from` offer: each name reads a small file in its shape and
    converts it to this project's JSONL with the same records, and `auto` tells each of them apart."""
    ours = ("moss", "sft", [{"meta_instruction": "m\n", "turns": [{"human": "2+3?", "moss": "5"}]}],
            [Dialogue([Turn("2+3?", moss="5")], "m\n")])
    files = {}  # format -> [(kind, path, the records it reads as)]
    for i, (data_format, kind, records, expected) in enumerate([*CASES.values(), ours]):
        files.setdefault(data_format, []).append((kind, write_jsonl(tmp_path / f"{i}.jsonl", records), expected))
    assert sorted(files) == sorted(f for f in FORMATS if f != "auto")  # no name offered without a file shown to read
    for data_format in FORMATS:
        every_file = [f for fs in files.values() for f in fs]
        for kind, path, expected in every_file if data_format == "auto" else files[data_format]:
            assert load_records(path, kind, data_format) == expected, (data_format, path)
            out = path.with_suffix(".converted.jsonl")
            assert convert(path, out, data_format, kind) == len(expected)
            assert load_records(out, kind, "moss") == expected, (data_format, path)


def test_tool_calls_become_commands_and_results_as_this_project_runs_them():
    [dialogue] = CASES["openai with a tool call"][3]
    [turn] = dialogue.turns
    assert parse_command(turn.commands) == ("Calculate", "2+3")
    assert default_registry().run_commands(turn.commands) == turn.results


def test_several_tool_calls_and_arguments(tmp_path: Path):
    def call(i: int, name: str, arguments) -> dict:
        return {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": arguments}}

    messages = [ASK, {"role": "assistant", "content": None, "tool_calls": [
        call(1, "Search", json.dumps({"query": "MOSS"})), call(2, "Calculate", "2+3"),
        call(3, "get_weather", json.dumps({"city": "Paris", "unit": "C"}))]},
        {"role": "tool", "tool_call_id": "c3", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c1", "content": "a chat model"},
        {"role": "tool", "tool_call_id": "c2", "content": ""},
        say("5")]
    [dialogue] = load_dialogues(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), "openai")
    turn = dialogue.turns[0]
    assert turn.inner_thoughts is None and dialogue.meta_instruction == ""
    assert turn.commands.splitlines() == ['Search("MOSS")', 'Calculate("2+3")',
                                          'get_weather({"city": "Paris", "unit": "C"})']
    assert turn.results.splitlines() == ['get_weather({"city": "Paris", "unit": "C"}) => sunny',
                                         'Search("MOSS") => a chat model', "No result."]


def test_preference_files_read_as_prompts_or_sft(tmp_path: Path):
    path = write_jsonl(tmp_path / "hh.jsonl", CASES["hh-rlhf"][2])
    assert load_prompts(path, "hh-rlhf") == [history(Turn("2+3?"))]
    assert load_dialogues(path, "hh-rlhf") == [history(Turn("2+3?", moss="5"))]


# --- sources ----------------------------------------------------------------------------------------------------


def test_json_array_one_json_record_and_json_lines_named_json(tmp_path: Path):
    _, _, records, expected = CASES["nectar"]
    assert load_preferences(write_json(tmp_path / "array.json", records * 2), "nectar") == expected * 2
    assert load_preferences(write_json(tmp_path / "one.json", records[0]), "nectar") == expected
    assert load_preferences(write_jsonl(tmp_path / "lines.json", records * 2), "nectar") == expected * 2


def test_parquet_and_saved_datasets(tmp_path: Path):
    import datasets

    _, _, nectar, nectar_expected = CASES["nectar"]
    _, _, chats, chats_expected = CASES["openai with a tool call"]
    chats = [*chats, {"messages": [ASK, say("5")], "tools": []}]  # nulls where the first chat has tool calls
    chats_expected = [*chats_expected, Dialogue([Turn("2+3?", moss="5")], metadata={"tools": []})]
    datasets.Dataset.from_list(nectar).to_parquet(tmp_path / "nectar.parquet")
    assert load_preferences(tmp_path / "nectar.parquet") == nectar_expected
    datasets.Dataset.from_list(chats).save_to_disk(tmp_path / "chats")
    assert load_dialogues(tmp_path / "chats", "openai") == chats_expected
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chats)}).save_to_disk(tmp_path / "one_split")
    assert load_dialogues(tmp_path / "one_split", "openai") == chats_expected
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chats),
                          "test": datasets.Dataset.from_list(chats)}).save_to_disk(tmp_path / "two_splits")
    assert errors_of(load_dialogues, tmp_path / "two_splits", "openai") == [
        f"{tmp_path / 'two_splits'}:0: file: holds the splits train, test; pass one split's directory, e.g. "
        f"{tmp_path / 'two_splits' / 'train'}"]
    assert load_dialogues(tmp_path / "two_splits" / "test", "openai") == chats_expected


def test_our_schema_and_raw_moss_003_from_json_and_parquet(tmp_path: Path, capsys):
    import datasets

    ours = [{"meta_instruction": "m\n", "turns": [{"human": "Hi", "moss": "Hello!"}], "source": "web"},
            {"turns": [{"human": "2+3?", "inner_thoughts": "Calculate it.", "moss": "5"}]}]
    raw = [{"num_turns": 2, "meta_instruction": "m\n",
            "chat": {"turn_1": {"Human": "<|Human|>: Hi<eoh>\n", "MOSS": "<|MOSS|>: Hello!<eom>\n"},
                     "turn_2": {"Human": "<|Human|>: 2+3?<eoh>\n", "MOSS": "<|MOSS|>: 5<eom>\n"}}},
           {"num_turns": 1, "meta_instruction": "m\n",  # shorter: Parquet gives it a null turn_2
            "chat": {"turn_1": {"Human": "<|Human|>: Hi<eoh>\n", "MOSS": "<|MOSS|>: Hello!<eom>\n"}}}]
    ours_read = [Dialogue([Turn("Hi", moss="Hello!")], "m\n", {"source": "web"}),
                 Dialogue([Turn("2+3?", inner_thoughts="Calculate it.", moss="5")])]
    raw_read = [Dialogue([Turn("Hi", moss="Hello!"), Turn("2+3?", moss="5")], "m\n"),
                Dialogue([Turn("Hi", moss="Hello!")], "m\n")]
    assert load_dialogues(write_json(tmp_path / "ours.json", ours)) == ours_read
    assert load_dialogues(write_json(tmp_path / "raw.json", raw[0])) == raw_read[:1]
    for name, records, expected in (("ours", ours, ours_read), ("raw", raw, raw_read)):
        datasets.Dataset.from_list(records).to_parquet(tmp_path / f"{name}.parquet")
        assert load_dialogues(tmp_path / f"{name}.parquet", "moss") == expected
    capsys.readouterr()
    assert load_dialogues(tmp_path / "raw.parquet") == raw_read
    assert capsys.readouterr().err == ""


def test_this_projects_jsonl_reads_as_before_without_a_word(tmp_path: Path, capsys):
    prompt = {"meta_instruction": "m\n", "turns": [{"human": "Hi", "moss": "Hello!"}, {"human": "2+3?"}]}
    path = write_jsonl(tmp_path / "p.jsonl", [{**prompt, "chosen": "5", "rejected": "6"}])
    assert load_preferences(path) == load_preferences(path, "moss") == [
        Preference(Dialogue(history(Turn("2+3?")).turns, "m\n"), ["5", "6"])]
    assert capsys.readouterr().err == ""


# --- convert --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_convert_writes_what_the_default_reader_loads(case: str, tmp_path: Path, capsys):
    data_format, kind, records, expected = CASES[case]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    assert convert(source, out, data_format) == len(expected)  # the kind is told from the records
    assert load_records(out, kind) == expected
    assert capsys.readouterr().err == ""  # our own format: nothing to say
    assert convert(source, out, "auto", kind) == len(expected)
    assert load_records(out, kind, "moss") == expected


def test_convert_prompts_from_preferences(tmp_path: Path):
    source = write_jsonl(tmp_path / "hh.jsonl", CASES["hh-rlhf"][2])
    assert convert(source, tmp_path / "prompts.jsonl", "hh-rlhf", "prompts") == 1
    assert load_prompts(tmp_path / "prompts.jsonl") == [history(Turn("2+3?"))]


# --- errors ---------------------------------------------------------------------------------------------------

GOOD = {case: records[0] for case, (_, _, records, _) in CASES.items()}

# (case whose good record goes around the bad one, the bad record, FIELD: the start of the message)
BAD = {
    "moss-rlhf prompts": ["Hi", 5], "moss-rlhf reward": {
        "chosen": ["Hi", "Hello!", "2+3?", "5"], "rejected": ["Hi", "Hey!", "2+3?", "6"]},
    "trl strings": {"prompt": "2+3?", "chosen": "5", "rejected": 6},
    "trl messages": {"prompt": [ASK], "chosen": [say("5")], "rejected": [{"role": "user", "content": "6"}]},
    "hh-rlhf": {"chosen": "\n\nHuman: 2+3?\n\nAssistant: 5", "rejected": "\n\nHuman: 2+4?\n\nAssistant: 6"},
    "ultrafeedback": {"instruction": "2+3?", "completions": [{"response": "5", "overall_score": 9.0},
                                                             {"response": "6", "overall_score": "low"}]},
    "nectar": {"prompt": "\n\nHuman: 2+3?\n\nAssistant:", "answers": [{"answer": "5", "rank": 1}, {"answer": "6"}]},
    "openai with a tool call": {"messages": [ASK, {"role": "tool", "content": "5"}, say("5")]},
    "trl stepwise": {"prompt": "2+3?", "completions": ["2 + 3 = 5"], "labels": ["+"]},
    "math-shepherd": {"input": "2+3? Step 1: 2 + 3 = 5 ки", "label": "2+3? Step 1: 2 + 3 = 5 ?"},
}
EXPECTED = {
    "moss-rlhf prompts": "record[1]: expected a string, got int",
    "moss-rlhf reward": "rejected[1]: differs from chosen; only the last utterance",
    "trl strings": "rejected: expected a string or a list of messages, got int",
    "trl messages": "rejected[0]: expected the assistant's reply",
    "hh-rlhf": "rejected: differs from chosen before the last Assistant reply",
    "ultrafeedback": "completions[1].overall_score: expected a number, got string",
    "nectar": "answers[1].rank: missing",
    "openai with a tool call": "messages[1]: a tool result with no tool call before it",
    "trl stepwise": "labels[0]: expected true or false, got string",
    "math-shepherd": "label: expected + or - at character 24, where input has step 1's tag ки, got '?'",
}


@pytest.mark.parametrize("case", list(BAD))
def test_one_bad_record_in_each_format_is_named_by_file_record_and_field(case: str, tmp_path: Path):
    data_format, kind, _, _ = CASES[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[case], BAD[case], GOOD[case]])
    [error] = errors_of(load_records, path, kind, data_format)  # the good records around it give none
    assert error.startswith(f"{path}:2: {EXPECTED[case]}")


def test_array_elements_and_rows_are_named_as_such(tmp_path: Path):
    import datasets

    case = "ultrafeedback"
    array = write_json(tmp_path / "uf.json", [GOOD[case], BAD[case]])
    assert errors_of(load_preferences, array) == [f"{array}:2: {EXPECTED[case]} (element 2 of the JSON array)"]
    unscored = {"instruction": "2+3?", "completions": [{"response": "5", "overall_score": 9.0}, {"response": "6"}]}
    datasets.Dataset.from_list([GOOD[case], unscored]).to_parquet(tmp_path / "uf.parquet")
    assert errors_of(load_preferences, tmp_path / "uf.parquet") == [
        f"{tmp_path / 'uf.parquet'}:2: completions[1].overall_score: missing (row 2)"]


def test_ties_and_bad_files(tmp_path: Path):
    tied = {"prompt": "\n\nHuman: 2+3?\n\nAssistant:",
            "answers": [{"answer": "5", "rank": 1}, {"answer": "6", "rank": 1}]}
    path = write_jsonl(tmp_path / "tied.jsonl", [tied])
    assert errors_of(load_preferences, path, "nectar") == [
        f"{path}:1: answers: all responses are tied, so the record gives no pair"]
    unknown = write_jsonl(tmp_path / "text.jsonl", [{"text": "Hello"}])
    assert errors_of(load_dialogues, unknown) == [
        f"{unknown}:0: file: cannot tell the data format from its first records; pass --data-format with one of "
        "moss, moss-rlhf, trl, hh-rlhf, ultrafeedback, nectar, openai, math-shepherd"]
    chats = write_jsonl(tmp_path / "chats.jsonl", CASES["openai with a tool call"][2])
    [error] = errors_of(load_preferences, chats, "openai")
    assert error.startswith(f"{chats}:0: file: openai records are single conversations with nothing to rank")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "2+3?",', encoding="utf-8")
    [error] = errors_of(load_preferences, broken, "trl")
    assert error.startswith(f"{broken}:0: file: invalid JSON: Expecting property name")
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("not parquet")
    [error] = errors_of(load_preferences, not_parquet)
    assert error.startswith(f"{not_parquet}:0: file: cannot read as Parquet: ")
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        load_preferences(path, "csv")


def test_records_that_rank_nothing_are_skipped_with_a_count_but_a_malformed_one_refuses_the_file(tmp_path: Path,
                                                                                                capsys):
    """Hub files (HH-RLHF, UltraFeedback) hold a few pairs whose two replies are the same, or lists all tied."""
    good = {"chosen": "\n\nHuman: 2+3?\n\nAssistant: 5", "rejected": "\n\nHuman: 2+3?\n\nAssistant: 6"}
    same = {"chosen": "\n\nHuman: 2+3?\n\nAssistant: 5", "rejected": "\n\nHuman: 2+3?\n\nAssistant: 5"}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, same, good, good, same])
    assert len(load_preferences(path, "hh-rlhf")) == 3
    assert capsys.readouterr().err == (f"{path}: skipped 2 of 5 records that rank nothing (all responses tied, or the "
                                       "same reply twice): lines 2, 5\n")
    as_array = write_json(tmp_path / "uf.json", [
        {"instruction": "2+3?", "completions": [{"response": "5", "overall_score": 9}, {"response": "6",
                                                                                         "overall_score": 9}]},
        {"instruction": "2+3?", "completions": [{"response": "5", "overall_score": 9}, {"response": "6",
                                                                                         "overall_score": 2}]}])
    assert len(load_preferences(as_array, "ultrafeedback")) == 1
    assert capsys.readouterr().err.endswith("skipped 1 of 2 records that rank nothing (all responses tied, or the same "
                                            "reply twice): elements 1\n")
    malformed = write_jsonl(tmp_path / "bad.jsonl", [good, same, {"chosen": 5, "rejected": "x"}])
    assert errors_of(load_preferences, malformed, "hh-rlhf") == [
        f"{malformed}:2: rejected: every response is the same reply, so the record ranks nothing",
        f"{malformed}:3: chosen: expected a string, got int"]


def test_validate_takes_the_format(tmp_path: Path, capsys):
    path = write_json(tmp_path / "reward.json", CASES["moss-rlhf reward"][2] * 3)
    assert validate(path, "preferences", "moss-rlhf") == 0
    assert capsys.readouterr().out == f"{path}: 3 preference records, 3 pairs, K=2, OK\n"
