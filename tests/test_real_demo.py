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
