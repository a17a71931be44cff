"""opd's attention kernel: SDPA's semantics, with a faster path for the short sequences of CPU runs.

PyTorch's CPU SDPA kernel (the flash-style ``_scaled_dot_product_flash_attention_for_cpu``) is
built for long sequences. At the lengths of a CPU distillation step (a few hundred tokens), its
backward is the slowest op of the student update: 8.5 ms per layer for 8 x 80 tokens in bf16, where
three batched matmuls and a softmax take a fraction of that (``benchmarks/step.py`` measures the
effect on a whole step). ``opd_sdpa`` is registered with transformers' attention interface
and computes attention with matmuls on CPU when the score tensor is small. It does so in float32
whatever the input dtype, so it is at least as precise as SDPA. Large problems, and every
non-CPU device, go to transformers' own SDPA function unchanged.

Models that load with ``sdpa`` are switched to it (``model.attn_implementation: auto``); models
whose code does not use the attention interface keep their own kernel.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "opd_sdpa"
# Above this many score elements (B * heads * queries * keys) the matmul path would hold a large
# float32 score tensor, so the call goes to SDPA's memory-efficient kernels instead.
MAX_SCORE_ELEMENTS = 1 << 24

_registered = False


def _sdpa(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def attention_forward(
    module: torch.nn.Module,
    query_BHQD: torch.Tensor,
    key_BKSD: torch.Tensor,
    value_BKSD: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention with transformers' SDPA calling convention: returns ``[B, Q, H, D]`` and no weights.

    ``attention_mask`` is what ``sdpa_mask`` builds: boolean ``[B, 1, Q, S]`` (True = attend), or
    None for a plain causal pattern from position 0 (top-left aligned, as SDPA's ``is_causal``) or,
    for a single query, no mask. Grouped-query heads are handled by
    folding each key/value head's query heads into the query axis, so keys and values are never
    repeated.
    """
    batch, heads, queries, head_dim = query_BHQD.shape
    kv_heads, keys = key_BKSD.shape[1], key_BKSD.shape[2]
    unsupported = (kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
                   or kwargs.get("position_bias") is not None
                   or value_BKSD.shape[-1] != head_dim)  # MLA-style value heads of another size
    if (query_BHQD.device.type != "cpu" or unsupported or heads % kv_heads
            or batch * heads * queries * keys > MAX_SCORE_ELEMENTS
            or (attention_mask is not None and attention_mask.dtype != torch.bool)):
        return _sdpa(module, query_BHQD, key_BKSD, value_BKSD, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    with torch.autocast("cpu", enabled=False):  # float32 scores even inside a bf16 autocast region
        groups = heads // kv_heads
        scale = scaling if scaling is not None else head_dim**-0.5
        # Query heads of one key/value head are adjacent (transformers' repeat_kv layout), so they fold
        # into the query axis: [B, K, G * Q, D].
        query_BKgD = query_BHQD.float().reshape(batch, kv_heads, groups * queries, head_dim)
        scores_BKGQS = torch.matmul(query_BKgD * scale, key_BKSD.float().transpose(-1, -2)).view(
            batch, kv_heads, groups, queries, keys)
        if attention_mask is None:
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            if causal and queries > 1:
                # Top-left aligned, as SDPA's is_causal: transformers only omits the mask for a
                # prefill from position 0 (keys beyond the queries are empty static-cache slots).
                attention_mask = torch.ones(queries, keys, dtype=torch.bool, device=query_BHQD.device).tril()
        if attention_mask is not None:
            # [Q, S] (causal) or [B, 1, 1, Q, S] (transformers' mask, broadcast over the folded groups)
            mask = attention_mask if attention_mask.dim() == 2 else attention_mask.unsqueeze(2)
            # A finite fill keeps fully masked rows (left padding) finite; those outputs are never read.
            scores_BKGQS = scores_BKGQS.masked_fill(~mask, torch.finfo(torch.float32).min)
        probs_BKGQS = torch.softmax(scores_BKGQS, dim=-1)
        if dropout > 0.0 and module.training:
            probs_BKGQS = torch.nn.functional.dropout(probs_BKGQS, p=dropout)
        out_BKgD = torch.matmul(probs_BKGQS.view(batch, kv_heads, groups * queries, keys), value_BKSD.float())
        out_BQHD = out_BKgD.view(batch, heads, queries, head_dim).transpose(1, 2)
        return out_BQHD.to(query_BHQD.dtype).contiguous(), None


def register() -> None:
    """Make ``opd_sdpa`` a transformers attention implementation (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def set_attention(model: torch.nn.Module, implementation: str) -> str:
    """Give a loaded model its attention kernel; returns the one it ends up with.

    ``auto`` switches a model that runs ``sdpa`` to ``opd_sdpa`` and leaves any other model alone;
    any other value is a transformers implementation name, set as is.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if implementation == "auto":
        if current != "sdpa":
            return str(current)
        register()
        implementation = NAME
    elif implementation == NAME:
        register()
    if implementation != current:
        model.set_attn_implementation(implementation)
    return implementation
