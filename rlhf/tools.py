"""MOSS-003 plugin tools: the Calculator and Equation Solver, and the registry that runs `<|Commands|>`.

Commands come from a policy being trained, so they are untrusted text: expressions are parsed by a small
recursive-descent parser into sympy objects (never `eval`, never `sympify` on raw input), sizes are bounded, and
every call runs under a timeout. A failed call gives `No result.`, as in MOSS-003 (see DESIGN.md, "Plugins").
"""

from __future__ import annotations

import importlib
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

import sympy

from rlhf.moss import NONE_TEXT, TOOL_APIS

NO_RESULT = "No result."
MAX_INPUT_CHARS = 200
MAX_EXPONENT = 1000
"""Largest |exponent| of a numeric power."""
MAX_DEGREE = 10
"""Largest |exponent| on an expression with variables: higher-degree polynomials make sympy.solve slow."""
MAX_LITERAL_EXP10 = 100
"""Number literals must lie within 1e-100 .. 1e100 in magnitude (or be 0)."""
MAX_DIGITS = 1000
"""No intermediate number may have more decimal digits than this."""
MAX_DEPTH = 60
"""Nesting limit of the parser, far below Python's recursion limit."""
MAX_UNKNOWNS = 5
TOOL_TIMEOUT_S = 2.0


class ToolError(ValueError):
    """A tool cannot answer this input; the registry turns it into `No result.`."""


def call_with_timeout(fn: Callable[[str], str], arg: str, seconds: float) -> str:
    """fn(arg) in a daemon thread; TimeoutError after `seconds`.

    A thread cannot be killed, so a runaway call keeps a core until it finishes; the size bounds of the
    built-in tools are what keep that rare, the timeout only keeps the rollout moving.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(arg)
        except Exception as error:  # carried to the caller's thread and re-raised there
            box["error"] = error

    worker = threading.Thread(target=target, daemon=True, name="rlhf-tool")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"the tool did not answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


# --- expressions: tokenizer and recursive-descent parser --------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z_0-9]*)"
                    r"|(?P<op>\*\*|[-+*/^()=]))")
# Look-alike characters a model (or a Chinese keyboard) writes for the ASCII operators.
_ASCII = str.maketrans({"×": "*", "÷": "/", "−": "-", "（": "(", "）": ")", "＝": "=", "＋": "+"})

FUNCTIONS: dict[str, Callable[[sympy.Expr], sympy.Expr]] = {
    "sqrt": sympy.sqrt, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan,
    "log": sympy.log, "ln": sympy.log, "exp": sympy.exp, "abs": sympy.Abs,
}
CONSTANTS: dict[str, sympy.Expr] = {"pi": sympy.pi, "e": sympy.E}


def _tokenize(text: str) -> list[tuple[str, str]]:
    """(kind, text) tokens; kind is num, name or op."""
    text = text.translate(_ASCII)
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            rest = text[pos:].strip()
            if not rest:
                break
            raise ToolError(f"unexpected character {rest[0]!r}")
        kind = match.lastgroup or "op"
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


def _number(text: str) -> sympy.Rational:
    """An exact rational from a literal, so 0.1 + 0.2 is 0.3, within the literal bounds."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ToolError(f"bad number {text!r}") from None
    if value != 0 and not -MAX_LITERAL_EXP10 <= value.adjusted() <= MAX_LITERAL_EXP10:
        raise ToolError(f"number {text} is out of range (at most 1e{MAX_LITERAL_EXP10})")
    frac = Fraction(value)
    return sympy.Rational(frac.numerator, frac.denominator)


def _log10_abs(value: sympy.Expr) -> float:
    return float(sympy.log(sympy.Abs(value), 10).evalf(15))


