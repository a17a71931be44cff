"""Assembly: a :class:`~opd.config.RunConfig` becomes the parts of a run.

This is the only module that reads ``teacher.kind`` and ``loss.objective``: it loads the student,
the teacher(s) and the data, checks what needs the loaded models (shared vocabulary, positions,
routed teacher names), and hands the training loop (:mod:`opd.trainer`) parts that all look the
same whatever the method:

- a **teacher** (:class:`opd.teachers.Teacher`): ``score(batch) -> TeacherSignal``;
- an **objective** (:mod:`opd.losses`): ``objective(student_logits, signal, batch, ...) -> (loss, metrics)``;
- **rollouts** (:class:`opd.rollout.Rollouts`): the step's micro-batches from the behaviour policy;
- **hooks** (:class:`opd.hooks.Hooks`): everything that changes alongside the student and is
  checkpointed with it;
- an **evaluator**.

Combinations that cannot work are refused when the config is loaded (``RunConfig``'s checks);
what can only be checked against the loaded models is refused here, before anything is written.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from opd.cache import CachedRollouts, CachedTeacher, open_cache
from opd.config import RunConfig, TeacherConfig
from opd.data import Example, load_examples
from opd.discriminator import Discriminator, DiscriminatorReward, DiscriminatorTrainer
from opd.errors import OpdError
from opd.eval import Evaluator, reference_nll, resolve_first_error, resolve_scorer
from opd.fused import FusedUnsupported, check_fused, completion_hidden
from opd.hooks import Hooks
from opd.losses import OBJECTIVES, Objective, WithEntropyGatedForwardKL
from opd.models import add_lora, completion_logits, disable_dropout, load_causal_lm, load_tokenizer, shared_vocab_size
from opd.rollout import (
    AdaptiveOffPolicy,
    AdaptiveRollouts,
    AsyncRollouts,
    BehaviourPolicy,
    CoSampler,
    DatasetAnswers,
    ExampleStream,
    PolicyRollouts,
    Rollouts,
    SamplingParams,
    SnapshotSampler,
    StudentSampler,
    TeacherAnswers,
    stop_token_ids,
)
from opd.teachers import (
    CrossTokenizerTeacher,
    LocalTeacher,
    NoTeacher,
    ReferencePolicy,
    RoutedTeacher,
    SelfTeacher,
    ServedTeacher,
    Teacher,
    VerifierReward,
    WithSignals,
)
from opd.verifiers import resolve_verifier


@dataclass
class Run:
    """Everything the training loop needs, assembled."""

    tokenizer: Any
    student: torch.nn.Module  # on its device, dropout off, LoRA / gradient checkpointing applied
    teacher: Teacher  # scores every micro-batch
    objective: Objective
    rollouts: Rollouts
    hooks: list[Hooks]  # state that changes alongside the student (rollouts' data position first)
    evaluator: Evaluator
    vocab_size: int
    student_flops_per_token: float  # 2 N, N = the student's parameters
    counters: dict[str, float] = field(default_factory=dict)  # compute spent before step 1
    teachers: dict[str, Teacher] = field(default_factory=dict)  # every teacher model called ("" = the main one)
    # The student's forward at the completion positions: hidden states + head (the fused path,
    # opd.fused.completion_hidden) or logits (opd.models.completion_logits).
    student_forward: Any = completion_logits


def build_objective(config: RunConfig, vocab_size: int) -> Objective:
    """``loss.objective`` from the registry, plus the add-on terms the config asks for."""
    objective = OBJECTIVES[config.loss.objective](config, vocab_size)
    loss = config.loss
    if loss.entropy_threshold is not None:
        from opd.losses import Common

        objective = WithEntropyGatedForwardKL(objective, loss.entropy_threshold, loss.entropy_coef,
                                              loss.entropy_top_k, Common.of(config, vocab_size))
    return objective


def make_teacher(cfg: TeacherConfig, tokenizer: Any, *, cpu_linear: str = "onednn",
                 student: torch.nn.Module | None = None) -> Teacher | None:
    """One teacher from its config section (None: a text teacher without a model, whose "answers"
    are the data's; a cache is opened by :func:`build_run`, which also knows the data)."""
    if cfg.kind == "served":
        return ServedTeacher(cfg, tokenizer)
    if cfg.kind == "cache":
        return None  # the cache is the teacher (opd.cache.CachedTeacher)
    if cfg.kind == "self":
        if student is None:
            raise OpdError("teacher.kind=self needs the student")
        return SelfTeacher(student, tokenizer, cfg)  # copies the initial weights unless they are live
    if cfg.model is None:
        return None
    if cfg.kind == "cross_tokenizer":
        return CrossTokenizerTeacher.from_config(cfg, tokenizer, cpu_linear=cpu_linear, own_vocabulary=True)
    return LocalTeacher.from_config(cfg, tokenizer, cpu_linear=cpu_linear, own_vocabulary=cfg.kind == "text")


def cache_scorer(config: RunConfig, tokenizer: Any) -> LocalTeacher | ServedTeacher:
    """The teacher that scores a teacher cache (``opd cache-teacher``): a local or served one."""
    if config.teacher.kind not in ("local", "served"):
        raise OpdError(f"a cache is scored by a local or served teacher, not teacher.kind={config.teacher.kind}")
    teacher = make_teacher(config.teacher, tokenizer, cpu_linear=config.train.cpu_linear)
    if teacher is None:
        raise OpdError("teacher.model is required to score a cache")
    return teacher  # type: ignore[return-value]


def build_run(config: RunConfig, accelerator: Any, log: Any = None) -> Run:
    """Load and assemble every part of ``config``'s run. ``log`` (main process only) gets the
    one-line notes (data kept, templates, vocabulary sharing)."""
    say = log or (lambda *_: None)
    world = accelerator.num_processes
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.student,
                               trust_remote_code=config.model.trust_remote_code)
    student = _load_student(config)
    kind, objective_name = config.teacher.kind, config.loss.objective
    cache = open_cache(config, tokenizer) if kind == "cache" else None
    teacher = make_teacher(config.teacher, tokenizer, cpu_linear=config.train.cpu_linear, student=student)
    routed = {name: make_teacher(cfg, tokenizer, cpu_linear=config.train.cpu_linear)
              for name, cfg in config.teachers.items()}
    # Teachers compared token by token share the student's vocabulary; text and cross-tokenizer ones do not.
    shared = [t.model for t in [teacher if kind == "local" else None, *routed.values()] if isinstance(t, LocalTeacher)]
    vocab_size = shared_vocab_size(tokenizer, student, *shared)
    need_answers = (config.rollout.on_policy_range()[0] < 1.0 and config.rollout.off_policy_source == "dataset") \
        or objective_name == "kdrl" or (objective_name == "gad" and teacher is None)
    reference = None
    if config.loss.reward_scale != 1.0:  # G-OPD / ExOPD's frozen reference: the initial student
        reference = LocalTeacher(_load_student(config), tokenizer, name="reference")
    train_examples, report = load_examples(config.data.train, config.data, tokenizer,
                                           limit=config.data.max_train_examples, need_answers=need_answers)
    eval_examples: list[Example] = []
    if config.data.eval:
        # The built-in scorers and first-error measure compare with the reference: a row without one would
        # count as wrong without a word. Only custom functions (module:function) may do without.
        custom = ":" in config.eval.scorer and ":" in config.eval.first_error
        eval_examples, _ = load_examples(config.data.eval, config.data, tokenizer, limit=config.data.max_eval_examples,
                                         need_answers=not custom,
                                         why="data.eval rows are scored against it; custom eval.scorer and "
                                         "eval.first_error functions may do without")
    if isinstance(teacher, SelfTeacher):
        teacher.check(train_examples)
    _check_routes(config, train_examples, routed)
    say(f"data: {report.kept} prompts from {config.data.train} "
        f"({report.skipped_overlong} over-long skipped, {report.truncated} truncated)")
    _check_shapes(config, tokenizer, student, teacher if kind == "local" else None, train_examples, vocab_size, log)

    discriminator = None
    if objective_name == "gad":  # built before LoRA: its head's initialisation draws from the seeded RNG
        backbone = config.loss.discriminator_model or config.model.student
        discriminator = DiscriminatorTrainer(
            Discriminator.from_pretrained(backbone, dtype=config.model.dtype,
                                          trust_remote_code=config.model.trust_remote_code),
            lr=config.loss.discriminator_lr, max_grad_norm=config.optim.max_grad_norm,
            reduce_grads=_mean_grads(accelerator) if world > 1 else None,
        )
        discriminator.model.to(accelerator.device)

    student.to(accelerator.device)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.mixed_precision)
    for frozen in (teacher, reference, *routed.values()):
        if getattr(frozen, "model", None) is not None:  # a served teacher has no local model
            frozen.model.to(config.teacher.device if frozen is teacher and config.teacher.device else
                            accelerator.device)
        if isinstance(frozen, LocalTeacher) and compute_dtype is not None:
            frozen.compute_in(compute_dtype)  # same logits as autocast over its fp32 weights, cast once
    if config.teacher.shard:
        from opd.parallel import shard_for_inference

        shard_for_inference(teacher.model, world)  # forwards only, in step on every process
    counters: dict[str, float] = {}
    hooks: list[Hooks] = []

    # --- the teacher signal ----------------------------------------------------------------------------
    scorer: Teacher
    if objective_name == "nll":
        scorer = NoTeacher()  # SeqKD: the teacher (if any) only writes the text
    elif objective_name == "gad":
        # GAD's teacher text: written once per prompt by the black-box teacher (seeded, so a resumed
        # run sees the same answers), or the data's answers when no teacher model is given.
        teacher_text = _teacher_answers(teacher, train_examples, config, vocab_size, log)
        if teacher is not None:
            counters["teacher_generated_tokens"] = float(sum(len(ids) for ids in teacher_text.values()))
        assert discriminator is not None
        gad = DiscriminatorReward(discriminator, teacher_text, config.rollout.samples_per_prompt,
                                  tokenizer.pad_token_id)
        scorer = WithSignals(NoTeacher(), [gad])
        hooks.append(gad)
    elif cache is not None:
        scorer = CachedTeacher(cache)
    elif routed:
        objective = build_objective(config, vocab_size)
        scorer = RoutedTeacher(teacher, routed, config.data.teacher_field, objective.form, k=config.teacher.top_k,
                               temperature=config.temperature, vocab_size=vocab_size,
                               chunk_size=config.loss.chunk_size)
    else:
        scorer = teacher
    if isinstance(teacher, CrossTokenizerTeacher):
        if config.loss.uld_hybrid:
            teacher.with_matched_vocabulary()
        matched = 0 if teacher.matched is None else teacher.matched[0].numel()
        say(f"cross-tokenizer teacher: {len(teacher.tokenizer)} tokens, {matched} shared with the student's "
            f"{vocab_size}")
    if reference is not None:
        scorer = WithSignals(scorer, [ReferencePolicy(reference)])
    if objective_name == "kdrl":
        scorer = WithSignals(scorer, [VerifierReward(resolve_verifier(config.loss.verifier), tokenizer)])
    if isinstance(teacher, SelfTeacher):
        hooks.append(teacher)  # EMA weights

    # --- the student and its rollouts --------------------------------------------------------------------
    student = _prepare_student(config, student)
    rollouts = _build_rollouts(config, accelerator, tokenizer, student, teacher, cache, train_examples,
                               eval_examples, vocab_size, log)
    hooks = [rollouts, *hooks]
    sampler = getattr(getattr(rollouts, "policy", None), "sampler", None)
    if isinstance(sampler, Hooks):  # a rollout engine that holds the student's weights
        hooks.append(sampler)
    # Evaluation's teacher divergence needs full logits on the student's vocabulary.
    # (A sharded teacher's forwards are collective, and evaluation runs on the main process alone.)
    eval_teacher = teacher if kind in ("local", "self") and teacher is not None and not config.teacher.shard \
        else None
    evaluator = Evaluator(
        eval_examples, tokenizer,
        SamplingParams(max_new_tokens=config.eval.max_new_tokens or config.rollout.max_new_tokens,
                       temperature=config.temperature, top_p=config.rollout.top_p, top_k=config.rollout.top_k,
                       vocab_size=vocab_size),
        scorer=resolve_scorer(config.eval.scorer), first_error=resolve_first_error(config.eval.first_error),
        teacher=eval_teacher, vocab_size=vocab_size, batch_size=config.eval.batch_size, sampled=config.eval.sampled,
        seed=config.train.seed + 7919,
    )
    # --- training-time diagnostics (issue 18): eval/topk_*, eval/calibration_*, eval/student_* -----------
    if config.eval.diagnostics and eval_examples:
        from opd.diagnostics import DEFAULT_TOP_K, TrainingDiagnostics

        evaluator.extras.append(TrainingDiagnostics(
            eval_examples[: config.eval.diagnostics_prompts], tokenizer, evaluator.params, scorer=evaluator.scorer,
            teacher=teacher, vocab_size=vocab_size, top_k=config.teacher.top_k or DEFAULT_TOP_K,
            batch_size=config.eval.batch_size))
    # --- end training-time diagnostics ----------------------------------------------------------------------
    teachers = {name: t for name, t in {"": teacher, **routed}.items() if t is not None}
    objective = build_objective(config, vocab_size)
    fused = _fused_path(config, student, objective, log)
    if fused and isinstance(teacher, LocalTeacher) and not routed and not config.teacher.shard:
        # (a sharded teacher frees its head's weights after each forward; routed signals are merged as logits)
        for local in (teacher, reference):
            if local is not None:
                with local.precision():  # a teacher computing in bf16 is checked as it runs
                    local.fused = _fused_path(config, local.model, objective, log, what="teacher")
    return Run(tokenizer, student, scorer, objective, rollouts, hooks, evaluator,
               vocab_size, 2.0 * sum(p.numel() for p in student.parameters()), counters, teachers,
               completion_hidden if fused else completion_logits)


