"""Asynchronous rollouts: step throughput and quality for rollout.async_steps = 0 / 1 / 2.

What it measures: on-policy distillation (``on_policy_rkl``) on the demo's control task with the shipped
demo teacher, into a student large enough that generation matters (a Llama built from a config, hidden
``--hidden``, ``--layers`` layers, warm-started once by supervised KD so that it writes sensible
answers), for ``rollout.async_steps`` 0, 1 and 2 at otherwise equal settings, over ``--seeds`` seeds:

- **throughput**: completion tokens per second of training (the mean of ``train/completion_tokens /
  perf/step_s`` over the run's steps after the first two), its ratio to the synchronous run of the same
  seed, and where the time goes (``perf/rollout_s``: waiting for rollouts; ``perf/student_s``);
- **quality**: greedy and sampled accuracy of the final student on held-out prompts (``opd``'s own
  evaluation), and the logged ``rollout/policy_lag``.

Engines: ``--engine vllm_server`` (default where vLLM is installed): the rollout server pinned to core
0 (``rollout.server_cpus=0``) and the trainer to core 1 (``taskset -c 1``), one thread each;
``--engine hf``: a snapshot of the student decoded in a background thread of the trainer (both cores,
one torch thread), the fallback where vLLM is missing. Target (issue 15): 1-step async >= 1.5x the
synchronous throughput, final accuracy within the seed spread.

    python benchmarks/async.py --json async.json                 # 3 settings x 2 seeds, vllm_server
    python benchmarks/async.py --engine hf --steps 30 --seeds 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def build_student(out: Path, hidden: int, layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(out)
    tokenizer.save_pretrained(out)


def opd_train(recipe: str, overrides: dict[str, Any], pin: str | None) -> float:
    command = [sys.executable, "-m", "opd.cli", "train", recipe, *[f"{k}={v}" for k, v in overrides.items()]]
    if pin:
        command = ["taskset", "-c", pin, *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "opd train failed")
    return time.perf_counter() - started


def summarise(run_dir: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    timed = steps[2:] or steps
    final = [r for r in rows if "eval/accuracy" in r][-1]
    return {
        # total tokens over total time: a mean of per-step rates would over-weight short steps
        "tokens_per_s": sum(r["train/completion_tokens"] for r in timed) / sum(r["perf/step_s"] for r in timed),
        "completion_tokens": statistics.fmean(r["train/completion_tokens"] for r in timed),
        "step_s": statistics.fmean(r["perf/step_s"] for r in timed),
        "rollout_wait_s": statistics.fmean(r["perf/rollout_s"] for r in timed),
        "student_s": statistics.fmean(r["perf/student_s"] for r in timed),
        "policy_lag": statistics.fmean(r.get("rollout/policy_lag", 0.0) for r in timed),
        "accuracy": final["eval/accuracy"], "accuracy_sampled": final.get("eval/accuracy_sampled"),
        # the accuracies stay near 0 for a student this far from the teacher after 30 steps; these move
        "teacher_divergence": final.get("eval/teacher_divergence"),
        "first_error": final.get("eval/first_error"), "first_error_sampled": final.get("eval/first_error_sampled"),
    }


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    sync = {r["seed"]: r["tokens_per_s"] for r in results if r["async_steps"] == 0}
    sync_step = {r["seed"]: r["step_s"] for r in results if r["async_steps"] == 0}
    keys = ("tokens_per_s", "step_s", "rollout_wait_s", "student_s", "policy_lag", "accuracy", "accuracy_sampled",
            "teacher_divergence", "first_error_sampled")
    print(f"\n{'async':>5} {'tok/s':>8} {'vs sync':>8} {'step s':>7} {'wait s':>7} {'train s':>8} {'lag':>5} "
          f"{'greedy':>7} {'sampled':>8} {'RKL':>7} {'1st err':>8}   (mean over {args.seeds} seeds; {args.engine})")
    for lag in (0, 1, 2):
        rows = [r for r in results if r["async_steps"] == lag]
        ratios = [r["tokens_per_s"] / sync[r["seed"]] for r in rows]
        step_ratios = [sync_step[r["seed"]] / r["step_s"] for r in rows]
        mean = {key: statistics.fmean(r[key] for r in rows) for key in keys}
        print(f"{lag:>5} {mean['tokens_per_s']:>8.1f} {statistics.fmean(ratios):>8.2f} {mean['step_s']:>7.2f} "
              f"{mean['rollout_wait_s']:>7.2f} {mean['student_s']:>8.2f} {mean['policy_lag']:>5.2f} "
              f"{mean['accuracy']:>7.3f} {mean['accuracy_sampled']:>8.3f} {mean['teacher_divergence']:>7.2f} "
              f"{mean['first_error_sampled']:>8.2f}")
        print(f"{'':>5} per seed vs sync: tok/s " + ", ".join(f"{x:.2f}" for x in ratios)
              + "; steps/s " + ", ".join(f"{x:.2f}" for x in step_ratios)
              + "; tokens/step " + ", ".join(f"{r['completion_tokens']:.0f}" for r in rows)
              + "; RKL: " + ", ".join(f"{r['teacher_divergence']:.2f}" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    has_vllm = importlib.util.find_spec("vllm") is not None
    parser.add_argument("--engine", choices=("vllm_server", "hf"), default="vllm_server" if has_vllm else "hf")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--warm-steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("runs/async-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--report-only", action="store_true",
                        help="no training: print the table from the runs already in --out")
    args = parser.parse_args()
    from opd.demo import task
    from opd.demo.run import TEACHER_DIR

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    data.mkdir(exist_ok=True)
    train_rows, eval_rows = task.make_splits(2000, 128, seed=0)
    task.write_jsonl(train_rows, data / "train.jsonl")
    task.write_jsonl(eval_rows, data / "eval.jsonl")
    base = {"teacher.model": str(TEACHER_DIR), "data.train": str(data / "train.jsonl"),
            "data.eval": str(data / "eval.jsonl"), "data.max_prompt_tokens": 64,
            "rollout.max_new_tokens": task.ANSWER_LEN + 1, "train.batch_size": args.batch_size,
            "train.progress": "false", "train.tensorboard": "false", "train.threads": 1,
            "eval.scorer": "opd.demo.run:demo_is_correct", "eval.first_error": "opd.demo.run:demo_first_error",
            "eval.batch_size": 128}
    student = args.out / "student_init"
    if not student.exists() and not args.report_only:
        build_student(student, args.hidden, args.layers)
    warm = args.out / "warm"
    if not (warm / "final").exists() and not args.report_only:
        print(f"warm start: {args.warm_steps} steps of supervised KD", flush=True)
        opd_train("supervised_kd", {**base, "model.student": str(student), "train.output_dir": str(warm),
                                    "train.steps": args.warm_steps, "optim.lr": 2e-3, "data.eval": "null"}, None)
    pin_trainer = "1" if args.engine == "vllm_server" else None
    results: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        for lag in (0, 1, 2):
            out = args.out / f"{args.engine}-async{lag}-seed{seed}"
            if args.report_only:
                results.append({"engine": args.engine, "async_steps": lag, "seed": seed, "wall_s": None,
                                **summarise(out)})
                continue
            if out.exists():
                import shutil

                shutil.rmtree(out)
            overrides = {**base, "model.student": str(warm / "final"), "train.output_dir": str(out),
                         "train.steps": args.steps, "train.seed": seed, "optim.lr": 5e-4, "optim.warmup_steps": 0,
                         "rollout.engine": args.engine, "rollout.async_steps": lag, "loss.importance_cap": 2.0}
            if args.engine == "vllm_server":
                overrides["rollout.server_cpus"] = "0"
            wall = opd_train("on_policy_rkl", overrides, pin_trainer)
            row = {"engine": args.engine, "async_steps": lag, "seed": seed, "wall_s": wall, **summarise(out)}
            results.append(row)
            print(f"seed {seed} async {lag}: {row['tokens_per_s']:.1f} tok/s (step {row['step_s']:.2f}s, waiting "
                  f"for rollouts {row['rollout_wait_s']:.2f}s), lag {row['policy_lag']:.2f}, greedy "
                  f"{row['accuracy']:.3f}, sampled {row['accuracy_sampled']:.3f}", flush=True)
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": results},
                                        indent=1))


if __name__ == "__main__":
    main()
