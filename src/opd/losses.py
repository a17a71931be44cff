"""Objectives: one protocol, a registry by name (design.md §2, the divergence and granularity axes).

An objective is called once per micro-batch as

    objective(student_logits_BCV, signal, batch, step=step, num_tokens=num_tokens) -> (loss, metrics)

with the student's logits at the completion positions, the teacher's :class:`~opd.signal.TeacherSignal`,
the :class:`~opd.batch.SequenceBatch` (completion ids and mask, sampler log-probs, groups, the
examples behind the rows) and the step. ``num_tokens`` is the completion-token count of the whole
optimizer step over all micro-batches and processes, computed once by the loop; every objective's
token sum is divided by it, so gradient accumulation and data parallelism never change the
objective. The arithmetic lives in the pure functions of :mod:`opd.objectives`; the classes here
only pick what to read from the signal and the batch.

Each objective says which ``form`` of teacher signal it reads (:mod:`opd.signal`), so teachers that
must agree on one (routing) can be asked for it. :data:`OBJECTIVES` maps ``loss.objective`` to a
factory ``(config, vocab_size) -> objective``; :func:`opd.build.build_objective` is the one place that
looks names up. Adding a method is one class and one :func:`register` line (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from opd import objectives
from opd.signal import FORM_LOGITS, FORM_TOKEN_LOGPROBS, FORM_TOPK, TeacherSignal

if TYPE_CHECKING:  # the config validates objective names against OBJECTIVES, so no runtime import back
    from opd.batch import SequenceBatch


class Objective(Protocol):
    """``fused`` (default True when absent): it also takes the student as hidden states and head
    (:class:`opd.fused.HiddenLogits`) instead of logits."""

    form: str | None  # what it reads from the teacher signal (FORM_*), None: something else or nothing

    def __call__(self, student_logits_BCV: torch.Tensor, signal: TeacherSignal, batch: SequenceBatch, *,
                 step: int, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]: ...


OBJECTIVES: dict[str, Callable[[Any, int], Objective]] = {}


def register(name: str) -> Callable[[Callable[[Any, int], Objective]], Callable[[Any, int], Objective]]:
    """Register a factory ``(run config, vocab size) -> objective`` under ``loss.objective`` = ``name``."""
    def add(factory: Callable[[Any, int], Objective]) -> Callable[[Any, int], Objective]:
        OBJECTIVES[name] = factory
        return factory

    return add


@dataclass(frozen=True)
class Common:
    """Settings every objective passes to the pure functions."""

    temperature: float
    vocab_size: int
    chunk_size: int | None

    @classmethod
    def of(cls, config: Any, vocab_size: int) -> Common:
        return cls(config.temperature, vocab_size, config.loss.chunk_size)

    def kwargs(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "vocab_size": self.vocab_size, "chunk_size": self.chunk_size}


def _completion(batch: SequenceBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The batch's completion ids, mask and sampler log-probs on ``device``."""
    sampler_BC = batch.sampler_logprobs_BC.to(device) if batch.sampler_logprobs_BC is not None else None
    return batch.completion_ids_BC.to(device), batch.completion_mask_BC.to(device), sampler_BC


# --- token level: f-divergences against full or top-k teacher distributions ---------------------------


