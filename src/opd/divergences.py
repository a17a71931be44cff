"""The f-divergence family between teacher and student next-token distributions.

Every divergence here compares, at each position, the teacher distribution
``p = softmax(teacher_logits / temperature)`` with the student distribution
``q = softmax(student_logits / temperature)``:

==================  =====================================================  ==================
kind                value per position                                      paper
==================  =====================================================  ==================
forward_kl          KL(p || q) = sum_v p (log p - log q)                     Hinton et al. 2015
reverse_kl          KL(q || p) = sum_v q (log q - log p)                     MiniLLM 2306.08543
jsd                 [b KL(p||m) + (1-b) KL(q||m)] / (b (1-b)), m = b p + (1-b) q  GKD 2306.13649
tv                  1/2 sum_v |p - q|
skew_forward_kl     KL(p || a p + (1-a) q)                                   DistiLLM 2402.03898
skew_reverse_kl     KL(q || (1-a) p + a q)                                   DistiLLM 2402.03898
==================  =====================================================  ==================

**JSD(beta) convention.** The mixture ``m = beta p + (1 - beta) q`` and the weights
follow GKD (arXiv 2306.13649, Sec. 3) and TRL's ``generalized_jsd_loss``. The raw
GKD value goes to 0 at both ends of beta, so implementations that special-case
beta in {0, 1} jump from ~0 to a full KL there. opd divides by ``beta (1 - beta)``:
the result tends to KL(p || q) as beta -> 0 and to KL(q || p) as beta -> 1
(first-order expansion of the mixture), so ``jsd`` is continuous on [0, 1] and
equals forward / reverse KL exactly at the endpoints. Multiply by
``beta * (1 - beta)`` to get GKD's / TRL's raw value for beta in (0, 1).

**Temperature.** One temperature divides both sets of logits here; the rollout
engine samples the student with the same value (``temperature`` in the run
config), so the distribution the loss matches is the one that wrote the tokens.
No ``temperature**2`` factor is applied.

**Gradients.** Only the student receives a gradient; the teacher side is treated as
a constant (teachers are frozen, and a self-teacher is detached by design).

**Memory.** Positions are processed in chunks of ``chunk_size`` rows (by default sized
so one fp32 ``[chunk, V]`` tensor is ~64 MB): only one chunk's fp32 workspace is alive
at a time. Either side may instead be an :class:`opd.fused.HiddenLogits` (final hidden states and the
output layer): each chunk's logits are then formed inside the loop and no ``[N, V]`` tensor exists
at all, in forward or backward (see "Hidden states" below). The gradient with
respect to the student logits is computed in the same pass (closed form, below)
and written straight into a buffer of the logits' own dtype, so the backward pass
is a single scaled copy and nothing is recomputed. Masked positions are never read.

**Speed.** Each chunk's math (both log-softmaxes, the divergence, its centred gradient) is one
function, :func:`_chunk_value_grad`. For chunks of at least ``FUSED_MIN_ELEMENTS`` logits it runs
through ``torch.compile``, which fuses the ~10 eager passes over the ``[chunk, V]`` block into a
few loops (C++/OpenMP on CPU, Triton on GPU): 3-8x faster than TRL's ``generalized_jsd_loss`` on
2 CPU cores (``benchmarks/loss.py``). The first call per (kind, beta, alpha, temperature) compiles
for ~2 s; ``OPD_FUSED_LOSS=0`` keeps everything eager, and if compiling fails the eager code runs
with a warning.

Closed-form gradient used for all kinds: if ``D`` depends on ``q`` and
``g = dD/dq``, then ``dD/dz = (q * g - q * <q, g>) / temperature`` for student
logits ``z``. Each kind below returns ``q * g`` (up to a multiple of ``q``, which the
centring removes).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from opd.fused import HiddenLogits, LMHead

KINDS = ("forward_kl", "reverse_kl", "jsd", "tv", "skew_forward_kl", "skew_reverse_kl")
# Auto chunking targets about this many fp32 elements per [chunk, V] workspace tensor
# (64 MB): 110 positions at V = 152k, 1,365 at V = 49k.
CHUNK_ELEMENTS = 1 << 24


def auto_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one fp32 ``[chunk, V]`` tensor is about 64 MB."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


class _Terms(NamedTuple):
    value_N: torch.Tensor
    weighted_grad_NV: torch.Tensor | None  # q * dD/dq (a buffer the caller may overwrite), or None
    q_NV: torch.Tensor | None = None  # the student probabilities, when the term already computed them
    centred: bool = False  # weighted_grad_NV is already q g - q <q, g> (skip the generic centring)


def _row_dot(a_NV: torch.Tensor, b_NV: torch.Tensor) -> torch.Tensor:
    """sum_v a[n, v] b[n, v] without materialising the product."""
    return torch.einsum("nv,nv->n", a_NV, b_NV)


# Each term function takes student / teacher log-probs [N, V] (fp32) and returns the
# per-row divergence and, when asked, q * dD/dq. It may overwrite ``t`` (the caller no
# longer needs it) but not ``s``.
TermFn = Callable[[torch.Tensor, torch.Tensor, float, float, bool], _Terms]


def _forward_kl(s: torch.Tensor, t: torch.Tensor, beta: float, alpha: float, grad: bool) -> _Terms:
    p = t.exp()
    value = _row_dot(p, t.sub_(s))
    if not grad:
        return _Terms(value, None)
    # q g = -p sums to -1 per row, so the centred gradient is simply q - p (built in t's buffer).
    return _Terms(value, torch.exp(s, out=t).sub_(p), centred=True)


def _reverse_kl(s: torch.Tensor, t: torch.Tensor, beta: float, alpha: float, grad: bool) -> _Terms:
    q = s.exp()
    q_log_ratio = t.sub_(s).neg_().mul_(q)  # q (log q - log p), in t's buffer
    return _Terms(q_log_ratio.sum(-1), q_log_ratio if grad else None, q)


def _log_mixture(a: torch.Tensor, b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * exp(a) + (1 - weight_a) * exp(b)), exact at weight_a in {0, 1}."""
    if weight_a <= 0.0:
        return b
    if weight_a >= 1.0:
        return a
    return torch.logaddexp(a + math.log(weight_a), b + math.log1p(-weight_a))


def _jsd(s: torch.Tensor, t: torch.Tensor, beta: float, alpha: float, grad: bool) -> _Terms:
    if beta <= 0.0:
        return _forward_kl(s, t, beta, alpha, grad)
    if beta >= 1.0:
        return _reverse_kl(s, t, beta, alpha, grad)
    # With d = log p - log q and m = beta p + (1 - beta) q:
    #   log q - log m = -log(beta e^d + 1 - beta) = -logaddexp(d + log beta, log(1 - beta)),
    # one fused, cancellation-free op. The other ratio follows as log p - log m = d + (log q - log m);
    # evaluating each from the side whose weight is small keeps full precision at both ends of
    # beta, which is what makes the normalised JSD smooth there.
    d = t - s
    if beta <= 0.5:
        student_vs_m = -torch.logaddexp(d + math.log(beta), d.new_tensor(math.log1p(-beta)))
        teacher_vs_m = d + student_vs_m
    else:
        teacher_vs_m = -torch.logaddexp(math.log1p(-beta) - d, d.new_tensor(math.log(beta)))
        student_vs_m = teacher_vs_m - d
    q_log_ratio = s.exp() * student_vs_m
    raw = beta * (t.exp() * teacher_vs_m).sum(-1) + (1.0 - beta) * q_log_ratio.sum(-1)
    value = raw / (beta * (1.0 - beta))
    # d raw / dq = (1 - beta) (log q - log m); divided by beta (1 - beta).
    return _Terms(value, q_log_ratio / beta if grad else None)


