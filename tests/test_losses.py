"""The objective protocol and registry (opd.losses), the teacher signal (opd.signal)."""

from __future__ import annotations

import pytest
import torch

from opd.config import load_config
from opd.divergences import per_token
from opd.errors import ConfigError
from opd.losses import OBJECTIVES, Common, KLMix
from opd.rollout import build_batch
from opd.signal import TeacherSignal, merge_rows


def _batch():
    batch = build_batch([[3, 4], [5]], [[6, 7, 2], [8, 2]], pad_id=0)
    return batch, batch.completion_mask_BC


def test_kl_mix_is_the_weighted_sum_of_the_two_kls():
    """docs/architecture.md's worked example: one objective, registered by name."""
    gen = torch.Generator().manual_seed(0)
    batch, mask = _batch()
    student = torch.randn(2, 3, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    reference = student.detach().clone().requires_grad_(True)
    teacher = torch.randn(2, 3, 11, generator=gen, dtype=torch.float64)
    objective = KLMix(0.3, Common(temperature=0.8, vocab_size=10, chunk_size=2))
    loss, metrics = objective(student, TeacherSignal(logits_BCV=teacher), batch, step=1, num_tokens=7)
    kw = {"temperature": 0.8, "vocab_size": 10}
    expected = (0.7 * per_token("forward_kl", reference, teacher, mask.bool(), **kw).sum()
                + 0.3 * per_token("reverse_kl", reference, teacher, mask.bool(), **kw).sum()) / 7
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(student.grad, reference.grad)
    assert metrics["loss/tokens"] == 5 and metrics["loss/reverse_kl_sum"] > 0


def test_objective_names_come_from_the_registry():
    assert {"divergence", "nll", "sampled_token_pg", "minillm", "kdrl", "gad", "uld", "kl_mix"} <= set(OBJECTIVES)
    cfg = load_config("kl_mix", ["model.student=s", "teacher.model=t", "data.train=d"])
    assert cfg.loss.objective == "kl_mix"
    with pytest.raises(ConfigError, match="loss.objective.*one of"):
        load_config("kl_mix", ["model.student=s", "teacher.model=t", "data.train=d", "loss.objective=nope"])


def test_signal_select_and_merge_keep_rows_in_order():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 7, generator=gen)
    token_lp = torch.randn(4, 3, generator=gen)
    signal = TeacherSignal(logits_BCV=logits, token_logprobs_BC=token_lp, rewards_B=torch.arange(4.0),
                           reference=TeacherSignal(token_logprobs_BC=token_lp + 1))
    part = signal.select([2, 0])
    assert torch.equal(part.logits_BCV, logits[[2, 0]]) and torch.equal(part.rewards_B, torch.tensor([2.0, 0.0]))
    assert torch.equal(part.reference.token_logprobs_BC, token_lp[[2, 0]] + 1)
    # groups scored by different teachers come back in batch order; a field survives only if all have it,
    # and logits of different widths (padding rows) are cut to the narrowest
    wide = TeacherSignal(logits_BCV=torch.cat([logits[[1, 3]], torch.zeros(2, 3, 2)], -1), route_B=["b", "b"])
    merged = merge_rows([([0, 2], signal.select([0, 2])), ([1, 3], wide)], 4)
    assert torch.equal(merged.logits_BCV, logits) and merged.token_logprobs_BC is None
    assert merged.route_B == ["", "b", "", "b"]


def test_restricted_forms_derive_what_the_teacher_did_not_expose():
    gen = torch.Generator().manual_seed(2)
    batch, mask = _batch()
    logits = torch.randn(2, 3, 9, generator=gen)
    full = TeacherSignal(logits_BCV=logits)
    top = full.restricted("topk", batch.completion_ids_BC, mask, k=3, temperature=0.5, vocab_size=8)
    exact = torch.log_softmax(logits[..., :8] / 0.5, -1).topk(3, -1)
    keep = mask.bool()
    assert torch.allclose(top.topk_logprobs_BCK[keep], exact.values[keep])
    assert torch.equal(top.topk_ids_BCK[keep], exact.indices[keep]) and top.logits_BCV is None
    tokens = full.restricted("token_logprobs", batch.completion_ids_BC, mask, temperature=0.5)
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, batch.completion_ids_BC[..., None])[..., 0]
    assert torch.allclose(tokens.token_logprobs_BC, expected)
    with pytest.raises(ValueError, match="no full logits"):
        TeacherSignal(token_logprobs_BC=expected).restricted("logits", batch.completion_ids_BC, mask)


def test_batch_select_keeps_the_teacher_signal():
    batch, _ = _batch()
    batch.teacher_signal = TeacherSignal(token_logprobs_BC=torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]))
    assert torch.equal(batch.select([1]).teacher_signal.token_logprobs_BC, torch.tensor([[4.0, 5.0, 0.0]]))