def _checked_pow(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    """base ** exponent, refused before sympy builds a number too large to print or a polynomial too large
    to solve."""
    if exponent.is_number:
        if not exponent.is_real:
            raise ToolError("complex exponents are not supported")
        size = abs(float(exponent.evalf(15)))
        if base.free_symbols:
            if size > MAX_DEGREE:
                raise ToolError(f"exponent {exponent} on a variable is above {MAX_DEGREE}")
        else:
            if size > MAX_EXPONENT:
                raise ToolError(f"exponent {exponent} is above {MAX_EXPONENT}")
            if base != 0 and size * abs(_log10_abs(base)) > MAX_DIGITS:
                raise ToolError(f"the result would have more than {MAX_DIGITS} digits")
    return sympy.Pow(base, exponent)


def _apply(name: str, arg: sympy.Expr) -> sympy.Expr:
    if name == "exp" and arg.is_number and arg.is_real and float(arg.evalf(15)) > MAX_DIGITS * math.log(10):
        raise ToolError(f"exp({arg}) would have more than {MAX_DIGITS} digits")
    return FUNCTIONS[name](arg)


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary | implicit unary)*;
    unary := ('-'|'+') unary | power; power := atom (('^'|'**') unary)?; atom := number | name |
    function '(' expr ')' | '(' expr ')'. Power is right-associative and binds tighter than unary minus,
    so -2^2 is -4 and 2^-1 is 1/2, as in mathematics."""

    def __init__(self, tokens: list[tuple[str, str]], variables: bool) -> None:
        self.tokens, self.pos, self.depth, self.variables = tokens, 0, 0, variables

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, op: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise ToolError("the expression ends too early")
        if op is not None and token != ("op", op):
            raise ToolError(f"expected {op!r} but found {token[1]!r}")
        self.pos += 1
        return token

    def at(self, *ops: str) -> bool:
        token = self.peek()
        return token is not None and token[0] == "op" and token[1] in ops

    def expression(self) -> sympy.Expr:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ToolError("the expression is nested too deeply")
        value = self.term()
        while self.at("+", "-"):
            op = self.take()[1]
            right = self.term()
            value = value + right if op == "+" else value - right
        self.depth -= 1
        return value

    def term(self) -> sympy.Expr:
        value = self.unary()
        while True:
            if self.at("*", "/"):
                op = self.take()[1]
                right = self.unary()
                if op == "/":
                    if right == 0:
                        raise ToolError("division by zero")
                    value = value / right
                else:
                    value = value * right
            elif self.peek() is not None and (self.peek()[0] == "name" or self.at("(")):
                value = value * self.unary()  # implicit product: 2x, 3(x+1), 2pi
            else:
                return value

    def unary(self) -> sympy.Expr:
        if self.at("-", "+"):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ToolError("the expression is nested too deeply")
            op = self.take()[1]
            value = self.unary()
            self.depth -= 1
            return -value if op == "-" else value
        return self.power()

    def power(self) -> sympy.Expr:
        base = self.atom()
        if self.at("^", "**"):
            self.take()
            return _checked_pow(base, self.unary())
        return base

    def atom(self) -> sympy.Expr:
        kind, text = self.take()
        if kind == "num":
            return _number(text)
        if kind == "op":
            if text != "(":
                raise ToolError(f"unexpected {text!r}")
            value = self.expression()
            self.take(")")
            return value
        name = text.lower() if text.lower() in FUNCTIONS or text.lower() in CONSTANTS else text
        if name in FUNCTIONS:
            self.take("(")
            value = _apply(name, self.expression())
            self.take(")")
            return value
        if name in CONSTANTS:
            return CONSTANTS[name]
        if not self.variables:
            raise ToolError(f"unknown name {text!r}; the calculator knows {', '.join([*FUNCTIONS, *CONSTANTS])}")
        return sympy.Symbol(name)


def parse_expression(text: str, variables: bool = False) -> sympy.Expr:
    """A sympy expression from arithmetic text; names are variables only when `variables` is True."""
    parser = _Parser(_tokenize(text), variables)
    if not parser.tokens:
        raise ToolError("empty expression")
    value = parser.expression()
    if parser.peek() is not None:
        raise ToolError(f"unexpected {parser.peek()[1]!r}")
    return value


def _check_length(text: str) -> str:
    if len(text) > MAX_INPUT_CHARS:
        raise ToolError(f"input longer than {MAX_INPUT_CHARS} characters")
    return text.strip()


# --- number formatting -------------------------------------------------------------------------------------


def format_number(value: sympy.Expr) -> str:
    """MOSS style: integers without `.0`, other reals rounded to 6 decimals (scientific when tiny or huge)."""
    if isinstance(value, sympy.Integer):
        return str(int(value))
    if value.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        raise ToolError("the result is undefined or infinite")
    number = value.evalf(15)
    if not number.is_real:
        raise ToolError("the result is not a real number")
    f = float(number)
    if not math.isfinite(f):
        raise ToolError("the result is too large")
    if f == int(f) and abs(f) < 1e15:
        return str(int(f))
    if 1e-6 <= abs(f) < 1e15:
        return f"{f:.6f}".rstrip("0").rstrip(".")
    return f"{f:.6g}"


def _format_value(value: sympy.Expr) -> str:
    """A solution value: numbers formatted like the calculator (complex ones as `a + b*I`), anything with
    free variables as sympy prints it."""
    if not value.is_number:
        return str(value)
    if value.is_real:
        return format_number(value)
    real, imag = (part.evalf(15) for part in value.as_real_imag())
    imag_text = "I" if abs(float(imag)) == 1.0 else f"{format_number(abs(imag))}*I"
    if float(real) == 0.0:
        return ("-" if imag < 0 else "") + imag_text
    return f"{format_number(real)} {'-' if imag < 0 else '+'} {imag_text}"


# --- built-in tools ----------------------------------------------------------------------------------------


def _calculate(expression: str) -> str:
    return format_number(parse_expression(_check_length(expression)))


def calculator(expression: str) -> str:
    """`Calculate("2+3")` -> `5`; raises ToolError (or TimeoutError) when it cannot answer."""
    return call_with_timeout(_calculate, expression, TOOL_TIMEOUT_S)


def _solution_key(solution: dict) -> tuple:
    values = []
    for _, value in sorted(solution.items(), key=lambda kv: str(kv[0])):
        values.append(float(value.evalf(15)) if value.is_number and value.is_real else math.inf)
    return tuple(values), str(solution)


def _solve(equations: str) -> str:
    parts = [p for p in re.split(r"[,;\n]", _check_length(equations)) if p.strip()]
    if not parts:
        raise ToolError("no equation given")
    exprs, symbols = [], set()
    for part in parts:
        sides = part.split("=")
        if len(sides) > 2:
            raise ToolError(f"{part.strip()!r} has more than one '='")
        left = parse_expression(sides[0], variables=True)
        right = parse_expression(sides[1], variables=True) if len(sides) == 2 else sympy.Integer(0)
        # Unknowns are the names written, so x = x + 1 still has one (and no solution).
        symbols |= left.free_symbols | right.free_symbols
        exprs.append(left - right)
    unknowns = sorted(symbols, key=str)
    if not unknowns:
        raise ToolError("no variable to solve for")
    if len(unknowns) > MAX_UNKNOWNS:
        raise ToolError(f"more than {MAX_UNKNOWNS} unknowns")
    # A single equation goes in alone: the list form drops roots sympy can only give as CRootOf.
    solutions = sympy.solve(exprs[0] if len(exprs) == 1 else exprs, unknowns, dict=True)
    if not solutions:
        return "No solution."
    lines = []
    for solution in sorted(solutions, key=_solution_key):
        lines.append(", ".join(f"{var} = {_format_value(solution[var])}"
                               for var in unknowns if var in solution))
    return " or ".join(lines)


def solver(equations: str) -> str:
    """`Solve("x^2=4")` -> `x = -2 or x = 2`; equations separated by `,` or `;` form a system."""
    return call_with_timeout(_solve, equations, TOOL_TIMEOUT_S)


# default_registry's `solver` flag shadows the function's name inside it.
_solver = solver


# --- the registry ------------------------------------------------------------------------------------------


@dataclass
class Tool:
    """One plugin: its name in the meta instruction, the API line it declares, its command name, and the
    function that takes the argument string and returns the result text (raising on failure)."""

    name: str
    api: str
    fn: Callable[[str], str]
    command: str


# One command a line, `Name("argument")`; single quotes are accepted, the argument may contain quotes.
_COMMAND = re.compile(r"""^\s*([A-Za-z_][A-Za-z_0-9]*)\(\s*(["'])(.*)\2\s*\)\s*$""")


def parse_command(line: str) -> tuple[str, str] | None:
    """(command, argument) of one command line, or None when it is not `Name("arg")`."""
    match = _COMMAND.match(line)
    return (match.group(1), match.group(3)) if match else None


class ToolRegistry:
    """The tools a plugin policy may call, keyed by command name."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.tools: dict[str, Tool] = {}
        self.timeout = timeout
        """Seconds any one call may take, a backstop for user tools without their own limit."""

    def register(self, tool: Tool) -> Tool:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*", tool.command):
            raise ValueError(f"tool command {tool.command!r} must be an identifier like Calculate")
        self.tools[tool.command] = tool
        return tool

    def register_tool(self, name: str, api: str, command: str, fn: Callable[[str], str]) -> Tool:
        """The documented way to add a tool, e.g. Web Search:
        `registry.register_tool("Web Search", "Search(query)", "Search", my_search)`."""
        return self.register(Tool(name=name, api=api, fn=fn, command=command))

    def get(self, command: str) -> Tool | None:
        return self.tools.get(command)

    def meta_tools(self) -> dict[str, str | None]:
        """Tool name -> API when enabled, None when disabled: the MOSS-003 tools in their order, then any
        others; the argument of `moss.build_meta_instruction`."""
        enabled = {tool.name: tool.api for tool in self.tools.values()}
        out: dict[str, str | None] = {name: enabled.get(name) for name in TOOL_APIS}
        out.update({name: api for name, api in enabled.items() if name not in out})
        return out

    def run_command(self, line: str) -> str:
        """One result line: `Calculate("2+3") => 5`, or `No result.` on any failure."""
        parsed = parse_command(line)
        if parsed is None:
            return NO_RESULT
        command, arg = parsed
        tool = self.get(command)
        if tool is None:
            return NO_RESULT
        try:
            result = call_with_timeout(tool.fn, arg, self.timeout)
        except Exception:  # any tool failure, including TimeoutError, is `No result.` to the model
            return NO_RESULT
        if not isinstance(result, str) or not result.strip():
            return NO_RESULT
        return f'{command}("{arg}") => {result}'

    def run_commands(self, commands_text: str) -> str:
        """The Results text of a Commands segment: one line per command line; `None` gives `None`."""
        text = commands_text.strip()
        if text == NONE_TEXT:
            return NONE_TEXT
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            return NO_RESULT
        return "\n".join(self.run_command(line) for line in lines)


def default_registry(solver: bool = True) -> ToolRegistry:
    """Calculator and (optionally) Equation Solver; Web Search and Text-to-Image stay disabled until a user
    registers a function for them."""
    registry = ToolRegistry()
    registry.register_tool("Calculator", TOOL_APIS["Calculator"], "Calculate", calculator)
    if solver:
        registry.register_tool("Equation Solver", TOOL_APIS["Equation Solver"], "Solve", _solver)
    return registry


def build_registry(tools: list[str], solver: bool = True, timeout: float = 5.0) -> ToolRegistry:
    """The registry of a run: the built-in tools, then each `module:function` in `tools` called with the registry
    to register its own (e.g. a Web Search that calls the user's search service)."""
    registry = default_registry(solver)
    registry.timeout = timeout
    for path in tools:
        module_name, _, attr = path.partition(":")
        try:
            register = getattr(importlib.import_module(module_name), attr) if module_name and attr else None
        except (ImportError, AttributeError) as err:
            raise ToolError(f"plugins.tools: {path}: cannot import it ({' '.join(str(err).split())})") from None
        if not callable(register):
            raise ToolError(f"plugins.tools: {path}: expected module:function, a function taking the ToolRegistry")
        register(registry)
    return registry
