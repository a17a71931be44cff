"""Hidden states instead of logits: the inputs of the fused divergences.

``[B, C, V]`` logits are what runs out of memory in distillation: at 16k completion tokens and
V = 151,936 one model's fp32 logits take 9.7 GB before the loss starts, and a distillation loss
needs the student's and the teacher's. The logits are a product ``h W^T`` with a hidden size H of
a few thousand at most, so a loss can take the final hidden states ``[B, C, H]`` and the output
layer and form the logits one chunk of rows at a time, never holding more than one ``[chunk, V]``
block. Liger-Kernel's fused linear cross-entropy and fused linear JSD (Hsu et al., "Liger Kernel:
Efficient Triton Kernels for LLM Training", arXiv 2410.10989) compute language-model losses
this way; :mod:`opd.divergences` does it for every divergence it has, the top-k supports, the
sampled-token log-probs, entropies and the teacher's top-k, on the teacher's side too.

This module holds only the types and the model plumbing (no loss math, so that
:mod:`opd.divergences` can import it without a cycle):

- :class:`LMHead`: the output layer as plain tensors (weight, bias) plus what the model does to its
  output (multiplier, tanh soft-capping) and the dtype its product runs in;
- :class:`HiddenLogits`: hidden states and a head, accepted wherever :mod:`opd.divergences` (and
  so :mod:`opd.objectives`) accepts a ``[..., V]`` logits tensor;
- :func:`lm_head_of`, :func:`completion_hidden`: both read from a Hugging Face causal LM;
  :func:`check_fused` compares the two paths once on a short input before training relies on it.

The student's gradient reaches the head weight as an ordinary autograd gradient of the parameter
(so DDP's hooks and optimizers see nothing unusual); the hidden states are taken from the output
layer's input during the model's own forward call, so a DDP wrapper's forward runs as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


class FusedUnsupported(ValueError):
    """This model's output layer cannot be fused with the loss (the message says why, in one line)."""


