"""Issue-3 methods: each loss against a reference written with loops, co-sampling, schedules, recipes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import base_overrides, tiny_llama
from opd import divergences, objectives
from opd.build import build_objective
from opd.cli import main
from opd.config import RolloutConfig, load_config, recipe_names
from opd.losses import kd_coef_at
from opd.rollout import AdaptiveOffPolicy, SamplingParams, build_batch, co_generate

torch.set_default_dtype(torch.float32)


def _logsoftmax_loop(row: torch.Tensor) -> list[torch.Tensor]:
    total = sum(torch.exp(v) for v in row)
    return [v - torch.log(total) for v in row]


def _setup(seed: int = 0, B: int = 2, C: int = 5, V: int = 9):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B, C, V, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(B, C, V, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, V, (B, C), generator=gen)
    mask = torch.ones(B, C, dtype=torch.float64)
    mask[-1, 3:] = 0
    return student, teacher, ids, mask


# --- top-k teacher support -------------------------------------------------------------------


def _topk_loop(kind: str, s_row: torch.Tensor, t_row: torch.Tensor, k: int, support: str) -> torch.Tensor:
    """One position, written from the definitions with Python loops."""
    s_lp, t_lp = _logsoftmax_loop(s_row), _logsoftmax_loop(t_row)
    top = sorted(range(len(t_row)), key=lambda v: -float(t_lp[v]))[:k]
    if support == "teacher_renormalized":
        t_mass = sum(torch.exp(t_lp[v]) for v in top)
        return sum(torch.exp(t_lp[v]) / t_mass * (t_lp[v] - torch.log(t_mass) - s_lp[v]) for v in top)
    if support == "renormalize":
        s_mass = sum(torch.exp(s_lp[v]) for v in top)
        t_mass = sum(torch.exp(t_lp[v]) for v in top)
        p = [torch.exp(t_lp[v]) / t_mass for v in top]
        q = [torch.exp(s_lp[v]) / s_mass for v in top]
    else:
        p = [torch.exp(t_lp[v]) for v in top]
        q = [torch.exp(s_lp[v]) for v in top]
        p.append(1 - sum(p))
        q.append(1 - sum(q))
    if kind == "forward_kl":
        return sum(pi * (torch.log(pi) - torch.log(qi)) for pi, qi in zip(p, q))
    return sum(qi * (torch.log(qi) - torch.log(pi)) for pi, qi in zip(p, q))


@pytest.mark.parametrize("kind, support", [("forward_kl", "tail"), ("reverse_kl", "tail"),
                                           ("reverse_kl", "renormalize"), ("forward_kl", "renormalize"),
                                           ("forward_kl", "teacher_renormalized")])
def test_topk_divergence_matches_loop_reference(kind, support):
    student, teacher, _, mask = _setup()
    k = 3
    top_lp, top_ids = divergences.teacher_topk(teacher, k, mask.bool())
    values = divergences.topk_per_token(kind, student, top_lp, top_ids, mask.bool(), support=support, chunk_size=2)
    loss = values.sum()
    loss.backward()
    got_grad = student.grad.clone()
    student.grad = None
    ref = sum(_topk_loop(kind, student[b, c], teacher[b, c], k, support)
              for b in range(2) for c in range(5) if mask[b, c])
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-10)
    assert torch.allclose(got_grad, student.grad, atol=1e-10)
    assert torch.all(got_grad[1, 3:] == 0)


def test_topk_with_full_support_equals_full_divergence_and_all_masked_is_zero():
    student, teacher, _, mask = _setup()
    top_lp, top_ids = divergences.teacher_topk(teacher, teacher.shape[-1], mask.bool(), temperature=0.7)
    for kind in divergences.KINDS:
        for support in ("tail", "renormalize"):
            full = divergences.per_token(kind, student, teacher, mask.bool(), temperature=0.7)
            topk = divergences.topk_per_token(kind, student, top_lp, top_ids, mask.bool(), support=support,
                                              temperature=0.7)
            assert torch.allclose(full, topk, atol=1e-10), (kind, support)
    none = torch.zeros_like(mask, dtype=torch.bool)
    zero = divergences.topk_per_token("reverse_kl", student, top_lp, top_ids, none)
    zero.sum().backward()
    assert zero.sum().item() == 0.0 and torch.all(student.grad == 0) and not torch.isnan(student.grad).any()


def test_topk_gradcheck_and_support_errors():
    student, teacher, _, mask = _setup(B=1, C=4, V=6)
    top_lp, top_ids = divergences.teacher_topk(teacher, 2, mask.bool())
    for support in ("tail", "renormalize"):
        assert torch.autograd.gradcheck(
            lambda x, s=support: divergences.topk_per_token("jsd", x, top_lp, top_ids, mask.bool(), support=s),
            (student,))
    with pytest.raises(ValueError, match="forward_kl only"):
        divergences.topk_per_token("reverse_kl", student, top_lp, top_ids, support="teacher_renormalized")
    with pytest.raises(ValueError, match="top-k must be"):
        divergences.teacher_topk(teacher, 7)


def test_gathered_logprobs_gradient_matches_autograd():
    student, _, _, _ = _setup()
    ids = torch.randint(0, 9, (2, 5, 3))
    got = divergences.gathered_logprobs(student, ids, temperature=1.3, chunk_size=3)
    ref = torch.log_softmax(student / 1.3, -1).gather(-1, ids)
    weights = torch.randn_like(got)
    (g_got,) = torch.autograd.grad((got * weights).sum(), student)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), student)
    assert torch.allclose(got, ref) and torch.allclose(g_got, g_ref)


# --- entropy-aware OPD ------------------------------------------------------------------------


def test_entropy_gated_forward_kl_matches_loop_reference():
    student, teacher, _, mask = _setup(V=6)
    teacher = teacher * torch.tensor([0.1, 3.0]).view(2, 1, 1).double()  # one flat, one peaked row
    loss, metrics = objectives.entropy_gated_forward_kl(student, teacher, mask, num_tokens=7, threshold=1.0,
                                                        top_k=3)
    ref, gated = 0.0, 0
    for b in range(2):
        for c in range(5):
            if not mask[b, c]:
                continue
            t_lp = _logsoftmax_loop(teacher[b, c])
            ent = -sum(torch.exp(v) * v for v in t_lp)
            if ent >= 1.0:
                gated += 1
                ref = ref + _topk_loop("forward_kl", student[b, c], teacher[b, c], 3, "teacher_renormalized")
    assert 0 < gated < 8 and metrics["teacher/high_entropy_tokens"] == gated
    assert torch.allclose(loss, ref / 7)
    (g_got,) = torch.autograd.grad(loss, student)
    (g_ref,) = torch.autograd.grad(ref / 7, student)
    assert torch.allclose(g_got, g_ref)


# --- sampled-token rewards: ExOPD and KDRL ----------------------------------------------------------


def test_reward_extrapolation_matches_loop_reference():
    student, teacher, ids, mask = _setup()
    reference = torch.randn_like(teacher)
    t_lp = objectives.token_logprobs(teacher, ids)
    r_lp = objectives.token_logprobs(reference, ids)
    loss, _ = objectives.sampled_token_pg(student, t_lp, ids, mask, num_tokens=8, reward_scale=1.25,
                                          reference_logprobs_BC=r_lp)
    ref = 0.0
    for b in range(2):
        for c in range(5):
            if mask[b, c]:
                s_lp = _logsoftmax_loop(student[b, c])[ids[b, c]]
                reward = 1.25 * (t_lp[b, c] - r_lp[b, c]) - (s_lp.detach() - r_lp[b, c])
                ref = ref - torch.exp(s_lp - s_lp.detach()) * reward
    assert torch.allclose(loss, ref / 8)
    (g_got,) = torch.autograd.grad(loss, student)
    (g_ref,) = torch.autograd.grad(ref / 8, student)
    assert torch.allclose(g_got, g_ref)
    # lambda = 1: the reference cancels and this is plain sampled-token OPD
    plain, _ = objectives.sampled_token_pg(student, t_lp, ids, mask, num_tokens=8)
    same, _ = objectives.sampled_token_pg(student, t_lp, ids, mask, num_tokens=8, reward_scale=1.0,
                                          reference_logprobs_BC=r_lp)
    assert torch.allclose(plain, same)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = objectives.group_advantages(rewards, groups)
    std = math.sqrt(0.75 * 0.25)
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-6))
    assert torch.all(adv[4:] == 0)  # all-equal group: no signal, not NaN


def test_kdrl_matches_loop_reference_and_masks_kd():
    student, teacher, ids, mask = _setup()
    t_lp = objectives.token_logprobs(teacher, ids)
    adv = torch.tensor([0.5, -1.5], dtype=torch.float64)
    kd_mask = torch.tensor([0.0, 1.0], dtype=torch.float64)
    loss, metrics = objectives.kdrl(student, t_lp, ids, mask, adv, num_tokens=8, kd_coef=0.3, kd_mask_B=kd_mask)
    ref = 0.0
    for b in range(2):
        for c in range(5):
            if mask[b, c]:
                s_lp = _logsoftmax_loop(student[b, c])[ids[b, c]]
                ref = ref - torch.exp(s_lp - s_lp.detach()) * adv[b]
                ref = ref + 0.3 * kd_mask[b] * 0.5 * (s_lp - t_lp[b, c]) ** 2
    assert torch.allclose(loss, ref / 8)
    (g_got,) = torch.autograd.grad(loss, student)
    (g_ref,) = torch.autograd.grad(ref / 8, student)
    assert torch.allclose(g_got, g_ref)


def test_kd_coefficient_anneals_linearly_to_its_floor():
    cfg = load_config("kdrl", ["model.student=s", "teacher.model=t", "data.train=d.jsonl"]).loss
    assert kd_coef_at(cfg, 1) == pytest.approx(5e-3)
    assert kd_coef_at(cfg, 41) == pytest.approx(3e-3)
    assert kd_coef_at(cfg, 500) == pytest.approx(1e-3)


# --- MiniLLM ------------------------------------------------------------------------------------


def test_future_mean_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    got = objectives.future_mean_returns(rewards, mask)
    assert torch.allclose(got, torch.tensor([[3.0, 3.5, 4.0, 0.0], [6.0, 0.0, 0.0, 0.0]]))


def test_minillm_matches_loop_reference():
    student, teacher, ids, mask = _setup()
    sampler = objectives.token_logprobs(student.detach(), ids) + 0.3 * torch.randn(2, 5, dtype=torch.float64)
    loss, _ = objectives.minillm(student, teacher, ids, mask, num_tokens=8, sampler_logprobs_BC=sampler,
                                 clip_eps=0.2)
    ref = 0.0
    for b in range(2):
        valid = [c for c in range(5) if mask[b, c]]
        s_lps = [_logsoftmax_loop(student[b, c]) for c in valid]
        t_lps = [_logsoftmax_loop(teacher[b, c]) for c in valid]
        rewards = [float(t_lps[i][ids[b, c]] - s_lps[i][ids[b, c]].detach()) for i, c in enumerate(valid)]
        for i, c in enumerate(valid):
            future = rewards[i + 1:]
            advantage = sum(future) / len(future) if future else 0.0
            lp = s_lps[i][ids[b, c]]
            w = torch.exp(lp.detach() - sampler[b, c])
            single = sum(torch.exp(sv) * (sv - tv) for sv, tv in zip(s_lps[i], t_lps[i]))
            ratio_w = torch.exp(lp - lp.detach()) * w
            pg = torch.maximum(-advantage * ratio_w, -advantage * torch.clamp(ratio_w, 0.8, 1.2))
            ref = ref + w * single + pg
    assert torch.allclose(loss, ref / 8)
    (g_got,) = torch.autograd.grad(loss, student)
    (g_ref,) = torch.autograd.grad(ref / 8, student)
    assert torch.allclose(g_got, g_ref)


# --- co-sampling (MiniLLM mixture, SKD speculative) ------------------------------------------------


@pytest.fixture(scope="module")
def pair(tokenizer):
    vocab = len(tokenizer)
    return tiny_llama(vocab, seed=2).eval(), tiny_llama(vocab + 7, hidden=48, seed=1).eval()


def _scored(model, prompts, completions, tokenizer, temperature):
    from opd.models import completion_logits

    batch = build_batch(prompts, completions, tokenizer.pad_token_id)
    logits = completion_logits(model, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)
    lp = objectives.token_logprobs(logits, batch.completion_ids_BC, temperature=temperature,
                                   vocab_size=len(tokenizer))
    return lp.detach(), batch.completion_mask_BC


def _as_tensor(lps, like):
    out = torch.zeros_like(like)
    for i, row in enumerate(lps):
        out[i, : len(row)] = torch.tensor(row)
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mixture_sampler_logprobs_match_a_fresh_forward(pair, tokenizer, alpha):
    """The KV-cached decoding of both models must give the same distributions as scoring the
    finished sequences from scratch (positions, padding and cache handled right)."""
    student, teacher = pair
    prompts = [tokenizer.encode("1 2 3 ="), tokenizer.encode("4 5 ="), tokenizer.encode("7 =")]
    params = SamplingParams(max_new_tokens=8, temperature=0.9, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    completions, lps, metrics = co_generate(student, teacher, prompts, params, tokenizer, rule="mixture",
                                            mixture_alpha=alpha)
    s_lp, mask = _scored(student, prompts, completions, tokenizer, 0.9)
    t_lp, _ = _scored(teacher, prompts, completions, tokenizer, 0.9)
    expected = s_lp if alpha == 0.0 else t_lp if alpha == 1.0 else torch.logaddexp(
        s_lp + math.log(1 - alpha), t_lp + math.log(alpha))
    assert ((expected - _as_tensor(lps, s_lp)) * mask).abs().max() < 1e-5
    assert metrics["rollout/teacher_token_fraction"] == pytest.approx(alpha, abs=0.0 if alpha in (0, 1) else 0.5)


def test_speculative_sampler_accepts_all_with_full_top_k_and_replaces_outside_top_k(pair, tokenizer):
    student, teacher = pair
    vocab = len(tokenizer)
    prompts = [tokenizer.encode("1 2 3 ="), tokenizer.encode("4 5 =")]
    params = SamplingParams(max_new_tokens=8, vocab_size=vocab)
    torch.manual_seed(0)
    completions, lps, metrics = co_generate(student, teacher, prompts, params, tokenizer, rule="speculative",
                                            accept_top_k=vocab)
    s_lp, mask = _scored(student, prompts, completions, tokenizer, 1.0)
    assert metrics["rollout/teacher_token_fraction"] == 0.0
    assert ((s_lp - _as_tensor(lps, s_lp)) * mask).abs().max() < 1e-5
    # K = 1: a token is kept only if it is the teacher's argmax; the law of the interleaved token is
    # P(y) = q(y) [y = argmax p] + (1 - q(argmax p)) p(y), checked against full distributions scored afresh.
    torch.manual_seed(1)
    completions, lps, metrics = co_generate(student, teacher, prompts, params, tokenizer, rule="speculative",
                                            accept_top_k=1)
    assert metrics["rollout/teacher_token_fraction"] > 0.3
    from opd.models import completion_logits

    batch = build_batch(prompts, completions, tokenizer.pad_token_id)
    q = torch.softmax(completion_logits(student, batch.input_ids_BT, batch.attention_mask_BT,
                                        batch.completion_len)[..., :vocab], -1).detach()
    p = torch.softmax(completion_logits(teacher, batch.input_ids_BT, batch.attention_mask_BT,
                                        batch.completion_len)[..., :vocab], -1).detach()
    top = torch.nn.functional.one_hot(p.argmax(-1), vocab).float()
    law = q * top + (1 - (q * top).sum(-1, keepdim=True)) * p
    expected = law.gather(-1, batch.completion_ids_BC[..., None]).squeeze(-1).log()
    got = _as_tensor(lps, expected)
    assert ((expected - got) * batch.completion_mask_BC).abs().max() < 1e-5


# --- DistiLLM adaptive off-policy --------------------------------------------------------------------


def test_adaptive_off_policy_rule_and_replay_buffer(tokenizer):
    sched = AdaptiveOffPolicy(RolloutConfig(adaptive_off_policy=True, on_policy_fraction=0.0, replay_buffer_size=3))
    assert sched.choose(1, 10) == "dataset"  # phi = 0
    assert not sched.update(2.0)  # first value is recorded only
    assert not sched.update(2.05)  # worse, but by less than eps = 0.1
    assert sched.update(2.2) and sched.phi == pytest.approx(0.1)
    assert not sched.update(2.25)  # compared with 2.2 now
    sched.phi = 1.0
    assert sched.choose(1, 10) == "student"  # buffer not full yet
    batch = build_batch([[5, 6], [7]], [[8, 2], [9, 10, 2]], tokenizer.pad_token_id, [True, False])
    for _ in range(4):
        sched.record(batch)
    assert len(sched.buffer) == 3 and sched.buffer[-1] == ([5, 6], [8, 2])  # only student rows, FIFO
    torch.manual_seed(0)
    late = [sched.choose(10, 10) for _ in range(50)]  # phi_t = phi (1 - 9/10): mostly replay
    assert late.count("replay") > 35 and set(late) <= {"student", "replay"}
    replayed = sched.replay(2, tokenizer.pad_token_id)
    assert replayed.completion_ids_BC.tolist()[0][:2] == [8, 2] and not replayed.on_policy_B.any()
    state = json.loads(json.dumps(sched.state_dict()))
    other = AdaptiveOffPolicy(RolloutConfig())
    other.load_state_dict(state)
    assert other.buffer == sched.buffer and other.phi == 1.0


# --- recipes end to end ---------------------------------------------------------------------------------

RECIPE_OVERRIDES = {
    "topk_fkl": {"teacher.top_k": 5},
    "topk_rkl": {"teacher.top_k": 5},
    "entropy_aware": {"loss.entropy_top_k": 4, "loss.entropy_threshold": 0.5},
    "skd": {"rollout.speculative_top_k": 3},
    "distillm": {"train.eval_every": 2, "rollout.adaptive_init": 1.0, "train.steps": 8,
                 "rollout.replay_buffer_size": 4},
    "kdrl": {"train.batch_size": 2, "rollout.samples_per_prompt": 2},
    "prefix_opd": {"rollout.prefix_tokens": 2, "rollout.prefix_tokens_final": 6},
    "opsd": {"teacher.model": "null"},
    "sdft": {"teacher.model": "null"},
    "gad": {"train.batch_size": 2, "loss.discriminator_warmup_steps": 1},
}
RECIPE_METRIC = {
    "topk_fkl": "teacher/topk_mass_mean",
    "topk_rkl": "teacher/topk_mass_mean",
    "entropy_aware": "loss/entropy_fkl_mean",
    "skd": "rollout/teacher_token_fraction",
    "minillm": "loss/single_step_mean",
    "kdrl": "reward/outcome",
    "exopd": "teacher/reverse_kl_k1_mean",
    "distillm": "rollout/adaptive_phi",
    "gad": "discriminator/accuracy",
}


@pytest.mark.parametrize("recipe", sorted(set(recipe_names()) - {"on_policy_rkl", "supervised_kd", "gkd", "seqkd",
                                                                  "sampled_token_opd"}))
def test_recipe_trains_end_to_end(tiny_setup, tmp_path, recipe):
    out = tmp_path / recipe
    overrides = base_overrides(tiny_setup, out, **RECIPE_OVERRIDES.get(recipe, {}))
    assert main(["train", recipe, *overrides]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss/total" in r]
    assert train_rows and all(math.isfinite(r["loss/total"]) for r in train_rows)
    # GAD's teacher only writes text (its answers, once); every other teacher scores tokens
    counter = "teacher_generated_tokens" if recipe == "gad" else "teacher_scored_tokens"
    assert train_rows[-1][f"compute/{counter}"] > 0
    if recipe in RECIPE_METRIC:
        assert any(RECIPE_METRIC[recipe] in r for r in train_rows), RECIPE_METRIC[recipe]
    if recipe in ("skd", "minillm"):
        assert train_rows[-1]["compute/teacher_generated_tokens"] > 0
    if recipe == "distillm":
        assert any("eval/reference_nll" in r for r in rows)
        assert any(r.get("rollout/replay_fraction") == 1.0 for r in train_rows)
    assert (out / "final" / "model.safetensors").exists()


def test_objective_of_topk_recipe_equals_full_divergence_at_full_k(tiny_setup, tmp_path, tokenizer):
    vocab = len(tokenizer)
    full = load_config("on_policy_rkl", base_overrides(tiny_setup, tmp_path / "a"))
    topk = load_config("topk_rkl", base_overrides(tiny_setup, tmp_path / "b", **{"teacher.top_k": vocab,
                                                                                 "rollout.top_p": 1.0}))
    student, teacher, _, _ = _setup(V=vocab + 3)
    batch = build_batch([[3, 4], [5]], [[6, 7, 2], [8, 2]], tokenizer.pad_token_id)
    s, t = student[:, :3], teacher[:, :3]
    from opd.signal import TeacherSignal

    a, _ = build_objective(full, vocab)(s, TeacherSignal(logits_BCV=t), batch, step=1, num_tokens=5)
    b, _ = build_objective(topk, vocab)(s, TeacherSignal(logits_BCV=t), batch, step=1, num_tokens=5)
    assert torch.allclose(a, b)


def test_recipe_combinations_are_validated():
    from opd.errors import ConfigError

    base = ["model.student=s", "teacher.model=t", "data.train=d.jsonl"]
    cases = [
        ("kdrl", ["rollout.samples_per_prompt=1"], "samples_per_prompt"),
        ("exopd", ["loss.estimator=k3"], "reward_scale"),
        ("minillm", ["rollout.on_policy_fraction=0.5"], "on_policy_fraction=1"),
        ("distillm", [], "data.eval"),
        ("skd", ["rollout.top_p=0.9"], "top_p=1"),
        ("topk_fkl", ["loss.objective=minillm"], "teacher.top_k"),
        ("gkd", ["loss.entropy_threshold=0.8"], "entropy_threshold"),
    ]
    for recipe, extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(recipe, base + extra)


def test_all_masked_batches_give_zero_loss_and_finite_zero_gradient():
    student, teacher, ids, mask = _setup()
    none = torch.zeros_like(mask)
    t_lp = objectives.token_logprobs(teacher, ids)
    sampler = t_lp.clone()
    losses = {
        "minillm": objectives.minillm(student, teacher, ids, none, num_tokens=0, sampler_logprobs_BC=sampler)[0],
        "kdrl": objectives.kdrl(student, t_lp, ids, none, torch.ones(2, dtype=torch.float64), num_tokens=0,
                                kd_coef=0.1)[0],
        "exopd": objectives.sampled_token_pg(student, t_lp, ids, none, num_tokens=0, reward_scale=1.25,
                                             reference_logprobs_BC=sampler)[0],
        "entropy": objectives.entropy_gated_forward_kl(student, teacher, none, num_tokens=0, threshold=0.0,
                                                      top_k=3)[0],
        "topk": objectives.topk_divergence(student, *divergences.teacher_topk(teacher, 3), none,
                                           kind="reverse_kl", num_tokens=0, support="renormalize")[0],
    }
    for name, loss in losses.items():
        (grad,) = torch.autograd.grad(loss, student, allow_unused=True)
        assert loss.item() == 0.0, name
        assert grad is None or (torch.isfinite(grad).all() and torch.all(grad == 0)), name


# --- GAD: black-box teacher, discriminator -------------------------------------------------------


def test_discriminator_reads_the_last_token_and_learns_a_preference(tokenizer):
    from opd.discriminator import Discriminator, DiscriminatorTrainer

    backbone = tiny_llama(len(tokenizer), seed=4).model
    disc = Discriminator(backbone)
    torch.nn.init.normal_(disc.head.weight)
    student = build_batch([[3, 4], [5]], [[6, 7, 2], [8, 2]], tokenizer.pad_token_id)
    teacher = build_batch([[3, 4], [5]], [[9, 2], [10, 11, 2]], tokenizer.pad_token_id)
    scores = disc(student)
    padded = build_batch([[3, 4], [5]], [[6, 7, 2], [8, 2]], tokenizer.pad_token_id)
    padded.input_ids_BT[1, -1] = 12  # a padding position after the end: not read
    assert torch.allclose(disc(padded), scores)
    changed = build_batch([[3, 4], [5]], [[6, 7, 2], [8, 3]], tokenizer.pad_token_id)
    assert not torch.allclose(disc(changed)[1], scores[1])
    trainer = DiscriminatorTrainer(disc, lr=1e-2)
    pair = torch.tensor([0, 1])
    losses = [trainer.update(student, teacher, pair)["discriminator/loss"] for _ in range(15)]
    assert losses[-1] < losses[0] - 0.1
    assert trainer.update(student, teacher, pair)["discriminator/accuracy"] == 1.0


def test_gad_resumes_exactly_with_the_discriminator_in_the_checkpoint(tiny_setup, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from opd.trainer import train

    common = {"train.steps": 4, "train.save_every": 2, "data.eval": "null", "train.batch_size": 2,
              "loss.discriminator_warmup_steps": 1, "loss.discriminator_lr": 1e-3, "optim.lr": 1e-3}
    straight = tmp_path / "straight"
    train(load_config("gad", base_overrides(tiny_setup, straight, **common)), log=lambda *_: None)
    assert (straight / "checkpoints" / "step-00000004" / "discriminator.safetensors").exists()
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    shutil.rmtree(resumed / "final")
    train(load_config("gad", base_overrides(tiny_setup, resumed, **common)), resume=True, log=lambda *_: None)
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_only_teacher_with_another_tokenizer_talks_through_text(tiny_setup, tmp_path, tokenizer):
    """SeqKD from a black-box teacher whose tokenizer differs: prompts and answers are re-tokenised."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "+", "-", "="] + [str(d) for d in range(10)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(reversed(words))}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", bos_token="<s>")
    teacher_dir = tmp_path / "text_teacher"
    tiny_llama(len(other), seed=5, pad_id=other.pad_token_id).save_pretrained(teacher_dir)
    other.save_pretrained(teacher_dir)
    out = tmp_path / "seqkd"
    assert main(["train", "seqkd", *base_overrides(tiny_setup, out, **{
        "teacher.model": str(teacher_dir), "teacher.kind": "text", "data.eval": "null"})]) == 0
    from opd.build import make_teacher
    from opd.config import TeacherConfig

    teacher = make_teacher(TeacherConfig(kind="text", model=str(teacher_dir)), tokenizer)
    prompts = [tokenizer("1 2 =").input_ids]
    torch.manual_seed(0)
    answer = teacher.generate(prompts, SamplingParams(max_new_tokens=6))[0]
    # the same sample in the teacher's own ids: its prompt is the student's text re-encoded
    from opd.rollout import hf_generate

    torch.manual_seed(0)
    own = hf_generate(teacher.model, [other("1 2 =").input_ids], SamplingParams(6, vocab_size=len(other)), other)[0]
    assert own != answer[: len(own)]  # different id spaces ...
    teacher_text = other.decode(own, skip_special_tokens=True)
    assert answer[-1] == tokenizer.eos_token_id and max(answer) < len(tokenizer)
    student_words = tokenizer.decode(answer, skip_special_tokens=True).split()
    teacher_words = [w for w in teacher_text.split() if w not in tokenizer.all_special_tokens]
    assert len(student_words) >= 3 and student_words == teacher_words[: len(student_words)]  # ... same words


