"""Outcome verifiers: built-ins, number extraction, config-string resolution, batching."""

from __future__ import annotations

import math
import sys
import threading
from pathlib import Path

import pytest

from opd import verifiers
from opd.errors import ConfigError
from opd.verifiers import batch_rewards, exact_match, extract_number, numeric, resolve_verifier

# --------------------------------------------------------------------------------------------- exact_match


def test_exact_match_normalises_whitespace() -> None:
    assert exact_match("p", "  the   cat\n sat ", "the cat sat") == 1.0
    assert exact_match("p", "the\tcat sat", "the cat  sat\n") == 1.0
    assert exact_match("p", "the cat", "the dog") == 0.0
    assert exact_match("p", "thecat", "the cat") == 0.0
    assert exact_match("p", "anything", None) == 0.0
    assert isinstance(exact_match("p", "a", "a"), float)


# --------------------------------------------------------------------------------------------- numeric


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the result is \\boxed{42}", 42.0),
        ("first 7, then \\boxed{3} and finally \\boxed{12} later 99", 12.0),
        ("\\boxed{\\frac{1}{2}}", 0.5),
        ("x = \\boxed{-\\dfrac{3}{4}}", -0.75),
        ("The answer is 1,234.5", 1234.5),
        ("The answer is 1,234.5. We checked 17 cases.", 1234.5),
        ("Answer: -17 (after 3 steps)", -17.0),
        ("Natalia sold 48 clips.\n#### 72", 72.0),
        ("The temperature fell to -12 degrees", -12.0),
        ("so 3-5 gives", 5.0),  # a hyphen between numbers is not a sign
        ("3/4", 0.75),
        ("0.75", 0.75),
        ("about 50%", 50.0),  # percentages are not converted
        ("total $1,234,567.89", 1234567.89),
        ("1e3", 1000.0),
        ("no digits here", None),
        ("\\boxed{x+y}", None),  # a box is the answer; a non-numeric box has no number
        ("1/0", None),
    ],
)
def test_extract_number(text: str, expected: float | None) -> None:
    got = extract_number(text)
    if expected is None:
        assert got is None
    else:
        assert got is not None and math.isclose(got, expected)


def test_numeric_matches_across_formats() -> None:
    assert numeric("p", "Adding up, \\boxed{1,234}", "1234") == 1.0
    assert numeric("p", "The answer is 1,234.5", "#### 1234.5") == 1.0
    assert numeric("p", "We end at -3.", "-3") == 1.0
    assert numeric("p", "We end at 3.", "-3") == 0.0
    assert numeric("p", "\\boxed{3/4}", "0.75") == 1.0
    assert numeric("p", "The answer is 3/4", "0.75") == 1.0
    assert numeric("p", "\\boxed{\\frac{3}{4}}", "3/4") == 1.0
    assert numeric("p", "The answer is 2/3", "0.75") == 0.0


def test_numeric_tolerance() -> None:
    assert numeric("p", "3.1415926", "3.14159265") == 1.0  # within default rel_tol 1e-6
    assert numeric("p", "3.14", "3.14159265") == 0.0
    assert numeric("p", "3.14", "3.14159265", abs_tol=0.01) == 1.0
    assert numeric("p", "3.1", "3.14159265", abs_tol=0.01) == 0.0
    assert numeric("p", "105", "100", abs_tol=0, rel_tol=0.1) == 1.0
    assert numeric("p", "115", "100", abs_tol=0, rel_tol=0.1) == 0.0


def test_numeric_without_a_number_is_zero() -> None:
    assert numeric("p", "I do not know", "42") == 0.0
    assert numeric("p", "42", "forty-two") == 0.0
    assert numeric("p", "42", None) == 0.0
    assert numeric("p", "", "") == 0.0


# --------------------------------------------------------------------------------------------- resolve_verifier


def test_resolve_builtins() -> None:
    assert resolve_verifier("exact_match") is exact_match
    assert resolve_verifier(" numeric ") is numeric
    assert resolve_verifier("numeric:") is numeric
    custom = lambda p, c, r: 1.0  # noqa: E731
    assert resolve_verifier(custom) is custom


def test_resolve_builtin_with_options() -> None:
    loose = resolve_verifier("numeric:abs_tol=0.01,rel_tol=0")
    assert loose("p", "3.14", "3.14159") == 1.0
    assert loose("p", "3.1", "3.14159") == 0.0
    assert resolve_verifier("numeric")("p", "3.14", "3.14159") == 0.0
    spaced = resolve_verifier("numeric: rel_tol = 0.5 ")
    assert spaced("p", "140", "100") == 1.0


