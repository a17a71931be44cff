"""oneDNN linear layers: same values and gradients as nn.Linear, prepacked decoding, conversion."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_llama
from opd import cpu_linear
from opd.cpu_linear import OneDNNLinear, packed_for_decoding, use_onednn
from opd.models import completion_logits
from opd.rollout import SamplingParams, build_batch, sample_generate

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this torch build has no oneDNN linear")


@pytest.fixture(autouse=True)
def onednn_for_small_layers(monkeypatch, request):
    """The layers here are tiny; route them to oneDNN anyway (except where the size rule is tested)."""
    if "size_rule" not in request.node.name:
        monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 0)


def test_size_rule_keeps_small_layers_on_f_linear():
    plain, ours = linear_pair(True, seed=6)
    assert ours.weight.numel() < cpu_linear.MIN_WEIGHT_ELEMENTS
    x = torch.randn(4, 24, requires_grad=True)
    out = ours(x)
    assert torch.equal(out, plain(x)) and "OneDNN" not in type(out.grad_fn).__name__
    with torch.no_grad(), packed_for_decoding(ours, rows=4):
        assert ours._opd_packed is None


def linear_pair(bias: bool, seed: int = 0) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(seed)
    plain = torch.nn.Linear(24, 40, bias=bias)
    ours = copy.deepcopy(plain)
    ours.__class__ = OneDNNLinear
    return plain, ours


@pytest.mark.parametrize("bias", [True, False])
def test_float32_values_and_all_gradients_match_nn_linear(bias):
    plain, ours = linear_pair(bias)
    x = torch.randn(3, 5, 24)  # leading dims are flattened and restored
    upstream = torch.randn(3, 5, 40)
    grads = []
    for layer in (plain, ours):
        x_in = x.clone().requires_grad_(True)
        out = layer(x_in)
        (out * upstream).sum().backward()
        grads.append((out.detach(), x_in.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad))
    for expected, got in zip(*grads):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert ours(x).grad_fn is not None and "OneDNN" in type(ours(x).grad_fn).__name__


def test_frozen_weight_gets_no_gradient_and_input_still_does():
    plain, ours = linear_pair(True, seed=1)
    ours.requires_grad_(False)
    x = torch.randn(4, 24, requires_grad=True)
    ours(x).pow(2).sum().backward()
    assert ours.weight.grad is None and x.grad is not None
    x_ref = x.detach().clone().requires_grad_(True)
    plain.requires_grad_(False)
    plain(x_ref).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_autocast_and_other_dtypes_keep_f_linear_exactly():
    plain, ours = linear_pair(True, seed=2)
    x = torch.randn(6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(x), plain(x))
    plain64, ours64 = plain.double(), ours.double()
    x64 = torch.randn(6, 24, dtype=torch.float64, requires_grad=True)
    assert torch.equal(ours64(x64), plain64(x64))
    assert torch.autograd.gradcheck(lambda t: ours64(t), (x64,))


@pytest.mark.parametrize("autocast", [False, True])
def test_packed_weights_serve_no_grad_calls_only_inside_the_block(autocast):
    plain, ours = linear_pair(True, seed=3)
    x = torch.randn(8, 1, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = plain(x)
        with torch.no_grad(), packed_for_decoding(ours, rows=8):
            assert ours._opd_packed is not None
            assert ours._opd_packed[0] == (torch.bfloat16 if autocast else torch.float32)
            packed_out = ours(x)
        assert ours._opd_packed is None  # the copies are gone after the block
    assert packed_out.dtype == expected.dtype
    if autocast:
        assert torch.equal(packed_out, expected)  # the same bf16 product autocast computes
    else:
        torch.testing.assert_close(packed_out, expected, atol=1e-5, rtol=1e-5)
    # A grad-enabled call inside the block trains the real weight, not the packed copy.
    with packed_for_decoding(ours, rows=8):
        ours(x).sum().backward()
    assert ours.weight.grad is not None


def test_use_onednn_converts_plain_linears_and_keeps_the_state_dict(tokenizer, tmp_path, monkeypatch):
    model = tiny_llama(len(tokenizer), hidden=32, seed=4)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert use_onednn(model) == linears > 0
    assert all(type(m) is not torch.nn.Linear for m in model.modules())
    assert {k: v for k, v in model.state_dict().items()}.keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    model.save_pretrained(tmp_path / "saved")  # a plain checkpoint: nothing opd-specific is stored
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert all(type(m) is not OneDNNLinear for m in reloaded.modules())
    assert use_onednn(reloaded, "torch") == 0
    monkeypatch.setenv("OPD_CPU_LINEAR", "torch")
    assert use_onednn(reloaded) == 0


def test_converted_model_trains_and_decodes_like_the_plain_one(tokenizer):
    plain = tiny_llama(len(tokenizer), hidden=32, seed=5).eval()
    ours = copy.deepcopy(plain)
    use_onednn(ours)
    batch = build_batch([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17]], tokenizer.pad_token_id)
    results = []
    for model in (plain, ours):
        logits = completion_logits(model, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)
        logits.log_softmax(-1)[..., 3].sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    params = SamplingParams(max_new_tokens=6, greedy=True)
    assert sample_generate(ours, prompts, params, tokenizer)[0] == sample_generate(plain, prompts, params, tokenizer)[0]
    assert all(m._opd_packed is None for m in ours.modules() if isinstance(m, OneDNNLinear))


def test_nested_blocks_stale_weights_and_dtype_mismatch():
    plain, ours = linear_pair(False, seed=7)
    x = torch.randn(8, 24)
    with torch.no_grad(), packed_for_decoding(ours, rows=8):
        packed = ours._opd_packed
        with packed_for_decoding(ours, rows=8):  # an enclosing block's copies are kept
            assert ours._opd_packed is packed
        assert ours._opd_packed is packed
        ours.weight.mul_(2.0)  # changed in place: the packed copy is stale and must not be used
        plain.weight.mul_(2.0)
        torch.testing.assert_close(ours(x), plain(x), atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError):  # bf16 input to float32 weights fails as with F.linear
            ours(x.to(torch.bfloat16))
    assert ours._opd_packed is None
