"""Pinned numeric tests for the f-divergence family (opd.divergences)."""

from __future__ import annotations

import math

import pytest
import torch

from opd.divergences import KINDS, per_token, per_token_reference

# Two-token vocabulary: student q = (1/2, 1/2) from logits (0, 0), teacher p = (3/4, 1/4)
# from logits (log 3, 0). Values below were worked out by hand from the definitions:
#   KL(p||q) = 3/4 ln(3/2) + 1/4 ln(1/2)
#   KL(q||p) = 1/2 ln(2/3) + 1/2 ln 2
#   JSD(1/2) = [1/2 KL(p||m) + 1/2 KL(q||m)] / (1/4), m = (5/8, 3/8)
#   skew FKL(0.1) = KL(p || (0.525, 0.475)),  skew RKL(0.1) = KL(q || (0.725, 0.275))
#   TV = 1/2 (1/4 + 1/4)
HAND = {
    "forward_kl": 0.13081203594113697,
    "reverse_kl": 0.14384103622589042,
    "jsd": 0.13528830227442082,
    "tv": 0.25,
    "skew_forward_kl": 0.10704273641095058,
    "skew_reverse_kl": 0.11313672216156864,
}


def _two_token():
    student = torch.tensor([[[0.0, 0.0]]])
    teacher = torch.tensor([[[math.log(3.0), 0.0]]])
    return student, teacher