@pytest.mark.parametrize(
    "spec",
    [
        "numeric:tolerance=0.1",  # unknown option
        "numeric:abs_tol=abc",  # not a number
        "numeric:abs_tol=-1",  # negative
        "numeric:abs_tol=nan",
        "exact_match:foo=1",  # exact_match has no options
    ],
)
def test_resolve_bad_options(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_verifier(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "spec",
    ["nope", "", "exactmatch", "no_such_module_xyz:check", "math:no_such_function", "math:", ":f", "math:pi"],
)
def test_resolve_unknown_raises_config_error_listing_builtins(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_verifier(spec)
    message = str(info.value)
    assert "\n" not in message
    for name in ("exact_match", "numeric", "math_verify"):
        assert name in message


def test_resolve_module_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards_mod.py").write_text(
        "def contains(prompt, completion, reference):\n"
        "    return reference in completion\n"
        "def half(prompt, completion, reference):\n"
        "    return 0.5\n"
        "def broken(prompt, completion, reference):\n"
        "    return 'yes'\n"
        "class Checks:\n"
        "    @staticmethod\n"
        "    def always(prompt, completion, reference):\n"
        "        return True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards_mod", raising=False)

    contains = resolve_verifier("my_rewards_mod:contains")
    assert contains("p", "it is 42!", "42") == 1.0
    assert contains("p", "it is 41!", "42") == 0.0
    assert isinstance(contains("p", "42", "42"), float)
    assert contains.__name__ == "contains"
    assert resolve_verifier("my_rewards_mod:half")("p", "c", "r") == 0.5
    assert resolve_verifier("my_rewards_mod:Checks.always")("p", "c", None) == 1.0
    with pytest.raises(ConfigError):
        resolve_verifier("my_rewards_mod:broken")("p", "c", "r")
    with pytest.raises(ConfigError):
        resolve_verifier("my_rewards_mod:missing")


# --------------------------------------------------------------------------------------------- batch_rewards


def test_batch_rewards_clamps_and_cleans_nan() -> None:
    values = iter([1.5, -0.2, float("nan"), 0.25, float("inf")])
    verifier = lambda p, c, r: next(values)  # noqa: E731
    assert batch_rewards(verifier, ["p"] * 5, ["c"] * 5, [None] * 5) == [1.0, 0.0, 0.0, 0.25, 1.0]


def test_batch_rewards_with_builtins() -> None:
    rewards = batch_rewards(
        resolve_verifier("numeric"),
        ["q1", "q2", "q3"],
        ["\\boxed{4}", "The answer is 5", "no idea"],
        ["4", "6", "7"],
    )
    assert rewards == [1.0, 0.0, 0.0]
    assert batch_rewards(exact_match, ["p", "q"], ["a", "b"], None) == [0.0, 0.0]
    with pytest.raises(ValueError):
        batch_rewards(exact_match, ["p"], ["a", "b"], ["a", "b"])


# --------------------------------------------------------------------------------------------- math_verify


@pytest.fixture
def no_math_verify(monkeypatch: pytest.MonkeyPatch):
    verifiers._load_math_verify.cache_clear()
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    yield
    verifiers._load_math_verify.cache_clear()


def test_math_verify_missing_package_is_a_config_error(no_math_verify: None) -> None:
    with pytest.raises(ConfigError, match=r"pip install 'opd\[math\]'") as info:
        resolve_verifier("math_verify")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        verifiers.math_verify("p", "\\boxed{1}", "1")


def test_math_verify() -> None:
    pytest.importorskip("math_verify")
    verify = resolve_verifier("math_verify")
    assert verify("p", "\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert verify("p", "So the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}") == 1.0
    assert verify("p", "\\boxed{\\frac{3}{4}}", "3/4") == 1.0
    assert verify("p", "\\boxed{x^2+1}", "x^2+1") == 1.0  # bare reference only parses inside $...$
    assert verify("p", "\\boxed{\\frac{1}{3}}", "0.5") == 0.0
    assert verify("p", "\\boxed{2}", "3") == 0.0
    assert verify("p", "no answer at all", "3") == 0.0
    assert verify("p", "\\boxed{2}", None) == 0.0
    assert verify("p", "\\boxed{\\frac{1}{", "0.5") == 0.0  # malformed LaTeX: 0.0, no exception
    assert verify("p", "}}}\\\\$$\\left(" * 50, "0.5") == 0.0


def test_math_verify_swallows_internal_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    module = pytest.importorskip("math_verify")

    def boom(*args: object, **kwargs: object) -> object:
        raise RuntimeError("parser exploded")

    monkeypatch.setattr(module, "parse", boom)
    assert verifiers.math_verify("p", "\\boxed{1}", "1") == 0.0
    try:
        timeout_exc = __import__("math_verify.errors", fromlist=["TimeoutException"]).TimeoutException
    except (ImportError, AttributeError):
        return

    def slow(*args: object, **kwargs: object) -> object:
        raise timeout_exc("Operation timed out!")

    monkeypatch.setattr(module, "parse", slow)
    assert verifiers.math_verify("p", "\\boxed{1}", "1") == 0.0


def test_math_verify_in_a_worker_thread() -> None:
    pytest.importorskip("math_verify")
    results: list[float] = []
    thread = threading.Thread(
        target=lambda: results.extend(
            [verifiers.math_verify("p", "\\boxed{\\frac{1}{2}}", "0.5"), verifiers.math_verify("p", "\\boxed{2}", "3")]
        )
    )
    thread.start()
    thread.join()
    assert results == [1.0, 0.0]
