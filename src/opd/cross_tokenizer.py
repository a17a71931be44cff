"""Cross-tokenizer distillation: a white-box teacher whose vocabulary differs from the student's.

The student's rollout is decoded to text and re-tokenised for the teacher, and the two
token sequences are aligned by byte spans of the UTF-8 text:

1. **Byte boundaries.** Each student token's end offset comes from incremental decoding of
   the sampled ids (a window of previous tokens gives the context that SentencePiece-style
   and whitespace decoders need; a token that ends inside a multi-byte character has no
   boundary of its own). The teacher's come from its fast tokenizer's offset mapping.
2. **Groups.** A byte position where both sides end a token closes a group; every token
   between two common boundaries belongs to that group (``k`` student tokens to ``m``
   teacher tokens). A trailing EOS of the student is its own group, paired with the
   teacher's EOS.
3. **Merged rows.** A group's distribution is the next-token distribution at its first
   position times the probabilities of the group's remaining actual tokens (chain rule,
   as in TRL's GOLD): ``row(v) = p(v | c_i0) * prod_{j > i0 in group} p(y_j | c_j)``.
4. **Loss.** Universal Logit Distillation (Boizard et al., arXiv 2402.12030): the L1
   distance between the two rows sorted in decreasing order (zero-padded to the larger
   vocabulary), the closed form of the Wasserstein-1 distance with uniform cost. With
   ``hybrid``, the tokens whose strings exist in both vocabularies are compared exactly
   (generalised JSD on their probabilities, GOLD's "matched" part) and ULD covers only the
   unmatched remainder; the two are weighted by the matched share of the teacher
   vocabulary unless a weight is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_WINDOW = 6  # previous tokens decoded with each new one: enough context for every decoder we know


def token_byte_ends(tokenizer: Any, ids: list[int]) -> list[int | None]:
    """UTF-8 byte offset at which each token's text ends in ``decode(ids)`` (None: mid-character).

    Incremental decoding (as streaming detokenisers do): the text a token adds is the decode
    of a short window ending with it minus the decode of the window without it. The sum of
    the pieces is checked against the full decode; if a decoder is not incremental the
    quadratic prefix-by-prefix decode is used instead.
    """
    ends: list[int | None] = []
    total = 0
    for k in range(len(ids)):
        start = max(0, k - _WINDOW)
        before = tokenizer.decode(ids[start:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        upto = tokenizer.decode(ids[start : k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if upto.endswith("\ufffd"):
            ends.append(None)  # this token ends inside a character; the next ones complete it
            continue
        pending_start = k
        while pending_start > 0 and ends[pending_start - 1] is None:
            pending_start -= 1
        if pending_start < k:  # re-decode from the last real boundary so the character is whole
            start = max(0, pending_start - _WINDOW)
            before = tokenizer.decode(ids[start:pending_start], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
        total += len(upto.encode("utf-8")) - len(before.encode("utf-8"))
        ends.append(total)
    full = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if ends and ends[-1] is not None and ends[-1] != len(full.encode("utf-8")):
        ends = []
        for k in range(len(ids)):
            prefix = tokenizer.decode(ids[: k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            ends.append(None if prefix.endswith("\ufffd") else len(prefix.encode("utf-8")))
    return ends


def char_to_byte_offsets(text: str) -> np.ndarray:
    """``out[c]`` = UTF-8 byte offset of character ``c`` (``out[len(text)]`` = total bytes)."""
    sizes = np.fromiter((len(ch.encode("utf-8")) for ch in text), dtype=np.int64, count=len(text))
    return np.concatenate([[0], np.cumsum(sizes)])


@dataclass
class Alignment:
    """Token groups of one sequence: ``student_group[i]`` / ``teacher_group[j]`` = group index of
    completion token ``i`` / ``j`` (-1 = not aligned), and the group count."""

    student_group: np.ndarray
    teacher_group: np.ndarray
    groups: int


def align(student_ends: list[int | None], teacher_ends: list[int]) -> Alignment:
    """Group tokens between byte positions where both tokenisations end a token."""
    s_ends = np.array([-1 if e is None else e for e in student_ends], dtype=np.int64)
    t_ends = np.asarray(teacher_ends, dtype=np.int64)
    common = np.intersect1d(s_ends[s_ends >= 0], t_ends)
    if common.size == 0:
        return Alignment(np.full(len(s_ends), -1), np.full(len(t_ends), -1), 0)
    last = common[-1]

    def groups_of(ends: np.ndarray) -> np.ndarray:
        # A token belongs to the first common boundary at or after its end; a mid-character token
        # (end -1) takes its successor's group. Tokens past the last common boundary are dropped.
        filled = ends.copy()
        for i in range(len(filled) - 2, -1, -1):
            if filled[i] < 0:
                filled[i] = filled[i + 1]
        group = np.searchsorted(common, filled, side="left")
        group[(filled < 0) | (filled > last)] = -1
        return group

    return Alignment(groups_of(s_ends), groups_of(t_ends), int(common.size))


@dataclass
class TeacherView:
    """The teacher's tokenisation of a batch and how it aligns with the student's."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    completion_len: int
    alignments: list[Alignment]


