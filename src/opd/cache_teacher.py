"""``opd cache-teacher``: score a fixed rollout set with the teacher once (Lightning OPD, arXiv 2604.13010).

The cache format and its read side (training with ``teacher.kind: cache``) are in :mod:`opd.cache`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from opd.build import cache_scorer
from opd.cache import add_shard, cache_settings, finish, start_or_resume
from opd.data import load_examples
from opd.errors import DataError
from opd.models import load_causal_lm, load_tokenizer, shared_vocab_size
from opd.rollout import SamplingParams, build_batch, hf_generate
from opd.teachers import ServedTeacher


def build_teacher_cache(
    config: Any, out_dir: str | Path, *, source: str = "student", rows: int | None = None,
    shard_size: int = 256, log: Any = print,
) -> Path:
    """Write (or finish) a teacher cache for ``config``'s student, teacher and prompts.

    ``source``: who writes the cached completions — ``student`` (samples of the student at the
    run's temperature, seeded per shard so a resumed cache matches an uninterrupted one) or
    ``dataset`` (the reference answers). The teacher (``local`` or ``served``) stores the
    log-prob of every completion token and its top ``teacher.top_k`` (at least 1).
    """
    if source not in ("student", "dataset"):
        raise DataError(f"--source must be student or dataset, got {source!r}")
    folder = Path(out_dir)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.student)
    k = max(1, config.teacher.top_k or 1)
    teacher = cache_scorer(config, tokenizer)  # before anything is written
    settings = cache_settings(config, tokenizer, source)
    settings["top_k"] = k
    manifest = start_or_resume(folder, settings)
    if manifest["complete"]:
        log(f"{folder}: cache already complete ({manifest['rows']} rows)")
        return folder
    examples, _ = load_examples(config.data.train, config.data, tokenizer, limit=rows,
                                need_answers=source == "dataset")
    student = load_causal_lm(config.model.student, dtype=config.model.dtype,
                             attn_implementation=config.model.attn_implementation,
                             cpu_linear=config.train.cpu_linear) if source == "student" else None
    if isinstance(teacher, ServedTeacher):
        teacher.top_k = k
        vocab = len(tokenizer)
    else:
        vocab = shared_vocab_size(tokenizer, teacher.model, *([student] if student is not None else []))
    params = SamplingParams(max_new_tokens=config.rollout.max_new_tokens, temperature=config.temperature,
                            top_p=config.rollout.top_p, top_k=config.rollout.top_k, vocab_size=vocab)
    done = manifest["rows"]
    started = time.perf_counter()
    if done:
        log(f"{folder}: resuming after {done} cached rows")
    for start in range(done, len(examples), shard_size):
        chunk = examples[start : start + shard_size]
        shard = len(manifest["shards"])
        if student is not None:
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(config.train.seed * 1_000_003 + shard)
                completions = []
                for i in range(0, len(chunk), config.eval.batch_size):
                    part = chunk[i : i + config.eval.batch_size]
                    completions += hf_generate(student, [e.prompt_ids for e in part], params, tokenizer)
        else:
            completions = [list(e.answer_ids or [])[: params.max_new_tokens] for e in chunk]
        out_rows = []
        for i in range(0, len(chunk), config.eval.batch_size):
            part, comps = chunk[i : i + config.eval.batch_size], completions[i : i + config.eval.batch_size]
            batch = build_batch([e.prompt_ids for e in part], comps, tokenizer.pad_token_id)
            signal = teacher.score(batch)
            common = {"temperature": config.temperature, "vocab_size": vocab, "chunk_size": None}
            token_lp = signal.token_logprobs(batch.completion_ids_BC, **common)
            top_lp, top_ids = signal.topk(k, batch.completion_mask_BC, **common)
            for j, (example, completion) in enumerate(zip(part, comps)):
                n = len(completion)
                out_rows.append({
                    "prompt_ids": example.prompt_ids, "completion_ids": completion,
                    "token_logprobs": token_lp[j, :n].tolist(),
                    "topk_ids": top_ids[j, :n].tolist(), "topk_logprobs": top_lp[j, :n].tolist(),
                })
        add_shard(folder, manifest, out_rows)
        log(f"{folder}: {manifest['rows']}/{len(examples)} rows cached "
            f"({time.perf_counter() - started:.0f}s)")
    finish(folder, manifest)
    log(f"{folder}: cache complete, {manifest['rows']} rows in {len(manifest['shards'])} shards")
    return folder
