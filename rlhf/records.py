"""This project's records as its JSONL files hold them: dialogues (`rlhf.moss.Dialogue`), prompts, ranked
preferences and solutions in labelled steps, each parsed from a JSON object with the field that is wrong named, read a
line at a time and written one a line.

A file is read whole and every bad line is reported as `PATH:LINE: FIELD: what is wrong`; a file with any error raises
one DataFileError and is never half-used. rlhf/formats.py reads other projects' formats into these records, and
rlhf/data.py, above both, is what the rest of the code loads data files with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rlhf import files
from rlhf.moss import Dialogue, FieldError, json_type

MAX_LINE_BYTES = 8 * 1024 * 1024
KINDS = ("sft", "prompts", "preferences", "steps")
"""What a data file holds (`--kind`): SFT dialogues, prompts, ranked preferences, solutions in labelled steps."""

STEP_SEPARATOR = "\n"
"""What joins a solution's steps into MOSS's reply, and splits a reply back into steps (`prm.step_separator`'s
default): a step never contains it."""

_PREFERENCE_KEYS = ("responses", "ranks", "chosen", "rejected", "margin")
_STEP_KEYS = ("steps", "step_labels")

T = TypeVar("T")


class RanksNothing(FieldError):
    """A well-formed preference that ranks nothing (every response tied, the same reply twice): hub files hold a few,
    which a load skips with a count instead of refusing the file."""


class DataError(Exception):
    """One bad line (or the file itself, at line 0)."""

    def __init__(self, path: str | os.PathLike, line: int, field: str, message: str) -> None:
        self.path, self.line, self.field, self.message = str(path), line, field, message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"


class DataFileError(Exception):
    """Every error found in one file."""

    def __init__(self, errors: list[DataError]) -> None:
        self.errors = errors
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def lines(self, shown: int = 10) -> list[str]:
        """The errors, one a line when they are few; else the first `shown`, then each kind of problem among the
        rest once, with its count and first lines (a file of the wrong kind fails the same way on every line)."""
        if len(self.errors) <= 2 * shown:
            return [str(e) for e in self.errors]
        lines = [str(e) for e in self.errors[:shown]]
        rest: dict[tuple[str, str, str], list[int]] = {}
        for e in self.errors[shown:]:
            rest.setdefault((e.path, e.field, e.message), []).append(e.line)
        kinds = list(rest.items())
        for (path, field, message), at in kinds[:shown]:
            first = ", ".join(map(str, at[:5])) + (", ..." if len(at) > 5 else "")
            lines.append(f"{path}: {len(at)} more {'lines' if len(at) > 1 else 'line'} with {field}: {message} "
                         f"(lines {first})")
        if len(kinds) > shown:
            lines.append(f"{kinds[0][0][0]}: and {sum(len(at) for _, at in kinds[shown:])} more errors of "
                         f"{len(kinds) - shown} other kinds")
        return lines


@dataclass
class Preference:
    """A prompt and K >= 2 responses ranked best first; equal ranks are ties and make no pair."""

    prompt: Dialogue
    responses: list[str]
    ranks: list[int] = field(default_factory=list)
    margin: float | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ranks:
            self.ranks = list(range(len(self.responses)))

    def pairs(self) -> list[tuple[int, int]]:
        """All (better, worse) response index pairs, ties skipped."""
        k = len(self.responses)
        return [(i, j) for i in range(k) for j in range(i + 1, k) if self.ranks[i] < self.ranks[j]]

    def to_json(self) -> dict:
        out = self.prompt.to_json()
        out.update(responses=list(self.responses), ranks=list(self.ranks))
        if self.margin is not None:
            out["margin"] = self.margin
        return {**out, **self.metadata}


@dataclass
class StepSolution:
    """A prompt and a solution in steps, each labelled good (True: the solution can still reach the right answer
    after it) or bad. The steps joined by the step separator are MOSS's reply to the prompt's last turn."""

    prompt: Dialogue
    steps: list[str]
    labels: list[bool]
    metadata: dict = field(default_factory=dict)
    step_field: str = field(default="turns[-1].steps[{i}]", compare=False, repr=False)
    """How an error names step i (0-based) in the record it was read from, e.g. `completions[{i}]` (TRL's)."""

    def reply(self, separator: str = STEP_SEPARATOR) -> str:
        return separator.join(self.steps)

    def dialogue(self, separator: str = STEP_SEPARATOR) -> Dialogue:
        """The prompt with the steps as MOSS's reply, and the record's metadata."""
        dialogue = self.prompt.with_reply(self.reply(separator))
        dialogue.metadata = {**dialogue.metadata, **self.metadata}
        return dialogue

    @property
    def first_error(self) -> int | None:
        """The index of the first bad step, None when every step is good."""
        return first_bad(self.labels)

    def check_separator(self, separator: str) -> None:
        """FieldError naming the first step that holds `separator`: joined into one reply, it would split in two."""
        for i, step in enumerate(self.steps):
            if separator in step:
                raise FieldError(self.step_field.format(i=i, n=i + 1),
                                 f"contains the step separator {separator!r}, so the reply would split into other "
                                 "steps than the labels are for; remove it from the step, or pick another "
                                 "prm.step_separator")

    def to_json(self) -> dict:
        out = self.prompt.to_json()
        out["turns"][-1].update(steps=list(self.steps), step_labels=list(self.labels))
        return {**out, **self.metadata}


def first_bad(good: Sequence[bool]) -> int | None:
    """The index of the first False (a solution's first bad step), None when there is none."""
    return next((i for i, g in enumerate(good) if not g), None)


# --- record parsers: a JSON object in, a record out, FieldError on bad input -------------------------------


def parse_dialogue(obj: Any) -> Dialogue:
    """An SFT dialogue: every turn has MOSS's reply."""
    dialogue = Dialogue.from_json(obj)
    if dialogue.turns[-1].moss is None:
        raise FieldError(_last_reply_field(obj, len(dialogue.turns)), "missing; every SFT turn needs a reply")
    return dialogue


def parse_prompt(obj: Any) -> Dialogue:
    """A prompt: the last turn has no reply yet."""
    dialogue = Dialogue.from_json(obj)
    if dialogue.turns[-1].moss is not None:
        raise FieldError(_last_reply_field(obj, len(dialogue.turns)),
                         "the last turn of a prompt must not have a reply; remove it, the model writes it")
    return dialogue


def _last_reply_field(obj: dict, num_turns: int) -> str:
    if "chat" in obj and "turns" not in obj:
        return f"chat.turn_{num_turns}.MOSS"
    return f"turns[{num_turns - 1}].moss"


def parse_preference(obj: Any) -> Preference:
    """A prompt plus `responses` (optionally `ranks`) or the `chosen`/`rejected` shorthand."""
    if not isinstance(obj, dict):
        raise FieldError("record", f"expected a JSON object, got {json_type(obj)}")
    rest = {k: v for k, v in obj.items() if k not in _PREFERENCE_KEYS}
    prompt = parse_prompt(rest)
    responses, ranks = _responses_and_ranks(obj)
    margin = obj.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise FieldError("margin", f"expected a number, got {json_type(margin)}")
    metadata, prompt.metadata = prompt.metadata, {}
    return Preference(prompt, responses, ranks, None if margin is None else float(margin), metadata)


def _responses_and_ranks(obj: dict) -> tuple[list[str], list[int]]:
    shorthand = "chosen" in obj or "rejected" in obj
    if shorthand and "responses" in obj:
        raise FieldError("responses", "give either responses or chosen/rejected, not both")
    if shorthand:
        for key in ("chosen", "rejected"):
            if key not in obj:
                raise FieldError(key, "missing; chosen and rejected come together")
            if not isinstance(obj[key], str):
                raise FieldError(key, f"expected a string, got {json_type(obj[key])}")
        if "ranks" in obj:
            raise FieldError("ranks", "not allowed with chosen/rejected; chosen is the better one")
        return [obj["chosen"], obj["rejected"]], [0, 1]
    if "responses" not in obj:
        raise FieldError("responses", "missing; give responses (ranked best first) or chosen and rejected")
    responses = obj["responses"]
    if not isinstance(responses, list):
        raise FieldError("responses", f"expected a list of strings, got {json_type(responses)}")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise FieldError(f"responses[{i}]", f"expected a string, got {json_type(response)}")
    if len(responses) < 2:
        raise FieldError("responses", f"needs at least two responses to rank, got {len(responses)}")
    ranks = obj.get("ranks")
    if ranks is None:
        return responses, list(range(len(responses)))
    if not isinstance(ranks, list):
        raise FieldError("ranks", f"expected a list of ints, got {json_type(ranks)}")
    if len(ranks) != len(responses):
        raise FieldError("ranks", f"has {len(ranks)} entries but there are {len(responses)} responses")
    for i, rank in enumerate(ranks):
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise FieldError(f"ranks[{i}]", f"expected an int, got {json_type(rank)}")
    for i in range(1, len(ranks)):
        if ranks[i] < ranks[i - 1]:
            raise FieldError("ranks", f"ranks[{i}]={ranks[i]} is better than ranks[{i - 1}]={ranks[i - 1]} but "
                                      "responses are listed best first; reorder the responses or fix the ranks")
    if ranks[0] == ranks[-1]:
        raise RanksNothing("ranks", "all responses are tied, so the record gives no pair")
    return responses, ranks


def steps_and_labels(steps: Any, labels: Any, steps_field: str, labels_field: str) -> tuple[list[str], list[bool]]:
    """A solution's steps (one or more strings with text) and their labels (a bool each), checked; the fields name
    where a record holds them (`completions`, `labels` in TRL's)."""
    if not isinstance(steps, list):
        raise FieldError(steps_field, f"expected a list of strings, got {json_type(steps)}")
    if not steps:
        raise FieldError(steps_field, "empty; a solution has at least one step")
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise FieldError(f"{steps_field}[{i}]", f"expected a string, got {json_type(step)}")
        if not step.strip():
            raise FieldError(f"{steps_field}[{i}]", "empty; every step needs text")
    if labels is None:
        raise FieldError(labels_field, "missing; one label a step, true while the solution can still reach the "
                                       "right answer")
    if not isinstance(labels, list):
        raise FieldError(labels_field, f"expected a list of true/false, got {json_type(labels)}")
    if len(labels) != len(steps):
        raise FieldError(labels_field, f"has {len(labels)} labels but there are {len(steps)} steps; give one a step")
    for i, label in enumerate(labels):
        if not isinstance(label, bool):
            raise FieldError(f"{labels_field}[{i}]", f"expected true or false, got {json_type(label)}")
    return steps, labels


def has_steps(obj: Any) -> bool:
    """Whether a record of this project's schema gives a solution in steps (its last turn has `steps` or
    `step_labels`), from its keys alone."""
    turns = obj.get("turns") if isinstance(obj, dict) else None
    return isinstance(turns, list) and any(isinstance(t, dict) and any(k in t for k in _STEP_KEYS) for t in turns)


def parse_steps(obj: Any) -> StepSolution:
    """A prompt whose last turn gives `steps` and `step_labels` in place of MOSS's reply."""
    if not isinstance(obj, dict):
        raise FieldError("record", f"expected a JSON object, got {json_type(obj)}")
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict):
        if "chat" in obj and "turns" not in obj:
            raise FieldError("chat", "a raw MOSS-003 record has no steps; give turns, the last with steps and "
                                     "step_labels")
        parse_prompt(obj)  # says what is wrong with the turns
        raise FieldError("turns", "expected a list of turns, the last an object with steps and step_labels")
    last = len(turns) - 1
    for i, turn in enumerate(turns[:-1]):
        for key in _STEP_KEYS:
            if isinstance(turn, dict) and key in turn:
                raise FieldError(f"turns[{i}].{key}", "only the last turn has steps; earlier turns are the "
                                                      "conversation so far, each with its moss reply")
    turn = dict(turns[-1])
    if "steps" not in turn:
        raise FieldError(f"turns[{last}].steps", "missing; the last turn of a stepwise record gives steps and "
                                                 "step_labels")
    if turn.get("moss") is not None:
        raise FieldError(f"turns[{last}].moss", "not allowed beside steps: the reply is the steps joined by the step "
                                                "separator (prm.step_separator); remove moss")
    steps, labels = steps_and_labels(turn.pop("steps"), turn.pop("step_labels", None), f"turns[{last}].steps",
                                     f"turns[{last}].step_labels")
    prompt = parse_prompt({**obj, "turns": [*turns[:-1], turn]})
    metadata, prompt.metadata = prompt.metadata, {}
    return StepSolution(prompt, steps, labels, metadata, f"turns[{last}].steps[{{i}}]")


