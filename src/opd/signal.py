"""What a teacher hands back for one micro-batch: the :class:`TeacherSignal`.

Every teacher kind (:mod:`opd.teachers`, :mod:`opd.cache`, GAD's discriminator) answers
``score(batch) -> TeacherSignal``, filling the fields its kind can give (the survey's
"what the teacher exposes" axis, design.md §2):

============================  ==============================================================
field                         who fills it
============================  ==============================================================
``logits_BCV``                white-box teachers (local, self): full next-token logits
``topk_logprobs_BCK`` / ids   served teachers and caches: the top-k log-probs per position
``token_logprobs_BC``         served teachers and caches: log-prob of each completion token
``rewards_B``                 sequence rewards: GAD's discriminator, a verifier (KDRL)
``reference``                 a second, frozen policy's signal (G-OPD / ExOPD's p_ref)
``cross``                     a teacher with its own tokenizer: its view of the completions
``route_B``                   routed teachers: the name of the teacher that scored each row
============================  ==============================================================

Objectives (:mod:`opd.losses`) read what they need through :meth:`TeacherSignal.token_logprobs`
and :meth:`TeacherSignal.topk`, which return what the teacher exposed or derive it from full
logits, so one objective serves every teacher that can give its input.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

# What an objective reads from the signal (its ``form``), for teachers that must agree on one.
FORM_LOGITS = "logits"
FORM_TOPK = "topk"
FORM_TOKEN_LOGPROBS = "token_logprobs"


@dataclass
class CrossTokenizerView:
    """A cross-tokenizer teacher's logits on its own re-tokenisation of the completions."""

    logits_BCW: torch.Tensor  # W = the teacher's vocabulary
    ids_BC: torch.Tensor  # the teacher's completion token ids
    alignments: list[Any]  # opd.cross_tokenizer.Alignment per row
    teacher_vocab: int
    matched: tuple[torch.Tensor, torch.Tensor] | None  # ids of strings both vocabularies share


