"""Which config keys the commands read, by their dotted path: the evidence of the exact dead-key check.

Off unless the environment variable RLHF_KEY_READS names a directory (the test suite sets it, `tests/conftest.py`).
Then every config `load_config` returns carries its key path on each section, and a read of a field of a section
from the project's code appends `command:key` to a file of this process in that directory, each key once. Ray
workers inherit the variable and the configs they are sent keep their paths (they travel in the instance's
`__dict__`), so reads on every rank count. What is not a use does not count: the config's own checks, and printing or
saving a config (OmegaConf reads it from its own code; `config.as_dict` is the project's way to a plain dict). A
section copied with `dataclasses.replace` loses its paths: copy one with `replaced`, and a section built from another
with `carry` (or `converted`).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Iterable, Iterator

ENV = "RLHF_KEY_READS"
_PATH = "_key_path"
_PROJECT = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
                 for d in ("rlhf", "actors", "reward"))
_CONFIG = os.path.join(_PROJECT[0], "config.py")
_THIS = os.path.abspath(__file__)
_CONFIG_USES = frozenset({"derive", "role", "ranks", "groups", "layouts", "horizon", "get_key"})
"""The functions of rlhf/config.py whose reads are the command's (its checks and copies are not)."""

_seen: set[str] = set()
_out: Any = None


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def _sections(node: Any, prefix: str) -> Iterator[tuple[Any, str]]:
    """(section, its key path with a trailing dot) of every dataclass in a config tree."""
    yield node, prefix
    for f in dataclasses.fields(node):
        value = node.__dict__.get(f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _sections(value, f"{prefix}{f.name}.")


def watch(classes: Iterable[type]) -> None:
    """Record reads through these config classes' instances, in every process that imports them (a Ray worker too)."""
    if enabled():
        for cls in classes:
            cls.__getattribute__ = _read


def stamp(cfg: Any, command: str) -> None:
    """Give each section of `cfg` its key path (`ppo:roles.policy.`)."""
    if enabled():
        _stamp(cfg, f"{command}:")


def _stamp(cfg: Any, prefix: str) -> None:
    for section, path in _sections(cfg, prefix):
        object.__setattr__(section, _PATH, path)


def carry(new: Any, old: Any) -> Any:
    """`new`, built from `old`'s fields, answers for `old`'s keys."""
    path = old.__dict__.get(_PATH) if dataclasses.is_dataclass(old) else None
    if path is not None:
        _stamp(new, path)
    return new


def converted(section: Any, cls: type) -> Any:
    """`section`'s values as an instance of `cls` (a subclass with defaults for its own fields), answering for the
    same keys; the copy reads none of them."""
    values = object.__getattribute__(section, "__dict__")
    return carry(cls(**{f.name: values[f.name] for f in dataclasses.fields(section)}), section)


def replaced(section: Any, **changes: Any) -> Any:
    """`dataclasses.replace` that keeps the section's key paths."""
    return carry(dataclasses.replace(section, **changes), section)


def _read(self: Any, name: str) -> Any:
    value = object.__getattribute__(self, name)
    if name[0] != "_":
        own = object.__getattribute__(self, "__dict__")
        path = own.get(_PATH)
        if path is not None and name in own and path + name not in _seen and _counts(sys._getframe(1)):
            _record(path + name)
    return value


def _counts(frame: Any) -> bool:
    """A read by the project's code, not by the config's checks, this module or a library. A read inside
    `dataclasses` (`asdict` of the sampling settings handed to `generate`) is its caller's."""
    while frame is not None and frame.f_code.co_filename == dataclasses.__file__:
        frame = frame.f_back
    where = frame.f_code.co_filename if frame is not None else ""
    if where == _THIS or not where.startswith(_PROJECT):
        return False
    return where != _CONFIG or frame.f_code.co_name in _CONFIG_USES


def _record(key: str) -> None:
    global _out
    _seen.add(key)
    if _out is None:
        _out = open(os.path.join(os.environ[ENV], f"{os.getpid()}.keys"), "a", encoding="utf-8")
    _out.write(key + "\n")
    _out.flush()


def collected(directory: str) -> set[str]:
    """Every `command:key` read by any process that wrote into `directory`."""
    keys: set[str] = set()
    for name in os.listdir(directory):
        if name.endswith(".keys"):
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                keys.update(line.strip() for line in f if line.strip())
    return keys
