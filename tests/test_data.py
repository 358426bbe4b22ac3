"""JSONL loaders: good files load, every bad line is named as PATH:LINE: FIELD:, bad files load nothing."""

import json
from pathlib import Path

import pytest

from rlhf import records
from rlhf.data import (DataFileError, Preference, load_dialogues, load_preferences, load_prompts, load_records,
                       validate, write_jsonl)
from rlhf.moss import Dialogue, Turn

PROMPT = {"meta_instruction": "You are MOSS.\n", "turns": [{"human": "Hi", "moss": "Hello!"}, {"human": "2+3?"}]}
SFT = {"turns": [{"human": "Hi", "moss": "Hello!"}]}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n"
                            for x in lines), encoding="utf-8")
    return path


def errors_of(load, path: Path) -> list[str]:
    with pytest.raises(DataFileError) as err:
        load(path)
    return [str(e) for e in err.value.errors]


def test_good_files_load(tmp_path: Path):
    sft = write_lines(tmp_path / "sft.jsonl", [SFT, "", "   ", {**SFT, "source": "web"}])
    dialogues = load_dialogues(sft)
    assert [d.metadata for d in dialogues] == [{}, {"source": "web"}]

    prompts = load_prompts(write_lines(tmp_path / "p.jsonl", [PROMPT]))
    assert prompts[0].is_prompt and prompts[0].turns[0] == Turn("Hi", moss="Hello!")

    prefs = load_preferences(write_lines(tmp_path / "pref.jsonl", [
        {**PROMPT, "responses": ["5", "4", "six"], "id": 1},
        {**PROMPT, "chosen": "5", "rejected": "4", "margin": 2},
    ]))
    assert prefs[0].responses == ["5", "4", "six"] and prefs[0].ranks == [0, 1, 2]
    assert prefs[0].metadata == {"id": 1} and prefs[0].prompt.turns[-1] == Turn("2+3?")
    assert prefs[1].responses == ["5", "4"] and prefs[1].margin == 2.0
    assert load_records(tmp_path / "pref.jsonl", "preferences") == prefs


def test_raw_moss_003_file_loads_as_sft(tmp_path: Path):
    raw = {"num_turns": 1, "meta_instruction": "m\n",
           "chat": {"turn_1": {"Human": "<|Human|>: 你好<eoh>\n", "MOSS": "<|MOSS|>: 你好！<eom>\n"}}}
    [d] = load_dialogues(write_lines(tmp_path / "raw.jsonl", [raw]))
    assert d.turns == [Turn("你好", moss="你好！")]


def test_pairs():
    prompt = Dialogue([Turn("q")])
    assert len(Preference(prompt, ["a", "b", "c", "d"]).pairs()) == 6
    assert Preference(prompt, ["a", "b", "c", "d"], [0, 1, 1, 2]).pairs() == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert Preference(prompt, ["chosen", "rejected"]).pairs() == [(0, 1)]


BAD_RECORDS = [
    ("sft", "[1, 2]", "record: expected a JSON object, got list"),
    ("sft", '{"turns": [{"human": "h", "moss"', "line: invalid JSON"),
    ("sft", {"turns": []}, "turns: empty"),
    ("sft", {"turns": [{"moss": "r"}]}, "turns[0].human: missing"),
    ("sft", {"turns": [{"human": 3, "moss": "r"}]}, "turns[0].human: expected a string, got int"),
    ("sft", {"turns": [{"human": "h"}]}, "turns[0].moss: missing"),
    ("sft", {"turns": "hi"}, "turns: expected a list"),
    ("prompts", SFT, "turns[0].moss: the last turn of a prompt must not have a reply"),
    ("preferences", {**SFT, "responses": ["a", "b"]}, "turns[0].moss: the last turn of a prompt"),
    ("preferences", {**PROMPT, "responses": ["a"]}, "responses: needs at least two responses"),
    ("preferences", {**PROMPT, "responses": ["a", 2]}, "responses[1]: expected a string, got int"),
    ("preferences", {**PROMPT, "responses": ["a", "b"], "ranks": [0]}, "ranks: has 1 entries but there are 2"),
    ("preferences", {**PROMPT, "responses": ["a", "b"], "ranks": [0, 1.5]}, "ranks[1]: expected an int, got float"),
    ("preferences", {**PROMPT, "responses": ["a", "b"], "ranks": [1, 0]}, "ranks: ranks[1]=0 is better"),
    ("preferences", {**PROMPT, "responses": ["a", "b"], "ranks": [0, 0]}, "ranks: all responses are tied"),
    ("preferences", {**PROMPT, "responses": ["a", "b"], "chosen": "a", "rejected": "b"}, "responses: give either"),
    ("preferences", {**PROMPT, "chosen": "a"}, "rejected: missing"),
    ("preferences", {**PROMPT, "chosen": "a", "rejected": "b", "margin": "big"}, "margin: expected a number"),
    ("preferences", PROMPT, "responses: missing"),
]


