"""Readers for the data files users already have, into this project's records (DESIGN.md, "Data").

A format is named (`--data-format`) or detected from the first records (`auto`); a source is JSONL, JSON (one record
or an array of them), Parquet, or a directory written by `datasets`' `save_to_disk`. Every bad record is reported as
`PATH:RECORD: FIELD: what is wrong` (RECORD: the line of a JSONL file, else the 1-based array element or row, which
the message names), all together, so a file with errors is never half-used. Unknown keys ride along as metadata.

One record of each format:

moss           this project's schema, or a raw MOSS-003 record (DESIGN.md)
moss-rlhf      PPO prompts: ["q1", "a1", "q2"], utterances human first (odd: a prompt; even: a dialogue, or read as
               prompts, as MOSS-RLHF reads them: roles from the last utterance, the human's, back, so the first is a
               reply whose question was cut, a turn with an empty human part); reward
               data: {"chosen": ["q1", "a1", "q2", "good"], "rejected": ["q1", "a1", "q2", "bad"]}
trl            {"prompt": "2+3?", "chosen": "5", "rejected": "6", "margin": 1.0}, margin optional; the same with
               messages ({"prompt": [{"role": "user", "content": "2+3?"}], "chosen": [{"role": "assistant",
               "content": "5"}], "rejected": [...]}) or with the prompt implicit ({"chosen": [user, assistant],
               "rejected": [user, assistant]}); {"prompt": ...} alone is a prompt, with "completion" a dialogue;
               stepwise supervision: {"prompt": "2+3+4?", "completions": ["2 + 3 = 5", "5 + 4 = 9"], "labels":
               [true, true]}, the prompt a string or messages
hh-rlhf        {"chosen": "\\n\\nHuman: 2+3?\\n\\nAssistant: 5", "rejected": "\\n\\nHuman: 2+3?\\n\\nAssistant: 6"}
ultrafeedback  {"instruction": "2+3?", "completions": [{"response": "5", "overall_score": 9.0, ...}, ...]}: best
               score first, equal scores tied; or binarized: {"prompt", "chosen", "rejected"} as trl plus
               "score_chosen" and "score_rejected"
nectar         {"prompt": "\\n\\nHuman: 2+3?\\n\\nAssistant:", "answers": [{"answer": "5", "rank": 1, "model": ...},
               ...]}: rank 1 best, equal ranks tied
openai         {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": ...}, ...]}: an assistant's
               `tool_calls` become its turn's Commands, one `Name("argument")` a line, its content the Inner
               Thoughts; the tool messages the Results (`Calculate("2+3") => 5`); the next assistant message the reply
math-shepherd  {"input": "2+3+4? Step 1: 2 + 3 = 5 ки\\nStep 2: 5 + 4 = 10 ки", "label": "2+3+4? Step 1: 2 + 3 = 5
               +\\nStep 2: 5 + 4 = 10 -", "task": "GSM8K"}: each step ends with the tag ки, which label replaces with
               + (a good step) or - (a bad one); the question is the text before "Step 1:" (without one, up to the
               first "?"), a step the text up to its tag, stripped, its "Step k:" kept (as TRL's trl-lib/math_shepherd
               keeps it); a tag inside the question (an annotation slip of a few records) is dropped with its label

A system message is the meta instruction (ending in a newline, as MOSS's does). HH-RLHF and Nectar text is stripped
of the spaces around each utterance, which the MOSS rendering writes itself. A preference format read as prompts
gives each record's prompt, read as SFT the prompt with its best response. A solution in steps read as prompts gives
its prompt; as SFT or preferences it is refused (its bad steps would be trained on as good). No step may hold the
step separator (`STEP_SEPARATOR`, or the one a load is given), which joins the steps into the reply.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from rlhf.moss import Dialogue, FieldError, Turn, json_type
from rlhf.records import (KINDS, STEP_SEPARATOR, DataError, DataFileError, Preference, RanksNothing, StepSolution,
                          has_steps, not_utf8_text, parse_dialogue, parse_preference, parse_prompt, parse_steps,
                          read_objects, steps_and_labels, write_jsonl)

FORMATS = ("auto", "moss", "moss-rlhf", "trl", "hh-rlhf", "ultrafeedback", "nectar", "openai", "math-shepherd")
DETECT_SAMPLE = 20
"""Records looked at to detect a format, and to tell a file's kind when converting."""

_SCORE_KEYS = ("overall_score", "score", "rating", "fine-grained_score")
_DATASET_FILES = ("state.json", "dataset_dict.json")  # what save_to_disk writes into its directory
_OUR_KEYS = ("meta_instruction", "turns", "chat", "num_turns", "responses", "ranks", "chosen", "rejected", "margin")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_STEP_TAG = "ки"  # Math-Shepherd's end of a step, where its label puts + or -
_FIRST_STEP = re.compile(r"[Ss]tep 1:")

Record = Dialogue | Preference | StepSolution


# --- sources: (record number, JSON value) pairs --------------------------------------------------------------


