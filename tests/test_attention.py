"""opd's attention kernel equals transformers' SDPA: values, gradients, KV-cached decoding, dispatch."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd import attention
from opd.models import completion_logits, load_causal_lm
from opd.rollout import SamplingParams, _left_pad, build_batch, hf_generate


def gqa_llama(seed: int = 0) -> LlamaForCausalLM:
    """4 query heads sharing 2 key/value heads, so the grouped-query folding is exercised."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def pair(seed: int = 0) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    sdpa = gqa_llama(seed)
    assert sdpa.config._attn_implementation == "sdpa"
    ours = copy.deepcopy(sdpa)
    assert attention.set_attention(ours, "auto") == attention.NAME
    return sdpa, ours


def ragged_batch():
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]  # left padding of 0, 4 and 2
    completions = [[20, 21, 22, 2], [23, 24], [25, 26, 27, 28, 29]]  # right padding too
    return build_batch(prompts, completions, pad_id=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_values_and_gradients_equal_sdpa_with_padding_and_gqa(precision):
    sdpa, ours = pair()
    batch = ragged_batch()
    mask_BC = batch.completion_mask_BC.bool()
    results = []
    for model in (sdpa, ours):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = completion_logits(model, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)
        logits = logits.float()
        (logits.log_softmax(-1)[mask_BC] * torch.linspace(-1, 1, 64)).sum().backward()
        results.append((logits[mask_BC].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logits_a, grads_a), (logits_b, grads_b) = results
    # bf16: SDPA rounds its attention output to bf16 like we do; our scores are fp32, so agreement is
    # at bf16 resolution.
    tol = dict(atol=1e-5, rtol=1e-5) if precision == "fp32" else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(logits_b, logits_a, **tol)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], **tol, msg=name)


def test_kv_cached_decoding_matches_sdpa_and_a_full_forward(tokenizer):
    from opd.rollout import sample_generate

    sdpa, ours = pair(seed=3)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    params = SamplingParams(max_new_tokens=8, greedy=True)
    tokens_sdpa = hf_generate(sdpa, prompts, params, tokenizer)
    tokens_ours = hf_generate(ours, prompts, params, tokenizer)
    assert tokens_ours == tokens_sdpa
    tokens_ours, _ = sample_generate(ours, prompts, params, tokenizer)
    assert tokens_ours == tokens_sdpa
    # One decode step (one query against the cache) equals the last row of a full forward.
    input_ids, mask = _left_pad(prompts, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = ours(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                   use_cache=True)
        step = ours(input_ids=input_ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                    use_cache=True, past_key_values=out.past_key_values).logits[:, -1]
        full = sdpa(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_unpadded_causal_path_builds_its_own_mask():
    """With no padding transformers passes no mask (plain causal); the kernel must still be causal."""
    sdpa, ours = pair(seed=4)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, sdpa(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        # Causality: changing a later token leaves earlier logits alone.
        changed = ids.clone()
        changed[0, -1] = 40
        torch.testing.assert_close(ours(input_ids=changed).logits[:, :-1], ours(input_ids=ids).logits[:, :-1])


def test_large_problems_and_other_devices_go_to_sdpa(monkeypatch):
    calls = []
    real = attention._sdpa

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "_sdpa", spy)
    sdpa, ours = pair(seed=5)
    batch = ragged_batch()
    with torch.no_grad():
        small = completion_logits(ours, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)
    assert calls == []
    monkeypatch.setattr(attention, "MAX_SCORE_ELEMENTS", 16)
    with torch.no_grad():
        large = completion_logits(ours, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)
        reference = completion_logits(sdpa, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)
    assert len(calls) == 2  # one per layer
    torch.testing.assert_close(large, reference)
    torch.testing.assert_close(small, reference, atol=1e-5, rtol=1e-5)


def test_load_causal_lm_picks_the_kernel(tmp_path):
    gqa_llama().save_pretrained(tmp_path / "m")
    assert load_causal_lm(str(tmp_path / "m")).config._attn_implementation == attention.NAME
    assert load_causal_lm(str(tmp_path / "m"), attn_implementation="sdpa").config._attn_implementation == "sdpa"
    assert load_causal_lm(str(tmp_path / "m"), attn_implementation="eager").config._attn_implementation == "eager"
    # auto leaves a model that does not run SDPA alone
    eager = gqa_llama()
    eager.set_attn_implementation("eager")
    assert attention.set_attention(eager, "auto") == "eager"
    assert eager.config._attn_implementation == "eager"


def test_static_cache_prefill_is_top_left_causal_like_sdpa():
    """A prefill into an empty static cache comes without a mask and with more keys (empty slots)
    than queries: causal must be top-left aligned, as SDPA's is_causal."""
    from transformers import StaticCache

    sdpa, ours = pair(seed=6)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        logits = [model(input_ids=ids, use_cache=True,
                        past_key_values=StaticCache(config=model.config, max_cache_len=16)).logits
                  for model in (sdpa, ours)]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def test_value_heads_of_another_size_go_to_sdpa():
    module = torch.nn.Module()
    module.is_causal = True
    query, key = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    value = torch.randn(1, 2, 3, 4)  # MLA-style: values narrower than queries and keys
    out, _ = attention.attention_forward(module, query, key, value, None)
    expected, _ = attention._sdpa(module, query, key, value, None)
    assert out.shape == (1, 3, 2, 4)
    torch.testing.assert_close(out, expected)
