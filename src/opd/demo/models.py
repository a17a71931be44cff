"""Model configs, supervised training and evaluation helpers for the demo task.

The teacher and student are tiny Llama models (``transformers.LlamaForCausalLM``).
Sequence format (shared with the rest of ``opd``)::

    prompt_ids     = tok(prompt).input_ids                                   # starts with <s>
    completion_ids = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    full           = prompt_ids + completion_ids                             # loss on completion only
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .task import ANSWER_LEN, N_EVAL, first_error_position, is_correct, make_splits
from .tokenizer import VOCAB

MAX_POSITIONS = 64


def _config(vocab_size: int, hidden: int, intermediate: int, layers: int, heads: int,
            max_positions: int = MAX_POSITIONS) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=VOCAB["<pad>"],
        bos_token_id=VOCAB["<s>"],
        eos_token_id=VOCAB["</s>"],
    )


def teacher_config(vocab_size: int) -> LlamaConfig:
    """Config of the demo teacher: 2 layers, hidden 64, 2 heads of dim 32 (~132k params)."""
    return _config(vocab_size, hidden=64, intermediate=256, layers=2, heads=2)


def student_config(vocab_size: int) -> LlamaConfig:
    """Config of the demo student: 2 layers, hidden 32, 2 heads of dim 16 (~33k params).

    RoPE base 100 (instead of 10000): with head_dim 16 the low base gives
    sharper relative-position features, and the student then learns the
    fixed-offset lookup the task needs after a more consistent number of
    steps across seeds.
    """
    config = _config(vocab_size, hidden=32, intermediate=128, layers=2, heads=2)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 100.0}
    return config


SORT_MAX_POSITIONS = 128  # 50 prompt tokens + 49 completion tokens


def sort_teacher_config(vocab_size: int) -> LlamaConfig:
    """Teacher of the sorting task: 2 layers, hidden 64, 2 heads of dim 32 (~132k params)."""
    return _config(vocab_size, hidden=64, intermediate=256, layers=2, heads=2, max_positions=SORT_MAX_POSITIONS)


def sort_student_config(vocab_size: int, hidden: int = 12, layers: int = 2) -> LlamaConfig:
    """Student of the sorting task: by default 2 layers, hidden 12, 2 heads of dim 6 (~4.8k params),
    small enough that its per-token error stays above zero under supervised training (the capacity
    gap the comparison needs)."""
    return _config(vocab_size, hidden=hidden, intermediate=4 * hidden, layers=layers, heads=2,
                   max_positions=SORT_MAX_POSITIONS)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def encode_example(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Return ``(prompt_ids, completion_ids)`` in the shared sequence format."""
    prompt_ids = tokenizer(prompt).input_ids
    completion_ids = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


Corrupt = Callable[[list[int], torch.Generator], list[int]]
"""``corrupt(completion_ids, generator) -> ids`` of the same length: the prefix tokens the model is
shown instead of the clean ones (the targets stay clean)."""