@pytest.mark.parametrize("kind, record, expected", BAD_RECORDS)
def test_each_error_names_path_line_and_field(tmp_path: Path, kind: str, record, expected: str):
    path = write_lines(tmp_path / "bad.jsonl", [record])
    [error] = errors_of(lambda p: load_records(p, kind), path)
    assert error.startswith(f"{path}:1: {expected}")


def test_truncated_line_says_so(tmp_path: Path):
    path = write_lines(tmp_path / "cut.jsonl", [SFT, json.dumps(SFT)[:15]])
    [error] = errors_of(load_dialogues, path)
    assert error.startswith(f"{path}:2: line: invalid JSON") and "truncated" in error


def test_a_line_cut_at_its_end_is_named_at_its_end(tmp_path: Path):
    cut = json.dumps(SFT)[:-2]  # `{"turns": [{"human": "Hi", "moss": "Hello!"}` with its `]}` lost
    path = write_lines(tmp_path / "cut.jsonl", [SFT, cut])
    assert errors_of(load_dialogues, path) == [
        f"{path}:2: line: invalid JSON: Expecting ',' delimiter at column {len(cut) + 1}; the line looks truncated"]


def test_a_file_of_another_kind_is_one_summary_not_a_flood(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = write_lines(tmp_path / "sft.jsonl", [SFT] * 30)
    assert validate(path, "preferences") == 1
    err = capsys.readouterr().err.splitlines()
    problem = "turns[0].moss: the last turn of a prompt must not have a reply; remove it, the model writes it"
    assert err == [f"{path}:{n}: {problem}" for n in range(1, 11)] + [
        f"{path}: 20 more lines with {problem} (lines 11, 12, 13, 14, 15, ...)",
        f"{path}: every record reads as sft (30 dialogues, 30 turns); did you mean --kind sft?"]


def test_invalid_utf8_names_its_line(tmp_path: Path):
    path = tmp_path / "latin1.jsonl"
    latin1 = '{"turns": [{"human": "café", "moss": "x"}]}\n'.encode("latin-1")
    path.write_bytes(json.dumps(SFT).encode() + b"\n" + latin1)
    assert errors_of(load_dialogues, path) == [f"{path}:2: line: not valid UTF-8 (byte 25 of the line)"]


def test_overlong_line_is_reported_and_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 100)
    long = {"turns": [{"human": "x" * 300, "moss": "y"}]}
    path = write_lines(tmp_path / "long.jsonl", [SFT, long, {"turns": []}])
    assert errors_of(load_dialogues, path) == [f"{path}:2: line: longer than 100 bytes",
                                              f"{path}:3: turns: empty; a dialogue needs at least one turn"]


def test_empty_and_missing_files(tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert errors_of(load_prompts, empty) == [f"{empty}:0: file: no records; the file is empty"]
    [error] = errors_of(load_prompts, tmp_path / "nope.jsonl")
    assert error.startswith(f"{tmp_path / 'nope.jsonl'}:0: file: cannot open")


def test_one_bad_line_among_good_ones_loads_nothing(tmp_path: Path):
    good = {**PROMPT, "chosen": "5", "rejected": "4"}
    path = write_lines(tmp_path / "mixed.jsonl", [good, good, {**PROMPT, "chosen": "5"}, good])
    assert errors_of(load_preferences, path) == [f"{path}:3: rejected: missing; chosen and rejected come together"]


def test_validate_good_file(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = write_lines(tmp_path / "pref.jsonl", [
        {**PROMPT, "chosen": "5", "rejected": "4"},
        {**PROMPT, "responses": ["a", "b", "c", "d"], "ranks": [0, 1, 1, 2]},
    ])
    assert validate(path, "preferences") == 0
    out = capsys.readouterr()
    assert out.out == f"{path}: 2 preference records, 6 pairs, K=2..4, OK\n" and out.err == ""


def test_validate_bad_file_reports_every_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = write_lines(tmp_path / "sft.jsonl", [SFT, {"turns": []}, SFT, "not json}"])
    assert validate(path, "sft") == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines() == [f"{path}:2: turns: empty; a dialogue needs at least one turn",
                                    f"{path}:4: line: invalid JSON: Expecting value at column 1"]


def test_write_jsonl_round_trips_atomically(tmp_path: Path):
    path = tmp_path / "out" / "prefs.jsonl"
    prefs = [Preference(Dialogue([Turn("你好")], "m"), ["a", "b"], margin=1.0, metadata={"id": 9})]
    write_jsonl(path, prefs)
    assert load_preferences(path) == prefs
    assert [p.name for p in path.parent.iterdir()] == ["prefs.jsonl"]  # no temp file left behind
