"""The MOSS-003 tools: exact calculator and solver answers, refusal of unsafe or unbounded input, the registry's
result lines, and the verifiable rewards built on them."""
from __future__ import annotations

import time

import pytest

from rlhf.moss import build_meta_instruction
from reward.rules import answer_reward, command_well_formed, final_number
from rlhf.tools import NO_RESULT, ToolError, ToolRegistry, calculator, default_registry, solver


@pytest.mark.parametrize("expression, expected", [
    ("2+3", "5"), ("2^10", "1024"), ("(1+2)*3/4", "2.25"), ("sqrt(16)", "4"), ("2**3", "8"),
    ("-2^2", "-4"), ("2^-1", "0.5"), ("1/3", "0.333333"), ("0.1+0.2", "0.3"), ("52 × 7", "364"),
    ("abs(-3.5)", "3.5"), ("2pi", "6.283185"), ("cos(0)", "1"),
])
def test_calculator_answers_exactly_like_moss(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression", [
    "__import__('os')", "__import__(\"os\").system(\"ls\")", "().__class__", "9**9**9", "(2^1000)^1000",
    "1e101", "exp(exp(exp(100)))", "1/0", "log(0)", "sqrt(-1)", "x+1", "2+", "1+" * 150 + "1",
    "(" * 80 + "1" + ")" * 80,
])
def test_calculator_refuses_unsafe_or_unbounded_input_quickly(expression):
    start = time.monotonic()
    with pytest.raises(ToolError):
        calculator(expression)
    assert time.monotonic() - start < 2.0  # refused by a bound, not by the timeout


@pytest.mark.parametrize("equations, expected", [
    ("x+2=5", "x = 3"), ("x^2=4", "x = -2 or x = 2"), ("x+y=3, x-y=1", "x = 2, y = 1"),
    ("x+y=3; x-y=1", "x = 2, y = 1"), ("2x+3=7", "x = 2"), ("x = x + 1", "No solution."),
])
def test_solver_solves_equations_and_systems(equations, expected):
    assert solver(equations) == expected


def test_solver_bounds_the_degree():
    with pytest.raises(ToolError, match=r"^exponent 500 on a variable is above \d+$"):
        solver("x^500 = 1")


def test_registry_writes_one_result_line_per_command():
    tools = default_registry()
    results = tools.run_commands('Calculate("2+3")\nSolve(\'x+2=5\')\nCalculate(2+3)\nSearch("cats")\n'
                                 'Calculate("1/0")')
    assert results.splitlines() == ['Calculate("2+3") => 5', 'Solve("x+2=5") => x = 3',
                                    NO_RESULT, NO_RESULT, NO_RESULT]
    assert tools.run_commands("None") == "None"
    assert tools.run_commands("") == NO_RESULT


def test_a_user_tool_is_registered_and_a_failing_or_slow_one_gives_no_result():
    tools = ToolRegistry(timeout=0.2)
    tools.register_tool("Web Search", "Search(query)", "Search", lambda q: f"{len(q)} hits")
    tools.register_tool("Text-to-Image", "Text2Image(description)", "Text2Image", lambda d: 1 / 0)
    tools.register_tool("Sleeper", "Sleep(s)", "Sleep", lambda s: time.sleep(float(s)) or "woke")
    assert tools.run_commands('Search("cats")') == 'Search("cats") => 4 hits'
    assert tools.run_commands('Text2Image("a cat")') == NO_RESULT
    assert tools.run_commands('Sleep("2")') == NO_RESULT


def test_meta_instruction_lists_enabled_and_disabled_tools():
    meta = build_meta_instruction(default_registry(solver=False).meta_tools())
    assert "- Calculator: enabled. API: Calculate(expression)\n" in meta
    assert "- Web Search: disabled.\n" in meta
    assert "- Equation Solver: disabled.\n" in meta
    assert "- Text-to-Image: disabled.\n" in meta


def test_final_number_and_answer_reward():
    assert final_number("The result of 52-7 is 45.") == "45"
    assert final_number("It is -3.5") == "-3.5"
    assert final_number("about 1,024 apples") == "1024"
    assert final_number("no digits here") is None
    assert answer_reward({"answer": "45"}, "52-7=45。") == 1.0
    assert answer_reward({"answer": 45}, "It is 45.0") == 1.0
    assert answer_reward({"answer": "45"}, "It is 46") == 0.0
    assert answer_reward({"answer": "45"}, "I do not know") == 0.0
    assert answer_reward({}, "45") == 0.0


def test_command_well_formed():
    assert command_well_formed('Calculate("1+1")') == 1.0
    assert command_well_formed("None") == 1.0
    assert command_well_formed('Calculate("1+1")\nSearch("x")') == 0.0
    assert command_well_formed("Calculate(1+1)") == 0.0
