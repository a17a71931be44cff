"""The training loop: one readable function, top to bottom.

Each optimizer step:

1. **Rollout.** For each of ``grad_accum`` micro-batches, the behaviour policy
   (:mod:`opd.rollout`) decides per prompt who writes the response (student
   sample, reference answer or teacher sample) and produces token ids.
2. **Count.** The completion tokens of the whole step (all micro-batches, all
   processes) are summed once; every micro-batch loss is divided by that number.
3. **Score and update.** The teacher scores each micro-batch (no grad), the student
   runs forward, :func:`opd.losses.micro_batch_loss` applies the recipe's objective
   (:mod:`opd.objectives`), backward. Then clip, AdamW step, LR schedule, and — when a vLLM
   engine samples — a weight push every ``rollout.weight_sync_every`` steps.
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
from opd.cache import TeacherCache, open_cache
from opd.config import RunConfig, dump_config
from opd.data import Example, load_examples
from opd.discriminator import Discriminator, DiscriminatorTrainer
from opd.errors import OpdError, RunDirError
from opd.eval import evaluate, reference_nll, resolve_first_error, resolve_scorer
from opd.losses import micro_batch_loss, routed_loss
from opd.metrics import MetricsLogger
from opd.models import add_lora, completion_logits, disable_dropout, load_causal_lm, load_tokenizer, shared_vocab_size
from opd.rollout import AdaptiveOffPolicy, BehaviourPolicy, SamplingParams, build_batch
from opd.teachers import LocalTeacher, SelfTeacher, ServedTeacher
from opd.verifiers import resolve_verifier

# Keys that may change between a run and its resume without breaking exactness
# (train.steps may too, with a warning: the LR schedule stretches to the new length).
_RESUMABLE_CHANGES = {
    "train.steps", "train.output_dir", "train.progress", "train.tensorboard", "train.eval_every",
    "train.save_every", "train.keep_checkpoints", "train.log_every", "train.threads",
    # where and how a served teacher is reached (not what it computes)
    "teacher.url", "teacher.timeout_s", "teacher.max_retries", "teacher.backoff_s", "teacher.concurrency",
    "teacher.request_batch", "teacher.api_key_env",
}


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    steps: int
    final_eval: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # cumulative compute of the run (restored on resume): student_generated_tokens,
    # teacher_scored_tokens, teacher_generated_tokens (global, all processes)
    counters: dict[str, float] = field(default_factory=dict)


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
    if config.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise OpdError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != config.train.mixed_precision:
        # accelerate keeps one precision per process; a second train() in the same process (a notebook,
        # a sweep) with another one would be refused. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=config.train.mixed_precision)
    is_main = accelerator.is_main_process
    run_dir = check_run_dir(config, resume)
    # Each process gets its own sampling stream (data order is seeded separately, and
    # weights come from from_pretrained, so nothing else depends on this seed).
    set_seed(config.train.seed + accelerator.process_index)

    # --- models and data -------------------------------------------------------
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.student,
                               trust_remote_code=config.model.trust_remote_code)
    student = load_causal_lm(config.model.student, dtype=config.model.dtype,
                             trust_remote_code=config.model.trust_remote_code,
                             attn_implementation=config.model.attn_implementation,
                             cpu_linear=config.train.cpu_linear)
    teacher: Any = None
    cache: TeacherCache | None = None
    if config.teacher.kind == "served":
        teacher = ServedTeacher(config.teacher, tokenizer)
    elif config.teacher.kind == "cache":
        cache = open_cache(config, tokenizer)
    elif config.teacher.kind == "self":
        teacher = SelfTeacher(student, tokenizer, config.teacher)  # copies the initial weights when not live
    elif config.teacher.model:
        teacher = LocalTeacher.from_config(config.teacher, tokenizer, cpu_linear=config.train.cpu_linear)
    # Multi-teacher routing: named teachers, picked per row by data.teacher_field.
    routed: dict[str, Any] = {}
    for name, routed_cfg in config.teachers.items():
        routed[name] = ServedTeacher(routed_cfg, tokenizer) if routed_cfg.kind == "served" else \
            LocalTeacher.from_config(routed_cfg, tokenizer, cpu_linear=config.train.cpu_linear)
    # A text-only teacher may have its own vocabulary: only white-box teachers share the student's.
    scoring_teachers = [t.model for t in [teacher, *routed.values()]
                        if isinstance(t, LocalTeacher) and t.kind == "local"]
    vocab_size = shared_vocab_size(tokenizer, student, *scoring_teachers)
    gad = config.loss.objective == "gad"
    need_answers = (config.rollout.on_policy_range()[0] < 1.0 and config.rollout.off_policy_source == "dataset") or (
        config.loss.objective == "kdrl") or (gad and teacher is None)
    verifier = resolve_verifier(config.loss.verifier) if config.loss.objective == "kdrl" else None
    # G-OPD/ExOPD's reward needs the initial student as a frozen reference policy.
    reference = None
    if config.loss.reward_scale != 1.0:
        reference = LocalTeacher(load_causal_lm(config.model.student, dtype=config.model.dtype,
                                                trust_remote_code=config.model.trust_remote_code,
                                                attn_implementation=config.model.attn_implementation,
                                                cpu_linear=config.train.cpu_linear),
                                 tokenizer, name="reference")
    train_examples, report = load_examples(config.data.train, config.data, tokenizer,
                                           limit=config.data.max_train_examples, need_answers=need_answers)
    eval_examples: list[Example] = []
    if config.data.eval:
        eval_examples, _ = load_examples(config.data.eval, config.data, tokenizer, limit=config.data.max_eval_examples)
    if isinstance(teacher, SelfTeacher):
        teacher.check(train_examples)
    if routed:
        unknown = sorted({str(e.extra.get(config.data.teacher_field)) for e in train_examples
                          if e.extra.get(config.data.teacher_field) not in (None, *routed)})
        if unknown:
            raise OpdError(f"data.teacher_field={config.data.teacher_field}: rows name teacher(s) "
                           f"{', '.join(unknown[:3])} that are not in `teachers` ({', '.join(routed)})")
    if is_main:
        log(f"data: {report.kept} prompts from {config.data.train} "
            f"({report.skipped_overlong} over-long skipped, {report.truncated} truncated)")

    if isinstance(teacher, LocalTeacher) and teacher.kind == "local" and is_main and \
            teacher.chat_template != getattr(tokenizer, "chat_template", None):
        log("teacher and student chat templates differ: chat prompts are rendered with the teacher's own "
            "template for scoring (plain-text prompts are shared as they are)")
    if (config.rollout.top_p < 1.0 or config.rollout.top_k > 0) and is_main:
        warnings.warn("rollout.top_p / top_k filter the student's samples, but the token-level loss compares "
                      "the full temperature-scaled distributions", stacklevel=2)
    for label, k in (("teacher.top_k", config.teacher.top_k), ("loss.entropy_top_k", config.loss.entropy_top_k)):
        if k is not None and k > vocab_size:
            raise OpdError(f"{label}={k} exceeds the vocabulary ({vocab_size} tokens); lower it")
    max_positions = getattr(student.config, "max_position_embeddings", None)
    longest = max(len(e.prompt_ids) for e in train_examples) + config.rollout.max_new_tokens
    if max_positions and longest > max_positions:
        raise OpdError(f"longest prompt + rollout.max_new_tokens = {longest} tokens exceeds the student's "
                       f"{max_positions} positions; lower data.max_prompt_tokens or rollout.max_new_tokens")
    discriminator = None
    if gad:
        backbone = config.loss.discriminator_model or config.model.student
        discriminator = DiscriminatorTrainer(
            Discriminator.from_pretrained(backbone, dtype=config.model.dtype,
                                          trust_remote_code=config.model.trust_remote_code),
            lr=config.loss.discriminator_lr, max_grad_norm=config.optim.max_grad_norm,
            reduce_grads=_mean_grads(accelerator) if accelerator.num_processes > 1 else None,
        )
        discriminator.model.to(accelerator.device)
    if is_main:
        write_run_config(run_dir, config)
    accelerator.wait_for_everyone()

    student.to(accelerator.device)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.mixed_precision)
    for frozen in (teacher, reference, *routed.values()):
        if getattr(frozen, "model", None) is not None:  # a served teacher has no local model
            frozen.model.to(accelerator.device)
        if isinstance(frozen, LocalTeacher) and compute_dtype is not None:
            frozen.compute_in(compute_dtype)  # same logits as autocast over its fp32 weights, cast once
    # A self-teacher's EMA weights are training state: checkpointed and restored with the student.
    teacher_state = {"teacher_ema": teacher.model} if isinstance(teacher, SelfTeacher) and \
        teacher.weights == "ema" else {}
    extra_states: dict[str, Any] = {}
    if discriminator is not None:
        teacher_state["discriminator"] = discriminator.model
        extra_states["discriminator_optimizer"] = discriminator.optimizer
    # GAD's teacher text: written once per prompt by the black-box teacher (seeded, so a resumed
    # run sees the same answers), or the data's answers when no teacher model is given.
    teacher_text: dict[int, list[int]] = {}
    upfront_teacher_tokens = 0.0  # GAD's teacher answers, written once before step 1
    if gad:
        teacher_text = _teacher_answers(teacher, train_examples, config, vocab_size, log if is_main else None)
        if teacher is not None:
            upfront_teacher_tokens = float(sum(len(ids) for ids in teacher_text.values()))

    # Dropout stays off: the policy that is scored must be the one that sampled the tokens.
    student.eval()
    if config.model.lora_r is not None:
        student = add_lora(student, config.model)
    if config.train.gradient_checkpointing:
        # transformers only checkpoints in train mode, so dropout is zeroed instead of using eval().
        disable_dropout(student)
        student.train()
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flops_per_token = {"student": 2.0 * sum(p.numel() for p in student.parameters()),
                       "teacher": 2.0 * sum(p.numel() for p in getattr(teacher, "model", torch.nn.Linear(1, 1))
                                            .parameters()) if isinstance(teacher, (LocalTeacher, SelfTeacher)) else 0.0}
    trainable = [p for p in student.parameters() if p.requires_grad]
    # The fused AdamW kernel: one pass per tensor instead of ~10 foreach ops (an 85M-parameter step
    # took 35 ms against 205 ms on 2 CPU cores); same update rule.
    fused = bool(trainable) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps,
                                  weight_decay=config.optim.weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(config.optim, config.train.steps))
    model, optimizer = accelerator.prepare(student, optimizer)

    # A cached teacher replays its stored rollouts; the stream then walks the cache's rows.
    rows: list[Any] = list(range(cache.rows)) if cache is not None else train_examples
    stream = ExampleStream(rows, config.train.seed, accelerator.process_index, accelerator.num_processes)
    policy = BehaviourPolicy(config.rollout, config.temperature, tokenizer, teacher, vocab_size)
    # Evaluation's teacher divergence needs the student's vocabulary on both sides.
    eval_teacher = teacher if isinstance(teacher, SelfTeacher) or (
        isinstance(teacher, LocalTeacher) and teacher.kind == "local") else None
    cross: dict[str, Any] | None = None
    if config.loss.objective == "uld":
        from opd.cross_tokenizer import matched_vocab

        cross = {"teacher_vocab": len(teacher.tokenizer),
                 "matched": matched_vocab(tokenizer, teacher.tokenizer) if config.loss.uld_hybrid else None}
        if is_main:
            shared = 0 if cross["matched"] is None else cross["matched"][0].numel()
            log(f"cross-tokenizer teacher: {len(teacher.tokenizer)} tokens, {shared} shared with the student's "
                f"{vocab_size}")
    adaptive = AdaptiveOffPolicy(config.rollout) if config.rollout.adaptive_off_policy else None
    scorer = resolve_scorer(config.eval.scorer)
    first_error = resolve_first_error(config.eval.first_error)
    start_step = 0
    # cumulative over the whole run (restored on resume)
    counters = {"student_generated_tokens": 0.0, "teacher_scored_tokens": 0.0,
                "teacher_generated_tokens": upfront_teacher_tokens, "flops_generation": 0.0, "flops_teacher": 0.0,
                "flops_student": 0.0, "seconds_rollout": 0.0, "seconds_teacher": 0.0, "seconds_student": 0.0}
    if resume:
        if is_main:
            ckpt.clean_stale(run_dir)
            ckpt.prune(run_dir, config.train.keep_checkpoints)
        accelerator.wait_for_everyone()
        found = ckpt.list_checkpoints(run_dir)
        state = None
        for candidate in reversed(found):
            try:
                ckpt.verify_checksums(candidate)
            except RunDirError as exc:
                if is_main:
                    warnings.warn(f"{exc}; trying the previous checkpoint", stacklevel=2)
                continue
            state = ckpt.load_checkpoint(candidate, accelerator.unwrap_model(model), optimizer, scheduler,
                                         rank=accelerator.process_index, extra_modules=teacher_state,
                                         extra_states=extra_states)
            start_step, stream.position = state["step"], state["data_position"]
            counters.update(state.get("counters", {}))
            if adaptive is not None:
                adaptive.load_state_dict(state["adaptive_off_policy"])
            if is_main:
                log(f"resumed from {candidate} at step {start_step}")
            break
        if state is None and found:
            raise RunDirError(f"every checkpoint in {run_dir / 'checkpoints'} failed its checksum; "
                              "nothing to resume from")
        if state is None and is_main:
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
                               first_error=first_error, teacher=eval_teacher, vocab_size=vocab_size,
                               batch_size=config.eval.batch_size, sampled=config.eval.sampled)
        metrics_log.log(step, results)
        return results

    # --- the loop ----------------------------------------------------------------
    engine = None
    weight_sync_s = 0.0
    if config.rollout.engine == "vllm":
        engine = _start_engine(config, accelerator, model, tokenizer, log if is_main else None)
        policy.engine = engine
    try:
        bar = _progress(config.train.steps, start_step, config.train.progress and is_main)
        say = bar.write if config.train.progress else log  # messages during the loop
        world = accelerator.num_processes
        tokens_seen = 0
        loop_start = time.perf_counter()
        last_eval: dict[str, Any] = {}
        nonfinite_in_a_row = 0
        skipped_total = 0
        teacher_writes_off_policy = config.rollout.off_policy_source == "teacher"
        co_sampling = float(config.rollout.sampler != "student")  # the teacher decodes every on-policy token
        for step in range(start_step + 1, config.train.steps + 1):
            step_start = time.perf_counter()
            unwrapped = accelerator.unwrap_model(model)
            policy.params.max_new_tokens = rollout_length(config.rollout, step, config.train.steps)
            micro_batches, rollout_metrics = [], []
            source = adaptive.choose(step, config.train.steps) if adaptive is not None else None
            fraction = config.rollout.on_policy_fraction_at(step, config.train.steps)
            for _ in range(config.train.grad_accum):
                prompts = stream.next(config.train.batch_size)
                if cache is not None:
                    batch = cache.batch(prompts, tokenizer.pad_token_id)
                    metrics = {"rollout/cached_fraction": 1.0,
                               "rollout/completion_tokens_mean": batch.num_tokens / len(prompts)}
                elif source == "replay":
                    batch = adaptive.replay(config.train.batch_size, tokenizer.pad_token_id)
                    metrics = {"rollout/on_policy_fraction": 0.0}
                else:
                    # One autocast region around the whole rollout: under train.mixed_precision autocast
                    # then casts each weight once per rollout instead of once per decoded token.
                    with accelerator.autocast():
                        batch, metrics = policy.rollout(unwrapped, prompts,
                                                        fraction if source is None else float(source == "student"))
                    metrics["rollout/on_policy_target"] = fraction
                    if source == "student":
                        adaptive.record(batch)
                if adaptive is not None:
                    metrics.update({"rollout/adaptive_phi": adaptive.phi,
                                    "rollout/replay_fraction": float(source == "replay"),
                                    "rollout/replay_buffer": float(len(adaptive.buffer))})
                micro_batches.append(batch)
                rollout_metrics.append(metrics)
            rollout_s = time.perf_counter() - step_start

            local_counts = torch.tensor([
                float(sum(b.num_tokens for b in micro_batches)),
                float(sum((b.completion_mask_BC.sum(-1) * b.on_policy_B).sum().item() for b in micro_batches)),
                float(sum((b.completion_mask_BC.sum(-1) * (~b.on_policy_B if teacher_writes_off_policy
                                                          else b.on_policy_B * co_sampling)).sum().item()
                          for b in micro_batches)),
            ], device=accelerator.device)
            step_tokens, generated, teacher_generated = accelerator.reduce(local_counts, reduction="sum").tolist()
            counters["student_generated_tokens"] += generated
            teacher_scores = config.loss.objective not in ("nll", "gad") and cache is None
            counters["teacher_scored_tokens"] += step_tokens if teacher_scores else 0.0
            counters["teacher_generated_tokens"] += teacher_generated
            # Estimated FLOPs (2 N per token forward, 6 N forward + backward; N = all parameters):
            # the survey's C_on ~ N (G_S + rho F_T + F_S + B_S), made visible per phase.
            sequence_tokens = float(accelerator.reduce(torch.tensor(
                float(sum(b.attention_mask_BT.sum().item() for b in micro_batches)), device=accelerator.device),
                reduction="sum").item())
            prompt_tokens = sequence_tokens - step_tokens
            counters["flops_generation"] += flops_per_token["student"] * (generated + prompt_tokens * (generated > 0))
            counters["flops_teacher"] += flops_per_token["teacher"] * sequence_tokens * teacher_scores
            counters["flops_student"] += 3.0 * flops_per_token["student"] * sequence_tokens

            step_loss, teacher_s, student_s = 0.0, 0.0, 0.0
            loss_sums: dict[str, float] = {}
            for index, batch in enumerate(micro_batches):
                is_last = index == len(micro_batches) - 1
                sync = contextlib.nullcontext() if is_last else accelerator.no_sync(model)
                with sync:
                    t0 = time.perf_counter()
                    input_ids = batch.input_ids_BT.to(accelerator.device)
                    attention = batch.attention_mask_BT.to(accelerator.device)
                    if routed:
                        t1 = time.perf_counter()
                        student_logits = completion_logits(model, input_ids, attention, batch.completion_len)
                        loss, loss_metrics, routed_s = routed_loss(
                            config, batch, student_logits, teacher, routed, step=step, num_tokens=step_tokens,
                            vocab_size=vocab_size, tokenizer=tokenizer, verifier=verifier, device=accelerator.device)
                        for key, value in loss_metrics.items():
                            loss_sums[key] = loss_sums.get(key, 0.0) + value
                        accelerator.backward(loss * world)
                        teacher_s += routed_s
                        student_s += time.perf_counter() - t1 - routed_s
                        step_loss += float(loss.detach().item())
                        del student_logits, loss
                        continue
                    # Under train.mixed_precision the local teacher computes in the same precision as the
                    # student (its logits are upcast to fp32 inside the losses).
                    with torch.no_grad(), accelerator.autocast():
                        teacher_logits = None
                        if cache is not None:
                            teacher_logits = batch.teacher_signal
                        elif config.loss.objective not in ("nll", "gad", "uld"):
                            teacher_logits = teacher.score(batch)
                            if isinstance(teacher_logits, torch.Tensor):
                                teacher_logits = teacher_logits.to(accelerator.device)
                        if cross is not None:
                            cross["logits"], cross["ids"], cross["alignments"] = teacher.score_cross(batch)
                    rewards, disc_metrics = None, {}
                    if discriminator is not None:
                        # GAD: score with the discriminator as it was when the samples were drawn, then update it
                        # on (teacher text, student text) pairs of the same prompts.
                        rewards = discriminator.rewards(batch).to(accelerator.device)
                        teacher_batch = build_batch(
                            [e.prompt_ids for e in batch.examples[:: config.rollout.samples_per_prompt]],
                            [teacher_text[id(e)] for e in batch.examples[:: config.rollout.samples_per_prompt]],
                            tokenizer.pad_token_id,
                        )
                        disc_metrics = discriminator.update(batch, teacher_batch, batch.group_B)
                    t1 = time.perf_counter()
                    student_logits = completion_logits(model, input_ids, attention, batch.completion_len)
                    loss, loss_metrics = micro_batch_loss(
                        config, batch, student_logits, teacher_logits, step=step, num_tokens=step_tokens,
                        vocab_size=vocab_size, tokenizer=tokenizer, verifier=verifier, reference=reference,
                        rewards_B=rewards, cross=cross,
                    )
                    loss_metrics.update(disc_metrics)
                    if gad and step <= config.loss.discriminator_warmup_steps:
                        loss = loss * 0.0  # discriminator warm-up: the student does not move yet
                    for key, value in loss_metrics.items():
                        loss_sums[key] = loss_sums.get(key, 0.0) + value
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
                    raise OpdError(f"loss or gradient was NaN/inf for {nonfinite_in_a_row} steps in a row "
                                   f"(step {step}); lower optim.lr or check the models")
            else:
                nonfinite_in_a_row = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if isinstance(teacher, SelfTeacher):
                    teacher.after_step()
            if engine is not None and step % config.rollout.weight_sync_every == 0:
                weight_sync_s = engine.update_weights(accelerator.unwrap_model(model))
            with warnings.catch_warnings():
                # A skipped step still advances the schedule, so LR stays tied to the step number.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
                scheduler.step()

            step_s = time.perf_counter() - step_start
            counters["seconds_rollout"] += rollout_s
            counters["seconds_teacher"] += teacher_s
            counters["seconds_student"] += step_s - rollout_s - teacher_s  # forward, backward, loss, optimizer
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
                    **({"perf/weight_sync_s": weight_sync_s} if engine is not None else {}),
                    **{f"compute/{key}": value for key, value in counters.items()},
                }
                row["train/grad_norm"] = grad_norm
                if isinstance(teacher, ServedTeacher):
                    row.update(teacher.pop_stats())  # requests, retries, timeouts, ... since the last row
                # Per-teacher routing: each teacher's tokens and mean divergence (or reverse-KL estimate).
                for key in sorted(k for k in loss_sums if k.startswith("routes/") and k.endswith("/tokens")):
                    name = key.split("/")[1]
                    tokens = float(accelerator.reduce(torch.tensor(loss_sums[key], device=accelerator.device),
                                                      "sum").item())
                    signal = float(accelerator.reduce(torch.tensor(loss_sums[f"routes/{name}/signal_sum"],
                                                                   device=accelerator.device), "sum").item())
                    row[f"teacher/{name}/tokens"] = tokens
                    row[f"teacher/{name}/divergence_mean"] = signal / max(tokens, 1.0)
                # Loss-side sums (e.g. loss/divergence_sum) become per-token means over the global step.
                for key in sorted(k for k in loss_sums if not k.startswith("routes/")):
                    total = float(accelerator.reduce(torch.tensor(loss_sums[key], device=accelerator.device),
                                                     "sum").item())
                    if key.endswith("_sum"):
                        row[key[: -len("_sum")] + "_mean"] = total / max(step_tokens, 1.0)
                    elif key != "loss/tokens":
                        row[key] = total / (world * len(micro_batches))  # a mean over micro-batches
                for key in sorted({k for m in rollout_metrics for k in m}):
                    local = sum(m.get(key, 0.0) for m in rollout_metrics) / len(rollout_metrics)
                    row[key] = float(accelerator.reduce(torch.tensor(local, device=accelerator.device), "mean").item())
                metrics_log.log(step, row)

            if adaptive is not None and step % config.train.eval_every == 0:
                with torch.no_grad():
                    val_loss = reference_nll(accelerator.unwrap_model(model), tokenizer, eval_examples,
                                             temperature=config.temperature, vocab_size=vocab_size,
                                             batch_size=config.eval.batch_size)
                rose = adaptive.update(val_loss)
                metrics_log.log(step, {"eval/reference_nll": val_loss, "rollout/adaptive_phi": adaptive.phi})
                if rose and is_main:
                    say(f"step {step}: validation loss {val_loss:.4f} rose; student-sample probability -> "
                              f"{adaptive.phi:.2f}")
            if config.train.eval_every and step % config.train.eval_every == 0 and step != config.train.steps:
                last_eval = run_eval(step)
                if is_main and last_eval:
                    say(_eval_line(step, last_eval))
            if config.train.save_every and step % config.train.save_every == 0:
                ckpt.save_checkpoint(run_dir, step, accelerator.unwrap_model(model), optimizer, scheduler,
                                     {"data_position": stream.position, "counters": counters,
                                      **({"adaptive_off_policy": adaptive.state_dict()} if adaptive else {})},
                                     config.train.keep_checkpoints,
                                     rank=accelerator.process_index, barrier=accelerator.wait_for_everyone,
                                     extra_modules=teacher_state,
                                     extra_states={name: obj.state_dict() for name, obj in extra_states.items()})
            accelerator.wait_for_everyone()
        bar.close()
    finally:
        if engine is not None:
            engine.shutdown()

    # --- final model and evaluation ------------------------------------------------
    final_dir = run_dir / "final"
    if is_main:
        tmp = ckpt.atomic_dir(final_dir)
        final_model = accelerator.unwrap_model(model)
        if config.model.lora_r is not None:
            import copy

            final_model.save_pretrained(tmp / "adapter", safe_serialization=True)  # the adapter alone
            final_model = copy.deepcopy(final_model).merge_and_unload()  # a plain model, loadable anywhere
        if config.train.gradient_checkpointing:
            final_model.gradient_checkpointing_disable()
        final_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        ckpt.commit_dir(tmp, final_dir)
    last_eval = run_eval(config.train.steps) if is_main else {}
    if is_main:
        elapsed = time.perf_counter() - loop_start
        log(f"done: {config.train.steps - start_step} steps in {elapsed:.1f}s, {tokens_seen} completion tokens; "
            f"final student in {final_dir}")
        if last_eval:
            log(_eval_line(config.train.steps, last_eval))
        log(compute_summary(counters))
    metrics_log.close()
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, final_dir, config.train.steps, last_eval, time.perf_counter() - started,
                       counters)


def compute_summary(counters: dict[str, float]) -> str:
    """One line per phase: wall time, estimated FLOPs and tokens."""
    def fmt(flops: float) -> str:
        for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
            if flops >= scale:
                return f"{flops / scale:.2f} {unit}"
        return f"{flops / 1e6:.2f} MFLOP"

    remote_teacher = counters["flops_teacher"] == 0 and counters["teacher_scored_tokens"] > 0
    return (f"compute: generation {counters['seconds_rollout']:.1f}s ~{fmt(counters['flops_generation'])} "
            f"({int(counters['student_generated_tokens'])} student tokens); "
            f"teacher {counters['seconds_teacher']:.1f}s "
            f"{'FLOPs not known (remote)' if remote_teacher else '~' + fmt(counters['flops_teacher'])} "
            f"({int(counters['teacher_scored_tokens'])} tokens scored); "
            f"student update {counters['seconds_student']:.1f}s ~{fmt(counters['flops_student'])}")


def _start_engine(config: RunConfig, accelerator: Any, model: Any, tokenizer: Any, log: Any) -> Any:
    """The in-process vLLM rollout engine, holding the student's current weights."""
    from opd.vllm_engine import VLLMEngine

    if accelerator.num_processes > 1:
        raise OpdError("rollout.engine=vllm runs in-process on a single process; use the hf engine (or a served "
                       "teacher) under torchrun / accelerate launch")
    started = time.perf_counter()
    dtype = config.rollout.vllm_dtype
    if dtype == "auto":
        # Sample in the precision the student's forward runs in: under bf16 autocast a float32
        # sampler would cost twice the memory traffic per token for no closer match.
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(config.train.mixed_precision, config.model.dtype)
    engine = VLLMEngine.from_model_dir(
        config.model.student, dtype=dtype, seed=config.train.seed,
        kv_cache_gb=config.rollout.vllm_kv_cache_gb,
        max_model_len=min(config.data.max_prompt_tokens + config.rollout.max_new_tokens,
                          getattr(accelerator.unwrap_model(model).config, "max_position_embeddings", None) or 1 << 30),
        tokenizer=config.model.tokenizer,
    )
    # After any checkpoint restore (and LoRA wrapping): the engine samples from these weights.
    engine.update_weights(accelerator.unwrap_model(model))
    if log is not None:
        log(f"vllm engine ({dtype}) ready in {time.perf_counter() - started:.1f}s; weights pushed every "
            f"{config.rollout.weight_sync_every} step(s)")
    return engine


