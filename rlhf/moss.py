"""The MOSS-003 dialogue format: turns, JSON records, rendering, parsing, and tokenization with a loss mask.

Everything that turns a dialogue into text or tokens goes through here, so SFT, the preference model and PPO
agree on which tokens the model writes (see DESIGN.md, "Data").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing transformers is slow; only the type is needed here
    from transformers import PreTrainedTokenizerBase

EOH = "<eoh>"
EOT = "<eot>"
EOC = "<eoc>"
EOR = "<eor>"
EOM = "<eom>"
PAD = "<pad>"
SPECIAL_TOKENS = [EOH, EOT, EOC, EOR, EOM]

HUMAN_TAG = "<|Human|>:"
INNER_THOUGHTS_TAG = "<|Inner Thoughts|>:"
COMMANDS_TAG = "<|Commands|>:"
RESULTS_TAG = "<|Results|>:"
MOSS_TAG = "<|MOSS|>:"

# The plugin model writes an absent segment as this literal text.
NONE_TEXT = "None"

DEFAULT_META_INSTRUCTION = (
    "You are an AI assistant whose name is MOSS.\n"
    "- MOSS is a conversational language model developed by Fudan University.\n"
    "- MOSS is helpful, honest and harmless: it answers as well as it can, says when it is unsure, "
    "and politely declines harmful or unethical requests.\n"
    "- MOSS replies in the language the user writes in, such as English or 中文.\n"
    "Capabilities and tools that MOSS can possess.\n"
)

# The MOSS-003 tool set and the API each tool declares when enabled.
TOOL_APIS = {
    "Web Search": "Search(query)",
    "Calculator": "Calculate(expression)",
    "Equation Solver": "Solve(equation)",
    "Text-to-Image": "Text2Image(description)",
}

_TURN_KEYS = ("human", "inner_thoughts", "commands", "results", "moss")


class FieldError(Exception):
    """A record field is missing or wrong; data.py adds the file path and line."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def build_meta_instruction(tools: dict[str, str | None] | None = None,
                           base: str = DEFAULT_META_INSTRUCTION) -> str:
    """The meta instruction with one line per tool: its API when enabled, `None` meaning disabled."""
    if tools is None:
        tools = {name: None for name in TOOL_APIS}
    if base and not base.endswith("\n"):
        base += "\n"
    lines = [f"- {name}: enabled. API: {api}\n" if api is not None else f"- {name}: disabled.\n"
             for name, api in tools.items()]
    return base + "".join(lines)


