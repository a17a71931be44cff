"""The headline demo task (sorting 48 digits), its noise-injected teacher and shipped students."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from opd.demo import sort_task as st
from opd.demo.build_sort import _corrupt_at, corrupt_sorted, teacher_forced_accuracy
from opd.demo.models import encode_example
from opd.demo.tokenizer import VOCAB, build_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "src" / "opd" / "demo" / "assets" / "sort"
PROMPT = "3 1 4 1 5 ="  # short hand-computed example (the functions accept any length)


def test_solve_and_scores_hand_computed() -> None:
    assert st.parse_prompt(PROMPT) == [3, 1, 4, 1, 5]
    assert st.solve([3, 1, 4, 1, 5]) == "1 1 3 4 5"
    assert st.is_correct(PROMPT, " 1 1  3 4\n5 ")
    assert not st.is_correct(PROMPT, "1 1 3 4 5 5")  # runs on
    assert st.token_correct(PROMPT, "1 1 3 4 5") == [True] * 5
    # One extra "1": a prefix-counting policy shifts everything after it; positions still count.
    assert st.token_correct(PROMPT, "1 1 1 3 4") == [True, True, False, False, False]
    assert st.token_correct(PROMPT, "1 3 3 4 5") == [True, False, True, True, True]  # recovered after one slip
    assert st.token_correct(PROMPT, "1 1") == [True, True, False, False, False]  # stopped early
    assert st.first_error_position(PROMPT, "1 3 3 4 5") == 1
    assert st.first_error_position(PROMPT, "1 1 3 4 5") == 5
    assert st.wrong_length(PROMPT, "1 1 3 4") and st.wrong_length(PROMPT, "1 1 3 4 5 6")
    assert not st.wrong_length(PROMPT, "9 9 9 9 9")


def test_splits_are_disjoint_deterministic_and_nested() -> None:
    train, held_out = st.make_splits(300, 40, seed=0)
    assert (train, held_out) == st.make_splits(300, 40, seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert st.make_splits(5, 10, seed=0)[1] == held_out[:10]
    assert st.make_splits(0, 40, seed=1)[1] != held_out  # the tuning sweep's validation prompts
    for row in train[:20]:
        assert len(st.parse_prompt(row["prompt"])) == st.NUM_DIGITS
        assert st.is_correct(row["prompt"], row["answer"])


def test_corruption_keeps_length_and_eos_and_hits_the_rate() -> None:
    tokenizer = build_tokenizer(128)
    _, completion = encode_example(tokenizer, *st.make_splits(1, 0)[0][0].values())
    generator = torch.Generator().manual_seed(0)
    assert _corrupt_at(completion, 0.0, generator) == completion
    changed = 0
    for _ in range(50):
        shown = _corrupt_at(completion, 0.3, generator)
        assert len(shown) == len(completion) and shown[-1] == tokenizer.eos_token_id
        assert all(VOCAB["0"] <= t <= VOCAB["9"] for t in shown[:-1])
        changed += sum(a != b for a, b in zip(shown, completion))
    # 30 % corrupted, minus the random replacements that hit the same digit (1 in 20 of them)
    assert 0.24 < changed / (50 * (len(completion) - 1)) < 0.34
    corrupt = corrupt_sorted(0.3)
    assert len(corrupt(completion, generator)) == len(completion)


def test_shipped_sort_models_load_and_the_teacher_recovers() -> None:
    build = json.loads((ASSETS / "build.json").read_text())
    teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher")
    tokenizer = build_tokenizer(128)
    _, held_out = st.make_splits(0, 32, seed=0)
    # The teacher is right from clean prefixes and from 30 %-corrupted ones (build.json has the full numbers).
    assert teacher_forced_accuracy(teacher, tokenizer, held_out, 0.0) > 0.99
    assert teacher_forced_accuracy(teacher, tokenizer, held_out, 0.3) > 0.95
    assert build["teacher"]["teacher_forced_30"] > 0.95
    for seed in range(8):
        assert (ASSETS / "students" / f"seed{seed}" / "model.safetensors").is_file()
        assert str(seed) in build["students"]
