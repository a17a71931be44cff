"""``opd doctor CONFIG [key=value ...]``: a preflight of a distillation run, before GPU hours are spent.

It loads exactly what ``opd train`` would load (:func:`opd.build.build_run`), writes one micro-batch
of rollouts, scores it, computes the loss and its gradient — and never takes an optimizer step.
Then it prints one line per check::

    PASS / WARN / FAIL / SKIP: <check>: <the number behind the verdict> — <what it means, what to do>

(indented lines below give the details) and exits with 1 when any check FAILs. SKIP means the
check does not apply to this run (e.g. no served teacher to compare with a local one).

The checks (thresholds in :class:`Thresholds`, each settable with ``--threshold NAME=VALUE``):

``template``     tokenizer and chat-template agreement: the same token ids and EOS / special tokens
                 on both sides, and the prompt the teacher actually sees, rendered — a teacher scored
                 under the student's chat template (tinker-cookbook #796) fails here.
``objective``    the divergence, its direction and the temperature the recipe implies, in words, and
                 for full-logit divergences the loss checked against the definition computed
                 independently (a swapped KL direction or an ignored temperature fails); the loss
                 and its gradient must be finite.
``signal``       a served or cached teacher's log-probs against a local recomputation with the same
                 model at the run's temperature (max and mean absolute difference, and relative to
                 the distillation signal itself); a served teacher is also asked twice (replicas or
                 batching that disagree: SkyRL #2256; temperature ignored for prompt log-probs:
                 slime #2085 / #2325).
``sampler``      the sampler's log-probs of its own tokens (opd's decoding loop or vLLM) against the
                 student's own forward under the same temperature / top-p / top-k: stale engine
                 weights or a mismatched sampling setup fail here.
``topk``         top-k overlap on the student's samples (:func:`opd.diagnostics.topk_overlap`):
                 the teacher's mass in its own top-k, the student's mass in the teacher's top-k,
                 the teacher's mass in the student's top-k, and how often the sampled token is
                 outside the teacher's top-k. Verdicts only where the run uses a top-k signal.
``calibration``  the teacher's success continuing the student's answers cut at 25/50/75 %, against
                 the same cuts of its own answers, graded by the run's scorer
                 (:func:`opd.diagnostics.calibration_at_cuts`).
``length``       length and EOS behaviour of the student's samples, against the teacher's answers.
``memory``       what one training step needs, estimated from the shapes, against what the device has.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from opd import diagnostics
from opd.build import Run, build_run
from opd.cache import CachedTeacher
from opd.config import RunConfig, TeacherConfig
from opd.data import Example
from opd.divergences import auto_chunk_size, per_token_reference
from opd.errors import ConfigError, OpdError
from opd.losses import (
    KDRL,
    CrossTokenizer,
    DiscriminatorPG,
    KLMix,
    MiniLLM,
    SampledTokenPG,
    SequenceNLL,
    TokenDivergence,
    TopKDivergence,
    WithEntropyGatedForwardKL,
)
from opd.models import completion_logits, load_tokenizer
from opd.rollout import CoSampler, SamplingParams, filtered_logprobs, stop_token_ids
from opd.teachers import LocalTeacher, SelfTeacher, ServedTeacher, own_template_prompts

CHECKS = ("template", "objective", "signal", "sampler", "topk", "calibration", "length", "memory")
STATUSES = ("PASS", "WARN", "FAIL", "SKIP")


@dataclass
class Thresholds:
    """Where PASS turns into WARN and WARN into FAIL; names are ``--threshold NAME=VALUE`` keys."""

    signal_mean_warn: float = 0.02  # nats: mean |served - local| log-prob of the completion tokens
    signal_mean_fail: float = 0.1
    signal_max_warn: float = 0.5  # nats: the largest single difference
    signal_ratio_fail: float = 0.25  # mean difference / mean |log p_T - log p_S| (the distillation signal)
    sampler_mean_warn: float = 0.02  # nats: mean |sampler - student forward| log-prob
    sampler_mean_fail: float = 0.1
    topk_mass_warn: float = 0.9  # teacher mass in its top-k; student mass in the teacher's top-k
    topk_mass_fail: float = 0.5
    topk_outside_warn: float = 0.1  # sampled tokens outside the teacher's top-k
    topk_outside_fail: float = 0.5
    calibration_warn: float = 0.8  # success from student prefixes / success from the teacher's own
    calibration_fail: float = 0.5
    truncated_warn: float = 0.1  # student answers that run into max_new_tokens
    truncated_fail: float = 0.5
    empty_warn: float = 0.1  # student answers with nothing before EOS
    empty_fail: float = 0.5
    length_ratio_warn: float = 2.0  # student mean length vs the teacher's, either way
    memory_warn: float = 0.8  # estimated step memory / available memory
    memory_fail: float = 1.0
    objective_rtol: float = 1e-3  # loss vs the independently computed divergence

    @classmethod
    def parse(cls, items: list[str]) -> Thresholds:
        known = {f.name for f in fields(cls)}
        values: dict[str, float] = {}
        for item in items:
            name, sep, raw = item.partition("=")
            name = name.strip()
            if not sep or name not in known:
                raise ConfigError(f"--threshold {item!r}: use NAME=VALUE with NAME one of {', '.join(sorted(known))}")
            try:
                values[name] = float(raw)
            except ValueError:
                raise ConfigError(f"--threshold {item!r}: {raw!r} is not a number") from None
        return cls(**values)


@dataclass
class Options:
    only: tuple[str, ...] = CHECKS
    prompts: int = 16  # prompts for calibration and length
    top_k: int = diagnostics.DEFAULT_TOP_K  # overlap k when the run has no teacher.top_k
    local_teacher: str | None = None  # a local copy of a served / cached teacher
    memory_gb: float | None = None  # memory one step may use (default: the device's)
    thresholds: Thresholds = field(default_factory=Thresholds)
    debug: bool = False  # let a check's unexpected exception propagate (its traceback) instead of a FAIL line


@dataclass
class Check:
    name: str
    status: str
    number: str  # the measurement behind the verdict
    advice: str  # what it means / what to do
    details: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.status}: {self.name}: {self.number} — {self.advice}"


def _grade(value: float, warn: float, fail: float, *, higher_is_better: bool) -> str:
    if not math.isfinite(value):
        return "FAIL"
    if higher_is_better:
        return "FAIL" if value < fail else "WARN" if value < warn else "PASS"
    return "FAIL" if value > fail else "WARN" if value > warn else "PASS"


def _worst(*statuses: str) -> str:
    order = {"PASS": 0, "SKIP": 0, "WARN": 1, "FAIL": 2}
    return max(statuses, key=lambda s: order[s])


# --- what the checks share: one rollout micro-batch, its signal, the student's logits ------------------------


class _Probe:
    """The run plus what several checks read, each computed once on first use."""

    def __init__(self, config: RunConfig, run: Run, accelerator: Any, options: Options) -> None:
        self.config = config
        self.run = run
        self.accelerator = accelerator
        self.options = options
        self.device = accelerator.device
        self.teacher = run.teachers.get("")  # the main teacher model (None: text from the data, or a cache)
        self._cache: dict[str, Any] = {}

    def _once(self, key: str, make: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def policy(self) -> Any:
        return getattr(self.run.rollouts, "policy", None)

    @property
    def params(self) -> SamplingParams:
        """The behaviour policy's sampling settings at full length (not a Prefix-OPD step's)."""
        c = self.config
        return SamplingParams(c.rollout.max_new_tokens, c.temperature, c.rollout.top_p, c.rollout.top_k,
                              vocab_size=self.run.vocab_size)

    @property
    def batch(self) -> Any:
        """One micro-batch written by the run's own rollouts; all student samples when there is a
        student sampler (lambda forced to 1), so every check sees the student's own text."""
        def make() -> Any:
            with self.accelerator.autocast():
                if self.policy is not None:
                    rows = self.run.rollouts.stream.next(self.config.train.batch_size)
                    batch, _ = self.policy.rollout(self.run.student, rows, on_policy_fraction=1.0)
                else:
                    batches, _ = self.run.rollouts.next_step(self.run.student, 1)
                    batch = batches[0]
            return batch
        return self._once("batch", make)

    @property
    def signal(self) -> Any:
        def make() -> Any:
            # As in the training loop: teachers take no gradient themselves, and a signal source that
            # learns (GAD's discriminator takes its update step here) needs autograd on.
            with self.accelerator.autocast():
                return self.run.teacher.score(self.batch).to(self.device).with_logits()
        return self._once("signal", make)

    def student_logits(self, grad: bool = False) -> torch.Tensor:
        batch = self.batch

        def forward() -> torch.Tensor:
            with self.accelerator.autocast():
                return completion_logits(self.run.student, batch.input_ids_BT.to(self.device),
                                         batch.attention_mask_BT.to(self.device), batch.completion_len)
        if grad:
            return forward()
        return self._once("student_logits", lambda: _no_grad(forward))

    @property
    def examples(self) -> list[Example]:
        """Prompts for calibration and length: the eval set's (it has references), else the training set's."""
        def make() -> list[Example]:
            pool = self.run.evaluator.examples or [e for e in getattr(self.run.rollouts.stream, "examples", [])
                                                   if isinstance(e, Example)]
            return list(pool[: self.options.prompts])
        return self._once("examples", make)

    @property
    def student_answers(self) -> list[list[int]]:
        def make() -> list[list[int]]:
            with self.accelerator.autocast():
                return diagnostics.student_answers(self.run.student, self.examples, self.params, self.run.tokenizer,
                                                   self.config.eval.batch_size)
        return self._once("student_answers", make)

    @property
    def teacher_answers(self) -> list[list[int]]:
        def make() -> list[list[int]]:
            outs: list[list[int]] = []
            size = self.config.eval.batch_size
            with torch.no_grad():
                for start in range(0, len(self.examples), size):
                    outs.extend(self.teacher.generate([e.prompt_ids for e in self.examples[start : start + size]],
                                                      self.params))
            return outs
        return self._once("teacher_answers", make)

    @property
    def stops(self) -> set[int]:
        return set(stop_token_ids(self.run.student, self.run.tokenizer))


