"""``opd demo``: when and why on-policy distillation wins, measured on two tasks on CPU.

The claim under test (DAgger, arXiv 1011.0686; GKD, arXiv 2306.13649; the OPD survey): a student
trained only on clean teacher/reference prefixes never learns to act after its own mistakes, so its
errors compound over long outputs (an O(eps T^2) bound off-policy against O(eps T) on the learner's
own states), and training on the student's own samples with the teacher's feedback removes that.
The bound needs three things, and the headline task is built to have them:

* **errors the student cannot avoid**: a student too small to fit the task (its per-token error
  stays above zero under supervised training: a real capacity gap);
* **errors it can recover from**: output position ``t`` is fixed by the input and ``t``, so after a
  wrong token a right continuation exists (:mod:`opd.demo.sort_task`, sorting 48 digits);
* **a teacher that knows how to recover**: the shipped sorting teacher was trained on corrupted
  prefixes with clean targets; the demo measures its accuracy on the student's own wrong prefixes.

Two tasks, each with ``seeds`` students (shipped warm starts for the headline, built on the fly
for the control) distilled with the regular :func:`opd.trainer.train` loop:

* ``headline`` -- sorting 48 digits (long, recoverable, capacity gap);
* ``control`` -- the 13-symbol running-sum task with two answer styles (:mod:`opd.demo.task`):
  short outputs, and after a wrong digit every later digit is wrong, so there is nothing to recover.

Methods (every one from the shipped recipes, with a decaying learning-rate schedule):

* ``off_policy`` -- ``supervised_kd``: forward KL on the dataset's reference answers (lambda = 0);
* ``on_policy`` -- ``on_policy_rkl``: reverse KL on the student's own samples (lambda = 1);
* ``mixed`` -- GKD's per-sample mixture, lambda = 0.5, reverse KL;
* ``off_to_on`` -- ``off_to_on_policy``: a lambda schedule, reference answers first, then the
  student's samples;

each at equal steps, and ``<method>_equal_time``: the same method given only the wall-clock time
that ``off_policy`` took for its steps in the same worker (the step count scaled by the measured
ratio of the two runs' times). Learning rates were chosen per task and method on seeds that are
not reported (:mod:`opd.demo.tune`).

Scores per model: exact match and per-token accuracy, greedy and at temperature 1, per output
position, the recovery curve (accuracy ``d`` tokens after the first error), answer length and the
degenerate-answer rate. The headline task also checks the third condition from the student's side
(:func:`recovery_check`): whether a model of the student's size can learn to recover at all when it
is taught recovery directly. The verdict lines are computed from the numbers, and ``--out`` gets a PNG
of the per-position and recovery curves (``demo.png``) and every number (``results.json``).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from opd.demo import sort_task, task

TEACHER_DIR = resources.files("opd") / "demo" / "assets" / "teacher"
"""The control task's teacher (running sums); kept under this name for ``benchmarks/methods.py``."""
SORT_DIR = resources.files("opd") / "demo" / "assets" / "sort"
SORT_TEACHER_DIR = SORT_DIR / "teacher"
METHODS = ("off_policy", "on_policy", "mixed", "off_to_on")
"""Every compared method; ``off_to_on`` runs with ``opd demo --schedule`` (it costs about as much as
``on_policy`` and kept the 6-minute budget out of reach)."""
DEFAULT_METHODS = ("off_policy", "on_policy", "mixed")
EQUAL_TIME = ("on_policy", "mixed", "off_to_on")
REPORTED_SEEDS = (0, 1, 2, 3, 4)
TUNING_SEEDS = (5, 6, 7)
"""Learning rates were picked on these seeds only (:mod:`opd.demo.tune`); the demo reports others."""


# ---------------------------------------------------------------------------------------------
# scorers (module-level functions: configs name them as module:function)


def demo_is_correct(prompt: str, completion: str, reference: str | None) -> bool:
    """Control task scorer for ``eval.scorer``: any valid answer style counts."""
    return task.is_correct(prompt, completion)


def demo_first_error(prompt: str, completion: str, reference: str | None) -> int:
    """First-error position against the nearest valid answer (not the one reference)."""
    return task.first_error_position(prompt, completion)


def control_token_correct(prompt: str, completion: str, reference: str | None = None) -> list[bool]:
    """Per position, against the valid answer in the style the completion chose (its first symbol;
    the better-matching style if the first symbol is no style)."""
    got = completion.split()
    best: list[bool] = []
    for answer in task.valid_answers(prompt):
        want = answer.split()
        marks = [i < len(got) and got[i] == w for i, w in enumerate(want)]
        if got and got[0] == want[0]:
            return marks
        if sum(marks) > sum(best):
            best = marks
    return best or [False] * task.ANSWER_LEN


def control_wrong_length(prompt: str, completion: str, reference: str | None = None) -> bool:
    """Degenerate answer of the control task: not exactly style token + 12 digits."""
    return len(completion.split()) != task.ANSWER_LEN


# ---------------------------------------------------------------------------------------------
# the two tasks


