"""Sorting 48 digits: the demo's headline task, where exposure bias can bite and errors are recoverable.

Task definition
---------------
A prompt is ``NUM_DIGITS`` (48) random decimal digits separated by single spaces and followed by
``" ="``; the answer is the same digits in ascending order::

    3 1 4 1 5 ... =   ->   0 0 0 0 1 1 1 1 1 1 ...

Output position ``t`` is determined by the input and ``t`` alone: it is the ``t``-th smallest
input digit. That is what makes the task the setting of the imitation-learning bounds that
on-policy distillation rests on (DAgger, arXiv 1011.0686; the OPD survey):

* **Errors are recoverable.** After a wrong token, the right token at every later position is
  still defined and still computable from the input, so a policy that acts well from *any* prefix
  exists (the teacher is trained to be one, :mod:`opd.demo.build_teacher`).
* **A shortcut that only holds on clean prefixes.** On a correct prefix the next token is almost
  always the previous output token or the next larger digit, so a small student trained on
  reference prefixes can get most tokens right by counting what it has already written. After its
  own first slip (one digit too many or too few) that count is off, and a prefix-keyed student
  shifts every later run boundary, while a position-keyed one recovers after one token.
* **Long outputs** (48 tokens plus ``</s>``) let a per-token error rate ``eps`` compound: exact
  match is about ``(1 - eps)^48``.

Scores (:func:`token_correct`) compare position by position with the one correct answer, so the
tokens after a first error still count when they are right (the recovery the theory is about).

Sequence format (shared with the rest of ``opd``)::

    prompt_ids     = tok(prompt).input_ids                      # starts with <s>
    completion_ids = tok(answer, add_special_tokens=False).input_ids + [eos]
"""

from __future__ import annotations

import random
from collections.abc import Sequence

NUM_DIGITS = 48
"""Input digits per prompt (and output digits per answer)."""

ANSWER_LEN = NUM_DIGITS
"""Symbols in a correct answer."""

N_EVAL = 1000
"""Held-out prompts reserved by :func:`make_splits` (training prompts never include them)."""


def parse_prompt(prompt: str) -> list[int]:
    """The input digits of ``prompt`` (everything before ``=``)."""
    digits = []
    for sym in prompt.split("=", 1)[0].split():
        if len(sym) != 1 or not sym.isdigit():
            raise ValueError(f"not a sorting prompt: {prompt!r}")
        digits.append(int(sym))
    return digits


def format_prompt(digits: Sequence[int]) -> str:
    """``[3, 1] -> "3 1 ="``."""
    return " ".join(str(d) for d in digits) + " ="


def solve(digits: Sequence[int]) -> str:
    """The correct answer: the digits in ascending order, space-separated."""
    return " ".join(str(d) for d in sorted(digits))


def token_correct(prompt: str, completion: str, reference: str | None = None) -> list[bool]:
    """Per output position, whether the completion's symbol there is the right one.

    One entry per position of the correct answer (``NUM_DIGITS`` for a full-size prompt); a
    completion that stops early is wrong at the missing positions, and symbols beyond the answer's
    length are ignored here (they make :func:`is_correct` false).
    """
    want = solve(parse_prompt(prompt)).split()
    got = completion.split()
    return [i < len(got) and got[i] == w for i, w in enumerate(want)]


def is_correct(prompt: str, completion: str, reference: str | None = None) -> bool:
    """Exact match (whitespace-normalised) with the sorted digits."""
    return " ".join(completion.split()) == solve(parse_prompt(prompt))


def first_error_position(prompt: str, completion: str, reference: str | None = None) -> int:
    """Leading symbols that are right (``NUM_DIGITS`` when the whole answer is)."""
    n = 0
    for ok in token_correct(prompt, completion):
        if not ok:
            break
        n += 1
    return n


def wrong_length(prompt: str, completion: str, reference: str | None = None) -> bool:
    """The task's degenerate answer: not exactly one symbol per input digit (stopped early, or ran
    on). Word 2-gram repetition says nothing here, since a correct sorted answer repeats ``0 0``."""
    return len(completion.split()) != len(parse_prompt(prompt))


def _prompt(rng: random.Random, num_digits: int) -> str:
    return format_prompt([rng.randrange(10) for _ in range(num_digits)])


def make_splits(n_train: int, n_eval: int, seed: int = 0,
                num_digits: int = NUM_DIGITS) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(train, eval)`` rows ``{"prompt", "answer"}`` with disjoint prompts, deterministic in ``seed``.

    The eval prompts depend only on ``(seed, n_eval)``, and a smaller ``n_eval`` gives a prefix of a
    larger one's, so every model built with the same seed shares them.
    """
    eval_rng = random.Random(f"opd-sort-eval-{seed}")
    seen: set[str] = set()
    eval_prompts: list[str] = []
    while len(eval_prompts) < n_eval:
        prompt = _prompt(eval_rng, num_digits)
        if prompt not in seen:
            seen.add(prompt)
            eval_prompts.append(prompt)
    train_rng = random.Random(f"opd-sort-train-{seed}")
    train: list[str] = []
    while len(train) < n_train:
        prompt = _prompt(train_rng, num_digits)
        if prompt not in seen:  # 10^48 prompts: a clash never happens, but the split must be provable
            train.append(prompt)
    rows = lambda prompts: [{"prompt": p, "answer": solve(parse_prompt(p))} for p in prompts]  # noqa: E731
    return rows(train), rows(eval_prompts)
