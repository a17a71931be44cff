"""Behaviour policies: who writes the response the loss is computed on (design.md §2, axis 1).

Per micro-batch (:class:`BehaviourPolicy`), each sample is written by

- the student (on-policy), through a sampler: :class:`StudentSampler` (opd's KV-cached loop, the
  ``hf`` engine), :class:`CoSampler` (MiniLLM's teacher-mixed sampling, Speculative KD's
  student-proposes / teacher-replaces) or a vLLM engine (:mod:`opd.vllm_engine`);
- or an off-policy source: :class:`DatasetAnswers` (supervised KD) or :class:`TeacherAnswers` (SeqKD),

with GKD's per-sample mixture deciding which (``on_policy_fraction`` = lambda, arXiv 2306.13649,
Algorithm 1; one coin per sample, never one per batch, the realised fraction logged as
``rollout/on_policy_fraction``).

Per optimizer step (:class:`Rollouts`, what the training loop asks for): :class:`PolicyRollouts`
applies the run's schedules (a lambda schedule, Prefix OPD's rollout length) to a behaviour policy;
:class:`AdaptiveRollouts` is DistiLLM's replay schedule; the teacher cache's stored rollouts are
:class:`opd.cache.CachedRollouts`.

All of them produce a :class:`SequenceBatch`: prompts left-padded to a common
length, completions right-padded, and a completion mask that is 1 on generated
tokens up to and including the first EOS and 0 on the prompt, padding and
anything after EOS.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from opd.batch import SequenceBatch, build_batch
from opd.config import RolloutConfig
from opd.cpu_linear import packed_for_decoding
from opd.data import Example
from opd.errors import DataError
from opd.hooks import Hooks


def truncate_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Cut a generated sequence after its first EOS (kept), dropping the padding after it."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1]
    return tokens


@dataclass
class SamplingParams:
    """Sampling settings shared by every engine; the loss uses the same ``temperature``."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    vocab_size: int | None = None  # sample only ids below this (the shared tokenizer length)


class _RestrictVocab:
    """Logits processor: never sample embedding padding rows beyond the tokenizer."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.vocab_size:
            scores[:, self.vocab_size :] = -float("inf")
        return scores


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the tokenizer's EOS plus any the model's generation config lists
    (e.g. Llama-3's ``<|eot_id|>``), so generation stops and masking cuts at each of them."""
    ids = {tokenizer.eos_token_id}
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(model_eos, int):
        ids.add(model_eos)
    elif isinstance(model_eos, (list, tuple)):
        ids.update(int(i) for i in model_eos)
    return sorted(i for i in ids if i is not None)


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention[i, width - len(prompt) :] = 1
    return input_ids, attention


@torch.no_grad()
def hf_generate(
    model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, tokenizer: Any,
    stopping_criteria: Any = None,
) -> list[list[int]]:
    """Sample completions with ``transformers`` ``generate`` (KV cache), truncated after EOS.

    ``stopping_criteria`` (a transformers ``StoppingCriteriaList``) can end rows early; the server uses
    it to drop rows whose client went away."""
    from transformers import GenerationConfig, LogitsProcessorList

    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id
    eos_ids = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    input_ids, attention = _left_pad(prompts, pad_id)
    width = input_ids.shape[1]
    # The behaviour policy must be exactly softmax(logits / T) (optionally top-p / top-k
    # filtered): a checkpoint's generation_config.json (top_k=50, repetition penalties,
    # min_p, ...) would otherwise fill every field left unset, so it is swapped out below.
    gen_config = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=not params.greedy,
        temperature=params.temperature if not params.greedy else None,
        top_p=params.top_p if not params.greedy else None,
        top_k=params.top_k if not params.greedy else None,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    processors = LogitsProcessorList()
    if params.vocab_size is not None:
        processors.append(_RestrictVocab(params.vocab_size))
    was_training = model.training
    saved_config = getattr(model, "generation_config", None)
    model.eval()
    try:
        model.generation_config = gen_config
        with packed_for_decoding(model, len(prompts)):
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=gen_config,
                logits_processor=processors, stopping_criteria=stopping_criteria,
            )
    finally:
        model.generation_config = saved_config
        model.train(was_training)
    generated = out[:, width:].tolist()
    return [truncate_at_eos(seq, set(eos_ids)) for seq in generated]


class _Decoder:
    """Incremental forward passes of one model with its own KV cache."""

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.attention = attention.to(self.device)
        self.positions = (self.attention.cumsum(-1) - 1).clamp(min=0)
        # transformers >= 5.2x names the KV cache `cache`; older models call it `past_key_values`.
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        out = model(input_ids=input_ids.to(self.device), attention_mask=self.attention,
                    position_ids=self.positions, use_cache=True, logits_to_keep=1)
        self.cache = self._cache_of(out)
        self.last_logits = out.logits[:, -1]
        self.positions = self.positions[:, -1:]

    @staticmethod
    def _cache_of(out: Any) -> Any:
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def feed(self, tokens_B: torch.Tensor) -> None:
        self.attention = torch.cat([self.attention, torch.ones_like(self.attention[:, :1])], dim=-1)
        self.positions = self.positions + 1
        out = self.model(input_ids=tokens_B.to(self.device)[:, None], attention_mask=self.attention,
                         position_ids=self.positions, use_cache=True, **{self.cache_arg: self.cache})
        self.cache = self._cache_of(out)
        self.last_logits = out.logits[:, -1]


