"""The training loop: one readable function, top to bottom.

Each optimizer step:

1. **Rollout.** For each of ``grad_accum`` micro-batches, the behaviour policy
   (:mod:`opd.rollout`) decides per prompt who writes the response (student
   sample, reference answer or teacher sample) and produces token ids.
2. **Count.** The completion tokens of the whole step (all micro-batches, all
   processes) are summed once; every micro-batch loss is divided by that number.
3. **Score and update.** The teacher scores each micro-batch (no grad), the student
   runs forward, the objective (:mod:`opd.objectives`) compares them, backward.
   Then clip, AdamW step, LR schedule.
4. **Log / eval / checkpoint** on their own cadences.

Departures from a textbook loop, and why: generation happens with the
unwrapped model in eval mode (no dropout in the behaviour policy); evaluation
runs under a forked RNG so changing ``eval_every`` does not change training;
the loss is multiplied by the number of processes before backward because DDP
averages gradients while our normaliser is already global.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from opd import checkpoint as ckpt
from opd.config import RunConfig, dump_config
from opd.data import Example, load_examples
from opd.errors import OpdError, RunDirError
from opd.eval import evaluate, resolve_first_error, resolve_scorer
from opd.metrics import MetricsLogger
from opd.models import completion_logits, load_causal_lm, load_tokenizer, shared_vocab_size
from opd.objectives import sampled_token_pg, sequence_nll, token_divergence, token_logprobs
from opd.rollout import BehaviourPolicy, SamplingParams
from opd.teachers import LocalTeacher

# Keys that may change between a run and its resume without breaking exactness
# (train.steps may too, with a warning: the LR schedule stretches to the new length).
_RESUMABLE_CHANGES = {
    "train.steps", "train.output_dir", "train.progress", "train.tensorboard", "train.eval_every",
    "train.save_every", "train.keep_checkpoints", "train.log_every", "train.threads",
}


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    steps: int
    final_eval: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def lr_lambda_factory(cfg: Any, total_steps: int) -> Any:
    """Linear warm-up, then cosine / linear decay to ``min_lr_ratio`` (or constant)."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay

    return factor


def _flatten(prefix: str, data: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(name + ".", value))
        else:
            out[name] = value
    return out


def check_run_dir(config: RunConfig, resume: bool) -> Path:
    """Refuse a directory that holds another run (or a different config when resuming).

    Nothing is written here; :func:`write_run_config` records the config only once the
    models and data have loaded, so a failed start leaves no half-made run behind.
    """
    run_dir = Path(config.train.output_dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        if not resume:
            raise RunDirError(
                f"{run_dir} already holds a run; pass --resume to continue it "
                "or set train.output_dir to a new directory"
            )
        old = _flatten("", yaml.safe_load(saved.read_text()) or {})
        new = _flatten("", config.model_dump(mode="json"))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _RESUMABLE_CHANGES)
        if changed:
            raise RunDirError(
                f"{run_dir} holds a run with a different config ({', '.join(changed[:4])}); "
                "resume with the same config or use a new train.output_dir"
            )
        if old.get("train.steps") != new.get("train.steps"):
            warnings.warn("train.steps changed on resume: the LR schedule is recomputed for the new length",
                          stacklevel=2)
    elif resume and run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir} has no config.yaml, so there is no opd run to resume there")
    return run_dir


def write_run_config(run_dir: Path, config: RunConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(dump_config(config))
    tmp.replace(run_dir / "config.yaml")


class ExampleStream:
    """Deterministic epoch-wise shuffling addressed by a global position (for exact resume)."""

    def __init__(self, examples: list[Example], seed: int, rank: int = 0, world: int = 1) -> None:
        self.examples = examples
        self.seed = seed
        self.rank = rank
        self.world = world
        self.position = 0  # examples consumed globally
        self._epoch = -1
        self._order: list[int] = []

    def _index(self, global_pos: int) -> int:
        epoch, offset = divmod(global_pos, len(self.examples))
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.examples), generator=gen).tolist()
            self._epoch = epoch
        return self._order[offset]

    def next(self, batch_size: int) -> list[Example]:
        start = self.position + self.rank * batch_size
        batch = [self.examples[self._index(start + i)] for i in range(batch_size)]
        self.position += batch_size * self.world
        return batch


