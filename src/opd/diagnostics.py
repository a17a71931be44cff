"""Is the teacher's feedback trustworthy on the student's own text? Three measurements.

Shared by the preflight ``opd doctor`` (:mod:`opd.doctor`) and by training-time evaluation
(:class:`TrainingDiagnostics`, logged as ``eval/...`` on ``train.eval_every``). They follow the
practitioner's checklist that closes the OPD survey (top-k overlap between teacher and student,
the teacher's calibration on student-written prefixes, length stability):

- **top-k overlap** (:func:`topk_overlap`): on the student's samples, the teacher's probability mass
  inside the student's top-k, the student's mass inside the teacher's top-k, the teacher's mass
  inside its own top-k, and how often the sampled token is outside the teacher's top-k. Top-k and
  sampled-token signals (served teachers, caches, Top-k reverse KL arXiv 2603.25562, Thinking
  Machines' sampled-token OPD) only see what these numbers cover.
- **calibration at cuts** (:func:`calibration_at_cuts`): the student's answers are cut at 25 / 50 /
  75 % of their length, the teacher continues from each cut, the run's scorer grades the result;
  the same is done with the teacher's own answers. Token-level feedback on a prefix is the
  teacher's view of how to go on from there (GKD, arXiv 2306.13649, and MiniLLM, arXiv 2306.08543,
  motivate on-policy training by exactly these student prefixes); a teacher that succeeds from its
  own prefixes but not from the student's has never seen text like the student's, and its
  feedback there is extrapolation.
- **length and EOS** (:func:`length_stats`): how long the student's answers are, how often they end
  with EOS, run into ``max_new_tokens`` or are empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from opd.batch import build_batch
from opd.data import Example
from opd.divergences import auto_chunk_size
from opd.models import completion_logits
from opd.rollout import SamplingParams, sample_generate, stop_token_ids
from opd.signal import TeacherSignal
from opd.teachers import Teacher

DEFAULT_TOP_K = 20  # vLLM's default max_logprobs: what a served teacher gives without extra flags
CUTS = (0.25, 0.5, 0.75)


# --- top-k overlap ---------------------------------------------------------------------------------------


@dataclass
class Overlap:
    """Means over the completion positions of the student's samples."""

    k: int
    teacher_mass_in_student_topk: float
    student_mass_in_teacher_topk: float
    teacher_topk_mass: float  # what a top-k signal keeps of the teacher's distribution
    sampled_outside_teacher_topk: float  # where a top-k signal says nothing about the sampled token
    positions: int
    exact: bool  # False: only the teacher's top-k was known (its mass in the student's top-k is a lower bound)

    def metrics(self, prefix: str = "eval/topk_") -> dict[str, float]:
        return {f"{prefix}teacher_mass": self.teacher_topk_mass,
                f"{prefix}student_mass_in_teacher": self.student_mass_in_teacher_topk,
                f"{prefix}teacher_mass_in_student": self.teacher_mass_in_student_topk,
                f"{prefix}sampled_outside_teacher": self.sampled_outside_teacher_topk}


@torch.no_grad()
def topk_overlap(student_logits_BCV: torch.Tensor, signal: TeacherSignal, ids_BC: torch.Tensor,
                 mask_BC: torch.Tensor, *, k: int, temperature: float, vocab_size: int,
                 chunk_size: int | None = None) -> Overlap | None:
    """Overlap of the two top-``k`` sets on the masked positions, from the teacher's full logits or,
    for a served / cached teacher, its top-k log-probs (``k`` is then at most what it exposes).
    ``None`` when the signal has neither or no position is masked in."""
    rows_R = mask_BC.reshape(-1).bool().nonzero().squeeze(-1).to(student_logits_BCV.device)
    if rows_R.numel() == 0:
        return None
    student_NV = student_logits_BCV.reshape(-1, student_logits_BCV.shape[-1])
    ids_N = ids_BC.reshape(-1).to(student_NV.device)
    exact = signal.logits_BCV is not None
    if exact:
        teacher_NV = signal.logits_BCV.reshape(-1, signal.logits_BCV.shape[-1]).to(student_NV.device)
    elif signal.topk_ids_BCK is not None and signal.topk_logprobs_BCK is not None:
        k = min(k, signal.topk_ids_BCK.shape[-1])
        top_ids_NK = signal.topk_ids_BCK.reshape(-1, signal.topk_ids_BCK.shape[-1]).to(student_NV.device)
        top_lp_NK = signal.topk_logprobs_BCK.reshape(-1, signal.topk_ids_BCK.shape[-1]).to(student_NV.device)
    else:
        return None
    k = max(1, min(k, vocab_size))
    chunk = chunk_size or auto_chunk_size(vocab_size)
    sums_4 = torch.zeros(4, dtype=torch.float64)
    for start in range(0, rows_R.numel(), chunk):
        idx = rows_R[start : start + chunk]
        student_lp = torch.log_softmax(student_NV[idx, :vocab_size].float() / temperature, dim=-1)
        student_top = student_lp.topk(k, dim=-1).indices
        if exact:
            teacher_lp = torch.log_softmax(teacher_NV[idx, :vocab_size].float() / temperature, dim=-1)
            top = teacher_lp.topk(k, dim=-1)
            teacher_ids, teacher_top_lp = top.indices, top.values
            teacher_in_student = teacher_lp.exp().gather(-1, student_top).sum(-1)
        else:
            teacher_ids, teacher_top_lp = top_ids_NK[idx, :k], top_lp_NK[idx, :k].float()
            shared = (teacher_ids[:, :, None] == student_top[:, None, :]).any(-1)
            teacher_in_student = (teacher_top_lp.exp() * shared).sum(-1)
        student_in_teacher = student_lp.exp().gather(-1, teacher_ids).sum(-1)
        outside = ~(teacher_ids == ids_N[idx, None]).any(-1)
        sums_4 += torch.stack([teacher_in_student.sum(), student_in_teacher.sum(), teacher_top_lp.exp().sum(),
                               outside.float().sum()]).double().cpu()
    means = (sums_4 / rows_R.numel()).tolist()
    return Overlap(k, means[0], means[1], means[2], means[3], int(rows_R.numel()), exact)


