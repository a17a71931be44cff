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


def _route_metrics(values_BC: torch.Tensor, mask_BC: torch.Tensor, route_B: list[str] | None) -> dict[str, float]:
    """Per-teacher token counts and signal sums when rows were routed to several teachers
    (``route_B`` names each row's teacher): ``routes/NAME/tokens`` and ``routes/NAME/signal_sum``."""
    if route_B is None:
        return {}
    with torch.no_grad():
        tokens_B = mask_BC.sum(-1).tolist()
        signal_B = (values_BC.detach() * mask_BC).sum(-1).tolist()
    out: dict[str, float] = {}
    for name, tokens, signal in zip(route_B, tokens_B, signal_B):
        out[f"routes/{name}/tokens"] = out.get(f"routes/{name}/tokens", 0.0) + float(tokens)
        out[f"routes/{name}/signal_sum"] = out.get(f"routes/{name}/signal_sum", 0.0) + float(signal)
    return out


def importance_ratio(student_lp_BC: torch.Tensor, sampler_lp_BC: torch.Tensor,
                     cap: float | None = None) -> torch.Tensor:
    """``q_theta / pi_sampler`` per token. With ``cap`` it is truncated importance sampling: the value
    is ``min(ratio, cap)`` and the gradient ``min(ratio, cap) * grad log q_theta`` (the capped weight is
    a constant), so a stale or mismatched sampler cannot blow a step up."""
    if cap is None:
        return torch.exp(student_lp_BC - sampler_lp_BC)
    weight_BC = torch.exp(student_lp_BC.detach() - sampler_lp_BC).clamp(max=cap)
    return weight_BC * torch.exp(student_lp_BC - student_lp_BC.detach())


def _capped_sum(student_lp_BC: torch.Tensor, sampler_lp_BC: torch.Tensor, mask_BC: torch.Tensor,
                cap: float | None) -> dict[str, float]:
    """How often the cap binds (design.md: log how often a truncation is active)."""
    if cap is None:
        return {}
    with torch.no_grad():
        capped = ((student_lp_BC.detach() - sampler_lp_BC) > torch.log(torch.tensor(cap))).float() * mask_BC
    return {"loss/importance_capped_sum": float(capped.sum().item())}


def _sampler_or_current(sampler_lp_BC: torch.Tensor | None, current_lp_BC: torch.Tensor) -> torch.Tensor:
    """The sampling policy's log-probs; where unknown (None / NaN rows) the current weights'."""
    current = current_lp_BC.detach()
    if sampler_lp_BC is None:
        return current
    return torch.where(torch.isnan(sampler_lp_BC), current, sampler_lp_BC)


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
    route_B: list[str] | None = None,
    weights_BC: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level distillation: sum over positions of D(p_T(.|y<t) || p_S(.|y<t)) / num_tokens.

    ``weights_BC`` (constants) scale each position's divergence, e.g. a capped importance ratio for
    rollouts from a stale policy (``loss.divergence_importance``).

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
    total = values_BC.sum() if weights_BC is None else (values_BC * weights_BC).sum()
    loss = total / _normaliser(num_tokens)
    count = float(mask_BC.sum().item())
    metrics = {
        "loss/divergence_sum": float(total.detach().item()),
        "loss/tokens": count,
        **_route_metrics(values_BC, mask_BC, route_B),
    }
    return loss, metrics