class _Completions:
    """Tokens and sampler log-probs of a batched decode, step by step; a row stops at its first EOS
    (later steps write padding) and comes back cut after it."""

    def __init__(self, batch: int, eos_ids: list[int], pad_id: int, device: torch.device) -> None:
        self.eos_ids = eos_ids
        self.eos_t = torch.tensor(eos_ids, device=device)
        self.pad_id = pad_id
        self.finished_B = torch.zeros(batch, dtype=torch.bool, device=device)
        self.tokens: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []

    def add(self, token_B: torch.Tensor, token_lp_B: torch.Tensor) -> torch.Tensor:
        """Record one step; returns the tokens to feed back (padding on finished rows)."""
        token_B = torch.where(self.finished_B, torch.full_like(token_B, self.pad_id), token_B)
        self.tokens.append(token_B)
        self.logprobs.append(token_lp_B)
        self.finished_B = self.finished_B | torch.isin(token_B, self.eos_t)
        return token_B

    @property
    def all_finished(self) -> bool:
        return bool(self.finished_B.all())

    def result(self) -> tuple[list[list[int]], list[list[float]]]:
        if not self.tokens:
            return [[] for _ in range(self.finished_B.numel())], [[] for _ in range(self.finished_B.numel())]
        tokens_BC = torch.stack(self.tokens, dim=1).tolist()
        logprobs_BC = torch.stack(self.logprobs, dim=1).tolist()
        completions = [truncate_at_eos(seq, set(self.eos_ids)) for seq in tokens_BC]
        return completions, [lps[: len(seq)] for lps, seq in zip(logprobs_BC, completions)]