# --- files -----------------------------------------------------------------------------------------------


def not_utf8_text(first: bytes) -> str | None:
    """Why a file whose first line is `first` is not UTF-8 JSONL at all, or None if it may be."""
    if first.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16/32 encoded (it starts with a byte-order mark); save it as UTF-8"
    if first.startswith(b"\x1f\x8b"):
        return "gzip-compressed; decompress it first (gunzip)"
    if b"\x00" in first:
        return "binary or UTF-16 (it has NUL bytes); JSONL files are UTF-8 text"
    return None


def read_objects(path: str | os.PathLike) -> tuple[list[tuple[int, Any]], list[DataError]]:
    """(line number, parsed JSON) for every non-blank line, and the errors of lines that are not JSON."""
    objects: list[tuple[int, Any]] = []
    errors: list[DataError] = []
    try:
        f = open(path, "rb")
    except OSError as e:
        return [], [DataError(path, 0, "file", f"cannot open: {e.strerror or e}")]
    with f:
        line = 0
        while True:
            # Bounded reads, so one huge line cannot exhaust memory before it is reported.
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            line += 1
            if line == 1 and (not_text := not_utf8_text(raw)):
                # One line for the whole file, instead of a garbled error for every line of it.
                return [], [DataError(path, 0, "file", not_text)]
            if len(raw) > MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_LINE_BYTES)
                errors.append(DataError(path, line, "line", f"longer than {MAX_LINE_BYTES} bytes"))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.append(DataError(path, line, "line", f"not valid UTF-8 (byte {e.start} of the line)"))
                continue
            if line == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            text = text.rstrip("\r\n")  # an error at the line's end is at its last column, not the next line's first
            try:
                objects.append((line, json.loads(text)))
            except json.JSONDecodeError as e:
                cut = e.pos >= len(text.rstrip()) or text.count('"') % 2 == 1  # ends inside a value, or a string
                hint = "; the line looks truncated" if cut else ""
                what = e.msg.removesuffix(" at")  # "Invalid control character at"
                errors.append(DataError(path, line, "line", f"invalid JSON: {what} at column {e.colno}{hint}"))
    return objects, errors


def load_parsed(path: str | os.PathLike, parse_record: Callable[[Any], T]) -> list[T]:
    """`parse_record` of every record of a JSONL file; every bad line is collected and raised together as a
    DataFileError, so a file with errors is never half-used."""
    objects, errors = read_objects(path)
    records = []
    for line, obj in objects:
        try:
            records.append(parse_record(obj))
        except FieldError as e:
            errors.append(DataError(path, line, e.field, e.message))
    if not errors and not records:
        errors.append(DataError(path, 0, "file", "no records; the file is empty"))
    if errors:
        errors.sort(key=lambda e: e.line)
        raise DataFileError(errors)
    return records



def write_jsonl(path: str | os.PathLike, records: Iterable[dict | Dialogue | Preference | StepSolution]) -> None:
    """Write records one a line, atomically: readers see the old file or the whole new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with files.replacing(os.fspath(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            obj = record if isinstance(record, dict) else record.to_json()
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
