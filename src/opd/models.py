"""Loading models and tokenizers with readable errors, and the shared scoring forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from opd.attention import set_attention
from opd.cpu_linear import use_onednn
from opd.errors import ModelError, OpdError

DTYPES: dict[str, Any] = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                          "float16": torch.float16}


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if _looks_local(name) and not Path(name).expanduser().exists():
        raise ModelError(f"tokenizer path {name} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if _looks_local(name) else name,
                                                  trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load tokenizer {name!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer {name!r} has no EOS token; set one before training")
    if tokenizer.pad_token_id is None:
        # Padding is always masked, so reusing EOS as pad is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                   attn_implementation: str = "auto", cpu_linear: str = "onednn") -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with safetensors only and one-line errors.

    ``attn_implementation``: ``auto`` runs models that load with SDPA on opd's attention kernel
    (:mod:`opd.attention`); any transformers name (``sdpa``, ``eager``, ``flash_attention_2``) is set as is.
    ``cpu_linear``: ``onednn`` computes the linear layers with :mod:`opd.cpu_linear` on CPU.
    """
    from transformers import AutoModelForCausalLM

    if _looks_local(name) and not Path(name).expanduser().exists():
        raise ModelError(f"model path {name} does not exist")
    path = str(Path(name).expanduser()) if _looks_local(name) else name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except Exception as exc:
        raise ModelError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from None
    try:
        set_attention(model, attn_implementation)
    except Exception as exc:
        if attn_implementation != "auto":
            raise ModelError(f"model {name!r} cannot use attn_implementation={attn_implementation!r}: "
                             f"{str(exc).splitlines()[0]}") from None
    use_onednn(model, cpu_linear)
    return model


def shared_vocab_size(tokenizer: Any, *models: torch.nn.Module) -> int:
    """Vocabulary rows the loss compares: the tokenizer's length.

    Checkpoints of one family often pad their embedding matrices to different
    multiples (Qwen2.5-0.5B has 151936 rows, 7B 152064, the tokenizer 151665); rows
    beyond the tokenizer are never real tokens, so logits are sliced to it.
    """
    vocab = len(tokenizer)
    for model in models:
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < vocab:
            raise ModelError(
                f"{model.config._name_or_path or 'model'} has {rows} output rows but its tokenizer has "
                f"{vocab} tokens; the model does not match the tokenizer"
            )
    return vocab


def completion_logits(
    model: torch.nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    completion_len: int,
) -> torch.Tensor:
    """Logits predicting the last ``completion_len`` tokens: ``[B, completion_len, V_model]``.

    Sequences are prompt (left-padded) + completion (right-padded), so the positions
    that predict completion tokens are the last ``completion_len`` of the input without
    its final token; ``logits_to_keep`` makes the LM head skip the prompt. Position ids
    come from the attention mask, as in ``generate``, so left padding does not shift them.
    The vocabulary is not sliced here (that would copy the logits); losses take a
    ``vocab_size`` and slice chunk by chunk.
    """
    inputs_BT = input_ids_BT[:, :-1]
    mask_BT = attention_mask_BT[:, :-1]
    position_ids_BT = (mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=inputs_BT,
        attention_mask=mask_BT,
        position_ids=position_ids_BT,
        logits_to_keep=completion_len,
        use_cache=False,
    )
    return out.logits


def add_lora(student: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """Wrap the student with PEFT LoRA adapters; only they are trained."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise OpdError("model.lora_r needs the peft package: pip install 'opd[lora]'") from None
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    wrapped = get_peft_model(student, lora)
    wrapped.eval()
    return wrapped


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout so train mode (needed by gradient checkpointing) samples like eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
