"""Divergence forward + backward: opd's chunked closed-form JSD against TRL's ``generalized_jsd_loss``.

Run on demand (not part of the tests); TRL must be installed in the benchmark environment
(``pip install trl``). Every case runs in its own process under a memory cap, so a case that
does not fit fails alone and is recorded as not fitting.

    python benchmarks/loss.py                 # the full grid (slow: the largest cases take minutes)
    python benchmarks/loss.py --quick         # vocab 49,152 and 151,936 at 4 x 512 only
    python benchmarks/loss.py --json out.json
    python benchmarks/loss.py --device cuda --dtype bfloat16 --quick   # on a GPU (benchmarks/gpu.sh)

Per case: median seconds of forward + backward over ``--reps`` runs (after one warm-up),
peak memory of the loss computation (peak RSS above the RSS once both logit tensors exist:
the gradient buffer and every intermediate), and the absolute difference of the summed values.
opd's ``jsd`` is GKD's value divided by beta (1 - beta) (continuous at the ends), so it is
multiplied back before comparing with TRL for beta in (0, 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VOCABS = (49_152, 151_936)
SHAPES = ((4, 512), (8, 1024))
BETAS = (0.0, 0.5, 1.0)


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_case(impl: str, vocab: int, batch: int, length: int, beta: float, reps: int, threads: int,
             device: str = "cpu", dtype: str = "float32") -> dict:
    """One implementation on one shape, in this process. Prints a JSON row."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    student = torch.randn(batch, length, vocab, device=device, dtype=getattr(torch, dtype))
    teacher = torch.randn(batch, length, vocab, device=device, dtype=getattr(torch, dtype))
    cuda = device.startswith("cuda")
    if impl == "opd":
        from opd.divergences import per_token

        scale = beta * (1 - beta) if 0 < beta < 1 else 1.0

        def step() -> float:
            logits = student.detach().requires_grad_()
            values = per_token("jsd", logits, teacher, beta=beta)
            loss = values.sum() * scale
            loss.backward()
            return float(loss.detach().float())
    else:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        def step() -> float:
            logits = student.detach().requires_grad_()
            loss = GKDTrainer.generalized_jsd_loss(logits, teacher, beta=beta, reduction="sum")
            loss.backward()
            return float(loss.detach().float())

    if cuda:  # GPU memory: peak allocated above the two logit tensors
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        value = step()
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return {"value": value, "seconds": statistics.median(times),
                "peak_mb": torch.cuda.max_memory_allocated() / 2**20 - base}

    base_rss = _rss_mb()
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    value = step()  # warm-up; also the first peak measurement
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"value": value, "seconds": statistics.median(times), "peak_mb": max(peak, base_peak) - base_rss}


def _child(args: argparse.Namespace) -> None:
    if args.device == "cpu":  # CUDA needs a large virtual address space; its memory is measured instead
        cap = int(args.mem_cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    row = run_case(args.impl, args.vocab, args.batch, args.length, args.beta, args.reps, args.threads,
                   args.device, args.dtype)
    print("RESULT " + json.dumps(row), flush=True)


def _spawn(impl: str, vocab: int, batch: int, length: int, beta: float, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--child", impl, "--vocab", str(vocab), "--batch", str(batch),
           "--length", str(length), "--beta", str(beta), "--reps", str(args.reps), "--threads", str(args.threads),
           "--mem-cap-gb", str(args.mem_cap_gb), "--device", args.device, "--dtype", args.dtype]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only B x T = 4 x 512")
    parser.add_argument("--json", help="write the rows as JSON")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mem-cap-gb", type=float, default=20.0, help="address-space cap per case")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--child", choices=("opd", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.impl = args.child
        _child(args)
        return

    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = []
    header = (f"{'vocab':>8} {'B x T':>9} {'beta':>5} {'opd s':>8} {'trl s':>8} {'speed-up':>9} "
              f"{'opd MB':>8} {'trl MB':>8} {'mem ratio':>10} {'|diff|':>10} {'rel diff':>9}")
    print(f"device={args.device} dtype={args.dtype} threads={args.threads}, reps={args.reps} (median), "
          f"memory cap {args.mem_cap_gb} GB per case (CPU only)")
    print(header)
    print("-" * len(header))
    for vocab in VOCABS:
        for batch, length in shapes:
            for beta in BETAS:
                opd = _spawn("opd", vocab, batch, length, beta, args)
                trl = _spawn("trl", vocab, batch, length, beta, args)
                row = {
                    "vocab": vocab, "tokens": batch * length, "batch": batch, "length": length, "beta": beta,
                    "opd_seconds": opd and opd["seconds"], "trl_seconds": trl and trl["seconds"],
                    "opd_peak_mb": opd and opd["peak_mb"], "trl_peak_mb": trl and trl["peak_mb"],
                    "opd_fits": opd is not None, "trl_fits": trl is not None,
                    "max_abs_diff": abs(opd["value"] - trl["value"]) if opd and trl else None,
                    "rel_diff": (abs(opd["value"] - trl["value"]) / max(abs(trl["value"]), 1e-30)
                                 if opd and trl else None),
                }
                rows.append(row)

                def fmt(value: float | None, spec: str, missing: str = "-", suffix: str = "") -> str:
                    width = int(spec.split(".")[0]) + len(suffix)
                    return f"{missing:>{width}}" if value is None else format(value, spec) + suffix

                speed = row["trl_seconds"] / row["opd_seconds"] if opd and trl else None
                memory = row["trl_peak_mb"] / row["opd_peak_mb"] if opd and trl else None
                print(f"{vocab:>8} {f'{batch}x{length}':>9} {beta:>5.1f} {fmt(row['opd_seconds'], '8.2f', 'no fit')} "
                      f"{fmt(row['trl_seconds'], '8.2f', 'no fit')} {fmt(speed, '8.2f', suffix='x')} "
                      f"{fmt(row['opd_peak_mb'], '8.0f', 'no fit')} {fmt(row['trl_peak_mb'], '8.0f', 'no fit')} "
                      f"{fmt(memory, '9.2f', suffix='x')} {fmt(row['max_abs_diff'], '10.2e')} "
                      f"{fmt(row['rel_diff'], '9.1e')}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "threads": args.threads, "reps": args.reps, "device": args.device,
                       "dtype": args.dtype}, handle, indent=2)


if __name__ == "__main__":
    main()