def filtered_logprobs(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The behaviour policy's log-probs: ``softmax(logits / T)`` restricted to the shared vocabulary,
    then top-k, then top-p (the smallest set of most likely tokens holding at least ``top_p`` of the
    mass) — the order and semantics of transformers' warpers and vLLM's sampler."""
    vocab = params.vocab_size or logits_BV.shape[-1]
    scores_BV = logits_BV[:, :vocab].float() / params.temperature
    if 0 < params.top_k < vocab:
        kth_B1 = scores_BV.topk(params.top_k, dim=-1).values[:, -1:]
        scores_BV = scores_BV.masked_fill(scores_BV < kth_B1, -float("inf"))
    logprobs_BV = torch.log_softmax(scores_BV, dim=-1)
    if params.top_p < 1.0:
        sorted_BV, order_BV = logprobs_BV.sort(dim=-1, descending=True)
        mass_before_BV = sorted_BV.exp().cumsum(-1) - sorted_BV.exp()
        drop_sorted_BV = mass_before_BV >= params.top_p  # the top token always stays (mass before it is 0)
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logprobs_BV = torch.log_softmax(logprobs_BV.masked_fill(drop_BV, -float("inf")), dim=-1)
    return logprobs_BV


@torch.no_grad()
def sample_generate(
    model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, tokenizer: Any,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Student rollouts of the ``hf`` engine: the model decoded with its KV cache by opd's own loop.

    Same distribution as ``hf_generate`` (temperature, top-k, top-p, shared vocabulary), plus the
    log-probability of every sampled token under the distribution it was drawn from — exactly what
    ran, so under ``train.mixed_precision`` the bf16 sampler's log-probs, which the sampled-token
    objectives use as pi_sampler. Tokens are drawn by inverting the CDF with one uniform per row
    (``torch.rand``, the seeded and checkpointed RNG): ~1.5 ms per step at V = 49k against ~7 ms for
    ``torch.multinomial`` on 2 CPU cores (``generator``: a private stream instead, for rollouts that
    run beside training). Greedy rows get log-prob 0 (the greedy policy is
    deterministic). Completions are cut after the first EOS.
    """
    if not prompts:
        return [], []
    input_ids, attention = _left_pad(prompts, tokenizer.pad_token_id)
    eos_ids = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with packed_for_decoding(model, len(prompts)):
            decoder = _Decoder(model, input_ids, attention)
            record = _Completions(len(prompts), eos_ids, tokenizer.pad_token_id, device)
            for _ in range(params.max_new_tokens):
                if params.greedy:
                    vocab = params.vocab_size or decoder.last_logits.shape[-1]
                    token_B = decoder.last_logits[:, :vocab].argmax(-1)
                    token_lp_B = torch.zeros(len(prompts), device=device)
                else:
                    logprobs_BV = filtered_logprobs(decoder.last_logits, params)
                    cdf_BV = logprobs_BV.exp().cumsum(-1)
                    # First index whose CDF exceeds u: never a zero-probability token, never past the end.
                    u_B1 = torch.rand(len(prompts), 1, device=device, generator=generator) * cdf_BV[:, -1:]
                    token_B = torch.searchsorted(cdf_BV, u_B1, right=True).squeeze(-1).clamp(max=cdf_BV.shape[-1] - 1)
                    token_lp_B = logprobs_BV.gather(-1, token_B[:, None]).squeeze(-1)
                token_B = record.add(token_B, token_lp_B)
                if record.all_finished:
                    break
                decoder.feed(token_B)
    finally:
        model.train(was_training)
    return record.result()


CO_SAMPLERS = ("mixture", "speculative")


@torch.no_grad()
def co_generate(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    tokenizer: Any,
    *,
    rule: str,
    mixture_alpha: float = 0.2,
    accept_top_k: int = 25,
) -> tuple[list[list[int]], list[list[float]], dict[str, float]]:
    """Sample with student and teacher decoding side by side (both with KV caches).

    - ``mixture``: each token comes from ``(1 - a) p_S + a p_T`` — MiniLLM's teacher-mixed
      sampling (arXiv 2306.08543, Sec. 2.2), which keeps early, poor student rollouts from
      drifting into text the teacher cannot score well.
    - ``speculative``: the student proposes a token; it is kept if it is among the teacher's
      ``accept_top_k`` most likely tokens, otherwise replaced by a sample from the teacher —
      Speculative KD (arXiv 2410.11325, Sec. 3), which interleaves the two policies.

    Both distributions are at ``params.temperature``; top-p / top-k filtering does not apply.
    Returns completions (cut after EOS), the log-probability of each token under the
    distribution that actually produced it (``log p~(y_t)``, for importance weights), and
    ``rollout/teacher_token_fraction`` (mixture: tokens drawn from the teacher component;
    speculative: replaced proposals).
    """
    if rule not in CO_SAMPLERS:
        raise ValueError(f"unknown co-sampling rule {rule!r}; choose one of {', '.join(CO_SAMPLERS)}")
    if not prompts:
        return [], [], {}
    input_ids, attention = _left_pad(prompts, tokenizer.pad_token_id)
    eos_ids = stop_token_ids(student, tokenizer)
    device = next(student.parameters()).device
    vocab = params.vocab_size or student.get_output_embeddings().weight.shape[0]
    was_training = student.training
    student.eval()
    try:
        with packed_for_decoding(student, len(prompts)), packed_for_decoding(teacher, len(prompts)):
            s_dec = _Decoder(student, input_ids, attention)
            t_dec = _Decoder(teacher, input_ids, attention)
            record = _Completions(len(prompts), eos_ids, tokenizer.pad_token_id, device)
            from_teacher, counted = 0.0, 0.0
            for _ in range(params.max_new_tokens):
                s_lp_BV = torch.log_softmax(s_dec.last_logits[:, :vocab].float() / params.temperature, -1)
                t_lp_BV = torch.log_softmax(t_dec.last_logits[:, :vocab].float().to(device) / params.temperature, -1)
                if rule == "mixture":
                    # Choose the component first, then the token: same distribution as sampling the
                    # mixture directly, and it tells us which component wrote the token.
                    use_teacher_B = torch.rand(len(prompts), device=device) < mixture_alpha
                    from_s = torch.multinomial(s_lp_BV.exp(), 1).squeeze(-1)
                    from_t = torch.multinomial(t_lp_BV.exp(), 1).squeeze(-1)
                    token_B = torch.where(use_teacher_B, from_t, from_s)
                    mix_BV = torch.logaddexp(s_lp_BV + math.log1p(-mixture_alpha), t_lp_BV + math.log(mixture_alpha)) \
                        if 0.0 < mixture_alpha < 1.0 else (t_lp_BV if mixture_alpha >= 1.0 else s_lp_BV)
                    token_lp_B = mix_BV.gather(-1, token_B[:, None]).squeeze(-1)
                else:
                    proposal_B = torch.multinomial(s_lp_BV.exp(), 1).squeeze(-1)
                    top_ids_BK = t_lp_BV.topk(min(accept_top_k, vocab), dim=-1).indices
                    in_top_BV = torch.zeros_like(s_lp_BV, dtype=torch.bool).scatter_(-1, top_ids_BK, True)
                    accepted_B = in_top_BV.gather(-1, proposal_B[:, None]).squeeze(-1)
                    replacement_B = torch.multinomial(t_lp_BV.exp(), 1).squeeze(-1)
                    token_B = torch.where(accepted_B, proposal_B, replacement_B)
                    use_teacher_B = ~accepted_B
                    # P(y) = q(y) [y in top-K] + (1 - q(top-K)) p(y): the law of the interleaved token.
                    q_BV = s_lp_BV.exp()
                    rejected_mass_B = 1.0 - (q_BV * in_top_BV).sum(-1)
                    law_BV = q_BV * in_top_BV + rejected_mass_B.clamp(min=0.0)[:, None] * t_lp_BV.exp()
                    token_lp_B = law_BV.gather(-1, token_B[:, None]).squeeze(-1).clamp(min=1e-30).log()
                active_B = ~record.finished_B
                from_teacher += float((use_teacher_B & active_B).sum().item())
                counted += float(active_B.sum().item())
                token_B = record.add(token_B, token_lp_B)
                if record.all_finished:
                    break
                s_dec.feed(token_B)
                t_dec.feed(token_B)
    finally:
        student.train(was_training)
    completions, sampler_lps = record.result()
    return completions, sampler_lps, {"rollout/teacher_token_fraction": from_teacher / max(counted, 1.0)}


class StudentSampler:
    """On-policy samples from the student alone, decoded by :func:`sample_generate` (the ``hf`` engine)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def sample(self, student: torch.nn.Module, prompts: list[list[int]], params: SamplingParams,
               generator: torch.Generator | None = None) -> tuple[list[list[int]], list[list[float]], dict[str, float]]:
        outs, lps = sample_generate(student, prompts, params, self.tokenizer, generator)
        return outs, lps, {}


class CoSampler:
    """On-policy samples decoded with the teacher alongside (:func:`co_generate`): MiniLLM's
    teacher-mixed sampling (``mixture``) or Speculative KD (``speculative``)."""

    def __init__(self, teacher: Any, tokenizer: Any, rule: str, mixture_alpha: float, accept_top_k: int) -> None:
        if teacher is None or not hasattr(teacher, "model"):
            raise DataError(f"rollout.sampler={rule} needs a local teacher model")
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.rule = rule
        self.mixture_alpha = mixture_alpha
        self.accept_top_k = accept_top_k

    def sample(self, student: torch.nn.Module, prompts: list[list[int]], params: SamplingParams,
               generator: torch.Generator | None = None) -> tuple[list[list[int]], list[list[float]], dict[str, float]]:
        if generator is not None:
            raise DataError("co-sampling decodes with the shared teacher and cannot run beside training")
        # A teacher set to compute in bf16 (LocalTeacher.compute_in) decodes under its own autocast.
        with getattr(self.teacher, "precision", contextlib.nullcontext)():
            return co_generate(student, self.teacher.model, prompts, params, self.tokenizer, rule=self.rule,
                               mixture_alpha=self.mixture_alpha, accept_top_k=self.accept_top_k)


class DatasetAnswers:
    """Off-policy rows written by the dataset's reference answers (supervised KD), cut to the step's
    rollout length; ``rollout/truncated_references`` counts answers longer than ``max_new_tokens``."""

    def __init__(self, max_new_tokens: int | None = None) -> None:
        self.max_new_tokens = max_new_tokens

    def write(self, examples: list[Example], params: SamplingParams) -> tuple[list[list[int]], dict[str, float]]:
        cap = self.max_new_tokens or params.max_new_tokens
        truncated = 0
        completions = []
        for example in examples:
            if example.answer_ids is None:
                raise DataError(
                    f"prompt {example.prompt[:40]!r} has no reference answer, which "
                    "rollout.off_policy_source=dataset needs; add answers or use on_policy_fraction=1"
                )
            truncated += len(example.answer_ids) > cap
            completions.append(example.answer_ids[: params.max_new_tokens])  # prefix-aware
        return completions, {"rollout/truncated_references": float(truncated)}


class TeacherAnswers:
    """Off-policy rows written by the teacher's own samples (SeqKD, Kim & Rush 2016)."""

    def __init__(self, teacher: Any) -> None:
        if teacher is None:
            raise DataError("rollout.off_policy_source=teacher needs a teacher model")
        self.teacher = teacher

    def write(self, examples: list[Example], params: SamplingParams) -> tuple[list[list[int]], dict[str, float]]:
        start = time.perf_counter()
        outs = self.teacher.generate([e.prompt_ids for e in examples], params)
        return outs, {"perf/generate_teacher_s": time.perf_counter() - start}


class BehaviourPolicy:
    """Decides, per sample, who writes each response, and produces the micro-batch.

    Each sample is written by ``sampler`` (the student, alone or co-sampled with the teacher) with
    probability lambda and otherwise by ``off_policy`` (the dataset's answers or the teacher's
    samples) — GKD's per-sample mixture (arXiv 2306.13649, Algorithm 1); lambda 1 is on-policy
    distillation, lambda 0 supervised KD / SeqKD. Without explicit parts, they follow ``cfg``.
    """

    def __init__(
        self, cfg: RolloutConfig, temperature: float, tokenizer: Any, teacher: Any | None = None,
        vocab_size: int | None = None, *, sampler: Any = None, off_policy: Any = None,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            vocab_size=vocab_size,
        )
        if sampler is None:
            sampler = StudentSampler(tokenizer) if cfg.sampler not in CO_SAMPLERS else CoSampler(
                teacher, tokenizer, cfg.sampler, cfg.mixture_alpha, cfg.speculative_top_k)
        self.sampler = sampler
        self._off_policy = off_policy
        self._teacher = teacher

    @property
    def off_policy(self) -> Any:
        # Built on first use: a run that never writes off-policy rows needs no teacher / answers for it.
        if self._off_policy is None:
            self._off_policy = DatasetAnswers(self.cfg.max_new_tokens) if self.cfg.off_policy_source == "dataset" else \
                TeacherAnswers(self._teacher)
        return self._off_policy

    def rollout(
        self, student: torch.nn.Module, prompts: list[Example], on_policy_fraction: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[SequenceBatch, dict[str, float]]:
        """Write one micro-batch; ``on_policy_fraction`` overrides the configured lambda. Randomness comes
        from the global (seeded, checkpointed) RNG, or from ``generator`` when given."""
        fraction = self.cfg.on_policy_fraction if on_policy_fraction is None else on_policy_fraction
        # Each prompt is answered samples_per_prompt times (GRPO-style groups for outcome rewards).
        repeats = self.cfg.samples_per_prompt
        examples = [example for example in prompts for _ in range(repeats)]
        # One uniform draw per sample from the global (seeded, checkpointed) RNG.
        coins = torch.rand(len(examples), generator=generator)
        on_policy = (coins < fraction).tolist()
        completions: list[list[int] | None] = [None] * len(examples)
        metrics: dict[str, float] = {"rollout/truncated_references": 0.0}

        student_idx = [i for i, flag in enumerate(on_policy) if flag]
        off_idx = [i for i, flag in enumerate(on_policy) if not flag]
        sampler_lps: list[list[float] | None] | None = None
        if student_idx:
            start = time.perf_counter()
            outs, lps, sample_metrics = self.sampler.sample(student, [examples[i].prompt_ids for i in student_idx],
                                                            self.params, generator)
            metrics["perf/generate_student_s"] = time.perf_counter() - start
            metrics.update(sample_metrics)
            sampler_lps = [None] * len(examples)
            for i, seq, lp in zip(student_idx, outs, lps):
                completions[i], sampler_lps[i] = seq, lp
        if off_idx:
            outs, write_metrics = self.off_policy.write([examples[i] for i in off_idx], self.params)
            metrics.update(write_metrics)
            for i, seq in zip(off_idx, outs):
                completions[i] = seq

        batch = build_batch(
            [e.prompt_ids for e in examples],
            [c or [] for c in completions],
            self.tokenizer.pad_token_id,
            on_policy,
            sampler_lps,
        )
        batch.examples = examples
        batch.group_B = torch.arange(len(prompts)).repeat_interleave(repeats)
        stops = set(stop_token_ids(student, self.tokenizer))
        ended = [bool(c) and c[-1] in stops for c in completions]
        metrics.update({
            "rollout/on_policy_fraction": sum(on_policy) / len(on_policy),
            "rollout/completion_tokens_mean": batch.num_tokens / len(examples),
            "rollout/eos_fraction": sum(ended) / len(ended),
        })
        return batch, metrics

    def token_counts(self, batch: SequenceBatch) -> tuple[float, float]:
        """Completion tokens the batch cost to write: ``(by the student, by the teacher)``."""
        lengths_B = batch.completion_mask_BC.sum(-1)
        teacher_writes_off = self.cfg.off_policy_source == "teacher"
        co_sampled = float(isinstance(self.sampler, CoSampler))  # the teacher decodes every on-policy token
        student = float((lengths_B * batch.on_policy_B).sum().item())
        teacher = float((lengths_B * (~batch.on_policy_B if teacher_writes_off else batch.on_policy_B * co_sampled))
                        .sum().item())
        return student, teacher


class ExampleStream:
    """Deterministic epoch-wise shuffling addressed by a global position (for exact resume)."""

    def __init__(self, examples: list[Any], seed: int, rank: int = 0, world: int = 1) -> None:
        self.examples = examples
        self.seed = seed
        self.rank = rank
        self.world = world
        self.position = 0  # examples consumed globally
        self._epoch = -1
        self._order: list[int] = []

    def _index(self, global_pos: int) -> int:
        epoch, offset = divmod(global_pos, len(self.examples))
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.examples), generator=gen).tolist()
            self._epoch = epoch
        return self._order[offset]

    def next(self, batch_size: int) -> list[Any]:
        start = self.position + self.rank * batch_size
        batch = [self.examples[self._index(start + i)] for i in range(batch_size)]
        self.position += batch_size * self.world
        return batch


