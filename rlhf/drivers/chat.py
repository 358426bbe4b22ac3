"""`rlhf chat`: talk to a trained model in the terminal, in the MOSS format, with the tools it was trained with.

Each reply is sampled as `rlhf generate` samples (the MOSS-003 chat defaults); the conversation so far is the prompt
of the next reply. A plugin model (one trained with `data.plugin: true`, as the run's config.yaml beside its final/
says) thinks, runs its commands through the configured tools and answers; each segment is shown as it was written.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, TextIO

import yaml

from rlhf.config import load_config
from rlhf.data import write_jsonl
from rlhf.drivers.generate import Replier
from rlhf.generation import reply_text
from rlhf.moss import (COMMANDS_TAG, DEFAULT_META_INSTRUCTION, EOC, EOR, EOT, INNER_THOUGHTS_TAG, NONE_TEXT, RESULTS_TAG,
                       TOOL_APIS, Dialogue, Turn, build_meta_instruction)

HELP = "type a message; /save FILE writes the conversation as a dialogue, /reset starts over, /quit (or Ctrl-D) leaves"


def trained_as_plugin(model: str) -> Optional[bool]:
    """Whether the run that wrote `model` (its final/) trained a plugin model, from the run's config.yaml; None when
    there is none to read."""
    path = os.path.join(os.path.dirname(os.path.abspath(model.rstrip("/"))), "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        data = (yaml.safe_load(f) or {}).get("data") or {}
    return bool(data.get("plugin", False))


def _segment(text: str, tag: str, end: str) -> Optional[str]:
    """The value of one plugin segment in the model's text (None when absent or written as `None`)."""
    at = text.find(tag)
    if at < 0:
        return None
    value = text[at + len(tag):].split(end, 1)[0].strip()
    return None if value in ("", NONE_TEXT) else value


def run_chat(model: str, config: Optional[str], overrides: list[str], plugin: Optional[bool] = None,
             meta_instruction: Optional[str] = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The conversation on stdin/stdout until /quit or the end of input; 0."""
    plugin = trained_as_plugin(model) if plugin is None else plugin
    cfg = load_config("generate", config, overrides + [f"data.plugin={str(bool(plugin)).lower()}"])
    replier = Replier(model, cfg)
    offered = {"Calculator"} | ({"Equation Solver"} if cfg.plugins.solver else set())
    tools = {name: api if name in offered else None for name, api in TOOL_APIS.items()}
    if meta_instruction is None:  # MOSS-003's own, with the tools this session offers for a plugin model
        meta_instruction = build_meta_instruction(tools) if replier.plugin else DEFAULT_META_INSTRUCTION
    kind = f"a plugin model with {', '.join(n for n, api in tools.items() if api)}" if replier.plugin else \
        "a chat model"
    print(f"rlhf chat: {model} ({kind}); {HELP}", file=stdout, flush=True)
    dialogue = Dialogue([], meta_instruction)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt leaves, as Ctrl-D does
            line = ""
        if not line or line.strip() == "/quit":
            print("", file=stdout)
            return 0
        message = line.strip()
        if message == "/reset":
            dialogue = Dialogue([], dialogue.meta_instruction)
            print("(a new conversation)", file=stdout, flush=True)
            continue
        if message.startswith("/save "):
            path = message.removeprefix("/save ").strip()
            if not dialogue.turns:
                print("(nothing to save yet)", file=stdout, flush=True)
                continue
            write_jsonl(path, [dialogue])  # this project's schema: rlhf validate --kind sft, an SFT file
            print(f"(saved {len(dialogue.turns)} turns to {path})", file=stdout, flush=True)
            continue
        if not message:
            continue
        dialogue.turns.append(Turn(human=message))
        out = replier.generate([dialogue])
        tokenizer = replier.tokenizer
        turn = dialogue.turns[-1]
        turn.moss = reply_text(tokenizer, out["response_ids"][0], out["action_mask"][0], replier.eom_id, replier.plugin)
        if replier.plugin:  # what it thought, ran and read, in the words it wrote them
            written = tokenizer.decode(out["response_ids"][0][out["response_mask"][0].bool()].tolist())
            turn.inner_thoughts = _segment(written, INNER_THOUGHTS_TAG, EOT)
            turn.commands = _segment(written, COMMANDS_TAG, EOC)
            turn.results = _segment(written, RESULTS_TAG, EOR)
            for label, value in (("thinks", turn.inner_thoughts), ("runs", turn.commands), ("reads", turn.results)):
                if value is not None:
                    print(f"  ({label}) {' '.join(value.split())}", file=stdout)
        print(f"MOSS> {turn.moss}", file=stdout, flush=True)