def _tv(s: torch.Tensor, t: torch.Tensor, beta: float, alpha: float, grad: bool) -> _Terms:
    q = s.exp()
    diff = q - t.exp()
    value = 0.5 * diff.abs().sum(-1)
    return _Terms(value, 0.5 * q * diff.sign() if grad else None)


def _skew_forward_kl(s: torch.Tensor, t: torch.Tensor, beta: float, alpha: float, grad: bool) -> _Terms:
    log_m = _log_mixture(t, s, alpha)
    value = (t.exp() * (t - log_m)).sum(-1)
    if not grad:
        return _Terms(value, None)
    # dD/dq = -(1 - alpha) p / m; q p / m evaluated in log space so it never divides 0 by 0.
    return _Terms(value, -(1.0 - alpha) * (s + t - log_m).exp())


def _skew_reverse_kl(s: torch.Tensor, t: torch.Tensor, beta: float, alpha: float, grad: bool) -> _Terms:
    log_m = _log_mixture(s, t, alpha)
    q = s.exp()
    q_log_ratio = q * (s - log_m)
    if not grad:
        return _Terms(q_log_ratio.sum(-1), None)
    # dD/dq = log q - log m + 1 - alpha q / m; the constant 1 is removed by centring.
    return _Terms(q_log_ratio.sum(-1), q_log_ratio - alpha * (2.0 * s - log_m).exp())


REGISTRY: dict[str, TermFn] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "tv": _tv,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
}