def _fused_path(config: RunConfig, model: torch.nn.Module, objective: Objective, log: Any,
                what: str = "student") -> bool:
    """Whether ``model``'s divergences run from its hidden states (``loss.fused``), after checking once
    that hidden states @ head reproduce its logits; otherwise one line says why not."""
    if not config.loss.fused or not getattr(objective, "fused", True):
        return False
    if config.train.resolved_distributed() == "deepspeed" and config.train.zero_stage == 3:
        if log is not None and what == "student":
            log("fused loss off: DeepSpeed ZeRO-3 releases the LM head's weights after each forward")
        return False
    try:
        check_fused(model)
    except FusedUnsupported as exc:
        if log is not None:
            log(f"fused loss off for the {what}: {exc}")
        return False
    return True


def fresh_student(config: RunConfig) -> torch.nn.Module:
    """An unsharded copy of the student as the run builds it (LoRA adapters included), to load a
    gathered state dict into for export."""
    student = _load_student(config)
    return add_lora(student, config.model) if config.model.lora_r is not None else student


def _load_student(config: RunConfig) -> torch.nn.Module:
    return load_causal_lm(config.model.student, dtype=config.model.dtype,
                          trust_remote_code=config.model.trust_remote_code,
                          attn_implementation=config.model.attn_implementation, cpu_linear=config.train.cpu_linear)


