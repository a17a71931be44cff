"""Outcome verifiers: pluggable ``(prompt, completion, reference) -> reward in [0, 1]`` checks.

A verifier looks at a finished completion and says how right its final answer is. opd
uses verifiers in two places:

* **outcome rewards during distillation** — KDRL (Xu et al., "KDRL: Post-Training
  Reasoning LLMs via Unified Knowledge Distillation and Reinforcement Learning",
  arXiv:2506.02208) adds a verifier (rule-based outcome) reward to the token-level
  knowledge-distillation term, so the student is pulled both toward the teacher's
  distribution and toward answers that check out;
* **evaluation scoring** — accuracy is the mean verifier reward.

Built-ins (select one by name with :func:`resolve_verifier`):

``exact_match``
    whitespace-normalised string equality with the reference.
``numeric``
    the final number of the completion (last ``\\boxed{...}``, else the text after a final
    "answer is" / "Answer:" / "####" marker, else the last number) compared with the
    reference's number by :func:`math.isclose`. Options: ``numeric:abs_tol=0.01,rel_tol=0``.
``math_verify``
    symbolic equivalence through the optional ``math-verify`` package
    (``pip install 'opd[math]'``).

Any ``module:function`` import path whose function returns a ``bool`` or a ``float``
works too. Verifiers never raise on odd model output; they return 0.0.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from opd.errors import ConfigError

Verifier = Callable[[str, str, "str | None"], float]

__all__ = [
    "BUILTIN_VERIFIERS",
    "Verifier",
    "batch_rewards",
    "exact_match",
    "extract_number",
    "math_verify",
    "numeric",
    "resolve_verifier",
]


# ---------------------------------------------------------------------------------------------
# exact_match


def _normalise_ws(text: str) -> str:
    return " ".join(text.split())


def exact_match(prompt: str, completion: str, reference: str | None) -> float:
    """1.0 when the completion equals the reference after stripping and collapsing whitespace."""
    if reference is None:
        return 0.0
    return 1.0 if _normalise_ws(completion) == _normalise_ws(reference) else 0.0


# ---------------------------------------------------------------------------------------------
# numeric

# An unsigned number: 1,234,567 (commas only in groups of three) or 1234, an optional
# decimal part and exponent; or a bare decimal such as .5. Never starts inside another number.
_UNSIGNED = r"(?<![\d.])(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?(?!\d)"
# A leading sign counts only when it is not a binary operator / hyphen after a word ("3-5", "x-1").
_SIGN = r"(?:(?<![\w)\]}])[-+\u2212])?"
_NUMBER_RE = re.compile(rf"(?P<num>{_SIGN}{_UNSIGNED})(?:\s*/\s*(?P<den>{_UNSIGNED}))?")
_SIMPLE = r"\d[\d,]*(?:\.\d+)?"
_LATEX_FRAC_RE = re.compile(rf"\\[dt]?frac\s*\{{\s*({_SIMPLE})\s*\}}\s*\{{\s*({_SIMPLE})\s*\}}")
_MARKER_RE = re.compile(r"answer\s*(?:is\b|:)|####", re.IGNORECASE)
_BOXED = "\\boxed"


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind(_BOXED + "{")
    while start != -1:
        i = start + len(_BOXED) + 1
        depth = 1
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i:j]
        # Unclosed: try an earlier one.
        start = text.rfind(_BOXED + "{", 0, start)
    return None


def _clean(text: str) -> str:
    """Light LaTeX clean-up so that numbers written in LaTeX read as plain numbers."""
    text = text.replace("{,}", ",").replace("\\,", "").replace("\\!", "").replace("\\left", "")
    text = text.replace("\\right", "").replace("\\$", " ").replace("\\%", "%").replace("\u2212", "-")
    return _LATEX_FRAC_RE.sub(r"\1/\2", text)


def _to_float(match: re.Match[str]) -> float | None:
    try:
        value = float(match.group("num").replace(",", "").replace("\u2212", "-"))
        den = match.group("den")
        if den is not None:
            denominator = float(den.replace(",", ""))
            if denominator == 0:
                return None
            value /= denominator
    except (ValueError, OverflowError):
        return None
    return None if math.isnan(value) else value


def _first_number(text: str) -> float | None:
    for match in _NUMBER_RE.finditer(text):
        value = _to_float(match)
        if value is not None:
            return value
    return None


def _last_number(text: str) -> float | None:
    for match in reversed(list(_NUMBER_RE.finditer(text))):
        value = _to_float(match)
        if value is not None:
            return value
    return None


def extract_number(text: str) -> float | None:
    """The final numeric answer in ``text``, or None when there is none.

    Priority: the number inside the last ``\\boxed{...}`` (if a box is present, its content
    is the answer, so a box without a number gives None); else the first number after the
    last "answer is" / "Answer:" / "####" marker; else the last number in the text.
    Thousands separators (``1,234``), signs, decimals, exponents, fractions ``a/b`` and
    ``\\frac{a}{b}`` are understood; percentages are read as the bare number (``50%`` -> 50).
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return _first_number(_clean(boxed))
    markers = list(_MARKER_RE.finditer(text))
    if markers:
        value = _first_number(_clean(text[markers[-1].end() :]))
        if value is not None:
            return value
    return _last_number(_clean(text))


