"""Shared fixtures: tiny real Llama models and a real tokenizer, built locally (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy second core


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, pad_id: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=pad_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tokenizer():
    from opd.demo.tokenizer import build_tokenizer

    return build_tokenizer()


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory, tokenizer):
    """Saved teacher (bigger, 24 padded vocab rows) and student, plus train/eval JSONL."""
    root = tmp_path_factory.mktemp("tiny")
    teacher = tiny_llama(len(tokenizer) + 7, hidden=48, seed=1)  # padding rows beyond the tokenizer
    student = tiny_llama(len(tokenizer), hidden=32, seed=2)
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = [{"prompt": " ".join(str((i * 7 + j) % 10) for j in range(4)) + " =",
             "answer": "+ " + " ".join(str((i + j) % 10) for j in range(4))} for i in range(24)]
    write_rows(root / "train.jsonl", rows[:16])
    write_rows(root / "eval.jsonl", rows[16:])
    return root


def base_overrides(root: Path, out: Path, **extra: object) -> list[str]:
    items = {
        "model.student": str(root / "student"),
        "teacher.model": str(root / "teacher"),
        "data.train": str(root / "train.jsonl"),
        "data.eval": str(root / "eval.jsonl"),
        "train.output_dir": str(out),
        "train.steps": 3,
        "train.batch_size": 4,
        "train.progress": False,
        "train.tensorboard": False,
        "rollout.max_new_tokens": 6,
        "eval.batch_size": 8,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def assert_served_matches_local(signal, model_dir: Path, batch, tokenizer, k: int, atol: float):
    """A served teacher's token log-probs and top-k equal the same model scored locally."""
    from opd import divergences, objectives
    from opd.models import completion_logits, load_causal_lm

    model = load_causal_lm(str(model_dir))
    logits = completion_logits(model, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)
    mask = batch.completion_mask_BC
    local_lp = objectives.token_logprobs(logits, batch.completion_ids_BC, vocab_size=len(tokenizer))
    assert ((signal.token_logprobs_BC - local_lp).abs() * mask).max() < atol
    top_lp, top_ids = divergences.teacher_topk(logits, k, mask.bool(), vocab_size=len(tokenizer))
    valid = mask.bool()
    assert torch.equal(signal.topk_ids_BCK[valid], top_ids[valid])
    assert (signal.topk_logprobs_BCK[valid] - top_lp[valid]).abs().max() < atol
    return local_lp, top_lp, top_ids
