"""Behaviour policies: who writes the response the loss is computed on.

- student (on-policy): the student samples with the run's temperature / top-p / top-k,
- dataset (off-policy): the reference answers of the data (supervised KD),
- teacher (off-policy): the teacher samples (SeqKD, Kim & Rush 2016),
- a per-sample mixture: each prompt is written by the student with probability
  ``on_policy_fraction`` (GKD's lambda, arXiv 2306.13649, Algorithm 1), otherwise
  by the off-policy source. The coin is flipped per sample, never once per batch,
  and the realised fraction is reported as ``rollout/on_policy_fraction``.

All of them produce a :class:`SequenceBatch`: prompts left-padded to a common
length, completions right-padded, and a completion mask that is 1 on generated
tokens up to and including the first EOS and 0 on the prompt, padding and
anything after EOS.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from opd.config import RolloutConfig
from opd.cpu_linear import packed_for_decoding
from opd.data import Example
from opd.errors import DataError


@dataclass
class SequenceBatch:
    """Prompt + completion token ids for a micro-batch.

    ``input_ids_BT`` = ``[left-padded prompt (P) | right-padded completion (C)]``.
    """

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    completion_mask_BC: torch.Tensor  # float 0/1
    prompt_len: int
    on_policy_B: torch.Tensor  # bool: written by the student
    # log-prob of each completion token under the distribution that sampled it (co-sampling)
    sampler_logprobs_BC: torch.Tensor | None = None
    examples: list[Example] | None = None  # the rows behind each sequence (rewards need references)
    group_B: torch.Tensor | None = None  # prompt index of each sequence (samples_per_prompt > 1)
    teacher_signal: Any = None  # cached / served teacher log-probs travelling with the batch

    @property
    def completion_len(self) -> int:
        return self.completion_mask_BC.shape[1]

    @property
    def completion_ids_BC(self) -> torch.Tensor:
        return self.input_ids_BT[:, self.prompt_len :]

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask_BC.sum().item())

    def select(self, rows: list[int]) -> SequenceBatch:
        """The sub-batch of ``rows`` (e.g. the sequences routed to one teacher)."""
        index = torch.tensor(rows, dtype=torch.long)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, index)

        return SequenceBatch(
            self.input_ids_BT.index_select(0, index), self.attention_mask_BT.index_select(0, index),
            self.completion_mask_BC.index_select(0, index), self.prompt_len, self.on_policy_B.index_select(0, index),
            pick(self.sampler_logprobs_BC), [self.examples[i] for i in rows] if self.examples is not None else None,
            pick(self.group_B),
        )


def truncate_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Cut a generated sequence after its first EOS (kept), dropping the padding after it."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1]
    return tokens


def build_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, on_policy: list[bool] | None = None,
    sampler_logprobs: list[list[float] | None] | None = None,
) -> SequenceBatch:
    """Assemble prompts and completions into one padded batch."""
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions differ in count")
    prompt_len = max(len(p) for p in prompts)
    completion_len = max(1, max(len(c) for c in completions))
    batch = len(prompts)
    input_ids = torch.full((batch, prompt_len + completion_len), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, prompt_len + completion_len), dtype=torch.long)
    completion_mask = torch.zeros((batch, completion_len), dtype=torch.float32)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[i, prompt_len - len(prompt) : prompt_len] = torch.tensor(prompt, dtype=torch.long)
        attention[i, prompt_len - len(prompt) : prompt_len] = 1
        if completion:
            input_ids[i, prompt_len : prompt_len + len(completion)] = torch.tensor(completion, dtype=torch.long)
            attention[i, prompt_len : prompt_len + len(completion)] = 1
            completion_mask[i, : len(completion)] = 1.0
    flags = torch.tensor(on_policy if on_policy is not None else [True] * batch, dtype=torch.bool)
    sampler_BC = None
    if sampler_logprobs is not None:
        # NaN marks rows the sampler did not write (dataset / teacher rows): losses fall back to
        # the current student there (ratio 1) instead of trusting a made-up value.
        sampler_BC = torch.zeros((batch, completion_len), dtype=torch.float32)
        for i, lps in enumerate(sampler_logprobs):
            if lps is None:
                sampler_BC[i] = float("nan")
            else:
                sampler_BC[i, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
    return SequenceBatch(input_ids, attention, completion_mask, prompt_len, flags, sampler_BC)


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
    model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, tokenizer: Any
) -> list[list[int]]:
    """Sample completions with ``transformers`` ``generate`` (KV cache), truncated after EOS."""
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
                logits_processor=processors,
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
    model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, tokenizer: Any
) -> tuple[list[list[int]], list[list[float]]]:
    """Student rollouts of the ``hf`` engine: the model decoded with its KV cache by opd's own loop.

    Same distribution as ``hf_generate`` (temperature, top-k, top-p, shared vocabulary), plus the
    log-probability of every sampled token under the distribution it was drawn from — exactly what
    ran, so under ``train.mixed_precision`` the bf16 sampler's log-probs, which the sampled-token
    objectives use as pi_sampler. Tokens are drawn by inverting the CDF with one uniform per row
    (``torch.rand``, the seeded and checkpointed RNG): ~1.5 ms per step at V = 49k against ~7 ms for
    ``torch.multinomial`` on 2 CPU cores. Greedy rows get log-prob 0 (the greedy policy is
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
                    u_B1 = torch.rand(len(prompts), 1, device=device) * cdf_BV[:, -1:]
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


class BehaviourPolicy:
    """Decides, per sample, who writes each response, and produces the batch."""

    def __init__(
        self, cfg: RolloutConfig, temperature: float, tokenizer: Any, teacher: Any | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.teacher = teacher
        self.engine: Any = None  # a VLLMEngine when rollout.engine=vllm (set by the trainer)
        self.params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            vocab_size=vocab_size,
        )

    def rollout(
        self, student: torch.nn.Module, prompts: list[Example], on_policy_fraction: float | None = None
    ) -> tuple[SequenceBatch, dict[str, float]]:
        """Write one micro-batch; ``on_policy_fraction`` overrides the configured lambda."""
        fraction = self.cfg.on_policy_fraction if on_policy_fraction is None else on_policy_fraction
        # Each prompt is answered samples_per_prompt times (GRPO-style groups for outcome rewards).
        repeats = self.cfg.samples_per_prompt
        examples = [example for example in prompts for _ in range(repeats)]
        # One uniform draw per sample from the global (seeded, checkpointed) RNG.
        coins = torch.rand(len(examples))
        on_policy = (coins < fraction).tolist()
        completions: list[list[int] | None] = [None] * len(examples)
        timings: dict[str, float] = {}

        student_idx = [i for i, flag in enumerate(on_policy) if flag]
        off_idx = [i for i, flag in enumerate(on_policy) if not flag]
        sampler_lps: list[list[float] | None] | None = None
        if student_idx and self.cfg.sampler != "student":
            if self.teacher is None or not hasattr(self.teacher, "model"):
                raise DataError(f"rollout.sampler={self.cfg.sampler} needs a local teacher model")
            start = time.perf_counter()
            # A teacher set to compute in bf16 (LocalTeacher.compute_in) decodes under its own autocast.
            precision = getattr(self.teacher, "precision", contextlib.nullcontext)
            with precision():
                outs, lps, co_metrics = co_generate(
                    student, self.teacher.model, [examples[i].prompt_ids for i in student_idx], self.params,
                    self.tokenizer, rule=self.cfg.sampler, mixture_alpha=self.cfg.mixture_alpha,
                    accept_top_k=self.cfg.speculative_top_k,
                )
            timings["perf/generate_student_s"] = time.perf_counter() - start
            timings.update(co_metrics)
            sampler_lps = [None] * len(examples)
            for i, seq, lp in zip(student_idx, outs, lps):
                completions[i], sampler_lps[i] = seq, lp
        elif student_idx and self.engine is not None:
            start = time.perf_counter()
            outs, lps = self.engine.generate([examples[i].prompt_ids for i in student_idx], self.params)
            timings["perf/generate_student_s"] = time.perf_counter() - start
            sampler_lps = [None] * len(examples)
            for i, seq, lp in zip(student_idx, outs, lps):
                completions[i], sampler_lps[i] = seq, lp
        elif student_idx:
            start = time.perf_counter()
            outs, lps = sample_generate(student, [examples[i].prompt_ids for i in student_idx], self.params,
                                        self.tokenizer)
            timings["perf/generate_student_s"] = time.perf_counter() - start
            sampler_lps = [None] * len(examples)
            for i, seq, lp in zip(student_idx, outs, lps):
                completions[i], sampler_lps[i] = seq, lp
        if off_idx and self.cfg.off_policy_source == "teacher":
            if self.teacher is None:
                raise DataError("rollout.off_policy_source=teacher needs a teacher model")
            start = time.perf_counter()
            outs = self.teacher.generate([examples[i].prompt_ids for i in off_idx], self.params)
            timings["perf/generate_teacher_s"] = time.perf_counter() - start
            for i, seq in zip(off_idx, outs):
                completions[i] = seq
        truncated_refs = 0
        if off_idx and self.cfg.off_policy_source == "dataset":
            for i in off_idx:
                if examples[i].answer_ids is None:
                    raise DataError(
                        f"prompt {examples[i].prompt[:40]!r} has no reference answer, which "
                        "rollout.off_policy_source=dataset needs; add answers or use on_policy_fraction=1"
                    )
                truncated_refs += len(examples[i].answer_ids) > self.cfg.max_new_tokens
                completions[i] = examples[i].answer_ids[: self.params.max_new_tokens]  # prefix-aware

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
        metrics = {
            "rollout/on_policy_fraction": sum(on_policy) / len(on_policy),
            "rollout/completion_tokens_mean": batch.num_tokens / len(examples),
            "rollout/eos_fraction": sum(ended) / len(ended),
            "rollout/truncated_references": float(truncated_refs),
            **timings,
        }
        return batch, metrics


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