def numeric(
    prompt: str,
    completion: str,
    reference: str | None,
    *,
    abs_tol: float = 1e-6,
    rel_tol: float = 1e-6,
) -> float:
    """1.0 when the completion's final number is close to the reference's final number.

    Both sides go through :func:`extract_number`; closeness is
    ``math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)``. 0.0 when either side has no number.
    """
    if reference is None:
        return 0.0
    got, want = extract_number(completion), extract_number(reference)
    if got is None or want is None:
        return 0.0
    return 1.0 if math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol) else 0.0


# ---------------------------------------------------------------------------------------------
# math_verify (optional dependency)

_MATH_VERIFY_HINT = "pip install 'opd[math]'  (or: pip install math-verify)"


@functools.lru_cache(maxsize=1)
def _load_math_verify() -> tuple[ModuleType, tuple[type[BaseException], ...]]:
    """The ``math_verify`` module and the exceptions to swallow; ConfigError when not installed."""
    try:
        module = importlib.import_module("math_verify")
    except ImportError:
        raise ConfigError(f"verifier 'math_verify' needs the math-verify package: {_MATH_VERIFY_HINT}") from None
    errors: tuple[type[BaseException], ...] = (Exception,)
    try:
        # Its timeout exception derives from BaseException, so `except Exception` would miss it.
        errors += (importlib.import_module("math_verify.errors").TimeoutException,)
    except (ImportError, AttributeError):
        pass
    return module, errors