def _check_params(kind: str, beta: float, alpha: float, temperature: float) -> None:
    if kind not in REGISTRY:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(KINDS)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _log_softmax(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    if temperature == 1.0:
        return torch.log_softmax(logits, dim=-1, dtype=dtype)  # casts without an extra copy
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


def _chunk_value_grad(
    student_CV: torch.Tensor,
    teacher_CV: torch.Tensor,
    kind: str,
    beta: float,
    alpha: float,
    temperature: float,
    need_grad: bool,
    work_dtype: torch.dtype,
    grad_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: per-row divergence and (when asked) its gradient w.r.t. the student logits."""
    s = _log_softmax(student_CV, temperature, work_dtype)
    t = _log_softmax(teacher_CV, temperature, work_dtype)
    terms = REGISTRY[kind](s, t, beta, alpha, need_grad)
    if not need_grad:
        return terms.value_N, None
    # dD/dz = (q g - q <q, g>) / T, built in place in the term's own buffer.
    qg = terms.weighted_grad_NV
    if not terms.centred:
        centre = qg.sum(-1, keepdim=True)
        q = terms.q_NV if terms.q_NV is not None else s.exp_()  # s is not needed any more
        qg.sub_(q.mul_(centre))
    if temperature != 1.0:
        qg.div_(temperature)
    return terms.value_N, qg.to(grad_dtype)


# Fused chunks: torch.compile (Inductor: C++/OpenMP on CPU, Triton on GPU) turns the ~10 eager
# passes over each [chunk, V] block (two log-softmaxes, the term, the centring) into a few fused
# loops. It pays ~2 s of compilation per (kind, beta, alpha, temperature) in a process, so small
# problems stay eager.
FUSED_MIN_ELEMENTS = 1 << 22
FUSED_ENV = "OPD_FUSED_LOSS"  # auto (default) | 1 | 0
_fused_state: dict[str, object] = {}


def fused_available() -> bool:
    """Whether the compiled kernel can be used here (``OPD_FUSED_LOSS`` not 0, compiler working)."""
    if os.environ.get(FUSED_ENV, "auto").strip().lower() in ("0", "off", "false", "no"):
        return False
    return "broken" not in _fused_state


def _compiled_chunk(*args: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    compiled = _fused_state.get("fn")
    if compiled is None:
        # Rows vary between chunks (masking, the last chunk): one dynamic-shape graph serves all.
        compiled = _fused_state["fn"] = torch.compile(_chunk_value_grad, dynamic=True)
    # Each (kind, beta, alpha, temperature, grad) pair is a separate graph of the one function;
    # the default limit of 8 would silently drop later ones back to eager.
    with torch._dynamo.config.patch(recompile_limit=64):
        return compiled(*args)  # type: ignore[operator]


def _fused_kernel(fused: bool | None, chunk_elements: int, work_dtype: torch.dtype,
                  device: torch.device) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The chunk kernel to use: compiled when asked for, or when worth it and available."""
    if fused is False or torch.compiler.is_compiling():
        return _chunk_value_grad
    if fused is None and (not fused_available() or chunk_elements < FUSED_MIN_ELEMENTS
                          or work_dtype == torch.float64 or device.type not in ("cpu", "cuda")):
        return _chunk_value_grad
    if fused is None:
        return _guarded_fused
    return _compiled_chunk


def _guarded_fused(*args: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Auto mode: the compiled kernel, falling back to eager for the process if compiling fails."""
    if "broken" in _fused_state:
        return _chunk_value_grad(*args)  # type: ignore[arg-type]
    try:
        return _compiled_chunk(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure (no C++ compiler, Triton missing, ...)
        _fused_state["broken"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"opd: the fused divergence kernel could not be compiled ({_fused_state['broken']}); "
                      f"using the eager one (set {FUSED_ENV}=0 to skip the attempt)", RuntimeWarning, stacklevel=2)
        return _chunk_value_grad(*args)  # type: ignore[arg-type]


class _ChunkedDivergence(torch.autograd.Function):
    """Per-row divergence over rows ``rows_R`` of flattened logits, chunk by chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student_NV: torch.Tensor,
        teacher_rows: Callable[[slice | torch.Tensor], torch.Tensor],
        rows_R: torch.Tensor,
        kind: str,
        beta: float,
        alpha: float,
        temperature: float,
        chunk_size: int,
        inplace_backward: bool,
        vocab_size: int,
        fused: bool | None,
    ) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        # fp32 workspace (fp64 when the caller passes fp64, e.g. gradient checks).
        work_dtype = torch.promote_types(student_NV.dtype, torch.float32)
        grad_dtype = student_NV.dtype
        n_rows, full_vocab = student_NV.shape
        kernel = _fused_kernel(fused, min(chunk_size, rows_R.numel()) * vocab_size, work_dtype, student_NV.device)
        values_N = torch.zeros(n_rows, dtype=work_dtype, device=student_NV.device)
        grad_NV = None
        if need_grad:
            covers_all = rows_R.numel() == n_rows and vocab_size == full_vocab
            grad_NV = torch.empty_like(student_NV) if covers_all else torch.zeros_like(student_NV)
        row_list = rows_R.tolist()  # chunk bounds on the host: no device sync per chunk
        for start in range(0, len(row_list), chunk_size):
            first, last = row_list[start], row_list[min(start + chunk_size, len(row_list)) - 1]
            count = min(chunk_size, len(row_list) - start)
            # Unmasked runs are sliced (a view); only masked chunks pay for a gather.
            if last - first + 1 == count:
                index: slice | torch.Tensor = slice(first, last + 1)
            else:
                index = rows_R[start : start + count]
            value_C, grad_CV = kernel(
                student_NV[index, :vocab_size], teacher_rows(index), kind, beta, alpha, temperature,
                need_grad, work_dtype, grad_dtype,
            )
            values_N[index] = value_C
            if grad_NV is not None:
                grad_NV[index, :vocab_size] = grad_CV
            del value_C, grad_CV
        # Kept on ctx rather than save_for_backward: backward scales it in place, which the
        # saved-tensor version check would (rightly) reject.
        ctx.grad_NV = grad_NV
        ctx.inplace_backward = inplace_backward
        ctx.consumed = False
        return values_N

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_values_N: torch.Tensor):  # type: ignore[override]
        # Checked before anything else: once the buffer was consumed ctx.grad_NV is None, which
        # must not pass for "no gradient needed" (that silently returned no gradient).
        if ctx.consumed:
            raise RuntimeError("per_token(..., inplace_backward=True) supports one backward pass; "
                               "pass inplace_backward=False to backpropagate through it twice")
        grad_NV = ctx.grad_NV
        none = (None,) * 10
        if grad_NV is None:
            return (None,) + none
        scale = grad_values_N.to(grad_NV.dtype).unsqueeze(-1)
        if not ctx.inplace_backward:
            return (grad_NV * scale,) + none
        # The buffer belongs to this node alone, so scaling it in place saves a [N, V] copy.
        ctx.consumed = True
        ctx.grad_NV = None
        return (grad_NV.mul_(scale),) + none


# --- Hidden states: the output layer fused with the loss ----------------------------------------
#
# Any public function below takes, for the student and for the teacher, either a ``[..., V]`` logits
# tensor or an :class:`opd.fused.HiddenLogits` (final hidden states ``[..., H]`` and the output layer).
# With hidden states each chunk's logits ``softcap(scale * (h W^T + b))`` are formed inside the loop,
# used and dropped, so neither side ever holds more than one ``[chunk, V]`` block (the approach of
# Liger-Kernel's fused linear cross-entropy / JSD, arXiv 2410.10989, here for every divergence, the
# top-k supports, sampled-token log-probs, entropies and the teacher's top-k). The student's gradient
# w.r.t. the chunk logits (the closed forms above) is turned into gradients w.r.t. the hidden states
# (``g W``) and the head weight (``g^T h``, summed over chunks) and bias, returned as ordinary
# autograd gradients of those tensors.

Logits = torch.Tensor | HiddenLogits


class _Head:
    """An :class:`LMHead` prepared for one call: sliced to the vocabulary and cast once, not per chunk."""

    def __init__(self, head: LMHead, hidden: torch.Tensor, vocab: int) -> None:
        natural = torch.promote_types(hidden.dtype, head.weight_VH.dtype)
        dtype = head.compute_dtype
        self.device_type = hidden.device.type
        if dtype is None:
            # What F.linear would run in here: the ambient autocast dtype, else the inputs'.
            dtype = natural
            if natural in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(
                    self.device_type):
                dtype = torch.get_autocast_dtype(self.device_type)
        self.dtype = dtype
        self.work = torch.promote_types(dtype, torch.float32)
        self.weight_VH = head.weight_VH.detach()[:vocab].to(dtype)
        self.bias_V = None if head.bias_V is None else head.bias_V.detach()[:vocab].to(dtype)
        self.scale, self.softcap = float(head.scale), head.softcap
        self.plain = self.scale == 1.0 and self.softcap is None

    def logits(self, hidden_cH: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """``[c, V]`` post-processed logits: in the work dtype (fp32, fp64 for fp64 inputs), or with
        ``upcast=False`` and a plain head in the compute dtype (for a kernel that upcasts as it reads)."""
        with torch.autocast(self.device_type, enabled=False):
            out = torch.nn.functional.linear(hidden_cH.detach().to(self.dtype), self.weight_VH, self.bias_V)
        if self.plain and not upcast:
            return out
        out = out.to(self.work)  # bf16 products are rounded like the unfused path's bf16 logits
        if self.scale != 1.0:
            out.mul_(self.scale)
        if self.softcap is not None:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    def raw_grad_(self, grad_cV: torch.Tensor, logits_cV: torch.Tensor) -> torch.Tensor:
        """dL/d(h W^T + b) from dL/dlogits, in place (``logits_cV`` is overwritten), in the compute dtype."""
        if self.plain:
            return grad_cV.to(self.dtype)
        if self.softcap is not None:
            # d/du c tanh(s u / c) = s (1 - tanh^2) = s (1 - (z / c)^2) with z the capped logits
            grad_cV.mul_(logits_cV.div_(self.softcap).square_().neg_().add_(1.0))
        if self.scale != 1.0:
            grad_cV.mul_(self.scale)
        return grad_cV.to(self.dtype)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, enabled=False):
            return torch.mm(a, b)


class _Grads:
    """Gradients of one call w.r.t. hidden rows, head weight and bias, accumulated chunk by chunk.

    The weight gradient is a sum over every row. When the products run in the weight's own dtype
    (fp32, or bf16 weights in pure-bf16 training) each chunk is added in place by the matrix
    product itself (``addmm_``, one rounding per chunk, as Liger's chunked losses do). Under
    autocast with fp32 weights the bf16 products go to one reused bf16 buffer that is flushed into
    the fp32 gradient every few chunks: no ``[V, H]`` temporary per chunk (on CPU every fresh
    buffer of that size costs its page faults), and the fp32 sum sees few bf16 roundings.
    """

    FLUSH_EVERY = 8

    def __init__(self, head: _Head, rows: int, hidden: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, needs: tuple[bool, bool, bool]) -> None:
        self.head = head
        self.hidden_RH = (torch.zeros((rows, hidden.shape[-1]), dtype=hidden.dtype, device=hidden.device)
                          if needs[0] else None)
        acc = weight.dtype if weight.dtype == head.dtype else torch.promote_types(weight.dtype, torch.float32)
        # Full height: padding rows past the vocabulary stay zero.
        self.weight_VH = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        self.partial_VH = (torch.zeros(head.weight_VH.shape, dtype=head.dtype, device=weight.device)
                           if needs[1] and acc != head.dtype else None)
        self.pending = 0
        self.bias_V = (torch.zeros(bias.shape, dtype=torch.promote_types(bias.dtype, torch.float32),
                                   device=bias.device) if needs[2] and bias is not None else None)

    def add(self, sl: slice, raw_grad_cV: torch.Tensor, hidden_cH: torch.Tensor, hidden_rows: bool = True) -> None:
        head, vocab = self.head, raw_grad_cV.shape[-1]
        if hidden_rows and self.hidden_RH is not None:
            self.hidden_RH[sl] = head.matmul(raw_grad_cV, head.weight_VH).to(self.hidden_RH.dtype)
        if self.weight_VH is not None:
            target = self.partial_VH if self.partial_VH is not None else self.weight_VH[:vocab]
            with torch.autocast(head.device_type, enabled=False):
                target.addmm_(raw_grad_cV.t(), hidden_cH.detach().to(head.dtype))
            self.pending += 1
            if self.partial_VH is not None and self.pending >= self.FLUSH_EVERY:
                self.flush()
        if self.bias_V is not None:
            self.bias_V[:vocab].add_(raw_grad_cV.sum(0, dtype=self.bias_V.dtype))

    def flush(self) -> None:
        """Move the bf16 partial sum into the weight gradient (a no-op without one)."""
        if self.partial_VH is not None and self.pending:
            self.weight_VH[: self.partial_VH.shape[0]].add_(self.partial_VH)
            self.partial_VH.zero_()
        self.pending = 0

    def done(self) -> _Grads:
        self.flush()
        self.partial_VH = None
        return self


class _HeadRows(torch.autograd.Function):
    """Per-row outputs of ``op`` on logits formed from hidden rows ``rows_R``, chunk by chunk.

    ``op.eager`` ops (the divergences: one value per row whose gradient w.r.t. the logits depends on
    the incoming gradient only through a per-row factor) compute their gradients in the forward pass,
    like Liger's fused losses, so backward is a scaling: exact per row for the hidden states, and for
    the weight and bias whenever the incoming gradient is the same on every row (a sum or a mean of
    the values); otherwise the weight and bias gradients are recomputed with the row weights. Other
    ops (log-probs of chosen tokens, whose incoming gradient is arbitrary) recompute the chunk logits
    in backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden_NH: torch.Tensor,
        weight_VH: torch.Tensor,
        bias_V: torch.Tensor | None,
        rows_R: torch.Tensor,
        op: Any,
        head_spec: LMHead,
        vocab: int,
        chunk: int,
        want_grad: bool,
        inplace_backward: bool,
    ) -> torch.Tensor:
        head = _Head(dataclasses.replace(head_spec, weight_VH=weight_VH, bias_V=bias_V), hidden_NH, vocab)
        needs = tuple(bool(want_grad and n) for n in ctx.needs_input_grad[:3])
        eager = op.eager and any(needs)
        hidden_RH = hidden_NH.index_select(0, rows_R)
        n_rows = rows_R.numel()
        out_RD = torch.zeros((n_rows, *op.out_shape), dtype=head.work, device=hidden_NH.device)
        grads = _Grads(head, n_rows, hidden_NH, weight_VH, bias_V, needs) if eager else None
        op.grad_dtype = head.dtype if head.plain else head.work  # a kernel may emit dL/dz ready for the products
        for sl in _chunk_slices(n_rows, chunk):
            logits_cV = head.logits(hidden_RH[sl], upcast=not op.low_precision_input)
            value_c, grad_cV = op.forward_chunk(logits_cV, sl, eager)
            out_RD[sl] = value_c
            if grads is not None:
                grads.add(sl, head.raw_grad_(grad_cV, logits_cV), hidden_RH[sl])
            del logits_cV, grad_cV
        if grads is not None:
            grads.done()
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V)
        ctx.rows_R, ctx.op, ctx.head_spec, ctx.vocab, ctx.chunk = rows_R, op, head_spec, vocab, chunk
        ctx.needs, ctx.grads, ctx.inplace, ctx.consumed = needs, grads, inplace_backward, False
        values = torch.zeros((hidden_NH.shape[0], *op.out_shape), dtype=head.work, device=hidden_NH.device)
        return values.index_copy_(0, rows_R, out_RD)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_ND: torch.Tensor):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError("a fused divergence supports one backward pass; pass inplace_backward=False "
                               "to backpropagate through it twice")
        hidden_NH, weight_VH, bias_V = ctx.saved_tensors
        needs, rows_R = ctx.needs, ctx.rows_R
        none = (None,) * 7
        if not any(needs):
            return (None, None, None) + none
        head = _Head(dataclasses.replace(ctx.head_spec, weight_VH=weight_VH, bias_V=bias_V), hidden_NH, ctx.vocab)
        grad_RD = grad_ND.index_select(0, rows_R).to(head.work)
        n_rows = rows_R.numel()
        hidden_RH = hidden_NH.index_select(0, rows_R)
        grads: _Grads | None = ctx.grads
        if grads is not None:
            # Gradients were computed in forward for an incoming gradient of 1 per row.
            if not ctx.inplace:
                grads = copy.copy(grads)
                for name in ("hidden_RH", "weight_VH", "bias_V"):
                    tensor = getattr(grads, name)
                    setattr(grads, name, None if tensor is None else tensor.clone())
            else:
                ctx.consumed, ctx.grads = True, None
            if grads.hidden_RH is not None:
                grads.hidden_RH.mul_(grad_RD[:, None].to(grads.hidden_RH.dtype))
            uniform = n_rows == 0 or bool((grad_RD == grad_RD[0]).all())
            if uniform:
                factor = grad_RD[0] if n_rows else 0.0
                for tensor in (grads.weight_VH, grads.bias_V):
                    if tensor is not None:
                        tensor.mul_(factor)
            else:  # row weights differ: the weight and bias gradients are sums over rows, redo them
                redo = _Grads(head, n_rows, hidden_NH, weight_VH, bias_V, (False, needs[1], needs[2]))
                _recompute(ctx.op, head, redo, hidden_RH, grad_RD, ctx.chunk, hidden_rows=False)
                grads.weight_VH, grads.bias_V = redo.weight_VH, redo.bias_V
        else:
            grads = _Grads(head, n_rows, hidden_NH, weight_VH, bias_V, needs)
            _recompute(ctx.op, head, grads, hidden_RH, grad_RD, ctx.chunk, hidden_rows=True)
        grad_hidden = grad_weight = grad_bias = None
        if needs[0]:
            grad_hidden = torch.zeros_like(hidden_NH).index_copy_(0, rows_R, grads.hidden_RH)
        if needs[1]:
            grad_weight = grads.weight_VH.to(weight_VH.dtype)
        if needs[2] and bias_V is not None:
            grad_bias = grads.bias_V.to(bias_V.dtype)
        return (grad_hidden, grad_weight, grad_bias) + none


def _chunk_slices(rows: int, chunk: int) -> list[slice]:
    """``ceil(rows / chunk)`` slices of near-equal size (at most ``chunk``): no 1-row tail, on which
    the compiled kernel would specialise and recompile (sizes 0 and 1 are never symbolic)."""
    count = -(-rows // chunk)
    if count == 0:
        return []
    bounds = [rows * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _recompute(op: Any, head: _Head, grads: _Grads, hidden_RH: torch.Tensor, grad_RD: torch.Tensor, chunk: int,
               hidden_rows: bool) -> None:
    for sl in _chunk_slices(hidden_RH.shape[0], chunk):
        logits_cV = head.logits(hidden_RH[sl], upcast=not op.low_precision_input)
        grad_cV = op.backward_chunk(logits_cV, sl, grad_RD[sl])
        grads.add(sl, head.raw_grad_(grad_cV, logits_cV), hidden_RH[sl], hidden_rows=hidden_rows)
        del logits_cV, grad_cV
    grads.done()


class _DivergenceOp:
    """Per-row divergence against teacher rows (a tensor's rows or a teacher head's chunk logits)."""

    eager = True
    low_precision_input = True  # the kernel upcasts bf16 logits as it reads them: no fp32 copy first
    out_shape: tuple[int, ...] = ()

    def __init__(self, teacher_rows: Callable[[slice], torch.Tensor], kind: str, beta: float, alpha: float,
                 temperature: float, kernel: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
                 work: torch.dtype) -> None:
        self.teacher_rows, self.kernel, self.work = teacher_rows, kernel, work
        self.params = (kind, beta, alpha, temperature)
        self.grad_dtype = work

    def forward_chunk(self, logits_cV: torch.Tensor, sl: slice, need_grad: bool):
        return self.kernel(logits_cV, self.teacher_rows(sl), *self.params, need_grad, self.work, self.grad_dtype)

    def backward_chunk(self, logits_cV: torch.Tensor, sl: slice, grad_c: torch.Tensor) -> torch.Tensor:
        # Row weights applied in the work dtype, before any rounding to the compute dtype.
        _, grad_cV = self.kernel(logits_cV, self.teacher_rows(sl), *self.params, True, self.work, self.work)
        return grad_cV.mul_(grad_c[:, None])


class _GatherOp:
    """``log softmax(z / T)`` at ``ids`` (``gather``) and/or the log-mass outside them (``tail``),
    as ``[R, K + 1]`` columns; the tail as in :class:`_TailLogprob` (log-sum-exp of the other
    columns, floored at 1e-20 with no gradient there)."""

    eager = False
    low_precision_input = False

    def __init__(self, ids_RK: torch.Tensor, temperature: float, gather: bool, tail: bool) -> None:
        self.ids_RK, self.temperature, self.gather, self.tail = ids_RK, temperature, gather, tail
        self.out_shape = ((ids_RK.shape[-1] if gather else 0) + (1 if tail else 0),)
        rows = ids_RK.shape[0]
        self.lse_R = torch.empty(rows, dtype=torch.float64, device=ids_RK.device)
        self.tail_lse_R = torch.empty_like(self.lse_R)
        self.floored_R = torch.zeros(rows, dtype=torch.bool, device=ids_RK.device)

    def forward_chunk(self, logits_cV: torch.Tensor, sl: slice, need_grad: bool):
        scaled = logits_cV.div_(self.temperature) if self.temperature != 1.0 else logits_cV
        ids = self.ids_RK[sl]
        lse_c = torch.logsumexp(scaled, dim=-1)
        self.lse_R[sl] = lse_c
        parts = []
        if self.gather:
            parts.append(scaled.gather(-1, ids) - lse_c[:, None])
        if self.tail:
            tail_lse_c = torch.logsumexp(scaled.scatter(-1, ids, -math.inf), dim=-1)
            out_c = tail_lse_c - lse_c
            floored_c = ~(out_c > _TAIL_LOG_FLOOR)  # also an empty tail (-inf)
            self.floored_R[sl] = floored_c
            self.tail_lse_R[sl] = torch.where(floored_c, lse_c, tail_lse_c)
            parts.append(out_c.masked_fill(floored_c, _TAIL_LOG_FLOOR)[:, None])
        return torch.cat(parts, dim=-1), None

    def backward_chunk(self, logits_cV: torch.Tensor, sl: slice, grad_cD: torch.Tensor) -> torch.Tensor:
        temperature, ids = self.temperature, self.ids_RK[sl]
        scaled = logits_cV / temperature  # not in place: the caller still needs the logits
        work = scaled.dtype
        lse_c, tail_lse_c = self.lse_R[sl].to(work), self.tail_lse_R[sl].to(work)
        k = ids.shape[-1] if self.gather else 0
        grad_K = grad_cD[:, :k]
        grad_tail = (grad_cD[:, k].masked_fill(self.floored_R[sl], 0.0) if self.tail
                     else grad_cD.new_zeros(grad_cD.shape[0]))
        # d log q(y_k) / ds = onehot(y_k) - q;  d log tail / ds = 1[v outside] q / tail - q
        out = (scaled - lse_c[:, None]).exp_().mul_(-(grad_K.sum(-1) + grad_tail)[:, None])
        if self.gather:
            out.scatter_add_(-1, ids, grad_K)
        if self.tail:
            outside = (scaled - tail_lse_c[:, None]).exp_().scatter_(-1, ids, 0.0)
            out.add_(outside.mul_(grad_tail[:, None]))
        return out.div_(temperature) if temperature != 1.0 else out


def _flat_hidden(x: HiddenLogits) -> torch.Tensor:
    return x.hidden_BCH.reshape(-1, x.hidden_BCH.shape[-1])


def _head_rows(x: HiddenLogits, rows_R: torch.Tensor, op: Any, vocab: int, chunk: int,
               inplace_backward: bool = True) -> torch.Tensor:
    """Run ``op`` over rows ``rows_R`` of ``x``; ``[N, *op.out_shape]`` (zeros outside the rows)."""
    head = x.head
    return _HeadRows.apply(_flat_hidden(x), head.weight_VH, head.bias_V, rows_R, op, head, int(vocab), int(chunk),
                           torch.is_grad_enabled(), bool(inplace_backward))


def _rows_of(x: Logits, vocab: int, rows_R: torch.Tensor | None = None,
             device: torch.device | None = None) -> Callable[[Any], torch.Tensor]:
    """``index -> [c, vocab]`` logits of x's flattened rows (compacted to ``rows_R`` when given), no grad.

    A teacher on another device than the student forms its chunks where its head lives and hands
    each chunk over (``device``), so neither its hidden states nor its head are copied whole."""
    if isinstance(x, HiddenLogits):
        hidden_NH = _flat_hidden(x).detach()
        if rows_R is not None:
            hidden_NH = hidden_NH.index_select(0, rows_R.to(hidden_NH.device))
        head = _Head(x.head, hidden_NH, vocab)
        if device is not None and torch.device(device) != hidden_NH.device:
            return lambda index: head.logits(hidden_NH[index], upcast=False).to(device)
        return lambda index: head.logits(hidden_NH[index], upcast=False)  # readers upcast chunk by chunk
    flat_NV = x.detach().reshape(-1, x.shape[-1])
    if rows_R is not None:
        return lambda index: flat_NV[rows_R[index], :vocab]
    return lambda index: flat_NV[index, :vocab]


def connected_zero(x: Logits) -> torch.Tensor:
    """A zero scalar connected to the graph of ``x`` (logits or hidden states and head), so that a loss
    over no rows still backpropagates (zero, finite gradients). Replaces ``logits.sum() * 0.0``."""
    if isinstance(x, HiddenLogits):
        head = x.head
        total = x.hidden_BCH.sum() * 0.0 + head.weight_VH.sum() * 0.0
        return total if head.bias_V is None else total + head.bias_V.sum() * 0.0
    return x.sum() * 0.0


def _kept_rows(mask: torch.Tensor | None, lead_shape: torch.Size, flat: torch.Tensor) -> torch.Tensor:
    """Indices of the flattened positions a loss reads: all of them, or those the mask keeps."""
    if mask is None:
        return torch.arange(flat.shape[0], device=flat.device)
    if mask.shape != lead_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(lead_shape)}")
    return mask.reshape(-1).nonzero().squeeze(-1)


def per_token(
    kind: str,
    student_logits: Logits,
    teacher_logits: Logits,
    mask: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    inplace_backward: bool = True,
    vocab_size: int | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """Per-position divergence between teacher and student, no reduction.

    Args:
        kind: one of ``forward_kl``, ``reverse_kl``, ``jsd``, ``tv``,
            ``skew_forward_kl``, ``skew_reverse_kl`` (see the module docstring).
        student_logits: ``[B, T, V]`` (or ``[N, V]``) student logits, or the student's
            :class:`~opd.fused.HiddenLogits` (hidden states and head: logits are formed chunk by
            chunk and never held whole); receives the gradient.
        teacher_logits: same shape, logits or :class:`~opd.fused.HiddenLogits`; a constant.
        mask: optional ``[B, T]`` (or ``[N]``) bool/0-1 tensor; masked positions are
            skipped entirely and get value 0 and gradient 0.
        beta: JSD interpolation, 0 = forward KL, 1 = reverse KL.
        alpha: skew of the DistiLLM skew KLs (the paper uses 0.1).
        temperature: softmax temperature for both distributions (> 0).
        chunk_size: rows processed at a time; bounds the fp32 ``[chunk, V]`` workspace.
            ``None`` picks :func:`auto_chunk_size` (about 64 MB per workspace tensor).
        inplace_backward: scale the precomputed gradient in place (saves one ``[N, V]``
            buffer); set False to backpropagate through the result more than once.
        vocab_size: compare only the first ``vocab_size`` columns (the shared tokenizer
            length when embedding matrices carry padding rows); the two logit tensors
            may then differ in their last dimension. Padding columns get zero gradient.
        fused: run each chunk's divergence through the ``torch.compile``-fused kernel (True), the eager one
            (False), or decide (None): fused when a chunk holds at least ``FUSED_MIN_ELEMENTS``
            logits, the input is not fp64 and ``OPD_FUSED_LOSS`` is not ``0`` (see
            :func:`fused_available`). Both compute the same formulas.

    Returns:
        ``[B, T]`` (or ``[N]``) tensor of per-position divergences, fp32 (fp64 for fp64 input).
    """
    _check_params(kind, beta, alpha, temperature)
    if vocab_size is None and student_logits.shape[-1] == teacher_logits.shape[-1]:
        vocab_size = student_logits.shape[-1]
    if vocab_size is None or student_logits.shape[:-1] != teacher_logits.shape[:-1] or (
        vocab_size > min(student_logits.shape[-1], teacher_logits.shape[-1])
    ):
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; slice both to the shared vocabulary first"
        )
    if chunk_size is None:
        chunk_size = auto_chunk_size(vocab_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead_shape = student_logits.shape[:-1]
    if isinstance(student_logits, HiddenLogits):
        hidden_NH = _flat_hidden(student_logits)
        rows_R = _kept_rows(mask, lead_shape, hidden_NH)
        work = _Head(student_logits.head, hidden_NH, 1).work
        kernel = _fused_kernel(fused, min(chunk_size, rows_R.numel()) * vocab_size, work, hidden_NH.device)
        teacher_rows = _rows_of(teacher_logits, vocab_size, rows_R, hidden_NH.device)
        op = _DivergenceOp(teacher_rows, kind, float(beta), float(alpha), float(temperature), kernel, work)
        values_N = _head_rows(student_logits, rows_R, op, vocab_size, chunk_size, inplace_backward)
        return values_N.reshape(lead_shape)
    student_NV = student_logits.reshape(-1, student_logits.shape[-1])
    rows_R = _kept_rows(mask, lead_shape, student_NV)
    values_N = _ChunkedDivergence.apply(
        student_NV, _rows_of(teacher_logits, vocab_size, device=student_NV.device), rows_R, kind,
        float(beta), float(alpha), float(temperature), int(chunk_size), bool(inplace_backward), int(vocab_size), fused,
    )
    return values_N.reshape(lead_shape)


def per_token_reference(
    kind: str,
    student_logits: Logits,
    teacher_logits: Logits,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Unchunked, plain-autograd version of :func:`per_token` written from the definitions.

    Materialises every intermediate at full size (hidden states are turned into full logits with
    plain autograd); meant for tests and for checking the chunked path, not for training.
    """
    _check_params(kind, beta, alpha, temperature)
    if isinstance(student_logits, HiddenLogits):
        student_logits = student_logits.logits()
    if isinstance(teacher_logits, HiddenLogits):
        teacher_logits = teacher_logits.logits()
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    q = torch.softmax(student_logits.to(dtype) / temperature, -1)
    p = torch.softmax(teacher_logits.detach().to(dtype) / temperature, -1)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return kl(p, q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (beta * (1 - beta))
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew_forward_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    return kl(q, (1 - alpha) * p + alpha * q)


class _GatheredLogprobs(torch.autograd.Function):
    """``log softmax(z / T)`` at ``K`` ids per row, chunked; backward rebuilds softmax per chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits_NV: torch.Tensor,
        ids_NK: torch.Tensor,
        temperature: float,
        vocab_size: int,
        chunk_size: int,
    ) -> torch.Tensor:
        work = torch.promote_types(logits_NV.dtype, torch.float32)
        lse_N = torch.empty(logits_NV.shape[0], dtype=work, device=logits_NV.device)
        out_NK = torch.empty(ids_NK.shape, dtype=work, device=logits_NV.device)
        for start in range(0, logits_NV.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            scaled = logits_NV[rows, :vocab_size].to(work) / temperature
            lse_N[rows] = torch.logsumexp(scaled, dim=-1)
            out_NK[rows] = scaled.gather(-1, ids_NK[rows]) - lse_N[rows, None]
        ctx.save_for_backward(logits_NV, ids_NK, lse_N)
        ctx.temperature, ctx.vocab_size, ctx.chunk_size = temperature, vocab_size, chunk_size
        return out_NK

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_NK: torch.Tensor):  # type: ignore[override]
        logits_NV, ids_NK, lse_N = ctx.saved_tensors
        temperature, vocab_size = ctx.temperature, ctx.vocab_size
        grad_NV = torch.zeros_like(logits_NV)
        for start in range(0, logits_NV.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            g_NK = grad_NK[rows].to(lse_N.dtype)
            # d log p(y_k) / dz = (onehot(y_k) - softmax(z / T)) / T, summed over k with weights g_k.
            probs = (logits_NV[rows, :vocab_size].to(lse_N.dtype) / temperature - lse_N[rows, None]).exp_()
            probs.mul_(-g_NK.sum(-1, keepdim=True)).scatter_add_(-1, ids_NK[rows], g_NK)
            grad_NV[rows, :vocab_size] = (probs / temperature).to(grad_NV.dtype)
        return grad_NV, None, None, None, None


def gathered_logprobs(
    logits: Logits,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at ``ids`` (``[..., V]`` logits, ``[..., K]`` ids).

    Never materialises a full fp32 log-softmax: the normaliser is computed chunk by chunk
    and the backward pass rebuilds the softmax one chunk at a time. ``logits`` may be a
    :class:`~opd.fused.HiddenLogits`: then no ``[..., V]`` tensor exists at all (the backward pass
    re-forms each chunk's logits from the hidden states).
    """
    vocab = vocab_size or logits.shape[-1]
    chunk = chunk_size or auto_chunk_size(vocab)
    if isinstance(logits, HiddenLogits):
        flat_NK = ids.reshape(-1, ids.shape[-1])
        rows_R = torch.arange(flat_NK.shape[0], device=flat_NK.device)
        op = _GatherOp(flat_NK, float(temperature), gather=True, tail=False)
        return _head_rows(logits, rows_R, op, vocab, chunk).reshape(ids.shape)
    flat_NV = logits.reshape(-1, logits.shape[-1])
    flat_NK = ids.reshape(-1, ids.shape[-1])
    out_NK = _GatheredLogprobs.apply(flat_NV, flat_NK, float(temperature), int(vocab), int(chunk))
    return out_NK.reshape(ids.shape)


@torch.no_grad()
def teacher_topk(
    teacher_logits: Logits,
    k: int,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``k`` most likely tokens per position: ``(logprobs [..., k], ids [..., k])``.

    Log-probs are normalised over the full vocabulary (what a served teacher's
    ``top_logprobs`` returns). Masked positions get ids 0 and log-prob 0; they are never read.
    With :class:`~opd.fused.HiddenLogits` each chunk's logits are formed from the hidden states, so
    the teacher side costs ``O(T k)`` plus one chunk.
    """
    vocab = vocab_size or teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k must be in [1, {vocab}], got {k}")
    chunk = chunk_size or auto_chunk_size(vocab)
    lead = teacher_logits.shape[:-1]
    n_rows, device = math.prod(lead), teacher_logits.device
    rows_R = (torch.arange(n_rows, device=device) if mask is None else mask.reshape(-1).nonzero().squeeze(-1))
    work = torch.promote_types(teacher_logits.dtype, torch.float32)
    logprobs_NK = torch.zeros((n_rows, k), dtype=work, device=device)
    ids_NK = torch.zeros((n_rows, k), dtype=torch.long, device=device)
    rows_of = _rows_of(teacher_logits, vocab)
    for start in range(0, rows_R.numel(), chunk):
        idx = rows_R[start : start + chunk]
        top = _log_softmax(rows_of(idx), temperature, work).topk(k, dim=-1)
        logprobs_NK[idx], ids_NK[idx] = top.values.to(work), top.indices
    return logprobs_NK.reshape(*lead, k), ids_NK.reshape(*lead, k)


@torch.no_grad()
def entropy(
    logits: Logits,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits / temperature)`` per position (0 where masked);
    ``logits`` may be a :class:`~opd.fused.HiddenLogits`."""
    vocab = vocab_size or logits.shape[-1]
    chunk = chunk_size or auto_chunk_size(vocab)
    n_rows, device = math.prod(logits.shape[:-1]), logits.device
    work = torch.promote_types(logits.dtype, torch.float32)
    out_N = torch.zeros(n_rows, dtype=work, device=device)
    rows_R = (torch.arange(n_rows, device=device) if mask is None else mask.reshape(-1).nonzero().squeeze(-1))
    rows_of = _rows_of(logits, vocab)
    for start in range(0, rows_R.numel(), chunk):
        idx = rows_R[start : start + chunk]
        logp = _log_softmax(rows_of(idx), temperature, work)
        out_N[idx] = -(logp.exp() * logp).sum(-1)
    return out_N.reshape(logits.shape[:-1])


TOPK_SUPPORTS = ("tail", "renormalize", "teacher_renormalized")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0`` without cancellation (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# Mass left outside the top-k is floored at e^-46 (1e-20): a teacher whose k tokens hold
# all of its mass in fp32 would otherwise give log(0) in the tail bucket.
_TAIL_LOG_CEILING = -1e-20


def _with_tail(logprobs_NK: torch.Tensor) -> torch.Tensor:
    covered_N = torch.logsumexp(logprobs_NK, dim=-1).clamp(max=_TAIL_LOG_CEILING)
    return torch.cat([logprobs_NK, _log1mexp(covered_N)[:, None]], dim=-1)


_TAIL_LOG_FLOOR = math.log(1e-20)


class _TailLogprob(torch.autograd.Function):
    """``log`` of the ``softmax(z / T)`` mass outside ``ids_NK`` per row, from the full logits.

    ``log(1 - sum_k q_k)`` cancels in fp32 once the tail is below ~1e-7 (the k log-probs sum to
    ``-0.0``), which both misstates the divergence and zeroes the gradient that should push mass
    back into the tail; a log-sum-exp over the other columns keeps full relative precision.
    Floored at log(1e-20) like the teacher's tail, with no gradient where the floor binds.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits_NV: torch.Tensor,
        ids_NK: torch.Tensor,
        temperature: float,
        vocab_size: int,
        chunk_size: int,
    ) -> torch.Tensor:
        work = torch.promote_types(logits_NV.dtype, torch.float32)
        lse_N = torch.empty(logits_NV.shape[0], dtype=work, device=logits_NV.device)
        tail_lse_N = torch.empty_like(lse_N)
        for start in range(0, logits_NV.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            scaled = logits_NV[rows, :vocab_size].to(work) / temperature
            lse_N[rows] = torch.logsumexp(scaled, dim=-1)
            tail_lse_N[rows] = torch.logsumexp(scaled.scatter_(-1, ids_NK[rows], -math.inf), dim=-1)
        out_N = tail_lse_N - lse_N
        floored_N = ~(out_N > _TAIL_LOG_FLOOR)  # also catches an empty tail (-inf)
        ctx.save_for_backward(logits_NV, ids_NK, lse_N, torch.where(floored_N, lse_N, tail_lse_N), floored_N)
        ctx.temperature, ctx.vocab_size, ctx.chunk_size = temperature, vocab_size, chunk_size
        return out_N.masked_fill(floored_N, _TAIL_LOG_FLOOR)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_N: torch.Tensor):  # type: ignore[override]
        logits_NV, ids_NK, lse_N, tail_lse_N, floored_N = ctx.saved_tensors
        temperature, vocab_size = ctx.temperature, ctx.vocab_size
        grad_NV = torch.zeros_like(logits_NV)
        g_N = grad_N.to(lse_N.dtype).masked_fill(floored_N, 0.0)
        for start in range(0, logits_NV.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            scaled = logits_NV[rows, :vocab_size].to(lse_N.dtype) / temperature
            # d log tail / dz = (1[v outside] softmax_tail(z / T) - softmax(z / T)) / T
            inside = (scaled - tail_lse_N[rows, None]).exp_().scatter_(-1, ids_NK[rows], 0.0)
            inside.sub_((scaled - lse_N[rows, None]).exp_()).mul_(g_N[rows, None] / temperature)
            grad_NV[rows, :vocab_size] = inside.to(grad_NV.dtype)
        return grad_NV, None, None, None, None


def tail_logprob(
    logits: Logits, ids: torch.Tensor, *, temperature: float = 1.0, vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``log(1 - sum_k softmax(logits / T)[ids_k])`` per row (``[..., V]`` logits or
    :class:`~opd.fused.HiddenLogits`, ``[..., K]`` ids), computed from the columns outside ``ids``
    so that a tiny tail keeps its precision."""
    vocab = vocab_size or logits.shape[-1]
    chunk = chunk_size or auto_chunk_size(vocab)
    if isinstance(logits, HiddenLogits):
        flat_NK = ids.reshape(-1, ids.shape[-1])
        rows_R = torch.arange(flat_NK.shape[0], device=flat_NK.device)
        op = _GatherOp(flat_NK, float(temperature), gather=False, tail=True)
        return _head_rows(logits, rows_R, op, vocab, chunk).reshape(ids.shape[:-1])
    flat_NV = logits.reshape(-1, logits.shape[-1])
    flat_NK = ids.reshape(-1, ids.shape[-1])
    return _TailLogprob.apply(flat_NV, flat_NK, float(temperature), int(vocab), int(chunk)).reshape(ids.shape[:-1])


def topk_per_token(
    kind: str,
    student_logits: Logits,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    support: str = "tail",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-position divergence when the teacher exposes only its top-k log-probs.

    The teacher side costs ``O(T k)`` memory; the student's full logits still give its
    exact log-probs on the teacher's k tokens. ``support`` says what happens to the rest:

    - ``tail``: both distributions get a (k+1)-th bucket holding their mass outside the
      k tokens, ``1 - sum_k p(v_k)``; any ``kind`` is then computed exactly on the k+1
      buckets. By the data-processing inequality this is a lower bound of the full-vocab
      divergence, equal to it once the buckets carry no mass, and it still pushes the
      student's mass off tokens the teacher considers unlikely (through the tail bucket).
      The student's bucket is a log-sum-exp over its other logits (:func:`tail_logprob`), exact
      however small; the teacher's is ``log(1 - sum_k p)`` of what it exposed, floored at 1e-20.
    - ``renormalize``: both distributions are renormalised on the k tokens and compared
      there; mass outside gets no gradient. With ``reverse_kl`` this is the Local Support
      Matching loss of arXiv 2603.25562 (Eqs. 6-8, k = 32 there, with top-p 0.9 rollouts).
    - ``teacher_renormalized``: forward KL only, ``sum_k p^(v_k) (log p^(v_k) - log q(v_k))``
      with the teacher renormalised on its top-k and the student's full-vocab log-probs — the
      forward-KL term of entropy-aware OPD (arXiv 2603.07079, k = 16). Unlike a reverse KL on
      unrenormalised student probabilities, it cannot be lowered by moving student mass away.

    ``student_logits`` may be a :class:`~opd.fused.HiddenLogits`: the k log-probs and the tail then
    come from one pass over chunk logits formed from the hidden states (one more in backward).

    Buckets are passed to :func:`per_token` as logits at temperature 1; because they are
    already normalised (``tail``) or are meant to be renormalised (``renormalize``) the
    softmax inside it is the identity, resp. the renormalisation, and its gradient is exact.
    """
    if support not in TOPK_SUPPORTS:
        raise ValueError(f"unknown top-k support {support!r}; choose one of {', '.join(TOPK_SUPPORTS)}")
    if support == "teacher_renormalized" and kind != "forward_kl":
        raise ValueError("support='teacher_renormalized' is defined for forward_kl only")
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape:
        raise ValueError("teacher top-k log-probs and ids differ in shape")
    lead = student_logits.shape[:-1]
    if teacher_topk_ids.shape[:-1] != lead:
        raise ValueError(f"teacher top-k {tuple(teacher_topk_ids.shape)} does not match student {tuple(lead)}")
    k = teacher_topk_ids.shape[-1]
    ids_NK = teacher_topk_ids.reshape(-1, k)
    teacher_NK = teacher_topk_logprobs.detach().reshape(-1, k)
    hidden = isinstance(student_logits, HiddenLogits)
    flat = _flat_hidden(student_logits) if hidden else student_logits.reshape(-1, student_logits.shape[-1])
    rows_R = _kept_rows(mask, lead, flat)
    work = torch.promote_types(student_logits.dtype, torch.float32)
    values_N = torch.zeros(flat.shape[0], dtype=work, device=flat.device)
    if rows_R.numel() == 0:
        return (values_N + connected_zero(student_logits)).reshape(lead)  # keeps the graph: zero gradient
    with_tail = support == "tail"
    if hidden:
        # One pass for the k log-probs and the tail: [R, k (+1)].
        vocab = vocab_size or student_logits.shape[-1]
        op = _GatherOp(ids_NK.index_select(0, rows_R), float(temperature), gather=True, tail=with_tail)
        student_RK = _head_rows(student_logits, rows_R, op, vocab, chunk_size or auto_chunk_size(vocab))
        student_RK = student_RK.index_select(0, rows_R)
    else:
        student_RK = gathered_logprobs(flat[rows_R], ids_NK[rows_R], temperature=temperature,
                                       vocab_size=vocab_size, chunk_size=chunk_size)
        if with_tail:
            student_tail_R = tail_logprob(flat[rows_R], ids_NK[rows_R], temperature=temperature,
                                          vocab_size=vocab_size, chunk_size=chunk_size)
            student_RK = torch.cat([student_RK, student_tail_R[:, None]], dim=-1)
    teacher_RK = teacher_NK[rows_R].to(work)
    if support == "teacher_renormalized":
        target_RK = torch.log_softmax(teacher_RK, dim=-1)
        per_row = (target_RK.exp() * (target_RK - student_RK)).sum(-1)
    else:
        if with_tail:
            teacher_RK = _with_tail(teacher_RK)
        per_row = per_token(kind, student_RK, teacher_RK, beta=beta, alpha=alpha, inplace_backward=False)
    return values_N.index_put((rows_R,), per_row).reshape(lead)


SAMPLED_ESTIMATORS = ("k1", "k2", "k3")


def sampled_token(
    estimator: str, student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """Single-sample estimates of the reverse KL KL(p_S || p_T) from the sampled token only.

    For a token y drawn from the student and ``r = log p_T(y) - log p_S(y)``
    (J. Schulman, "Approximating KL Divergence", 2020):

    - ``k1 = -r``: unbiased, high variance, can be negative;
    - ``k2 = r^2 / 2``: biased, low variance, never negative;
    - ``k3 = (e^r - 1) - r``: unbiased and never negative.

    This is the teacher signal when only the sampled token's log-prob is available
    (served teachers); ``-k1`` is the per-token advantage of sampled-token OPD.
    Inputs are log-probs of the sampled tokens, any matching shape; no reduction.
    """
    if estimator not in SAMPLED_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(SAMPLED_ESTIMATORS)}")
    log_ratio = teacher_logprobs - student_logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(log_ratio) - log_ratio