# --- opd's own sampling loop (the hf engine's student rollouts) -------------------------------------


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)])
def test_sample_generate_logprobs_match_a_fresh_forward(pair, tokenizer, temperature, top_k, top_p):
    """Returned sampler log-probs are those of the filtered distribution, scored from scratch; the
    model's padding rows are never sampled."""
    from opd.models import completion_logits
    from opd.rollout import filtered_logprobs, sample_generate

    _, padded = pair  # 7 embedding rows beyond the tokenizer
    vocab = len(tokenizer)
    prompts = [tokenizer.encode("1 2 3 ="), tokenizer.encode("4 5 ="), tokenizer.encode("7 =")]
    params = SamplingParams(max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab)
    torch.manual_seed(3)
    completions, lps = sample_generate(padded, prompts, params, tokenizer)
    assert [len(c) for c in completions] == [len(lp) for lp in lps]
    assert all(0 <= t < vocab for c in completions for t in c)
    batch = build_batch(prompts, completions, tokenizer.pad_token_id)
    logits = completion_logits(padded, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len).detach()
    flat = filtered_logprobs(logits.reshape(-1, logits.shape[-1]), params).reshape(*logits.shape[:2], vocab)
    expected = flat.gather(-1, batch.completion_ids_BC[..., None]).squeeze(-1)
    mask = batch.completion_mask_BC
    assert ((expected - _as_tensor(lps, expected)) * mask).abs().max() < 1e-5
    assert torch.isfinite(expected[mask.bool()]).all()  # no filtered-out token was drawn


