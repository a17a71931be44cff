"""Evaluation's per-position scores, recovery curve, answer length and degeneration."""

from __future__ import annotations

import pytest
import torch

from opd.eval import completion_divergence, degenerate_text, evaluate, position_curves, repetitive
from opd.rollout import SamplingParams


def test_position_curves_hand_computed() -> None:
    rows = [
        [True, True, True, True],     # no error
        [True, False, True, True],    # first error at 1, recovers: d=1 ok, d=2 ok
        [False, False, True, False],  # first error at 0: d=1 wrong, d=2 ok, d=3 wrong
    ]
    got = position_curves(rows)
    assert got["token_accuracy"] == pytest.approx(8 / 12)
    assert got["position_accuracy"] == pytest.approx([2 / 3, 1 / 3, 1.0, 2 / 3])
    # after the first error: row 2 has 2 tokens (both right), row 3 has 3 (one right)
    assert got["recovery"] == pytest.approx(3 / 5)
    assert got["recovery_curve"] == pytest.approx([1 / 2, 2 / 2, 0 / 1])
    assert position_curves([[True, True]])["recovery"] is None
    short = position_curves([[True, True, True], [True]])  # a shorter answer only counts where it has positions
    assert short["position_accuracy"] == [1.0, 1.0, 1.0]


def test_repetition_and_degenerate_answers() -> None:
    assert repetitive("", "the cat the cat the cat")
    assert not repetitive("", "the cat sat on the mat, the cat")  # "the cat" twice only
    assert degenerate_text("", "A.A.A.A.")
    assert degenerate_text("", "lalala")
    assert degenerate_text("", "   ")
    assert not degenerate_text("", "The capital of France is Paris.")
    assert not degenerate_text("", "It costs 1000 ... or so")  # digits and dots are ordinary words


def _examples(tiny_setup, tokenizer):
    from opd.config import DataConfig
    from opd.data import load_examples

    examples, _ = load_examples(str(tiny_setup / "eval.jsonl"), DataConfig(train="unused"), tokenizer)
    return examples


def test_evaluate_reports_length_degeneration_and_token_scores(tiny_setup, tokenizer) -> None:
    from opd.models import load_causal_lm

    model = load_causal_lm(str(tiny_setup / "student"))
    examples = _examples(tiny_setup, tokenizer)

    def token_correct(prompt: str, completion: str, reference: str | None) -> list[bool]:
        got = completion.split()
        return [i < len(got) and got[i] == w for i, w in enumerate((reference or "").split())]

    torch.manual_seed(0)
    results = evaluate(model, tokenizer, examples, SamplingParams(6, vocab_size=len(tokenizer)),
                       token_correct=token_correct, keep_completions=True)
    for suffix in ("", "_sampled"):
        assert 0.0 <= results[f"eval/degenerate_rate{suffix}"] <= 1.0
        assert 0.0 <= results[f"eval/mean_length{suffix}"] <= 6.0
        assert 0.0 <= results[f"eval/token_accuracy{suffix}"] <= 1.0
        assert len(results[f"eval/position_accuracy{suffix}"]) == 5  # "+" and 4 digits
        assert len(results[f"eval/completions{suffix}"]) == len(examples)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in results["eval/completions"]]
    assert results["eval/mean_length"] == pytest.approx(sum(len(t.split()) for t in texts) / len(texts))
    assert results["eval/degenerate_rate"] == pytest.approx(sum(map(lambda t: degenerate_text("", t), texts))
                                                            / len(texts))


def test_completion_divergence_is_zero_against_itself(tiny_setup, tokenizer) -> None:
    from opd.models import load_causal_lm
    from opd.teachers import LocalTeacher

    model = load_causal_lm(str(tiny_setup / "student"))
    examples = _examples(tiny_setup, tokenizer)
    teacher = LocalTeacher(model, tokenizer)
    completions = [list(e.answer_ids) for e in examples]
    total, tokens = completion_divergence(model, teacher, tokenizer, examples, completions, kind="forward_kl",
                                          vocab_size=len(tokenizer))
    assert tokens == sum(len(c) for c in completions)
    assert total == pytest.approx(0.0, abs=1e-4)