def teacher_view(
    student_tok: Any, teacher_tok: Any, prompts: list[list[int]], completions: list[list[int]],
) -> TeacherView:
    """Re-tokenise each (prompt, completion) for the teacher and align the completions."""
    student_eos = student_tok.eos_token_id
    teacher_prompts, teacher_completions, alignments = [], [], []
    for prompt, completion in zip(prompts, completions):
        ends_with_eos = bool(completion) and completion[-1] == student_eos
        body = completion[:-1] if ends_with_eos else completion
        prompt_text = student_tok.decode(prompt, skip_special_tokens=True)
        teacher_prompts.append(teacher_tok(prompt_text).input_ids)
        text = student_tok.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        encoded = teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        to_bytes = char_to_byte_offsets(text)
        teacher_ids = list(encoded.input_ids)
        teacher_ends = [int(to_bytes[end]) for _, end in encoded.offset_mapping]
        alignment = align(token_byte_ends(student_tok, body), teacher_ends)
        if ends_with_eos:  # EOS <-> EOS: the one special token both sides have
            teacher_ids.append(teacher_tok.eos_token_id)
            alignment = Alignment(np.append(alignment.student_group, alignment.groups),
                                  np.append(alignment.teacher_group, alignment.groups), alignment.groups + 1)
        teacher_completions.append(teacher_ids)
        alignments.append(alignment)
    from opd.batch import build_batch

    batch = build_batch(teacher_prompts, teacher_completions, teacher_tok.pad_token_id
                        if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id)
    return TeacherView(batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len, alignments)