def rollout_length(cfg: Any, step: int, total_steps: int) -> int:
    """Tokens to sample at ``step`` (1-based): the prefix schedule of Prefix OPD
    (arXiv 2602.15260), linear from ``prefix_tokens`` to ``prefix_tokens_final``, capped by
    ``max_new_tokens``; plain ``max_new_tokens`` when no prefix is set."""
    if cfg.prefix_tokens is None:
        return cfg.max_new_tokens
    final = cfg.prefix_tokens_final or cfg.prefix_tokens
    progress = (step - 1) / max(1, total_steps - 1)
    length = round(cfg.prefix_tokens + progress * (final - cfg.prefix_tokens))
    return max(1, min(cfg.max_new_tokens, length))


class Rollouts(Hooks, abc.ABC):
    """What the training loop asks for each optimizer step: ``grad_accum`` micro-batches of
    ``batch_size`` rows from the data stream, and what they cost to write.

    Subclasses say where a micro-batch comes from (:meth:`micro_batch`); the stream's position is
    their checkpointed state.
    """

    def __init__(self, stream: ExampleStream, batch_size: int, grad_accum: int, total_steps: int) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.total_steps = total_steps

    def next_step(self, student: torch.nn.Module, step: int, generator: torch.Generator | None = None
                  ) -> tuple[list[SequenceBatch], list[dict[str, float]]]:
        """The micro-batches of optimizer step ``step``; randomness from the global RNG, or ``generator``."""
        self.begin(step)
        batches, metrics = [], []
        for _ in range(self.grad_accum):
            batch, batch_metrics = self.micro_batch(student, step, self.stream.next(self.batch_size), generator)
            batches.append(batch)
            metrics.append(batch_metrics)
        return batches, metrics

    def begin(self, step: int) -> None:
        """Per-step settings, before the first micro-batch."""

    @abc.abstractmethod
    def micro_batch(self, student: torch.nn.Module, step: int, rows: list[Any],
                    generator: torch.Generator | None = None) -> tuple[SequenceBatch, dict[str, float]]:
        """One micro-batch written for ``rows`` (prompts, or whatever the stream holds)."""

    def token_counts(self, batch: SequenceBatch) -> tuple[float, float]:
        """Completion tokens the batch cost to write: ``(by the student, by the teacher)``."""
        return float(batch.completion_mask_BC.sum().item()), 0.0

    @property
    def max_new_tokens(self) -> int:
        return 0

    def state_dict(self) -> dict[str, Any]:
        return {"data_position": self.stream.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.position = int(state["data_position"])


class PolicyRollouts(Rollouts):
    """Prompts answered by a :class:`BehaviourPolicy`, with the run's schedules applied each step:
    GKD's lambda (``rollout.on_policy_schedule``) and Prefix OPD's rollout length."""

    def __init__(self, policy: BehaviourPolicy, stream: ExampleStream, batch_size: int, grad_accum: int,
                 total_steps: int, precision: Any = contextlib.nullcontext) -> None:
        super().__init__(stream, batch_size, grad_accum, total_steps)
        self.policy = policy
        self.precision = precision  # autocast around a rollout: weights cast once per rollout, not per token
        self.fraction = policy.cfg.on_policy_fraction

    def begin(self, step: int) -> None:
        self.policy.params.max_new_tokens = rollout_length(self.policy.cfg, step, self.total_steps)
        self.fraction = self.policy.cfg.on_policy_fraction_at(step, self.total_steps)

    def micro_batch(self, student: torch.nn.Module, step: int, rows: list[Any],
                    generator: torch.Generator | None = None) -> tuple[SequenceBatch, dict[str, float]]:
        with self.precision():
            batch, metrics = self.policy.rollout(student, rows, self.fraction, generator)
        metrics["rollout/on_policy_target"] = self.fraction
        return batch, metrics

    def token_counts(self, batch: SequenceBatch) -> tuple[float, float]:
        return self.policy.token_counts(batch)

    @property
    def max_new_tokens(self) -> int:
        return self.policy.params.max_new_tokens


class AdaptiveRollouts(PolicyRollouts):
    """DistiLLM's adaptive off-policy schedule (:class:`AdaptiveOffPolicy`): each step's rows are
    fresh student samples, a replay of earlier ones, or the dataset's answers, and the student
    probability rises when the validation loss (``validation_loss()``, every ``eval_every`` steps)
    worsens."""

    def __init__(self, policy: BehaviourPolicy, stream: ExampleStream, batch_size: int, grad_accum: int,
                 total_steps: int, schedule: AdaptiveOffPolicy, validation_loss: Any, eval_every: int,
                 precision: Any = contextlib.nullcontext, log: Any = None) -> None:
        super().__init__(policy, stream, batch_size, grad_accum, total_steps, precision)
        self.schedule = schedule
        self.validation_loss = validation_loss
        self.eval_every = eval_every
        self.log = log
        self.source = "dataset"

    def begin(self, step: int) -> None:
        super().begin(step)
        self.source = self.schedule.choose(step, self.total_steps)

    def micro_batch(self, student: torch.nn.Module, step: int, rows: list[Any],
                    generator: torch.Generator | None = None) -> tuple[SequenceBatch, dict[str, float]]:
        if self.source == "replay":
            batch = self.schedule.replay(self.batch_size, self.policy.tokenizer.pad_token_id)
            metrics = {"rollout/on_policy_fraction": 0.0}
        else:
            with self.precision():
                batch, metrics = self.policy.rollout(student, rows, float(self.source == "student"))
            if self.source == "student":
                self.schedule.record(batch)
        metrics.update({"rollout/adaptive_phi": self.schedule.phi,
                        "rollout/replay_fraction": float(self.source == "replay"),
                        "rollout/replay_buffer": float(len(self.schedule.buffer))})
        return batch, metrics

    def after_step(self, step: int, stepped: bool) -> dict[str, float]:
        if step % self.eval_every:
            return {}
        val_loss = self.validation_loss()
        if self.schedule.update(val_loss) and self.log is not None:
            self.log(f"step {step}: validation loss {val_loss:.4f} rose; student-sample probability -> "
                     f"{self.schedule.phi:.2f}")
        return {"eval/reference_nll": val_loss, "rollout/adaptive_phi": self.schedule.phi}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "adaptive_off_policy": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.schedule.load_state_dict(state["adaptive_off_policy"])


class SnapshotSampler(Hooks):
    """The ``hf`` engine for asynchronous rollouts: opd's decoding loop on a snapshot of the student,
    so rollouts can be written beside training (torch kernels release the GIL) from weights that only
    change when :meth:`push` copies the student's in. Costs one more copy of the student."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.student: Any = None
        self.snapshot: torch.nn.Module | None = None
        self.version = 0
        self.last_sync_s = 0.0

    def start(self, student: Any = None) -> None:
        import copy

        self.student = student
        self.snapshot = copy.deepcopy(student.module)
        self.snapshot.requires_grad_(False)
        self.version = student.step

    @torch.no_grad()
    def push(self, step: int) -> float:
        started = time.perf_counter()
        assert self.snapshot is not None, "the snapshot sampler was not started"
        for copy_param, param in zip(self.snapshot.parameters(), self.student.module.parameters()):
            copy_param.copy_(param.detach())
        self.version = step
        self.last_sync_s = time.perf_counter() - started
        return self.last_sync_s

    def sample(self, student: torch.nn.Module, prompts: list[list[int]], params: SamplingParams,
               generator: torch.Generator | None = None) -> tuple[list[list[int]], list[list[float]], dict[str, float]]:
        assert self.snapshot is not None, "the snapshot sampler was not started"
        outs, lps = sample_generate(self.snapshot, prompts, params, self.tokenizer, generator)
        return outs, lps, {"rollout/weight_version": float(self.version)}


class AsyncRollouts(Hooks):
    """Rollouts written ahead, beside training (``rollout.async_steps`` = k): the micro-batches of step
    t are written while step t-1 (and t-2) train, by a sampler holding its own copy of the weights
    (:class:`SnapshotSampler`, :class:`opd.rollout_server.VLLMServerSampler`).

    The schedule is fixed, so a run is deterministic and resumes exactly: one background worker
    writes the steps in order; step t's rollout starts after step t-1-k ended and uses the weights
    pushed then (step t-1-k's, or an older push with ``rollout.weight_sync_every`` > 1); before a push
    every rollout still being written is waited for, so no rollout mixes two weight versions; each
    step's randomness comes from its own generator seeded by (seed, rank, step), never from the global
    RNG that training uses. ``rollout/policy_lag`` logs t-1 minus the version a step's rollout used (k
    in steady state); the objectives correct for it through the sampler's log-probs (importance ratio,
    optionally capped by ``loss.importance_cap``). A checkpoint holds the rollouts written ahead, so
    ``--resume`` needs no old weights.
    """

    def __init__(self, inner: Rollouts, lag: int, sampler: Any, seed: int, rank: int, sync_every: int,
                 example_index: dict[int, int] | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.inner = inner
        self.lag = lag
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.sync_every = sync_every
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-rollouts")
        self.pending: dict[int, Any] = {}  # step -> Future of (batches, metrics, version)
        self.written: dict[int, tuple[list[SequenceBatch], list[dict[str, float]], int]] = {}
        self.next_step_to_write = 1
        self.student: Any = None
        self._examples = list(getattr(inner.stream, "examples", []))
        self._index = example_index or {id(e): i for i, e in enumerate(self._examples)}

    @property
    def stream(self) -> ExampleStream:
        return self.inner.stream

    @property
    def max_new_tokens(self) -> int:
        return self.inner.max_new_tokens

    def token_counts(self, batch: SequenceBatch) -> tuple[float, float]:
        return self.inner.token_counts(batch)

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank) * 100_019 + step)

    def _write(self, step: int, version: int) -> tuple[list[SequenceBatch], list[dict[str, float]], int]:
        with torch.no_grad():
            batches, metrics = self.inner.next_step(self.student, step, self._generator(step))
        return batches, metrics, version

    def _launch_until(self, last: int) -> None:
        while self.next_step_to_write <= last:
            step = self.next_step_to_write
            self.pending[step] = self.worker.submit(self._write, step, self.sampler.version)
            self.next_step_to_write += 1

    def _settle(self) -> None:
        """Wait for every rollout being written."""
        for step in sorted(self.pending):
            self.written[step] = self.pending.pop(step).result()

    def start(self, student: Any = None) -> None:
        self.sampler.start(student)
        self.student = student.module if student is not None else None
        # A fresh run writes steps 1 .. 1 + k now; a resumed one has them from its checkpoint.
        self._launch_until(max(self.next_step_to_write - 1, 1 + self.lag))

    def next_step(self, student: torch.nn.Module, step: int, generator: torch.Generator | None = None
                  ) -> tuple[list[SequenceBatch], list[dict[str, float]]]:
        if step in self.pending:
            self.written[step] = self.pending.pop(step).result()
        batches, metrics, version = self.written.pop(step)
        for row in metrics:
            row["rollout/policy_lag"] = float(step - 1 - version)
        return batches, metrics

    def after_step(self, step: int, stepped: bool) -> dict[str, float]:
        out = {}
        if step % self.sync_every == 0:
            self._settle()  # no rollout may be written across two weight versions
            self.sampler.push(step)
            out["perf/weight_sync_s"] = self.sampler.last_sync_s
        self._launch_until(step + 1 + self.lag)
        return out

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)
        self.sampler.close()

    # -- checkpoints: the rollouts written ahead travel with the student ------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._settle()
        ahead = {str(step): {"batches": [self._pack(b) for b in batches], "metrics": metrics, "version": version}
                 for step, (batches, metrics, version) in self.written.items()}
        return {**self.inner.state_dict(), "async_rollouts": {"ahead": ahead, "next": self.next_step_to_write,
                                                               "version": self.sampler.version}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
        saved = state["async_rollouts"]
        self.written = {int(step): ([self._unpack(b) for b in entry["batches"]], entry["metrics"], entry["version"])
                        for step, entry in saved["ahead"].items()}
        self.next_step_to_write = int(saved["next"])

    def _pack(self, batch: SequenceBatch) -> dict[str, Any]:
        return {"input_ids": batch.input_ids_BT, "attention": batch.attention_mask_BT,
                "mask": batch.completion_mask_BC, "prompt_len": batch.prompt_len, "on_policy": batch.on_policy_B,
                "sampler": batch.sampler_logprobs_BC, "group": batch.group_B,
                "examples": [self._index[id(e)] for e in batch.examples or []]}

    def _unpack(self, packed: dict[str, Any]) -> SequenceBatch:
        return SequenceBatch(packed["input_ids"], packed["attention"], packed["mask"], int(packed["prompt_len"]),
                             packed["on_policy"], packed["sampler"], [self._examples[i] for i in packed["examples"]],
                             packed["group"])


class AdaptiveOffPolicy:
    """DistiLLM's adaptive off-policy schedule (arXiv 2402.03898, Sec. 4.2 and its code).

    ``phi`` (probability of training on student-generated outputs) starts at ``init`` and
    rises by ``increment`` whenever the validation loss is at least ``loss_eps`` above the
    last recorded value. Each step draws ``r ~ U(0, 1)`` and, with ``phi_t = phi (1 - step/total)``:

    - ``r < phi_t`` (or ``r < phi`` while the replay buffer is still filling): fresh student
      samples, which also enter the FIFO replay buffer;
    - else ``r < phi``: a batch drawn uniformly from the replay buffer (off-policy reuse of
      earlier student samples — cheaper than generating);
    - else: the dataset's reference answers.
    """

    def __init__(self, cfg: RolloutConfig) -> None:
        self.phi = cfg.adaptive_init
        self.increment = cfg.adaptive_increment
        self.loss_eps = cfg.adaptive_loss_eps
        self.capacity = cfg.replay_buffer_size
        self.last_loss: float | None = None
        self.buffer: list[tuple[list[int], list[int]]] = []

    def choose(self, step: int, total_steps: int) -> str:
        r = float(torch.rand(()))
        phi_t = self.phi * (1.0 - (step - 1) / max(1, total_steps))
        if r < phi_t or (r < self.phi and len(self.buffer) < self.capacity):
            return "student"
        if r < self.phi and self.buffer:
            return "replay"
        return "dataset"

    def record(self, batch: SequenceBatch) -> None:
        """Push the student-written sequences of ``batch`` into the FIFO buffer."""
        for i in range(batch.input_ids_BT.shape[0]):
            if not bool(batch.on_policy_B[i]):
                continue
            prompt = batch.input_ids_BT[i, : batch.prompt_len][batch.attention_mask_BT[i, : batch.prompt_len].bool()]
            length = int(batch.completion_mask_BC[i].sum().item())
            completion = batch.completion_ids_BC[i, :length]
            self.buffer.append((prompt.tolist(), completion.tolist()))
        del self.buffer[: max(0, len(self.buffer) - self.capacity)]

    def replay(self, batch_size: int, pad_id: int) -> SequenceBatch:
        picks = torch.randperm(len(self.buffer))[: batch_size].tolist()
        prompts = [self.buffer[i][0] for i in picks]
        completions = [self.buffer[i][1] for i in picks]
        return build_batch(prompts, completions, pad_id, [False] * len(picks))

    def update(self, validation_loss: float) -> bool:
        """Raise phi if validation loss worsened; returns whether it rose."""
        if self.last_loss is None:
            self.last_loss = validation_loss
            return False
        if validation_loss >= self.last_loss + self.loss_eps and self.phi < 1.0:
            self.phi = min(1.0, self.phi + self.increment)
            self.last_loss = validation_loss
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"phi": self.phi, "last_loss": self.last_loss, "buffer": self.buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phi, self.last_loss = state["phi"], state["last_loss"]
        self.buffer = [(list(p), list(c)) for p, c in state["buffer"]]