def _no_grad(fn: Any) -> Any:
    with torch.no_grad():
        return fn()


# --- template --------------------------------------------------------------------------------------------


def generation_suffix(tokenizer: Any) -> str | None:
    """What a chat template appends after the user's text to open the assistant's turn."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    sentinel = "OPD_DOCTOR_SENTINEL"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # a template that needs more than one user turn: nothing to compare
        return None
    return text.split(sentinel, 1)[1] if sentinel in text else None


def _teacher_tokenizer(probe: _Probe) -> Any:
    teacher = probe.teacher
    if isinstance(teacher, ServedTeacher):
        if teacher.teacher_tokenizer is not None:
            return teacher.teacher_tokenizer
        local = _local_teacher_path(probe)
        return load_tokenizer(local) if local else None
    return getattr(teacher, "tokenizer", None)


def _teacher_view(probe: _Probe, teacher_tok: Any) -> tuple[list[int], bool]:
    """The first row's prompt as the teacher receives it (ids in its tokenizer) and whether the
    teacher has its own vocabulary."""
    batch, teacher = probe.batch, probe.teacher
    row = batch.input_ids_BT[0, : batch.prompt_len][batch.attention_mask_BT[0, : batch.prompt_len].bool()].tolist()
    if isinstance(teacher, SelfTeacher) and batch.examples:
        return teacher.teacher_prompt_ids(batch.examples[0]), False
    if isinstance(teacher, LocalTeacher) and teacher.student_tokenizer is not None:
        text = probe.run.tokenizer.decode(row, skip_special_tokens=True)
        return teacher_tok(text).input_ids, True
    own = None
    if isinstance(teacher, LocalTeacher):
        own = own_template_prompts(batch.select([0]), teacher.tokenizer, teacher.student_template)
    elif isinstance(teacher, ServedTeacher) and teacher.teacher_tokenizer is not None:
        own = own_template_prompts(batch.select([0]), teacher.teacher_tokenizer, teacher.chat_template)
    return (own[0] if own else row), False


def check_template(probe: _Probe) -> Check:
    student_tok, teacher = probe.run.tokenizer, probe.teacher
    if teacher is None or isinstance(probe.run.teacher, CachedTeacher):
        return Check("template", "SKIP", "no teacher model", "the teacher's text comes from the data or a cache")
    teacher_tok = _teacher_tokenizer(probe)
    served = isinstance(teacher, ServedTeacher)
    if teacher_tok is None:
        return Check("template", "WARN", "teacher tokenizer unknown",
                     "the served teacher's tokenizer is not known here, so neither its ids nor its chat template "
                     "can be compared: set teacher.tokenizer to a local copy (or pass --local-teacher PATH)")
    details: list[str] = []
    view, own_vocab = _teacher_view(probe, teacher_tok)
    batch = probe.batch
    student_row = batch.input_ids_BT[0, : batch.prompt_len][batch.attention_mask_BT[0, : batch.prompt_len].bool()]
    student_text = student_tok.decode(student_row.tolist(), skip_special_tokens=False)
    teacher_text = teacher_tok.decode(view, skip_special_tokens=False)
    details.append(f"student sees: {student_text[-160:]!r}")
    details.append(f"teacher sees: {teacher_text[-160:]!r}")
    status, problems = "PASS", []
    differing = 0
    if not own_vocab:
        s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
        differing = sum(1 for tok, idx in s_vocab.items() if t_vocab.get(tok) != idx) + \
            sum(1 for tok in t_vocab if tok not in s_vocab)
        if differing:
            status = "FAIL"
            problems.append(f"{differing} tokens map to other ids: pick a teacher of the same tokenizer family "
                            "(or a cross-tokenizer teacher)")
        if student_tok.eos_token_id != teacher_tok.eos_token_id:
            status = "FAIL"
            problems.append(f"EOS differs (student {student_tok.eos_token!r} = {student_tok.eos_token_id}, teacher "
                            f"{teacher_tok.eos_token!r} = {teacher_tok.eos_token_id})")
        s_special = {t: student_tok.convert_tokens_to_ids(t) for t in student_tok.all_special_tokens}
        t_special = {t: teacher_tok.convert_tokens_to_ids(t) for t in teacher_tok.all_special_tokens}
        only = sorted(set(s_special) ^ set(t_special))
        if only:
            status = _worst(status, "WARN")
            problems.append(f"special tokens on one side only: {', '.join(only[:5])}")
        model = getattr(teacher, "model", None)
        if model is not None and set(stop_token_ids(model, teacher_tok)) != probe.stops:
            status = _worst(status, "WARN")
            problems.append(f"the teacher stops at ids {sorted(stop_token_ids(model, teacher_tok))}, the student at "
                            f"{sorted(probe.stops)}: generation_config.eos_token_id differs")
    details.append(f"EOS: student {student_tok.eos_token!r} ({student_tok.eos_token_id}), teacher "
                   f"{teacher_tok.eos_token!r} ({teacher_tok.eos_token_id})")
    t_suffix, s_suffix = generation_suffix(teacher_tok), generation_suffix(student_tok)
    ends = teacher_text.rstrip()
    if t_suffix and t_suffix.strip():
        if ends.endswith(t_suffix.rstrip()):
            pass
        elif s_suffix and s_suffix.strip() and ends.endswith(s_suffix.rstrip()):
            status = "FAIL"
            fix = ("set teacher.tokenizer to a local copy of the served model's tokenizer, so chat prompts are "
                   "rendered with its own template" if served else
                   "give chat `messages` rows (opd renders them with each model's own template) instead of prompts "
                   "pre-rendered with the student's")
            problems.append(f"the teacher sees the student's chat template ({s_suffix.strip()!r}) instead of its "
                            f"own ({t_suffix.strip()!r}): {fix}")
        else:
            status = _worst(status, "WARN")
            problems.append(f"the teacher's prompt does not end with its chat template's assistant header "
                            f"({t_suffix.strip()!r}): plain-text prompts reach it unrendered")
    elif s_suffix and s_suffix.strip() and ends.endswith(s_suffix.rstrip()) and \
            getattr(teacher_tok, "chat_template", None) != getattr(student_tok, "chat_template", None):
        status = _worst(status, "WARN")
        problems.append(f"the teacher has no chat template of its own but sees the student's ({s_suffix.strip()!r}): "
                        "fine only if it was trained on that format")
    number = "own vocabulary (text / byte aligned)" if own_vocab else f"{differing} differing ids"
    if problems:
        return Check("template", status, number, "; ".join(problems), details)
    what = "the same tokenizer" if not own_vocab else "its own tokenizer"
    templ = "its own chat template" if t_suffix else "no chat template: plain prompts shared as they are"
    return Check("template", "PASS", number, f"{what}, EOS and special tokens agree; the teacher sees {templ}",
                 details)


# --- objective -------------------------------------------------------------------------------------------

_DIRECTION = {
    "forward_kl": "forward KL, KL(p_T || p_S): mode-covering, the student spreads over all the teacher's answers",
    "reverse_kl": "reverse KL, KL(p_S || p_T): mode-seeking, the student settles on the teacher's main modes",
    "tv": "total variation, |p_T - p_S| / 2: symmetric and bounded",
}
_SWAPPED = {"forward_kl": "reverse_kl", "reverse_kl": "forward_kl", "skew_forward_kl": "skew_reverse_kl",
            "skew_reverse_kl": "skew_forward_kl"}


def _divergence_words(kind: str, beta: float, alpha: float) -> str:
    if kind in _DIRECTION:
        return _DIRECTION[kind]
    if kind == "jsd":
        return (f"generalized JSD(beta={beta:g}): between forward KL (beta 0) and reverse KL (beta 1), "
                + ("mode-seeking side" if beta > 0.5 else "mode-covering side" if beta < 0.5 else "symmetric"))
    if kind == "skew_forward_kl":
        return f"skew forward KL, KL(p_T || {alpha:g} p_T + {1 - alpha:g} p_S): mode-covering, bounded"
    return f"skew reverse KL, KL(p_S || {1 - alpha:g} p_T + {alpha:g} p_S): mode-seeking, bounded"


def describe(config: RunConfig, objective: Any, vocab_size: int) -> str:
    """The method the config implies, in words."""
    r, t = config.rollout, config.temperature
    low, high = r.on_policy_range()
    source = "the dataset's answers" if r.off_policy_source == "dataset" else "the teacher's samples"
    if low == high == 1.0:
        writer = "the student writes every answer"
    elif low == high == 0.0:
        writer = f"{source} are the answers (off-policy)"
    elif low == high:
        writer = f"each answer is the student's with probability {low:g}, else {source}"
    else:
        writer = f"each answer is the student's with a scheduled probability {low:g} to {high:g}, else {source}"
    if r.sampler == "mixture":
        writer += f", its tokens drawn from (1-{r.mixture_alpha:g}) p_S + {r.mixture_alpha:g} p_T"
    elif r.sampler == "speculative":
        writer += f", its tokens outside the teacher's top-{r.speculative_top_k} replaced by the teacher's"
    filters = "".join([f", top-p {r.top_p:g}" if r.top_p < 1 else "", f", top-k {r.top_k}" if r.top_k else ""])
    sampling = writer if high == 0.0 else f"{writer}; the student samples at T = {t:g}{filters}"
    inner = objective.objective if isinstance(objective, WithEntropyGatedForwardKL) else objective
    scaled = f"both sides scaled by 1/T = {1 / t:g}" if t != 1 else "both sides at T = 1 (unscaled)"
    if isinstance(inner, TokenDivergence):
        what = f"{_divergence_words(inner.kind, inner.beta, inner.alpha)}, on the full vocabulary ({vocab_size})"
    elif isinstance(inner, TopKDivergence):
        support = {"tail": "plus a tail bucket for the rest", "renormalize": "both renormalised on it",
                   "teacher_renormalized": "teacher renormalised on it"}[inner.support]
        what = f"{_divergence_words(inner.kind, inner.beta, inner.alpha)}, on the teacher's top-{inner.k} ({support})"
    elif isinstance(inner, KLMix):
        what = f"{1 - inner.beta:g} x forward KL + {inner.beta:g} x reverse KL per token"
    elif isinstance(inner, SampledTokenPG):
        what = (f"policy gradient with the sampled-token reward log p_T(y) - log p_S(y) ({inner.estimator}, a "
                f"one-sample reverse-KL estimate), discount {inner.gamma:g}"
                + (f", reward extrapolated x{inner.reward_scale:g} past p_ref" if inner.reward_scale != 1 else ""))
    elif isinstance(inner, MiniLLM):
        what = "sequence-level reverse KL by clipped policy gradient plus the exact single-step term (MiniLLM)"
    elif isinstance(inner, KDRL):
        what = "verifier-reward GRPO plus a reverse-KL term to the teacher (KDRL)"
    elif isinstance(inner, SequenceNLL):
        what = "cross-entropy on the behaviour policy's tokens (no teacher distribution)"
    elif isinstance(inner, DiscriminatorPG):
        what = "policy gradient on a discriminator's score of each answer (GAD: the teacher gives text only)"
    elif isinstance(inner, CrossTokenizer):
        what = ("cross-tokenizer distillation on byte-aligned token groups (ULD"
                + (", GOLD hybrid on the shared tokens)" if config.loss.uld_hybrid else ")"))
    else:
        what = type(inner).__name__
    if isinstance(objective, WithEntropyGatedForwardKL):
        what += f", plus forward KL where the teacher's entropy >= {objective.threshold:g} nats"
    return f"{what}; {sampling}; {scaled}"


def _reference(kind: str, student_BCV: torch.Tensor, teacher_BCV: torch.Tensor, mask_BC: torch.Tensor, *,
               beta: float, alpha: float, temperature: float, vocab: int, num_tokens: float) -> float:
    """The divergence from its definition (:func:`opd.divergences.per_token_reference`), a few rows at a time."""
    rows = mask_BC.reshape(-1).bool().nonzero().squeeze(-1).to(student_BCV.device)
    s_NV = student_BCV.reshape(-1, student_BCV.shape[-1])
    t_NV = teacher_BCV.reshape(-1, teacher_BCV.shape[-1]).to(student_BCV.device)
    total, chunk = 0.0, max(1, auto_chunk_size(vocab) // 4)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start : start + chunk]
        total += float(per_token_reference(kind, s_NV[idx, :vocab].double(), t_NV[idx, :vocab].double(), beta=beta,
                                           alpha=alpha, temperature=temperature).sum())
    return total / max(num_tokens, 1.0)


def _candidates(objective: Any, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float,
                vocab: int, n: float) -> dict[str, float]:
    """The stated divergence and the mistakes it could be confused with, computed independently."""
    def ref(kind: str, t: float, beta: float = 0.5, alpha: float = 0.1) -> float:
        return _reference(kind, student, teacher, mask, beta=beta, alpha=alpha, temperature=t, vocab=vocab,
                          num_tokens=n)

    out: dict[str, float] = {}
    if isinstance(objective, TokenDivergence):
        kind, beta, alpha = objective.kind, objective.beta, objective.alpha
        out["stated"] = ref(kind, temperature, beta, alpha)
        if kind in _SWAPPED:
            out[f"{_SWAPPED[kind]} (direction swapped)"] = ref(_SWAPPED[kind], temperature, beta, alpha)
        elif kind == "jsd" and beta != 0.5:
            out[f"JSD(beta={1 - beta:g}) (beta swapped)"] = ref(kind, temperature, 1 - beta, alpha)
        if temperature != 1:
            out["the same at T = 1 (temperature ignored)"] = ref(kind, 1.0, beta, alpha)
    elif isinstance(objective, KLMix):
        fkl, rkl = ref("forward_kl", temperature), ref("reverse_kl", temperature)
        out["stated"] = (1 - objective.beta) * fkl + objective.beta * rkl
        if objective.beta != 0.5:
            out["the weights swapped"] = objective.beta * fkl + (1 - objective.beta) * rkl
        if temperature != 1:
            out["the same at T = 1 (temperature ignored)"] = (1 - objective.beta) * ref("forward_kl", 1.0) + \
                objective.beta * ref("reverse_kl", 1.0)
    return out


def check_objective(probe: _Probe) -> Check:
    config, run = probe.config, probe.run
    words = describe(config, run.objective, run.vocab_size)
    batch, signal = probe.batch, probe.signal
    student = run.student
    logits = probe.student_logits(grad=True)
    num_tokens = float(max(batch.num_tokens, 1))
    with probe.accelerator.autocast():
        loss, _ = run.objective(logits, signal, batch, step=1, num_tokens=num_tokens)
    value = float(loss.detach())
    loss.backward()
    grads = [p.grad.detach().float().norm() for p in student.parameters() if p.grad is not None]
    grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
    student.zero_grad(set_to_none=True)
    details = [f"the recipe: {words}"]  # shown with a FAIL; a PASS line states it itself
    if not (math.isfinite(value) and math.isfinite(grad_norm)):
        return Check("objective", "FAIL", f"loss {value:.4g}, gradient norm {grad_norm:.4g}",
                     "the loss or its gradient is not finite on the first batch: check the models' dtypes, "
                     "the teacher's signal and optim settings before training", details)
    inner = run.objective.objective if isinstance(run.objective, WithEntropyGatedForwardKL) else run.objective
    teacher_logits = signal.logits_BCV
    if isinstance(inner, (TokenDivergence, KLMix)) and teacher_logits is not None \
            and not isinstance(run.objective, WithEntropyGatedForwardKL):
        candidates = _candidates(inner, logits.detach(), teacher_logits.detach(), batch.completion_mask_BC,
                                 config.temperature, run.vocab_size, num_tokens)
        stated = candidates.pop("stated")
        tol = probe.options.thresholds.objective_rtol
        close = abs(value - stated) <= tol * max(abs(stated), 1e-6) + 1e-6
        others = ", ".join(f"{name} {v:.5g}" for name, v in candidates.items())
        number = f"loss {value:.5g} vs the definition {stated:.5g}" + (f" ({others})" if others else "")
        if close:
            same = [name for name, v in candidates.items() if abs(v - stated) <= tol * max(abs(stated), 1e-6) + 1e-6]
            note = f" (on this batch it cannot be told apart from {', '.join(same)})" if same else ""
            return Check("objective", "PASS", number, f"the loss is what the recipe says{note}: {words}")
        matched = [name for name, v in candidates.items() if abs(value - v) <= tol * max(abs(v), 1e-6) + 1e-6]
        what = f"it computes {matched[0]}" if matched else "it matches none of the candidates"
        return Check("objective", "FAIL", number,
                     f"the loss is not the divergence the recipe states: {what}; fix the objective before training",
                     details)
    return Check("objective", "PASS", f"loss {value:.4g}, gradient norm {grad_norm:.4g} (finite)", words)


# --- signal ------------------------------------------------------------------------------------------------


def _local_teacher_path(probe: _Probe) -> str | None:
    """A local copy of the served / cached teacher: --local-teacher, else teacher.model (or the cache's
    recorded teacher) when it is a directory on this machine."""
    candidates = [probe.options.local_teacher, probe.config.teacher.model]
    cache = getattr(getattr(probe.run.rollouts, "cache", None), "settings", None)
    if cache:
        candidates.append(cache.get("teacher"))
    for path in candidates:
        if path and Path(path).expanduser().is_dir():
            return str(Path(path).expanduser())
    return None


def check_signal(probe: _Probe) -> Check:
    served = isinstance(probe.teacher, ServedTeacher)
    cached = isinstance(probe.run.teacher, CachedTeacher)
    if not (served or cached):
        return Check("signal", "SKIP", "local signal", "the teacher's log-probs are computed here from the model "
                     "itself; nothing remote or stored to verify")
    where = "served" if served else "cached"
    path = _local_teacher_path(probe)
    if path is None:
        return Check("signal", "WARN", "no local copy",
                     f"the {where} log-probs cannot be verified: pass --local-teacher PATH (the same checkpoint) so "
                     "they are compared with a local recomputation")
    cfg = probe.config.teacher
    local = LocalTeacher.from_config(TeacherConfig(model=path, tokenizer=cfg.tokenizer, dtype=cfg.dtype,
                                                   trust_remote_code=cfg.trust_remote_code), probe.run.tokenizer,
                                     cpu_linear=probe.config.train.cpu_linear)
    local.model.to(probe.device)
    batch, signal, T, vocab = probe.batch, probe.signal, probe.config.temperature, probe.run.vocab_size
    mask = batch.completion_mask_BC.bool().to(probe.device)
    ids = batch.completion_ids_BC.to(probe.device)
    if served and probe.teacher.teacher_tokenizer is None:
        # The client sent the student's rendering of each prompt (template problems are the template
        # check's): score the same ids locally, so only the log-probs are compared here.
        local.student_template = local.chat_template
    with torch.no_grad():
        local_logits = local.logits(batch).to(probe.device)
        from opd.divergences import gathered_logprobs

        local_lp = gathered_logprobs(local_logits, ids[..., None], temperature=T, vocab_size=vocab)[..., 0]
        student_lp = gathered_logprobs(probe.student_logits(), ids[..., None], temperature=T, vocab_size=vocab)[..., 0]
    remote_lp = signal.token_logprobs(ids, temperature=T, vocab_size=vocab, chunk_size=None).to(probe.device)
    diff = (remote_lp - local_lp).abs()[mask]
    size = float((local_lp - student_lp).abs()[mask].mean()) if mask.any() else 0.0
    mean, worst = float(diff.mean()), float(diff.max())
    ratio = mean / size if size > 0 else 0.0
    th = probe.options.thresholds
    details = [f"local copy: {path}; {int(mask.sum())} completion tokens compared at T = {T:g}",
               f"the distillation signal itself: mean |log p_T - log p_S| = {size:.4g} nats"]
    statuses = [_grade(mean, th.signal_mean_warn, th.signal_mean_fail, higher_is_better=False),
                "FAIL" if ratio > th.signal_ratio_fail else "PASS",
                "WARN" if worst > th.signal_max_warn else "PASS"]
    if signal.topk_ids_BCK is not None and signal.topk_logprobs_BCK is not None:
        from opd.divergences import teacher_topk

        k = signal.topk_ids_BCK.shape[-1]
        top_lp, top_ids = teacher_topk(local_logits, k, mask, temperature=T, vocab_size=vocab)
        same_ids = (signal.topk_ids_BCK.to(probe.device) == top_ids)[mask].float().mean()
        top_diff = (signal.topk_logprobs_BCK.to(probe.device) - top_lp).abs()[mask].max()
        details.append(f"top-{k}: {float(same_ids):.1%} of ids in the same rank, max |log-prob difference| "
                       f"{float(top_diff):.4g}")
    if served:
        with torch.no_grad():
            again = probe.run.teacher.score(batch).token_logprobs(ids, temperature=T, vocab_size=vocab,
                                                                   chunk_size=None).to(probe.device)
        repeat = float((again - remote_lp).abs()[mask].max()) if mask.any() else 0.0
        details.append(f"the same batch scored twice: max |difference| {repeat:.4g} nats")
        if repeat > th.signal_mean_warn:
            statuses.append("WARN")
            details.append("the server is not deterministic (replicas or batching disagree): compare the difference "
                           "with the signal above")
    status = _worst(*statuses)
    number = f"max |{where} - local| {worst:.4g}, mean {mean:.4g} nats ({ratio:.1%} of the signal)"
    advice = {"PASS": f"the {where} log-probs are the model's",
              "WARN": f"the {where} log-probs drift from the model's: check dtype / kernels; the loss sees this noise",
              "FAIL": f"the {where} log-probs are not the model's (temperature ignored, another checkpoint, "
                      "quantisation or a proxy in between?): do not train on them"}[status]
    return Check("signal", status, number, advice, details)


# --- sampler -----------------------------------------------------------------------------------------------


def check_sampler(probe: _Probe) -> Check:
    policy = probe.policy
    if policy is None:
        return Check("sampler", "SKIP", "cached rollouts", "the rollouts were written when the cache was made")
    if isinstance(policy.sampler, CoSampler):
        return Check("sampler", "SKIP", "co-sampled", "mixture / speculative sampling draws from a mix of both "
                     "models by design; its log-probs are that mix's (importance weights correct for it)")
    batch = probe.batch
    if batch.sampler_logprobs_BC is None:
        return Check("sampler", "WARN", "no sampler log-probs", "the sampler returned none, so importance weights "
                     "fall back to the current student")
    engine = type(policy.sampler).__name__
    params = policy.params
    mask_BC = batch.completion_mask_BC.bool() & ~torch.isnan(batch.sampler_logprobs_BC)
    if not mask_BC.any():
        return Check("sampler", "SKIP", "no student tokens", "the rollout wrote no student tokens to compare")
    logits_BCV = probe.student_logits()
    rows_R = mask_BC.reshape(-1).nonzero().squeeze(-1)
    logits_NV = logits_BCV.reshape(-1, logits_BCV.shape[-1])
    ids_N = batch.completion_ids_BC.reshape(-1)
    vocab = params.vocab_size or logits_NV.shape[-1]
    forward_R, full_R = torch.empty(rows_R.numel()), torch.empty(rows_R.numel())
    chunk = auto_chunk_size(vocab)
    for start in range(0, rows_R.numel(), chunk):  # a few rows at a time: [rows, V] fp32 stays small
        idx = rows_R[start : start + chunk]
        scores = logits_NV[idx.to(logits_NV.device)].float()
        picked = ids_N[idx].to(scores.device)[:, None]
        forward_R[start : start + idx.numel()] = filtered_logprobs(scores, params).gather(-1, picked)[:, 0].cpu()
        full_R[start : start + idx.numel()] = torch.log_softmax(scores[:, :vocab] / params.temperature, -1) \
            .gather(-1, picked)[:, 0].cpu()
    diff = (batch.sampler_logprobs_BC.reshape(-1)[rows_R] - forward_R).abs()
    mean, worst = float(diff.mean()), float(diff.max())
    details = [f"engine: {engine}; {rows_R.numel()} sampled tokens; temperature {params.temperature:g}, "
               f"top-p {params.top_p:g}, top-k {params.top_k}"]
    if params.top_p < 1 or params.top_k:
        # p_full(y) / p_filtered(y) is the mass the filter keeps, at each sampled token
        kept = float((full_R - forward_R).exp().mean())
        details.append(f"the filter keeps {kept:.1%} of the student's probability at the sampled tokens on average; "
                       "the token-level loss compares the unfiltered distributions")
    th = probe.options.thresholds
    status = _grade(mean, th.sampler_mean_warn, th.sampler_mean_fail, higher_is_better=False)
    advice = {"PASS": "the sampler draws from the student the loss trains",
              "WARN": "the sampler's distribution drifts from the student's (precision / kernels); importance "
                      "weights absorb small drift",
              "FAIL": "the sampler is not the student (stale engine weights, a missed weight push or prefix-cache "
                      "reset, another temperature): fix before training"}[status]
    return Check("sampler", status, f"max |sampler - student| {worst:.4g}, mean {mean:.4g} nats", advice, details)


# --- top-k overlap -----------------------------------------------------------------------------------------


def check_topk(probe: _Probe) -> Check:
    signal, batch, config = probe.signal, probe.batch, probe.config
    uses_topk = signal.logits_BCV is None or isinstance(probe.run.objective, TopKDivergence)
    k = config.teacher.top_k or probe.options.top_k
    rows = batch.on_policy_B.bool()
    mask = batch.completion_mask_BC * rows[:, None].float()
    overlap = diagnostics.topk_overlap(probe.student_logits(), signal, batch.completion_ids_BC, mask, k=k,
                                       temperature=config.temperature, vocab_size=probe.run.vocab_size)
    if overlap is None:
        return Check("topk", "SKIP", "no distribution", "the run's teacher signal holds no distribution (sampled-"
                     "token log-probs, rewards or text only); for a served teacher set teacher.top_k to measure it")
    th = probe.options.thresholds
    number = (f"k={overlap.k}: teacher mass in its top-k {overlap.teacher_topk_mass:.3f}, student mass in the "
              f"teacher's top-k {overlap.student_mass_in_teacher_topk:.3f}, sampled token outside it "
              f"{overlap.sampled_outside_teacher_topk:.3f}")
    details = [f"teacher mass inside the student's top-{overlap.k}: {overlap.teacher_mass_in_student_topk:.3f}"
               + ("" if overlap.exact else " (a lower bound: only the teacher's top-k is known)"),
               f"{overlap.positions} positions of student samples"]
    if not uses_topk:
        return Check("topk", "PASS", number, f"informational: the run compares full distributions; a top-{overlap.k} "
                     "signal would keep what these numbers say", details)
    status = _worst(
        _grade(overlap.teacher_topk_mass, th.topk_mass_warn, th.topk_mass_fail, higher_is_better=True),
        _grade(overlap.student_mass_in_teacher_topk, th.topk_mass_warn, th.topk_mass_fail, higher_is_better=True),
        _grade(overlap.sampled_outside_teacher_topk, th.topk_outside_warn, th.topk_outside_fail,
               higher_is_better=False))
    advice = {"PASS": f"a top-{overlap.k} signal covers what the student samples",
              "WARN": f"top-{overlap.k} misses part of the mass where the student samples: raise teacher.top_k or "
                      "use the tail bucket (loss.topk_support=tail)",
              "FAIL": f"top-{overlap.k} is far too small: the loss sees little of either distribution where the "
                      "student samples; raise teacher.top_k (NeMo-RL uses 64) or use full logits"}[status]
    return Check("topk", status, number, advice, details)


# --- calibration -------------------------------------------------------------------------------------------


def check_calibration(probe: _Probe) -> Check:
    teacher = probe.teacher
    if not diagnostics.can_generate(teacher):
        return Check("calibration", "SKIP", "teacher writes no text", "a self / cached teacher cannot continue "
                     "answers; nothing to measure")
    if not probe.examples:
        return Check("calibration", "SKIP", "no prompts", "no prompts with references to grade")
    cal = diagnostics.calibration_at_cuts(teacher, probe.examples, probe.run.tokenizer, probe.params,
                                          probe.run.evaluator.scorer, probe.student_answers, probe.teacher_answers,
                                          stop_ids=probe.stops, batch_size=probe.config.eval.batch_size)
    details = [f"{cal.prompts} prompts, graded by eval.scorer={probe.config.eval.scorer}; whole answers: student "
               f"{cal.student_success:.2f}, teacher {cal.teacher_success:.2f}",
               "cut at      " + "  ".join(f"{f:>5.0%}" for f in cal.cuts),
               "from student" + "  ".join(f"{v:>5.2f}" for v in cal.from_student),
               "from teacher" + "  ".join(f"{v:>5.2f}" for v in cal.from_teacher)]
    ratio = f"{cal.ratio:.2f}" if math.isfinite(cal.ratio) else "n/a"
    number = (f"ratio {ratio}: teacher success from student prefixes {cal.student_prefix_mean:.2f} vs its "
              f"own {cal.teacher_prefix_mean:.2f}")
    if cal.teacher_prefix_mean == 0:
        return Check("calibration", "WARN", number, "the scorer accepts none of the teacher's continuations of its own "
                     "answers: set eval.scorer to the task's verifier (and give data.eval references)", details)
    th = probe.options.thresholds
    status = _grade(cal.ratio, th.calibration_warn, th.calibration_fail, higher_is_better=True)
    advice = {"PASS": "the teacher finishes the student's answers about as well as its own: its feedback on them "
                      "is informed",
              "WARN": "the teacher recovers from part of the student's prefixes only: expect noisier feedback there",
              "FAIL": "the teacher cannot finish the student's answers: its token feedback on them is "
                      "extrapolation. Warm up off-policy first (recipe off_to_on_policy), mix teacher tokens "
                      "into rollouts (rollout.sampler=mixture), add an outcome reward (kdrl), or use a teacher "
                      "trained on noisier prefixes"}[status]
    return Check("calibration", status, number, advice, details)


# --- length ------------------------------------------------------------------------------------------------


def check_length(probe: _Probe) -> Check:
    if not probe.examples:
        return Check("length", "SKIP", "no prompts", "no prompts to sample")
    params = probe.params
    stats = diagnostics.length_stats(probe.student_answers, probe.stops, params.max_new_tokens)
    details = [f"{stats.samples} student samples at T = {params.temperature:g}: mean {stats.mean_tokens:.1f} tokens, "
               f"max {stats.max_tokens}, max_new_tokens {params.max_new_tokens}"]
    th = probe.options.thresholds
    statuses = [_grade(stats.truncated_fraction, th.truncated_warn, th.truncated_fail, higher_is_better=False),
                _grade(stats.empty_fraction, th.empty_warn, th.empty_fail, higher_is_better=False)]
    advice: list[str] = []
    if statuses[0] != "PASS":
        advice.append("answers run into rollout.max_new_tokens without EOS, so the loss never sees the end: raise "
                      "it, or check that the student stops at all")
    if statuses[1] != "PASS":
        advice.append("answers end at once: check the EOS token and the generation prompt of the chat template")
    if diagnostics.can_generate(probe.teacher):
        teacher_stats = diagnostics.length_stats(probe.teacher_answers, probe.stops, params.max_new_tokens)
        details.append(f"teacher answers: mean {teacher_stats.mean_tokens:.1f} tokens, "
                       f"{teacher_stats.eos_fraction:.0%} end with EOS")
        if teacher_stats.mean_tokens > 0 and stats.mean_tokens > 0:
            ratio = stats.mean_tokens / teacher_stats.mean_tokens
            if max(ratio, 1 / ratio) > th.length_ratio_warn:
                statuses.append("WARN")
                advice.append(f"the student writes {ratio:.2g}x the teacher's length: its samples are far from "
                              "what the teacher writes")
    references = [len(e.answer_ids) - 1 for e in probe.examples if e.answer_ids]
    if references:
        details.append(f"reference answers: mean {sum(references) / len(references):.1f} tokens")
    if probe.config.rollout.prefix_tokens:
        details.append(f"rollouts during training stop at the Prefix-OPD length ({probe.config.rollout.prefix_tokens}"
                       " tokens at the first step) by design; these samples are full length")
    status = _worst(*statuses)
    number = (f"EOS {stats.eos_fraction:.0%}, truncated {stats.truncated_fraction:.0%}, empty "
              f"{stats.empty_fraction:.0%}, mean {stats.mean_tokens:.1f} tokens")
    return Check("length", status, number, "; ".join(advice) or "the student's answers end on their own", details)


# --- memory ------------------------------------------------------------------------------------------------


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def estimate_step_memory(probe: _Probe) -> dict[str, float]:
    """Bytes one training step needs at the run's shapes (an estimate, documented per term)."""
    config, run = probe.config, probe.run
    student = run.student
    cfg = getattr(student, "config", None)
    hidden = getattr(cfg, "hidden_size", 0) or 0
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    kv_heads = getattr(cfg, "num_key_value_heads", heads) or heads
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads else 0)
    trainable = [p for p in student.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    compute_bytes = 2 if config.train.mixed_precision in ("bf16", "fp16") else \
        next(student.parameters()).element_size()
    rows = config.train.batch_size * config.rollout.samples_per_prompt
    examples = [e for e in getattr(run.rollouts.stream, "examples", []) if isinstance(e, Example)]
    prompt = max((len(e.prompt_ids) for e in examples), default=config.data.max_prompt_tokens)
    completion = config.rollout.max_new_tokens
    tokens = rows * (prompt + completion)
    vocab = run.vocab_size
    teachers = {id(t.model): t.model for t in run.teachers.values() if isinstance(getattr(t, "model", None),
                                                                                 torch.nn.Module)}
    teachers.pop(id(student), None)
    out = {
        "student weights": float(_bytes(student)),
        "gradients": float(trainable_bytes),
        "AdamW states (2 per weight)": 2.0 * trainable_bytes,
        "teacher weights": float(sum(_bytes(m) for m in teachers.values())),
    }
    # Activations kept for backward: ~34 h bytes per token and layer at 16 bits (Korthikanti et al.,
    # arXiv 2205.05198, without the attention-score term that fused attention avoids); gradient
    # checkpointing keeps one layer input per layer plus one layer's worth.
    per_layer = 34 * hidden * tokens * compute_bytes / 2
    out["activations"] = (2 * hidden * tokens * compute_bytes * layers + per_layer) if \
        config.train.gradient_checkpointing else per_layer * layers
    # Logits at the completion positions: the student's (and their gradient) and a local teacher's.
    logits = rows * completion * vocab * 4.0
    out["logits (student + gradient, teacher)"] = 2 * logits + (logits if teachers else 0.0)
    out["loss workspace (chunks)"] = 4.0 * min(auto_chunk_size(vocab), rows * completion) * vocab * 4
    out["rollout KV cache"] = 2.0 * layers * tokens * kv_heads * head_dim * compute_bytes
    return out


def _available_bytes(probe: _Probe) -> tuple[float, str]:
    if probe.options.memory_gb is not None:
        return probe.options.memory_gb * 2**30, "--memory-gb"
    if probe.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(probe.device)
        return float(total), f"{torch.cuda.get_device_name(probe.device)}"
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = float(line.split()[1]) * 1024
        limit = Path("/sys/fs/cgroup/memory.max")
        if limit.is_file() and limit.read_text().strip().isdigit():
            available = min(available or math.inf, float(limit.read_text()))
    except OSError:
        pass
    if available is None:
        return math.nan, "unknown"
    # Memory already held by this process (the loaded models) counts as available to the run.
    held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    return available + held, "host RAM"


def check_memory(probe: _Probe) -> Check:
    parts = estimate_step_memory(probe)
    static = sum(v for k, v in parts.items() if k in ("student weights", "gradients", "AdamW states (2 per weight)",
                                                      "teacher weights"))
    step = parts["activations"] + parts["logits (student + gradient, teacher)"] + parts["loss workspace (chunks)"]
    peak = static + max(step, parts["rollout KV cache"])
    available, where = _available_bytes(probe)
    gib = 2.0**30
    details = [", ".join(f"{k} {v / gib:.3g}" for k, v in parts.items()) + " GiB",
               "peak = weights + gradients + optimizer + max(training step, rollout KV cache)"]
    if probe.device.type == "cuda":
        details.append(f"measured here (forward + backward of one micro-batch, no optimizer step): "
                       f"{torch.cuda.max_memory_allocated(probe.device) / gib:.3g} GiB")
    else:
        details.append(f"process peak so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3g} GiB")
    if not math.isfinite(available):
        return Check("memory", "WARN", f"~{peak / gib:.3g} GiB per step", "available memory unknown: pass "
                     "--memory-gb", details)
    share = peak / available
    th = probe.options.thresholds
    status = _grade(share, th.memory_warn, th.memory_fail, higher_is_better=False)
    advice = {"PASS": "fits",
              "WARN": "tight: lower train.batch_size (raise train.grad_accum), rollout.max_new_tokens, or turn on "
                      "train.gradient_checkpointing / train.mixed_precision",
              "FAIL": "does not fit: lower train.batch_size (raise train.grad_accum), rollout.max_new_tokens, use "
                      "LoRA (model.lora_r), gradient checkpointing, bf16, or a served teacher"}[status]
    return Check("memory", status, f"~{peak / gib:.3g} GiB per step of {available / gib:.3g} GiB ({where}, "
                 f"{share:.0%})", advice, details)


CHECK_FUNCTIONS = {"template": check_template, "objective": check_objective, "signal": check_signal,
                   "sampler": check_sampler, "topk": check_topk, "calibration": check_calibration,
                   "length": check_length, "memory": check_memory}


# --- running -------------------------------------------------------------------------------------------------


def diagnose(config: RunConfig, options: Options | None = None, *, run: Run | None = None, accelerator: Any = None,
             log: Any = None) -> list[Check]:
    """Every check in ``options.only``, in order; ``run`` (and its ``accelerator``) lets a caller pass
    parts it built itself (tests swap in a stale sampler this way)."""
    from accelerate.utils import set_seed

    from opd.parallel import DataParallel, StudentWeights
    from opd.trainer import _distributed  # the same Accelerator settings as training

    options = options or Options()
    unknown = [c for c in options.only if c not in CHECK_FUNCTIONS]
    if unknown:
        raise ConfigError(f"--only {unknown[0]!r}: choose from {', '.join(CHECKS)}")
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if run is None:
        accelerator, _ = _distributed(config)
        set_seed(config.train.seed)
        try:
            run = build_run(config, accelerator, log)
        except OpdError as exc:
            name = "template" if "tokenizer" in str(exc) else "build"
            return [Check(name, "FAIL", "cannot load the run", str(exc).splitlines()[0])]
    elif accelerator is None:
        raise ValueError("diagnose(run=...) needs the accelerator the run was built with")
    probe = _Probe(config, run, accelerator, options)
    checks = []
    try:
        # As training does: e.g. the vLLM engine starts and receives the student's weights (the doctor
        # never wraps or shards the student, so it reaches them as one replica).
        weights = StudentWeights(DataParallel(accelerator), run.student, lambda: run.student)
        for hook in run.hooks:
            hook.start(weights)
    except OpdError as exc:
        for hook in run.hooks:
            hook.close()
        return [Check("build", "FAIL", "cannot start the run's parts", str(exc).splitlines()[0])]
    try:
        for name in options.only:
            try:
                checks.append(CHECK_FUNCTIONS[name](probe))
            except Exception as exc:  # one broken part (a server down, an odd model) must not hide the others
                if options.debug and not isinstance(exc, OpdError):
                    raise
                message = (str(exc).strip().splitlines() or [""])[0]
                what = message if isinstance(exc, OpdError) else \
                    f"{type(exc).__name__}: {message} (--debug: traceback)"
                checks.append(Check(name, "FAIL", "error", what))
    finally:
        for hook in run.hooks:
            hook.close()
    return checks


def report(checks: list[Check], seconds: float | None = None) -> str:
    lines = []
    for check in checks:
        lines.append(check.line())
        lines.extend(f"    {detail}" for detail in check.details)
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines.append(f"opd doctor: {summary}" + (f" in {seconds:.1f}s" if seconds is not None else ""))
    return "\n".join(lines)


def run_doctor(config: RunConfig, options: Options | None = None, *, print_fn: Any = print) -> int:
    """Print the report; returns the exit code (1 on any FAIL)."""
    started = time.perf_counter()
    checks = diagnose(config, options)
    print_fn(report(checks, time.perf_counter() - started))
    return 1 if any(c.status == "FAIL" for c in checks) else 0