@pytest.mark.parametrize("kind", KINDS)
def test_hand_computed_values(kind):
    student, teacher = _two_token()
    value = per_token(kind, student, teacher, beta=0.5, alpha=0.1)
    assert value.shape == (1, 1)
    assert value.item() == pytest.approx(HAND[kind], rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_divides_both_logits(kind):
    student, teacher = _two_token()
    # temperature 2 on logits (2x) == temperature 1 on logits (x)
    hot = per_token(kind, 2 * student, 2 * teacher, beta=0.5, alpha=0.1, temperature=2.0)
    assert hot.item() == pytest.approx(HAND[kind], rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_when_equal_and_never_negative(kind):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50) * 3
    same = per_token(kind, logits, logits.clone(), beta=0.3, alpha=0.2)
    assert same.abs().max().item() < 1e-5
    other = torch.randn(3, 5, 50) * 3
    values = per_token(kind, logits, other, beta=0.3, alpha=0.2)
    assert (values >= -1e-6).all()
    assert values.min().item() > 0  # genuinely different distributions


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_gradients_match_naive_reference(kind, temperature):
    torch.manual_seed(1)
    student = (torch.randn(2, 7, 33, dtype=torch.float64) * 2).requires_grad_()
    reference_student = student.detach().clone().requires_grad_()
    teacher = torch.randn(2, 7, 33, dtype=torch.float64) * 2
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    weights = torch.randn(2, 7, dtype=torch.float64)

    fast = per_token(kind, student, teacher, mask, beta=0.3, alpha=0.2, temperature=temperature, chunk_size=3)
    slow = per_token_reference(kind, reference_student, teacher, beta=0.3, alpha=0.2, temperature=temperature)
    slow = slow * mask
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    (fast * weights).sum().backward()
    (slow * weights).sum().backward()
    torch.testing.assert_close(student.grad, reference_student.grad, rtol=1e-8, atol=1e-12)
    assert student.grad[1, 4:].abs().max().item() == 0.0  # masked positions get no gradient


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    torch.manual_seed(2)
    student = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 3, 6, dtype=torch.float64)
    if kind == "tv":  # |.| is not differentiable where p == q; random logits keep away from it
        teacher = teacher * 3
    assert torch.autograd.gradcheck(
        lambda s: per_token(kind, s, teacher, beta=0.4, alpha=0.3, chunk_size=2, inplace_backward=False),
        (student,),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind):
    torch.manual_seed(3)
    student = torch.randn(4, 9, 40)
    teacher = torch.randn(4, 9, 40)
    whole = per_token(kind, student, teacher, chunk_size=10_000)
    for chunk in (1, 5, 17):
        torch.testing.assert_close(per_token(kind, student, teacher, chunk_size=chunk), whole)


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_batch_gives_zero_and_finite_gradient(kind):
    student = torch.randn(2, 4, 10, requires_grad=True)
    teacher = torch.randn(2, 4, 10)
    values = per_token(kind, student, teacher, torch.zeros(2, 4, dtype=torch.bool))
    loss = values.sum() / max(0, 1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(student.grad).all() and student.grad.abs().max().item() == 0.0


def test_jsd_endpoints_are_exact_kls_and_continuous():
    torch.manual_seed(4)
    student = torch.randn(3, 6, 30)
    teacher = torch.randn(3, 6, 30)
    fkl = per_token("forward_kl", student, teacher)
    rkl = per_token("reverse_kl", student, teacher)
    torch.testing.assert_close(per_token("jsd", student, teacher, beta=0.0), fkl)
    torch.testing.assert_close(per_token("jsd", student, teacher, beta=1.0), rkl)
    # no jump at the ends: beta = 1e-4 is within O(beta) of the endpoint value
    near0 = per_token("jsd", student, teacher, beta=1e-4)
    near1 = per_token("jsd", student, teacher, beta=1 - 1e-4)
    assert (near0 - fkl).abs().max().item() < 2e-3 * fkl.max().item()
    assert (near1 - rkl).abs().max().item() < 2e-3 * rkl.max().item()
    # and the gradient is continuous too
    s0 = student.clone().requires_grad_()
    s1 = student.clone().requires_grad_()
    per_token("jsd", s0, teacher, beta=1e-5).sum().backward()
    per_token("forward_kl", s1, teacher).sum().backward()
    torch.testing.assert_close(s0.grad, s1.grad, atol=1e-4, rtol=1e-3)


def test_jsd_times_beta_one_minus_beta_is_the_gkd_value():
    student, teacher = _two_token()
    raw_gkd = 0.5 * 0.5 * HAND["jsd"]  # beta (1 - beta) * normalised value
    value = per_token("jsd", student, teacher, beta=0.5) * 0.25
    assert value.item() == pytest.approx(raw_gkd, rel=1e-6)


def test_skew_endpoints():
    torch.manual_seed(5)
    student = torch.randn(2, 3, 12)
    teacher = torch.randn(2, 3, 12)
    torch.testing.assert_close(per_token("skew_forward_kl", student, teacher, alpha=0.0),
                               per_token("forward_kl", student, teacher))
    torch.testing.assert_close(per_token("skew_reverse_kl", student, teacher, alpha=0.0),
                               per_token("reverse_kl", student, teacher))
    assert per_token("skew_forward_kl", student, teacher, alpha=1.0).abs().max().item() < 1e-6
    assert per_token("skew_reverse_kl", student, teacher, alpha=1.0).abs().max().item() < 1e-6


def test_extreme_logits_stay_finite():
    student = torch.tensor([[[80.0, -80.0, 0.0]]], requires_grad=True)
    teacher = torch.tensor([[[-80.0, 80.0, 0.0]]])
    for kind in KINDS:
        values = per_token(kind, student, teacher, beta=0.5, alpha=0.1)
        values.sum().backward()
        assert torch.isfinite(values).all(), kind
        assert torch.isfinite(student.grad).all(), kind
        student.grad = None


def test_bf16_logits_get_fp32_math_and_bf16_gradient():
    torch.manual_seed(6)
    student = torch.randn(2, 3, 20).bfloat16().requires_grad_()
    teacher = torch.randn(2, 3, 20).bfloat16()
    values = per_token("reverse_kl", student, teacher)
    assert values.dtype == torch.float32
    values.sum().backward()
    assert student.grad.dtype == torch.bfloat16


def test_bad_arguments_are_rejected():
    student, teacher = _two_token()
    with pytest.raises(ValueError, match="unknown divergence"):
        per_token("kl", student, teacher)
    with pytest.raises(ValueError, match="beta"):
        per_token("jsd", student, teacher, beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        per_token("skew_forward_kl", student, teacher, alpha=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        per_token("forward_kl", student, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="shared vocabulary"):
        per_token("forward_kl", student, torch.zeros(1, 1, 3))
    with pytest.raises(ValueError, match="shared vocabulary"):
        per_token("forward_kl", student, torch.zeros(1, 1, 3), vocab_size=3)


def test_vocab_slicing_gives_padding_columns_zero_gradient():
    torch.manual_seed(8)
    student = torch.randn(2, 3, 10, requires_grad=True)
    teacher = torch.randn(2, 3, 13)
    values = per_token("jsd", student, teacher, vocab_size=8, beta=0.3)
    expected = per_token("jsd", student[..., :8].detach(), teacher[..., :8], beta=0.3)
    torch.testing.assert_close(values, expected)
    values.sum().backward()
    assert student.grad[..., 8:].abs().max().item() == 0.0


def test_auto_chunk_size():
    from opd.divergences import auto_chunk_size

    assert auto_chunk_size(151_936) == 110
    assert auto_chunk_size(10) == (1 << 24) // 10


def test_sampled_token_estimators_match_the_exact_reverse_kl():
    from opd.divergences import sampled_token

    torch.manual_seed(9)
    student = torch.randn(3, 12, dtype=torch.float64)
    teacher = torch.randn(3, 12, dtype=torch.float64)
    exact = per_token("reverse_kl", student, teacher)
    log_q, log_p = student.log_softmax(-1), teacher.log_softmax(-1)
    draws = torch.multinomial(log_q.exp(), 200_000, replacement=True)  # y ~ student
    s_lp, t_lp = log_q.gather(-1, draws), log_p.gather(-1, draws)
    for estimator in ("k1", "k3"):  # unbiased
        estimate = sampled_token(estimator, s_lp, t_lp).mean(-1)
        torch.testing.assert_close(estimate, exact, rtol=0.03, atol=0.01)
    assert (sampled_token("k2", s_lp, t_lp) >= 0).all() and (sampled_token("k3", s_lp, t_lp) >= -1e-12).all()
    # hand-computed: r = log(1/4) - log(1/2) = -ln 2
    one = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert sampled_token("k1", *one).item() == pytest.approx(math.log(2))
    assert sampled_token("k2", *one).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert sampled_token("k3", *one).item() == pytest.approx(-0.5 + math.log(2))
    with pytest.raises(ValueError, match="unknown estimator"):
        sampled_token("k4", *one)


@pytest.mark.parametrize(("kind", "temperature"), [("forward_kl", 0.7), ("reverse_kl", 1.0), ("jsd", 1.0)])
def test_fused_kernel_equals_eager(kind, temperature):
    """The torch.compile-fused chunks give the eager values and gradients (masked rows, padded
    vocabulary, several chunks of different sizes, bf16 gradient dtype)."""
    from opd.divergences import fused_available

    if not fused_available():
        pytest.skip("the fused kernel is disabled here (OPD_FUSED_LOSS=0 or no working compiler)")
    torch.manual_seed(11)
    student = torch.randn(2, 150, 1030) * 3
    teacher = torch.randn(2, 150, 1030) * 3
    mask = torch.rand(2, 150) > 0.3
    weights = torch.rand(2, 150)
    results = []
    for fused in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            logits = student.to(dtype).detach().requires_grad_()
            values = per_token(kind, logits, teacher, mask, beta=0.3, temperature=temperature,
                               chunk_size=64, vocab_size=1024, fused=fused)
            (values * weights).sum().backward()
            results.append((values.detach(), logits.grad))
    for (eager_v, eager_g), (fused_v, fused_g) in zip(results[:2], results[2:]):
        torch.testing.assert_close(fused_v, eager_v, rtol=1e-5, atol=1e-5)
        # bf16 gradients may round the last bit the other way (one bf16 ulp is 2^-8 relative).
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if eager_g.dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-5}
        torch.testing.assert_close(fused_g.float(), eager_g.float(), **tolerance)
        assert fused_g.dtype == eager_g.dtype
        assert fused_g[..., 1024:].abs().max().item() == 0.0


def test_fused_kernel_is_chosen_only_for_large_chunks_and_falls_back_when_compiling_fails(monkeypatch):
    import opd.divergences as div

    small = div._fused_kernel(None, div.FUSED_MIN_ELEMENTS - 1, torch.float32, torch.device("cpu"))
    assert small is div._chunk_value_grad
    assert div._fused_kernel(None, div.FUSED_MIN_ELEMENTS, torch.float64, torch.device("cpu")) is div._chunk_value_grad
    assert div._fused_kernel(True, 10, torch.float32, torch.device("cpu")) is div._compiled_chunk
    monkeypatch.setenv(div.FUSED_ENV, "0")
    assert not div.fused_available()
    assert div._fused_kernel(None, 1 << 30, torch.float32, torch.device("cpu")) is div._chunk_value_grad

    # A compiler that fails (no C++ toolchain, say): auto mode warns once and computes eagerly.
    monkeypatch.delenv(div.FUSED_ENV)
    monkeypatch.setattr(div, "_fused_state", {"fn": _raising_compiled})
    kernel = div._fused_kernel(None, 1 << 30, torch.float32, torch.device("cpu"))
    student, teacher = torch.randn(4, 7), torch.randn(4, 7)
    args = (student, teacher, "reverse_kl", 0.5, 0.1, 1.0, True, torch.float32, torch.float32)
    with pytest.warns(RuntimeWarning, match="fused divergence kernel could not be compiled"):
        value, grad = kernel(*args)
    expected_value, expected_grad = div._chunk_value_grad(*args)
    torch.testing.assert_close(value, expected_value)
    torch.testing.assert_close(grad, expected_grad)
    assert not div.fused_available()


def _raising_compiled(*args):
    raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")


# --- review defects (issue 13) -------------------------------------------------------------------


def test_topk_tail_keeps_a_tiny_student_tail_exact_in_fp32():
    """The student's tail bucket used to be log1mexp(logsumexp(top-k)), which cancels in fp32 once the
    student's mass outside the top-k is below ~1e-7: forward KL came out 7.97 instead of 3.23 and the
    gradient pushing mass back into the tail vanished. It now comes from the other logits."""
    from opd.divergences import topk_per_token

    V, K = 8, 4
    student = torch.zeros(1, 1, V, dtype=torch.float64)
    student[..., K:] = -22.0  # student tail ~ 4 e^-22 / 4 ~ 2.8e-10
    teacher_p = torch.tensor([0.4, 0.25, 0.1, 0.071], dtype=torch.float64)  # tail 0.179
    top_lp = teacher_p.log().reshape(1, 1, K)
    top_ids = torch.arange(K).reshape(1, 1, K)

    def run(dtype):
        s = student.to(dtype).clone().requires_grad_(True)
        value = topk_per_token("forward_kl", s, top_lp.to(dtype), top_ids, support="tail")
        value.sum().backward()
        return value.item(), s.grad.to(torch.float64)

    value64, grad64 = run(torch.float64)
    value32, grad32 = run(torch.float32)
    q = torch.softmax(student[0, 0], -1)
    q_buckets = torch.cat([q[:K], q[K:].sum()[None]])
    p_buckets = torch.cat([teacher_p, (1 - teacher_p.sum())[None]])
    exact = float((p_buckets * (p_buckets.log() - q_buckets.log())).sum())
    assert value64 == pytest.approx(exact, rel=1e-12)
    assert value32 == pytest.approx(exact, rel=1e-5)
    # d/dz_tail of KL(p || q) = q_v - p_tail q_v / q_tail: the tail logits are pushed up by ~p_tail / 4 each.
    assert grad64[0, 0, K:].sum().item() == pytest.approx(-0.179, rel=1e-3)
    assert torch.allclose(grad32, grad64, rtol=1e-4, atol=1e-7)


def test_tail_logprob_gradient_and_empty_tail():
    from opd.divergences import tail_logprob

    logits = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 1, 2], [3, 3, 4], [8, 7, 6], [0, 5, 2], [1, 2, 3]])
    assert torch.autograd.gradcheck(lambda z: tail_logprob(z, ids, temperature=0.7, chunk_size=2), (logits,))
    expected = torch.log1p(-torch.softmax(logits / 0.7, -1).gather(-1, ids).sum(-1))
    got = tail_logprob(logits, ids, temperature=0.7)
    assert torch.allclose(got[[0, 2, 3, 4]], expected[[0, 2, 3, 4]])  # row 1 repeats id 3 (counted once)
    everything = torch.arange(9).repeat(5, 1)
    full = tail_logprob(logits, everything)
    full.sum().backward()
    assert torch.isfinite(full).all() and (full == math.log(1e-20)).all() and torch.isfinite(logits.grad).all()


def test_a_second_backward_through_the_inplace_divergence_raises():
    """The early `return None` for a consumed buffer used to run before the one-backward check, so a
    second backward silently produced no gradient."""
    student = torch.randn(3, 5, requires_grad=True)
    teacher = torch.randn(3, 5)
    loss = per_token("reverse_kl", student, teacher).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()