# --- length and EOS --------------------------------------------------------------------------------------


@dataclass
class LengthStats:
    samples: int
    mean_tokens: float  # answer tokens, EOS not counted
    max_tokens: int
    eos_fraction: float  # ended with a stop token
    truncated_fraction: float  # ran into max_new_tokens without one
    empty_fraction: float  # no answer token before the stop

    def metrics(self, prefix: str = "eval/student_") -> dict[str, float]:
        return {f"{prefix}length_mean": self.mean_tokens, f"{prefix}eos_fraction": self.eos_fraction,
                f"{prefix}truncated_fraction": self.truncated_fraction, f"{prefix}empty_fraction": self.empty_fraction}


def strip_stop(completion: list[int], stop_ids: set[int]) -> list[int]:
    return completion[:-1] if completion and completion[-1] in stop_ids else completion


def length_stats(completions: list[list[int]], stop_ids: set[int], max_new_tokens: int) -> LengthStats:
    n = max(1, len(completions))
    bodies = [strip_stop(c, stop_ids) for c in completions]
    ended = [bool(c) and c[-1] in stop_ids for c in completions]
    truncated = [not e and len(c) >= max_new_tokens for e, c in zip(ended, completions)]
    return LengthStats(len(completions), sum(len(b) for b in bodies) / n, max((len(b) for b in bodies), default=0),
                       sum(ended) / n, sum(truncated) / n, sum(not b for b in bodies) / n)


# --- calibration at cuts ---------------------------------------------------------------------------------


@dataclass
class Calibration:
    """Success rates of teacher continuations, per cut fraction."""

    cuts: tuple[float, ...]
    from_student: list[float]  # teacher continuing the student's answers cut there
    from_teacher: list[float]  # teacher continuing its own answers cut there
    student_success: float  # the student's whole answers
    teacher_success: float  # the teacher's whole answers
    prompts: int

    @property
    def student_prefix_mean(self) -> float:
        return sum(self.from_student) / max(1, len(self.from_student))

    @property
    def teacher_prefix_mean(self) -> float:
        return sum(self.from_teacher) / max(1, len(self.from_teacher))

    @property
    def ratio(self) -> float:
        """Success from student prefixes relative to the teacher's own (1 = no loss; NaN when the
        teacher never succeeds from its own prefixes, so there is nothing to compare with)."""
        own = self.teacher_prefix_mean
        return self.student_prefix_mean / own if own > 0 else math.nan

    def metrics(self, prefix: str = "eval/calibration_") -> dict[str, float]:
        out = {f"{prefix}student_prefix": self.student_prefix_mean, f"{prefix}teacher_prefix": self.teacher_prefix_mean}
        if math.isfinite(self.ratio):
            out[f"{prefix}ratio"] = self.ratio
        return out


def cut_position(length: int, fraction: float) -> int:
    """Tokens kept of an answer of ``length`` tokens: at least one (a cut of nothing would repeat the
    teacher's own start), at most all of them (the teacher then only decides whether to stop)."""
    if length == 0:
        return 0
    return min(length, max(1, round(fraction * length)))


def can_generate(teacher: Any) -> bool:
    """Whether ``teacher`` writes text (local, served and text teachers do; self and cached ones do not)."""
    return teacher is not None and type(teacher).generate is not Teacher.generate