def test_sample_generate_draws_from_the_filtered_distribution(pair, tokenizer):
    """Empirical first-token frequencies over 6,000 draws match softmax(logits / T) after top-k / top-p."""
    from opd.rollout import _Decoder, _left_pad, filtered_logprobs, sample_generate

    student, _ = pair
    prompt = tokenizer.encode("1 2 3 =")
    for params in (SamplingParams(1, temperature=1.5, vocab_size=len(tokenizer)),
                   SamplingParams(1, temperature=1.5, top_k=4, vocab_size=len(tokenizer)),
                   SamplingParams(1, temperature=1.5, top_p=0.6, vocab_size=len(tokenizer))):
        ids, attention = _left_pad([prompt], tokenizer.pad_token_id)
        with torch.no_grad():
            probs = filtered_logprobs(_Decoder(student, ids, attention).last_logits, params).exp()[0]
        torch.manual_seed(4)
        completions, _ = sample_generate(student, [prompt] * 6000, params, tokenizer)
        counts = torch.bincount(torch.tensor([c[0] for c in completions]), minlength=probs.numel()).float()
        assert (counts / 6000 - probs).abs().max() < 0.025, params
        assert counts[probs == 0].sum() == 0


def test_sample_generate_greedy_equals_transformers_generate(pair, tokenizer):
    from opd.rollout import hf_generate, sample_generate

    student, _ = pair
    prompts = [tokenizer.encode("1 2 3 ="), tokenizer.encode("4 5 =")]
    params = SamplingParams(max_new_tokens=8, greedy=True, vocab_size=len(tokenizer))
    completions, lps = sample_generate(student, prompts, params, tokenizer)
    assert completions == hf_generate(student, prompts, params, tokenizer)
    assert all(lp == 0.0 for row in lps for lp in row)