def rollout_length(cfg: Any, step: int, total_steps: int) -> int:
    """Tokens to sample at ``step`` (1-based): the prefix schedule of Prefix OPD
    (arXiv 2602.15260), linear from ``prefix_tokens`` to ``prefix_tokens_final``, capped by
    ``max_new_tokens``; plain ``max_new_tokens`` when no prefix is set."""
    if cfg.prefix_tokens is None:
        return cfg.max_new_tokens
    final = cfg.prefix_tokens_final or cfg.prefix_tokens
    progress = (step - 1) / max(1, total_steps - 1)
    length = round(cfg.prefix_tokens + progress * (final - cfg.prefix_tokens))
    return max(1, min(cfg.max_new_tokens, length))


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="opd train", unit="step", dynamic_ncols=True)


def train(config: RunConfig, *, resume: bool = False, log: Any = print) -> TrainResult:
    """Run (or resume) one distillation run described by ``config``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    # accelerate only forms a CPU (gloo) process group under torchrun when told it is on CPU.
    on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(cpu=on_cpu)
    is_main = accelerator.is_main_process
    run_dir = check_run_dir(config, resume)
    # Each process gets its own sampling stream (data order is seeded separately, and
    # weights come from from_pretrained, so nothing else depends on this seed).
    set_seed(config.train.seed + accelerator.process_index)

    # --- models and data -------------------------------------------------------
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.student,
                               trust_remote_code=config.model.trust_remote_code)
    student = load_causal_lm(config.model.student, dtype=config.model.dtype,
                             trust_remote_code=config.model.trust_remote_code)
    teacher = LocalTeacher.from_config(config.teacher, tokenizer) if config.teacher.model else None
    vocab_size = shared_vocab_size(tokenizer, student, *([teacher.model] if teacher else []))
    need_answers = config.rollout.on_policy_fraction < 1.0 and config.rollout.off_policy_source == "dataset"
    train_examples, report = load_examples(config.data.train, config.data, tokenizer,
                                           limit=config.data.max_train_examples, need_answers=need_answers)
    eval_examples: list[Example] = []
    if config.data.eval:
        eval_examples, _ = load_examples(config.data.eval, config.data, tokenizer, limit=config.data.max_eval_examples)
    if is_main:
        log(f"data: {report.kept} prompts from {config.data.train} "
            f"({report.skipped_overlong} over-long skipped, {report.truncated} truncated)")

    if teacher is not None and teacher.chat_template != getattr(tokenizer, "chat_template", None) and is_main:
        warnings.warn("teacher and student chat templates differ; the teacher scores the student's template "
                      "(same token ids). Re-rendering prompts per teacher comes with served teachers.", stacklevel=2)
    if (config.rollout.top_p < 1.0 or config.rollout.top_k > 0) and is_main:
        warnings.warn("rollout.top_p / top_k filter the student's samples, but the token-level loss compares "
                      "the full temperature-scaled distributions", stacklevel=2)
    max_positions = getattr(student.config, "max_position_embeddings", None)
    longest = max(len(e.prompt_ids) for e in train_examples) + config.rollout.max_new_tokens
    if max_positions and longest > max_positions:
        raise OpdError(f"longest prompt + rollout.max_new_tokens = {longest} tokens exceeds the student's "
                       f"{max_positions} positions; lower data.max_prompt_tokens or rollout.max_new_tokens")
    if is_main:
        write_run_config(run_dir, config)
    accelerator.wait_for_everyone()

    student.to(accelerator.device)
    if teacher is not None:
        teacher.model.to(accelerator.device)
    # Dropout stays off: the policy that is scored must be the one that sampled the tokens.
    student.eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                  eps=config.optim.eps, weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(config.optim, config.train.steps))
    model, optimizer = accelerator.prepare(student, optimizer)

    stream = ExampleStream(train_examples, config.train.seed, accelerator.process_index, accelerator.num_processes)
    policy = BehaviourPolicy(config.rollout, config.temperature, tokenizer, teacher, vocab_size)
    scorer = resolve_scorer(config.eval.scorer)
    first_error = resolve_first_error(config.eval.first_error)
    start_step = 0
    if resume:
        found = ckpt.list_checkpoints(run_dir)
        if found:
            state = ckpt.load_checkpoint(found[-1], accelerator.unwrap_model(model), optimizer, scheduler,
                                         rank=accelerator.process_index)
            start_step, stream.position = state["step"], state["data_position"]
            if is_main:
                log(f"resumed from {found[-1]} at step {start_step}")
        elif is_main:
            log(f"no checkpoint in {run_dir}; starting from step 0")
    metrics_log = MetricsLogger(run_dir, tensorboard=config.train.tensorboard, enabled=is_main,
                                resume_step=start_step if resume else None)
    cuda_devices = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []

    def run_eval(step: int) -> dict[str, Any]:
        if not eval_examples:
            return {}
        params = SamplingParams(
            max_new_tokens=config.eval.max_new_tokens or config.rollout.max_new_tokens,
            temperature=config.temperature, top_p=config.rollout.top_p, top_k=config.rollout.top_k,
            vocab_size=vocab_size,
        )
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(config.train.seed + 7919)
            results = evaluate(accelerator.unwrap_model(model), tokenizer, eval_examples, params, scorer=scorer,
                               first_error=first_error, teacher=teacher, vocab_size=vocab_size,
                               batch_size=config.eval.batch_size, sampled=config.eval.sampled)
        metrics_log.log(step, results)
        return results

    # --- the loop ----------------------------------------------------------------
    bar = _progress(config.train.steps, start_step, config.train.progress and is_main)
    world = accelerator.num_processes
    tokens_seen = 0
    loop_start = time.perf_counter()
    last_eval: dict[str, Any] = {}
    nonfinite_in_a_row = 0
    skipped_total = 0
    for step in range(start_step + 1, config.train.steps + 1):
        step_start = time.perf_counter()
        unwrapped = accelerator.unwrap_model(model)
        policy.params.max_new_tokens = rollout_length(config.rollout, step, config.train.steps)
        micro_batches, rollout_metrics = [], []
        for _ in range(config.train.grad_accum):
            batch, metrics = policy.rollout(unwrapped, stream.next(config.train.batch_size))
            micro_batches.append(batch)
            rollout_metrics.append(metrics)
        rollout_s = time.perf_counter() - step_start

        local_tokens = torch.tensor(float(sum(b.num_tokens for b in micro_batches)), device=accelerator.device)
        step_tokens = float(accelerator.reduce(local_tokens, reduction="sum").item())

        step_loss, teacher_s, student_s = 0.0, 0.0, 0.0
        for index, batch in enumerate(micro_batches):
            is_last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if is_last else accelerator.no_sync(model)
            with sync:
                t0 = time.perf_counter()
                input_ids = batch.input_ids_BT.to(accelerator.device)
                attention = batch.attention_mask_BT.to(accelerator.device)
                mask = batch.completion_mask_BC.to(accelerator.device)
                teacher_logits = None
                if config.loss.objective in ("divergence", "sampled_token_pg"):
                    teacher_logits = teacher.score(batch)
                t1 = time.perf_counter()
                student_logits = completion_logits(model, input_ids, attention, batch.completion_len)
                if config.loss.objective == "divergence":
                    loss, loss_metrics = token_divergence(
                        student_logits, teacher_logits, mask, kind=config.loss.divergence, num_tokens=step_tokens,
                        beta=config.loss.beta, alpha=config.loss.alpha, temperature=config.temperature,
                        chunk_size=config.loss.chunk_size, vocab_size=vocab_size,
                    )
                elif config.loss.objective == "sampled_token_pg":
                    ids = batch.completion_ids_BC.to(accelerator.device)
                    with torch.no_grad():
                        teacher_lp = token_logprobs(teacher_logits.to(accelerator.device), ids,
                                                    temperature=config.temperature, vocab_size=vocab_size)
                    loss, loss_metrics = sampled_token_pg(
                        student_logits, teacher_lp, ids, mask, num_tokens=step_tokens,
                        estimator=config.loss.estimator, gamma=config.loss.gamma, temperature=config.temperature,
                        vocab_size=vocab_size, chunk_size=config.loss.chunk_size,
                    )
                else:
                    loss, loss_metrics = sequence_nll(
                        student_logits, batch.completion_ids_BC.to(accelerator.device), mask,
                        num_tokens=step_tokens, temperature=config.temperature, chunk_size=config.loss.chunk_size,
                        vocab_size=vocab_size,
                    )
                accelerator.backward(loss * world)
                teacher_s += t1 - t0
                student_s += time.perf_counter() - t1
                step_loss += float(loss.detach().item())
                del student_logits, teacher_logits, loss

        # Every process sees the same global loss and norm, so all skip or all step.
        step_loss = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "sum").item())
        max_norm = config.optim.max_grad_norm if config.optim.max_grad_norm is not None else math.inf
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
        lr_used = scheduler.get_last_lr()[0]
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            nonfinite_in_a_row += 1
            skipped_total += 1
            if nonfinite_in_a_row >= config.train.max_nonfinite_steps:
                raise OpdError(f"loss or gradient was NaN/inf for {nonfinite_in_a_row} steps in a row (step {step});"
                               " lower optim.lr or check the models")
        else:
            nonfinite_in_a_row = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped step still advances the schedule, so LR stays tied to the step number.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            scheduler.step()

        step_s = time.perf_counter() - step_start
        tokens_seen += int(step_tokens)  # global
        tokens_per_s = step_tokens / step_s if step_s > 0 else 0.0
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
        bar.update(1)

        if step % config.train.log_every == 0 or step == config.train.steps:
            row: dict[str, Any] = {
                "loss/total": step_loss,
                "train/lr": lr_used,
                "train/skipped_nonfinite_total": skipped_total,
                "train/completion_tokens": step_tokens,
                "rollout/max_new_tokens": policy.params.max_new_tokens,
                "perf/step_s": step_s,
                "perf/rollout_s": rollout_s,
                "perf/teacher_s": teacher_s,
                "perf/student_s": student_s,
                "perf/tokens_per_s": tokens_per_s,
            }
            row["train/grad_norm"] = grad_norm
            for key in sorted({k for m in rollout_metrics for k in m}):
                local = sum(m.get(key, 0.0) for m in rollout_metrics) / len(rollout_metrics)
                row[key] = float(accelerator.reduce(torch.tensor(local, device=accelerator.device), "mean").item())
            metrics_log.log(step, row)

        if config.train.eval_every and step % config.train.eval_every == 0 and step != config.train.steps:
            last_eval = run_eval(step)
            if is_main and last_eval:
                bar.write(_eval_line(step, last_eval))
        if config.train.save_every and step % config.train.save_every == 0:
            ckpt.save_checkpoint(run_dir, step, accelerator.unwrap_model(model), optimizer, scheduler,
                                 {"data_position": stream.position}, config.train.keep_checkpoints,
                                 rank=accelerator.process_index, barrier=accelerator.wait_for_everyone)
        accelerator.wait_for_everyone()
    bar.close()

    # --- final model and evaluation ------------------------------------------------
    final_dir = run_dir / "final"
    if is_main:
        tmp = ckpt.atomic_dir(final_dir)
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        ckpt.commit_dir(tmp, final_dir)
    last_eval = run_eval(config.train.steps) if is_main else {}
    if is_main:
        elapsed = time.perf_counter() - loop_start
        log(f"done: {config.train.steps - start_step} steps in {elapsed:.1f}s, {tokens_seen} completion tokens; "
            f"final student in {final_dir}")
        if last_eval:
            log(_eval_line(config.train.steps, last_eval))
    metrics_log.close()
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, final_dir, config.train.steps, last_eval, time.perf_counter() - started)


def _eval_line(step: int, results: dict[str, Any]) -> str:
    parts = [f"eval step {step}:"]
    for key in ("eval/accuracy", "eval/accuracy_sampled", "eval/first_error", "eval/teacher_divergence"):
        if key in results:
            parts.append(f"{key.split('/')[1]}={results[key]:.3f}")
    return " ".join(parts)


def check_trainable(config: RunConfig) -> None:
    """Cheap checks before loading models, so obvious mistakes fail in milliseconds."""
    for label, path in (("model.student", config.model.student), ("teacher.model", config.teacher.model),
                        ("data.train", config.data.train), ("data.eval", config.data.eval)):
        if path and (path.startswith(("/", "./", "../", "~")) or path.endswith((".jsonl", ".parquet", ".json"))):
            if not Path(path).expanduser().exists():
                raise OpdError(f"{label}: {path} does not exist")
