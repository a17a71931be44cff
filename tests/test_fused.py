"""Fused (hidden states + head) divergences equal the unfused reference on real tiny HF models.

Every check runs the model twice on the same batch: once through ``completion_logits`` (full
logits, the reference) and once through ``completion_hidden`` (logits formed chunk by chunk inside
the loss), and compares the values and the gradients of every student parameter — which covers the
gradients w.r.t. the hidden states (all layers below the head), the head weight (tied to the
embeddings for Gemma 2) and the head bias (Phi).
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from opd import divergences, objectives
from opd.divergences import KINDS, TOPK_SUPPORTS
from opd.fused import FusedUnsupported, HiddenLogits, LMHead, check_fused, completion_hidden, lm_head_of
from opd.models import completion_logits

VOCAB = 37  # the shared vocabulary; every model below has padding rows past it
CHUNK = 3  # several chunks per batch, one of them partly masked
TEMPERATURE = 1.5


def gemma2(seed: int = 0, softcap: float = 2.0):
    """Tied embeddings and a soft-cap low enough that tanh is far from linear on these logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                          final_logit_softcapping=softcap, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Gemma2ForCausalLM(config)


def phi(seed: int = 0):
    """An lm_head with a bias."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    model = PhiForCausalLM(PhiConfig(vocab_size=41, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=64, pad_token_id=0))
    with torch.no_grad():
        model.lm_head.bias.normal_()  # zero at init, which would hide a missing bias gradient
    return model


def llama(seed: int = 0, tied: bool = False):
    model = tiny_llama(44, hidden=16, layers=1, seed=seed)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    return model


STUDENTS = {"gemma2_softcap_tied": gemma2, "phi_bias": phi, "llama_tied": lambda: llama(3, tied=True)}


def batch(completion_len: int = 6, left_pad: bool = True):
    """Two rows: one left-padded prompt; one completion shorter than the other (right padding).

    Gemma 2's eager attention gives NaN gradients (on the reference path too) for a left-padded
    row in this transformers version, so its batches are right-padded only."""
    gen = torch.Generator().manual_seed(0)
    ids_BT = torch.randint(3, VOCAB, (2, 4 + completion_len), generator=gen)
    attention_BT = torch.ones_like(ids_BT)
    if left_pad:
        attention_BT[1, :2] = 0
    mask_BC = torch.ones(2, completion_len, dtype=torch.bool)
    mask_BC[0, 4:] = False
    attention_BT[0, 4 + 4:] = 0
    return ids_BT, attention_BT, mask_BC


def both_ways(model, ids_BT, attention_BT, completion_len, *, grad: bool = True):
    """(logits, hidden) for the same batch; the teacher side (grad=False) under no_grad."""
    with torch.set_grad_enabled(grad):
        logits = completion_logits(model, ids_BT, attention_BT, completion_len)
        hidden = completion_hidden(model, ids_BT, attention_BT, completion_len)
    return logits, hidden


def grads_of(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def assert_same(fused_loss, fused_grads, ref_loss, ref_grads, dtype):
    tol = {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}
    torch.testing.assert_close(fused_loss, ref_loss, **tol)
    assert len(fused_grads) == len(ref_grads)
    for a, b in zip(fused_grads, ref_grads):
        if b is None:
            assert a is None or not a.any()
            continue
        assert a is not None and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)


@pytest.fixture(scope="module")
def teacher():
    return llama(7).double().eval().requires_grad_(False)


def _pair(make, dtype, teacher_model):
    student = make().to(dtype)
    ids_BT, attention_BT, mask_BC = batch(left_pad=make is not gemma2)
    c = mask_BC.shape[1]
    s_logits, s_hidden = both_ways(student, ids_BT, attention_BT, c)
    t_logits, t_hidden = both_ways(teacher_model.to(dtype), ids_BT, attention_BT, c, grad=False)
    return student, s_logits, s_hidden, t_logits, t_hidden, mask_BC


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_divergence_fused_equals_unfused(kind, dtype, teacher):
    student, s_logits, s_hidden, t_logits, t_hidden, mask_BC = _pair(gemma2, dtype, teacher)
    weights_BC = torch.rand(mask_BC.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    common = {"beta": 0.3, "alpha": 0.2, "temperature": TEMPERATURE, "vocab_size": VOCAB, "chunk_size": CHUNK}
    ref = divergences.per_token(kind, s_logits, t_logits, mask_BC, **common)
    # A plain sum (gradient computed in forward, scaled in backward) and a row-weighted sum (the weight
    # gradient recomputed in backward); either side as logits or as hidden states.
    cases = ((s_hidden, t_hidden, lambda v: v.sum()), (s_hidden, t_logits, lambda v: (v * weights_BC).sum()),
             (s_logits, t_hidden, lambda v: v.sum()))
    for student_side, teacher_side, reduce in cases:
        fused = divergences.per_token(kind, student_side, teacher_side, mask_BC, **common)
        assert fused.shape == mask_BC.shape and not fused[~mask_BC].any()
        assert_same(fused, grads_of(student, reduce(fused)), ref, grads_of(student, reduce(
            divergences.per_token(kind, s_logits, t_logits, mask_BC, **common))), dtype)


@pytest.mark.parametrize("name", ["phi_bias", "llama_tied"])
def test_bias_and_tied_heads(name, teacher):
    student, s_logits, s_hidden, t_logits, t_hidden, mask_BC = _pair(STUDENTS[name], torch.float64, teacher)
    common = {"temperature": TEMPERATURE, "vocab_size": VOCAB, "chunk_size": CHUNK}
    fused = divergences.per_token("jsd", s_hidden, t_hidden, mask_BC, **common)
    ref = divergences.per_token("jsd", s_logits, t_logits, mask_BC, **common)
    fused_grads = grads_of(student, fused.sum())
    assert_same(fused, fused_grads, ref, grads_of(student, ref.sum()), torch.float64)
    head = lm_head_of(student)
    if name == "phi_bias":
        assert head.bias_V is not None
    else:
        assert head.weight_VH is student.model.embed_tokens.weight
    # padding rows of the head (past VOCAB) get exactly zero gradient
    index = [i for i, p in enumerate(p for p in student.parameters() if p.requires_grad) if p is head.weight_VH][0]
    assert not fused_grads[index][VOCAB:].any() or name == "llama_tied"  # tied rows also carry embedding grads


@pytest.mark.parametrize("student_fused", [True, False], ids=["student_hidden", "student_logits"])
@pytest.mark.parametrize("support", TOPK_SUPPORTS)
def test_topk_supports_and_teacher_topk(support, student_fused, teacher):
    student, s_logits, s_hidden, t_logits, t_hidden, mask_BC = _pair(gemma2, torch.float64, teacher)
    common = {"temperature": TEMPERATURE, "vocab_size": VOCAB, "chunk_size": CHUNK}
    top_lp, top_ids = divergences.teacher_topk(t_hidden, 5, mask_BC, **common)
    ref_lp, ref_ids = divergences.teacher_topk(t_logits, 5, mask_BC, **common)
    assert torch.equal(top_ids, ref_ids)
    torch.testing.assert_close(top_lp, ref_lp, rtol=1e-12, atol=1e-12)
    kind = "forward_kl" if support == "teacher_renormalized" else "reverse_kl"
    student_side = s_hidden if student_fused else s_logits
    fused = divergences.topk_per_token(kind, student_side, top_lp, top_ids, mask_BC, support=support, **common)
    ref = divergences.topk_per_token(kind, s_logits, ref_lp, ref_ids, mask_BC, support=support, **common)
    assert_same(fused, grads_of(student, fused.sum()), ref, grads_of(student, ref.sum()), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_gathered_logprobs_tail_and_entropy(dtype, teacher):
    student, s_logits, s_hidden, t_logits, t_hidden, mask_BC = _pair(gemma2, dtype, teacher)
    common = {"temperature": TEMPERATURE, "vocab_size": VOCAB, "chunk_size": CHUNK}
    ids_BCK = torch.randint(0, VOCAB, (*mask_BC.shape, 3), generator=torch.Generator().manual_seed(2))
    weights = torch.randn(ids_BCK.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    fused = divergences.gathered_logprobs(s_hidden, ids_BCK, **common)
    ref = divergences.gathered_logprobs(s_logits, ids_BCK, **common)
    assert_same(fused, grads_of(student, (fused * weights).sum()), ref,
                grads_of(student, (ref * weights).sum()), dtype)
    fused = divergences.tail_logprob(s_hidden, ids_BCK, **common)
    ref = divergences.tail_logprob(s_logits, ids_BCK, **common)
    assert_same(fused, grads_of(student, (fused * weights[..., 0]).sum()), ref,
                grads_of(student, (ref * weights[..., 0]).sum()), dtype)
    torch.testing.assert_close(divergences.entropy(t_hidden, mask_BC, **common),
                               divergences.entropy(t_logits, mask_BC, **common))
    rows = s_hidden.shape[-1]  # the reference compares equal widths: the teacher's head cut to the student's
    t_cut = HiddenLogits(t_hidden.hidden_BCH, LMHead(t_hidden.head.weight_VH[:rows]))
    torch.testing.assert_close(divergences.per_token_reference("tv", s_hidden.detach(), t_cut, temperature=2.0),
                               divergences.per_token_reference("tv", s_logits.detach(), t_logits[..., :rows],
                                                               temperature=2.0))


def _objective_losses(s, t, ids_BC, mask_BC, teacher_lp_BC):
    """Every objective that takes student logits, on either representation (objectives.py unchanged)."""
    common = {"temperature": TEMPERATURE, "vocab_size": VOCAB, "chunk_size": CHUNK, "num_tokens": 7}
    top_lp, top_ids = divergences.teacher_topk(t, 4, mask_BC, temperature=TEMPERATURE, vocab_size=VOCAB)
    advantages_B = torch.tensor([0.5, -1.0], dtype=teacher_lp_BC.dtype)
    yield objectives.token_divergence(s, t, mask_BC, kind="skew_reverse_kl", **common)[0]
    yield objectives.topk_divergence(s, top_lp, top_ids, mask_BC, kind="jsd", **common)[0]
    yield objectives.sampled_token_pg(s, teacher_lp_BC, ids_BC, mask_BC, gamma=0.9, **common)[0]
    yield objectives.entropy_gated_forward_kl(s, t, mask_BC, threshold=0.0, **common)[0]
    yield objectives.minillm(s, t, ids_BC, mask_BC, **common)[0]
    yield objectives.kdrl(s, teacher_lp_BC, ids_BC, mask_BC, advantages_B, kd_coef=0.3, **common)[0]


def test_objectives_accept_hidden_logits_unchanged(teacher):
    student, s_logits, s_hidden, t_logits, t_hidden, mask_BC = _pair(gemma2, torch.float64, teacher)
    ids_BC = torch.randint(0, VOCAB, mask_BC.shape, generator=torch.Generator().manual_seed(4))
    teacher_lp_BC = objectives.token_logprobs(t_logits, ids_BC, temperature=TEMPERATURE, vocab_size=VOCAB)
    for fused, ref in zip(_objective_losses(s_hidden, t_hidden, ids_BC, mask_BC, teacher_lp_BC),
                          _objective_losses(s_logits, t_logits, ids_BC, mask_BC, teacher_lp_BC)):
        assert_same(fused, grads_of(student, fused), ref, grads_of(student, ref), torch.float64)


def test_all_masked_batch_gives_zero_loss_and_zero_gradients(teacher):
    student, _, s_hidden, _, t_hidden, mask_BC = _pair(gemma2, torch.float32, teacher)
    none_BC = torch.zeros_like(mask_BC)
    losses = [
        divergences.per_token("jsd", s_hidden, t_hidden, none_BC, vocab_size=VOCAB).sum(),
        divergences.topk_per_token("forward_kl", s_hidden, *divergences.teacher_topk(t_hidden, 3, none_BC),
                                   none_BC, vocab_size=VOCAB).sum(),
        objectives.sampled_token_pg(s_hidden, torch.zeros(none_BC.shape), torch.zeros(none_BC.shape).long(),
                                    none_BC.float(), num_tokens=0, vocab_size=VOCAB)[0],
        divergences.connected_zero(s_hidden),
    ]
    for loss in losses:
        assert loss.item() == 0.0
        for grad in grads_of(student, loss):
            assert grad is not None and torch.isfinite(grad).all() and not grad.any()


def test_bf16_autocast_student_matches_unfused(teacher):
    student = gemma2()
    ids_BT, attention_BT, mask_BC = batch(left_pad=False)
    c = mask_BC.shape[1]
    t_logits, t_hidden = both_ways(teacher.float(), ids_BT, attention_BT, c, grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_logits, s_hidden = both_ways(student, ids_BT, attention_BT, c)
    assert s_logits.dtype == torch.bfloat16 and s_hidden.head.compute_dtype == torch.bfloat16
    common = {"temperature": TEMPERATURE, "vocab_size": VOCAB, "chunk_size": CHUNK}
    fused = divergences.per_token("reverse_kl", s_hidden, t_hidden, mask_BC, **common)
    ref = divergences.per_token("reverse_kl", s_logits, t_logits, mask_BC, **common)
    torch.testing.assert_close(fused, ref, rtol=2e-2, atol=2e-3)
    for a, b in zip(grads_of(student, fused.sum()), grads_of(student, ref.sum())):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)


def test_lora_all_linear_leaves_the_head_plain_and_an_adapted_head_is_refused(teacher):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(llama(5), LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0))
    ids_BT, attention_BT, mask_BC = batch()
    c = mask_BC.shape[1]
    s_logits, s_hidden = both_ways(student, ids_BT, attention_BT, c)
    t_logits = completion_logits(teacher.float(), ids_BT, attention_BT, c).detach()
    fused = divergences.per_token("forward_kl", s_hidden, t_logits, mask_BC, vocab_size=VOCAB, chunk_size=CHUNK)
    ref = divergences.per_token("forward_kl", s_logits, t_logits, mask_BC, vocab_size=VOCAB)
    assert not s_hidden.head.weight_VH.requires_grad
    assert_same(fused, grads_of(student, fused.sum()), ref, grads_of(student, ref.sum()), torch.float32)

    adapted = get_peft_model(llama(5), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(FusedUnsupported, match="LoRA"):
        completion_hidden(adapted, ids_BT, attention_BT, c)


def test_check_fused_accepts_known_heads_and_refuses_unknown_post_processing():
    from transformers import LlamaForCausalLM

    for make in (gemma2, phi, llama):
        check_fused(make())

    class Doubled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    odd = Doubled(llama().config)
    with pytest.raises(FusedUnsupported, match="differ"):
        check_fused(odd)


def test_hidden_logits_looks_like_the_logits_it_replaces():
    student = llama()
    ids_BT, attention_BT, mask_BC = batch()
    logits, hidden = both_ways(student, ids_BT, attention_BT, mask_BC.shape[1])
    assert hidden.shape == logits.shape and hidden.ndim == 3
    assert hidden.device == logits.device and hidden.dtype == logits.dtype
    picked = hidden.index_select(0, torch.tensor([1]))
    torch.testing.assert_close(picked.logits(), logits.index_select(0, torch.tensor([1])))
    manual = HiddenLogits(hidden.hidden_BCH, LMHead(student.lm_head.weight))
    torch.testing.assert_close(manual.logits(), logits)


def test_ddp_gradients_flow_to_the_head_weight(teacher, tmp_path):
    """Through a DDP wrapper (gloo, one process): the head weight's gradient passes DDP's hooks and
    two steps in a row raise nothing (a parameter whose gradient bypassed them would)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for find_unused in (False, True):
            reference = llama(9)
            wrapped = torch.nn.parallel.DistributedDataParallel(llama(9), find_unused_parameters=find_unused)
            ids_BT, attention_BT, mask_BC = batch()
            c = mask_BC.shape[1]
            t_logits = completion_logits(teacher.float(), ids_BT, attention_BT, c).detach()
            for _ in range(2):
                wrapped.zero_grad()
                reference.zero_grad()
                hidden = completion_hidden(wrapped, ids_BT, attention_BT, c)
                divergences.per_token("jsd", hidden, t_logits, mask_BC, vocab_size=VOCAB).sum().backward()
                logits = completion_logits(reference, ids_BT, attention_BT, c)
                divergences.per_token("jsd", logits, t_logits, mask_BC, vocab_size=VOCAB).sum().backward()
                for a, b in zip(wrapped.module.parameters(), reference.parameters()):
                    torch.testing.assert_close(a.grad, b.grad, rtol=2e-4, atol=2e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("recipe", ["on_policy_rkl", "sampled_token_opd", "topk_fkl"])
def test_training_on_the_fused_path_equals_the_logits_path(tiny_setup, tmp_path, recipe):
    """The fused path is the default: a run ends on the weights of the same run on materialised logits."""
    from safetensors.torch import load_file

    from conftest import base_overrides
    from opd.config import load_config
    from opd.trainer import train

    runs = {}
    for fused in (True, False):
        out = tmp_path / f"fused-{fused}"
        lines: list[str] = []
        train(load_config(recipe, base_overrides(tiny_setup, out, **{
            "loss.fused": fused, "data.eval": "null", "teacher.top_k": 5 if recipe == "topk_fkl" else "null"})),
            log=lines.append)
        assert not any("fused loss off" in line for line in lines), lines
        runs[fused] = load_file(str(out / "final" / "model.safetensors"))
    for key in runs[True]:
        torch.testing.assert_close(runs[True][key], runs[False][key], rtol=1e-4, atol=1e-5)