def _prepare_student(config: RunConfig, student: torch.nn.Module) -> torch.nn.Module:
    # Dropout stays off: the policy that is scored must be the one that sampled the tokens.
    student.eval()
    if config.model.lora_r is not None:
        student = add_lora(student, config.model)
    if config.train.gradient_checkpointing:
        # transformers only checkpoints in train mode, so dropout is zeroed instead of using eval().
        disable_dropout(student)
        student.train()
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return student


def _build_rollouts(config: RunConfig, accelerator: Any, tokenizer: Any, student: torch.nn.Module,
                    teacher: Teacher | None, cache: Any, train_examples: list[Example], eval_examples: list[Example],
                    vocab_size: int, log: Any) -> Rollouts:
    rank, world = accelerator.process_index, accelerator.num_processes
    steps, train = config.train.steps, config.train
    if cache is not None:  # a cached teacher replays its stored rollouts
        return CachedRollouts(cache, tokenizer.pad_token_id, train.seed, rank, world, train.batch_size,
                              train.grad_accum, steps)
    rollout = config.rollout
    dtype = rollout.vllm_dtype
    if dtype == "auto":
        # Sample in the precision the student's forward runs in: under bf16 autocast a float32
        # sampler would cost twice the memory traffic per token for no closer match.
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(train.mixed_precision, config.model.dtype)
    max_model_len = min(config.data.max_prompt_tokens + rollout.max_new_tokens,
                        getattr(student.config, "max_position_embeddings", None) or 1 << 30)
    if rollout.engine == "vllm_server":
        from opd.rollout_server import VLLMServerSampler

        sampler: Any = VLLMServerSampler(
            rollout, model_dir=config.model.student, tokenizer=tokenizer, eos_ids=stop_token_ids(student, tokenizer),
            output_rows=student.get_output_embeddings().weight.shape[0], max_model_len=max_model_len, dtype=dtype,
            accelerator=accelerator, log=log)
    elif rollout.engine == "vllm":
        from opd.vllm_engine import VLLMSampler

        sampler = VLLMSampler(
            config.model.student, student=student, dtype=dtype, seed=train.seed, kv_cache_gb=rollout.vllm_kv_cache_gb,
            max_model_len=max_model_len, tokenizer=config.model.tokenizer, sync_every=rollout.weight_sync_every,
            processes=world, log=log)
    elif rollout.sampler != "student":
        sampler = CoSampler(teacher, tokenizer, rollout.sampler, rollout.mixture_alpha, rollout.speculative_top_k)
    elif rollout.async_steps:
        sampler = SnapshotSampler(tokenizer)  # its own copy of the weights, decoded beside training
    else:
        sampler = StudentSampler(tokenizer)
    off_policy = DatasetAnswers(rollout.max_new_tokens) if rollout.off_policy_source == "dataset" else \
        TeacherAnswers(teacher)
    policy = BehaviourPolicy(rollout, config.temperature, tokenizer, teacher, vocab_size, sampler=sampler,
                             off_policy=off_policy)
    stream = ExampleStream(train_examples, train.seed, rank, world)
    if rollout.adaptive_off_policy:
        def validation_loss() -> float:
            with torch.no_grad():
                return reference_nll(student, tokenizer, eval_examples, temperature=config.temperature,
                                     vocab_size=vocab_size, batch_size=config.eval.batch_size)

        return AdaptiveRollouts(policy, stream, train.batch_size, train.grad_accum, steps, AdaptiveOffPolicy(rollout),
                                validation_loss, train.eval_every, precision=accelerator.autocast, log=log)
    rollouts = PolicyRollouts(policy, stream, train.batch_size, train.grad_accum, steps, precision=accelerator.autocast)
    if rollout.async_steps:
        return AsyncRollouts(rollouts, rollout.async_steps, sampler, train.seed, rank, rollout.weight_sync_every)
    return rollouts


