"""Per-process memory of a training step: data parallel vs FSDP2 vs DeepSpeed ZeRO, 1 and 2 processes.

What it measures: a ~110M-parameter Llama student (hidden 768, 12 layers, built from a config), one
process per rank under ``torchrun`` on gloo/CPU, spread by opd's own strategies (``opd.parallel``:
the ones ``train.distributed`` selects, built by the same ``opd.trainer._distributed``), trained for
3 steps of forward KL against fixed teacher logits with AdamW. Per rank:

- ``held_mb``: parameters + gradients + AdamW state held by the process, summed over its local shards
  (``DTensor.to_local()`` under FSDP2; DeepSpeed's partitions under ZeRO) — exact and deterministic;
- ``step_peak_mb``: peak resident memory (VmHWM) during the last step, after resetting the peak
  (``/proc/self/clear_refs``) — activations, all-gather buffers and allocator caching included;
- ``process_peak_mb``: the whole process's high-water mark (model construction included: every
  process builds the full model before sharding it);
- ``seconds_per_step``.

Run it with glibc's mmap threshold lowered (the script sets ``MALLOC_MMAP_THRESHOLD_=65536`` for its
children): with the default dynamic threshold, freed model-sized blocks stay in the heap and RSS
after sharding still shows the full model.

    python benchmarks/memory.py                       # ddp / fsdp (/ deepspeed if installed) x 1, 2 processes
    python benchmarks/memory.py --json memory.json --modes ddp,fsdp --hidden 512 --layers 8

Target (issue 14): at N processes FSDP2's per-process parameter + optimizer memory is about 1/N of DDP's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MB = 1024 * 1024


def _vm(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _local_bytes(tensor: Any) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def _held(parallel: Any, model: Any, optimizer: Any) -> float:
    import torch

    if parallel.name == "deepspeed":
        module = parallel.module(model)
        inner = model.optimizer.optimizer  # the torch AdamW stepping DeepSpeed's flat fp32 partitions
        params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() if hasattr(p, "ds_tensor") else
                     _local_bytes(p) for p in module.parameters())
        master = sum(_local_bytes(p) for g in inner.param_groups for p in g["params"])
        grads = sum(_local_bytes(p.grad) for g in inner.param_groups for p in g["params"] if p.grad is not None)
        state = sum(_local_bytes(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v))
        return (params + master + grads + state) / MB
    module = parallel.module(model)
    inner = getattr(optimizer, "optimizer", optimizer)
    params = sum(_local_bytes(p) for p in module.parameters())
    grads = sum(_local_bytes(p.grad) for p in module.parameters() if p.grad is not None)
    state = sum(_local_bytes(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v))
    return (params + grads + state) / MB


def child(args: argparse.Namespace) -> None:
    """One rank: build, spread, train 3 steps, print one JSON line."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd.config import build_config
    from opd.models import completion_logits
    from opd.objectives import token_divergence
    from opd.trainer import _distributed

    torch.set_num_threads(1)
    distributed, zero = (args.mode, 3) if not args.mode.startswith("zero") else ("deepspeed", int(args.mode[-1]))
    config = build_config({"model": {"student": "unused"}, "data": {"train": "unused"},
                           "train": {"distributed": distributed, "zero_stage": zero, "batch_size": args.batch,
                                     "grad_accum": 1}, "loss": {"objective": "nll"},
                           "rollout": {"on_policy_fraction": 0.0}})
    accelerator, parallel = _distributed(config)
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=256, tie_word_embeddings=False))
    n_params = sum(p.numel() for p in student.parameters())
    model, optimizer = parallel.prepare(student, lambda ps: torch.optim.AdamW(ps, lr=1e-5))
    gen = torch.Generator().manual_seed(1 + accelerator.process_index)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen)
    attention = torch.ones_like(ids)
    completion = args.seq // 2
    teacher_BCV = torch.randn(args.batch, completion, args.vocab, generator=gen)
    mask_BC = torch.ones(args.batch, completion)
    timings = []
    process_peak = float("nan")
    for step in range(3):
        if step == 2:
            process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM (and ru_maxrss) for the measured step (Linux)
        start = time.perf_counter()
        logits = completion_logits(model, ids, attention, completion)
        loss, _ = token_divergence(logits, teacher_BCV, mask_BC, kind="forward_kl",
                                   num_tokens=float(mask_BC.sum()) * accelerator.num_processes)
        parallel.backward(model, loss, True)
        parallel.step(model, optimizer, 1.0, True)
        timings.append(time.perf_counter() - start)
    print(json.dumps({"mode": args.mode, "processes": accelerator.num_processes, "rank": accelerator.process_index,
                      "params_m": n_params / 1e6, "held_mb": _held(parallel, model, optimizer),
                      "step_peak_mb": _vm("VmHWM"), "process_peak_mb": process_peak,
                      "seconds_per_step": timings[-1]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=None, help="comma-separated: ddp, fsdp, zero2, zero3 (default: all "
                        "available)")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=2, help="rows per process")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    try:
        import deepspeed  # noqa: F401

        has_deepspeed = True
    except ImportError:
        has_deepspeed = False
    modes = args.modes.split(",") if args.modes else ["ddp", "fsdp", *(["zero2", "zero3"] if has_deepspeed else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    rows: list[dict[str, Any]] = []
    port = 29750
    for procs in (int(p) for p in args.processes.split(",")):
        for mode in modes:
            port += 1
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                       "--master_port", str(port), __file__, "--child", "--mode", mode,
                       *[f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "batch", "seq")]]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
            found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not found:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"mode": mode, "processes": procs, "error": tail})
                print(f"{mode} x{procs}: failed: {tail}", flush=True)
                continue
            rank0 = next(r for r in found if r["rank"] == 0)
            rank0["held_mb_max_rank"] = max(r["held_mb"] for r in found)
            rank0["step_peak_mb_max_rank"] = max(r["step_peak_mb"] for r in found)
            rows.append(rank0)
            print(f"{mode} x{procs}: held {rank0['held_mb']:.0f} MB, step peak {rank0['step_peak_mb_max_rank']:.0f} "
                  f"MB, {rank0['seconds_per_step']:.2f} s/step", flush=True)
    base = {r["processes"]: r for r in rows if r.get("mode") == "ddp" and "held_mb" in r}
    print(f"\n{'mode':8} {'procs':>5} {'params':>8} {'held MB':>9} {'vs ddp':>7} {'step peak MB':>13} "
          f"{'process peak MB':>16} {'s/step':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:8} {r['processes']:>5}  failed: {r['error']}")
            continue
        ratio = r["held_mb_max_rank"] / base[r["processes"]]["held_mb"] if r["processes"] in base else float("nan")
        print(f"{r['mode']:8} {r['processes']:>5} {r['params_m']:>7.1f}M {r['held_mb_max_rank']:>9.0f} "
              f"{ratio:>7.2f} {r['step_peak_mb_max_rank']:>13.0f} {r['process_peak_mb']:>16.0f} "
              f"{r['seconds_per_step']:>7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: getattr(args, k) for k in
                                                      ("hidden", "layers", "vocab", "batch", "seq")},
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