@dataclass(frozen=True)
class LMHead:
    """The output layer as the loss sees it: ``logits = softcap(scale * (h W^T + b))``.

    Attributes:
        weight_VH: ``[V_rows, H]`` weight (a parameter for the student; tied embeddings are the same
            tensor). Rows past the loss's ``vocab_size`` (padding rows) are never read and get a
            zero gradient.
        bias_V: ``[V_rows]`` bias, or None (most LLM heads have none; Phi-2's has one).
        scale: multiplier applied to the head's output (Cohere's ``logit_scale``, 1 / Granite's
            ``logits_scaling``).
        softcap: ``c`` of the tanh soft-capping ``c * tanh(x / c)`` applied after the multiplier
            (Gemma 2/3's ``final_logit_softcapping``), or None.
        compute_dtype: dtype of the product ``h W^T``: the autocast dtype when the model's forward
            ran under autocast (bf16 logits, as the unfused path would have), else the inputs'. None
            means: decide at loss time (the ambient autocast dtype, else the inputs' dtype).
    """

    weight_VH: torch.Tensor
    bias_V: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    compute_dtype: torch.dtype | None = None

    @property
    def rows(self) -> int:
        """Rows of the weight: the width of the logits the model itself would return."""
        return int(self.weight_VH.shape[0])

    def detach(self) -> LMHead:
        bias = None if self.bias_V is None else self.bias_V.detach()
        return dataclasses.replace(self, weight_VH=self.weight_VH.detach(), bias_V=bias)

    def logits(self, hidden_NH: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
        """The full logits ``[..., vocab_size]`` in the compute dtype (a reference; this is the
        tensor the fused path exists to avoid)."""
        vocab = vocab_size or self.rows
        dtype = self.compute_dtype or torch.promote_types(hidden_NH.dtype, self.weight_VH.dtype)
        bias = None if self.bias_V is None else self.bias_V[:vocab].to(dtype)
        with torch.autocast(hidden_NH.device.type, enabled=False):
            out = torch.nn.functional.linear(hidden_NH.to(dtype), self.weight_VH[:vocab].to(dtype), bias)
        if self.scale != 1.0:
            out = out * self.scale
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


@dataclass(frozen=True)
class HiddenLogits:
    """Logits ``head(hidden)`` that are never materialised: final hidden states and the head.

    Pass it wherever :mod:`opd.divergences` takes student or teacher logits. ``hidden_BCH`` is
    ``[B, C, H]`` (any leading shape works, e.g. ``[N, H]``). For code written against logits
    tensors it has the tensor attributes that do not need the values: ``shape`` (that of the
    logits the model would return, ``[..., V_rows]``), ``ndim``, ``device``, ``dtype`` (the logits'
    dtype) and row selection (``index_select`` on a leading dimension).
    """

    hidden_BCH: torch.Tensor
    head: LMHead

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden_BCH.shape[:-1], self.head.rows))

    @property
    def ndim(self) -> int:
        return self.hidden_BCH.ndim

    @property
    def device(self) -> torch.device:
        return self.hidden_BCH.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.compute_dtype or torch.promote_types(self.hidden_BCH.dtype, self.head.weight_VH.dtype)

    @property
    def requires_grad(self) -> bool:
        head = self.head
        return bool(self.hidden_BCH.requires_grad or head.weight_VH.requires_grad
                    or (head.bias_V is not None and head.bias_V.requires_grad))

    def index_select(self, dim: int, index: torch.Tensor) -> HiddenLogits:
        if dim < 0:
            dim += self.ndim
        if not 0 <= dim < self.ndim - 1:
            raise ValueError("HiddenLogits.index_select selects along a leading (non-vocabulary) dimension")
        return HiddenLogits(self.hidden_BCH.index_select(dim, index), self.head)

    def detach(self) -> HiddenLogits:
        return HiddenLogits(self.hidden_BCH.detach(), self.head.detach())

    def flatten_rows(self) -> torch.Tensor:
        """The hidden states as ``[N, H]`` rows (a view when possible)."""
        return self.hidden_BCH.reshape(-1, self.hidden_BCH.shape[-1])

    def logits(self, vocab_size: int | None = None) -> torch.Tensor:
        """Materialise ``[..., vocab_size]`` logits (tests and references only)."""
        return self.head.logits(self.hidden_BCH, vocab_size)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP-style wrappers (``.module``), whose attributes say what the head is."""
    while isinstance(getattr(model, "module", None), torch.nn.Module) and not hasattr(model, "get_output_embeddings"):
        model = model.module
    return model


def _output_layer(model: torch.nn.Module) -> torch.nn.Module:
    inner = _unwrapped(model)
    layer = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if layer is None:
        raise FusedUnsupported(f"{type(inner).__name__} exposes no output layer (get_output_embeddings() is None)")
    if hasattr(layer, "base_layer") or hasattr(layer, "lora_A"):
        raise FusedUnsupported("the lm_head carries a LoRA adapter; fused divergences need a plain lm_head "
                               "(drop lm_head from the LoRA target modules, or use the unfused loss)")
    if not isinstance(layer, torch.nn.Linear):
        raise FusedUnsupported(f"the output layer is a {type(layer).__name__}, not a plain linear layer "
                               "(quantised, adapter-wrapped or custom heads use the unfused loss)")
    return layer


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def lm_head_of(model: torch.nn.Module) -> LMHead:
    """The output layer of a Hugging Face causal LM (DDP / PEFT wrappers allowed) as an :class:`LMHead`.

    Reads the post-processing the model's forward applies to the head's output from its config:
    ``final_logit_softcapping`` (Gemma 2/3), ``logit_scale`` (Cohere) and ``logits_scaling``
    (Granite, a divisor). Anything else a model does to its logits is not known here;
    :func:`check_fused` finds out. Raises :class:`FusedUnsupported` for a LoRA-adapted,
    quantised or otherwise non-linear output layer.
    """
    layer = _output_layer(model)
    inner = _unwrapped(model)
    config = getattr(inner, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    scale = 1.0
    logit_scale = _number(getattr(inner, "logit_scale", None))
    if logit_scale is None and text is not None:
        logit_scale = _number(getattr(text, "logit_scale", None))
    if logit_scale is not None:
        scale *= logit_scale
    divisor = _number(getattr(text, "logits_scaling", None)) if text is not None else None
    if divisor:
        scale /= divisor
    softcap = _number(getattr(text, "final_logit_softcapping", None)) if text is not None else None
    return LMHead(layer.weight, layer.bias, scale=scale, softcap=softcap or None)


@contextlib.contextmanager
def _capture_head_input(layer: torch.nn.Module, sink: dict[str, Any]) -> Iterator[None]:
    """Within the block, ``layer`` hands back zero-width "logits" and records its input instead.

    The zero-width output keeps whatever the model does after the head (soft-capping, scaling,
    a float cast) a no-op on nothing, and it stays connected to the hidden states and the head
    weight, so a DDP wrapper that searches the outputs for used parameters still finds them all.
    """

    def passthrough(hidden: torch.Tensor) -> torch.Tensor:
        device_type = hidden.device.type
        sink["hidden"] = hidden
        # The weight as the forward sees it: under FSDP2 the unsharded tensor of this forward, not the
        # sharded parameter outside it (its gradient then reaches FSDP's reduce-scatter as usual).
        sink["weight"], sink["bias"] = layer.weight, layer.bias
        sink["autocast"] = (torch.get_autocast_dtype(device_type)
                            if torch.is_autocast_enabled(device_type) else None)
        return hidden[..., :0] + layer.weight[:0].sum().to(hidden.dtype)

    had_own = "forward" in layer.__dict__
    previous = layer.__dict__.get("forward")
    layer.forward = passthrough  # an instance attribute shadows the class's forward for this call only
    try:
        yield
    finally:
        if had_own:
            layer.forward = previous
        else:
            del layer.forward


def completion_hidden(
    model: torch.nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    completion_len: int,
) -> HiddenLogits:
    """Final hidden states at the positions predicting the last ``completion_len`` tokens, with the head.

    The same positions, position ids and ``logits_to_keep`` as :func:`opd.models.completion_logits`
    (call it where that is called, inside the same autocast / no_grad context); the returned
    :class:`HiddenLogits` has ``shape == completion_logits(...).shape``. The model is called as a
    whole (its wrapper's forward runs), with its output layer returning nothing for this call.
    """
    layer = _output_layer(model)
    head = lm_head_of(model)
    inputs_BT = input_ids_BT[:, :-1]
    mask_BT = attention_mask_BT[:, :-1]
    position_ids_BT = (mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    sink: dict[str, Any] = {}
    with _capture_head_input(layer, sink):
        model(input_ids=inputs_BT, attention_mask=mask_BT, position_ids=position_ids_BT,
              logits_to_keep=completion_len, use_cache=False)
    if "hidden" not in sink:
        raise FusedUnsupported(f"{type(_unwrapped(model)).__name__}'s forward never called its output layer")
    hidden_BCH = sink["hidden"]
    if hidden_BCH.shape[1] != completion_len:
        # Models that ignore logits_to_keep hand the head every position; keep the last ones.
        hidden_BCH = hidden_BCH[:, -completion_len:]
    compute = sink["autocast"] or torch.promote_types(hidden_BCH.dtype, sink["weight"].dtype)
    return HiddenLogits(hidden_BCH, dataclasses.replace(head, weight_VH=sink["weight"], bias_V=sink["bias"],
                                                        compute_dtype=compute))


@torch.no_grad()
def check_fused(model: torch.nn.Module, *, rtol: float | None = None) -> None:
    """Compare :func:`completion_hidden` + :class:`LMHead` with the model's own logits on a short input.

    Raises :class:`FusedUnsupported` with one line when they differ (a head post-processing this
    module does not know, a forward that skips its output layer) or the head cannot be fused.
    Runs two forward passes of a 2 x 8 batch in eval mode; call it once before training.
    """
    from opd.models import completion_logits

    layer = _output_layer(model)
    device = layer.weight.device
    rows = layer.weight.shape[0]
    ids_BT = (torch.arange(16, device=device).reshape(2, 8) * 7 + 3) % max(rows - 1, 1) + 1
    mask_BT = torch.ones_like(ids_BT)
    mask_BT[1, :2] = 0  # one left-padded row, as rollouts have
    was_training = model.training
    model.eval()
    try:
        reference = completion_logits(model, ids_BT, mask_BT, 4).float()
        fused = completion_hidden(model, ids_BT, mask_BT, 4).logits().float()
    finally:
        model.train(was_training)
    if reference.shape != fused.shape:
        raise FusedUnsupported(f"hidden-state logits have shape {tuple(fused.shape)}, "
                               f"the model's {tuple(reference.shape)}")
    if rtol is None:
        low = torch.bfloat16 in (layer.weight.dtype, fused.dtype) or torch.float16 == layer.weight.dtype
        rtol = 3e-2 if low else 1e-4
    error = (reference - fused).abs().max().item()
    size = reference.abs().max().item()
    if not error <= rtol * max(size, 1.0):
        raise FusedUnsupported(f"{type(_unwrapped(model)).__name__}: logits rebuilt from hidden states differ from the "
                               f"model's by {error:.3g} (scale {size:.3g}); its forward post-processes logits in a way "
                               "opd.fused does not know, so use the unfused loss")
