"""Long rollouts: peak memory and time of the distillation loss against completion length.

Four ways to compute JSD(beta = 0.5) between a student and a teacher whose final hidden states and
output layers are given (Qwen2.5-0.5B-shaped: hidden size 896, vocabulary 151,936 or 49,152, random
weights), forward + backward:

- ``opd_fused``: :func:`opd.divergences.per_token` on :class:`opd.fused.HiddenLogits` for both sides
  (logits formed chunk by chunk, never ``[T, V]``);
- ``opd_unfused``: the same on materialised ``[T, V]`` logits (``h W^T`` for both models);
- ``trl``: TRL's ``GKDTrainer.generalized_jsd_loss`` on the same materialised logits;
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (its chunked ``torch.compile`` implementation,
  which runs on CPU; no hard cross-entropy term: ``weight_hard_loss=0``).

and one full training step (rollout excluded: student and teacher forward, loss, backward, AdamW) of
``opd_fused`` and ``opd_unfused`` on a Qwen2.5-0.5B-shaped model with ``--step-layers`` decoder layers
(the full 24 do not fit a CPU time budget; the head and the loss, which these paths differ in, are
the same as the real model's), and the loss of a top-k teacher (``opd_fused`` student, the teacher's
top-64 from its hidden states, tail support), whose teacher side is ``O(T k)``.

Every case runs in its own process. Memory is the peak resident set above what exists before the
loss starts (inputs, weights, optimizer state): the peak is reset through ``/proc/self/clear_refs``
and read from ``VmHWM``. The cap (``--mem-cap-gb``) limits the address space the case may add
(``RLIMIT_AS`` = what it had after warm-up + cap); a case that exceeds it fails alone and is
recorded as not fitting, and the same implementation is not tried at larger sizes. ``trl`` and
``liger`` are imported only in their own cases: install them in a separate environment,

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]'
    .venv-bench/bin/python benchmarks/memory_long.py --quick --json runs/memory_long_quick.json
    .venv-bench/bin/python benchmarks/memory_long.py --json runs/memory_long.json      # full grid

``--quick``: vocabulary 151,936, 1k / 4k / 8k tokens, loss only. The default dtype is bf16 (weights,
hidden states, logits; fp32 inside opd's chunks): on a CPU with AVX-512 BF16 its products are 3-4x
faster than fp32, and it is the dtype long-context training runs in. Timings on a shared machine are
noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import resource
import subprocess
import sys
import time

HIDDEN = 896  # Qwen2.5-0.5B
VOCABS = (151_936, 49_152)
TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_TOKENS = (1024, 4096, 8192)
LOSS_IMPLS = ("opd_fused", "opd_unfused", "trl", "liger")
STEP_IMPLS = ("opd_fused", "opd_unfused")
TOPK = 64


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        match = re.search(rf"^{field}:\s+(\d+)", handle.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _loss_case(impl: str, vocab: int, tokens: int, dtype, generator, chunk_size: int | None = None):
    """Inputs and a callable running one forward + backward of ``impl``."""
    import torch

    def randn(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_(grad)

    # Hidden states after a final RMS norm are O(1); weights at the usual init scale (logit std ~0.6).
    student_h = randn(tokens, HIDDEN, grad=True)
    teacher_h = randn(tokens, HIDDEN)
    student_w = randn(vocab, HIDDEN, scale=0.02, grad=True)
    teacher_w = randn(vocab, HIDDEN, scale=0.02)

    if impl == "opd_fused":
        from opd.divergences import per_token
        from opd.fused import HiddenLogits, LMHead

        def run() -> None:
            student = HiddenLogits(student_h, LMHead(student_w))
            teacher = HiddenLogits(teacher_h, LMHead(teacher_w))
            (per_token("jsd", student, teacher, beta=0.5, chunk_size=chunk_size).sum() / tokens).backward()
    elif impl == "opd_unfused":
        from opd.divergences import per_token

        def run() -> None:
            student_logits = student_h @ student_w.t()
            with torch.no_grad():
                teacher_logits = teacher_h @ teacher_w.t()
            values = per_token("jsd", student_logits, teacher_logits, beta=0.5, chunk_size=chunk_size)
            (values.sum() / tokens).backward()
    elif impl == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        def run() -> None:
            student_logits = student_h @ student_w.t()
            with torch.no_grad():
                teacher_logits = teacher_h @ teacher_w.t()
            GKDTrainer.generalized_jsd_loss(student_logits[None], teacher_logits[None], beta=0.5,
                                            reduction="batchmean").backward()
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5)
        labels = torch.zeros(tokens, dtype=torch.long)

        def run() -> None:
            loss_fn(student_h, student_w, teacher_h, teacher_w, labels).backward()
    else:
        raise ValueError(impl)

    def clear() -> None:
        student_h.grad = student_w.grad = None

    return run, clear


def _step_case(impl: str, vocab: int, tokens: int, layers: int, topk: bool = False):
    """A Qwen2.5-0.5B-shaped student and teacher (``layers`` layers); one training step of ``impl``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opd.divergences import per_token, teacher_topk, topk_per_token
    from opd.fused import completion_hidden
    from opd.models import completion_logits

    config = Qwen2Config(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    student = Qwen2ForCausalLM(config)
    teacher = Qwen2ForCausalLM(config).requires_grad_(False)
    student.config._attn_implementation = teacher.config._attn_implementation = "sdpa"
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    prompt = 64

    def run_at(n: int) -> None:
        ids_BT = torch.randint(0, vocab, (1, prompt + n))
        mask_BT = torch.ones_like(ids_BT)
        forward = completion_hidden if impl == "opd_fused" else completion_logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            student_out = forward(student, ids_BT, mask_BT, n)
            with torch.no_grad():
                teacher_out = forward(teacher, ids_BT, mask_BT, n)
        if topk:
            top_lp, top_ids = teacher_topk(teacher_out, TOPK)
            del teacher_out
            values = topk_per_token("jsd", student_out, top_lp, top_ids, support="tail")
        else:
            values = per_token("jsd", student_out, teacher_out, beta=0.5)
        (values.sum() / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run_at


def run_case(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    generator = torch.Generator().manual_seed(0)
    warm = min(args.tokens, 256)
    if args.kind == "loss":
        # Liger compiles its chunk function for static shapes: warm it up on a full 1024-row chunk.
        warm = min(args.tokens, 1024) if args.impl == "liger" else warm
        run_warm, clear_warm = _loss_case(args.impl, args.vocab, warm, dtype, generator, args.chunk_size)
        run_warm()
        clear_warm()
        del run_warm, clear_warm
        run, clear = _loss_case(args.impl, args.vocab, args.tokens, dtype, generator, args.chunk_size)
    else:
        run_at = _step_case(args.impl, args.vocab, args.tokens, args.step_layers, topk=args.kind == "topk")
        run_at(warm)  # compiles, creates the optimizer state

        def run() -> None:
            run_at(args.tokens)
    gc.collect()
    # Cap what the case may add to the address space from here on.
    cap = _status_kb("VmSize") * 1024 + int(args.mem_cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    base_kb = _status_kb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    peak_kb = _status_kb("VmHWM")
    return {"peak_mb": (peak_kb - base_kb) / 1024, "seconds": seconds}


def _spawn(kind: str, impl: str, vocab: int, tokens: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--impl", impl, "--vocab", str(vocab),
           "--tokens", str(tokens), "--threads", str(args.threads), "--dtype", args.dtype,
           "--mem-cap-gb", str(args.mem_cap_gb), "--step-layers", str(args.step_layers)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    row = {"impl": impl, "vocab": vocab, "tokens": tokens, "peak_mb": None, "seconds": None, "fits": False}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timeout after {args.timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**row, **json.loads(line[len("RESULT "):]), "fits": True}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**row, "error": tail[:200]}


def _grid(kind: str, impls, vocabs, tokens, args: argparse.Namespace, rows: list, label: str) -> None:
    for vocab in vocabs:
        for impl in impls:
            failed = False
            for n in tokens:
                if failed:  # memory grows with length: a larger case cannot fit either
                    rows.append({"impl": impl, "vocab": vocab, "tokens": n, "peak_mb": None, "seconds": None,
                                 "fits": False, "error": "not run: a shorter case did not fit"})
                else:
                    rows.append(_spawn(kind, impl, vocab, n, args))
                    failed = not rows[-1]["fits"]
                row = rows[-1]
                shown = (f"{row['peak_mb']:9.0f} MB {row['seconds']:8.2f} s" if row["fits"]
                         else f"   no fit ({row.get('error', '')})")
                print(f"{label:5} {impl:12} V={vocab:>7} T={n:>6} {shown}", flush=True)


def _fit(rows: list, impl: str, vocab: int, key: str) -> dict | None:
    """Least-squares line ``key = a + b T`` over the fitting rows (b per 1k tokens), with R^2."""
    points = [(r["tokens"], r[key]) for r in rows if r["impl"] == impl and r["vocab"] == vocab and r["fits"]]
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (y - mean_y) for t, y in points) / sxx
    intercept = mean_y - slope * mean_t
    total = sum((y - mean_y) ** 2 for _, y in points)
    residual = sum((y - intercept - slope * t) ** 2 for t, y in points)
    return {"intercept": intercept, "per_1k_tokens": slope * 1000, "r2": 1 - residual / total if total else 1.0,
            "tokens": [t for t, _ in points]}


def _value(rows: list, impl: str, vocab: int, tokens: int, key: str) -> float | None:
    for row in rows:
        if row["impl"] == impl and row["vocab"] == vocab and row["tokens"] == tokens and row["fits"]:
            return row[key]
    return None


def summarise(rows: list, step_rows: list, topk_rows: list, vocabs) -> dict:
    """The issue's targets, each with the numbers behind it."""
    out: dict = {"loss_fits": {}, "step_fits": {}, "topk_fits": {}, "targets": {}}
    for vocab in vocabs:
        for impl in LOSS_IMPLS:
            out["loss_fits"][f"{impl}@{vocab}"] = {"peak_mb": _fit(rows, impl, vocab, "peak_mb"),
                                                   "seconds": _fit(rows, impl, vocab, "seconds")}
        for impl in STEP_IMPLS:
            out["step_fits"][f"{impl}@{vocab}"] = {"peak_mb": _fit(step_rows, impl, vocab, "peak_mb"),
                                                   "seconds": _fit(step_rows, impl, vocab, "seconds")}
        out["topk_fits"][f"opd_fused@{vocab}"] = {"peak_mb": _fit(topk_rows, "opd_fused", vocab, "peak_mb")}
    targets = out["targets"]
    for vocab in vocabs:
        fused_peak = out["loss_fits"][f"opd_fused@{vocab}"]["peak_mb"]
        if fused_peak:
            targets[f"opd_fused peak slope, MB per 1k tokens @{vocab}"] = fused_peak["per_1k_tokens"]
        opd8, trl8 = _value(rows, "opd_fused", vocab, 8192, "peak_mb"), _value(rows, "trl", vocab, 8192, "peak_mb")
        if opd8:
            targets[f"trl / opd_fused peak at 8k @{vocab}"] = (
                trl8 / opd8 if trl8 else "trl does not fit at 8k under the cap (ratio > cap / opd peak)")
        for n in sorted({r["tokens"] for r in rows}):
            opd, liger = (_value(rows, "opd_fused", vocab, n, "peak_mb"), _value(rows, "liger", vocab, n, "peak_mb"))
            opd_s, liger_s = (_value(rows, "opd_fused", vocab, n, "seconds"),
                              _value(rows, "liger", vocab, n, "seconds"))
            if opd and liger:
                targets[f"opd_fused / liger peak @{vocab} T={n}"] = opd / liger
            if opd_s and liger_s:
                targets[f"opd_fused / liger seconds @{vocab} T={n}"] = opd_s / liger_s
        step = out["step_fits"][f"opd_fused@{vocab}"]["seconds"]
        if step:
            targets[f"step seconds fit (opd_fused) @{vocab}"] = step
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V = 151,936 at 1k / 4k / 8k tokens, loss only")
    parser.add_argument("--json", help="write {'rows': [...], ...} here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--mem-cap-gb", type=float, default=12.0, help="memory a case may add (address space)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per case")
    parser.add_argument("--step-layers", type=int, default=2, help="decoder layers of the step benchmark's model")
    parser.add_argument("--chunk-size", type=int, help="opd's rows per chunk (default: auto)")
    parser.add_argument("--parts", nargs="*", choices=("loss", "step", "topk"),
                        help="what to run (default: all three; --quick: loss)")
    parser.add_argument("--vocab", type=int, nargs="*", help="vocabularies (default: 151936 49152)")
    parser.add_argument("--tokens", type=int, nargs="*", help="completion lengths")
    parser.add_argument("--impls", nargs="*", choices=LOSS_IMPLS, help="loss implementations to run")
    parser.add_argument("--child", choices=("loss", "step", "topk"), help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.kind = args.child
        args.vocab, args.tokens = args.vocab[0], args.tokens[0]
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return

    vocabs = tuple(args.vocab or ((VOCABS[0],) if args.quick else VOCABS))
    tokens = tuple(args.tokens or (QUICK_TOKENS if args.quick else TOKENS))
    impls = tuple(args.impls or LOSS_IMPLS)
    print(f"dtype={args.dtype} threads={args.threads} hidden={HIDDEN} cap={args.mem_cap_gb} GB per case", flush=True)
    started = time.perf_counter()
    rows: list = []
    step_rows: list = []
    topk_rows: list = []
    parts = args.parts or (("loss",) if args.quick else ("loss", "step", "topk"))
    if "loss" in parts:
        _grid("loss", impls, vocabs, tokens, args, rows, "loss")
    if "step" in parts:
        _grid("step", STEP_IMPLS, vocabs, tokens, args, step_rows, "step")
    if "topk" in parts:
        _grid("topk", ("opd_fused",), vocabs[:1], tokens, args, topk_rows, "topk")
    summary = summarise(rows, step_rows, topk_rows, vocabs)
    for key, value in summary["targets"].items():
        print(f"{key}: {f'{value:.3f}' if isinstance(value, float) else value}")
    for key, fit in {**summary["loss_fits"], **{f"step {k}": v for k, v in summary["step_fits"].items()}}.items():
        if fit["seconds"]:
            print(f"fit {key}: seconds = {fit['seconds']['intercept']:.2f} + {fit['seconds']['per_1k_tokens']:.3f} "
                  f"per 1k tokens (R^2 {fit['seconds']['r2']:.4f}); peak MB = {fit['peak_mb']['intercept']:.0f} + "
                  f"{fit['peak_mb']['per_1k_tokens']:.1f} per 1k tokens")
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = {"dtype": args.dtype, "threads": args.threads, "hidden": HIDDEN, "mem_cap_gb": args.mem_cap_gb,
                "step_layers": args.step_layers, "topk": TOPK, "seconds_total": elapsed,
                "cpu_count": os.cpu_count(), "machine": os.uname().machine}
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "step_rows": step_rows, "topk_rows": topk_rows, "summary": summary,
                       "meta": meta}, handle, indent=1, default=lambda x: None if isinstance(x, float)
                      and not math.isfinite(x) else x)


if __name__ == "__main__":
    main()
