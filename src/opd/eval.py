"""Evaluation: accuracy, teacher-student divergence on student samples, first-error positions.

The first-error position is the exposure-bias picture: how far along its own
output the student gets before it first leaves every correct answer. Its survival
curve ``curve[k]`` = fraction of samples still correct after ``k`` words.
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


def survival_curve(positions: list[int], length: int) -> list[float]:
    """``curve[k]`` = fraction of samples whose first error is after word ``k``."""
    if not positions:
        return []
    return [sum(1 for p in positions if p > k) / len(positions) for k in range(length)]


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
) -> dict[str, Any]:
    """Greedy (and sampled) accuracy, mean first-error position and its curve.

    With a teacher, also the mean per-token ``divergence_kind`` between teacher and
    student on the student's own samples (``eval/teacher_divergence``).
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
        correct, positions = 0, []
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
            if teacher is not None and not greedy and vocab_size is not None:
                batch = build_batch([e.prompt_ids for e in chunk], outs, tokenizer.pad_token_id)
                batch.examples = chunk  # a self-teacher builds its privileged prompts from them
                device = next(student.parameters()).device
                student_logits = completion_logits(
                    student, batch.input_ids_BT.to(device), batch.attention_mask_BT.to(device), batch.completion_len
                )
                # (a fused teacher's hidden states stay where they are; its chunks move one at a time)
                teacher_logits = teacher.score(batch).to(device).require_logits("the teacher divergence")
                values = divergences.per_token(
                    divergence_kind,
                    student_logits,
                    teacher_logits,
                    batch.completion_mask_BC.bool().to(device),
                    temperature=params.temperature,
                    vocab_size=vocab_size,
                )
                div_sum += float(values.sum())
                div_tokens += float(batch.completion_mask_BC.sum())
        suffix = "" if greedy else "_sampled"
        results[f"eval/accuracy{suffix}"] = correct / len(examples)
        results[f"eval/first_error{suffix}"] = sum(positions) / len(positions)
        results[f"eval/first_error_curve{suffix}"] = survival_curve(positions, max_words)
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
