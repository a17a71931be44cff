"""Training objectives built on :mod:`opd.divergences`.

A loss is a pure function ``(student, teacher, mask, ..., num_tokens) -> (loss, metrics)``.
``num_tokens`` is the number of completion tokens of the whole optimizer step (all
gradient-accumulation micro-batches, all processes); every objective divides its
token sum by it, so gradient accumulation and data parallelism do not change the
objective (cf. design.md §5, "loss divided by a per-micro-batch count"). An
all-masked micro-batch contributes exactly 0 with a finite (zero) gradient.
"""

from __future__ import annotations

import torch

from opd import divergences


def _normaliser(num_tokens: int | float) -> float:
    return float(max(num_tokens, 1))


def token_divergence(
    student_logits_BCV: torch.Tensor,
    teacher_logits_BCV: torch.Tensor,
    mask_BC: torch.Tensor,
    *,
    kind: str,
    num_tokens: int | float,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level distillation: sum over positions of D(p_T(.|y<t) || p_S(.|y<t)) / num_tokens.

    This is the per-token objective of GKD (arXiv 2306.13649, Eq. 2) for any
    divergence in :mod:`opd.divergences`; with student-written ``y`` it is on-policy
    distillation, with dataset ``y`` supervised KD.
    """
    values_BC = divergences.per_token(
        kind,
        student_logits_BCV,
        teacher_logits_BCV,
        mask_BC.bool(),
        beta=beta,
        alpha=alpha,
        temperature=temperature,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
    )
    total = values_BC.sum()
    loss = total / _normaliser(num_tokens)
    count = float(mask_BC.sum().item())
    metrics = {
        "loss/divergence_sum": float(total.detach().item()),
        "loss/tokens": count,
    }
    return loss, metrics


def sequence_nll(
    student_logits_BCV: torch.Tensor,
    target_ids_BC: torch.Tensor,
    mask_BC: torch.Tensor,
    *,
    num_tokens: int | float,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on the given tokens (SeqKD, Kim & Rush 2016, on teacher text).

    Computed chunk by chunk over valid positions so no full fp32 ``[B, C, V]``
    log-softmax is materialised.
    """
    vocab = vocab_size or student_logits_BCV.shape[-1]
    chunk_size = chunk_size or divergences.auto_chunk_size(vocab)
    logits_NV = student_logits_BCV.reshape(-1, student_logits_BCV.shape[-1])
    targets_N = target_ids_BC.reshape(-1)
    rows = mask_BC.reshape(-1).bool().nonzero().squeeze(-1)
    total = logits_NV.new_zeros((), dtype=torch.promote_types(logits_NV.dtype, torch.float32))
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]
        chunk = logits_NV[idx, :vocab].to(total.dtype) / temperature
        total = total + torch.nn.functional.cross_entropy(chunk, targets_N.index_select(0, idx), reduction="sum")
    if rows.numel() == 0:
        # Keep the graph connected so backward works and yields zero gradients.
        total = total + 0.0 * logits_NV.sum()
    loss = total / _normaliser(num_tokens)
    return loss, {"loss/nll_sum": float(total.detach().item()), "loss/tokens": float(rows.numel())}
