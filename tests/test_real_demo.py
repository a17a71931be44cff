"""The real-model demo's own pieces (the run itself needs the SmolLM2 download: opd demo --real)."""

from __future__ import annotations

import json

from opd.demo.real import HELDOUT_PROMPTS, TRAIN_PROMPTS, build_prompt_rows, score


def test_shipped_prompt_files_are_what_the_builder_writes():
    train_rows, heldout_rows = build_prompt_rows()
    shipped_train = [json.loads(line) for line in TRAIN_PROMPTS.read_text().splitlines()]
    shipped_heldout = [json.loads(line) for line in HELDOUT_PROMPTS.read_text().splitlines()]
    assert shipped_train == train_rows and shipped_heldout == heldout_rows
    assert len(train_rows) >= 200 and len(heldout_rows) >= 50
    held = {json.dumps(r["messages"]) for r in heldout_rows}
    assert not held & {json.dumps(r["messages"]) for r in train_rows}  # split by item


def test_scorer():
    assert score("", "The capital of France is Paris. It is big.", "Paris") == 1.0
    assert score("", "It is a big city. The capital is Paris.", "Paris") == 0.0  # not in the first sentence
    assert score("", "Parisian food is good.", "Paris") == 0.0  # whole words only
    assert score("", "The answer is 7.", "7") == 1.0
    assert score("", "The answer is 8.", "7") == 0.0
    assert score("", "anything", None) == 0.0


def _real_row(greedy: float, sampled: float, rkl: float, degenerate: float) -> dict:
    return {"score_greedy": greedy, "score_sampled": sampled, "rkl_own_samples": rkl, "fkl_teacher_answers": 2.0,
            "length_greedy": 9.0, "length_sampled": 11.0, "degenerate_greedy": degenerate,
            "degenerate_sampled": degenerate}


def test_real_verdict_and_table_are_computed():
    from opd.demo.real import _table, real_verdict

    results = {
        "models": {"teacher": _real_row(0.7, 0.3, 0.0, 0.0), "student_before": _real_row(0.0, 0.0, 7.0, 0.5),
                   "on_policy_rkl": _real_row(0.1, 0.05, 1.0, 1.0), "off_to_on_policy": _real_row(0.2, 0.1, 1.5, 0.0),
                   "seqkd": _real_row(0.15, 0.05, 2.5, 0.1)},
        "steps": {"on_policy_rkl": 40, "off_to_on_policy": 40, "seqkd": 40},
        "train_seconds": {"on_policy_rkl": 100.0, "off_to_on_policy": 80.0, "seqkd": 30.0},
        "settings": {"teacher_layers": 30, "kept_layers": list(range(16))},
    }
    text = real_verdict(results)
    assert "on_policy_rkl vs seqkd at equal steps: 1/3 targets met" in text  # only the divergence
    assert "off_to_on_policy vs seqkd at equal steps: 3/3 targets met" in text
    table = _table(results)
    assert "teacher (30 layers)" in table and "pruned student (16 layers)" in table and "seqkd" in table
