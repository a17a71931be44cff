"""``opd demo``: off-policy vs on-policy vs mixed distillation on a task with two valid answer styles.

What it does, all on CPU with the project's own files (no downloads):

1. writes the synthetic task's train / held-out prompts (:mod:`opd.demo.task`),
2. loads the shipped teacher (``opd/demo/assets/teacher``, rebuilt by
   ``python -m opd.demo.build_teacher``), which answers in both styles,
3. per seed, warm-starts a much smaller student on one style only, then trains
   copies of it for the same number of steps with three recipes through the
   regular :func:`opd.trainer.train` loop:

   - ``off_policy``: supervised KD, forward KL on the dataset's reference answers
     (both styles, 50/50), lr 4e-3,
   - ``on_policy``: lambda = 1, reverse KL on the student's own samples, lr 5e-4,
   - ``mixed``: lambda = 0.5 per sample, reverse KL, lr 1e-3,
   - ``on_policy_fkl``: lambda = 1 with forward KL, lr 4e-3 — a diagnostic row that
     separates the two ingredients (who writes the samples vs which divergence),

   each learning rate the best of {5e-4, 1e-3, 2e-3, 4e-3} for that method in a sweep
   over seeds 0-3 (300 steps, batch 32),

4. prints exact-match accuracy (greedy and on temperature-1 samples) and the mean
   first-error position for teacher, base student and each method, as mean +- std
   over seeds plus every seed's value.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from opd.demo import task

TEACHER_DIR = resources.files("opd") / "demo" / "assets" / "teacher"
METHODS = ("off_policy", "on_policy", "mixed", "on_policy_fkl")


def demo_is_correct(prompt: str, completion: str, reference: str | None) -> bool:
    """Scorer for ``eval.scorer``: any valid answer style counts."""
    return task.is_correct(prompt, completion)


def demo_first_error(prompt: str, completion: str, reference: str | None) -> int:
    """First-error position against the nearest valid answer (not the one reference)."""
    return task.first_error_position(prompt, completion)


@dataclass
class DemoSettings:
    steps: int = 300
    seeds: int = 5
    batch_size: int = 32
    n_train: int = 4000
    n_eval: int = 256
    lr: dict[str, float] = field(
        default_factory=lambda: {"off_policy": 4e-3, "on_policy": 5e-4, "mixed": 1e-3, "on_policy_fkl": 4e-3}
    )

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(steps=60, seeds=1, n_eval=128)


def method_overrides(method: str, settings: DemoSettings) -> dict[str, Any]:
    common = {
        "loss.objective": "divergence",
        "optim.lr": settings.lr[method],
        "optim.warmup_steps": 5,
        "optim.schedule": "cosine",
        "optim.min_lr_ratio": 0.1,
    }
    if method == "off_policy":
        return {**common, "rollout.on_policy_fraction": 0.0, "rollout.off_policy_source": "dataset",
                "loss.divergence": "forward_kl"}
    if method == "on_policy":
        return {**common, "rollout.on_policy_fraction": 1.0, "loss.divergence": "reverse_kl"}
    if method == "on_policy_fkl":
        return {**common, "rollout.on_policy_fraction": 1.0, "loss.divergence": "forward_kl"}
    if method == "mixed":
        return {**common, "rollout.on_policy_fraction": 0.5, "rollout.off_policy_source": "dataset",
                "loss.divergence": "reverse_kl"}
    raise ValueError(method)


def _config_dict(student_dir: Path, data_dir: Path, out: Path, seed: int, settings: DemoSettings) -> dict[str, Any]:
    return {
        "model": {"student": str(student_dir)},
        "teacher": {"model": str(TEACHER_DIR)},
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"),
                 "max_prompt_tokens": 64},
        "rollout": {"max_new_tokens": task.ANSWER_LEN + 1},
        "train": {"output_dir": str(out), "steps": settings.steps, "batch_size": settings.batch_size,
                  "seed": seed, "progress": False, "tensorboard": False, "log_every": 10},
        "eval": {"scorer": "opd.demo.run:demo_is_correct", "first_error": "opd.demo.run:demo_first_error",
                 "batch_size": 256},
        "temperature": 1.0,
    }


def _evaluate_model(model: torch.nn.Module, tokenizer: Any, eval_examples: list[Any], seed: int) -> dict[str, float]:
    from opd.eval import evaluate
    from opd.rollout import SamplingParams

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        params = SamplingParams(task.ANSWER_LEN + 1, vocab_size=len(tokenizer))
        results = evaluate(model, tokenizer, eval_examples, params, scorer=demo_is_correct,
                           first_error=demo_first_error, batch_size=256)
    return _summary(results)


def _summary(results: dict[str, Any]) -> dict[str, float]:
    return {
        "accuracy": results["eval/accuracy"],
        "accuracy_sampled": results["eval/accuracy_sampled"],
        "first_error": results["eval/first_error"],
        "first_error_sampled": results["eval/first_error_sampled"],
    }


def _aggregate(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        values = [row[key] for row in per_seed]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        out[f"{key}_per_seed"] = values
    return out


def _table(results: dict[str, Any]) -> str:
    header = (f"{'model':<14}{'greedy acc %':>18}{'sampled acc %':>18}{'first error':>14}{'train s':>9}"
              "   per-seed greedy / sampled")
    lines = [header, "-" * len(header)]
    seconds = results.get("seconds_per_method", {})
    for name in ("teacher", "student_base", *METHODS):
        row = results[name]
        seeds = " ".join(f"{100 * g:.0f}/{100 * s:.0f}" for g, s in
                         zip(row["accuracy_per_seed"], row["accuracy_sampled_per_seed"]))
        spent = f"{seconds[name]:.0f}" if name in seconds else "-"
        lines.append(
            f"{name:<14}{100 * row['accuracy']:>11.1f} ± {100 * row['accuracy_std']:<4.1f}"
            f"{100 * row['accuracy_sampled']:>11.1f} ± {100 * row['accuracy_sampled_std']:<4.1f}"
            f"{row['first_error']:>9.2f} /{task.ANSWER_LEN}{spent:>9}   {seeds}"
        )
    lines.append("(greedy = argmax decoding; sampled = temperature 1; first error = correct leading symbols, "
                 f"of {task.ANSWER_LEN}; mean ± std over seeds; train s = all seeds together)")
    return "\n".join(lines)


def _verdict(results: dict[str, Any]) -> str:
    on, off = results["on_policy"], results["off_policy"]
    wins = sum(a > b for a, b in zip(on["accuracy_sampled_per_seed"], off["accuracy_sampled_per_seed"]))
    seeds = len(on["accuracy_sampled_per_seed"])
    sampled = "beat" if on["accuracy_sampled"] > off["accuracy_sampled"] else "did NOT beat"
    greedy = "and did not lose" if on["accuracy"] >= off["accuracy"] - 0.01 else "but LOST"
    text = (f"On-policy (reverse KL) {sampled} off-policy (forward KL) on sampled accuracy "
            f"({100 * on['accuracy_sampled']:.1f}% vs {100 * off['accuracy_sampled']:.1f}%, better in {wins}/{seeds} "
            f"seeds) {greedy} on greedy accuracy ({100 * on['accuracy']:.1f}% vs {100 * off['accuracy']:.1f}%).")
    mixed = results["mixed"]
    text += (f" Mixed (lambda=0.5): {100 * mixed['accuracy']:.1f}% greedy / {100 * mixed['accuracy_sampled']:.1f}% "
             "sampled.")
    if "on_policy_fkl" in results:
        fkl = results["on_policy_fkl"]
        text += (f" On-policy with forward KL: {100 * fkl['accuracy']:.1f}% greedy / "
                 f"{100 * fkl['accuracy_sampled']:.1f}% sampled.")
    return text


def _run_seed_star(args: tuple[Any, ...]) -> dict[str, Any]:
    return _run_seed(*args)


def _run_seed(seed: int, out_dir: Path, settings: DemoSettings, threads: int) -> dict[str, Any]:
    """Warm-start one student and train it with every method; runs in a worker process."""
    from transformers.utils import logging as hf_logging

    from opd.config import DataConfig, build_config
    from opd.data import load_examples
    from opd.demo.models import warm_start_student
    from opd.models import load_causal_lm, load_tokenizer
    from opd.trainer import train

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    data_dir = out_dir / "data"
    tokenizer = load_tokenizer(str(TEACHER_DIR))
    teacher = load_causal_lm(str(TEACHER_DIR))
    eval_examples, _ = load_examples(str(data_dir / "eval.jsonl"), DataConfig(train="unused"), tokenizer)
    models: dict[str, dict[str, float]] = {"teacher": _evaluate_model(teacher, tokenizer, eval_examples, seed)}
    seconds: dict[str, float] = {}
    seed_dir = out_dir / f"seed{seed}"
    t0 = time.perf_counter()
    student = warm_start_student(tokenizer, seed=seed, log_every=0)
    base_dir = seed_dir / "student_base"
    student.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base = _evaluate_model(student, tokenizer, eval_examples, seed)
    models["student_base"] = base
    print(f"[seed {seed}] warm-started student in {time.perf_counter() - t0:.0f}s: greedy "
          f"{100 * base['accuracy']:.0f}%, sampled {100 * base['accuracy_sampled']:.0f}%", flush=True)
    for method in METHODS:
        t0 = time.perf_counter()
        cfg_dict = _config_dict(base_dir, data_dir, seed_dir / method, seed, settings)
        for key, value in method_overrides(method, settings).items():
            section, name = key.split(".")
            cfg_dict.setdefault(section, {})[name] = value
        result = train(build_config(cfg_dict), log=lambda *_: None)
        seconds[method] = time.perf_counter() - t0
        summary = _summary(result.final_eval)
        models[method] = summary
        print(f"[seed {seed}] {method:<10} {seconds[method]:5.0f}s  greedy {100 * summary['accuracy']:5.1f}%  "
              f"sampled {100 * summary['accuracy_sampled']:5.1f}%  first error {summary['first_error']:.2f}",
              flush=True)
    return {"models": models, "seconds": seconds}


def run_demo(
    out_dir: Path = Path("runs/demo"),
    steps: int | None = None,
    seeds: int | None = None,
    quick: bool = False,
    json_path: Path | None = None,
    threads: int = 1,
    jobs: int = 2,
    log: Any = print,
) -> dict[str, Any]:
    """Run the whole comparison; returns the results dict also written with ``json_path``."""
    from transformers.utils import logging as hf_logging

    from opd.errors import OpdError

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    torch.set_num_threads(threads)
    settings = DemoSettings.quick() if quick else DemoSettings()
    if steps is not None:
        settings.steps = steps
    if seeds is not None:
        settings.seeds = seeds
    if settings.steps < 1 or settings.seeds < 1:
        raise OpdError("--steps and --seeds must be >= 1")
    if not (TEACHER_DIR / "model.safetensors").is_file():
        raise OpdError(f"the demo teacher is missing from {TEACHER_DIR}; "
                       "rebuild it with python -m opd.demo.build_teacher")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OpdError(f"{out_dir} is not empty; pass --out NEW_DIR or remove it")

    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True)
    train_rows, eval_rows = task.make_splits(settings.n_train, settings.n_eval, seed=0)
    task.write_jsonl(train_rows, data_dir / "train.jsonl")
    task.write_jsonl(eval_rows, data_dir / "eval.jsonl")

    log(f"opd demo: {settings.seeds} seed(s) x {len(METHODS)} methods x {settings.steps} steps, "
        f"batch {settings.batch_size}, {len(eval_rows)} held-out prompts, {jobs} process(es) x {threads} thread(s)")
    per_model: dict[str, list[dict[str, float]]] = {name: [] for name in ("teacher", "student_base", *METHODS)}
    timings: dict[str, float] = {m: 0.0 for m in METHODS}
    jobs = max(1, min(jobs, settings.seeds))
    args = [(seed, out_dir, settings, threads) for seed in range(settings.seeds)]
    if jobs == 1:
        seed_results = [_run_seed(*a) for a in args]
    else:
        # Seeds are independent: one process per seed, one thread each (tiny models scale
        # better over processes than over intra-op threads).
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            seed_results = list(pool.map(_run_seed_star, args))
    for seed_result in seed_results:
        for name, row in seed_result["models"].items():
            per_model[name].append(row)
        for method, seconds in seed_result["seconds"].items():
            timings[method] += seconds

    results: dict[str, Any] = {name: _aggregate(rows) for name, rows in per_model.items()}
    results["seconds"] = time.perf_counter() - started
    results["seconds_per_method"] = timings
    results["settings"] = {"steps": settings.steps, "seeds": settings.seeds, "batch_size": settings.batch_size,
                           "n_eval": len(eval_rows), "jobs": jobs, "threads": threads,
                           "lr": settings.lr}
    results["verdict"] = _verdict(results)
    log("")
    log(_table(results))
    log("")
    log(results["verdict"])
    log(f"total {results['seconds']:.0f}s; runs in {out_dir}")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return results
