"""Train and save the demo teacher: ``python -m opd.demo.build_teacher [--out DIR] [--steps N] [--seed S]``.

Builds the tokenizer, trains a :func:`~opd.demo.models.teacher_config` Llama
on the training split (both answer styles, 50/50) with
:func:`~opd.demo.models.train_supervised`, reports held-out greedy and
temperature-1 sampled accuracy plus the style mix of sampled answers, and
saves model + tokenizer (safetensors) with a README describing the run.

Hyper-parameters: lr 1e-3 (3e-3 stalls on the loss plateau at ~2.02, i.e.
uniform digits, for thousands of steps), batch 128, 3000 steps.  The loss
leaves the plateau after ~600-1000 steps and reaches its floor (ln 2 / 14,
the unpredictable style token) by ~1500; the rest is margin.  About 2 minutes
on an idle 2-core CPU; bit-for-bit reproducible given the seed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from .models import (
    count_parameters,
    generate_completions,
    score_completions,
    teacher_config,
    train_supervised,
    warm_start_student,
)
from .task import N_EVAL, NUM_DIGITS, make_splits
from .tokenizer import build_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "assets" / "teacher"
DEFAULT_STEPS = 3000
DEFAULT_SEED = 0
N_TRAIN = 200_000
BATCH_SIZE = 128
LR = 1e-3


def evaluate(model, tokenizer, examples, seed: int) -> dict[str, float]:
    """Greedy and temperature-1 sampled accuracy / first-error position, and sampled style mix."""
    prompts = [ex["prompt"] for ex in examples]
    greedy = generate_completions(model, tokenizer, prompts)
    torch.manual_seed(seed)
    sampled = generate_completions(model, tokenizer, prompts, do_sample=True, temperature=1.0)
    g_acc, g_fep = score_completions(prompts, greedy)
    s_acc, s_fep = score_completions(prompts, sampled)
    n = max(1, len(prompts))
    return {
        "greedy_acc": g_acc,
        "greedy_first_error": g_fep,
        "sampled_acc": s_acc,
        "sampled_first_error": s_fep,
        "sampled_plus": sum(c.startswith("+") for c in sampled) / n,
        "sampled_minus": sum(c.startswith("-") for c in sampled) / n,
        "greedy_plus": sum(c.startswith("+") for c in greedy) / n,
    }


def _readme(args: argparse.Namespace, n_params: int, metrics: dict[str, float], seconds: float) -> str:
    return f"""# Demo teacher

Tiny Llama teacher for the `opd` built-in demo task (`opd.demo.task`):
{NUM_DIGITS} input digits -> style token (`+` running sum / `-` running difference, mod 10)
followed by {NUM_DIGITS} output digits.

Rebuild (CPU, deterministic given the seed):

```
PYTHONPATH=src python -m opd.demo.build_teacher --steps {args.steps} --seed {args.seed}
```

- parameters: {n_params:,}
- training: {args.steps} steps, batch {BATCH_SIZE}, lr {LR}, {N_TRAIN:,} training examples
  (both styles 50/50), {seconds:.0f} s on a 2-core CPU
- held-out prompts: {N_EVAL} (disjoint from training)
- greedy accuracy: {metrics["greedy_acc"]:.2%} (mean first-error position {metrics["greedy_first_error"]:.2f})
- sampled (temperature 1) accuracy: {metrics["sampled_acc"]:.2%}
  (mean first-error position {metrics["sampled_first_error"]:.2f})
- style of sampled answers: `+` {metrics["sampled_plus"]:.1%}, `-` {metrics["sampled_minus"]:.1%}
"""


STUDENTS_OUT = Path(__file__).resolve().parent / "assets" / "control_students"
STUDENT_SEEDS = tuple(range(8))


def build_students(out: Path = STUDENTS_OUT, seeds: tuple[int, ...] = STUDENT_SEEDS) -> None:
    """The demo's warm-started control students (:func:`~opd.demo.models.warm_start_student`, one per
    seed; seeds 0-4 are reported, 5-7 only choose learning rates), shipped so ``opd demo`` does not
    spend its time budget re-training them."""
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    for seed in seeds:
        model = warm_start_student(tokenizer, seed=seed)
        folder = out / f"seed{seed}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print(f"saved {folder}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Command-line entry point; returns the held-out metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    parser.add_argument("--students", action="store_true",
                        help="instead of the teacher, build the warm-started students (assets/control_students)")
    args = parser.parse_args(argv)
    if args.students:
        build_students(args.out if args.out != DEFAULT_OUT else STUDENTS_OUT)
        return {}

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    train, held_out = make_splits(N_TRAIN, N_EVAL, args.seed)
    model = LlamaForCausalLM(teacher_config(len(tokenizer)))
    n_params = count_parameters(model)
    print(f"teacher: {n_params:,} parameters; {len(train):,} train / {len(held_out)} held-out examples", flush=True)

    start = time.perf_counter()
    train_supervised(model, tokenizer, train, steps=args.steps, lr=LR, batch_size=BATCH_SIZE, seed=args.seed)
    seconds = time.perf_counter() - start

    metrics = evaluate(model, tokenizer, held_out, args.seed)
    print(
        f"held-out greedy acc {metrics['greedy_acc']:.2%}  sampled(T=1) acc {metrics['sampled_acc']:.2%}  "
        f"sampled styles +{metrics['sampled_plus']:.1%} / -{metrics['sampled_minus']:.1%}  "
        f"(train {seconds:.0f}s)",
        flush=True,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "README.md").write_text(_readme(args, n_params, metrics, seconds), encoding="utf-8")
    print(f"saved to {args.out}")
    return metrics


if __name__ == "__main__":
    main()