def matched_vocab(student_tok: Any, teacher_tok: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the token strings present in both vocabularies: ``(student_ids, teacher_ids)``."""
    student_vocab = student_tok.get_vocab()
    pairs = sorted((s_id, t_id) for token, t_id in teacher_tok.get_vocab().items()
                   if (s_id := student_vocab.get(token)) is not None
                   and s_id < len(student_tok) and t_id < len(teacher_tok))
    student_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    teacher_ids = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return student_ids, teacher_ids


def _merged_log_rows(
    logits_BCV: torch.Tensor, ids_BC: torch.Tensor, alignments: list[Alignment], side: str, vocab: int,
    temperature: float,
) -> torch.Tensor:
    """``[G, vocab]`` log of each group's merged row (all groups of all sequences, in order)."""
    rows, offsets = [], []
    device = logits_BCV.device
    for b, alignment in enumerate(alignments):
        group = alignment.student_group if side == "student" else alignment.teacher_group
        if alignment.groups == 0:
            continue
        group_t = torch.as_tensor(group, device=device)
        valid = group_t >= 0
        positions = torch.arange(len(group), device=device)
        # first position of each group: where the group index changes
        first = torch.full((alignment.groups,), -1, dtype=torch.long, device=device)
        first.scatter_reduce_(0, group_t[valid], positions[valid], reduce="amin", include_self=False)
        # One log-softmax per sequence serves both the groups' first rows and the later tokens'
        # probabilities (the [G, V] rows are needed in full for the sort anyway).
        all_lp = torch.log_softmax(logits_BCV[b, : len(group), :vocab].float() / temperature, dim=-1)
        start_lp = all_lp[first]
        # log-probs of the actual tokens after the first one in each group, summed per group
        token_lp = all_lp.gather(-1, ids_BC[b, : len(group), None].to(device))[:, 0]
        later = valid & (positions != first[group_t.clamp(min=0)])
        extra = torch.zeros(alignment.groups, dtype=token_lp.dtype, device=device)
        extra = extra.index_add(0, group_t[later], token_lp[later])
        rows.append(start_lp + extra[:, None])
        offsets.append(alignment.groups)
    if not rows:
        return logits_BCV.new_zeros((0, vocab), dtype=torch.float32)
    return torch.cat(rows, dim=0)


def uld_loss_rows(student_rows_GV: torch.Tensor, teacher_rows_GW: torch.Tensor) -> torch.Tensor:
    """ULD per group: ``sum_k |sort(p_S)_k - sort(p_T)_k|`` with the shorter row zero-padded."""
    width = max(student_rows_GV.shape[-1], teacher_rows_GW.shape[-1])
    s_sorted = torch.sort(student_rows_GV, dim=-1, descending=True).values
    t_sorted = torch.sort(teacher_rows_GW, dim=-1, descending=True).values
    s_sorted = torch.nn.functional.pad(s_sorted, (0, width - s_sorted.shape[-1]))
    t_sorted = torch.nn.functional.pad(t_sorted, (0, width - t_sorted.shape[-1]))
    return (s_sorted - t_sorted).abs().sum(-1)


def _jsd_on_probs(p_student: torch.Tensor, p_teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD(beta) of (unnormalised) probability rows, divided by beta (1 - beta) like
    :mod:`opd.divergences` (beta 0 = forward KL, 1 = reverse KL)."""
    log_s = p_student.clamp(min=1e-12).log()
    log_t = p_teacher.clamp(min=1e-12).log()
    if beta == 0.0:
        return (p_teacher * (log_t - log_s)).sum(-1)
    if beta == 1.0:
        return (p_student * (log_s - log_t)).sum(-1)
    log_m = torch.logaddexp(log_t + np.log(beta), log_s + np.log1p(-beta))
    value = beta * (p_teacher * (log_t - log_m)).sum(-1) + (1 - beta) * (p_student * (log_s - log_m)).sum(-1)
    return value / (beta * (1 - beta))


def cross_tokenizer_loss(
    student_logits_BCV: torch.Tensor,
    student_ids_BC: torch.Tensor,
    teacher_logits_BCW: torch.Tensor,
    teacher_ids_BC: torch.Tensor,
    alignments: list[Alignment],
    *,
    student_vocab: int,
    teacher_vocab: int,
    num_groups: int | float,
    matched: tuple[torch.Tensor, torch.Tensor] | None = None,
    matched_weight: float | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ULD (or the GOLD hybrid when ``matched`` is given) over aligned groups, summed and
    divided by ``num_groups`` (the step's group count)."""
    s_log = _merged_log_rows(student_logits_BCV, student_ids_BC, alignments, "student", student_vocab, temperature)
    with torch.no_grad():
        t_log = _merged_log_rows(teacher_logits_BCW, teacher_ids_BC, alignments, "teacher", teacher_vocab,
                                 temperature)
    s_rows, t_rows = s_log.exp(), t_log.exp()
    metrics: dict[str, float] = {"loss/groups": float(s_rows.shape[0])}
    if s_rows.shape[0] == 0:
        return student_logits_BCV.sum() * 0.0, metrics
    if matched is None:
        per_group = uld_loss_rows(s_rows, t_rows)
    else:
        s_ids, t_ids = (x.to(s_rows.device) for x in matched)
        weight = matched_weight if matched_weight is not None else s_ids.numel() / teacher_vocab
        exact = _jsd_on_probs(s_rows[:, s_ids], t_rows[:, t_ids], beta)
        s_keep = torch.ones(s_rows.shape[-1], dtype=torch.bool, device=s_rows.device)
        t_keep = torch.ones(t_rows.shape[-1], dtype=torch.bool, device=t_rows.device)
        s_keep[s_ids], t_keep[t_ids] = False, False
        rest = uld_loss_rows(s_rows[:, s_keep], t_rows[:, t_keep])
        per_group = weight * exact + (1.0 - weight) * rest
        metrics["loss/matched_sum"] = float(exact.detach().sum())
        metrics["loss/uld_unmatched_sum"] = float(rest.detach().sum())
    total = per_group.sum()
    metrics["loss/cross_tokenizer_sum"] = float(total.detach())
    return total / max(float(num_groups), 1.0), metrics
