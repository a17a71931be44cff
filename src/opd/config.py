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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from opd.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    student: str = Field(description="Student model: local directory or hub id loadable by AutoModelForCausalLM.")
    tokenizer: str | None = Field(None, description="Student tokenizer; defaults to `student`.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Student weight dtype. AdamW updates weights in this dtype (no fp32 master copy), "
        "so keep float32 unless memory forces otherwise.",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off by default).")


class TeacherConfig(_Section):
    kind: Literal["local"] = Field(
        "local", description="What the teacher exposes. `local`: a white-box model with full logits."
    )
    model: str | None = Field(None, description="Teacher model directory or hub id (required for `local`).")
    tokenizer: str | None = Field(None, description="Teacher tokenizer; defaults to `model`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Teacher weight dtype; `auto` keeps the checkpoint's own dtype."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off by default).")


class DataConfig(_Section):
    train: str = Field(description="Training prompts: .jsonl/.json file, .parquet file, saved dataset dir or hub name.")
    eval: str | None = Field(None, description="Held-out prompts with reference answers (same formats).")
    split: str = Field("train", description="Split to read when `train`/`eval` is a `datasets` name.")
    prompt_field: str = Field("prompt", description="Field holding a plain-text prompt.")
    messages_field: str = Field(
        "messages", description="Field holding chat messages (rendered with the chat template)."
    )
    answer_field: str = Field("answer", description="Field holding the reference answer (optional for on-policy).")
    max_prompt_tokens: int = Field(512, ge=1, description="Prompts longer than this are skipped or truncated.")
    overlong: Literal["skip", "truncate"] = Field(
        "skip", description="What to do with over-long prompts; truncation keeps the end of the prompt."
    )
    max_train_examples: int | None = Field(None, ge=1, description="Use only the first N training rows.")
    max_eval_examples: int | None = Field(None, ge=1, description="Use only the first N eval rows.")


class RolloutConfig(_Section):
    on_policy_fraction: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="GKD's lambda: each sample is written by the student with this probability "
        "(decided per sample), otherwise taken from `off_policy_source`.",
    )
    off_policy_source: Literal["dataset", "teacher"] = Field(
        "dataset", description="Who writes off-policy samples: the dataset's reference answers or teacher generations."
    )
    max_new_tokens: int = Field(128, ge=1, description="Generation length cap for student and teacher rollouts.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold for rollouts.")
    top_k: int = Field(0, ge=0, description="Top-k sampling for rollouts (0 = off).")
    engine: Literal["hf"] = Field("hf", description="Generation engine: `hf` (transformers generate, KV cache).")
    prefix_tokens: int | None = Field(
        None, ge=1, description="Prefix OPD (arXiv 2602.15260): stop rollouts after this many tokens at the first "
        "step, so the loss sees only prefixes (null = full rollouts up to max_new_tokens).",
    )
    prefix_tokens_final: int | None = Field(
        None, ge=1, description="Prefix length reached at the last step, growing linearly from prefix_tokens "
        "(null = keep prefix_tokens fixed).",
    )


class LossConfig(_Section):
    objective: Literal["divergence", "nll", "sampled_token_pg"] = Field(
        "divergence",
        description="`divergence`: token-level f-divergence against the teacher's distributions; "
        "`nll`: cross-entropy on the behaviour policy's tokens (SeqKD when they come from the teacher); "
        "`sampled_token_pg`: policy gradient with the teacher's log-prob of each sampled token as reward.",
    )
    estimator: Literal["k1", "k2", "k3"] = Field(
        "k1", description="Single-sample reverse-KL estimator whose negative is the reward (sampled_token_pg)."
    )
    gamma: float = Field(0.0, ge=0.0, le=1.0, description="Discount of rewards into returns (sampled_token_pg).")
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tv", "skew_forward_kl", "skew_reverse_kl"] = Field(
        "reverse_kl", description="Divergence kind for `objective: divergence` (see opd.divergences)."
    )
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD(beta) interpolation: 0 = forward KL, 1 = reverse KL.")
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="Skew of the DistiLLM skew KLs.")
    chunk_size: int | None = Field(
        None, ge=1, description="Positions per chunk in the loss (null: sized so one fp32 [chunk, V] tensor is ~64 MB)."
    )


class OptimConfig(_Section):
    lr: float = Field(1e-5, gt=0.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Final LR as a fraction of the peak.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping norm (null = off).")

    @model_validator(mode="after")
    def _check_betas(self) -> OptimConfig:
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        return self


class TrainConfig(_Section):
    output_dir: str = Field("runs/opd", description="Run directory (config, metrics, checkpoints, final model).")
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Prompts per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    seed: int = Field(0, description="Seed for data order, sampling and initialisation.")
    log_every: int = Field(1, ge=1, description="Write metrics every N steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0 = only at the end).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0 = only the final model).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the newest N checkpoints.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null = torch default).")
    max_nonfinite_steps: int = Field(
        5, ge=1, description="Steps with NaN/inf loss or gradient are skipped; stop after this many in a row."
    )
    progress: bool = Field(True, description="Show a progress bar.")
    tensorboard: bool = Field(True, description="Also write TensorBoard event files.")


class EvalConfig(_Section):
    max_new_tokens: int | None = Field(None, ge=1, description="Generation cap at eval (default: rollout's).")
    batch_size: int = Field(64, ge=1, description="Prompts per eval batch.")
    sampled: bool = Field(True, description="Also score temperature-`temperature` samples, not only greedy.")
    scorer: str = Field(
        "exact_match",
        description="`exact_match` (whitespace-normalised) or `module:function` taking (prompt, completion, "
        "reference) and returning bool.",
    )
    first_error: str = Field(
        "reference",
        description="`reference` (first word differing from the reference) or `module:function` taking "
        "(prompt, completion, reference) and returning an int word position.",
    )


class RunConfig(_Section):
    model: ModelConfig
    teacher: TeacherConfig = TeacherConfig()
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    temperature: float = Field(
        1.0,
        gt=0.0,
        description="Softmax temperature used both to sample the student and inside the loss for both models.",
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        needs_teacher = self.loss.objective in ("divergence", "sampled_token_pg") or (
            self.rollout.on_policy_fraction < 1.0 and self.rollout.off_policy_source == "teacher"
        )
        if needs_teacher and self.teacher.model is None:
            raise ValueError("teacher.model is required for this recipe (set teacher.model=PATH)")
        if self.rollout.prefix_tokens_final is not None and self.rollout.prefix_tokens is None:
            raise ValueError("rollout.prefix_tokens_final needs rollout.prefix_tokens (the starting length)")
        if self.loss.objective == "sampled_token_pg" and self.rollout.on_policy_fraction < 1.0:
            raise ValueError(
                "loss.objective=sampled_token_pg is a policy gradient on the student's own samples; "
                "set rollout.on_policy_fraction=1"
            )
        if self.loss.objective == "nll" and self.rollout.on_policy_fraction > 0.0:
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
