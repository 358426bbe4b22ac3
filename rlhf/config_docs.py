"""`rlhf config COMMAND`: a command's resolved config as YAML, each key under its documentation.

The documentation is the string under each field of the config dataclasses (rlhf/config.py), read from the source,
so what `rlhf config` prints and what the code says are one text.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import typing
from functools import lru_cache
from typing import Any

from rlhf import config as config_module


@lru_cache(maxsize=None)
def field_docs() -> dict[str, dict[str, str]]:
    """Class name -> field name -> the docstring under the field, for every class of rlhf/config.py."""
    tree = ast.parse(inspect.getsource(config_module))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for statement, following in zip(node.body, node.body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                fields[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def doc_of(cls: type, name: str) -> str:
    """A field's documentation, from the class that declares it (or the nearest base that does)."""
    for klass in cls.__mro__:
        text = field_docs().get(klass.__name__, {}).get(name)
        if text:
            return text
    return ""


def _scalar(value: Any) -> str:
    """A value as YAML reads it back: JSON is YAML, and quotes keep `"1e-4"` or `"true"` strings strings."""
    return json.dumps(value, ensure_ascii=False)


def render(cfg: Any, width: int = 100) -> str:
    """The config as YAML that `--config` reads back, each key's documentation above it as comments."""
    lines: list[str] = []

    def comment(text: str, indent: str) -> None:
        if not text:
            return
        for paragraph in (" ".join(p.split()) for p in text.split("\n\n")):  # source line breaks are not the text's
            lines.extend(textwrap.wrap(paragraph, width - len(indent) - 2, initial_indent=f"{indent}# ",
                                       subsequent_indent=f"{indent}# ") or [f"{indent}#"])

    def walk(node: Any, indent: str) -> None:
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            comment(doc_of(type(node), f.name), indent)
            if dataclasses.is_dataclass(hints.get(f.name)):
                doc = (type(value).__doc__ or "").strip()
                if doc and not doc.startswith(type(value).__name__ + "("):  # a class docstring, not dataclass's repr
                    comment(inspect.cleandoc(doc), indent)
                lines.append(f"{indent}{f.name}:")
                walk(value, indent + "  ")
            else:
                lines.append(f"{indent}{f.name}: {_scalar(value)}")

    walk(cfg, "")
    return "\n".join(lines) + "\n"


def run_config(command: str, path: str | None, overrides: list[str]) -> int:
    print(f"# rlhf {command}'s config" + (f" from {path}" if path else " (the defaults)")
          + (f" with {' '.join(overrides)}" if overrides else "") + "; pass a file like this to --config")
    print(render(config_module.load_config(command, path, overrides)), end="")
    return 0
