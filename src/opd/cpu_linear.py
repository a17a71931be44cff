"""Linear layers on oneDNN for CPU runs.

PyTorch sends CPU float32 matmuls to the BLAS it was built with, MKL in the x86 wheels, and only
bf16/fp16 ones to oneDNN. On AMD CPUs MKL's sgemm does not take its AVX-512 path: on the 2-core
AMD EPYC machine this project is developed on, ``F.linear`` in float32 runs at about half the speed
of the same product on oneDNN. For the layer shapes of SmolLM2-135M, oneDNN takes 0.46-0.53x the time
forward and 0.5-0.9x backward. The gap is widest in decoding: 8 rows against 49,152 x 576 take
13.4 ms with ``F.linear`` and 2.4 ms with oneDNN's prepacked weights, and 3.4 against 1.2 ms in
bf16. The results are float32 products with a different summation order, the same to ~1e-6
relative.

:class:`OneDNNLinear` is an ``nn.Linear`` whose forward sends CPU float32 products to oneDNN's
``mkldnn._linear_pointwise`` (the kernel Inductor uses) through an autograd function. The
backward products run there too. Autocast regions, other dtypes and other devices keep
``F.linear``; bf16 under autocast is already oneDNN. :func:`packed_for_decoding` reorders the
weights into oneDNN's blocked layout once per rollout. This is what makes small-batch decoding
fast, in float32 and in bf16.

``train.cpu_linear: torch`` (or ``OPD_CPU_LINEAR=torch``) keeps plain ``nn.Linear``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

_ok: bool | None = None
# Below this many weight elements a layer stays on F.linear: oneDNN's per-call cost (~10 us) is more
# than it saves on a 64 x 32 layer, and more than half of it already on 20 x 32 (measured; the
# SmolLM2-135M layers start at 576 x 192).
MIN_WEIGHT_ELEMENTS = 1 << 16


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def available() -> bool:
    """oneDNN's linear kernel exists in this torch build and agrees with ``F.linear`` (checked once).

    x86-64 only: that is where it was measured against MKL; elsewhere (ARM builds route oneDNN
    through other libraries) the layers stay on ``F.linear``."""
    global _ok
    if _ok is None:
        _ok = False
        if (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            try:
                gen = torch.Generator().manual_seed(0)
                x, w, b = (torch.randn(*s, generator=gen) for s in ((5, 7), (3, 7), (3,)))
                _ok = bool(torch.allclose(_pointwise(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5))
            except (RuntimeError, NotImplementedError):
                _ok = False
    return _ok


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x W^T + b with all three products (forward, input and weight gradients) on oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _pointwise(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # dL/dx = g W: a linear with "weight" W^T (a strided view; oneDNN reads it as is)
            grad_x = _pointwise(grad_2d, weight.t(), None).view(x.shape)
        if ctx.needs_input_grad[1]:
            # dL/dW = g^T x: a linear of g^T with "weight" x^T
            grad_w = _pointwise(grad_2d.t(), x.reshape(-1, x.shape[-1]).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: tuple[torch.dtype, torch.Tensor, torch.Tensor | None, int] | None = None) -> torch.Tensor:
    """``F.linear``, on oneDNN where that is faster: CPU float32 outside autocast, and prepacked
    weights (``packed`` = (dtype, weight, bias, weight version)) in no-grad calls of that dtype.
    The autograd function is first-order only (``create_graph=True`` is refused)."""
    if x.device.type != "cpu" or weight.numel() < MIN_WEIGHT_ELEMENTS or not available():
        return F.linear(x, weight, bias)
    autocast = torch.is_autocast_enabled("cpu")
    if packed is not None and not torch.is_grad_enabled():
        dtype, packed_weight, packed_bias, version = packed
        # Only for the dtype the call would compute in anyway, and only while the weights are the
        # ones that were packed (an in-place update bumps the version counter).
        if version == weight._version and (dtype == torch.get_autocast_dtype("cpu") if autocast
                                           else dtype == weight.dtype == x.dtype):
            return _pointwise(x.to(dtype), packed_weight, packed_bias)
    if autocast or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.numel() == 0:
        return F.linear(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_grad:
        return _OneDNNLinearFunction.apply(x, weight, bias)
    return _pointwise(x, weight, bias)


class OneDNNLinear(torch.nn.Linear):
    """An ``nn.Linear`` computed by :func:`linear` (same parameters, same state dict)."""

    _opd_packed: tuple[torch.dtype, torch.Tensor, torch.Tensor | None, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self._opd_packed)


def use_onednn(model: torch.nn.Module, mode: str = "onednn") -> int:
    """Turn the plain ``nn.Linear`` layers of ``model`` into :class:`OneDNNLinear` (in place);
    returns how many. ``mode`` ``torch`` (or ``OPD_CPU_LINEAR=torch``) leaves the model alone."""
    if mode == "torch" or os.environ.get("OPD_CPU_LINEAR") == "torch":
        return 0
    if not available():
        if platform.machine().lower() in ("x86_64", "amd64"):  # elsewhere it is expected, not news
            warnings.warn("oneDNN's linear kernel is not usable in this torch build; CPU linear layers stay on "
                          "F.linear", stacklevel=2)
        return 0
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = OneDNNLinear
            count += 1
    return count


@contextlib.contextmanager
def packed_for_decoding(model: torch.nn.Module, rows: int) -> Iterator[None]:
    """Within the block, no-grad calls of ``model``'s oneDNN linears use weights reordered once into
    oneDNN's blocked layout for ``rows``-row inputs, in the dtype they compute in: the autocast
    dtype when autocast is on, else the weights' own.

    The copies (one set of linear weights in that dtype) live only as long as the block. For a
    student in a training step they exist while its gradients are None, so the step's peak memory
    does not rise; for a frozen model (a teacher, LoRA base weights) they are extra memory while
    it decodes. A weight changed in place inside the block is noticed (version counter) and served
    unpacked. Modules already packed by an enclosing block keep that block's copies. Packed
    weights are opaque oneDNN tensors: ``state_dict`` is unaffected, but do not ``deepcopy`` or
    ``torch.save`` a whole model inside the block."""
    modules = [m for m in model.modules() if isinstance(m, OneDNNLinear) and m.weight.device.type == "cpu"
               and m.weight.numel() >= MIN_WEIGHT_ELEMENTS]
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    packed: list[OneDNNLinear] = []
    try:
        if available():
            with torch.no_grad():
                for module in modules:
                    own = dtype or module.weight.dtype
                    if own not in (torch.float32, torch.bfloat16) or "_opd_packed" in module.__dict__:
                        continue
                    weight = module.weight.detach().to(own)
                    module._opd_packed = (
                        own, torch.ops.mkldnn._reorder_linear_weight(weight, max(rows, 1)),
                        None if module.bias is None else module.bias.detach().to(own), module.weight._version)
                    packed.append(module)
        yield
    finally:
        for module in packed:
            module.__dict__.pop("_opd_packed", None)  # back to the class default (None)