@dataclass(frozen=True)
class TokenDivergence:
    """Sum over positions of D_f(p_T || p_S) (GKD, arXiv 2306.13649, Eq. 2), full teacher logits."""

    kind: str
    beta: float
    alpha: float
    common: Common
    importance_cap: float | None = None  # loss.divergence_importance: weight positions by the capped ratio
    form: str | None = FORM_LOGITS

    def __call__(self, student_logits_BCV: torch.Tensor, signal: TeacherSignal, batch: SequenceBatch, *,
                 step: int, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        ids_BC, mask_BC, sampler_BC = _completion(batch, student_logits_BCV.device)
        weights_BC = None
        if self.importance_cap is not None and sampler_BC is not None:
            with torch.no_grad():
                current_BC = objectives.token_logprobs(student_logits_BCV, ids_BC, **self.common.kwargs())
                weights_BC = objectives.importance_ratio(
                    current_BC, objectives._sampler_or_current(sampler_BC, current_BC), self.importance_cap)
        return objectives.token_divergence(
            student_logits_BCV, signal.require_logits("loss.objective=divergence"), mask_BC, kind=self.kind,
            num_tokens=num_tokens, beta=self.beta, alpha=self.alpha, route_B=signal.route_B, weights_BC=weights_BC,
            **self.common.kwargs(),
        )


@dataclass(frozen=True)
class TopKDivergence:
    """D_f on the teacher's top-k support (tail bucket, renormalised, or LSM, arXiv 2603.25562): what a
    served or cached teacher exposes, or a local one cut to its top-k."""

    kind: str
    k: int
    support: str
    beta: float
    alpha: float
    common: Common
    form: str | None = FORM_TOPK

    def __call__(self, student_logits_BCV: torch.Tensor, signal: TeacherSignal, batch: SequenceBatch, *,
                 step: int, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        _, mask_BC, _ = _completion(batch, student_logits_BCV.device)
        top_lp, top_ids = signal.topk(self.k, mask_BC, **self.common.kwargs())
        return objectives.topk_divergence(
            student_logits_BCV, top_lp, top_ids, mask_BC, kind=self.kind, num_tokens=num_tokens, support=self.support,
            beta=self.beta, alpha=self.alpha, route_B=signal.route_B, **self.common.kwargs(),
        )


@register("divergence")
def _divergence(config: Any, vocab_size: int) -> Objective:
    loss, common = config.loss, Common.of(config, vocab_size)
    if config.teacher.top_k is not None:
        return TopKDivergence(loss.divergence, config.teacher.top_k, loss.topk_support, loss.beta, loss.alpha, common)
    return TokenDivergence(loss.divergence, loss.beta, loss.alpha, common,
                           loss.importance_cap if loss.divergence_importance else None)


@dataclass(frozen=True)
class SequenceNLL:
    """Cross-entropy on the behaviour policy's tokens: SeqKD (Kim & Rush 2016) on teacher text."""

    common: Common
    form: str | None = None

    def __call__(self, student_logits_BCV: torch.Tensor, signal: TeacherSignal, batch: SequenceBatch, *,
                 step: int, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        ids_BC, mask_BC, _ = _completion(batch, student_logits_BCV.device)
        return objectives.sequence_nll(student_logits_BCV, ids_BC, mask_BC, num_tokens=num_tokens,
                                       **self.common.kwargs())


@register("nll")
def _nll(config: Any, vocab_size: int) -> Objective:
    return SequenceNLL(Common.of(config, vocab_size))


# --- policy-gradient forms: sampled-token rewards, sequence rewards -------------------------------------


@dataclass(frozen=True)
class SampledTokenPG:
    """Sampled-token OPD as an importance-sampled policy gradient (Thinking Machines / Tinker recipe),
    with G-OPD / ExOPD's reward extrapolation when ``reward_scale`` != 1 (arXiv 2602.12125)."""

    estimator: str
    gamma: float
    reward_scale: float
    common: Common
    importance_cap: float | None = None
    form: str | None = FORM_TOKEN_LOGPROBS

    def __call__(self, student_logits_BCV: torch.Tensor, signal: TeacherSignal, batch: SequenceBatch, *,
                 step: int, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        ids_BC, mask_BC, sampler_BC = _completion(batch, student_logits_BCV.device)
        kw = self.common.kwargs()
        reference_BC = None
        if signal.reference is not None:
            reference_BC = signal.reference.token_logprobs(ids_BC, **kw)
        return objectives.sampled_token_pg(
            student_logits_BCV, signal.token_logprobs(ids_BC, **kw), ids_BC, mask_BC, num_tokens=num_tokens,
            estimator=self.estimator, gamma=self.gamma, sampler_logprobs_BC=sampler_BC,
            reward_scale=self.reward_scale, reference_logprobs_BC=reference_BC, route_B=signal.route_B,
            importance_cap=self.importance_cap, **kw,
        )


@register("sampled_token_pg")
def _sampled_token_pg(config: Any, vocab_size: int) -> Objective:
    loss = config.loss
    return SampledTokenPG(loss.estimator, loss.gamma, loss.reward_scale, Common.of(config, vocab_size),
                          loss.importance_cap)


@dataclass(frozen=True)
class MiniLLM:
    """Sequence-level reverse KL by clipped policy gradient plus the exact single-step term
    (MiniLLM, arXiv 2306.08543, Eq. 7)."""

    clip_eps: float
    gamma: float
    common: Common
    form: str | None = FORM_LOGITS

    def __call__(self, student_logits_BCV: torch.Tensor, signal: TeacherSignal, batch: SequenceBatch, *,
                 step: int, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        ids_BC, mask_BC, sampler_BC = _completion(batch, student_logits_BCV.device)
        return objectives.minillm(
            student_logits_BCV, signal.require_logits("loss.objective=minillm"), ids_BC, mask_BC,
            num_tokens=num_tokens, sampler_logprobs_BC=sampler_BC, clip_eps=self.clip_eps, gamma=self.gamma,
            route_B=signal.route_B, **self.common.kwargs(),
        )


@register("minillm")
def _minillm(config: Any, vocab_size: int) -> Objective:
    return MiniLLM(config.loss.clip_eps, config.loss.gamma, Common.of(config, vocab_size))


def _group_rewards(signal: TeacherSignal, batch: SequenceBatch, device: torch.device, what: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Completion ids, mask, sampler log-probs, the sequence rewards and their group-normalised advantages."""
    ids_BC, mask_BC, sampler_BC = _completion(batch, device)
    if signal.rewards_B is None or batch.group_B is None:
        raise ValueError(f"{what} needs sequence rewards and the sample groups")
    rewards_B = signal.rewards_B.to(device)
    return ids_BC, mask_BC, sampler_BC, rewards_B, objectives.group_advantages(rewards_B, batch.group_B.to(device))


def kd_coef_at(cfg: Any, step: int) -> float:
    """KDRL's linearly annealed KD weight: ``max(kd_coef - kd_coef_decay * (step - 1), kd_coef_min)``."""
    if cfg.kd_coef_decay == 0.0:
        return cfg.kd_coef
    return max(cfg.kd_coef - cfg.kd_coef_decay * (step - 1), min(cfg.kd_coef_min, cfg.kd_coef))


@dataclass(frozen=True)
class KDRL:
    """Verifier-reward GRPO plus a KD term to the teacher (KDRL, arXiv 2506.02208, Eq. 8); the
    verifier's rewards arrive in ``signal.rewards_B``."""

    loss_cfg: Any
    common: Common
    form: str | None = FORM_TOKEN_LOGPROBS

    def __call__(self, student_logits_BCV: torch.Tensor, signal: TeacherSignal, batch: SequenceBatch, *,
                 step: int, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        ids_BC, mask_BC, sampler_BC, rewards_B, advantages_B = _group_rewards(
            signal, batch, student_logits_BCV.device, "kdrl (the verifier's rewards)")
        kd_mask_B = (rewards_B < 1.0).float() if self.loss_cfg.kd_mask_correct else None
        coef = kd_coef_at(self.loss_cfg, step)
        kw = self.common.kwargs()
        loss, metrics = objectives.kdrl(
            student_logits_BCV, signal.token_logprobs(ids_BC, **kw), ids_BC, mask_BC, advantages_B,
            num_tokens=num_tokens, kd_coef=coef, kd_estimator=self.loss_cfg.kd_estimator, kd_mask_B=kd_mask_B,
            sampler_logprobs_BC=sampler_BC, route_B=signal.route_B, importance_cap=self.loss_cfg.importance_cap, **kw,
        )
        metrics["reward/outcome"] = float(rewards_B.mean().item())
        metrics["loss/kd_coef"] = coef
        return loss, metrics


@register("kdrl")
def _kdrl(config: Any, vocab_size: int) -> Objective:
    return KDRL(config.loss, Common.of(config, vocab_size))


@dataclass(frozen=True)
class DiscriminatorPG:
    """GAD (arXiv 2511.10643): GRPO on the discriminator's score of each student answer (in
    ``signal.rewards_B``); the first ``warmup_steps`` train only the discriminator."""

    warmup_steps: int
    common: Common
    importance_cap: float | None = None
    form: str | None = None

    def __call__(self, student_logits_BCV: torch.Tensor, signal: TeacherSignal, batch: SequenceBatch, *,
                 step: int, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        ids_BC, mask_BC, sampler_BC, rewards_B, advantages_B = _group_rewards(
            signal, batch, student_logits_BCV.device, "gad (the discriminator's rewards)")
        loss, _, metrics = objectives.sequence_reward_pg(
            student_logits_BCV, ids_BC, mask_BC, advantages_B, num_tokens=num_tokens, sampler_logprobs_BC=sampler_BC,
            importance_cap=self.importance_cap, **self.common.kwargs(),
        )
        metrics["reward/discriminator"] = float(rewards_B.mean().item())
        if step <= self.warmup_steps:
            loss = loss * 0.0  # discriminator warm-up: the student does not move yet
        return loss, metrics


@register("gad")
def _gad(config: Any, vocab_size: int) -> Objective:
    return DiscriminatorPG(config.loss.discriminator_warmup_steps, Common.of(config, vocab_size),
                           config.loss.importance_cap)


@dataclass(frozen=True)
class CrossTokenizer:
    """ULD (arXiv 2402.12030), or the GOLD hybrid, on byte-aligned token groups (``signal.cross``)."""

    matched_weight: float | None
    beta: float
    common: Common
    form: str | None = None
    fused = False  # merges rows of the student's full log-softmax: needs the logits themselves

    def __call__(self, student_logits_BCV: torch.Tensor, signal: TeacherSignal, batch: SequenceBatch, *,
                 step: int, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        from opd.cross_tokenizer import cross_tokenizer_loss

        device = student_logits_BCV.device
        ids_BC, _, _ = _completion(batch, device)
        cross = signal.cross
        if cross is None:
            raise ValueError("loss.objective=uld needs a cross-tokenizer teacher's view")
        return cross_tokenizer_loss(
            student_logits_BCV, ids_BC, cross.logits_BCW.to(device), cross.ids_BC.to(device), cross.alignments,
            student_vocab=self.common.vocab_size, teacher_vocab=cross.teacher_vocab, num_groups=num_tokens,
            matched=cross.matched, matched_weight=self.matched_weight, beta=self.beta,
            temperature=self.common.temperature,
        )


@register("uld")
def _uld(config: Any, vocab_size: int) -> Objective:
    return CrossTokenizer(config.loss.uld_matched_weight, config.loss.beta, Common.of(config, vocab_size))


@dataclass(frozen=True)
class KLMix:
    """``(1 - beta) KL(p_T || q) + beta KL(q || p_T)`` per position: a fixed mix of forward and reverse
    KL, the fixed-weight baseline of Adaptive KL (Wu et al., arXiv 2404.02657), and the worked
    example of adding a method in docs/architecture.md."""

    beta: float
    common: Common
    form: str | None = FORM_LOGITS

    def __call__(self, student_logits_BCV: torch.Tensor, signal: TeacherSignal, batch: SequenceBatch, *,
                 step: int, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        _, mask_BC, _ = _completion(batch, student_logits_BCV.device)
        teacher_logits_BCV = signal.require_logits("loss.objective=kl_mix")
        forward, metrics = objectives.token_divergence(
            student_logits_BCV, teacher_logits_BCV, mask_BC, kind="forward_kl", num_tokens=num_tokens,
            route_B=signal.route_B, **self.common.kwargs())
        reverse, reverse_metrics = objectives.token_divergence(
            student_logits_BCV, teacher_logits_BCV, mask_BC, kind="reverse_kl", num_tokens=num_tokens,
            **self.common.kwargs())
        metrics["loss/forward_kl_sum"] = metrics["loss/divergence_sum"]
        metrics["loss/reverse_kl_sum"] = reverse_metrics["loss/divergence_sum"]
        return (1.0 - self.beta) * forward + self.beta * reverse, metrics


@register("kl_mix")
def _kl_mix(config: Any, vocab_size: int) -> Objective:
    return KLMix(config.loss.beta, Common.of(config, vocab_size))


# --- add-on terms ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WithEntropyGatedForwardKL:
    """Entropy-aware OPD (arXiv 2603.07079): ``objective`` plus ``coef`` times forward KL where the
    teacher's entropy is at least ``threshold`` nats (:func:`opd.objectives.entropy_gated_forward_kl`)."""

    objective: Objective
    threshold: float
    coef: float
    top_k: int | None
    common: Common
    form: str | None = FORM_LOGITS

    def __call__(self, student_logits_BCV: torch.Tensor, signal: TeacherSignal, batch: SequenceBatch, *,
                 step: int, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = self.objective(student_logits_BCV, signal, batch, step=step, num_tokens=num_tokens)
        _, mask_BC, _ = _completion(batch, student_logits_BCV.device)
        extra, extra_metrics = objectives.entropy_gated_forward_kl(
            student_logits_BCV, signal.require_logits("loss.entropy_threshold"), mask_BC, num_tokens=num_tokens,
            threshold=self.threshold, top_k=self.top_k, **self.common.kwargs(),
        )
        metrics.update(extra_metrics)
        return loss + self.coef * extra, metrics
