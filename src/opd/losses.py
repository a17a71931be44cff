"""Where a recipe's loss is assembled: one micro-batch, the configured objective.

A recipe is a combination of a behaviour policy (``opd.rollout``), a teacher signal
(``opd.teachers``: full logits, top-k, sampled-token log-probs, text), a divergence
(``opd.divergences``) and a granularity (``opd.objectives``). :func:`micro_batch_loss` reads
the run config and calls the pure loss functions with what the teacher gave;
:func:`routed_loss` does the same per teacher when rows are routed to several.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from opd import divergences, objectives
from opd.cache import TeacherSignal
from opd.config import RunConfig
from opd.errors import OpdError
from opd.rollout import SequenceBatch
from opd.verifiers import batch_rewards


def routed_loss(
    config: RunConfig, batch: SequenceBatch, student_logits_BCV: torch.Tensor, default_teacher: Any,
    routed: dict[str, Any], *, step: int, num_tokens: float, vocab_size: int, tokenizer: Any, verifier: Any,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, float], float]:
    """Multi-teacher routing (the MiMo / MOPD pattern): each row is scored by the teacher its
    ``data.teacher_field`` names (the default teacher when absent); every group's loss uses the
    same global normaliser, so the sum equals one loss over the whole batch."""
    field_name = config.data.teacher_field
    groups: dict[str, list[int]] = {}
    for row, example in enumerate(batch.examples or []):
        groups.setdefault(str(example.extra.get(field_name) or "default"), []).append(row)
    total = student_logits_BCV.sum() * 0.0
    metrics: dict[str, float] = {}
    teacher_seconds = 0.0
    for name, rows in groups.items():
        teacher = routed.get(name, default_teacher)
        sub = batch.select(rows)
        cfg = config if name not in routed else config.model_copy(update={"teacher": config.teachers[name]})
        started = time.perf_counter()
        with torch.no_grad():
            scored = teacher.score(sub)
            if isinstance(scored, torch.Tensor):
                scored = scored.to(device)
        teacher_seconds += time.perf_counter() - started
        index = torch.tensor(rows, device=student_logits_BCV.device)
        loss, group_metrics = micro_batch_loss(
            cfg, sub, student_logits_BCV.index_select(0, index), scored, step=step, num_tokens=num_tokens,
            vocab_size=vocab_size, tokenizer=tokenizer, verifier=verifier,
        )
        total = total + loss
        for key, value in group_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value
        signal = next((v for k, v in group_metrics.items() if k in (
            "loss/divergence_sum", "teacher/reverse_kl_k1_sum")), 0.0)
        metrics[f"routes/{name}/tokens"] = metrics.get(f"routes/{name}/tokens", 0.0) + float(sub.num_tokens)
        metrics[f"routes/{name}/signal_sum"] = metrics.get(f"routes/{name}/signal_sum", 0.0) + signal
    return total, metrics, teacher_seconds


def kd_coef_at(cfg: Any, step: int) -> float:
    """KDRL's linearly annealed KD weight: ``max(kd_coef - kd_coef_decay * (step - 1), kd_coef_min)``."""
    if cfg.kd_coef_decay == 0.0:
        return cfg.kd_coef
    return max(cfg.kd_coef - cfg.kd_coef_decay * (step - 1), min(cfg.kd_coef_min, cfg.kd_coef))