def topk_divergence(
    student_logits_BCV: torch.Tensor,
    teacher_topk_logprobs_BCK: torch.Tensor,
    teacher_topk_ids_BCK: torch.Tensor,
    mask_BC: torch.Tensor,
    *,
    kind: str,
    num_tokens: int | float,
    support: str = "tail",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    route_B: list[str] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level distillation from a teacher that exposes only its top-k log-probs.

    Same normalisation as :func:`token_divergence`; the per-position value is
    :func:`opd.divergences.topk_per_token` (``support`` = tail bucket, renormalised, or
    the truncated reverse KL of arXiv 2603.25562).
    """
    values_BC = divergences.topk_per_token(
        kind, student_logits_BCV, teacher_topk_logprobs_BCK, teacher_topk_ids_BCK, mask_BC.bool(),
        support=support, beta=beta, alpha=alpha, temperature=temperature, vocab_size=vocab_size,
        chunk_size=chunk_size,
    )
    total = values_BC.sum()
    with torch.no_grad():
        covered = (teacher_topk_logprobs_BCK.exp().sum(-1) * mask_BC).sum()
    metrics = {
        "loss/divergence_sum": float(total.detach().item()),
        "loss/tokens": float(mask_BC.sum().item()),
        "teacher/topk_mass_sum": float(covered.item()),
        **_route_metrics(values_BC, mask_BC, route_B),
    }
    return total / _normaliser(num_tokens), metrics


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

    The tokens' log-probs come from :func:`token_logprobs` (chunked, so no full fp32 ``[B, C, V]``
    log-softmax exists; with hidden states and the head, no ``[B, C, V]`` logits either).
    """
    lp_BC = token_logprobs(student_logits_BCV, target_ids_BC, temperature=temperature, vocab_size=vocab_size,
                           chunk_size=chunk_size)
    total = -(lp_BC * mask_BC).sum()  # masked rows contribute 0 but stay in the graph (finite zero gradient)
    loss = total / _normaliser(num_tokens)
    return loss, {"loss/nll_sum": float(total.detach().item()), "loss/tokens": float(mask_BC.sum().item())}


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
    return divergences.gathered_logprobs(
        logits_BCV, ids_BC[..., None], temperature=temperature, vocab_size=vocab_size, chunk_size=chunk_size
    )[..., 0]


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
    reward_scale: float = 1.0,
    reference_logprobs_BC: torch.Tensor | None = None,
    route_B: list[str] | None = None,
    importance_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sampled-token on-policy distillation as an importance-sampled policy gradient.

    The per-token reward is minus a single-sample reverse-KL estimate on the sampled token
    (``-k1 = log p_T(y_t) - log q_theta(y_t)``, see :func:`opd.divergences.sampled_token`),
    discounted into returns with ``gamma`` (0 = per-token advantage, the Thinking Machines /
    Tinker on-policy distillation recipe), and the loss is

        L = -sum_t  [q_theta(y_t) / pi_sampler(y_t)] * A_t  / num_tokens,

    with ``A_t`` a constant. Two different log-probs enter, on purpose:

    - the reward uses ``log q_theta``, the student's own log-prob from this (training) forward pass,
      detached: the objective is the reverse KL of the *student*, whoever drew the tokens;
    - the importance ratio divides by ``pi_sampler``, the law that actually drew each token:
      ``sampler_logprobs_BC`` as recorded at rollout time (after top-p / top-k filtering, in the
      sampler's precision, from vLLM when it sampled; a mixture or speculative co-sampler's law).
      When omitted (or NaN on rows no sampler wrote) the current weights are taken (ratio 1), the
      plain policy gradient of sequence-level reverse KL when gamma = 1 (cf. MiniLLM arXiv
      2306.08543 Eq. 3).

    Using the sampler's log-prob in the reward instead would be wrong whenever the sampler is not
    the student: under teacher-mixed sampling the reward becomes ``log p_T - log p~`` and the
    expected gradient leaves the reverse-KL gradient. With top-p / top-k rollouts the sampler is
    the filtered law ``q / Z(context)`` on the kept tokens: the ratio is then ``Z <= 1`` and the
    gradient is that of the reverse KL with its expectation restricted to the kept tokens (tokens
    outside are never sampled, so never pushed down); a reward built from the filtered log-prob
    would add a context-dependent ``log Z`` to every token's reward.

    ``reward_scale`` = lambda != 1 gives the reward extrapolation of G-OPD / ExOPD
    (arXiv 2602.12125): ``r_t = lambda (log p_T - log p_ref) - (log q_theta - log p_ref)``
    with ``p_ref`` the student's initial weights (``reference_logprobs_BC``); its optimum is
    ``log q = lambda log p_T + (1 - lambda) log p_ref``, past the teacher for lambda > 1
    (1.25 in the paper). lambda = 1 is plain OPD (the reference cancels).
    """
    student_lp_BC = token_logprobs(student_logits_BCV, ids_BC, temperature=temperature,
                                   vocab_size=vocab_size, chunk_size=chunk_size)
    sampler_lp_BC = _sampler_or_current(sampler_logprobs_BC, student_lp_BC)
    with torch.no_grad():
        current_BC = student_lp_BC.detach()
        if reward_scale != 1.0:
            if reference_logprobs_BC is None or estimator != "k1":
                raise ValueError("reward_scale != 1 needs reference_logprobs_BC and estimator='k1'")
            rewards_BC = (reward_scale * (teacher_logprobs_BC - reference_logprobs_BC)
                          - (current_BC - reference_logprobs_BC))
        else:
            rewards_BC = -divergences.sampled_token(estimator, current_BC, teacher_logprobs_BC)
        advantages_BC = discounted_returns(rewards_BC, mask_BC, gamma)
        k1_BC = divergences.sampled_token("k1", current_BC, teacher_logprobs_BC)
    ratio_BC = importance_ratio(student_lp_BC, sampler_lp_BC, importance_cap)
    total = -(ratio_BC * advantages_BC * mask_BC).sum()
    loss = total / _normaliser(num_tokens)
    count = float(mask_BC.sum().item())
    metrics = {
        "loss/pg_sum": float(total.detach().item()),
        "teacher/reverse_kl_k1_sum": float((k1_BC * mask_BC).sum().item()),
        "loss/tokens": count,
        **_route_metrics(k1_BC, mask_BC, route_B),
        **_capped_sum(student_lp_BC, sampler_lp_BC, mask_BC, importance_cap),
    }
    return loss, metrics


def entropy_gated_forward_kl(
    student_logits_BCV: torch.Tensor,
    teacher_logits_BCV: torch.Tensor,
    mask_BC: torch.Tensor,
    *,
    num_tokens: int | float,
    threshold: float = 0.8,
    top_k: int | None = 16,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The forward-KL term of entropy-aware OPD (EOPD, arXiv 2603.07079).

    Where the teacher is uncertain (entropy ``H(p_T) >= threshold`` nats over the full
    vocabulary; 0.8 in the paper) reverse KL alone is mode-seeking and collapses the
    student onto one of several good continuations, so forward KL is added there:
    ``sum_t 1[H_t >= tau] KL(p^_T || q) / num_tokens`` with the teacher renormalised on its
    top-k (k = 16 in the paper; ``None`` = full vocabulary). The caller adds it, times a
    coefficient, to the reverse-KL objective, which stays on every token.
    """
    with torch.no_grad():
        entropy_BC = divergences.entropy(teacher_logits_BCV, mask_BC.bool(), temperature=temperature,
                                         vocab_size=vocab_size, chunk_size=chunk_size)
        gate_BC = (entropy_BC >= threshold) & mask_BC.bool()
    if top_k is None:
        values_BC = divergences.per_token("forward_kl", student_logits_BCV, teacher_logits_BCV, gate_BC,
                                          temperature=temperature, chunk_size=chunk_size, vocab_size=vocab_size)
    else:
        top_lp, top_ids = divergences.teacher_topk(teacher_logits_BCV, top_k, gate_BC, temperature=temperature,
                                                   vocab_size=vocab_size, chunk_size=chunk_size)
        values_BC = divergences.topk_per_token("forward_kl", student_logits_BCV, top_lp, top_ids, gate_BC,
                                               support="teacher_renormalized", temperature=temperature,
                                               vocab_size=vocab_size, chunk_size=chunk_size)
    total = values_BC.sum()
    metrics = {
        "loss/entropy_fkl_sum": float(total.detach().item()),
        "teacher/high_entropy_tokens": float(gate_BC.sum().item()),
        "teacher/entropy_sum": float((entropy_BC * mask_BC).sum().item()),
    }
    return total / _normaliser(num_tokens), metrics


def future_mean_returns(rewards_BC: torch.Tensor, mask_BC: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """MiniLLM's length-normalised long-term return (arXiv 2306.08543, Eq. 6):
    ``R^Norm_{t+1} = sum_{t' > t} gamma^(t'-t-1) r_t' / (number of valid t' > t)``, 0 at the last token."""
    with_current = discounted_returns(rewards_BC, mask_BC, gamma)
    future_BC = torch.zeros_like(with_current)
    future_BC[:, :-1] = with_current[:, 1:]
    remaining_BC = torch.zeros_like(mask_BC)
    remaining_BC[:, :-1] = mask_BC.flip(-1).cumsum(-1).flip(-1)[:, 1:]
    return future_BC / remaining_BC.clamp(min=1.0) * mask_BC


def minillm(
    student_logits_BCV: torch.Tensor,
    teacher_logits_BCV: torch.Tensor,
    ids_BC: torch.Tensor,
    mask_BC: torch.Tensor,
    *,
    num_tokens: int | float,
    sampler_logprobs_BC: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    gamma: float = 1.0,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    route_B: list[str] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MiniLLM: sequence-level reverse KL by policy gradient (arXiv 2306.08543, Eq. 7).

    Per valid token ``t``, with ``r_t = log p_T(y_t) - log q(y_t)`` at sampling time:

    - single-step term, exact over the vocabulary: ``w_t KL(q(.|c_t) || p_T(.|c_t))``;
    - long-term term, PPO-clipped: ``max(-A_t rho_t w_t, -A_t clip(rho_t w_t, 1 - eps, 1 + eps))``
      with ``A_t = R^Norm_{t+1}`` (:func:`future_mean_returns`), ``rho_t = q_theta / q_old``;
    - ``w_t = q_old(y_t) / p~(y_t)``, the per-step importance weight of teacher-mixed sampling
      (Eq. 5; ``sampler_logprobs_BC`` = ``log p~``, omitted = the student sampled alone, w = 1).

    Both summed and divided by ``num_tokens``. Not included: the paper's language-modelling
    loss on pretraining text, and its code's reward scaling / advantage whitening.
    """
    student_lp_BC = token_logprobs(student_logits_BCV, ids_BC, temperature=temperature,
                                   vocab_size=vocab_size, chunk_size=chunk_size)
    with torch.no_grad():
        old_lp_BC = student_lp_BC.detach()
        teacher_lp_BC = token_logprobs(teacher_logits_BCV, ids_BC, temperature=temperature,
                                       vocab_size=vocab_size, chunk_size=chunk_size)
        rewards_BC = (teacher_lp_BC - old_lp_BC) * mask_BC
        advantages_BC = future_mean_returns(rewards_BC, mask_BC, gamma)
        weights_BC = torch.exp(old_lp_BC - _sampler_or_current(sampler_logprobs_BC, old_lp_BC))
    single_BC = divergences.per_token("reverse_kl", student_logits_BCV, teacher_logits_BCV, mask_BC.bool(),
                                      temperature=temperature, chunk_size=chunk_size, vocab_size=vocab_size)
    weighted_ratio_BC = torch.exp(student_lp_BC - old_lp_BC) * weights_BC
    pg_BC = torch.maximum(-advantages_BC * weighted_ratio_BC,
                          -advantages_BC * weighted_ratio_BC.clamp(1.0 - clip_eps, 1.0 + clip_eps))
    single_total = (weights_BC * single_BC * mask_BC).sum()
    pg_total = (pg_BC * mask_BC).sum()
    metrics = {
        "loss/single_step_sum": float(single_total.detach().item()),
        "loss/pg_sum": float(pg_total.detach().item()),
        "teacher/reverse_kl_k1_sum": float((-rewards_BC).sum().item()),
        "rollout/importance_weight_sum": float((weights_BC * mask_BC).sum().item()),
        "loss/tokens": float(mask_BC.sum().item()),
        **_route_metrics(-rewards_BC, mask_BC, route_B),
    }
    return (single_total + pg_total) / _normaliser(num_tokens), metrics


def group_advantages(rewards_B: torch.Tensor, group_B: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantage: reward minus its group mean, over the group's std
    (population std; a group whose rewards are all equal gets advantage 0)."""
    advantages_B = torch.zeros_like(rewards_B)
    for group in group_B.unique():
        members = group_B == group
        values = rewards_B[members]
        centred = values - values.mean()
        std = values.std(unbiased=False)
        advantages_B[members] = centred / (std + eps) if std > 0 else torch.zeros_like(centred)
    return advantages_B


def sequence_reward_pg(
    student_logits_BCV: torch.Tensor,
    ids_BC: torch.Tensor,
    mask_BC: torch.Tensor,
    advantages_B: torch.Tensor,
    *,
    num_tokens: int | float,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    sampler_logprobs_BC: torch.Tensor | None = None,
    chunk_size: int | None = None,
    importance_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """GRPO-style policy gradient on a sequence-level advantage broadcast to every token:
    ``-sum_{i,t} rho_{i,t} A_i / num_tokens`` with ``rho = q_theta / q_sampler`` (1 on-policy).
    Returns the loss, the student's token log-probs (for extra terms) and metrics."""
    student_lp_BC = token_logprobs(student_logits_BCV, ids_BC, temperature=temperature,
                                   vocab_size=vocab_size, chunk_size=chunk_size)
    sampler_lp_BC = _sampler_or_current(sampler_logprobs_BC, student_lp_BC)
    ratio_BC = importance_ratio(student_lp_BC, sampler_lp_BC, importance_cap)
    pg_total = -(ratio_BC * advantages_B[:, None] * mask_BC).sum()
    metrics = {"loss/pg_sum": float(pg_total.detach().item()), "loss/tokens": float(mask_BC.sum().item()),
               **_capped_sum(student_lp_BC, sampler_lp_BC, mask_BC, importance_cap)}
    return pg_total / _normaliser(num_tokens), student_lp_BC, metrics


def kdrl(
    student_logits_BCV: torch.Tensor,
    teacher_logprobs_BC: torch.Tensor,
    ids_BC: torch.Tensor,
    mask_BC: torch.Tensor,
    advantages_B: torch.Tensor,
    *,
    num_tokens: int | float,
    kd_coef: float,
    kd_estimator: str = "k2",
    kd_mask_B: torch.Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    sampler_logprobs_BC: torch.Tensor | None = None,
    chunk_size: int | None = None,
    route_B: list[str] | None = None,
    importance_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KDRL: outcome-reward policy gradient plus on-policy KD (arXiv 2506.02208, Eq. 8).

    ``L = [ -sum_{i,t} rho_{i,t} A_i + kd_coef * sum_{i,t} k(log q, log p_T) ] / num_tokens``
    with ``A_i`` the group-normalised verifier advantage (:func:`group_advantages`) and
    ``rho = q_theta / q_sampler`` (1 on-policy). The KD term ``k`` is differentiated through the
    student's log-prob of its own sampled token (a loss, not a reward), so what it optimises
    depends on the estimator, on student samples ``y ~ q``:

    - ``k2 = (log q - log p_T)^2 / 2``: ``E_q[(log q - log p_T) grad log q] = grad KL(q || p_T)``,
      the reverse-KL gradient — KDRL's objective and default;
    - ``k3 = p_T/q - 1 - log(p_T/q)``: ``E_q[(1 - p_T/q) grad log q] = -sum_y p_T grad log q
      = grad KL(p_T || q)``, the *forward*-KL gradient, although k3's value estimates the reverse
      KL. (KDRL compares such approximations; opd offers k3 under that name, for its
      forward-KL gradient.)

    Both hold only for tokens the student drew itself, which is why kdrl requires
    ``rollout.sampler=student``. ``kd_mask_B`` drops the KD term for chosen sequences (KDRL's
    reward-guided masking of already-correct responses).
    """
    pg_loss, student_lp_BC, metrics = sequence_reward_pg(
        student_logits_BCV, ids_BC, mask_BC, advantages_B, num_tokens=num_tokens, temperature=temperature,
        vocab_size=vocab_size, sampler_logprobs_BC=sampler_logprobs_BC, chunk_size=chunk_size,
        importance_cap=importance_cap,
    )
    kd_BC = divergences.sampled_token(kd_estimator, student_lp_BC, teacher_logprobs_BC)
    kd_weight_BC = mask_BC if kd_mask_B is None else mask_BC * kd_mask_B[:, None]
    kd_total = (kd_BC * kd_weight_BC).sum()
    with torch.no_grad():
        k1_BC = divergences.sampled_token("k1", student_lp_BC.detach(), teacher_logprobs_BC)
    metrics["loss/kd_sum"] = float(kd_total.detach().item())
    metrics["teacher/reverse_kl_k1_sum"] = float((k1_BC * mask_BC).sum().item())
    metrics.update(_route_metrics(k1_BC, mask_BC, route_B))
    return pg_loss + kd_coef * kd_total / _normaliser(num_tokens), metrics