def _check_routes(config: RunConfig, examples: list[Example], routed: dict[str, Any]) -> None:
    if not routed:
        return
    unknown = sorted({str(e.extra.get(config.data.teacher_field)) for e in examples
                      if e.extra.get(config.data.teacher_field) not in (None, *routed)})
    if unknown:
        raise OpdError(f"data.teacher_field={config.data.teacher_field}: rows name teacher(s) "
                       f"{', '.join(unknown[:3])} that are not in `teachers` ({', '.join(routed)})")


def _check_shapes(config: RunConfig, tokenizer: Any, student: torch.nn.Module, local: Any,
                  examples: list[Example], vocab_size: int, log: Any) -> None:
    """What only the loaded models can tell: chat templates, top-k sizes, positions."""
    if isinstance(local, LocalTeacher) and log is not None and \
            local.chat_template != getattr(tokenizer, "chat_template", None):
        log("teacher and student chat templates differ: chat prompts are rendered with the teacher's own "
            "template for scoring (plain-text prompts are shared as they are)")
    if (config.rollout.top_p < 1.0 or config.rollout.top_k > 0) and log is not None:
        warnings.warn("rollout.top_p / top_k filter the student's samples, but the token-level loss compares "
                      "the full temperature-scaled distributions", stacklevel=3)
    for label, k in (("teacher.top_k", config.teacher.top_k), ("loss.entropy_top_k", config.loss.entropy_top_k)):
        if k is not None and k > vocab_size:
            raise OpdError(f"{label}={k} exceeds the vocabulary ({vocab_size} tokens); lower it")
    max_positions = getattr(student.config, "max_position_embeddings", None)
    longest = max(len(e.prompt_ids) for e in examples) + config.rollout.max_new_tokens
    if max_positions and longest > max_positions:
        raise OpdError(f"longest prompt + rollout.max_new_tokens = {longest} tokens exceeds the student's "
                       f"{max_positions} positions; lower data.max_prompt_tokens or rollout.max_new_tokens")


def _mean_grads(accelerator: Any) -> Any:
    def reduce(module: torch.nn.Module) -> None:
        for param in module.parameters():
            if param.grad is not None:
                param.grad.copy_(accelerator.reduce(param.grad, reduction="mean"))

    return reduce


@torch.no_grad()
def _teacher_answers(
    teacher: Teacher | None, examples: list[Example], config: RunConfig, vocab_size: int, log: Any
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
