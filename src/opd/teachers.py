"""Teachers: what the teacher exposes decides how the divergence can be evaluated.

This module holds the white-box local teacher (full next-token distributions from
any ``AutoModelForCausalLM``). Every teacher offers the same two calls:

- ``score(batch) -> logits [B, C, V]`` at the positions predicting the completion,
- ``generate(prompts, params) -> completions`` for off-policy teacher rollouts (SeqKD).
"""

from __future__ import annotations

from typing import Any

import torch

from opd.config import TeacherConfig
from opd.errors import ModelError
from opd.models import completion_logits, load_causal_lm, load_tokenizer
from opd.rollout import SamplingParams, SequenceBatch, hf_generate


def check_same_tokenizer(student_tok: Any, teacher_tok: Any) -> None:
    """Refuse teacher/student pairs whose token ids mean different things.

    Token-level distillation compares distributions index by index, so the two
    vocabularies must be the same mapping (embedding rows beyond the tokenizer are
    handled by :func:`opd.models.shared_vocab_size`).
    """
    student_vocab = student_tok.get_vocab()
    teacher_vocab = teacher_tok.get_vocab()
    if student_vocab == teacher_vocab and student_tok.eos_token_id == teacher_tok.eos_token_id:
        return
    differing = sum(1 for tok, idx in student_vocab.items() if teacher_vocab.get(tok) != idx)
    raise ModelError(
        f"teacher and student tokenizers differ ({len(teacher_vocab)} vs {len(student_vocab)} tokens, "
        f"{differing} student tokens map to other ids"
        + ("" if student_tok.eos_token_id == teacher_tok.eos_token_id else ", different EOS")
        + "); token-level distillation needs one shared tokenizer — pick a teacher from the same family"
    )


class LocalTeacher:
    """A frozen local causal LM in its own dtype, scored without gradients."""

    kind = "local"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str = "teacher") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.model.eval()
        self.model.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: TeacherConfig, student_tokenizer: Any) -> LocalTeacher:
        if cfg.model is None:
            raise ModelError("teacher.model is not set")
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
        check_same_tokenizer(student_tokenizer, tokenizer)
        model = load_causal_lm(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        return cls(model, tokenizer, name=cfg.model)

    @torch.no_grad()
    def score(self, batch: SequenceBatch) -> torch.Tensor:
        """Teacher logits ``[B, C, V_teacher]`` at the positions predicting the completion."""
        device = next(self.model.parameters()).device
        return completion_logits(
            self.model, batch.input_ids_BT.to(device), batch.attention_mask_BT.to(device), batch.completion_len
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        return hf_generate(self.model, prompts, params, self.tokenizer)