@torch.no_grad()
def calibration_at_cuts(teacher: Any, examples: list[Example], tokenizer: Any, params: SamplingParams, scorer: Any,
                        student_answers: list[list[int]], teacher_answers: list[list[int]], *,
                        cuts: tuple[float, ...] = CUTS, stop_ids: set[int] | None = None,
                        batch_size: int = 64) -> Calibration:
    """Let ``teacher`` continue both answer sets cut at each of ``cuts`` and grade every result with
    ``scorer(prompt, completion, reference) -> bool``."""
    stops = stop_ids if stop_ids is not None else {tokenizer.eos_token_id}

    def grade(answers: list[list[int]], rows: list[Example]) -> list[bool]:
        texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
        return [bool(scorer(e.prompt, t, e.answer)) for e, t in zip(rows, texts)]

    # Every (answer set, cut, prompt) continuation in one list, so the teacher decodes them in as few
    # batched calls as possible (one generate call costs far more than a few more rows in it).
    prefixes: list[list[int]] = []
    rows: list[Example] = []
    for answers in (student_answers, teacher_answers):
        for fraction in cuts:
            for example, answer in zip(examples, answers):
                body = strip_stop(answer, stops)
                prefixes.append(body[: cut_position(len(body), fraction)])
                rows.append(example)
    prompts = [e.prompt_ids + prefix for e, prefix in zip(rows, prefixes)]
    outs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        outs.extend(teacher.generate(prompts[start : start + batch_size], params))
    ok = grade([prefix + out for prefix, out in zip(prefixes, outs)], rows)
    n = len(examples)

    def rate(block: int) -> float:
        return sum(ok[block * n : (block + 1) * n]) / max(1, n)

    def whole(answers: list[list[int]]) -> float:
        return sum(grade(answers, examples)) / max(1, n)

    blocks = range(len(cuts))
    return Calibration(tuple(cuts), [rate(i) for i in blocks], [rate(len(cuts) + i) for i in blocks],
                       whole(student_answers), whole(teacher_answers), n)


# --- sampling --------------------------------------------------------------------------------------------


@torch.no_grad()
def student_answers(student: torch.nn.Module, examples: list[Example], params: SamplingParams, tokenizer: Any,
                    batch_size: int = 64) -> list[list[int]]:
    """The student's samples (the run's behaviour policy: temperature, top-p, top-k) for ``examples``."""
    outs: list[list[int]] = []
    for start in range(0, len(examples), batch_size):
        chunk = [e.prompt_ids for e in examples[start : start + batch_size]]
        outs.extend(sample_generate(student, chunk, params, tokenizer)[0])
    return outs


def scores_student_vocabulary(teacher: Any) -> bool:
    """Whether ``teacher.score`` answers on the student's vocabulary (not a text or cross-tokenizer
    teacher, whose distributions are over its own)."""
    return teacher is not None and getattr(teacher, "student_tokenizer", None) is None and hasattr(teacher, "score")


class TrainingDiagnostics:
    """The cheap versions, added to :class:`opd.eval.Evaluator` (``eval.diagnostics``): on a few eval
    prompts, the student's samples give ``eval/student_length_mean`` and ``eval/student_*_fraction``
    (EOS, truncated, empty), the teacher's signal on them ``eval/topk_*`` and its continuations
    ``eval/calibration_*``."""

    def __init__(self, examples: list[Example], tokenizer: Any, params: SamplingParams, *, scorer: Any,
                 teacher: Any, vocab_size: int, top_k: int = DEFAULT_TOP_K, cuts: tuple[float, ...] = CUTS,
                 batch_size: int = 64) -> None:
        self.examples = examples
        self.tokenizer = tokenizer
        self.params = SamplingParams(params.max_new_tokens, params.temperature, params.top_p, params.top_k,
                                     greedy=False, vocab_size=params.vocab_size)
        self.scorer = scorer
        self.teacher = teacher
        self.vocab_size = vocab_size
        self.top_k = top_k
        self.cuts = cuts
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, student: torch.nn.Module) -> dict[str, float]:
        if not self.examples:
            return {}
        answers = student_answers(student, self.examples, self.params, self.tokenizer, self.batch_size)
        stops = set(stop_token_ids(student, self.tokenizer))
        results = length_stats(answers, stops, self.params.max_new_tokens).metrics()
        if scores_student_vocabulary(self.teacher):
            device = next(student.parameters()).device
            batch = build_batch([e.prompt_ids for e in self.examples], answers, self.tokenizer.pad_token_id)
            batch.examples = self.examples
            signal = self.teacher.score(batch).to(device).with_logits()
            logits = completion_logits(student, batch.input_ids_BT.to(device), batch.attention_mask_BT.to(device),
                                       batch.completion_len)
            overlap = topk_overlap(logits, signal, batch.completion_ids_BC, batch.completion_mask_BC, k=self.top_k,
                                   temperature=self.params.temperature, vocab_size=self.vocab_size)
            if overlap is not None:
                results.update(overlap.metrics())
        if can_generate(self.teacher):
            own = []
            for start in range(0, len(self.examples), self.batch_size):
                chunk = [e.prompt_ids for e in self.examples[start : start + self.batch_size]]
                own.extend(self.teacher.generate(chunk, self.params))
            calibration = calibration_at_cuts(self.teacher, self.examples, self.tokenizer, self.params, self.scorer,
                                              answers, own, cuts=self.cuts, stop_ids=stops,
                                              batch_size=self.batch_size)
            results.update(calibration.metrics())
        return results
