"""Evaluation: accuracy, teacher-student divergence on student samples, first-error positions,
per-position accuracy and recovery after the first error, answer length and degeneration.

The first-error position is the exposure-bias picture: how far along its own
output the student gets before it first leaves every correct answer. Its survival
curve ``curve[k]`` = fraction of samples still correct after ``k`` words.

With a per-position scorer (``token_correct``) evaluation also reports what the
imitation-learning bounds are about (DAgger, arXiv 1011.0686): per-token accuracy at
every output position (errors that compound make it fall with the position) and the
*recovery curve*, the accuracy ``d`` tokens after the first error (a policy that can act
from its own wrong prefixes gets these right again; one that only knows clean prefixes
does not).

Degeneration is measured, not assumed away: every mode reports the mean answer length
in words and the share of degenerate answers (default: some word 2-gram occurs three or
more times, the "A.A.A." collapse that reverse KL on the student's own samples can reward).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from opd import divergences
from opd.data import Example
from opd.errors import ConfigError
from opd.models import completion_logits
from opd.rollout import SamplingParams, build_batch, hf_generate

Scorer = Callable[[str, str, "str | None"], bool]
FirstError = Callable[[str, str, "str | None"], int]
TokenCorrect = Callable[[str, str, "str | None"], "list[bool]"]
Degenerate = Callable[[str, str, "str | None"], bool]


def repetitive(prompt: str, completion: str, reference: str | None = None, *, n: int = 2, times: int = 3) -> bool:
    """True when some word ``n``-gram occurs ``times`` or more times in the completion (words are
    whitespace-separated; "A.A.A." is one word, so it is caught by :func:`degenerate_text`)."""
    words = completion.split()
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return True
    return False


def degenerate_text(prompt: str, completion: str, reference: str | None = None) -> bool:
    """The default degenerate-answer test: an empty answer, a repeated word 2-gram (3+ times), or a
    word that is one short piece repeated 3+ times (``A.A.A.``, ``lalala``)."""
    if not completion.strip():
        return True
    if repetitive(prompt, completion, reference):
        return True
    for word in completion.split():
        for size in range(1, 5):
            piece = word[:size]
            # a piece with a letter: "..." and "000" are ordinary words
            if (len(word) >= 3 * size and any(c.isalpha() for c in piece)
                    and word == piece * (len(word) // size) + piece[: len(word) % size]):
                return True
    return False


def exact_match(prompt: str, completion: str, reference: str | None) -> bool:
    """Whitespace-normalised string equality with the reference."""
    if reference is None:
        return False
    return " ".join(completion.split()) == " ".join(reference.split())


def first_error_vs_reference(prompt: str, completion: str, reference: str | None) -> int:
    """Words of the completion that match the reference before the first difference."""
    if reference is None:
        return 0
    ref_words, out_words = reference.split(), completion.split()
    n = 0
    for a, b in zip(ref_words, out_words):
        if a != b:
            break
        n += 1
    return n


def _resolve(spec: str, builtin: dict[str, Callable[..., Any]], what: str) -> Callable[..., Any]:
    if spec in builtin:
        return builtin[spec]
    if ":" not in spec:
        raise ConfigError(f"eval.{what}={spec!r}: use {' or '.join(builtin)} or module:function")
    module_name, func_name = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"eval.{what}={spec!r} cannot be imported: {exc}") from None


def resolve_scorer(spec: str) -> Scorer:
    """Any verifier of :mod:`opd.verifiers` (exact_match, numeric, math_verify, module:function);
    a completion counts as correct when its reward is 1."""
    from opd.verifiers import resolve_verifier

    try:
        verifier = resolve_verifier(spec)
    except ConfigError as exc:
        raise ConfigError(f"eval.scorer: {exc}") from None
    return lambda prompt, completion, reference: float(verifier(prompt, completion, reference)) >= 1.0


def resolve_first_error(spec: str) -> FirstError:
    return _resolve(spec, {"reference": first_error_vs_reference}, "first_error")


def resolve_callable(spec: str, what: str) -> Callable[..., Any]:
    """``module:function`` -> the function, or a one-line :class:`ConfigError` naming ``what``."""
    if ":" not in spec:
        raise ConfigError(f"{what}={spec!r}: use module:function")
    return _resolve(spec, {}, what)


def survival_curve(positions: list[int], length: int) -> list[float]:
    """``curve[k]`` = fraction of samples whose first error is after word ``k``."""
    if not positions:
        return []
    return [sum(1 for p in positions if p > k) / len(positions) for k in range(length)]


def position_curves(correct: list[list[bool]]) -> dict[str, Any]:
    """Per-token scores of a set of answers, each a list of per-position booleans.

    Returns ``token_accuracy`` (all positions pooled), ``position_accuracy[t]`` (over answers that
    have a position ``t``), ``recovery`` (accuracy of every token after an answer's first error,
    pooled over answers with an error; None when no answer has one) and ``recovery_curve[d - 1]``
    (accuracy ``d`` tokens after the first error).
    """
    length = max((len(c) for c in correct), default=0)
    pooled = sum(len(c) for c in correct)
    hits_T, seen_T = [0] * length, [0] * length
    after_D, after_seen_D = [0] * length, [0] * length
    for row in correct:
        for t, ok in enumerate(row):
            hits_T[t] += ok
            seen_T[t] += 1
        first = next((t for t, ok in enumerate(row) if not ok), None)
        if first is None:
            continue
        for d, ok in enumerate(row[first + 1 :], start=1):
            after_D[d - 1] += ok
            after_seen_D[d - 1] += 1
    used = [d for d in range(length) if after_seen_D[d]]
    total_after = sum(after_seen_D)
    return {
        "token_accuracy": sum(hits_T) / pooled if pooled else 0.0,
        "position_accuracy": [h / n for h, n in zip(hits_T, seen_T) if n],
        "recovery": sum(after_D) / total_after if total_after else None,
        "recovery_curve": [after_D[d] / after_seen_D[d] for d in used] if used else [],
    }


@torch.no_grad()
def completion_divergence(
    student: torch.nn.Module,
    teacher: Any,
    tokenizer: Any,
    examples: list[Example],
    completions: list[list[int]],
    *,
    kind: str = "reverse_kl",
    temperature: float = 1.0,
    vocab_size: int | None = None,
    batch_size: int = 64,
) -> tuple[float, float]:
    """``(sum, tokens)`` of the per-token ``kind`` divergence between teacher and student at every
    position of the given completions (the student's own samples, or text someone else wrote)."""
    device = next(student.parameters()).device
    total, tokens = 0.0, 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        outs = completions[start : start + batch_size]
        batch = build_batch([e.prompt_ids for e in chunk], outs, tokenizer.pad_token_id)
        batch.examples = chunk  # a self-teacher builds its privileged prompts from them
        student_logits = completion_logits(
            student, batch.input_ids_BT.to(device), batch.attention_mask_BT.to(device), batch.completion_len
        )
        # (a fused teacher's hidden states stay where they are; its chunks move one at a time)
        teacher_logits = teacher.score(batch).to(device).require_logits("the teacher divergence")
        values = divergences.per_token(
            kind, student_logits, teacher_logits, batch.completion_mask_BC.bool().to(device),
            temperature=temperature, vocab_size=vocab_size,
        )
        total += float(values.sum())
        tokens += float(batch.completion_mask_BC.sum())
    return total, tokens


def generate(model: torch.nn.Module, tokenizer: Any, examples: list[Example], params: SamplingParams,
             batch_size: int = 64) -> list[list[int]]:
    """Completion token ids (cut after EOS) for every example, batch by batch."""
    outs: list[list[int]] = []
    for start in range(0, len(examples), batch_size):
        outs.extend(hf_generate(model, [e.prompt_ids for e in examples[start : start + batch_size]], params, tokenizer))
    return outs


@torch.no_grad()
def evaluate(
    student: torch.nn.Module,
    tokenizer: Any,
    examples: list[Example],
    params: SamplingParams,
    *,
    scorer: Scorer = exact_match,
    first_error: FirstError = first_error_vs_reference,
    teacher: Any | None = None,
    vocab_size: int | None = None,
    batch_size: int = 64,
    sampled: bool = True,
    divergence_kind: str = "reverse_kl",
    token_correct: TokenCorrect | None = None,
    degenerate: Degenerate = degenerate_text,
    keep_completions: bool = False,
) -> dict[str, Any]:
    """Greedy (and sampled) accuracy, mean first-error position and its curve, mean answer length
    (``eval/mean_length``, words) and degenerate-answer rate (``eval/degenerate_rate``).

    With a teacher, also the mean per-token ``divergence_kind`` between teacher and
    student on the student's own samples (``eval/teacher_divergence``). With ``token_correct``
    (per-position booleans of an answer), also ``eval/token_accuracy``, ``eval/position_accuracy``,
    ``eval/recovery`` and ``eval/recovery_curve`` (see :func:`position_curves`). Keys of the
    sampled mode end in ``_sampled``. ``keep_completions`` adds ``eval/completions[_sampled]``
    (the token ids), for analyses that need the samples themselves.
    """
    results: dict[str, Any] = {}
    modes = [("greedy", True)] + ([("sampled", False)] if sampled else [])
    for _mode, greedy in modes:
        mode_params = SamplingParams(
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            greedy=greedy,
            vocab_size=params.vocab_size,
        )
        correct, positions, lengths, degenerate_count = 0, [], [], 0
        per_token: list[list[bool]] = []
        kept: list[list[int]] = []
        div_sum, div_tokens = 0.0, 0.0
        max_words = 1
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            outs = hf_generate(student, [e.prompt_ids for e in chunk], mode_params, tokenizer)
            for example, ids in zip(chunk, outs):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                correct += bool(scorer(example.prompt, text, example.answer))
                positions.append(int(first_error(example.prompt, text, example.answer)))
                max_words = max(max_words, len((example.answer or text).split()))
                lengths.append(len(text.split()))
                degenerate_count += bool(degenerate(example.prompt, text, example.answer))
                if token_correct is not None:
                    per_token.append([bool(ok) for ok in token_correct(example.prompt, text, example.answer)])
            if keep_completions:
                kept.extend(outs)
            if teacher is not None and not greedy and vocab_size is not None:
                part_sum, part_tokens = completion_divergence(
                    student, teacher, tokenizer, chunk, outs, kind=divergence_kind,
                    temperature=params.temperature, vocab_size=vocab_size, batch_size=len(chunk),
                )
                div_sum += part_sum
                div_tokens += part_tokens
        suffix = "" if greedy else "_sampled"
        results[f"eval/accuracy{suffix}"] = correct / len(examples)
        results[f"eval/first_error{suffix}"] = sum(positions) / len(positions)
        results[f"eval/first_error_curve{suffix}"] = survival_curve(positions, max_words)
        results[f"eval/mean_length{suffix}"] = sum(lengths) / len(lengths)
        results[f"eval/degenerate_rate{suffix}"] = degenerate_count / len(examples)
        if token_correct is not None:
            curves = position_curves(per_token)
            results[f"eval/token_accuracy{suffix}"] = curves["token_accuracy"]
            results[f"eval/position_accuracy{suffix}"] = curves["position_accuracy"]
            if curves["recovery"] is not None:
                results[f"eval/recovery{suffix}"] = curves["recovery"]
            results[f"eval/recovery_curve{suffix}"] = curves["recovery_curve"]
        if keep_completions:
            results[f"eval/completions{suffix}"] = kept
        if teacher is not None and not greedy and div_tokens:
            results["eval/teacher_divergence"] = div_sum / div_tokens
    return results


class Evaluator:
    """Held-out evaluation during and after training, under a forked RNG (seeded the same every time),
    so evaluating more or less often never changes the training run."""

    def __init__(self, examples: list[Example], tokenizer: Any, params: SamplingParams, *, scorer: Scorer,
                 first_error: FirstError, teacher: Any | None, vocab_size: int, batch_size: int, sampled: bool,
                 seed: int) -> None:
        self.examples = examples
        self.tokenizer = tokenizer
        self.params = params
        self.scorer = scorer
        self.first_error = first_error
        self.teacher = teacher  # a teacher with full logits on the student's vocabulary, or None
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.sampled = sampled
        self.seed = seed
        # More eval/... metrics, each a callable student -> dict run after evaluate() under the same
        # forked RNG (the training-time diagnostics of opd.diagnostics, issue 18).
        self.extras: list[Callable[[torch.nn.Module], dict[str, Any]]] = []

    def __call__(self, student: torch.nn.Module) -> dict[str, Any]:
        if not self.examples:
            return {}
        device = next(student.parameters()).device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            results = evaluate(student, self.tokenizer, self.examples, self.params, scorer=self.scorer,
                               first_error=self.first_error, teacher=self.teacher, vocab_size=self.vocab_size,
                               batch_size=self.batch_size, sampled=self.sampled)
            for extra in self.extras:
                results.update(extra(student))
            return results


@torch.no_grad()
def reference_nll(
    student: torch.nn.Module,
    tokenizer: Any,
    examples: list[Example],
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    batch_size: int = 64,
) -> float:
    """Mean per-token cross-entropy of the reference answers (DistiLLM's validation loss)."""
    from opd.objectives import sequence_nll

    with_answers = [e for e in examples if e.answer_ids]
    if not with_answers:
        raise ConfigError("the eval set has no reference answers, which the validation loss needs")
    device = next(student.parameters()).device
    total, tokens = 0.0, 0.0
    for start in range(0, len(with_answers), batch_size):
        chunk = with_answers[start : start + batch_size]
        batch = build_batch([e.prompt_ids for e in chunk], [list(e.answer_ids) for e in chunk],
                            tokenizer.pad_token_id)
        logits = completion_logits(student, batch.input_ids_BT.to(device), batch.attention_mask_BT.to(device),
                                   batch.completion_len)
        _, metrics = sequence_nll(logits, batch.completion_ids_BC.to(device), batch.completion_mask_BC.to(device),
                                  num_tokens=1, temperature=temperature, vocab_size=vocab_size)
        total += metrics["loss/nll_sum"]
        tokens += metrics["loss/tokens"]
    return total / max(tokens, 1.0)
