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


class _TokenLogprob(torch.autograd.Function):
    """log softmax(z / T)[y] per row, chunked; backward rebuilds softmax chunk by chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits_NV: torch.Tensor,
        ids_N: torch.Tensor,
        temperature: float,
        vocab_size: int,
        chunk_size: int,
    ) -> torch.Tensor:
        work = torch.promote_types(logits_NV.dtype, torch.float32)
        lse_N = torch.empty(logits_NV.shape[0], dtype=work, device=logits_NV.device)
        out_N = torch.empty_like(lse_N)
        for start in range(0, logits_NV.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            scaled = logits_NV[rows, :vocab_size].to(work) / temperature
            lse_N[rows] = torch.logsumexp(scaled, dim=-1)
            out_N[rows] = scaled.gather(-1, ids_N[rows, None]).squeeze(-1) - lse_N[rows]
        ctx.save_for_backward(logits_NV, ids_N, lse_N)
        ctx.temperature, ctx.vocab_size, ctx.chunk_size = temperature, vocab_size, chunk_size
        return out_N

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_N: torch.Tensor):  # type: ignore[override]
        logits_NV, ids_N, lse_N = ctx.saved_tensors
        temperature, vocab_size = ctx.temperature, ctx.vocab_size
        grad_NV = torch.zeros_like(logits_NV)
        for start in range(0, logits_NV.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            # d log p(y) / dz = (onehot(y) - softmax(z / T)) / T
            probs = (logits_NV[rows, :vocab_size].to(lse_N.dtype) / temperature - lse_N[rows, None]).exp_()
            probs.neg_().scatter_add_(-1, ids_N[rows, None], torch.ones_like(lse_N[rows, None]))
            grad_NV[rows, :vocab_size] = (probs * (grad_N[rows, None] / temperature)).to(grad_NV.dtype)
        return grad_NV, None, None, None, None


def token_logprobs(
    logits_BCV: torch.Tensor,
    ids_BC: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``log softmax(logits / temperature)`` of the given tokens, ``[B, C]``, without a full
    fp32 ``[B, C, V]`` log-softmax in forward or backward."""
    vocab = vocab_size or logits_BCV.shape[-1]
    chunk = chunk_size or divergences.auto_chunk_size(vocab)
    flat = logits_BCV.reshape(-1, logits_BCV.shape[-1])
    out = _TokenLogprob.apply(flat, ids_BC.reshape(-1), float(temperature), int(vocab), int(chunk))
    return out.reshape(ids_BC.shape)


def discounted_returns(rewards_BC: torch.Tensor, mask_BC: torch.Tensor, gamma: float) -> torch.Tensor:
    """``R_t = sum_{t' >= t} gamma^(t'-t) r_t'`` over the valid tokens of each row."""
    rewards = rewards_BC * mask_BC
    if gamma == 0.0:
        return rewards
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask_BC


def sampled_token_pg(
    student_logits_BCV: torch.Tensor,
    teacher_logprobs_BC: torch.Tensor,
    ids_BC: torch.Tensor,
    mask_BC: torch.Tensor,
    *,
    num_tokens: int | float,
    estimator: str = "k1",
    gamma: float = 0.0,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    sampler_logprobs_BC: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sampled-token on-policy distillation as an importance-sampled policy gradient.

    The per-token reward is minus a single-sample reverse-KL estimate on the student's own
    token (``-k1 = log p_T(y_t) - log p_S(y_t)``, see :func:`opd.divergences.sampled_token`),
    discounted into returns with ``gamma`` (0 = per-token advantage, the Thinking Machines /
    Tinker on-policy distillation recipe), and the loss is

        L = -sum_t  [pi_theta(y_t) / pi_sampler(y_t)] * A_t  / num_tokens,

    with ``A_t`` a constant. ``sampler_logprobs_BC`` are the log-probs of the policy that
    sampled the tokens; when omitted the tokens are taken to come from the current weights
    (ratio 1, the plain policy gradient of sequence-level reverse KL when gamma = 1,
    cf. MiniLLM arXiv 2306.08543 Eq. 3).
    """
    student_lp_BC = token_logprobs(student_logits_BCV, ids_BC, temperature=temperature,
                                   vocab_size=vocab_size, chunk_size=chunk_size)
    sampler_lp_BC = student_lp_BC.detach() if sampler_logprobs_BC is None else sampler_logprobs_BC
    with torch.no_grad():
        rewards_BC = -divergences.sampled_token(estimator, sampler_lp_BC, teacher_logprobs_BC)
        advantages_BC = discounted_returns(rewards_BC, mask_BC, gamma)
    ratio_BC = torch.exp(student_lp_BC - sampler_lp_BC)
    total = -(ratio_BC * advantages_BC * mask_BC).sum()
    loss = total / _normaliser(num_tokens)
    count = float(mask_BC.sum().item())
    metrics = {
        "loss/pg_sum": float(total.detach().item()),
        "teacher/reverse_kl_k1_sum": float(
            (divergences.sampled_token("k1", sampler_lp_BC, teacher_logprobs_BC) * mask_BC).sum().item()
        ),
        "loss/tokens": count,
    }
    return loss, metrics
