"""Run configuration: validated pydantic models, YAML recipes and ``key=value`` overrides.

A run config has one section per design axis (see README "Design axes"):

- ``rollout``  who writes the response (behaviour policy) and how it is sampled,
- ``loss``     which objective / divergence compares teacher and student,
- ``teacher``  what the teacher is and what it exposes,

plus ``model`` (the student), ``data``, ``optim``, ``train`` and ``eval``.
Every field is range-checked when the config is built, unknown keys are rejected,
and :func:`load_config` turns any problem into one readable :class:`ConfigError` line.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from opd.errors import ConfigError


def _not_bool(value: Any) -> Any:
    # Python's bool is an int, so pydantic would take `train.steps=true` as 1 step.
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


_NOT_BOOL = BeforeValidator(_not_bool)
# Integers are strict (no "3", 3.0 or true); overrides are parsed as YAML scalars first, so
# `train.steps=3` still arrives as 3. Floats take ints and number strings (PyYAML reads `1e-5`
# without a dot as a string) but never booleans.
Int = Annotated[int, _NOT_BOOL, Strict()]
Float = Annotated[float, _NOT_BOOL]


class _Section(BaseModel):
    # allow_inf_nan=False: `optim.lr=.inf` or a NaN anywhere is refused at load, not trained with.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    student: str = Field(description="Student model: local directory or hub id loadable by AutoModelForCausalLM.")
    tokenizer: str | None = Field(None, description="Student tokenizer; defaults to `student`.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Student weight dtype. AdamW updates weights in this dtype (no fp32 master copy), "
        "so keep float32 unless memory forces otherwise.",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off by default).")
    attn_implementation: str = Field(
        "auto", description="Attention kernel. `auto`: models that load with SDPA run opd's kernel (`opd_sdpa`: "
        "SDPA's results, computed with float32 matmuls on CPU for short sequences, where PyTorch's CPU SDPA "
        "backward is slow; long sequences and GPUs still use SDPA); or any transformers name (`sdpa`, `eager`, "
        "`flash_attention_2`).",
    )
    lora_r: Int | None = Field(
        None, ge=1, description="Train LoRA adapters of this rank (PEFT) instead of all weights; the final model "
        "is saved merged, the adapter alone in final/adapter (null = full fine-tuning).",
    )
    lora_alpha: Float = Field(32.0, gt=0.0, description="LoRA scaling alpha.")
    lora_dropout: Float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout (keep 0 for on-policy losses).")
    lora_target_modules: list[str] | str = Field(
        "all-linear", description="Modules that get adapters (PEFT names; `all-linear` = every linear layer).",
    )


class TeacherConfig(_Section):
    kind: Literal["local", "self", "text", "cross_tokenizer", "served", "cache"] = Field(
        "local", description="What the teacher is. `local`: a white-box model with full logits; `self`: the student "
        "itself shown privileged context (`context_template`), as in OPSD / SDFT; `text`: a black box whose "
        "generated text is all that is used (GAD, SeqKD) — written by `model`, or the data's answers when unset; "
        "`cross_tokenizer`: a white-box model with its own tokenizer (loss.objective=uld); `served`: an "
        "OpenAI-compatible completions server (vLLM, opd serve-teacher) giving sampled-token and top-k log-probs; "
        "`cache`: top-k log-probs stored by opd cache-teacher.",
    )
    context_template: str = Field(
        "{prompt}", description="Self-teacher prompt; `{prompt}`, `{answer}` and any other data field are filled "
        "in per row (for chat rows it rewrites the last user turn).",
    )
    self_weights: Literal["live", "frozen", "ema"] = Field(
        "ema", description="Self-teacher weights: the live student, a frozen copy of the initial student, or an EMA.",
    )
    ema_decay: Float = Field(0.99, ge=0.0, lt=1.0, description="EMA decay of the self-teacher per optimizer step.")
    url: str | list[str] | None = Field(
        None, description="Served teacher: base URL of the completions server, or a list of servers (a pool: "
        "requests go to the least busy healthy one; one that fails is set aside for server_cooldown_s and the "
        "request retried on another, so the run survives losing all but one).",
    )
    server_cooldown_s: Float = Field(
        30.0, gt=0.0, description="Served teacher pool: seconds a failed server is left out before it is tried again.",
    )
    served_model: str | None = Field(None, description="Served teacher: model name sent in requests (default: model).")
    api_key_env: str | None = Field(
        "OPD_TEACHER_API_KEY", description="Served teacher: environment variable holding the API key (sent as a "
        "Bearer token if set; the key itself is never stored in configs or logs).",
    )
    timeout_s: Float = Field(60.0, gt=0.0, description="Served teacher: seconds to wait for one request.")
    max_retries: Int = Field(5, ge=0, description="Served teacher: retries (exponential backoff) before failing.")
    backoff_s: Float = Field(0.5, ge=0.0, description="Served teacher: first retry delay, doubled each retry.")
    concurrency: Int = Field(4, ge=1, description="Served teacher: requests in flight at once.")
    request_batch: Int = Field(8, ge=1, description="Served teacher: sequences per request.")
    cache: str | None = Field(None, description="Cached teacher: directory written by opd cache-teacher.")
    model: str | None = Field(None, description="Teacher model directory or hub id (required for `local`).")
    tokenizer: str | None = Field(None, description="Teacher tokenizer; defaults to `model`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Teacher weight dtype; `auto` keeps the checkpoint's own dtype."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off by default).")
    attn_implementation: str = Field(
        "auto", description="Teacher attention kernel, as `model.attn_implementation`.",
    )
    top_k: Int | None = Field(
        None, ge=1, description="The teacher exposes only its top-k log-probs per position (teacher-side memory "
        "O(T k), what served teachers and caches return); null = full logits. See `loss.topk_support`.",
    )
    device: str | None = Field(
        None, description="Local teacher: where it runs (`cuda:1`, `cpu`, ...), e.g. a GPU of its own beside the "
        "student's; null = the student's device.",
    )
    shard: bool = Field(
        False, description="Local teacher: shard it over the training processes with FSDP2 for its forward "
        "passes (no gradients, no optimizer), so a teacher larger than one device fits; needs several processes. "
        "A served teacher (`kind: served`) puts it on other machines instead.",
    )


class DataConfig(_Section):
    train: str = Field(description="Training prompts: .jsonl/.json file, .parquet file, saved dataset dir or hub name.")
    eval: str | None = Field(
        None, description="Held-out prompts with reference answers (same formats). A row without an answer is "
        "refused at load (file and line named), since accuracy and first-error positions are measured against it; "
        "only when eval.scorer and eval.first_error are both module:function may rows leave it out.",
    )
    split: str = Field("train", description="Split to read when `train`/`eval` is a `datasets` name.")
    prompt_field: str = Field("prompt", description="Field holding a plain-text prompt.")
    messages_field: str = Field(
        "messages", description="Field holding chat messages (rendered with the chat template)."
    )
    answer_field: str = Field("answer", description="Field holding the reference answer (optional for on-policy).")
    max_prompt_tokens: Int = Field(512, ge=1, description="Prompts longer than this are skipped or truncated.")
    overlong: Literal["skip", "truncate"] = Field(
        "skip", description="What to do with over-long prompts; truncation keeps the end of the prompt."
    )
    max_train_examples: Int | None = Field(None, ge=1, description="Use only the first N training rows.")
    max_eval_examples: Int | None = Field(None, ge=1, description="Use only the first N eval rows.")
    teacher_field: str | None = Field(
        None, description="Multi-teacher routing: the row field naming the teacher (a key of `teachers`) that "
        "scores the row; rows without it go to `teacher`.",
    )


class RolloutConfig(_Section):
    @model_validator(mode="after")
    def _check_schedule(self) -> RolloutConfig:
        points = self.on_policy_schedule
        if points is not None:
            if not points:
                raise ValueError("rollout.on_policy_schedule needs at least one [progress, lambda] point")
            for progress, fraction in points:
                if not (0.0 <= progress <= 1.0 and 0.0 <= fraction <= 1.0):
                    raise ValueError(f"rollout.on_policy_schedule point {[progress, fraction]}: progress and "
                                     "lambda must both be in [0, 1]")
            if any(b[0] <= a[0] for a, b in zip(points, points[1:])):
                raise ValueError("rollout.on_policy_schedule: progress values must increase strictly")
        return self

    def on_policy_fraction_at(self, step: int, total_steps: int) -> float:
        """GKD's lambda at ``step`` (1-based): ``on_policy_fraction``, or the schedule's value there."""
        points = self.on_policy_schedule
        if points is None:
            return self.on_policy_fraction
        progress = (step - 1) / max(1, total_steps - 1)
        if progress <= points[0][0]:
            return float(points[0][1])
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if progress <= x1:
                return float(y0 + (y1 - y0) * (progress - x0) / (x1 - x0))
        return float(points[-1][1])

    def on_policy_range(self) -> tuple[float, float]:
        """The smallest and largest lambda the run can use."""
        if self.on_policy_schedule is None:
            return self.on_policy_fraction, self.on_policy_fraction
        values = [fraction for _, fraction in self.on_policy_schedule]
        return min(values), max(values)

    on_policy_fraction: Float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="GKD's lambda: each sample is written by the student with this probability "
        "(decided per sample), otherwise taken from `off_policy_source`.",
    )
    on_policy_schedule: list[tuple[Float, Float]] | None = Field(
        None, description="A lambda schedule (GKD's lambda over the run): [progress, lambda] points, progress 0 = "
        "the first step and 1 = the last, interpolated linearly and held beyond the ends, e.g. [[0, 0], [0.3, 0], "
        "[0.6, 1]] = off-policy for the first 30 %, then a ramp to fully on-policy (the survey's off-policy warm-up "
        "followed by on-policy distillation). Replaces on_policy_fraction when set; the realised lambda is logged as "
        "rollout/on_policy_target.",
    )
    off_policy_source: Literal["dataset", "teacher"] = Field(
        "dataset", description="Who writes off-policy samples: the dataset's reference answers or teacher generations."
    )
    max_new_tokens: Int = Field(128, ge=1, description="Generation length cap for student and teacher rollouts.")
    top_p: Float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold for rollouts.")
    top_k: Int = Field(0, ge=0, description="Top-k sampling for rollouts (0 = off).")
    sampler: Literal["student", "mixture", "speculative"] = Field(
        "student", description="How on-policy samples are drawn: `student` alone; `mixture`: each token from "
        "(1-a) p_S + a p_T (MiniLLM teacher-mixed sampling); `speculative`: the student proposes, tokens outside "
        "the teacher's top-K are replaced by teacher samples (SKD). The last two decode with both models.",
    )
    mixture_alpha: Float = Field(0.2, ge=0.0, le=1.0, description="Teacher weight a of `sampler: mixture`.")
    speculative_top_k: Int = Field(
        25, ge=1, description="`sampler: speculative` keeps a student token if it is in the teacher's top-K."
    )
    samples_per_prompt: Int = Field(
        1, ge=1, description="Responses per prompt (a group, for group-normalised outcome rewards); "
        "train.batch_size counts prompts, so a micro-batch holds batch_size x samples_per_prompt sequences.",
    )
    adaptive_off_policy: bool = Field(
        False, description="DistiLLM's adaptive off-policy schedule (arXiv 2402.03898): each step trains on fresh "
        "student samples, a replay of earlier ones or the dataset, with a student probability phi that rises "
        "when validation loss worsens (needs data.eval and train.eval_every; on_policy_fraction must be 0).",
    )
    adaptive_init: Float = Field(0.0, ge=0.0, le=1.0, description="Initial phi of the adaptive schedule.")
    adaptive_increment: Float = Field(0.1, gt=0.0, le=1.0, description="Rise of phi when validation loss worsens.")
    adaptive_loss_eps: Float = Field(
        0.1, ge=0.0, description="phi rises when validation loss >= the last recorded value + this."
    )
    replay_buffer_size: Int = Field(1000, ge=1, description="Student samples kept for replay (FIFO).")
    engine: Literal["hf", "vllm", "vllm_server"] = Field(
        "hf", description="Student generation engine: `hf` (the transformers model, decoded with its KV cache by "
        "opd's sampling loop), `vllm` (in-process vLLM, `pip install 'opd[vllm]'`, one process) or `vllm_server` "
        "(a vLLM OpenAI server shared by every trainer rank, started by opd on 127.0.0.1 or reached at "
        "rollout.url; rank 0 pushes the student's weights into it). All return sampler log-probs for "
        "importance weights.",
    )
    url: str | None = Field(
        None, description="vllm_server: base URL of a running vLLM server with the student's architecture, started "
        "with VLLM_SERVER_DEV_MODE=1, --logprobs-mode processed_logprobs and --worker-extension-cls "
        "opd.vllm_worker.WeightPush (null: opd starts one on 127.0.0.1 from model.student).",
    )
    served_model: str | None = Field(None, description="vllm_server: model name for requests (default: the "
                                      "server's first model).")
    api_key_env: str | None = Field(
        "OPD_ROLLOUT_API_KEY", description="vllm_server: environment variable holding the server's API key (opd "
        "starts its server with it when set; sent as a Bearer token; never stored).",
    )
    server_args: list[str] = Field(
        default_factory=list, description="vllm_server: extra arguments for the server opd starts (e.g. "
        "[\"--tensor-parallel-size\", \"2\"]).",
    )
    server_cpus: str | None = Field(
        None, description="vllm_server: CPUs for the server opd starts (taskset list, e.g. `0` or `0-3`), so "
        "rollouts and training do not compete for the same cores.",
    )
    server_start_timeout_s: Float = Field(600.0, gt=0.0, description="vllm_server: seconds to wait for the server "
                                          "opd starts to answer.")

    @field_validator("server_cpus", mode="before")
    @classmethod
    def _cpu_list(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value  # `server_cpus=0` on the command line is an int
    server_timeout_s: Float = Field(600.0, gt=0.0, description="vllm_server: seconds to wait for one request.")
    server_retries: Int = Field(3, ge=0, description="vllm_server: retries of a failed request.")
    request_concurrency: Int = Field(64, ge=1, description="vllm_server: requests in flight per process.")
    async_steps: Annotated[Literal[0, 1, 2], _NOT_BOOL] = Field(
        0, description="Asynchronous rollouts: the rollouts of step t are written while step t-1 (and t-2) train, "
        "by a sampler with its own copy of the weights (the vLLM server, or a snapshot of the student for the hf "
        "engine), so they come from a policy up to async_steps updates old (logged as rollout/policy_lag; "
        "corrected by the importance ratio, see loss.importance_cap). 0 = synchronous.",
    )
    weight_sync_every: Int = Field(
        1, ge=1, description="vllm engine: push the student's weights every N optimizer steps; in between the "
        "sampler lags the learner (importance-weighted by the sampler log-probs).",
    )
    vllm_kv_cache_gb: Float = Field(1.0, gt=0.0, description="vllm engine: KV-cache memory (GiB).")
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="vllm engine: weight dtype of the sampler; `auto` = the precision the student computes "
        "in (bfloat16 / float16 under train.mixed_precision, else model.dtype). The pushed weights are cast to it.",
    )
    prefix_tokens: Int | None = Field(
        None, ge=1, description="Prefix OPD (arXiv 2602.15260): stop rollouts after this many tokens at the first "
        "step, so the loss sees only prefixes (null = full rollouts up to max_new_tokens).",
    )
    prefix_tokens_final: Int | None = Field(
        None, ge=1, description="Prefix length reached at the last step, growing linearly from prefix_tokens "
        "(null = keep prefix_tokens fixed).",
    )


class LossConfig(_Section):
    objective: str = Field(
        "divergence",
        description="A name registered in opd.losses.OBJECTIVES. `divergence`: token-level f-divergence against "
        "the teacher's distributions (top-k ones with teacher.top_k); "
        "`nll`: cross-entropy on the behaviour policy's tokens (SeqKD when they come from the teacher); "
        "`sampled_token_pg`: policy gradient with the teacher's log-prob of each sampled token as reward; "
        "`minillm`: sequence-level reverse KL by clipped policy gradient plus the exact single-step term; "
        "`kdrl`: verifier-reward policy gradient plus a KD term to the teacher (k2: reverse-KL gradient); "
        "`gad`: policy gradient on a discriminator's score trained to tell teacher text from student text; "
        "`uld`: cross-tokenizer distillation on byte-aligned token groups (ULD, optionally the GOLD hybrid); "
        "`kl_mix`: (1 - beta) forward KL + beta reverse KL.",
    )

    @field_validator("objective")
    @classmethod
    def _registered(cls, name: str) -> str:
        from opd.losses import OBJECTIVES  # the registry; opd.losses does not import this module back

        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; use one of {', '.join(sorted(OBJECTIVES))}")
        return name

    estimator: Literal["k1", "k2", "k3"] = Field(
        "k1", description="Single-sample reverse-KL estimator whose negative is the reward (sampled_token_pg)."
    )
    gamma: Float = Field(
        0.0, ge=0.0, le=1.0, description="Discount of rewards into returns (sampled_token_pg, minillm; the "
        "minillm recipe sets 1)."
    )
    clip_eps: Float = Field(0.2, gt=0.0, description="PPO ratio clipping of the minillm long-term term.")
    reward_scale: Float = Field(
        1.0, ge=0.0, description="G-OPD/ExOPD reward scale lambda (sampled_token_pg, estimator k1): the reward "
        "is lambda (log p_T - log p_ref) - (log p_S - log p_ref) with p_ref the initial student; >1 extrapolates.",
    )
    entropy_threshold: Float | None = Field(
        None, ge=0.0, description="Entropy-aware OPD: add forward KL on positions whose teacher entropy (nats) "
        "is >= this (0.8 in arXiv 2603.07079); null = off. Works with reverse_kl and sampled_token_pg.",
    )
    entropy_coef: Float = Field(1.0, ge=0.0, description="Weight of the entropy-gated forward-KL term.")
    entropy_top_k: Int | None = Field(
        16, ge=1, description="The gated forward KL uses the teacher's renormalised top-k (null = full vocab)."
    )
    verifier: str = Field(
        "exact_match", description="Outcome reward of `kdrl`: exact_match, numeric[:abs_tol=..,rel_tol=..], "
        "math_verify, or module:function (prompt, completion, reference) -> float/bool.",
    )
    kd_coef: Float = Field(5e-3, ge=0.0, description="KDRL: initial weight of the KD term.")
    kd_coef_min: Float = Field(1e-3, ge=0.0, description="KDRL: the KD weight decays linearly to this floor.")
    kd_coef_decay: Float = Field(5e-5, ge=0.0, description="KDRL: KD weight decrease per step (0 = constant).")
    kd_estimator: Literal["k2", "k3"] = Field(
        "k2", description="KDRL: the KD term's single-sample estimator, differentiated through the student's "
        "log-prob of its own token: `k2` gives the reverse-KL gradient (KDRL's), `k3` the forward-KL gradient "
        "(although its value estimates reverse KL).",
    )
    kd_mask_correct: bool = Field(False, description="KDRL: drop the KD term on responses the verifier accepts.")
    uld_hybrid: bool = Field(
        True, description="uld: compare tokens present in both vocabularies exactly (JSD(beta)) and use ULD only "
        "for the rest (GOLD); false = plain ULD on the whole sorted distributions.",
    )
    uld_matched_weight: Float | None = Field(
        None, ge=0.0, le=1.0, description="uld hybrid: weight of the exact part (null = the matched share of the "
        "teacher vocabulary); the ULD part gets 1 minus it.",
    )
    discriminator_model: str | None = Field(
        None, description="GAD: discriminator backbone checkpoint (null = the student's initial checkpoint)."
    )
    discriminator_lr: Float = Field(1e-6, gt=0.0, description="GAD: discriminator learning rate (AdamW).")
    discriminator_warmup_steps: Int = Field(
        10, ge=0, description="GAD: steps at the start that train only the discriminator (the student is frozen)."
    )
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tv", "skew_forward_kl", "skew_reverse_kl"] = Field(
        "reverse_kl", description="Divergence kind for `objective: divergence` (see opd.divergences)."
    )
    topk_support: Literal["tail", "renormalize", "teacher_renormalized"] = Field(
        "tail", description="With `teacher.top_k`: `tail` adds a bucket for the mass outside the top-k to both "
        "sides; `renormalize` compares both renormalised on the top-k (with reverse_kl: LSM, arXiv 2603.25562); "
        "`teacher_renormalized` (forward_kl only) renormalises the teacher and keeps the student's full log-probs.",
    )
    beta: Float = Field(0.5, ge=0.0, le=1.0, description="JSD(beta) interpolation: 0 = forward KL, 1 = reverse KL.")
    alpha: Float = Field(0.1, ge=0.0, le=1.0, description="Skew of the DistiLLM skew KLs.")
    chunk_size: Int | None = Field(
        None, ge=1, description="Positions per chunk in the loss (null: sized so one fp32 [chunk, V] tensor is ~64 MB)."
    )
    importance_cap: Float | None = Field(
        None, gt=0.0, description="Truncated importance sampling: the ratio q_theta / pi_sampler of the policy-"
        "gradient objectives (sampled_token_pg, kdrl, gad) is capped at this value, as a constant weight on "
        "grad log q_theta (null = uncapped). For stale rollouts (rollout.async_steps, weight_sync_every > 1).",
    )
    divergence_importance: bool = Field(
        False, description="Token-level divergences: weight each position by min(q_theta / pi_sampler, "
        "importance_cap) of its sampled token (a per-token correction for stale rollouts; needs importance_cap).",
    )
    fused: bool = Field(
        True, description="Compute every divergence from the final hidden states and the LM head, one chunk of "
        "logits at a time, for the student and a local teacher (opd.fused): [B, T, V] logits never exist. Checked "
        "against the model's own logits once at start-up; a model it cannot reproduce, loss.objective=uld, "
        "DeepSpeed ZeRO-3 and a sharded or routed teacher use the logits path. false = the logits path everywhere.",
    )


class OptimConfig(_Section):
    lr: Float = Field(1e-5, gt=0.0, description="Peak learning rate of AdamW.")
    weight_decay: Float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    betas: tuple[Float, Float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: Float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    warmup_steps: Int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    min_lr_ratio: Float = Field(0.0, ge=0.0, le=1.0, description="Final LR as a fraction of the peak.")
    max_grad_norm: Float | None = Field(1.0, gt=0.0, description="Gradient clipping norm (null = off).")

    @model_validator(mode="after")
    def _check_betas(self) -> OptimConfig:
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        return self


def launcher_distributed() -> str:
    """What ``accelerate launch`` was configured with (a user's ``accelerate config``), from the
    environment it exports: ``deepspeed``, ``fsdp`` or ``ddp``."""
    import os

    def on(name: str) -> bool:
        return os.environ.get(name, "").lower() in ("1", "true", "yes")

    return "deepspeed" if on("ACCELERATE_USE_DEEPSPEED") else "fsdp" if on("ACCELERATE_USE_FSDP") else "ddp"


class TrainConfig(_Section):
    def resolved_distributed(self) -> str:
        """``distributed``, with ``auto`` resolved from the launcher's environment."""
        return launcher_distributed() if self.distributed == "auto" else self.distributed

    output_dir: str = Field("runs/opd", description="Run directory (config, metrics, checkpoints, final model).")
    steps: Int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: Int = Field(8, ge=1, description="Prompts per micro-batch (per process).")
    grad_accum: Int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    seed: Int = Field(0, description="Seed for data order, sampling and initialisation.")
    log_every: Int = Field(1, ge=1, description="Write metrics every N steps.")
    eval_every: Int = Field(0, ge=0, description="Evaluate every N steps (0 = only at the end).")
    save_every: Int = Field(0, ge=0, description="Checkpoint every N steps (0 = only the final model).")
    keep_checkpoints: Int = Field(2, ge=1, description="Keep only the newest N checkpoints.")
    threads: Int | None = Field(None, ge=1, description="torch CPU threads (null = torch default).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory (student in train mode, dropout 0)."
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast (accelerate) for the student's forward/backward, its rollouts and the local "
        "teacher's scoring; weights and AdamW stay in model.dtype. On CPUs with AVX512-BF16 bf16 matmuls run ~4x "
        "faster than fp32; fp16 needs a GPU.",
    )
    distributed: Literal["auto", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="How the student is spread over processes (torchrun / accelerate launch): `ddp`: a "
        "replica per process; `fsdp`: PyTorch FSDP2, parameters, gradients and AdamW states sharded 1/N per "
        "process, sharded checkpoints (DCP) that may resume on another process count; `deepspeed`: ZeRO "
        "(`train.zero_stage`) through Accelerate's DeepSpeed plugin (`pip install deepspeed`); `auto`: what "
        "`accelerate launch` was configured with (`accelerate config`), else ddp.",
    )
    fsdp_reshard_after_forward: bool = Field(
        True, description="fsdp: free each decoder layer's gathered weights after its forward (ZeRO-3-like); "
        "false keeps them until backward (ZeRO-2-like: less communication, more memory).",
    )
    fsdp_cpu_offload: bool = Field(
        False, description="fsdp: keep parameter shards, gradients and AdamW states in host memory (GPU only).",
    )
    zero_stage: Annotated[Literal[2, 3], _NOT_BOOL] = Field(
        3, description="deepspeed: ZeRO stage (2: optimizer states and gradients sharded; 3: parameters too).",
    )
    cpu_linear: Literal["onednn", "torch"] = Field(
        "onednn", description="CPU linear layers of the student and local teachers. `onednn`: float32 products "
        "(forward and backward) on oneDNN, and weights prepacked once per rollout for decoding (~2x faster "
        "than PyTorch's MKL sgemm on AMD CPUs; results equal to float32 rounding); `torch`: plain nn.Linear. "
        "GPUs are unaffected.",
    )
    max_nonfinite_steps: Int = Field(
        5, ge=1, description="Steps with NaN/inf loss or gradient are skipped (and write no checkpoint); stop "
        "after this many in a row. A run that ends on skipped steps, or whose final weights or logits are not "
        "finite, writes no final/ and exits with an error (its checkpoints are kept).",
    )
    progress: bool = Field(True, description="Show a progress bar.")
    # --- experiment trackers (issue 18; opd.trackers) -------------------------------------------------
    tensorboard: bool | None = Field(
        None, description="Deprecated: use `report_to` ([tensorboard] or []). When set and report_to is not, "
        "true = [tensorboard], false = [].",
    )
    report_to: list[str] | None = Field(
        None, description="Experiment trackers through Accelerate, besides metrics.jsonl (always written): any of "
        "tensorboard, wandb, mlflow, trackio, comet_ml, aim, clearml, dvclive, swanlab; [] = none. None of them is "
        "an opd dependency (a missing one is refused at start, saying what to install). null = tensorboard if it "
        "is installed. W&B runs offline with WANDB_MODE=offline.",
    )
    report_project: str = Field("opd", description="Project / experiment name the trackers file the run under.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_names(cls, value: Any) -> Any:
        from opd.trackers import check_names

        if isinstance(value, str):  # `train.report_to=wandb` on the command line
            value = [] if value.strip().lower() == "none" else [v.strip() for v in value.split(",") if v.strip()]
        return check_names(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _tensorboard_is_deprecated(self) -> TrainConfig:
        if self.tensorboard is not None:
            import warnings

            warnings.warn("train.tensorboard is deprecated: use train.report_to (e.g. [tensorboard], or [] for "
                          "none)" + ("; report_to is set, so tensorboard is ignored" if self.report_to is not None
                                     else ""), DeprecationWarning, stacklevel=2)
        return self

    def trackers(self) -> list[str]:
        """The trackers this run writes to (see ``report_to``)."""
        from opd.trackers import resolve

        return resolve(self.report_to, self.tensorboard)
    # --- end experiment trackers ------------------------------------------------------------------------


class EvalConfig(_Section):
    max_new_tokens: Int | None = Field(None, ge=1, description="Generation cap at eval (default: rollout's).")
    batch_size: Int = Field(64, ge=1, description="Prompts per eval batch.")
    sampled: bool = Field(True, description="Also score temperature-`temperature` samples, not only greedy.")
    scorer: str = Field(
        "exact_match",
        description="A verifier (see opd.verifiers): `exact_match` (whitespace-normalised), `numeric[:abs_tol=..]`, "
        "`math_verify`, or `module:function` taking (prompt, completion, reference) and returning bool/float "
        "(correct = 1).",
    )
    first_error: str = Field(
        "reference",
        description="`reference` (first word differing from the reference) or `module:function` taking "
        "(prompt, completion, reference) and returning an int word position.",
    )
    # --- training-time diagnostics (issue 18; opd.diagnostics) -------------------------------------------
    diagnostics: bool = Field(
        True, description="Also log eval/topk_* (teacher-student top-k overlap), eval/calibration_* (the teacher's "
        "success continuing the student's answers cut at 25/50/75 %, against its own) and eval/student_length_mean, "
        "eval/student_{eos,truncated,empty}_fraction at every evaluation, on the first `diagnostics_prompts` eval "
        "prompts.",
    )
    diagnostics_prompts: Int = Field(8, ge=1, description="Eval prompts the diagnostics use (kept small: cheap).")
    # --- end training-time diagnostics ------------------------------------------------------------------


class RunConfig(_Section):
    model: ModelConfig
    teacher: TeacherConfig = TeacherConfig()
    teachers: dict[str, TeacherConfig] = Field(
        default_factory=dict, description="Named extra teachers for per-row routing by data.teacher_field "
        "(MiMo / MOPD style); each is a full teacher section.",
    )
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    temperature: Float = Field(
        1.0,
        gt=0.0,
        description="Softmax temperature used both to sample the student and inside the loss for both models.",
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        loss, rollout = self.loss, self.rollout
        low, high = rollout.on_policy_range()
        needs_teacher = loss.objective not in ("nll", "gad") or rollout.sampler != "student" or (
            low < 1.0 and rollout.off_policy_source == "teacher"
        )
        if loss.objective == "gad" and self.teacher.kind != "text":
            raise ValueError("loss.objective=gad learns from the teacher's text only; set teacher.kind=text")
        if self.teacher.kind == "text" and loss.objective not in ("gad", "nll"):
            raise ValueError("a text-only teacher (teacher.kind=text) exposes no probabilities; "
                             "use loss.objective=gad or nll (SeqKD)")
        if (loss.objective == "uld") != (self.teacher.kind == "cross_tokenizer"):
            raise ValueError("cross-tokenizer distillation pairs teacher.kind=cross_tokenizer with loss.objective=uld")
        if loss.objective == "uld" and (rollout.sampler != "student" or rollout.off_policy_source != "dataset"):
            raise ValueError("loss.objective=uld supports student samples and dataset answers as behaviour policy")
        if loss.objective == "gad" and rollout.samples_per_prompt < 2:
            raise ValueError("loss.objective=gad normalises rewards within groups; set rollout.samples_per_prompt>=2")
        if self.teacher.kind in ("served", "cache"):
            what = "teacher.url" if self.teacher.kind == "served" else "teacher.cache"
            if (self.teacher.url if self.teacher.kind == "served" else self.teacher.cache) is None:
                raise ValueError(f"teacher.kind={self.teacher.kind} needs {what}")
            if not (loss.objective in ("sampled_token_pg", "kdrl") or (
                    loss.objective == "divergence" and self.teacher.top_k is not None) or (
                    self.teacher.kind == "served" and loss.objective == "nll")):
                raise ValueError(f"teacher.kind={self.teacher.kind} gives sampled-token and top-k log-probs, not "
                                 "logits: use loss.objective=sampled_token_pg or kdrl, or divergence with "
                                 "teacher.top_k")
            if loss.entropy_threshold is not None or loss.reward_scale != 1.0 or rollout.sampler != "student":
                raise ValueError(f"teacher.kind={self.teacher.kind} cannot drive entropy_threshold, reward_scale "
                                 "or co-sampling (they need the teacher's logits)")
            if self.temperature != 1.0:
                raise ValueError(f"teacher.kind={self.teacher.kind} returns log-probs at temperature 1; "
                                 "set temperature=1")
        elif self.teacher.kind == "self":
            if self.teacher.model is not None:
                raise ValueError("teacher.kind=self uses the student as its own teacher; leave teacher.model unset")
            if rollout.sampler != "student" or (low < 1.0 and rollout.off_policy_source == "teacher"):
                raise ValueError("teacher.kind=self only scores student rollouts; use rollout.sampler=student and "
                                 "off_policy_source=dataset")
        elif needs_teacher and self.teacher.model is None and self.teacher.kind not in ("served", "cache"):
            raise ValueError("teacher.model is required for this recipe (set teacher.model=PATH)")
        if rollout.engine == "vllm":
            if rollout.sampler != "student":
                raise ValueError("rollout.engine=vllm samples the student alone; use rollout.sampler=student")
            if self.train.save_every and self.train.save_every % rollout.weight_sync_every:
                raise ValueError("with rollout.engine=vllm, train.save_every must be a multiple of "
                                 "rollout.weight_sync_every so a resumed run sees the same sampler weights")
        if rollout.async_steps:
            if rollout.engine == "vllm" or rollout.sampler != "student" or rollout.adaptive_off_policy \
                    or self.teacher.kind == "cache":
                raise ValueError("rollout.async_steps needs a sampler that runs beside training with its own weights: "
                                 "rollout.engine=vllm_server or hf, rollout.sampler=student, no adaptive schedule "
                                 "or cache")
            if self.train.resolved_distributed() != "ddp" and rollout.engine == "hf":
                raise ValueError("rollout.async_steps with the hf engine keeps a full copy of the student per process; "
                                 "with train.distributed=fsdp / deepspeed use rollout.engine=vllm_server")
        if rollout.engine == "vllm_server" and rollout.sampler != "student":
            raise ValueError("rollout.engine=vllm_server samples the student alone; use rollout.sampler=student")
        if loss.divergence_importance and loss.importance_cap is None:
            raise ValueError("loss.divergence_importance weights by the capped ratio; set loss.importance_cap")
        distributed = self.train.resolved_distributed()
        if distributed != "ddp":
            if rollout.engine == "vllm":
                raise ValueError(f"train.distributed={distributed} shards the student, but the in-process vLLM engine "
                                 "needs its full weights in one process; use train.distributed=ddp")
            if self.teacher.kind == "self" and self.teacher.self_weights == "ema" and (
                    distributed == "fsdp" or self.train.zero_stage == 3):
                raise ValueError(f"teacher.self_weights=ema updates a full copy from the student's weights, which "
                                 f"train.distributed={distributed} shards; use self_weights=frozen or live")
        if self.teacher.device is not None and self.teacher.kind not in ("local", "text", "cross_tokenizer"):
            raise ValueError(f"teacher.device places a local teacher model; teacher.kind={self.teacher.kind} has none")
        if self.teacher.shard:
            if self.teacher.kind != "local" or self.teacher.device is not None:
                raise ValueError("teacher.shard shards a local teacher over the processes (teacher.kind=local, "
                                 "without teacher.device)")
            if rollout.sampler != "student" or (low < 1.0 and rollout.off_policy_source == "teacher"):
                raise ValueError("a sharded teacher only scores (its forwards run in step on every process); it "
                                 "cannot decode: use rollout.sampler=student and off_policy_source=dataset")
        if self.rollout.prefix_tokens_final is not None and self.rollout.prefix_tokens is None:
            raise ValueError("rollout.prefix_tokens_final needs rollout.prefix_tokens (the starting length)")
        if loss.objective in ("sampled_token_pg", "minillm", "kdrl", "gad") and low < 1.0:
            raise ValueError(
                f"loss.objective={loss.objective} is a policy gradient on the student's own samples; "
                "set rollout.on_policy_fraction=1"
            )
        if loss.objective == "kdrl" and rollout.sampler != "student":
            raise ValueError("loss.objective=kdrl's KD term is a KL gradient only on the student's own samples; "
                             "use rollout.sampler=student")
        if loss.objective == "kdrl" and rollout.samples_per_prompt < 2:
            raise ValueError("loss.objective=kdrl normalises rewards within groups; set rollout.samples_per_prompt>=2")
        if loss.reward_scale != 1.0 and (loss.objective != "sampled_token_pg" or loss.estimator != "k1"):
            raise ValueError("loss.reward_scale needs loss.objective=sampled_token_pg with loss.estimator=k1")
        if loss.entropy_threshold is not None and not (
            loss.objective == "sampled_token_pg" or (loss.objective == "divergence" and loss.divergence == "reverse_kl")
        ):
            raise ValueError("loss.entropy_threshold adds forward KL to a reverse-KL objective; use "
                             "objective=sampled_token_pg or divergence=reverse_kl")
        if self.teacher.top_k is not None and loss.objective != "divergence":
            raise ValueError("teacher.top_k (top-k teacher log-probs) is used by loss.objective=divergence")
        if loss.topk_support == "teacher_renormalized" and self.teacher.top_k and loss.divergence != "forward_kl":
            raise ValueError("loss.topk_support=teacher_renormalized is defined for divergence=forward_kl")
        if rollout.sampler != "student" and (rollout.top_p < 1.0 or rollout.top_k > 0):
            raise ValueError(f"rollout.sampler={rollout.sampler} samples full distributions; "
                             "leave rollout.top_p=1 and rollout.top_k=0")
        if rollout.adaptive_off_policy:
            if high != 0.0 or rollout.off_policy_source != "dataset":
                raise ValueError("rollout.adaptive_off_policy decides per step between student, replay and dataset; "
                                 "set rollout.on_policy_fraction=0 and off_policy_source=dataset")
            if not self.data.eval or not self.train.eval_every:
                raise ValueError("rollout.adaptive_off_policy updates from validation loss; "
                                 "set data.eval and train.eval_every")
        if self.teachers or self.data.teacher_field:
            if not (self.teachers and self.data.teacher_field):
                raise ValueError("multi-teacher routing needs both `teachers` and data.teacher_field")
            if loss.objective not in ("divergence", "sampled_token_pg", "minillm", "kdrl") or \
                    rollout.sampler != "student" or self.teacher.kind == "cache":
                raise ValueError("multi-teacher routing supports objectives divergence, sampled_token_pg, minillm "
                                 "and kdrl with student sampling and local / served teachers")
            for name, routed in self.teachers.items():
                if routed.kind not in ("local", "served"):
                    raise ValueError(f"teachers.{name}: routed teachers are local or served, not {routed.kind}")
                if routed.top_k != self.teacher.top_k:
                    raise ValueError(f"teachers.{name}.top_k={routed.top_k} but teacher.top_k={self.teacher.top_k}: "
                                     "routed teachers must expose the same signal; set the same top_k on all")
                try:
                    RunConfig.model_validate({**self.model_dump(), "teacher": routed.model_dump(), "teachers": {},
                                              "data": {**self.data.model_dump(), "teacher_field": None}})
                except ValidationError as exc:
                    raise ValueError(f"teachers.{name}: {format_validation_error(exc)}") from None
        if self.loss.objective == "nll" and high > 0.0:
            raise ValueError(
                "loss.objective=nll trains on the behaviour policy's own tokens, which is a no-op on "
                "student samples; set rollout.on_policy_fraction=0"
            )
        return self


def recipe_names() -> list[str]:
    """Names of the YAML recipes shipped in ``opd/recipes``."""
    folder = resources.files("opd") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str) -> dict[str, Any]:
    path = Path(source)
    if not path.exists() and not source.endswith((".yaml", ".yml")):
        candidate = resources.files("opd") / "recipes" / f"{source}.yaml"
        if candidate.is_file():
            text = candidate.read_text()
        else:
            raise ConfigError(
                f"config {source!r} is neither a file nor a recipe; recipes: {', '.join(recipe_names())}"
            )
    elif not path.is_file():
        raise ConfigError(f"config file {source} does not exist")
    else:
        text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {source} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as YAML scalars."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {key} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, joined by '; ' (normally a single problem)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        got = err.get("input")
        shown = f" (got {got!r})" if err["type"] != "extra_forbidden" and not isinstance(got, dict) else ""
        parts.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    return "; ".join(parts)


def build_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config: {format_validation_error(exc)}") from None


def load_config(source: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML file or a shipped recipe name, apply overrides and validate."""
    return build_config(apply_overrides(_read_yaml(source), overrides or []))


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_reference_markdown() -> str:
    """The config reference table of the README, generated from the field docstrings."""
    lines = ["| key | default | description |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = "required" if info.is_required() else repr(info.default)
            lines.append(f"| `{prefix}{name}` | `{default}` | {info.description or ''} |")

    walk(RunConfig, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference_markdown())
