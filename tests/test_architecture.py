"""The layering the design card promises, checked on the source: the core imports no Ray and nothing above it, the
packages and the modules inside each import each other without loops, and every config field is read by the command it
belongs to."""
from __future__ import annotations

import ast
import dataclasses
from functools import lru_cache
from pathlib import Path

import pytest

from rlhf import config
from rlhf.commands import COMMANDS

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("rlhf", "reward", "actors")


def _layer(module: str) -> str:
    """The layer a module belongs to: the drivers are a layer of their own above the core, and the command line
    (which picks a driver) one above them."""
    if module in ("rlhf.cli", "rlhf.__main__"):
        return "cli"
    return "rlhf.drivers" if module.startswith("rlhf.drivers") else module.split(".")[0]


@lru_cache(maxsize=None)
def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(p for p in parts if p != "__init__")] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every module an import statement names, at module level or inside a function (`from rlhf import storage`
    names rlhf.storage)."""
    known = _modules()
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & known.keys()
            names |= submodules or {node.module}
    return names


def test_the_core_imports_no_ray_and_nothing_above_it():
    core = {m: p for m, p in _modules().items() if _layer(m) == "rlhf"}
    assert "rlhf.cli" not in core
    assert "rlhf.config" in core and "rlhf.ppo_math" in core
    for module, path in core.items():
        for name in _imports(path):
            assert name.split(".")[0] != "ray", f"{module} imports {name}: the core must run without Ray"
            assert name.split(".")[0] not in PACKAGES or _layer(name) == "rlhf", \
                f"{module} imports {name}, a layer above the core"


def test_the_packages_import_each_other_without_loops():
    edges: dict[str, set[str]] = {}
    for module, path in _modules().items():
        for name in _imports(path):
            if name.split(".")[0] in PACKAGES and _layer(name) != _layer(module):
                edges.setdefault(_layer(module), set()).add(_layer(name))
    assert edges["rlhf.drivers"] >= {"rlhf", "reward", "actors"}

    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ()))
    loops = [layer for layer in edges if reaches(layer, layer)]
    assert not loops, f"import loops through {loops}: {edges}"


def test_the_modules_import_each_other_without_loops():
    """Also through an import inside a function: such a loop hides that neither module can be read, changed or
    imported without the other; the piece both need belongs in a module under them."""
    known = _modules()
    edges = {module: sorted(n for n in _imports(path) if n in known and n != module) for module, path in known.items()}
    loops, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            loops.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module in done:
            return
        for name in edges[module]:
            visit(name, path + [module])
        done.add(module)

    for module in sorted(known):
        visit(module, [])
    assert not loops, "import loops: " + "; ".join(loops)


def _fields(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, field name) of every leaf field of a config dataclass."""
    out = []
    for f in dataclasses.fields(cls):
        kind = config._field_type(cls, f.name)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            out += _fields(kind, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f.name))
    return out


def _reads(trees: list[ast.AST]) -> set[str]:
    """Attribute names read, and string constants (role names reached through getattr), in these trees."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    return names


def _trees(modules: set[str]) -> list[ast.AST]:
    return [ast.parse(_modules()[m].read_text(encoding="utf-8")) for m in modules]


def _derivations() -> list[ast.AST]:
    """The config's `derive`, `role` and `ranks`: what they read, the command reads (its checks do not count)."""
    tree = ast.parse((REPO / "rlhf" / "config.py").read_text(encoding="utf-8"))
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in ("derive", "role", "ranks")]


def _closure(start: str) -> set[str]:
    """The project modules `start` imports, directly or through others (config.py itself left out)."""
    known, todo, seen = _modules(), [start], set()
    while todo:
        module = todo.pop()
        if module in seen or module not in known:
            continue
        seen.add(module)
        todo += [n for n in _imports(known[module]) if n in known]
    return seen - {"rlhf.config"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_config_field_is_read_by_its_command(command):
    driver = COMMANDS[command].runner.split(":")[0]
    reads = _reads(_trees(_closure(driver) | {"rlhf.cli"}) + _derivations())
    unread = [key for key, name in _fields(COMMANDS[command].config) if name not in reads]
    assert not unread, f"rlhf {command} never reads {unread}"