@dataclass
class TeacherSignal:
    """A teacher's feedback on one micro-batch (rows and completion positions as in the batch)."""

    logits_BCV: Any = None  # Tensor [B, C, V], or opd.fused.HiddenLogits (hidden states + the teacher's head)
    token_logprobs_BC: torch.Tensor | None = None
    topk_logprobs_BCK: torch.Tensor | None = None
    topk_ids_BCK: torch.Tensor | None = None
    rewards_B: torch.Tensor | None = None
    reference: TeacherSignal | None = None
    cross: CrossTokenizerView | None = None
    route_B: list[str] | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. the discriminator's update

    def to(self, device: torch.device | str) -> TeacherSignal:
        """The same signal with its tensors on ``device`` (no copy where they already are)."""
        moved = {f.name: _move(getattr(self, f.name), device) for f in fields(self)
                 if f.name not in ("cross", "route_B", "metrics")}
        return replace(self, **moved)

    def select(self, rows: list[int]) -> TeacherSignal:
        """The signal of the sub-batch ``rows``."""
        index = torch.tensor(rows, dtype=torch.long)
        picked = {f.name: _pick(getattr(self, f.name), index) for f in fields(self)
                  if f.name not in ("cross", "route_B", "metrics")}
        if self.cross is not None:
            raise ValueError("a cross-tokenizer signal cannot be split by rows")
        routes = None if self.route_B is None else [self.route_B[i] for i in rows]
        return replace(self, **picked, route_B=routes)

    @torch.no_grad()
    def token_logprobs(
        self, ids_BC: torch.Tensor, *, temperature: float, vocab_size: int | None, chunk_size: int | None,
    ) -> torch.Tensor:
        """``log p_T(y_t)`` of the completion tokens ``ids_BC``: as exposed, or from the full logits."""
        if self.token_logprobs_BC is not None:
            return self.token_logprobs_BC.to(ids_BC.device)
        from opd.divergences import gathered_logprobs

        logits_BCV = self.require_logits("the sampled tokens' log-probs")
        return gathered_logprobs(logits_BCV, ids_BC.to(logits_BCV.device)[..., None], temperature=temperature,
                                 vocab_size=vocab_size, chunk_size=chunk_size)[..., 0]

    @torch.no_grad()
    def topk(
        self, k: int, mask_BC: torch.Tensor, *, temperature: float, vocab_size: int | None, chunk_size: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's ``k`` most likely tokens per position ``(log-probs, ids)``: as exposed, or
        from the full logits (normalised over the full vocabulary either way)."""
        if self.topk_logprobs_BCK is not None and self.topk_ids_BCK is not None:
            return self.topk_logprobs_BCK[..., :k].to(mask_BC.device), self.topk_ids_BCK[..., :k].to(mask_BC.device)
        from opd.divergences import teacher_topk

        logits_BCV = self.require_logits("its top-k")
        return teacher_topk(logits_BCV, k, mask_BC.to(logits_BCV.device).bool(), temperature=temperature,
                            vocab_size=vocab_size, chunk_size=chunk_size)

    def restricted(
        self, form: str, ids_BC: torch.Tensor, mask_BC: torch.Tensor, *, k: int | None = None,
        temperature: float = 1.0, vocab_size: int | None = None, chunk_size: int | None = None,
    ) -> TeacherSignal:
        """Only what an objective reading ``form`` needs — so that signals of different teacher kinds
        (full logits from one, top-k log-probs from another) can be merged row-wise:

        - ``logits``: the full logits (the teacher must expose them);
        - ``topk``: the top-``k`` log-probs and ids, exposed or extracted from the logits;
        - ``token_logprobs``: the completion tokens' log-probs, exposed or gathered from the logits.
        """
        common = {"temperature": temperature, "vocab_size": vocab_size, "chunk_size": chunk_size}
        if form == FORM_LOGITS:
            return TeacherSignal(logits_BCV=self.require_logits("this objective"), metrics=self.metrics)
        if form == FORM_TOPK:
            if k is None:
                raise ValueError("restricting a signal to its top-k needs k")
            top_lp, top_ids = self.topk(k, mask_BC, **common)
            return TeacherSignal(topk_logprobs_BCK=top_lp, topk_ids_BCK=top_ids, metrics=self.metrics)
        if form == FORM_TOKEN_LOGPROBS:
            return TeacherSignal(token_logprobs_BC=self.token_logprobs(ids_BC, **common), metrics=self.metrics)
        raise ValueError(f"unknown signal form {form!r}")

    def with_logits(self) -> TeacherSignal:
        """The same signal with a fused teacher's hidden states turned into logits (for small
        diagnostic batches that read the logits themselves)."""
        if self.logits_BCV is None or isinstance(self.logits_BCV, torch.Tensor):
            return self
        return replace(self, logits_BCV=self.logits_BCV.logits())

    def require_logits(self, what: str = "full logits") -> torch.Tensor:
        if self.logits_BCV is None:
            raise ValueError(f"this teacher exposes no full logits, which {what} needs")
        return self.logits_BCV


def merge_rows(parts: list[tuple[list[int], TeacherSignal]], batch_size: int) -> TeacherSignal:
    """One signal for a batch scored in disjoint row groups (routing). A field is kept when every
    part has it; logits of different widths (padding rows) are cut to the narrowest."""
    merged: dict[str, Any] = {}
    for name in ("logits_BCV", "token_logprobs_BC", "topk_logprobs_BCK", "topk_ids_BCK", "rewards_B"):
        tensors = [getattr(signal, name) for _, signal in parts]
        if any(t is None for t in tensors):
            continue
        width = min(t.shape[-1] for t in tensors) if name == "logits_BCV" else None
        first = tensors[0]
        shape = (batch_size, *first.shape[1:-1], width) if width is not None else (batch_size, *first.shape[1:])
        out = first.new_empty(shape)
        for (rows, _), tensor in zip(parts, tensors):
            out[torch.tensor(rows, dtype=torch.long, device=out.device)] = \
                tensor[..., :width] if width is not None else tensor
        merged[name] = out
    routes: list[str] = [""] * batch_size
    metrics: dict[str, float] = {}
    for rows, signal in parts:
        for row, name in zip(rows, signal.route_B or [""] * len(rows)):
            routes[row] = name
        metrics.update(signal.metrics)
    return TeacherSignal(**merged, route_B=routes, metrics=metrics)


def _move(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, TeacherSignal):
        return value.to(device)
    return value


def _pick(value: Any, index: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor) or hasattr(value, "hidden_BCH"):  # logits, or hidden states + head
        return value.index_select(0, index.to(value.device))
    if isinstance(value, TeacherSignal):
        return value.select(index.tolist())
    return value