def micro_batch_loss(
    config: RunConfig,
    batch: SequenceBatch,
    student_logits_BCV: torch.Tensor,
    teacher_logits_BCV: torch.Tensor | TeacherSignal | None,
    *,
    step: int,
    num_tokens: float,
    vocab_size: int,
    tokenizer: Any = None,
    verifier: Any = None,
    reference: Any = None,
    rewards_B: torch.Tensor | None = None,
    cross: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured objective on one micro-batch: the one place a recipe's loss is assembled."""
    loss_cfg, temperature = config.loss, config.temperature
    device = student_logits_BCV.device
    mask_BC = batch.completion_mask_BC.to(device)
    ids_BC = batch.completion_ids_BC.to(device)
    sampler_BC = batch.sampler_logprobs_BC.to(device) if batch.sampler_logprobs_BC is not None else None
    common = {"temperature": temperature, "vocab_size": vocab_size, "chunk_size": loss_cfg.chunk_size}
    metrics: dict[str, float] = {}
    if loss_cfg.objective == "nll":
        return objectives.sequence_nll(student_logits_BCV, ids_BC, mask_BC, num_tokens=num_tokens, **common)
    if loss_cfg.objective == "uld":
        from opd.cross_tokenizer import cross_tokenizer_loss

        assert cross is not None
        return cross_tokenizer_loss(
            student_logits_BCV, ids_BC, cross["logits"].to(device), cross["ids"].to(device), cross["alignments"],
            student_vocab=vocab_size, teacher_vocab=cross["teacher_vocab"], num_groups=num_tokens,
            matched=cross["matched"], matched_weight=loss_cfg.uld_matched_weight, beta=loss_cfg.beta,
            temperature=temperature,
        )
    if loss_cfg.objective == "gad":
        assert rewards_B is not None and batch.group_B is not None
        advantages_B = objectives.group_advantages(rewards_B, batch.group_B.to(device))
        loss, _, metrics = objectives.sequence_reward_pg(
            student_logits_BCV, ids_BC, mask_BC, advantages_B, num_tokens=num_tokens,
            sampler_logprobs_BC=sampler_BC, **common,
        )
        metrics["reward/discriminator"] = float(rewards_B.mean().item())
        return loss, metrics
    assert teacher_logits_BCV is not None
    # Served and cached teachers give log-probs of the sampled tokens and their top-k, not logits.
    signal = teacher_logits_BCV if isinstance(teacher_logits_BCV, TeacherSignal) else None
    if signal is not None and not (loss_cfg.objective in ("sampled_token_pg", "kdrl") or (
            loss_cfg.objective == "divergence" and config.teacher.top_k is not None)):
        raise OpdError(f"teacher.kind={config.teacher.kind} gives sampled-token and top-k log-probs only; use "
                       "loss.objective=sampled_token_pg / kdrl, or divergence with teacher.top_k")
    if loss_cfg.objective == "divergence" and config.teacher.top_k is not None:
        if signal is not None:
            k = config.teacher.top_k
            top_lp, top_ids = signal.topk_logprobs_BCK[..., :k].to(device), signal.topk_ids_BCK[..., :k].to(device)
        else:
            top_lp, top_ids = divergences.teacher_topk(teacher_logits_BCV, config.teacher.top_k, mask_BC.bool(),
                                                       **common)
        loss, metrics = objectives.topk_divergence(
            student_logits_BCV, top_lp, top_ids, mask_BC, kind=loss_cfg.divergence, num_tokens=num_tokens,
            support=loss_cfg.topk_support, beta=loss_cfg.beta, alpha=loss_cfg.alpha, **common,
        )
    elif loss_cfg.objective == "divergence":
        loss, metrics = objectives.token_divergence(
            student_logits_BCV, teacher_logits_BCV, mask_BC, kind=loss_cfg.divergence, num_tokens=num_tokens,
            beta=loss_cfg.beta, alpha=loss_cfg.alpha, **common,
        )
    elif loss_cfg.objective == "minillm":
        loss, metrics = objectives.minillm(
            student_logits_BCV, teacher_logits_BCV, ids_BC, mask_BC, num_tokens=num_tokens,
            sampler_logprobs_BC=sampler_BC, clip_eps=loss_cfg.clip_eps, gamma=loss_cfg.gamma, **common,
        )
    else:
        if signal is not None:
            teacher_lp_BC = signal.token_logprobs_BC.to(device)
        else:
            with torch.no_grad():
                teacher_lp_BC = objectives.token_logprobs(teacher_logits_BCV, ids_BC, **common)
        if loss_cfg.objective == "sampled_token_pg":
            reference_lp_BC = None
            if reference is not None:
                with torch.no_grad():
                    reference_lp_BC = objectives.token_logprobs(reference.score(batch).to(device), ids_BC, **common)
            loss, metrics = objectives.sampled_token_pg(
                student_logits_BCV, teacher_lp_BC, ids_BC, mask_BC, num_tokens=num_tokens,
                estimator=loss_cfg.estimator, gamma=loss_cfg.gamma, sampler_logprobs_BC=sampler_BC,
                reward_scale=loss_cfg.reward_scale, reference_logprobs_BC=reference_lp_BC, **common,
            )
        else:  # kdrl
            assert batch.examples is not None and batch.group_B is not None
            texts = tokenizer.batch_decode(
                [ids_BC[i, : int(mask_BC[i].sum())].tolist() for i in range(ids_BC.shape[0])],
                skip_special_tokens=True,
            )
            rewards_B = torch.tensor(
                batch_rewards(verifier, [e.prompt for e in batch.examples], texts,
                              [e.answer for e in batch.examples]), dtype=torch.float32, device=device,
            )
            advantages_B = objectives.group_advantages(rewards_B, batch.group_B.to(device))
            kd_mask_B = (rewards_B < 1.0).float() if loss_cfg.kd_mask_correct else None
            coef = kd_coef_at(loss_cfg, step)
            loss, metrics = objectives.kdrl(
                student_logits_BCV, teacher_lp_BC, ids_BC, mask_BC, advantages_B, num_tokens=num_tokens,
                kd_coef=coef, kd_estimator=loss_cfg.kd_estimator, kd_mask_B=kd_mask_B,
                sampler_logprobs_BC=sampler_BC, **common,
            )
            metrics["reward/outcome"] = float(rewards_B.mean().item())
            metrics["loss/kd_coef"] = coef
    if loss_cfg.entropy_threshold is not None:
        extra, extra_metrics = objectives.entropy_gated_forward_kl(
            student_logits_BCV, teacher_logits_BCV, mask_BC, num_tokens=num_tokens,
            threshold=loss_cfg.entropy_threshold, top_k=loss_cfg.entropy_top_k, **common,
        )
        loss = loss + loss_cfg.entropy_coef * extra
        metrics.update(extra_metrics)
    return loss, metrics