def read_source(path: str | os.PathLike) -> tuple[list[tuple[int, Any]], list[DataError], str | None]:
    """Every record of a file with its number, the errors of unreadable ones, and how a record number reads in a
    message (a format with `{}`; None for JSONL, whose numbers are lines)."""
    name = os.fspath(path)
    if os.path.isdir(name) and any(os.path.exists(os.path.join(name, f)) for f in _DATASET_FILES):
        return _read_dataset(name, saved=True)
    if name.lower().endswith(".parquet") and os.path.isfile(name):
        return _read_dataset(name, saved=False)
    if name.lower().endswith(".json") and os.path.isfile(name):
        return _read_json(name)
    objects, errors = read_objects(path)
    return objects, errors, None


def _read_json(path: str) -> tuple[list[tuple[int, Any]], list[DataError], str | None]:
    def fail(message: str) -> tuple[list, list[DataError], None]:
        return [], [DataError(path, 0, "file", message)], None

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return fail(f"cannot open: {e.strerror or e}")
    if not_text := not_utf8_text(raw[:4096].split(b"\n", 1)[0]):
        return fail(not_text)
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        return fail(f"not valid UTF-8 (byte {e.start} of the file)")
    if not text.strip():
        return fail("no records; the file is empty")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one value a line: JSON Lines under a .json name
            objects, errors = read_objects(path)
            return objects, errors, None
        return fail(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    if isinstance(value, dict):
        return [(1, value)], [], "the file's one record"
    if not isinstance(value, list):
        return fail(f"expected a JSON array of records or one record object, got {json_type(value)}")
    if not value:
        return fail("no records; the JSON array is empty")
    return list(enumerate(value, 1)), [], "element {} of the JSON array"


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or log lines from `datasets`: our errors are the only output."""
    import datasets
    bars_were_off, verbosity = datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _read_dataset(path: str, saved: bool) -> tuple[list[tuple[int, Any]], list[DataError], str | None]:
    import datasets  # slow to import; only Parquet and saved datasets need it

    with _quiet_datasets():
        try:
            if saved:
                dataset = datasets.load_from_disk(path)
            else:
                # Read into memory with a throw-away cache, so reading a file leaves no copy of it behind.
                with tempfile.TemporaryDirectory() as cache:
                    dataset = datasets.Dataset.from_parquet(path, keep_in_memory=True, cache_dir=cache)
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
            what = "a saved dataset" if saved else "Parquet"
            return [], [DataError(path, 0, "file", f"cannot read as {what}: {' '.join(str(e).split())}")], None
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            return [], [DataError(path, 0, "file", f"holds the splits {', '.join(dataset)}; pass one split's "
                                                   f"directory, e.g. {os.path.join(path, next(iter(dataset)))}")], None
        [dataset] = dataset.values()
    return [(i, _without_nulls(row)) for i, row in enumerate(dataset, 1)], [], "row {}"


def _without_nulls(value: Any) -> Any:
    """Arrow gives every row every column, null where a record lacked the key; null means absent here anyway."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# --- detection -----------------------------------------------------------------------------------------------


def detect(obj: Any) -> str | None:
    """The format one record looks like, from its keys alone (so a bad record still counts); None if none."""
    if isinstance(obj, list):
        return "moss-rlhf" if obj and all(isinstance(u, str) for u in obj) else None
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("turns"), list) or isinstance(obj.get("chat"), dict):
        return "moss"
    if "labels" in obj or (isinstance(obj.get("completions"), list) and  # TRL's stepwise; UltraFeedback's are objects
                           any(isinstance(c, str) for c in obj["completions"])):
        return "trl"
    if "completions" in obj or "score_chosen" in obj:
        return "ultrafeedback"
    if "input" in obj and "label" in obj:
        return "math-shepherd"
    if "answers" in obj:
        return "nectar"
    chosen = obj.get("chosen")
    if isinstance(chosen, list) and chosen and all(isinstance(u, str) for u in chosen):
        return "moss-rlhf"
    if isinstance(chosen, str) and "prompt" not in obj and _HH_TURN.search(chosen):
        return "hh-rlhf"
    if any(key in obj for key in ("prompt", "chosen", "rejected")):
        return "trl"
    if "messages" in obj:
        return "openai"
    return "moss" if "turns" in obj or "chat" in obj else None  # ours, gone wrong (Nectar has an int "turns")


def detect_format(objects: list[Any]) -> str | None:
    """The format most of the first records look like; this project's own when none is an object (their errors
    then say so), None when objects are there but look like no format."""
    votes = Counter(f for f in map(detect, objects[:DETECT_SAMPLE]) if f is not None)
    if votes:
        return max(votes, key=lambda f: (votes[f], -FORMATS.index(f)))
    return None if any(isinstance(obj, dict) for obj in objects[:DETECT_SAMPLE]) else "moss"


# --- shared pieces of the readers ----------------------------------------------------------------------------


