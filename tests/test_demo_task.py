"""Fast tests for the built-in demo task, tokenizer and shipped teacher."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.demo.models import encode_example, greedy_accuracy
from opd.demo.task import (
    ANSWER_LEN,
    N_EVAL,
    NUM_DIGITS,
    first_error_position,
    is_correct,
    make_examples,
    make_splits,
    parse_prompt,
    valid_answers,
    write_jsonl,
)
from opd.demo.tokenizer import build_tokenizer

TEACHER_DIR = Path(__file__).resolve().parents[1] / "src" / "opd" / "demo" / "assets" / "teacher"

PROMPT = "3 4 1 9 ="  # short hand-computed example (the task functions accept any length)
PLUS = "+ 3 7 8 7"  # 3, 3+4=7, 7+1=8, 8+9=17->7
MINUS = "- 7 3 2 3"  # -3->7, 7-4=3, 3-1=2, 2-9=-7->3


def test_valid_answers_hand_computed() -> None:
    assert valid_answers(PROMPT) == [PLUS, MINUS]
    assert valid_answers("0 0 0 =") == ["+ 0 0 0", "- 0 0 0"]


def test_is_correct() -> None:
    assert is_correct(PROMPT, PLUS)
    assert is_correct(PROMPT, MINUS)
    assert is_correct(PROMPT, "  +  3 7\n8 7 ")  # whitespace-normalised
    assert not is_correct(PROMPT, "+ 3 7 8")  # truncated
    assert not is_correct(PROMPT, "+ 3 7 8 7 7")  # extra symbol
    assert not is_correct(PROMPT, "- 3 7 8 7")  # digits of one style, token of the other
    assert not is_correct(PROMPT, "")


def test_first_error_position() -> None:
    assert first_error_position(PROMPT, PLUS) == 5
    assert first_error_position(PROMPT, MINUS) == 5
    assert first_error_position(PROMPT, "+ 3 7 9 8") == 3  # slip at the 3rd digit
    assert first_error_position(PROMPT, "- 7 3") == 3  # truncated but correct so far
    assert first_error_position(PROMPT, "3 7 8 7") == 0  # missing style token
    assert first_error_position(PROMPT, "") == 0
    assert first_error_position(PROMPT, PLUS + " 1") == 5  # trailing junk does not lower it


def test_examples_are_correct_and_deterministic() -> None:
    examples = make_examples(200, seed=3)
    assert examples == make_examples(200, seed=3)
    assert examples != make_examples(200, seed=4)
    for ex in examples:
        assert len(parse_prompt(ex["prompt"])) == NUM_DIGITS
        assert len(ex["answer"].split()) == ANSWER_LEN
        assert is_correct(ex["prompt"], ex["answer"])
    n_plus = sum(ex["answer"].startswith("+") for ex in examples)
    assert 60 < n_plus < 140  # both styles, roughly 50/50
    assert all(ex["answer"].startswith("-") for ex in make_examples(50, seed=3, styles=("-",)))


def test_splits_disjoint_and_deterministic() -> None:
    train, held_out = make_splits(2000, 300, seed=0)
    assert (train, held_out) == make_splits(2000, 300, seed=0)
    eval_prompts = [ex["prompt"] for ex in held_out]
    assert len(set(eval_prompts)) == len(eval_prompts) == 300
    assert not set(eval_prompts) & {ex["prompt"] for ex in train}
    # Held-out prompts depend only on (seed, n_eval): shared by teacher and "+"-only student splits.
    _, plus_eval = make_splits(10, 300, seed=0, styles=("+",))
    assert [ex["prompt"] for ex in plus_eval] == eval_prompts
    _, small_eval = make_splits(10, 50, seed=0)
    assert [ex["prompt"] for ex in small_eval] == eval_prompts[:50]
    # Excluded prompts are re-drawn, never produced.
    drawn = {ex["prompt"] for ex in make_examples(5, seed=0)}
    assert not drawn & {ex["prompt"] for ex in make_examples(5, seed=0, exclude=drawn)}


def test_write_jsonl(tmp_path: Path) -> None:
    import json

    examples = make_examples(3, seed=0)
    path = tmp_path / "sub" / "data.jsonl"
    write_jsonl(examples, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == examples


def test_tokenizer_format_and_round_trip(tmp_path: Path) -> None:
    tok = build_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 17
    prompt_ids, completion_ids = encode_example(tok, PROMPT, PLUS)
    assert prompt_ids == [1, 7, 8, 5, 13, 16]  # <s> 3 4 1 9 =
    assert completion_ids == [14, 7, 11, 12, 11, 2]  # + 3 7 8 7 </s>
    assert tok.decode(prompt_ids + completion_ids, skip_special_tokens=True) == f"{PROMPT} {PLUS}"
    assert tok.decode(completion_ids + [0, 0], skip_special_tokens=True) == PLUS

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(PROMPT).input_ids == prompt_ids
    assert loaded(PLUS, add_special_tokens=False).input_ids + [loaded.eos_token_id] == completion_ids
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.decode(prompt_ids + completion_ids, skip_special_tokens=True) == f"{PROMPT} {PLUS}"
    loaded.padding_side = "left"
    batch = loaded(["1 2 =", "1 ="], padding=True)
    assert batch.input_ids == [[1, 5, 6, 16], [0, 1, 5, 16]]
    assert batch.attention_mask == [[1, 1, 1, 1], [0, 1, 1, 1]]


def test_shipped_teacher_accuracy() -> None:
    assert (TEACHER_DIR / "model.safetensors").is_file(), "run `python -m opd.demo.build_teacher`"
    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    model = AutoModelForCausalLM.from_pretrained(TEACHER_DIR, dtype=torch.float32)
    _, held_out = make_splits(0, N_EVAL, seed=0)
    accuracy, first_error = greedy_accuracy(model, tok, held_out[:64])
    assert accuracy >= 0.9
    assert first_error >= 0.9 * ANSWER_LEN
    assert tok.padding_side == "right"  # greedy_accuracy restores the padding side