@dataclass
class Turn:
    """One exchange: the human's message, optional plugin segments, and MOSS's reply (None in a prompt).

    A turn read from a raw MOSS-003 record keeps each segment's exact source text in `source` (field -> (value it
    was read as, text)), so it renders back byte for byte; a field changed since (a prompt's removed reply, a new
    reply) renders in the MOSS-003 convention instead.
    """

    human: str
    inner_thoughts: str | None = None
    commands: str | None = None
    results: str | None = None
    moss: str | None = None
    source: dict[str, tuple[str | None, str]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_tools(self) -> bool:
        return any(x is not None for x in (self.inner_thoughts, self.commands, self.results))


@dataclass
class Dialogue:
    """A meta instruction and turns; unknown record keys ride along in `metadata`."""

    turns: list[Turn]
    meta_instruction: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def is_prompt(self) -> bool:
        return bool(self.turns) and self.turns[-1].moss is None

    def copy(self) -> Dialogue:
        return Dialogue([dataclasses.replace(t) for t in self.turns], self.meta_instruction, dict(self.metadata))

    def as_prompt(self, plugin: bool = False) -> Dialogue:
        """A copy without the last reply; for the plugin model also without its plugin segments,
        since there the model writes its Inner Thoughts first."""
        out = self.copy()
        last = out.turns[-1]
        last.moss = None
        if plugin:
            last.inner_thoughts = last.commands = last.results = None
        return out

    def with_reply(self, reply: str) -> Dialogue:
        """A copy whose last turn has `reply` as MOSS's answer."""
        out = self.copy()
        out.turns[-1].moss = reply
        return out

    def to_json(self) -> dict:
        turns = [{k: getattr(t, k) for k in _TURN_KEYS if getattr(t, k) is not None} for t in self.turns]
        return {"meta_instruction": self.meta_instruction, "turns": turns, **self.metadata}

    @classmethod
    def from_json(cls, obj: Any) -> Dialogue:
        """Read the structured schema or a raw MOSS-003 SFT record; raises FieldError on bad input."""
        if not isinstance(obj, dict):
            raise FieldError("record", f"expected a JSON object, got {json_type(obj)}")
        if "chat" in obj and "turns" not in obj:
            return _from_raw(obj)
        rest = dict(obj)
        meta = rest.pop("meta_instruction", "")
        if meta is None:
            meta = ""
        if not isinstance(meta, str):
            raise FieldError("meta_instruction", f"expected a string, got {json_type(meta)}")
        if "turns" not in rest:
            raise FieldError("turns", "missing; a dialogue needs a list of turns")
        raw_turns = rest.pop("turns")
        if not isinstance(raw_turns, list):
            raise FieldError("turns", f"expected a list of turns, got {json_type(raw_turns)}")
        if not raw_turns:
            raise FieldError("turns", "empty; a dialogue needs at least one turn")
        turns = [_turn_from_json(t, f"turns[{i}]") for i, t in enumerate(raw_turns)]
        _check_replies(turns, lambda i: f"turns[{i}].moss")
        return cls(turns, meta, rest)


def _turn_from_json(obj: Any, where: str) -> Turn:
    if not isinstance(obj, dict):
        raise FieldError(where, f"expected an object, got {json_type(obj)}")
    for key in obj:
        if key not in _TURN_KEYS:
            raise FieldError(f"{where}.{key}", f"unknown key; a turn has {', '.join(_TURN_KEYS)}")
    if "human" not in obj:
        raise FieldError(f"{where}.human", "missing; every turn needs the human's message")
    values = {}
    for key in _TURN_KEYS:
        value = obj.get(key)
        # null means absent, like `None` in the raw MOSS files; only `human` is required.
        if value is None and key != "human":
            continue
        if not isinstance(value, str):
            raise FieldError(f"{where}.{key}", f"expected a string, got {json_type(value)}")
        values[key] = value
    return Turn(**values)


def _check_replies(turns: list[Turn], where: Any) -> None:
    for i, turn in enumerate(turns[:-1]):
        if turn.moss is None:
            raise FieldError(where(i), "missing; only the last turn may lack MOSS's reply")


_RAW_SEGMENTS = (  # raw key(s), our field, role tag, end token
    (("Human",), "human", HUMAN_TAG, EOH),
    (("Inner Thoughts",), "inner_thoughts", INNER_THOUGHTS_TAG, EOT),
    (("Commands",), "commands", COMMANDS_TAG, EOC),
    (("Tool Responses", "Results"), "results", RESULTS_TAG, EOR),
    (("MOSS",), "moss", MOSS_TAG, EOM),
)


def _from_raw(obj: dict) -> Dialogue:
    rest = dict(obj)
    meta = rest.pop("meta_instruction", "") or ""
    if not isinstance(meta, str):
        raise FieldError("meta_instruction", f"expected a string, got {json_type(meta)}")
    chat = rest.pop("chat")
    num_turns = rest.pop("num_turns", None)
    if not isinstance(chat, dict):
        raise FieldError("chat", f"expected an object of turns, got {json_type(chat)}")
    if not chat:
        raise FieldError("chat", "empty; a dialogue needs at least one turn")
    names = sorted(chat, key=lambda k: int(k.split("_")[-1]) if k.split("_")[-1].isdigit() else -1)
    if num_turns is not None and num_turns != len(names):
        raise FieldError("num_turns", f"says {num_turns} but chat has {len(names)} turns")
    turns = []
    for name in names:
        where = f"chat.{name}"
        raw = chat[name]
        if not isinstance(raw, dict):
            raise FieldError(where, f"expected an object, got {json_type(raw)}")
        values: dict[str, Any] = {"source": {}}
        for keys, attr, tag, end in _RAW_SEGMENTS:
            key = next((k for k in keys if k in raw), keys[0])
            text = _strip_raw(raw.get(key), f"{where}.{key}", tag, end)
            if text is not None:
                values[attr] = text
            if isinstance(raw.get(key), str):
                values["source"][attr] = (text, raw[key])
        if "human" not in values:
            raise FieldError(f"{where}.Human", "missing; every turn needs the human's message")
        turns.append(Turn(**values))
    _check_replies(turns, lambda i: f"chat.{names[i]}.MOSS")
    return Dialogue(turns, meta, rest)


def _strip_raw(value: Any, where: str, tag: str, end: str) -> str | None:
    """`<|Tag|>: text<end>\\n` (or Results' `<|Results|>:\\ntext\\n<eor>\\n`) -> `text`; a null or `None` segment
    is absent."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise FieldError(where, f"expected a string, got {json_type(value)}")
    text = value.strip()
    if not text.startswith(tag):
        raise FieldError(where, f"expected the segment to start with {tag}")
    return _segment_value(text[len(tag):].removesuffix(end))


def _segment_value(text: str, none: bool = True) -> str | None:
    """The value between a tag and its end token: after one space, or between newlines (Results' block form);
    `None` is an absent segment unless none=False."""
    if text.startswith("\n"):
        text = text[1:].removesuffix("\n")
    elif text.startswith(" "):
        text = text[1:]
    return None if none and text == NONE_TEXT else text


# --- rendering -------------------------------------------------------------------------------------------


def results_text(results: str | None) -> str:
    """The Results segment as MOSS-003 writes it: `<|Results|>:\\n{results}\\n<eor>\\n`, or `<|Results|>: None<eor>\\n`
    when there are none (the form of the public MOSS-003 data; one function, so SFT data and plugin rollouts agree)."""
    if results is None or results == NONE_TEXT:
        return f"{RESULTS_TAG} {NONE_TEXT}{EOR}\n"
    return f"{RESULTS_TAG}\n{results}\n{EOR}\n"


_PLUGIN_FIELDS = ("inner_thoughts", "commands", "results")


def _text(turn: Turn, attr: str, made: str) -> str:
    """A segment's source text when the turn was read from a raw record and the field is unchanged, else `made`
    (nothing for a segment the raw record does not have)."""
    if attr not in turn.source:
        return "" if turn.source and getattr(turn, attr) is None else made
    value, text = turn.source[attr]
    return text if value == getattr(turn, attr) else made


def _written(text: str, end: str, keep_newline: bool = False) -> list[tuple[str, bool]]:
    """A segment the model writes: up to its end token (and the newline after it when more model text follows,
    as the newline between Inner Thoughts and Commands); what follows is context."""
    cut = text.rfind(end) + len(end) if end in text else len(text)
    if keep_newline and text.startswith("\n", cut):
        cut += 1
    return [(text[:cut], True), (text[cut:], False)]


def _turn_pieces(turn: Turn, plugin: bool, last: bool) -> list[tuple[str, bool]]:
    """One turn's text as (piece, written by the model) pairs.

    The model writes what it would generate after the prompt convention: with plugin=False a prompt ends
    with `<|MOSS|>:`, so the program writes that tag and the model ` {moss}<eom>`; plugin segments present
    in this mode are model-written from their tag to their end token, Results are written by the program.
    With plugin=True a prompt ends after `<eoh>\\n`, so the model writes the Inner Thoughts and Commands
    tags too, the program the Results, and the model again `<|MOSS|>: {moss}<eom>`. A turn of a raw MOSS-003
    record writes every segment its record has (`None` ones included) in either mode.
    Newlines after an end token are context: generation stops at the end token.
    """
    if turn.moss is None and not last:
        raise ValueError("only the last turn of a dialogue may lack MOSS's reply")
    pieces = [(_text(turn, "human", f"{HUMAN_TAG} {turn.human}{EOH}\n"), False)]
    raw_plugin = any(attr in turn.source for attr in _PLUGIN_FIELDS)
    if plugin and turn.moss is None and not turn.has_tools:
        return pieces  # the plugin model's prompt: it writes its Inner Thoughts next
    if plugin or raw_plugin:
        it, cmd = (x if x is not None else NONE_TEXT for x in (turn.inner_thoughts, turn.commands))
        pieces += _written(_text(turn, "inner_thoughts", f"{INNER_THOUGHTS_TAG} {it}{EOT}\n"), EOT, True)
        pieces += _written(_text(turn, "commands", f"{COMMANDS_TAG} {cmd}{EOC}\n"), EOC)
        pieces.append((_text(turn, "results", results_text(turn.results)), False))
    else:
        if turn.inner_thoughts is not None:
            pieces += _written(f"{INNER_THOUGHTS_TAG} {turn.inner_thoughts}{EOT}\n", EOT, turn.commands is not None)
        if turn.commands is not None:
            pieces += _written(f"{COMMANDS_TAG} {turn.commands}{EOC}\n", EOC)
        if turn.results is not None:
            pieces.append((results_text(turn.results), False))
    if turn.moss is None:
        return pieces + ([] if plugin else [(MOSS_TAG, False)])
    reply = _text(turn, "moss", f"{MOSS_TAG} {turn.moss}{EOM}\n")
    if plugin:  # the plugin model writes the tag itself
        return pieces + _written(reply, EOM)
    tag = len(MOSS_TAG) if reply.startswith(MOSS_TAG) else 0
    return pieces + [(reply[:tag], False)] + _written(reply[tag:], EOM)


def _merge(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Join neighbours with the same flag and drop empty pieces, so tokens split only where the mask does."""
    out: list[tuple[str, bool]] = []
    for text, by_model in pieces:
        if not text:
            continue
        if out and out[-1][1] == by_model:
            out[-1] = (out[-1][0] + text, by_model)
        else:
            out.append((text, by_model))
    return out


def segments(dialogue: Dialogue, plugin: bool = False) -> list[tuple[str, bool]]:
    """The rendered text in consecutive pieces, each flagged True when the model writes it."""
    pieces = [(dialogue.meta_instruction, False)]
    for i, turn in enumerate(dialogue.turns):
        pieces += _turn_pieces(turn, plugin, last=i == len(dialogue.turns) - 1)
    return _merge(pieces)


def render(dialogue: Dialogue, plugin: bool = False) -> str:
    """The dialogue as MOSS-003 text; a prompt ends where the model continues."""
    return "".join(text for text, _ in segments(dialogue, plugin))


def trained_spans(dialogue: Dialogue, plugin: bool = False) -> list[list[int]]:
    """[start, end) character spans of `render(dialogue, plugin)` that the model writes: where SFT puts its loss
    and PPO its actions (the tokens `tokenize_dialogue`'s loss mask covers)."""
    spans, at = [], 0
    for text, by_model in segments(dialogue, plugin):
        if by_model:
            spans.append([at, at + len(text)])
        at += len(text)
    return spans


# --- the chat template: the same text for transformers, vLLM and any server -------------------------------------

CHAT_TEMPLATE = (
    "{%- set plugin = plugin | default(false) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] }}"
    "{%- elif m['role'] == 'user' -%}{{ '<|Human|>: ' + m['content'] + '<eoh>\n' }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set it = m['inner_thoughts'] if m['inner_thoughts'] is defined else none -%}"
    "{%- set cmd = m['commands'] if m['commands'] is defined else none -%}"
    "{%- set res = m['results'] if m['results'] is defined else none -%}"
    "{%- if plugin or it is not none -%}"
    "{{ '<|Inner Thoughts|>: ' + (it if it is not none else 'None') + '<eot>\n' }}{%- endif -%}"
    "{%- if plugin or cmd is not none -%}"
    "{{ '<|Commands|>: ' + (cmd if cmd is not none else 'None') + '<eoc>\n' }}{%- endif -%}"
    "{%- if plugin or res is not none -%}"
    "{%- if res is none or res == 'None' -%}{{ '<|Results|>: None<eor>\n' }}"
    "{%- else -%}{{ '<|Results|>:\n' + res + '\n<eor>\n' }}{%- endif -%}{%- endif -%}"
    "{{ '<|MOSS|>: ' + m['content'] + '<eom>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and not plugin -%}{{ '<|MOSS|>:' }}{%- endif -%}"
)
"""The MOSS-003 format as a Jinja chat template (saved with every tokenizer `rlhf` writes): a system message is the
meta instruction, user and assistant messages are the turns, an assistant message's `inner_thoughts`, `commands` and
`results` are its plugin segments; `plugin=True` (an extra argument of apply_chat_template) renders as the plugin
model writes. For the dialogues of our JSON it gives `render`'s text byte for byte (tests/test_moss.py)."""


def chat_messages(dialogue: Dialogue) -> list[dict]:
    """A dialogue as chat messages for `CHAT_TEMPLATE` (and any OpenAI-style API); a prompt ends with the user's."""
    messages = [{"role": "system", "content": dialogue.meta_instruction}] if dialogue.meta_instruction else []
    for turn in dialogue.turns:
        messages.append({"role": "user", "content": turn.human})
        if turn.moss is not None:
            segments = {k: getattr(turn, k) for k in _PLUGIN_FIELDS if getattr(turn, k) is not None}
            messages.append({"role": "assistant", "content": turn.moss, **segments})
    return messages


# --- parsing ---------------------------------------------------------------------------------------------


def parse(text: str, plugin: bool | None = None) -> Dialogue:
    """Read rendered text back into a Dialogue.

    The meta instruction is everything before the first `<|Human|>:`. A segment whose text is `None` is
    absent unless plugin=False. Fields that contain role tags or end tokens cannot round-trip.
    """
    start = text.find(HUMAN_TAG)
    if start < 0:
        raise ValueError(f"no {HUMAN_TAG} turn in the text")
    reader = _Reader(text, start)
    turns = []
    while not reader.done():
        if turns and turns[-1].moss is None:
            raise ValueError(f"text continues after a turn without a reply at offset {reader.pos}")
        values = {"human": reader.read(f"{HUMAN_TAG} ", EOH, required=True)}
        for attr, tag, end in (("inner_thoughts", INNER_THOUGHTS_TAG, EOT), ("commands", COMMANDS_TAG, EOC),
                               ("results", RESULTS_TAG, EOR)):
            value = reader.read(tag, end)
            values[attr] = None if value is None else _segment_value(value, none=plugin is not False)
        if reader.rest() == MOSS_TAG:  # a plain prompt's ending
            reader.pos = len(text)
        else:
            values["moss"] = reader.read(f"{MOSS_TAG} ", EOM)
        turns.append(Turn(**values))
    return Dialogue(turns, text[:start])


class _Reader:
    def __init__(self, text: str, pos: int) -> None:
        self.text, self.pos = text, pos

    def done(self) -> bool:
        return self.pos >= len(self.text)

    def rest(self) -> str:
        return self.text[self.pos:]

    def read(self, prefix: str, end: str, required: bool = False) -> str | None:
        """Read `{prefix}{value}{end}\\n` at the cursor, or return None when the prefix is not there."""
        if not self.text.startswith(prefix, self.pos):
            if required:
                raise ValueError(f"expected {prefix.strip()!r} at offset {self.pos}")
            return None
        begin = self.pos + len(prefix)
        stop = self.text.find(end, begin)
        if stop < 0:
            raise ValueError(f"{prefix.strip()} at offset {self.pos} has no {end}")
        after = stop + len(end)
        if not self.text.startswith("\n", after):
            raise ValueError(f"expected a newline after {end} at offset {after}")
        self.pos = after + 1
        return self.text[begin:stop]


def plugin_segments(text: str) -> tuple[str, str]:
    """(commands, results) of what a plugin model wrote, with the Results in between: the Commands after the last
    `<|Commands|>:` before `<eoc>` (or, with no tag, what follows its Inner Thoughts, which then fails to parse and
    gets `No result.`), and the Results up to `<eor>`; ("", "") when it wrote no `<eoc>`."""
    if EOC not in text:
        return "", ""
    head, tail = text.split(EOC, 1)
    at = head.rfind(COMMANDS_TAG)
    commands = head[at + len(COMMANDS_TAG):] if at >= 0 else head.rsplit(EOT, 1)[-1]
    at = tail.find(RESULTS_TAG)
    results = tail[at + len(RESULTS_TAG):].split(EOR, 1)[0] if at >= 0 else ""
    return commands.strip(), results.strip()


def split_reply(generated: str) -> str:
    """The reply text from what the model generated after `<|MOSS|>:`, without tags or `<eom>`."""
    text = generated
    if text.lstrip().startswith(MOSS_TAG):  # the plugin model writes the tag itself
        text = text.lstrip()[len(MOSS_TAG):]
    stop = text.find(EOM)
    if stop < 0:
        return text.strip()
    text = text[:stop]
    return text[1:] if text.startswith(" ") else text


# --- tokenization ----------------------------------------------------------------------------------------


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _tokenized_turns(dialogue: Dialogue, tokenizer: PreTrainedTokenizerBase,
                     plugin: bool) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """Meta instruction ids, then (ids, loss mask) per turn; each piece is tokenized on its own so the mask
    boundaries are exact, and turns separately so whole turns can be dropped."""
    meta = _encode(tokenizer, dialogue.meta_instruction)
    turns = []
    for i, turn in enumerate(dialogue.turns):
        ids: list[int] = []
        mask: list[int] = []
        for text, by_model in _merge(_turn_pieces(turn, plugin, last=i == len(dialogue.turns) - 1)):
            piece = _encode(tokenizer, text)
            ids += piece
            mask += [int(by_model)] * len(piece)
        turns.append((ids, mask))
    return meta, turns


def _first_kept_turn(meta: list[int], turns: list[tuple[list[int], list[int]]], max_length: int) -> int:
    """Index of the oldest turn kept when dropping whole turns, oldest first, but never the last one."""
    total = len(meta) + sum(len(ids) for ids, _ in turns)
    first = 0
    while total > max_length and first < len(turns) - 1:
        total -= len(turns[first][0])
        first += 1
    return first


def tokenize_dialogue(dialogue: Dialogue, tokenizer: PreTrainedTokenizerBase, max_length: int,
                      plugin: bool = False) -> dict:
    """`input_ids` and `loss_mask` (1 on model-written tokens) of a whole dialogue.

    Too long a dialogue loses its oldest turns (`turns_dropped`); if the meta instruction and the last
    turn alone are still too long, the end is cut and `truncated` is True. `last_turn_start` is where the last
    turn's tokens begin (what DPO scores is the last reply alone).
    """
    meta, turns = _tokenized_turns(dialogue, tokenizer, plugin)
    first = _first_kept_turn(meta, turns, max_length)
    ids, mask = list(meta), [0] * len(meta)
    for turn_ids, turn_mask in turns[first:]:
        ids += turn_ids
        mask += turn_mask
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "loss_mask": mask[:max_length], "truncated": truncated,
            "turns_dropped": first, "last_turn_start": min(max_length, len(ids) - len(turns[-1][0]))}


def tokenize_prompt(dialogue: Dialogue, tokenizer: PreTrainedTokenizerBase, max_length: int,
                    plugin: bool = False) -> list[int]:
    """Token ids of a prompt, ending where the model continues.

    Oldest turns go first; if still too long, the meta instruction stays and the rest is cut from the
    left, since the model continues the end.
    """
    if not dialogue.is_prompt:
        raise ValueError("tokenize_prompt needs a prompt (last turn without moss); use dialogue.as_prompt()")
    meta, turns = _tokenized_turns(dialogue, tokenizer, plugin)
    if len(meta) >= max_length:
        raise ValueError(f"max_length {max_length} leaves no room after the meta instruction "
                         f"({len(meta)} tokens); raise max_length or shorten the meta instruction")
    first = _first_kept_turn(meta, turns, max_length)
    rest = [tok for turn_ids, _ in turns[first:] for tok in turn_ids]
    room = max_length - len(meta)
    return meta + rest[-room:]
