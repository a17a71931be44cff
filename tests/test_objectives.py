"""Sampled-token policy-gradient OPD against naive references written with loops."""

from __future__ import annotations

import math

import pytest
import torch

from opd.objectives import discounted_returns, sampled_token_pg, token_logprobs


def test_token_logprobs_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True)
    ref_logits = logits.detach().clone().requires_grad_()
    ids = torch.randint(0, 11, (2, 5))
    weights = torch.randn(2, 5, dtype=torch.float64)
    fast = token_logprobs(logits, ids, temperature=0.7, vocab_size=11, chunk_size=3)
    naive = torch.stack([
        torch.stack([torch.log_softmax(ref_logits[b, t, :11] / 0.7, -1)[ids[b, t]] for t in range(5)])
        for b in range(2)
    ])
    torch.testing.assert_close(fast, naive)
    (fast * weights).sum().backward()
    (naive * weights).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    assert logits.grad[..., 11:].abs().max().item() == 0.0


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert discounted_returns(rewards, mask, 0.0).tolist() == [[1.0, 2.0, 4.0, 0.0]]
    # R_2 = 4, R_1 = 2 + 0.5 * 4 = 4, R_0 = 1 + 0.5 * 4 = 3; the masked token adds nothing
    assert discounted_returns(rewards, mask, 0.5).tolist() == [[3.0, 4.0, 4.0, 0.0]]


def _naive_pg(student, teacher_lp, ids, mask, num_tokens, gamma, sampler_lp, estimator):
    B, C, _ = student.shape
    total = student.new_zeros(())
    for b in range(B):
        lp = [torch.log_softmax(student[b, t], -1)[ids[b, t]] for t in range(C)]
        old = [sampler_lp[b, t] if sampler_lp is not None else lp[t].detach() for t in range(C)]
        rewards = []
        for t in range(C):
            # The reward is the student's own reverse-KL estimate, whoever sampled (issue 13 defect 1);
            # the sampler's log-prob only enters the importance ratio below.
            r = (teacher_lp[b, t] - lp[t].detach()).item()
            k = {"k1": -r, "k2": 0.5 * r * r, "k3": math.expm1(r) - r}[estimator]
            rewards.append(-k * mask[b, t].item())
        for t in range(C):
            if not mask[b, t]:
                continue
            advantage = sum(gamma ** (u - t) * rewards[u] for u in range(t, C))
            total = total - torch.exp(lp[t] - old[t]) * advantage
    return total / max(num_tokens, 1)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("gamma", [0.0, 0.9])
@pytest.mark.parametrize("with_sampler", [False, True])
def test_sampled_token_pg_matches_naive_loops(estimator, gamma, with_sampler):
    torch.manual_seed(1)
    student = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    reference = student.detach().clone().requires_grad_()
    ids = torch.randint(0, 9, (2, 4))
    teacher_lp = torch.log_softmax(torch.randn(2, 4, 9, dtype=torch.float64), -1).gather(-1, ids[..., None])[..., 0]
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    sampler = (torch.log_softmax(torch.randn(2, 4, 9, dtype=torch.float64), -1).gather(-1, ids[..., None])[..., 0]
               if with_sampler else None)
    loss, metrics = sampled_token_pg(student, teacher_lp, ids, mask, num_tokens=7, estimator=estimator,
                                     gamma=gamma, sampler_logprobs_BC=sampler, chunk_size=3)
    naive = _naive_pg(reference, teacher_lp, ids, mask, 7, gamma, sampler, estimator)
    torch.testing.assert_close(loss, naive)
    loss.backward()
    naive.backward()
    torch.testing.assert_close(student.grad, reference.grad)
    assert metrics["loss/tokens"] == 7


def test_sampled_token_pg_all_masked_is_zero_with_finite_gradient():
    student = torch.randn(2, 3, 5, requires_grad=True)
    ids = torch.zeros(2, 3, dtype=torch.long)
    loss, _ = sampled_token_pg(student, torch.zeros(2, 3), ids, torch.zeros(2, 3), num_tokens=0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(student.grad).all()


def test_student_equal_to_teacher_gives_zero_advantage():
    torch.manual_seed(2)
    logits = torch.randn(1, 6, 8, requires_grad=True)
    ids = torch.randint(0, 8, (1, 6))
    teacher_lp = torch.log_softmax(logits.detach(), -1).gather(-1, ids[..., None])[..., 0]
    loss, _ = sampled_token_pg(logits, teacher_lp, ids, torch.ones(1, 6), num_tokens=6)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and logits.grad.abs().max().item() < 1e-6


def test_sampled_token_pg_under_a_mixture_sampler_has_the_reverse_kl_gradient_exactly():
    """Issue 13, defect 1. Exact enumeration of every 2-token answer over a 4-token vocabulary, drawn
    from MiniLLM's mixture (1 - a) q + a p (a = 0.2): the expected gradient of the sampled-token loss
    must be the token-level reverse-KL gradient on the same prefixes. With the sampler's log-prob in
    the reward (the old code) it was off by ~0.1."""
    from opd import divergences

    V, alpha, num_tokens = 4, 0.2, 2.0
    gen = torch.Generator().manual_seed(3)
    # one logit row per context: the prompt (row 0), then "first token was v" (row 1 + v)
    theta = torch.randn(1 + V, V, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1 + V, V, generator=gen, dtype=torch.float64)
    q = torch.softmax(theta.detach(), -1)
    p = torch.softmax(teacher, -1)
    mix = (1 - alpha) * q + alpha * p
    expected_grad = torch.zeros_like(theta)
    reference_grad = torch.zeros_like(theta)
    for y1 in range(V):
        for y2 in range(V):
            rows = torch.tensor([0, 1 + y1])
            ids = torch.tensor([[y1, y2]])
            weight = float(mix[0, y1] * mix[1 + y1, y2])  # the probability the sampler writes (y1, y2)
            student = theta[rows][None]
            teacher_lp = torch.log_softmax(teacher[rows], -1).gather(-1, ids.T).T
            sampler_lp = mix[rows].log().gather(-1, ids.T).T
            loss, _ = sampled_token_pg(student, teacher_lp, ids, torch.ones(1, 2, dtype=torch.float64),
                                       num_tokens=num_tokens, sampler_logprobs_BC=sampler_lp)
            expected_grad += weight * torch.autograd.grad(loss, theta)[0]
            kl = divergences.per_token("reverse_kl", theta[rows][None], teacher[rows][None]).sum() / num_tokens
            reference_grad += weight * torch.autograd.grad(kl, theta)[0]
    assert reference_grad.norm() > 0.1
    torch.testing.assert_close(expected_grad, reference_grad, rtol=1e-9, atol=1e-12)
