"""Synthetic "running sum / running difference" task for the built-in demo.

Task definition
---------------
A prompt is ``NUM_DIGITS`` random decimal digits separated by single spaces and
followed by ``" ="``, e.g. (with 4 digits for brevity)::

    3 4 1 9 =

An answer starts with a *style token* and is followed by ``NUM_DIGITS`` output
digits, all separated by single spaces.  Two styles are valid:

* ``"+"`` -- running sum mod 10: ``y_i = (y_{i-1} + x_i) mod 10`` with ``y_0 = 0``;
* ``"-"`` -- running difference mod 10: ``y_i = (y_{i-1} - x_i) mod 10``.

For the prompt above the two correct answers are ``"+ 3 7 8 7"`` and
``"- 7 3 2 3"``.

Why this task
-------------
* Outputs are long (``NUM_DIGITS + 1`` answer tokens plus ``</s>``) and every
  output digit depends on the previous output digit, so a single early slip
  changes every later digit: a student trained only with teacher forcing is
  exposed to its own mistakes at inference time (exposure bias), which
  on-policy distillation is designed to fix.
* There are two equally valid answer styles.  A teacher trained on both picks
  either one (about 50/50 when sampling), so a student can be right while
  disagreeing with a particular teacher sample; the first generated token
  decides which of the two answers all later tokens must follow.

``NUM_DIGITS`` is fixed at 12 (so every answer has 13 symbols and every prompt
and completion has the same length).  With a fixed length the position of the
input digit that each output step needs is a constant offset, which a tiny
RoPE transformer learns reliably on a CPU in a few minutes.

Sequence format (shared with the rest of ``opd``)::

    prompt_ids     = tok(prompt).input_ids                      # starts with <s>
    completion_ids = tok(answer, add_special_tokens=False).input_ids + [eos]
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

NUM_DIGITS = 12
"""Number of input digits in every prompt (and output digits in every answer)."""

STYLES: tuple[str, ...] = ("+", "-")
"""The two valid answer styles: running sum and running difference (mod 10)."""

ANSWER_LEN = NUM_DIGITS + 1
"""Number of space-separated symbols in a correct answer (style token + digits)."""

N_EVAL = 1000
"""Default number of held-out prompts; training splits exclude this many eval prompts."""


def parse_prompt(prompt: str) -> list[int]:
    """Return the input digits of ``prompt`` (everything before the ``=`` sign)."""
    body = prompt.split("=", 1)[0]
    digits = []
    for sym in body.split():
        if len(sym) != 1 or not sym.isdigit():
            raise ValueError(f"not a task prompt: {prompt!r}")
        digits.append(int(sym))
    return digits


def format_prompt(digits: Sequence[int]) -> str:
    """Format input digits as a prompt string, e.g. ``[3, 4] -> "3 4 ="``."""
    return " ".join(str(d) for d in digits) + " ="


def solve(digits: Sequence[int], style: str) -> str:
    """Return the correct answer string for ``digits`` in ``style`` (``"+"`` or ``"-"``)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    sign = 1 if style == "+" else -1
    y = 0
    out = [style]
    for x in digits:
        y = (y + sign * x) % 10
        out.append(str(y))
    return " ".join(out)


def valid_answers(prompt: str) -> list[str]:
    """All correct answer strings for ``prompt``, one per style, in ``STYLES`` order."""
    digits = parse_prompt(prompt)
    return [solve(digits, style) for style in STYLES]


def _symbols(text: str) -> list[str]:
    return text.split()


def is_correct(prompt: str, completion: str) -> bool:
    """True iff ``completion`` (whitespace-normalised) equals one of the valid answers.

    Whitespace normalisation means runs of whitespace and leading/trailing
    whitespace are ignored; anything else (an extra trailing symbol, a missing
    digit) makes the completion incorrect.
    """
    normalised = " ".join(_symbols(completion))
    return normalised in valid_answers(prompt)


def first_error_position(prompt: str, completion: str) -> int:
    """Number of leading answer symbols of ``completion`` that are correct.

    The completion is split on whitespace into symbols; for each valid answer
    the length of the longest common prefix (in symbols) is computed, and the
    maximum over the valid answers is returned.  Hence:

    * ``0`` -- the very first symbol (the style token) is wrong or missing;
    * ``k`` -- the first ``k`` symbols match some valid answer and symbol
      ``k`` (0-based) is the first mistake (or the completion ends there);
    * ``ANSWER_LEN`` (``NUM_DIGITS + 1``) -- the whole answer is correct.
      Extra symbols *after* a complete correct answer do not lower the value
      (but they do make :func:`is_correct` return False).
    """
    got = _symbols(completion)
    best = 0
    for answer in valid_answers(prompt):
        ref = _symbols(answer)
        k = 0
        while k < len(ref) and k < len(got) and got[k] == ref[k]:
            k += 1
        best = max(best, k)
    return best


def _random_prompt(rng: random.Random, num_digits: int) -> str:
    return format_prompt([rng.randrange(10) for _ in range(num_digits)])


def make_examples(
    n: int,
    seed: int,
    styles: Iterable[str] = STYLES,
    *,
    num_digits: int = NUM_DIGITS,
    exclude: Iterable[str] = (),
) -> list[dict[str, str]]:
    """Make ``n`` examples ``{"prompt", "answer"}``, deterministic given ``seed``.

    Each answer is the correct answer in a style drawn uniformly from
    ``styles``.  Prompts listed in ``exclude`` are never produced (they are
    re-drawn).  Prompts may repeat within the returned list (with 12 digits
    this is astronomically rare).
    """
    styles = tuple(styles)
    if not styles or any(s not in STYLES for s in styles):
        raise ValueError(f"styles must be a non-empty subset of {STYLES}, got {styles}")
    excluded = set(exclude)
    prompt_rng = random.Random(f"opd-demo-prompts-{seed}")
    style_rng = random.Random(f"opd-demo-styles-{seed}")
    examples = []
    while len(examples) < n:
        prompt = _random_prompt(prompt_rng, num_digits)
        if prompt in excluded:
            continue
        style = styles[style_rng.randrange(len(styles))]
        examples.append({"prompt": prompt, "answer": solve(parse_prompt(prompt), style)})
    return examples


def make_splits(
    n_train: int,
    n_eval: int,
    seed: int,
    styles: Iterable[str] = STYLES,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Return ``(train, eval)`` example lists with disjoint prompts.

    The eval prompts depend only on ``(seed, n_eval)`` (not on ``n_train`` or
    ``styles``), so a teacher and a student built with the same seed share
    the same held-out prompts; the eval prompts for a smaller ``n_eval`` are a
    prefix of those for a larger one.  Eval prompts are distinct from each
    other and no eval prompt appears in the training split.
    """
    styles = tuple(styles)
    eval_rng = random.Random(f"opd-demo-eval-{seed}")
    eval_style_rng = random.Random(f"opd-demo-eval-styles-{seed}")
    eval_prompts: list[str] = []
    seen: set[str] = set()
    while len(eval_prompts) < n_eval:
        prompt = _random_prompt(eval_rng, NUM_DIGITS)
        if prompt not in seen:
            seen.add(prompt)
            eval_prompts.append(prompt)
    eval_examples = [
        {"prompt": p, "answer": solve(parse_prompt(p), styles[eval_style_rng.randrange(len(styles))])}
        for p in eval_prompts
    ]
    train = make_examples(n_train, seed, styles, exclude=seen)
    return train, eval_examples


def write_jsonl(examples: Iterable[dict], path: str | Path) -> None:
    """Write examples to ``path`` as JSON lines (one object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