def _as_kind(record: Record, kind: str | None, field: str) -> Record:
    """A record as `kind` (None: as it is): a preference read as prompts gives its prompt, as SFT the prompt with its
    best response; a solution in steps read as prompts gives its prompt; a dialogue must end the way its kind does.
    `field` names the record's part errors are about."""
    if kind == "steps" and not isinstance(record, StepSolution):
        raise FieldError(field, "no steps; stepwise supervision gives a solution's steps and a label for each (trl: "
                                "prompt, completions, labels)")
    if isinstance(record, StepSolution):
        if kind in (None, "steps"):
            return record
        if kind == "prompts":
            return record.dialogue().as_prompt()
        what = "an SFT dialogue (its bad steps would be trained on)" if kind == "sft" else "a ranked list"
        raise FieldError(field, f"a solution in labelled steps, not {what}; read it as steps, or as prompts")
    if isinstance(record, Preference):
        if kind in (None, "preferences"):
            if len(record.responses) < 2:
                raise FieldError(field, f"needs at least two responses to rank, got {len(record.responses)}")
            if len(set(record.ranks)) == 1:
                raise RanksNothing(field, "all responses are tied, so the record gives no pair")
            if len(set(record.responses)) == 1:
                raise RanksNothing(field, "every response is the same reply, so the record ranks nothing")
            return record
        dialogue = record.prompt.copy()
        dialogue.metadata = {**dialogue.metadata, **record.metadata}
        if kind == "prompts":
            return dialogue
        if not record.responses:
            raise FieldError(field, "no responses; SFT needs the best one as the reply")
        return dialogue.with_reply(record.responses[0])
    if kind == "preferences":
        raise FieldError(field, "one conversation with nothing to rank; preferences need two or more responses")
    if kind == "sft" and record.is_prompt:
        raise FieldError(field, "ends with the human's message; every SFT dialogue ends with a reply")
    if kind == "prompts" and not record.is_prompt:
        raise FieldError(field, "ends with a reply; a prompt ends with the human's message and the model replies")
    return record


def _metadata(obj: dict, read: tuple[str, ...]) -> dict:
    """The keys a reader did not read, to ride along; one that is a key of our schema too (Nectar's "turns", a
    count) is renamed `source_KEY`, so the records written keep both."""
    return {f"source_{k}" if k in _OUR_KEYS else k: v for k, v in obj.items() if k not in read}


def _record(obj: Any, expected: str) -> dict:
    if not isinstance(obj, dict):
        raise FieldError("record", f"expected a JSON object {expected}, got {json_type(obj)}")
    return obj


def _required(obj: dict, key: str, why: str) -> Any:
    if key not in obj:
        raise FieldError(key, f"missing; {why}")
    return obj[key]


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise FieldError(field, f"expected a string, got {json_type(value)}")
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(field, f"expected a number, got {json_type(value)}")
    return value


def _margin(obj: dict) -> float | None:
    return None if obj.get("margin") is None else float(_number(obj["margin"], "margin"))


def _ranked(scores: list[float], higher_is_better: bool) -> tuple[list[int], list[int]]:
    """(indices best first, ranks 0, 1, ... in that order with equal scores sharing one)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i] if higher_is_better else scores[i])
    ranks: list[int] = []
    for position, i in enumerate(order):
        ranks.append(0 if position == 0 else ranks[-1] + (scores[i] != scores[order[position - 1]]))
    return order, ranks


def _alternating(utterances: list[str]) -> Dialogue:
    """Human first, then the replies in turn; an odd count leaves the last turn for the model."""
    return Dialogue([Turn(utterances[i], moss=utterances[i + 1] if i + 1 < len(utterances) else None)
                     for i in range(0, len(utterances), 2)])


# --- moss and moss-rlhf --------------------------------------------------------------------------------------

_MOSS_PARSERS: dict[str, Callable[[Any], Record]] = {
    "sft": parse_dialogue, "prompts": parse_prompt, "preferences": parse_preference}


def read_moss(obj: Any, kind: str | None) -> Record:
    if kind == "steps" or has_steps(obj):
        return _as_kind(parse_steps(obj), kind, f"turns[{len(obj['turns']) - 1}].steps")
    if kind is None:
        if isinstance(obj, dict) and any(k in obj for k in ("responses", "chosen", "rejected")):
            return parse_preference(obj)
        return Dialogue.from_json(obj)
    return _MOSS_PARSERS[kind](obj)


_CUT_HISTORY = "(MOSS-RLHF reads that as a cut history starting with a reply)"


def _utterances(value: Any, field: str) -> list[str]:
    if not isinstance(value, list):
        raise FieldError(field, f"expected a list of utterances, got {json_type(value)}")
    if not value:
        raise FieldError(field, "empty; expected utterances, human first")
    for i, utterance in enumerate(value):
        if not isinstance(utterance, str):
            raise FieldError(f"{field}[{i}]", f"expected a string, got {json_type(utterance)}")
        if not utterance:
            raise FieldError(f"{field}[{i}]", "empty; every utterance needs text")
    return value


def read_moss_rlhf(obj: Any, kind: str | None) -> Record:
    """MOSS-RLHF's PPO data (a list of utterances) or reward data (chosen and rejected utterance lists)."""
    if isinstance(obj, list):
        utterances = _utterances(obj, "record")
        if kind == "prompts" and len(utterances) % 2 == 0:
            # MOSS-RLHF gives a prompt's utterances their roles from the last, the human's, back: an even count is a
            # history cut after a question, starting with MOSS's reply to it (a turn whose human part is lost).
            return Dialogue([Turn("", moss=utterances[0]), *_alternating(utterances[1:]).turns])
        return _as_kind(_alternating(utterances), kind, "record")
    obj = _record(obj, "with chosen and rejected, or a list of utterances")
    chosen = _utterances(_required(obj, "chosen", "reward data gives chosen and rejected"), "chosen")
    rejected = _utterances(_required(obj, "rejected", "reward data gives chosen and rejected"), "rejected")
    if len(chosen) % 2:
        raise FieldError("chosen", f"has {len(chosen)} utterances; expected an even number, human first and ending "
                                   f"with the reply {_CUT_HISTORY}")
    if len(rejected) != len(chosen):
        raise FieldError("rejected", f"has {len(rejected)} utterances but chosen has {len(chosen)}; both are one "
                                     "conversation with a different last reply")
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])):
        if a != b:
            raise FieldError(f"rejected[{i}]", "differs from chosen; only the last utterance, the reply, may differ")
    if chosen[-1] == rejected[-1]:
        raise RanksNothing("rejected", "the same reply as chosen, so the pair ranks nothing")
    metadata = _metadata(obj, ("chosen", "rejected"))
    return _as_kind(Preference(_alternating(chosen[:-1]), [chosen[-1], rejected[-1]], [0, 1], None, metadata),
                    kind, "rejected")


