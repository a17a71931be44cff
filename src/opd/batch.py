"""The micro-batch every part passes around: :class:`SequenceBatch` and :func:`build_batch`.

Prompts are left-padded to a common length and completions right-padded; the completion mask
is 1 on generated tokens up to and including the first EOS and 0 on the prompt, padding and
anything after EOS. This module imports nothing else of opd's (the teacher signal, the losses
and the cross-tokenizer view all use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from opd.data import Example


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
            pick(self.group_B), None if self.teacher_signal is None else self.teacher_signal.select(rows),
        )


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
