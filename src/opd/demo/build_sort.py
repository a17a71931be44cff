"""Build the sorting task's shipped models: ``python -m opd.demo.build_sort [--only teacher|students]``.

* **Teacher** (``assets/sort/teacher``): a :func:`~opd.demo.models.sort_teacher_config` Llama trained
  with noise-injected teacher forcing. In every training sequence a random share (uniform in
  ``[0, NOISE]``) of the answer tokens the model *reads* is corrupted -- half of them moved to a
  neighbouring digit (the student's typical slip: one run too long or too short), half replaced by
  a random digit -- while the targets stay the clean sorted digits. It therefore learns the right
  next token after wrong prefixes too, which on-policy distillation needs (it asks the teacher about
  the student's own wrong prefixes). Its accuracy from corrupted prefixes is measured here and, on
  the students' real mistakes, by ``opd demo`` itself.
* **Students** (``assets/sort/students/seed{N}``): :func:`~opd.demo.models.sort_student_config`
  models warm-started by plain supervised training on the reference answers (clean prefixes) for
  ``--student-steps`` steps, one per seed. Seeds 0-4 are the demo's reported seeds; seeds 5-7 are
  only used to choose learning rates (:mod:`opd.demo.tune`). The training curve written to the
  README shows where supervised training plateaus (the capacity gap).

Deterministic given the seeds on one machine and thread count (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from . import sort_task
from .models import count_parameters, encode_example, sort_student_config, sort_teacher_config, train_supervised
from .tokenizer import VOCAB, build_tokenizer

OUT = Path(__file__).resolve().parent / "assets" / "sort"
TEACHER_STEPS = 3000
TEACHER_LR = 1e-3
TEACHER_BATCH = 128
NOISE = 0.3
STUDENT_STEPS = 3000
STUDENT_LR = 3e-3
STUDENT_BATCH = 64
STUDENT_SEEDS = tuple(range(8))
N_TRAIN = 50_000
N_HELD_OUT = 512
FIRST_DIGIT = VOCAB["0"]


def _corrupt_at(ids: list[int], rate: float, generator: torch.Generator) -> list[int]:
    """Each answer token but the final ``</s>`` is corrupted with probability ``rate``: half the
    time moved to a neighbouring digit, half the time replaced by a uniformly random digit."""
    n = len(ids) - 1
    u_3N = torch.rand(3, n, generator=generator)
    random_N = torch.randint(0, 10, (n,), generator=generator)
    digits_N = torch.tensor(ids[:n]) - FIRST_DIGIT
    neighbour_N = torch.where(u_3N[2] < 0.5, digits_N - 1, digits_N + 1)
    neighbour_N = torch.where(neighbour_N < 0, digits_N + 1, neighbour_N)
    neighbour_N = torch.where(neighbour_N > 9, digits_N - 1, neighbour_N)
    replaced_N = torch.where(u_3N[1] < 0.5, neighbour_N, random_N)
    shown_N = torch.where(u_3N[0] < rate, replaced_N, digits_N)
    return (shown_N + FIRST_DIGIT).tolist() + ids[n:]


def corrupt_sorted(max_rate: float):
    """The teacher's ``corrupt`` function for :func:`~opd.demo.models.train_supervised`: a corruption
    rate drawn per sequence, uniform in ``[0, max_rate]`` (clean and badly corrupted prefixes alike)."""

    def corrupt(ids: list[int], generator: torch.Generator) -> list[int]:
        return _corrupt_at(ids, float(torch.rand((), generator=generator)) * max_rate, generator)

    return corrupt


@torch.no_grad()
def teacher_forced_accuracy(model: LlamaForCausalLM, tokenizer, rows: Sequence[dict], rate: float,
                            seed: int = 0) -> float:
    """Greedy next-token accuracy under teacher forcing with a share ``rate`` of the read answer
    tokens corrupted as in training, scored against the clean answer at every position."""
    generator = torch.Generator().manual_seed(seed)
    hits, total = 0, 0
    for start in range(0, len(rows), 128):
        batch = [encode_example(tokenizer, r["prompt"], r["answer"]) for r in rows[start : start + 128]]
        input_ids = torch.tensor([p + _corrupt_at(list(c), rate, generator) for p, c in batch])
        pred = model(input_ids=input_ids).logits.argmax(-1)
        for row, (prompt_ids, completion_ids) in enumerate(batch):
            p = len(prompt_ids)
            for t, want in enumerate(completion_ids):
                hits += int(pred[row, p - 1 + t]) == want
                total += 1
    return hits / total


def free_running(model: LlamaForCausalLM, tokenizer, rows: Sequence[dict], seed: int) -> dict[str, float]:
    """Exact match and per-token accuracy of greedy and temperature-1 answers."""
    from opd.config import DataConfig
    from opd.data import load_examples
    from opd.eval import evaluate
    from opd.rollout import SamplingParams

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "held_out.jsonl"
        path.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
        examples, _ = load_examples(str(path), DataConfig(train="unused", max_prompt_tokens=64), tokenizer)
    params = SamplingParams(sort_task.ANSWER_LEN + 1, vocab_size=len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        results = evaluate(model, tokenizer, examples, params, scorer=sort_task.is_correct,
                           first_error=sort_task.first_error_position, token_correct=sort_task.token_correct,
                           degenerate=sort_task.wrong_length, batch_size=256)
    return {k.split("/")[1]: v for k, v in results.items()
            if k.split("/")[1] in ("accuracy", "accuracy_sampled", "token_accuracy", "token_accuracy_sampled")}


def build_teacher(out: Path, steps: int, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(model_max_length=128)
    train, held_out = sort_task.make_splits(N_TRAIN, N_HELD_OUT, seed=0)
    model = LlamaForCausalLM(sort_teacher_config(len(tokenizer)))
    print(f"teacher: {count_parameters(model):,} parameters, {steps} steps, noise up to {NOISE:.0%}", flush=True)
    started = time.perf_counter()
    train_supervised(model, tokenizer, train, steps=steps, lr=TEACHER_LR, batch_size=TEACHER_BATCH, seed=seed,
                     corrupt=corrupt_sorted(NOISE))
    seconds = time.perf_counter() - started
    metrics = {f"teacher_forced_{int(100 * r)}": teacher_forced_accuracy(model, tokenizer, held_out, r)
               for r in (0.0, 0.1, 0.3)}
    metrics.update(free_running(model, tokenizer, held_out, seed))
    metrics["parameters"] = count_parameters(model)
    metrics["seconds"] = seconds
    print(json.dumps(metrics, indent=1), flush=True)
    _save(model, tokenizer, out / "teacher")
    return metrics


def build_student(out: Path, seed: int, steps: int, check_every: int = 500) -> dict[str, object]:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(model_max_length=128)
    train, held_out = sort_task.make_splits(N_TRAIN, N_HELD_OUT, seed=0)
    model = LlamaForCausalLM(sort_student_config(len(tokenizer)))
    curve: list[dict[str, float]] = []

    def checkpoint(step: int, loss: float) -> bool:
        if step % check_every == 0 or step == steps:
            model.eval()
            row = {"step": step, "teacher_forced": teacher_forced_accuracy(model, tokenizer, held_out[:256], 0.0),
                   **free_running(model, tokenizer, held_out[:256], seed)}
            model.train()
            curve.append(row)
            print(f"student seed {seed}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in row.items()), flush=True)
        return False

    started = time.perf_counter()
    train_supervised(model, tokenizer, train, steps=steps, lr=STUDENT_LR, batch_size=STUDENT_BATCH, seed=seed,
                     log_every=0, callback=checkpoint)
    _save(model, tokenizer, out / "students" / f"seed{seed}")
    return {"seed": seed, "parameters": count_parameters(model), "seconds": time.perf_counter() - started,
            "curve": curve}


def _save(model: LlamaForCausalLM, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", choices=("teacher", "students"))
    parser.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS)
    parser.add_argument("--student-steps", type=int, default=STUDENT_STEPS)
    parser.add_argument("--seeds", type=int, nargs="*", default=list(STUDENT_SEEDS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report_path = args.out / "build.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if args.only in (None, "teacher"):
        report["teacher"] = build_teacher(args.out, args.teacher_steps)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=1))
    if args.only in (None, "students"):
        students = report.setdefault("students", {})
        for seed in args.seeds:
            students[str(seed)] = build_student(args.out, seed, args.student_steps)
            report_path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