def encode_examples(tokenizer: PreTrainedTokenizerBase,
                    examples: Sequence[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_example` for many rows at once (one batched tokenizer call per field)."""
    prompts = tokenizer([ex["prompt"] for ex in examples]).input_ids
    answers = tokenizer([ex["answer"] for ex in examples], add_special_tokens=False).input_ids
    return [(p, a + [tokenizer.eos_token_id]) for p, a in zip(prompts, answers)]


def _collate(
    encoded: Sequence[tuple[list[int], list[int]]], pad_id: int,
    corrupt: Corrupt | None = None, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``prompt+completion`` sequences; labels are -100 outside completions.

    With ``corrupt``, the completion tokens the model *reads* are replaced by ``corrupt``'s output
    while the labels stay the clean completion: the model learns the right next token after wrong
    prefixes too (noise-injected teacher forcing).
    """
    width = max(len(p) + len(c) for p, c in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (p, c) in enumerate(encoded):
        shown = c if corrupt is None else corrupt(list(c), generator)
        if len(shown) != len(c):
            raise ValueError("corrupt must keep the completion's length")
        full = p + shown
        input_ids[row, : len(full)] = torch.tensor(full)
        attention[row, : len(full)] = 1
        labels[row, len(p) : len(full)] = torch.tensor(c)
    return input_ids, attention, labels


def train_supervised(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, str]],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    log_every: int = 200,
    warmup_steps: int | None = None,
    weight_decay: float = 0.01,
    callback: Callable[[int, float], bool] | None = None,
    corrupt: Corrupt | None = None,
) -> list[float]:
    """Teacher-forced cross-entropy training on completion tokens only.

    AdamW with linear warm-up (default ``min(100, steps // 10)`` steps) then
    cosine decay to 10% of ``lr``; gradient norm clipped at 1.0.  Batches are
    drawn uniformly with replacement from ``examples`` using a generator seeded
    with ``seed``.  Prompt tokens and right padding are masked with -100.
    If ``callback`` is given it is called as ``callback(step, loss)`` after
    every optimiser step (``step`` counts from 1, the model is in train mode);
    returning True stops training early.  With ``corrupt`` the completion tokens the model reads
    are corrupted (see :func:`_collate`), drawn from the same seeded generator.  Returns the
    per-step training losses.
    """
    if not examples:
        raise ValueError("no training examples")
    encoded = encode_examples(tokenizer, examples)
    pad_id = tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(seed)
    warmup = min(100, steps // 10) if warmup_steps is None else warmup_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        input_ids, attention, labels = _collate([encoded[i] for i in idx], pad_id, corrupt, gen)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            window = losses[-log_every:]
            print(
                f"step {step + 1:>5}/{steps}  loss {sum(window) / len(window):.4f}  "
                f"lr {lr_at(step):.2e}  {time.perf_counter() - start:.0f}s",
                flush=True,
            )
        if callback is not None and callback(step + 1, losses[-1]):
            break
    model.eval()
    return losses


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    max_new_tokens: int = ANSWER_LEN + 1,
) -> list[str]:
    """Generate a completion for each prompt with :func:`opd.rollout.hf_generate`.

    Completions are decoded with ``skip_special_tokens=True`` (so ``</s>`` and
    padding are dropped).  Sampling uses the global torch RNG; seed it with
    ``torch.manual_seed`` for reproducibility.
    """
    from opd.rollout import SamplingParams, hf_generate

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, greedy=not do_sample,
                            vocab_size=len(tokenizer))
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        prompt_ids = [tokenizer(p).input_ids for p in prompts[i : i + batch_size]]
        completions = hf_generate(model, prompt_ids, params, tokenizer)
        out.extend(tokenizer.batch_decode(completions, skip_special_tokens=True))
    return out


def score_completions(prompts: Sequence[str], completions: Sequence[str]) -> tuple[float, float]:
    """Return ``(accuracy, mean first_error_position)`` of completions for prompts."""
    n = max(1, len(prompts))
    acc = sum(is_correct(p, c) for p, c in zip(prompts, completions, strict=True)) / n
    fep = sum(first_error_position(p, c) for p, c in zip(prompts, completions, strict=True)) / n
    return acc, fep


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, str]],
    batch_size: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> tuple[float, float]:
    """Accuracy and mean first-error position of the model's answers to ``examples``.

    Greedy by default; with ``do_sample=True`` it samples at ``temperature``.
    ``max_new_tokens`` is the answer length (in tokens) + 1 for ``</s>``.
    """
    prompts = [ex["prompt"] for ex in examples]
    completions = generate_completions(
        model, tokenizer, prompts, batch_size=batch_size, do_sample=do_sample, temperature=temperature
    )
    return score_completions(prompts, completions)


def warm_start_student(
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    steps: int = 2000,
    target_accuracy: float | None = 0.4,
    check_every: int = 10,
    probe_size: int = 64,
    lr: float = 1e-3,
    batch_size: int = 64,
    n_train: int = 20_000,
    log_every: int = 0,
) -> LlamaForCausalLM:
    """Build a :func:`student_config` model and warm-start it on style ``"+"`` only.

    Supervised training on the training split of :func:`make_splits` (same
    seed as the teacher, so the held-out prompts are shared and never trained
    on) with every answer in the running-sum style, for at most ``steps``
    steps.

    Learning this task is a sharp phase transition: greedy accuracy jumps from
    0% to ~100% within ~50 steps, at a step count that varies with the seed
    (roughly 650-1300 steps with these settings, i.e. 8-15 s on 2 CPU cores).
    A fixed step budget therefore gives either a useless or an already perfect
    student; with only a few hundred steps the student is still on the loss
    plateau (0% accuracy), so keep ``steps`` at ~2000 (it is only a cap).  To get a reproducibly *partial*
    student, training stops as soon as greedy accuracy on ``probe_size``
    training prompts reaches ``target_accuracy`` (checked every
    ``check_every`` steps once the running loss has dropped below 1.0, which
    only happens during the transition).  Pass ``target_accuracy=None`` to
    train for exactly ``steps`` steps.  Deterministic given ``seed`` (and the
    torch thread count).
    """
    torch.manual_seed(seed)
    model = LlamaForCausalLM(student_config(len(tokenizer)))
    train, _ = make_splits(n_train, N_EVAL, seed, styles=("+",))
    probe = train[:probe_size]
    recent: list[float] = []
    reached: list[tuple[int, float]] = []

    def stop_when_partial(step: int, loss: float) -> bool:
        recent.append(loss)
        if target_accuracy is None or step % check_every or sum(recent[-check_every:]) / check_every > 1.0:
            return False
        accuracy, _ = greedy_accuracy(model, tokenizer, probe)
        if accuracy >= target_accuracy:
            reached.append((step, accuracy))
            return True
        return False

    start = time.perf_counter()
    train_supervised(
        model,
        tokenizer,
        train,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        log_every=log_every,
        callback=stop_when_partial,
    )
    elapsed = time.perf_counter() - start
    if reached:
        step, accuracy = reached[0]
        print(f"student warm start: stopped at step {step} (probe accuracy {accuracy:.0%}, {elapsed:.0f}s)")
    else:
        print(f"student warm start: {len(recent)} steps ({elapsed:.0f}s)")
    return model
