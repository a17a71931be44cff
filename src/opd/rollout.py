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

import time
from dataclasses import dataclass
from typing import Any

import torch

from opd.config import RolloutConfig
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

    @property
    def completion_len(self) -> int:
        return self.completion_mask_BC.shape[1]

    @property
    def completion_ids_BC(self) -> torch.Tensor:
        return self.input_ids_BT[:, self.prompt_len :]

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask_BC.sum().item())


def truncate_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Cut a generated sequence after its first EOS (kept), dropping the padding after it."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1]
    return tokens


def build_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, on_policy: list[bool] | None = None
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
    return SequenceBatch(input_ids, attention, completion_mask, prompt_len, flags)


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
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention[i, width - len(prompt) :] = 1
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
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=gen_config,
            logits_processor=processors,
        )
    finally:
        model.generation_config = saved_config
        model.train(was_training)
    generated = out[:, width:].tolist()
    return [truncate_at_eos(seq, set(eos_ids)) for seq in generated]


class BehaviourPolicy:
    """Decides, per sample, who writes each response, and produces the batch."""

    def __init__(
        self, cfg: RolloutConfig, temperature: float, tokenizer: Any, teacher: Any | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.teacher = teacher
        self.params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            vocab_size=vocab_size,
        )

    def rollout(self, student: torch.nn.Module, examples: list[Example]) -> tuple[SequenceBatch, dict[str, float]]:
        # One uniform draw per sample from the global (seeded, checkpointed) RNG.
        coins = torch.rand(len(examples))
        on_policy = (coins < self.cfg.on_policy_fraction).tolist()
        completions: list[list[int] | None] = [None] * len(examples)
        timings: dict[str, float] = {}

        student_idx = [i for i, flag in enumerate(on_policy) if flag]
        off_idx = [i for i, flag in enumerate(on_policy) if not flag]
        if student_idx:
            start = time.perf_counter()
            outs = hf_generate(student, [examples[i].prompt_ids for i in student_idx], self.params, self.tokenizer)
            timings["perf/generate_student_s"] = time.perf_counter() - start
            for i, seq in zip(student_idx, outs):
                completions[i] = seq
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
        )
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