def math_verify(prompt: str, completion: str, reference: str | None) -> float:
    """1.0 when math-verify judges the completion's answer equivalent to the reference.

    The reference may be a bare answer (``3/4``, ``\\frac{1}{2}``, ``x^2+1``): when it does
    not parse as is, it is retried wrapped in ``$...$``. Any failure inside math-verify on
    odd output gives 0.0. math-verify's timeouts use ``signal.alarm``, which only works in the
    main thread; elsewhere it is called without a timeout.
    """
    module, errors = _load_math_verify()
    if reference is None:
        return 0.0
    timeout: dict[str, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        timeout = {"parsing_timeout": None}
    try:
        gold = module.parse(reference, **timeout) or module.parse("$" + reference + "$", **timeout)
        if not gold:
            return 0.0
        answer = module.parse(completion, **timeout)
        if not answer:
            return 0.0
        verify_timeout = {"timeout_seconds": None} if timeout else {}
        return 1.0 if module.verify(gold, answer, **verify_timeout) else 0.0
    except errors:
        return 0.0


# ---------------------------------------------------------------------------------------------
# resolution from a config string


def _non_negative_float(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"option {name}={text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"option {name}={text!r} must be a finite number >= 0")
    return value


BUILTIN_VERIFIERS: dict[str, Verifier] = {
    "exact_match": exact_match,
    "numeric": numeric,
    "math_verify": math_verify,
}

# Options each built-in accepts: option name -> parser of its value.
_OPTIONS: dict[str, dict[str, Callable[[str, str], Any]]] = {
    "exact_match": {},
    "numeric": {"abs_tol": _non_negative_float, "rel_tol": _non_negative_float},
    "math_verify": {},
}


def _names() -> str:
    return ", ".join(BUILTIN_VERIFIERS)


def _parse_options(spec: str, name: str, text: str) -> dict[str, Any]:
    allowed = _OPTIONS[name]
    options: dict[str, Any] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in allowed:
            accepts = ", ".join(allowed) if allowed else "no options"
            raise ConfigError(f"verifier {spec!r}: unknown option {item!r}; {name} accepts {accepts}")
        try:
            options[key] = allowed[key](key, value)
        except ConfigError as exc:
            raise ConfigError(f"verifier {spec!r}: {exc}") from None
    return options


def _wrap_user(spec: str, func: Callable[..., Any]) -> Verifier:
    """Adapt a user function returning bool / number to a float-returning verifier."""

    @functools.wraps(func)
    def verifier(prompt: str, completion: str, reference: str | None) -> float:
        result = func(prompt, completion, reference)
        if isinstance(result, bool):
            return 1.0 if result else 0.0
        try:
            return float(result)
        except (TypeError, ValueError):
            raise ConfigError(
                f"verifier {spec!r} returned {type(result).__name__}; it must return a bool or a float"
            ) from None

    return verifier


def _import(spec: str) -> Verifier:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"unknown verifier {spec!r}: use one of {_names()} or module:function")
    try:
        obj: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            obj = getattr(obj, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"verifier {spec!r} cannot be imported ({exc}); use one of {_names()} or module:function"
        ) from None
    if not callable(obj):
        raise ConfigError(f"verifier {spec!r} is not callable; use one of {_names()} or module:function")
    return _wrap_user(spec, obj)


def resolve_verifier(spec: str | Verifier) -> Verifier:
    """A verifier from a config string.

    * ``"exact_match"``, ``"numeric"``, ``"math_verify"`` — a built-in;
    * ``"numeric:abs_tol=0.01,rel_tol=0"`` — a built-in with options (``name:key=value,...``;
      the ``=`` is what tells options apart from an import path);
    * ``"package.module:function"`` (or ``module:Class.method``) — a function
      ``(prompt, completion, reference) -> bool | float``; bools become 0.0 / 1.0.

    A callable is returned unchanged. Raises ConfigError for unknown names, bad options,
    failed imports, and for ``math_verify`` when math-verify is not installed.
    """
    if callable(spec):
        return spec
    spec = spec.strip()
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if name in BUILTIN_VERIFIERS and (not sep or not rest.strip() or "=" in rest):
        if name == "math_verify":
            _load_math_verify()  # fail at config time, not mid-training
        options = _parse_options(spec, name, rest) if sep else {}
        base = BUILTIN_VERIFIERS[name]
        if not options:
            return base
        return functools.update_wrapper(functools.partial(base, **options), base)
    if not sep:
        raise ConfigError(f"unknown verifier {spec!r}: use one of {_names()} or module:function")
    return _import(spec)


# ---------------------------------------------------------------------------------------------
# batches


def batch_rewards(
    verifier: Verifier,
    prompts: Sequence[str],
    completions: Sequence[str],
    references: Sequence[str | None] | None,
) -> list[float]:
    """One reward per completion, each clamped to [0, 1]; NaN becomes 0.0.

    ``references=None`` means no reference for any sample.
    """
    refs: Sequence[str | None] = [None] * len(completions) if references is None else references
    if not len(prompts) == len(completions) == len(refs):
        raise ValueError(
            f"batch_rewards: {len(prompts)} prompts, {len(completions)} completions, {len(refs)} references"
        )
    rewards: list[float] = []
    for prompt, completion, reference in zip(prompts, completions, refs):
        value = float(verifier(prompt, completion, reference))
        rewards.append(0.0 if math.isnan(value) else min(1.0, max(0.0, value)))
    return rewards