# --- role messages: trl and openai ---------------------------------------------------------------------------


def _content(message: dict, where: str, optional: bool = False) -> str | None:
    """A message's text: a string, or text parts joined."""
    content = message.get("content")
    if content is None:
        if optional:
            return None
        raise FieldError(f"{where}.content", "missing")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FieldError(f"{where}.content", f"expected a string, got {json_type(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise FieldError(f"{where}.content[{j}]", "expected a text part ({\"type\": \"text\", \"text\": ...}); "
                                                      "other parts have no place in a MOSS dialogue")
        texts.append(part["text"])
    return "".join(texts)


def _command_argument(arguments: Any) -> str:
    """What goes between the parentheses of a MOSS-003 command: one argument in double quotes, as in
    `Calculate("2+3")`; several as their JSON object."""
    value = arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:  # a bare argument rather than the JSON object OpenAI writes
            return f'"{arguments}"' if arguments else ""
    if isinstance(value, dict) and len(value) == 1:
        [value] = value.values()
    if isinstance(value, dict) and not value:
        return ""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'"{json.dumps(value)}"'
    return json.dumps(value, ensure_ascii=False)


def _command(call: Any, where: str) -> tuple[str | None, str]:
    """(call id, command line) of one tool call; a legacy `function_call` is the function itself."""
    if not isinstance(call, dict):
        raise FieldError(where, f"expected a tool call object, got {json_type(call)}")
    function = call.get("function", call)
    at = f"{where}.function" if "function" in call else where
    if not isinstance(function, dict):
        raise FieldError(at, f"expected an object with name and arguments, got {json_type(function)}")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise FieldError(f"{at}.name", "missing; a tool call names its function" if name is None
                         else f"expected a function name, got {json_type(name)}")
    return call.get("id"), f"{name}({_command_argument(function.get('arguments', ''))})"


def _from_messages(messages: Any, where: str) -> Dialogue:
    """A dialogue from role messages: system messages first (the meta instruction), then user, assistant (with
    tool calls and tool results in between), ..."""
    if not isinstance(messages, list):
        raise FieldError(where, f"expected a list of messages, got {json_type(messages)}")
    meta: list[str] = []
    turns: list[Turn] = []
    calls: list[tuple[str | None, str]] = []  # the current turn's tool calls
    answered = 0  # how many of them have a result
    for i, message in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise FieldError(at, f"expected a message object, got {json_type(message)}")
        role = message.get("role")
        turn = turns[-1] if turns else None
        if role in ("system", "developer"):
            if turns:
                raise FieldError(f"{at}.role", f"a {role} message inside the conversation; MOSS has one meta "
                                               "instruction, so system messages come first")
            meta.append(_content(message, at))
        elif role == "user":
            if turn is not None and turn.moss is None:
                raise FieldError(at, "a user message where the assistant's reply is due; merge the user messages")
            turns.append(Turn(_content(message, at)))
        elif role == "assistant":
            if turn is None:
                raise FieldError(at, "an assistant message before any user message; a MOSS turn starts with the "
                                     "human's")
            if turn.moss is not None:
                raise FieldError(at, "a second assistant reply in a row; merge them or put a user message between")
            tool_calls, key = message.get("tool_calls"), "tool_calls"
            if not tool_calls and message.get("function_call"):  # the legacy form: one call, the function itself
                tool_calls, key = [message["function_call"]], "function_call"
            if not tool_calls:
                turn.moss = _content(message, at)
                continue
            if not isinstance(tool_calls, list):
                raise FieldError(f"{at}.tool_calls", f"expected a list of tool calls, got {json_type(tool_calls)}")
            if turn.commands is not None:
                raise FieldError(f"{at}.{key}", "a second round of tool calls in one turn; a MOSS turn has one "
                                                "Commands segment, so put all its calls in one message")
            calls = [_command(c, f"{at}.tool_calls[{j}]" if key == "tool_calls" else f"{at}.function_call")
                     for j, c in enumerate(tool_calls)]
            answered = 0
            turn.commands = "\n".join(line for _, line in calls)
            thoughts = _content(message, at, optional=True)
            if thoughts:
                turn.inner_thoughts = thoughts
        elif role in ("tool", "function"):
            if turn is None or turn.commands is None or turn.moss is not None:
                raise FieldError(at, "a tool result with no tool call before it in this turn")
            call_id = message.get("tool_call_id")
            line = next((line for cid, line in calls if call_id is not None and cid == call_id), None)
            if line is None:  # no id to match: results answer the calls in order
                if answered >= len(calls):
                    raise FieldError(at, f"more tool results than the {len(calls)} tool calls before them")
                line = calls[answered][1]
            answered += 1
            result = _content(message, at).strip()
            if not result:
                from rlhf.tools import NO_RESULT  # imports sympy, so only here
                result_line = NO_RESULT
            else:
                result_line = f"{line} => {result}"
            turn.results = result_line if turn.results is None else f"{turn.results}\n{result_line}"
        else:
            raise FieldError(f"{at}.role", f"expected system, user, assistant or tool, got "
                                           f"{role if isinstance(role, str) else json_type(role)}")
    if not turns:
        raise FieldError(where, "no user message; a dialogue needs at least one")
    meta_instruction = "\n".join(meta)
    if meta_instruction and not meta_instruction.endswith("\n"):
        meta_instruction += "\n"
    return Dialogue(turns, meta_instruction)


def read_openai(obj: Any, kind: str | None) -> Record:
    obj = _record(obj, "with messages")
    dialogue = _from_messages(_required(obj, "messages", "an OpenAI-style record is a list of messages"), "messages")
    dialogue.metadata = _metadata(obj, ("messages",))
    return _as_kind(dialogue, kind, "messages")


def _assistant_text(message: Any, where: str) -> str:
    if not isinstance(message, dict) or message.get("role") != "assistant" or message.get("tool_calls"):
        raise FieldError(where, "expected the assistant's reply, a message with role assistant and content")
    return _content(message, where)


def _reply(messages: Any, field: str) -> str:
    """The text of a completion that is one assistant message."""
    if not isinstance(messages, list):
        raise FieldError(field, f"expected a string or a list of messages, got {json_type(messages)}")
    if len(messages) != 1:
        raise FieldError(field, f"expected one assistant message, got {len(messages)} messages")
    return _assistant_text(messages[0], f"{field}[0]")


def _prompt(value: Any, field: str) -> Dialogue:
    if isinstance(value, str):
        return Dialogue([Turn(value)])
    dialogue = _from_messages(value, field)
    if not dialogue.is_prompt:
        raise FieldError(field, "ends with an assistant message; a prompt ends with the user's")
    return dialogue


def _is_conversation(messages: list) -> bool:
    return any(not isinstance(m, dict) or m.get("role") != "assistant" for m in messages)


def read_trl(obj: Any, kind: str | None) -> Record:
    """TRL's preference (explicit or implicit prompt), prompt-only and prompt-completion records; a `messages`
    record is read as openai's."""
    obj = _record(obj, "with prompt, chosen and rejected")
    if "completions" in obj or "labels" in obj or kind == "steps":
        return _as_kind(_stepwise(obj), kind, "completions")
    if "chosen" not in obj and "rejected" not in obj:
        if "prompt" not in obj and "messages" in obj:
            return read_openai(obj, kind)
        prompt = _prompt(_required(obj, "prompt", "a TRL record has a prompt, or messages"), "prompt")
        prompt.metadata = _metadata(obj, ("prompt", "completion"))
        if kind == "prompts" or "completion" not in obj:
            if kind == "sft":
                raise FieldError("completion", "missing; an SFT record has a prompt and its completion")
            return _as_kind(prompt, kind, "prompt")
        completion = obj["completion"]
        reply = completion if isinstance(completion, str) else _reply(completion, "completion")
        return _as_kind(prompt.with_reply(reply), kind, "completion")
    chosen = _required(obj, "chosen", "chosen and rejected come together")
    rejected = _required(obj, "rejected", "chosen and rejected come together")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise FieldError(key, f"expected a string or a list of messages, got {json_type(value)}")
    if type(chosen) is not type(rejected):
        raise FieldError("rejected", f"is a {json_type(rejected)} but chosen is a {json_type(chosen)}")
    if isinstance(chosen, list) and _is_conversation(chosen):  # the implicit prompt, as messages
        if not rejected:
            raise FieldError("rejected", "empty; expected the conversation, like chosen")
        responses = [_assistant_text(value[-1], f"{key}[{len(value) - 1}]")
                     for key, value in (("chosen", chosen), ("rejected", rejected))]
        if chosen[:-1] != rejected[:-1]:
            raise FieldError("rejected", "differs from chosen before the last message; with the prompt implicit "
                                         "both share the conversation up to the assistant's reply")
        prompt = _prompt(chosen[:-1], "chosen")
        given = obj.get("prompt")  # e.g. ultrafeedback_binarized repeats the user's message as the prompt
        if given is not None and given != (prompt.turns[-1].human if isinstance(given, str) else chosen[:-1]):
            raise FieldError("prompt", "differs from the conversation in chosen and rejected")
    elif "prompt" not in obj:
        if isinstance(chosen, str) and _HH_TURN.search(chosen):
            return read_hh_rlhf(obj, kind)
        raise FieldError("prompt", "missing; without a prompt, chosen and rejected must be whole conversations")
    else:
        prompt = _prompt(obj["prompt"], "prompt")
        responses = [chosen, rejected] if isinstance(chosen, str) else [_reply(chosen, "chosen"),
                                                                        _reply(rejected, "rejected")]
    metadata = _metadata(obj, ("prompt", "chosen", "rejected", "margin"))
    return _as_kind(Preference(prompt, responses, [0, 1], _margin(obj), metadata), kind, "rejected")


def _stepwise(obj: dict) -> StepSolution:
    """TRL's stepwise supervision: a prompt, its solution's steps as `completions`, a label each."""
    prompt = _prompt(_required(obj, "prompt", "a stepwise record has a prompt, completions and labels"), "prompt")
    steps, labels = steps_and_labels(_required(obj, "completions", "the solution's steps, one string each"),
                                     obj.get("labels"), "completions", "labels")
    return StepSolution(prompt, steps, labels, _metadata(obj, ("prompt", "completions", "labels")), "completions[{i}]")


# --- hh-rlhf, nectar and ultrafeedback -----------------------------------------------------------------------


def _transcript(text: Any, field: str) -> list[str]:
    """The utterances of `\\n\\nHuman: ...\\n\\nAssistant: ...`, Human first, taking turns."""
    text = _string(text, field)
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) == 1:
        raise FieldError(field, "expected a transcript starting with '\\n\\nHuman:'")
    roles, utterances = parts[1::2], [u.strip() for u in parts[2::2]]
    for i, role in enumerate(roles):
        if role != ("Human", "Assistant")[i % 2]:
            raise FieldError(field, f"utterance {i + 1} is the {role}'s again; Human and Assistant take turns, "
                                    "Human first")
    return utterances


def read_hh_rlhf(obj: Any, kind: str | None) -> Record:
    obj = _record(obj, "with chosen and rejected")
    chosen = _transcript(_required(obj, "chosen", "chosen and rejected come together"), "chosen")
    rejected = _transcript(_required(obj, "rejected", "chosen and rejected come together"), "rejected")
    for key, utterances in (("chosen", chosen), ("rejected", rejected)):
        if len(utterances) % 2:
            raise FieldError(key, "ends with a Human message; it should end with the Assistant's reply")
    if chosen[:-1] != rejected[:-1]:
        raise FieldError("rejected", "differs from chosen before the last Assistant reply; both must share the "
                                     "conversation up to it")
    metadata = _metadata(obj, ("chosen", "rejected", "margin"))
    return _as_kind(Preference(_alternating(chosen[:-1]), [chosen[-1], rejected[-1]], [0, 1], _margin(obj), metadata),
                    kind, "rejected")


def _items(obj: dict, key: str, why: str) -> list[dict]:
    items = _required(obj, key, why)
    if not isinstance(items, list):
        raise FieldError(key, f"expected a list, got {json_type(items)}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise FieldError(f"{key}[{i}]", f"expected an object, got {json_type(item)}")
    return items


def _ranked_preference(prompt: Dialogue, obj: dict, keys: tuple[str, str, str, str], texts: list[str],
                       scores: list[float], higher_is_better: bool) -> Preference:
    """Responses best first, ties sharing a rank. `keys`: the record's prompt and list keys, and each item's text and
    score keys; an item's other keys go, best first, to the `response_metadata` list."""
    prompt_key, list_key, text_key, score_key = keys
    order, ranks = _ranked(scores, higher_is_better)
    metadata = _metadata(obj, (prompt_key, list_key))
    extra = [{k: v for k, v in obj[list_key][i].items() if k not in (text_key, score_key)} for i in order]
    if any(extra):
        metadata["response_metadata"] = extra
    return Preference(prompt, [texts[i] for i in order], ranks, None, metadata)


def _item_field(item: dict, key: str, where: str) -> Any:
    if key not in item:
        raise FieldError(where, "missing")
    return item[key]


def read_nectar(obj: Any, kind: str | None) -> Record:
    obj = _record(obj, "with prompt and answers")
    utterances = _transcript(_required(obj, "prompt", "Nectar records give the prompt and its answers"), "prompt")
    if len(utterances) % 2 == 0:
        if utterances[-1]:
            raise FieldError("prompt", "ends with an Assistant reply; a prompt ends with an empty '\\n\\nAssistant:'")
        utterances = utterances[:-1]
    answers = _items(obj, "answers", "Nectar records give the prompt and its answers")
    texts = [_string(_item_field(a, "answer", f"answers[{i}].answer"), f"answers[{i}].answer").strip()
             for i, a in enumerate(answers)]
    ranks = [_number(_item_field(a, "rank", f"answers[{i}].rank"), f"answers[{i}].rank")
             for i, a in enumerate(answers)]
    preference = _ranked_preference(_alternating(utterances), obj, ("prompt", "answers", "answer", "rank"), texts,
                                    ranks, higher_is_better=False)
    return _as_kind(preference, kind, "answers")


def read_ultrafeedback(obj: Any, kind: str | None) -> Record:
    """Rated completions, or the binarized form: trl's chosen and rejected with score_chosen and score_rejected."""
    obj = _record(obj, "with instruction and completions")
    if "completions" not in obj and "chosen" in obj:
        scores = [obj.get("score_chosen"), obj.get("score_rejected")]
        preference = read_trl({k: v for k, v in obj.items() if k not in ("score_chosen", "score_rejected")}, None)
        if scores != [None, None]:
            chosen, rejected = (_number(s, k) for s, k in zip(scores, ("score_chosen", "score_rejected")))
            if rejected >= chosen and kind in (None, "preferences"):
                raise FieldError("score_rejected", f"{rejected:g} is not below score_chosen {chosen:g}, so chosen is "
                                                   "not the better one")
            preference.metadata.update(score_chosen=chosen, score_rejected=rejected)
        return _as_kind(preference, kind, "rejected")
    key = "instruction" if "instruction" in obj or "prompt" not in obj else "prompt"
    prompt = _string(_required(obj, key, "the instruction the completions answer"), key)
    completions = _items(obj, "completions", "UltraFeedback records give rated completions")
    score_key = next((k for k in _SCORE_KEYS if completions and k in completions[0]), None)
    if completions and score_key is None:
        raise FieldError("completions[0]", f"no score; expected one of {', '.join(_SCORE_KEYS)}")
    texts = [_string(_item_field(c, "response", f"completions[{i}].response"), f"completions[{i}].response")
             for i, c in enumerate(completions)]
    scores = [_number(_item_field(c, score_key, f"completions[{i}].{score_key}"), f"completions[{i}].{score_key}")
              for i, c in enumerate(completions)]
    preference = _ranked_preference(Dialogue([Turn(prompt)]), obj, (key, "completions", "response", score_key or ""),
                                    texts, scores, higher_is_better=True)
    return _as_kind(preference, kind, "completions")


# --- math-shepherd -------------------------------------------------------------------------------------------


def read_math_shepherd(obj: Any, kind: str | None) -> Record:
    """Math-Shepherd's records: `input` is the question and the steps, each ending with the tag ки, and `label` the
    same text with each tag replaced by + (a good step) or - (a bad one)."""
    obj = _record(obj, "with input and label")
    text = _string(_required(obj, "input", "the question and its steps, each ending with the tag ки"), "input")
    label = _string(_required(obj, "label", "input with each step's tag ки replaced by + or -"), "label")
    pieces = text.split(_STEP_TAG)
    tags = len(pieces) - 1
    if not tags:
        raise FieldError("input", f"no step tag {_STEP_TAG}; Math-Shepherd ends each step with it")
    if len(label) != len(text) - tags * (len(_STEP_TAG) - 1):
        raise FieldError("label", f"{len(label)} characters, but input with each of its {tags} step tags as one + or "
                                  f"- would be {len(text) - tags * (len(_STEP_TAG) - 1)}; label is input with each tag "
                                  "replaced by its step's label")
    spans, labels = [], []  # each step's (start, end) in input, and its label
    start = at = 0  # in input, in label
    for k, piece in enumerate(pieces[:-1]):
        end, at = start + len(piece), at + len(piece)
        if label[at] not in "+-":
            raise FieldError("label", f"expected + or - at character {at + 1}, where input has step {k + 1}'s tag "
                                      f"{_STEP_TAG}, got {label[at]!r}")
        spans.append((start, end))
        labels.append(label[at] == "+")
        start, at = end + len(_STEP_TAG), at + 1
    question_end = _question_end(text, pieces[0])
    kept = [k for k, (_, end) in enumerate(spans) if end > question_end]  # a tag in the question is a slip: dropped
    if not kept:
        raise FieldError("input", f"no step tag {_STEP_TAG} after the question; each step ends with one")
    steps = [text[max(spans[k][0], question_end):spans[k][1]].strip() for k in kept]
    for n, step in enumerate(steps, 1):
        if not step:
            raise FieldError(f"input (step {n})", f"empty; every step needs text before its tag {_STEP_TAG}")
    prompt = Dialogue([Turn(text[:question_end].strip())])
    solution = StepSolution(prompt, steps, [labels[k] for k in kept], _metadata(obj, ("input", "label")),
                            "input (step {n})")
    return _as_kind(solution, kind, "input")


def _question_end(text: str, before_first_tag: str) -> int:
    """Where the question ends: at "Step 1:", else after the first "?" before the first step tag (as TRL's conversion
    of Math-Shepherd splits them)."""
    first = _FIRST_STEP.search(text)
    if first:
        return first.start()
    if "?" in before_first_tag:
        return before_first_tag.index("?") + 1
    raise FieldError("input", f"cannot tell the question from the first step: no \"Step 1:\", and no \"?\" before "
                              f"the first step tag {_STEP_TAG}")


# --- loading and converting ----------------------------------------------------------------------------------

READERS: dict[str, Callable[[Any, str | None], Record]] = {
    "moss": read_moss, "moss-rlhf": read_moss_rlhf, "trl": read_trl, "hh-rlhf": read_hh_rlhf,
    "ultrafeedback": read_ultrafeedback, "nectar": read_nectar, "openai": read_openai,
    "math-shepherd": read_math_shepherd}
"""Each format's reader: a JSON value and a kind (None: the kind the record is) in, a record out, FieldError on bad
input."""


def _kind_of(record: Record) -> str:
    if isinstance(record, Preference):
        return "preferences"
    if isinstance(record, StepSolution):
        return "steps"
    return "prompts" if record.is_prompt else "sft"


def _load(path: str | os.PathLike, kind: str | None, data_format: str,
          step_separator: str = STEP_SEPARATOR) -> tuple[list[Record], str]:
    """The records of a file and their kind (`kind`, or when None the kind most of its first records are); no step of
    a solution in steps may hold `step_separator`."""
    if data_format not in FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; expected one of {', '.join(FORMATS)}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not step_separator:
        raise ValueError("the step separator is empty; steps are joined into the reply with it, so give one, e.g. \\n")
    objects, errors, label = read_source(path)
    sample = [obj for _, obj in objects[:DETECT_SAMPLE]]
    if data_format == "auto":
        data_format = detect_format(sample)
        if data_format is None:
            raise DataFileError([DataError(path, 0, "file", "cannot tell the data format from its first records; "
                                                            f"pass --data-format with one of {', '.join(FORMATS[1:])}"),
                                 *errors])
        if data_format != "moss":
            print(f"{path}: read as {data_format} (detected); pass --data-format to choose", file=sys.stderr)
    read = READERS[data_format]
    if kind is None:
        kinds: Counter[str] = Counter()
        for obj in sample:
            with contextlib.suppress(FieldError):  # a bad record says so below
                kinds[_kind_of(read(obj, None))] += 1
        if kinds:
            kind = max(kinds, key=lambda k: (kinds[k], -KINDS.index(k)))
        else:  # no good record to tell by; the errors come all the same
            kind = {"moss": "sft", "openai": "sft", "math-shepherd": "steps"}.get(data_format, "preferences")
    if data_format == "openai" and kind == "preferences":
        raise DataFileError([DataError(path, 0, "file", "openai records are single conversations with nothing to "
                                                        "rank; read them as sft or prompts, or give preferences in "
                                                        "the trl format (prompt, chosen, rejected)")])
    records, ranks_nothing = [], []
    for number, obj in objects:
        try:
            record = read(obj, kind)
            if isinstance(record, StepSolution):
                record.check_separator(step_separator)
            records.append(record)
        except FieldError as e:
            where = "" if label is None else f" ({label.format(number)})"
            (ranks_nothing if isinstance(e, RanksNothing) else errors).append(
                DataError(path, number, e.field, e.message + where))
    if ranks_nothing and (errors or not records):  # nothing else to train on, or the file is refused anyway
        errors += ranks_nothing
    elif ranks_nothing:
        first = ", ".join(str(e.line) for e in ranks_nothing[:5]) + (", ..." if len(ranks_nothing) > 5 else "")
        print(f"{path}: skipped {len(ranks_nothing)} of {len(objects)} records that rank nothing (all responses tied, "
              f"or the same reply twice): {label.split()[0] + 's' if label else 'lines'} {first}", file=sys.stderr)
    if not errors and not records:
        errors.append(DataError(path, 0, "file", "no records; the file is empty"))
    if errors:
        errors.sort(key=lambda e: e.line)
        raise DataFileError(errors)
    return records, kind


def load(path: str | os.PathLike, kind: str | None, data_format: str = "auto",
         step_separator: str = STEP_SEPARATOR) -> list[Record]:
    """The records of a file of one kind (KINDS: "sft", "prompts", "preferences" or "steps"; None: the kind they are)
    in `data_format` (FORMATS); no step of a solution in steps may hold `step_separator`."""
    return _load(path, kind, data_format, step_separator)[0]


def texts_of(record: Record) -> list[Dialogue]:
    """The dialogues a record holds: itself, a preference's prompt with each of its responses, or a solution's prompt
    with its steps as the reply."""
    if isinstance(record, Preference):
        return [record.prompt.with_reply(r) for r in record.responses]
    return [record.dialogue()] if isinstance(record, StepSolution) else [record]


def convert(in_path: str | os.PathLike, out_path: str | os.PathLike, data_format: str = "auto",
            kind: str | None = None) -> int:
    """`rlhf convert`: write a file of any format as this project's JSONL; the number of records. `kind` None: the
    kind the records are (preferences for a ranking, steps for labelled steps, sft or prompts by whether the last
    turn has a reply)."""
    records, _ = _load(in_path, kind, data_format)
    write_jsonl(out_path, records)
    return len(records)