@dataclass(frozen=True)
class DemoTask:
    key: str
    name: str
    description: str
    teacher_dir: Any
    max_new_tokens: int
    is_correct: Callable[[str, str, str | None], bool]
    first_error: Callable[[str, str, str | None], int]
    token_correct: Callable[[str, str, str | None], list[bool]]
    degenerate: Callable[[str, str, str | None], bool]
    steps: int
    batch_size: int
    lr: dict[str, float]
    n_train: int = 4000
    n_eval: int = 256
    recovery_noise: float = 0.0
    """Largest share of corrupted prefix tokens in the recovery check (:func:`recovery_check`); 0: none."""
    recovery_steps: int = 200
    """Steps of that check's noise-injected training (batch ``batch_size``, lr 1e-3)."""

    def splits(self, n_train: int, n_eval: int, validation: bool = False
               ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """Training rows and held-out rows; ``validation`` gives other held-out prompts (the
        learning-rate sweep's), so the reported numbers are on prompts no choice was made on."""
        make = sort_task.make_splits if self.key == "headline" else task.make_splits
        train, held_out = make(n_train, n_eval, seed=0)
        if validation:
            held_out = make(0, n_eval, seed=1)[1]
        return train, held_out


TASKS: dict[str, DemoTask] = {
    "headline": DemoTask(
        key="headline", name="sort48",
        description="sort 48 digits (48-token answers; errors recoverable; 4.4k-param student)",
        teacher_dir=SORT_TEACHER_DIR, max_new_tokens=sort_task.ANSWER_LEN + 1,
        is_correct=sort_task.is_correct, first_error=sort_task.first_error_position,
        token_correct=sort_task.token_correct, degenerate=sort_task.wrong_length,
        steps=80, batch_size=32, n_eval=128,
        lr={"off_policy": 1e-3, "on_policy": 1e-3, "mixed": 1e-3, "off_to_on": 1e-3},
        recovery_noise=0.3,
    ),
    "control": DemoTask(
        key="control", name="running_sum13",
        description="running sum / difference, 2 styles (13-token answers; an error is unrecoverable)",
        teacher_dir=TEACHER_DIR, max_new_tokens=task.ANSWER_LEN + 1,
        is_correct=demo_is_correct, first_error=demo_first_error,
        token_correct=control_token_correct, degenerate=control_wrong_length,
        steps=200, batch_size=32, n_eval=128,
        lr={"off_policy": 4e-3, "on_policy": 5e-4, "mixed": 1e-3, "off_to_on": 4e-3},
    ),
}

RECIPES = {"off_policy": "supervised_kd", "on_policy": "on_policy_rkl", "mixed": "on_policy_rkl",
           "off_to_on": "off_to_on_policy", "on_policy_fkl": "on_policy_rkl"}
"""The shipped recipe behind each method; ``mixed`` is ``on_policy_rkl`` with lambda = 0.5 on
reference answers (GKD's mixture with reverse KL); ``on_policy_fkl`` (a diagnostic for
:mod:`opd.demo.tune`, not in the demo's table) is lambda = 1 with forward KL, i.e. DAgger with the
teacher's soft labels on the student's own prefixes."""


@dataclass
class DemoSettings:
    """Run sizes. ``steps`` / ``batch_size`` / ``lr`` of the control task are also what
    ``benchmarks/methods.py`` trains with (through :func:`_config_dict`)."""

    steps: int = 300
    seeds: int = 5
    batch_size: int = 32
    n_train: int = 4000
    n_eval: int = 256
    lr: dict[str, float] = field(default_factory=lambda: dict(TASKS["control"].lr))

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(steps=60, seeds=1, n_eval=128)


# ---------------------------------------------------------------------------------------------
# configs


def _config_dict(student_dir: Path, data_dir: Path, out: Path, seed: int, settings: DemoSettings) -> dict[str, Any]:
    """Control-task run config (used by ``benchmarks/methods.py``)."""
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


def method_config(demo_task: DemoTask, method: str, student_dir: Path, data_dir: Path, out: Path, seed: int,
                  steps: int, batch_size: int, lr: float, threads: int = 1) -> Any:
    """The run config of ``method``: its shipped recipe plus the demo's sizes. The trainer's own
    end-of-run evaluation is off (``data.eval`` unset); the demo evaluates the final student itself
    with per-position scores."""
    from opd.config import load_config

    overrides: dict[str, Any] = {
        "model.student": str(student_dir),
        "teacher.model": str(demo_task.teacher_dir),
        "data.train": str(data_dir / "train.jsonl"),
        "data.max_prompt_tokens": 64,
        "rollout.max_new_tokens": demo_task.max_new_tokens,
        "optim.lr": lr,
        "optim.warmup_steps": max(1, min(10, steps // 10)),
        "optim.schedule": "cosine",
        "optim.min_lr_ratio": 0.1,
        "train.output_dir": str(out),
        "train.steps": steps,
        "train.batch_size": batch_size,
        "train.seed": seed,
        "train.threads": threads,
        "train.progress": False,
        "train.tensorboard": False,
        "train.log_every": 10,
        "temperature": 1.0,
    }
    if method == "mixed":
        overrides["rollout.on_policy_fraction"] = 0.5
        overrides["rollout.off_policy_source"] = "dataset"
    if method == "on_policy_fkl":
        overrides["loss.divergence"] = "forward_kl"
    return load_config(RECIPES[method], [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


# ---------------------------------------------------------------------------------------------
# evaluation


def _evaluate_model(model: torch.nn.Module, tokenizer: Any, eval_examples: list[Any], seed: int) -> dict[str, float]:
    """Control task: exact match and first-error position, greedy and sampled (``benchmarks/methods.py``)."""
    return _summary(_raw_eval(TASKS["control"], model, tokenizer, eval_examples, seed))


def _summary(results: dict[str, Any]) -> dict[str, float]:
    return {
        "accuracy": results["eval/accuracy"],
        "accuracy_sampled": results["eval/accuracy_sampled"],
        "first_error": results["eval/first_error"],
        "first_error_sampled": results["eval/first_error_sampled"],
    }


def _raw_eval(demo_task: DemoTask, model: torch.nn.Module, tokenizer: Any, examples: list[Any], seed: int,
              keep_completions: bool = False) -> dict[str, Any]:
    from opd.eval import evaluate
    from opd.rollout import SamplingParams

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        params = SamplingParams(demo_task.max_new_tokens, vocab_size=len(tokenizer))
        return evaluate(model, tokenizer, examples, params, scorer=demo_task.is_correct,
                        first_error=demo_task.first_error, token_correct=demo_task.token_correct,
                        degenerate=demo_task.degenerate, batch_size=256, keep_completions=keep_completions)


SCALARS = ("accuracy", "accuracy_sampled", "token_accuracy", "token_accuracy_sampled", "first_error",
           "first_error_sampled", "recovery", "recovery_sampled", "mean_length", "mean_length_sampled",
           "degenerate_rate", "degenerate_rate_sampled")
CURVES = ("position_accuracy", "position_accuracy_sampled", "recovery_curve", "recovery_curve_sampled")


def _scores(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {key: results.get(f"eval/{key}") for key in SCALARS + CURVES}
    return out


@torch.no_grad()
def teacher_on_student_prefixes(teacher: torch.nn.Module, demo_task: DemoTask, examples: list[Any],
                                completions: list[list[int]], tokenizer: Any) -> dict[str, float | None]:
    """The teacher's greedy next-token accuracy on the prefixes a student actually wrote.

    For every sampled completion, the teacher reads prompt + completion and predicts each position;
    positions after the completion's first error (a prefix with a mistake in it) and up to it (a clean
    prefix) are scored separately against the right token. A teacher that cannot act from the
    student's wrong prefixes gives on-policy distillation wrong targets exactly where it matters.
    """
    hits = {"clean": 0, "after_error": 0}
    seen = {"clean": 0, "after_error": 0}
    for start in range(0, len(examples), 128):
        rows = []
        for example, ids in zip(examples[start : start + 128], completions[start : start + 128]):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            right = _right_tokens(demo_task, example, text, tokenizer)
            n = min(len(right), len(ids))
            if n:
                marks = [a == b for a, b in zip(ids[:n], right[:n])]
                first = next((t for t, ok in enumerate(marks) if not ok), n)
                rows.append((list(example.prompt_ids), list(ids[:n]), right[:n], first))
        if not rows:
            continue
        width = max(len(p) + len(c) for p, c, _, _ in rows)
        input_ids_BT = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_BT = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, c, _, _) in enumerate(rows):  # right padding: real positions are unaffected
            input_ids_BT[i, : len(p) + len(c)] = torch.tensor(p + c)
            attention_BT[i, : len(p) + len(c)] = 1
        pred_BT = teacher(input_ids=input_ids_BT, attention_mask=attention_BT).logits.argmax(-1)
        for i, (p, c, right, first) in enumerate(rows):
            for t in range(len(c)):
                kind = "clean" if t <= first else "after_error"
                seen[kind] += 1
                hits[kind] += int(pred_BT[i, len(p) - 1 + t]) == right[t]
    return {f"teacher_accuracy_{kind}": hits[kind] / seen[kind] if seen[kind] else None for kind in hits}


def recovery_check(demo_task: DemoTask, teacher: torch.nn.Module, student_dir: Path, data_dir: Path,
                   tokenizer: Any, eval_examples: list[Any], seed: int) -> dict[str, float]:
    """Can a model of the student's size learn the teacher's recovery at all?

    The imitation-learning bound behind on-policy distillation (DAgger, arXiv 1011.0686, section 3)
    is stated against the best policy *in the learner's class* on the learner's own states. If no
    student-sized model acts well both on clean prefixes and after a slip, training on the student's
    own states can only trade one for the other; it cannot remove the compounding.

    The check gives recovery the most direct supervision there is. A copy of the base student is
    trained for ``recovery_steps`` steps on the reference answers, with up to ``recovery_noise`` of
    the prefix tokens it reads corrupted and the targets kept right. That is the teacher's own
    recipe, i.e. noise injection (DART, arXiv 1703.09327). Teacher-forced accuracy on clean and
    corrupted prefixes, and free-running per-token accuracy, are measured before and after, with the
    teacher's teacher-forced accuracy as the reference. Fractions in [0, 1].
    """
    from opd.demo.build_sort import corrupt_sorted, teacher_forced_accuracy
    from opd.demo.models import train_supervised
    from opd.models import load_causal_lm

    def read(name: str) -> list[dict[str, str]]:
        return [json.loads(line) for line in (data_dir / name).read_text().splitlines() if line.strip()]

    held_out, rate = read("eval.jsonl"), demo_task.recovery_noise
    out: dict[str, float] = {}

    def forced(prefix: str, model: torch.nn.Module) -> None:
        model.eval()
        out[f"{prefix}_clean"] = teacher_forced_accuracy(model, tokenizer, held_out, 0.0, seed=seed)
        out[f"{prefix}_corrupted"] = teacher_forced_accuracy(model, tokenizer, held_out, rate, seed=seed)

    forced("teacher", teacher)
    student = load_causal_lm(str(student_dir))
    forced("base", student)
    train_supervised(student, tokenizer, read("train.jsonl"), steps=demo_task.recovery_steps, lr=1e-3,
                     batch_size=demo_task.batch_size, seed=seed + 1000, log_every=0, corrupt=corrupt_sorted(rate))
    forced("trained", student)
    scores = _scores(_raw_eval(demo_task, student, tokenizer, eval_examples, seed))
    out["trained_token_accuracy"] = scores["token_accuracy"]
    out["trained_token_accuracy_sampled"] = scores["token_accuracy_sampled"]
    return out


def _right_tokens(demo_task: DemoTask, example: Any, text: str, tokenizer: Any) -> list[int]:
    """Token ids of the right answer at each position (the style the completion chose, on the control task)."""
    if demo_task.key == "headline":
        answer = sort_task.solve(sort_task.parse_prompt(example.prompt))
    else:
        answers = task.valid_answers(example.prompt)
        answer = next((a for a in answers if text.split()[:1] == a.split()[:1]), answers[0])
    return tokenizer(answer, add_special_tokens=False).input_ids


# ---------------------------------------------------------------------------------------------
# one (task, seed) job, in a worker process


CONTROL_STUDENTS_DIR = resources.files("opd") / "demo" / "assets" / "control_students"


def _base_student(demo_task: DemoTask, seed: int, tokenizer: Any, seed_dir: Path) -> tuple[Path, float]:
    """The warm-started student of ``seed`` (shipped; ``python -m opd.demo.build_sort`` and
    ``python -m opd.demo.build_teacher --students`` rebuild them) and the seconds it took to get it.
    A control seed that is not shipped is warm-started here."""
    started = time.perf_counter()
    shipped = (SORT_DIR / "students" if demo_task.key == "headline" else CONTROL_STUDENTS_DIR) / f"seed{seed}"
    if (shipped / "model.safetensors").is_file():
        return Path(str(shipped)), time.perf_counter() - started
    if demo_task.key == "headline":
        from opd.errors import OpdError

        raise OpdError(f"no shipped sorting student for seed {seed} in {SORT_DIR / 'students'}; "
                       "build it with python -m opd.demo.build_sort")
    from opd.demo.models import warm_start_student

    student = warm_start_student(tokenizer, seed=seed, log_every=0)
    base_dir = seed_dir / "student_base"
    student.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return base_dir, time.perf_counter() - started


def _run_job_star(args: tuple[Any, ...]) -> dict[str, Any]:
    return _run_job(*args)


def _run_job(task_key: str, seed: int, out_dir: Path, settings: dict[str, Any], threads: int,
             tuning_lrs: tuple[float, ...] | None = None) -> dict[str, Any]:
    """Evaluate teacher and base student of one task and seed, then train and evaluate every method:
    at equal steps and at equal wall-clock, or, with ``tuning_lrs``, at every one of those learning
    rates (the sweep of :mod:`opd.demo.tune`)."""
    from transformers.utils import logging as hf_logging

    from opd.config import DataConfig
    from opd.data import load_examples
    from opd.models import load_causal_lm, load_tokenizer
    from opd.trainer import train

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    demo_task = replace(TASKS[task_key], **settings["tasks"][task_key])
    task_dir = out_dir / task_key
    data_dir = task_dir / "data"
    seed_dir = task_dir / f"seed{seed}"
    tag = f"[{demo_task.name} seed {seed}]"
    tokenizer = load_tokenizer(str(demo_task.teacher_dir))
    teacher = load_causal_lm(str(demo_task.teacher_dir))
    eval_examples, _ = load_examples(str(data_dir / "eval.jsonl"), DataConfig(train="unused", max_prompt_tokens=64),
                                     tokenizer)
    models: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    steps_used: dict[str, int] = {}
    prefix_checks: dict[str, dict[str, float | None]] = {}

    def score(name: str, model: torch.nn.Module) -> None:
        raw = _raw_eval(demo_task, model, tokenizer, eval_examples, seed, keep_completions=True)
        models[name] = _scores(raw)
        if name != "teacher":
            prefix_checks[name] = teacher_on_student_prefixes(teacher, demo_task, eval_examples,
                                                              raw["eval/completions_sampled"], tokenizer)

    score("teacher", teacher)
    base_dir, seconds["student_base"] = _base_student(demo_task, seed, tokenizer, seed_dir)
    score("student_base", load_causal_lm(str(base_dir)))
    base = models["student_base"]
    # The learning-rate sweep only compares methods; the recovery check is the demo's report.
    recovery = (recovery_check(demo_task, teacher, base_dir, data_dir, tokenizer, eval_examples, seed)
                if demo_task.recovery_noise > 0 and tuning_lrs is None else None)
    print(f"{tag} base student: exact {100 * base['accuracy']:.0f}% / {100 * base['accuracy_sampled']:.0f}%, "
          f"per-token {100 * base['token_accuracy']:.1f}% / {100 * base['token_accuracy_sampled']:.1f}% "
          "(greedy / sampled)", flush=True)

    def run(name: str, method: str, steps: int, lr: float) -> None:
        started = time.perf_counter()
        config = method_config(demo_task, method, base_dir, data_dir, seed_dir / name, seed, steps,
                               demo_task.batch_size, lr, threads)
        result = train(config, log=lambda *_: None)
        seconds[name] = time.perf_counter() - started
        steps_used[name] = steps
        score(name, load_causal_lm(str(result.final_dir)))
        row = models[name]
        print(f"{tag} {name:<22} {steps:4d} steps {seconds[name]:5.0f}s  exact {100 * row['accuracy']:5.1f}% / "
              f"{100 * row['accuracy_sampled']:5.1f}%  per-token {100 * row['token_accuracy']:5.1f}% / "
              f"{100 * row['token_accuracy_sampled']:5.1f}%", flush=True)

    if tuning_lrs is not None:
        for method in settings.get("methods", METHODS):
            for lr in tuning_lrs:
                run(f"{method}@{lr:g}", method, demo_task.steps, lr)
    else:
        methods = settings.get("methods", DEFAULT_METHODS)
        for method in methods:
            run(method, method, demo_task.steps, demo_task.lr[method])
        # Equal wall-clock: each on-policy method gets the time off_policy took, measured in this
        # worker a moment ago (the step count scaled by the ratio of the two runs' times).
        for method in (m for m in EQUAL_TIME if m in methods):
            ratio = seconds["off_policy"] / seconds[method]
            run(f"{method}_equal_time", method, max(1, round(demo_task.steps * ratio)), demo_task.lr[method])
    return {"task": task_key, "seed": seed, "models": models, "seconds": seconds, "steps": steps_used,
            "prefix_checks": prefix_checks, "recovery_check": recovery}


# ---------------------------------------------------------------------------------------------
# aggregation, tables, verdicts, plot


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def _model_names(task_results: dict[str, Any]) -> list[str]:
    order = ["teacher", "student_base", *METHODS, *(f"{m}_equal_time" for m in EQUAL_TIME)]
    return [name for name in order if name in task_results["per_seed"]]


def _table(task_results: dict[str, Any]) -> str:
    demo_task = TASKS[task_results["key"]]
    header = (f"{'model':<22}{'steps':>6}{'exact greedy %':>16}{'exact sampled %':>17}{'token greedy %':>16}"
              f"{'token sampled %':>17}{'len':>6}{'degen %':>8}{'train s':>8}")
    lines = [f"{task_results['key']}: {demo_task.name} -- {demo_task.description}", header, "-" * len(header)]
    for name in _model_names(task_results):
        rows = task_results["per_seed"][name]
        cells = []
        for key in ("accuracy", "accuracy_sampled", "token_accuracy", "token_accuracy_sampled"):
            mean, std = _mean_std([100 * r[key] for r in rows])
            width = 16 if key in ("accuracy", "token_accuracy") else 17
            cells.append(f"{mean:.1f} ± {std:.1f}".rjust(width))
        length = statistics.fmean(r["mean_length_sampled"] for r in rows)
        degen = statistics.fmean(100 * r["degenerate_rate_sampled"] for r in rows)
        steps = task_results["steps"].get(name)
        steps_text = "-" if not steps else (f"{statistics.fmean(steps):.0f}" if len(set(steps)) > 1 else str(steps[0]))
        spent = task_results["seconds"].get(name)
        spent_text = "-" if spent is None else f"{sum(spent):.0f}"
        lines.append(f"{name:<22}{steps_text:>6}{''.join(cells)}{length:>6.1f}{degen:>8.1f}{spent_text:>8}")
    lines.append("(mean ± std over seeds; exact = exact match, token = per-token accuracy against the right answer "
                 "at each position; greedy / temperature-1 samples; len and degen = mean length and wrong-length "
                 "share of sampled answers; train s = all seeds together)")
    lines.append("per seed, sampled per-token % (exact sampled %):")
    for name in _model_names(task_results):
        rows = task_results["per_seed"][name]
        lines.append(f"  {name:<22}" + "  ".join(
            f"{100 * r['token_accuracy_sampled']:.1f} ({100 * r['accuracy_sampled']:.0f})" for r in rows))
    checks = task_results.get("prefix_checks", {}).get("student_base")
    if checks:
        clean = [c["teacher_accuracy_clean"] for c in checks if c["teacher_accuracy_clean"] is not None]
        after = [c["teacher_accuracy_after_error"] for c in checks if c["teacher_accuracy_after_error"] is not None]
        if clean and after:
            lines.append("teacher's greedy accuracy on the base students' sampled prefixes: "
                         f"{100 * statistics.fmean(clean):.2f}% "
                         f"where the prefix is still right, {100 * statistics.fmean(after):.2f}% after the student's "
                         "first error")
    return "\n".join(lines)


def _wins(a: list[float], b: list[float]) -> int:
    return sum(x > y for x, y in zip(a, b))


def _gap_by_position(task_results: dict[str, Any], method: str) -> tuple[float, float]:
    """Mean sampled per-token gap (method - off_policy, points) in the first and last third of positions."""
    def curve(name: str) -> list[float]:
        rows = task_results["per_seed"][name]
        length = min(len(r["position_accuracy_sampled"]) for r in rows)
        return [statistics.fmean(r["position_accuracy_sampled"][t] for r in rows) for t in range(length)]

    gap = [100 * (a - b) for a, b in zip(curve(method), curve("off_policy"))]
    third = max(1, len(gap) // 3)
    return statistics.fmean(gap[:third]), statistics.fmean(gap[-third:])


def compare(task_results: dict[str, Any], method: str, against: str = "off_policy") -> dict[str, Any]:
    """The numbers a verdict is made of: ``method`` minus ``against``, in points, and seed wins."""
    rows, base = task_results["per_seed"][method], task_results["per_seed"][against]
    out: dict[str, Any] = {"seeds": len(rows)}
    for key in ("accuracy", "accuracy_sampled", "token_accuracy", "token_accuracy_sampled"):
        a, b = [r[key] for r in rows], [r[key] for r in base]
        out[key] = 100 * (statistics.fmean(a) - statistics.fmean(b))
        out[f"{key}_wins"] = _wins(a, b)
    first, last = _gap_by_position(task_results, method)
    out["gap_first_third"], out["gap_last_third"] = first, last
    return out


def _targets(c: dict[str, Any]) -> list[tuple[str, bool]]:
    """Issue 17's targets for the headline task, each checked."""
    return [
        ("beats off-policy on sampled per-token accuracy in every seed "
         f"({c['token_accuracy_sampled_wins']}/{c['seeds']})",
         c["token_accuracy_sampled_wins"] == c["seeds"]),
        (f">= 5 points on mean exact match (greedy {c['accuracy']:+.1f}, sampled {c['accuracy_sampled']:+.1f})",
         max(c["accuracy"], c["accuracy_sampled"]) >= 5.0),
        (f"loses <= 1 point of greedy per-token accuracy ({c['token_accuracy']:+.1f})", c["token_accuracy"] >= -1.0),
        (f"gap grows with position (first third {c['gap_first_third']:+.1f}, last third {c['gap_last_third']:+.1f})",
         c["gap_last_third"] > c["gap_first_third"]),
    ]


def _on_policy_methods(task_results: dict[str, Any]) -> list[str]:
    return [m for m in ("on_policy", "off_to_on") if m in task_results["per_seed"]]


def verdict(task_results: dict[str, Any]) -> str:
    """One line, computed from the per-seed numbers: does on-policy (lambda = 1, or the schedule) beat
    off-policy here, at equal steps and at equal wall-clock?"""
    parts = []
    for method in _on_policy_methods(task_results):
        c = compare(task_results, method)
        better = "beat" if c["token_accuracy_sampled"] > 0 else "did NOT beat"
        text = (f"{method} {better} off_policy on sampled per-token accuracy ({c['token_accuracy_sampled']:+.1f} pts, "
                f"{c['token_accuracy_sampled_wins']}/{c['seeds']} seeds), exact match {c['accuracy']:+.1f} greedy / "
                f"{c['accuracy_sampled']:+.1f} sampled, greedy per-token {c['token_accuracy']:+.1f}, "
                f"gap first/last third of positions {c['gap_first_third']:+.1f}/{c['gap_last_third']:+.1f}")
        timed = f"{method}_equal_time"
        if timed in task_results["per_seed"]:
            t = compare(task_results, timed)
            text += (f"; at equal wall-clock {t['token_accuracy_sampled']:+.1f} pts sampled per-token "
                     f"({t['token_accuracy_sampled_wins']}/{t['seeds']} seeds), exact {t['accuracy']:+.1f} / "
                     f"{t['accuracy_sampled']:+.1f}")
        parts.append(text)
    name = TASKS[task_results["key"]].name
    return f"{task_results['key']} ({name}): " + ". ".join(parts) + "."


def targets_line(task_results: dict[str, Any]) -> str:
    """Which of issue 17's targets hold for the best-placed on-policy method (lambda = 1 or the schedule)."""
    lines = []
    for method in _on_policy_methods(task_results):
        checks = _targets(compare(task_results, method))
        met = sum(ok for _, ok in checks)
        lines.append(f"  {method}: {met}/{len(checks)} targets met -- "
                     + "; ".join(f"{'ok' if ok else 'MISSED'}: {text}" for text, ok in checks))
    return "\n".join(lines)


def recovery_line(task_results: dict[str, Any]) -> str | None:
    """One line from :func:`recovery_check`'s numbers (means over seeds): did supervising recovery
    directly teach the student to recover, without costing it its accuracy on clean prefixes and
    on its own samples? ``None`` for a task without the check."""
    checks = task_results.get("recovery_checks")
    if not checks:
        return None

    def mean(key: str) -> float:
        return 100 * statistics.fmean(c[key] for c in checks)

    base_rows = task_results["per_seed"]["student_base"]
    sampled_before = 100 * statistics.fmean(r["token_accuracy_sampled"] for r in base_rows)
    gain = mean("trained_corrupted") - mean("base_corrupted")
    cost_clean = mean("trained_clean") - mean("base_clean")
    cost_sampled = mean("trained_token_accuracy_sampled") - sampled_before
    learnable = gain >= 1.0 and cost_clean >= -1.0 and cost_sampled >= -1.0
    noise = TASKS[task_results["key"]].recovery_noise
    steps = task_results.get("settings", {}).get("recovery_steps", TASKS[task_results["key"]].recovery_steps)
    return (f"recovery check ({TASKS[task_results['key']].name}, {len(checks)} seeds): the base student trained "
            f"{steps} steps on prefixes with up to {noise:.0%} of tokens corrupted and the right targets -- "
            f"teacher-forced accuracy after corrupted prefixes {mean('base_corrupted'):.1f}% -> "
            f"{mean('trained_corrupted'):.1f}% (teacher {mean('teacher_corrupted'):.1f}%), on clean prefixes "
            f"{mean('base_clean'):.1f}% -> {mean('trained_clean'):.1f}%, sampled per-token {sampled_before:.1f}% -> "
            f"{mean('trained_token_accuracy_sampled'):.1f}%: "
            + ("the student can learn to recover." if learnable else
               "the student can NOT learn to recover without losing accuracy on clean prefixes or on its own "
               "samples, so the condition on-policy distillation needs (a student-sized policy that acts well "
               "from its own wrong prefixes) does not hold here."))


PLOT_METHODS = ("teacher", "student_base", *METHODS)
COLORS = {"teacher": "black", "student_base": "grey", "off_policy": "tab:blue", "on_policy": "tab:red",
          "mixed": "tab:purple", "off_to_on": "tab:orange"}


def write_plot(results: dict[str, Any], path: Path) -> Path:
    """Per-token accuracy against output position (greedy and sampled) and the recovery curve, per
    task and method, each the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("headline", "control") if k in results]
    fig, axes = plt.subplots(len(keys), 3, figsize=(15, 4.2 * len(keys)), squeeze=False)
    panels = (("position_accuracy", "per-token accuracy, greedy", "output position"),
              ("position_accuracy_sampled", "per-token accuracy, temperature 1", "output position"),
              ("recovery_curve_sampled", "recovery: accuracy d tokens after the first error (T=1)",
               "tokens after the first error"))
    for row, key in enumerate(keys):
        task_results = results[key]
        for col, (curve, title, xlabel) in enumerate(panels):
            ax = axes[row][col]
            for name in PLOT_METHODS:
                rows = task_results["per_seed"].get(name)
                if not rows:
                    continue
                length = min(len(r[curve]) for r in rows)
                if length == 0:
                    continue
                ys = [statistics.fmean(r[curve][t] for r in rows) for t in range(length)]
                xs = list(range(1, length + 1)) if curve.startswith("recovery") else list(range(length))
                ax.plot(xs, ys, label=name, color=COLORS.get(name), lw=2 if name in METHODS else 1.2,
                        ls="-" if name in METHODS else "--")
            ax.set_title(f"{TASKS[key].name}: {title}", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("accuracy")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"opd demo: mean over {len(results[keys[0]]['seeds'])} seeds", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def json_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` document: ``{"headline": TASK, "control": TASK, "seconds": float}``."""
    doc: dict[str, Any] = {}
    for key in ("headline", "control"):
        if key not in results:
            continue
        task_results = results[key]
        doc[key] = {
            "task": f"{TASKS[key].name}: {TASKS[key].description}",
            "methods": {name: {"seeds": [{k: float(r[k]) for k in ("accuracy", "accuracy_sampled", "token_accuracy",
                                                                  "token_accuracy_sampled")}
                                         for r in task_results["per_seed"][name]]}
                        for name in _model_names(task_results)},
        }
    doc["seconds"] = float(results["seconds"])
    return doc


# ---------------------------------------------------------------------------------------------
# the whole run


def write_data(demo_task: DemoTask, out_dir: Path, validation: bool = False) -> Path:
    """``OUT/<task>/data/{train,eval}.jsonl``."""
    train_rows, eval_rows = demo_task.splits(demo_task.n_train, demo_task.n_eval, validation)
    data_dir = out_dir / demo_task.key / "data"
    data_dir.mkdir(parents=True)
    task.write_jsonl(train_rows, data_dir / "train.jsonl")
    task.write_jsonl(eval_rows, data_dir / "eval.jsonl")
    return data_dir


def run_demo(
    out_dir: Path = Path("runs/demo"),
    steps: int | None = None,
    seeds: int | None = None,
    quick: bool = False,
    json_path: Path | None = None,
    threads: int = 1,
    jobs: int = 2,
    tasks: tuple[str, ...] = ("headline", "control"),
    schedule: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Run both tasks; print the tables and verdicts, write ``demo.png`` and ``results.json`` to
    ``out_dir`` (and the ``--json`` summary to ``json_path``); return the full results."""
    from transformers.utils import logging as hf_logging

    from opd.errors import OpdError

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    torch.set_num_threads(threads)
    n_seeds = 1 if quick and seeds is None else (seeds if seeds is not None else len(REPORTED_SEEDS))
    if n_seeds < 1 or (steps is not None and steps < 1):
        raise OpdError("--steps and --seeds must be >= 1")
    if n_seeds > len(REPORTED_SEEDS):
        raise OpdError(f"--seeds: at most {len(REPORTED_SEEDS)} (seeds {TUNING_SEEDS} chose the learning rates and "
                       "are not reported)")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise OpdError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    for key in tasks:
        teacher_dir = TASKS[key].teacher_dir
        if not (teacher_dir / "model.safetensors").is_file():
            raise OpdError(f"the demo teacher is missing from {teacher_dir}; rebuild it with "
                           f"python -m opd.demo.{'build_sort' if key == 'headline' else 'build_teacher'}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OpdError(f"{out_dir} is not empty; pass --out NEW_DIR or remove it")

    sizes: dict[str, dict[str, Any]] = {}
    for key in tasks:
        demo_task = TASKS[key]
        size: dict[str, Any] = {"steps": demo_task.steps if steps is None else steps}
        if quick:
            size.update(steps=steps or 20, n_eval=64, recovery_steps=steps or 20)
        sizes[key] = size
        sized = replace(demo_task, **size)
        write_data(sized, out_dir)
        log(f"{key}: {demo_task.name} -- {sized.n_eval} held-out prompts, {sized.steps} steps x batch "
            f"{sized.batch_size} per method, lr {sized.lr}")
    methods = METHODS if schedule else DEFAULT_METHODS
    settings = {"tasks": sizes, "methods": methods}
    seed_list = list(REPORTED_SEEDS[:n_seeds])
    job_args = [(key, seed, out_dir, settings, threads) for key in tasks for seed in seed_list]
    jobs = max(1, min(jobs, len(job_args)))
    timed = [m for m in EQUAL_TIME if m in methods]
    log(f"opd demo: {len(tasks)} task(s) x {n_seeds} seed(s) x ({len(methods)} methods at equal steps + "
        f"{len(timed)} at equal wall-clock), {jobs} process(es) x {threads} thread(s)")
    if jobs == 1:
        job_results = [_run_job(*a) for a in job_args]
    else:
        # (task, seed) jobs are independent: one process each, one thread each (tiny models scale
        # better over processes than over intra-op threads); the longest (headline) jobs go first.
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            job_results = list(pool.map(_run_job_star, job_args))

    results: dict[str, Any] = {}
    for key in tasks:
        mine = [r for r in job_results if r["task"] == key]
        task_results: dict[str, Any] = {"key": key, "name": TASKS[key].name, "seeds": seed_list,
                                        "per_seed": {}, "seconds": {}, "steps": {}, "prefix_checks": {},
                                        "settings": {**{k: v for k, v in sizes[key].items()},
                                                     "batch_size": TASKS[key].batch_size, "lr": TASKS[key].lr}}
        for r in mine:
            for name, row in r["models"].items():
                task_results["per_seed"].setdefault(name, []).append(row)
            for name, value in r["seconds"].items():
                task_results["seconds"].setdefault(name, []).append(value)
            for name, value in r["steps"].items():
                task_results["steps"].setdefault(name, []).append(value)
            for name, value in r["prefix_checks"].items():
                task_results["prefix_checks"].setdefault(name, []).append(value)
            if r.get("recovery_check"):
                task_results.setdefault("recovery_checks", []).append(r["recovery_check"])
        results[key] = task_results
    results["seconds"] = time.perf_counter() - started
    plot = write_plot(results, out_dir / "demo.png")
    for key in tasks:
        results[key]["verdict"] = verdict(results[key])
        results[key]["recovery_verdict"] = recovery_line(results[key])
        log("")
        log(_table(results[key]))
    log("")
    for key in tasks:
        log(results[key]["verdict"])
        if results[key]["recovery_verdict"]:
            log(results[key]["recovery_verdict"])
        if key == "headline":
            log("issue-17 targets on the headline task:\n" + targets_line(results[key]))
    log(f"plot: {plot}")
    log(f"total {results['seconds']:.0f}s; runs and results.json in {out_dir}")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(json_summary(results), indent=2))
    return results