def _mean_grads(accelerator: Any) -> Any:
    def reduce(module: torch.nn.Module) -> None:
        for param in module.parameters():
            if param.grad is not None:
                param.grad.copy_(accelerator.reduce(param.grad, reduction="mean"))

    return reduce


@torch.no_grad()
def _teacher_answers(
    teacher: Any, examples: list[Example], config: RunConfig, vocab_size: int, log: Any
) -> dict[int, list[int]]:
    """One teacher answer per training prompt, keyed by ``id(example)``."""
    if teacher is None:
        return {id(e): list(e.answer_ids or []) for e in examples}
    params = SamplingParams(max_new_tokens=config.rollout.max_new_tokens, temperature=config.temperature,
                            top_p=config.rollout.top_p, top_k=config.rollout.top_k, vocab_size=vocab_size)
    started = time.perf_counter()
    answers: dict[int, list[int]] = {}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.train.seed + 104_729)
        for start in range(0, len(examples), config.eval.batch_size):
            chunk = examples[start : start + config.eval.batch_size]
            for example, completion in zip(chunk, teacher.generate([e.prompt_ids for e in chunk], params)):
                if not completion:
                    raise OpdError(f"the teacher wrote an empty answer to {example.prompt[:40]!r}; GAD needs text")
                answers[id(example)] = completion
    if log is not None:
        log(f"teacher wrote {len(answers)} answers in {time.perf_counter() - started:.1f}s")
    return answers


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
