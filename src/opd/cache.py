"""Cached teacher signal (Lightning OPD, arXiv 2604.13010): score a fixed rollout set once.

``opd cache-teacher`` writes, for a fixed set of rollouts, the teacher's log-prob of every
completion token and its top-k log-probs per position into Arrow IPC shards
(``part-00000.arrow``, memory-mapped when read) plus ``manifest.json`` holding the settings
and a SHA-256 per shard. Training with ``teacher.kind: cache`` then reads rollouts and
teacher signal from the cache instead of sampling and calling a teacher: the teacher costs
nothing per step, at the price that the rollouts are those of the student that wrote the
cache (fully on-policy only at the start).

Caching is resumable: shards are written to a temporary name and renamed, the manifest is
rewritten after each shard, and a restarted run skips the shards already listed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from opd.checkpoint import sha256_file
from opd.errors import DataError, OpdError, RunDirError
from opd.rollout import ExampleStream, Rollouts, SequenceBatch, build_batch
from opd.signal import TeacherSignal
from opd.teachers import Teacher

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def write_shard(folder: Path, index: int, rows: list[dict[str, Any]]) -> tuple[str, str]:
    """Write one shard atomically; returns its file name and checksum."""
    import pyarrow as pa

    table = pa.table({
        "prompt_ids": pa.array([r["prompt_ids"] for r in rows], type=pa.list_(pa.int32())),
        "completion_ids": pa.array([r["completion_ids"] for r in rows], type=pa.list_(pa.int32())),
        "token_logprobs": pa.array([r["token_logprobs"] for r in rows], type=pa.list_(pa.float32())),
        "topk_ids": pa.array([r["topk_ids"] for r in rows], type=pa.list_(pa.list_(pa.int32()))),
        "topk_logprobs": pa.array([r["topk_logprobs"] for r in rows], type=pa.list_(pa.list_(pa.float32()))),
    })
    name = f"part-{index:05d}.arrow"
    tmp = folder / f".{name}.tmp"
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, folder / name)
    return name, sha256_file(folder / name)


def start_or_resume(folder: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest to continue from: a fresh one, or the existing one if its settings match."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST
    if path.exists():
        manifest = json.loads(path.read_text())
        if manifest.get("settings") != settings:
            changed = sorted(k for k in set(settings) | set(manifest.get("settings", {}))
                             if settings.get(k) != manifest.get("settings", {}).get(k))
            raise RunDirError(f"{folder} holds a cache made with other settings ({', '.join(changed[:4])}); "
                              "use another directory")
        for stale in folder.glob(".part-*.tmp"):
            stale.unlink()  # a shard cut short by a crash; it is rewritten
        return manifest
    manifest = {"format": FORMAT_VERSION, "settings": settings, "shards": [], "rows": 0, "complete": False}
    _write_manifest(folder, manifest)
    return manifest


def add_shard(folder: Path, manifest: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    name, digest = write_shard(folder, len(manifest["shards"]), rows)
    manifest["shards"].append({"file": name, "rows": len(rows), "sha256": digest})
    manifest["rows"] += len(rows)
    _write_manifest(folder, manifest)


def finish(folder: Path, manifest: dict[str, Any]) -> None:
    manifest["complete"] = True
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _write_manifest(folder, manifest)


class TeacherCache:
    """Read side: memory-mapped shards, verified against their checksums when opened."""

    def __init__(self, folder: str | Path, *, verify: bool = True) -> None:
        import pyarrow as pa

        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise DataError(f"{self.folder} is not a teacher cache (no {MANIFEST}); create one with opd cache-teacher")
        self.manifest = json.loads(path.read_text())
        if not self.manifest.get("complete"):
            raise DataError(f"the teacher cache in {self.folder} is incomplete "
                            f"({self.manifest.get('rows', 0)} rows); rerun opd cache-teacher to finish it")
        self.settings = self.manifest["settings"]
        tables = []
        for shard in self.manifest["shards"]:
            file = self.folder / shard["file"]
            if not file.is_file():
                raise DataError(f"teacher cache shard {file} is missing")
            if verify and sha256_file(file) != shard["sha256"]:
                raise DataError(f"teacher cache shard {file} does not match its checksum; rebuild the cache")
            tables.append(pa.ipc.open_file(pa.memory_map(str(file), "r")).read_all())
        self.table = pa.concat_tables(tables) if tables else None
        self.rows = self.manifest["rows"]
        if self.rows == 0:
            raise DataError(f"the teacher cache in {self.folder} has no rows")

    def batch(self, indices: list[int], pad_id: int) -> SequenceBatch:
        """Rows ``indices`` as a batch whose ``teacher_signal`` holds the cached log-probs."""
        rows = self.table.take(indices).to_pylist()
        batch = build_batch([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], pad_id)
        width, k = batch.completion_len, int(self.settings["top_k"])
        token_lp = torch.zeros(len(rows), width)
        top_lp = torch.zeros(len(rows), width, k)
        top_ids = torch.zeros(len(rows), width, k, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["completion_ids"])
            token_lp[i, :n] = torch.tensor(row["token_logprobs"])
            if n:
                top_lp[i, :n] = torch.tensor(row["topk_logprobs"])
                top_ids[i, :n] = torch.tensor(row["topk_ids"])
        batch.teacher_signal = TeacherSignal(token_logprobs_BC=token_lp, topk_logprobs_BCK=top_lp, topk_ids_BCK=top_ids)
        return batch


class CachedTeacher(Teacher):
    """Lightning OPD's teacher (arXiv 2604.13010): the signal stored with each cached row, read back
    instead of calling a teacher (so it scores nothing per step)."""

    scores_tokens = False

    def __init__(self, cache: TeacherCache) -> None:
        self.name = f"cache {cache.folder}"

    def score(self, batch: SequenceBatch) -> TeacherSignal:
        if batch.teacher_signal is None:
            raise DataError("a cached teacher can only score rows read from its cache")
        return batch.teacher_signal


class CachedRollouts(Rollouts):
    """The behaviour policy of a cached run: the cache's stored rollouts (written once by the student
    that made the cache), walked in the seeded order of the data stream."""

    def __init__(self, cache: TeacherCache, pad_id: int, seed: int, rank: int, world: int, batch_size: int,
                 grad_accum: int, total_steps: int) -> None:
        super().__init__(ExampleStream(list(range(cache.rows)), seed, rank, world), batch_size, grad_accum,
                         total_steps)
        self.cache = cache
        self.pad_id = pad_id

    @property
    def max_new_tokens(self) -> int:
        return int(self.cache.settings.get("max_new_tokens", 0))

    def micro_batch(self, student: torch.nn.Module, step: int, rows: list[Any],
                    generator: torch.Generator | None = None) -> tuple[SequenceBatch, dict[str, float]]:
        batch = self.cache.batch(rows, self.pad_id)
        return batch, {"rollout/cached_fraction": 1.0, "rollout/completion_tokens_mean": batch.num_tokens / len(rows)}


def cache_settings(config: Any, tokenizer: Any, source: str) -> dict[str, Any]:
    """What a teacher cache depends on; a cache is reused only when all of it matches."""

    vocab_digest = hashlib.sha256(json_dumps_sorted(tokenizer.get_vocab()).encode()).hexdigest()[:16]
    return {"student": config.model.student, "teacher": config.teacher.model or config.teacher.url,
            "data": config.data.train, "top_k": config.teacher.top_k or 0, "temperature": config.temperature,
            "max_new_tokens": config.rollout.max_new_tokens, "source": source, "seed": config.train.seed,
            "vocab": len(tokenizer), "vocab_digest": vocab_digest}


def json_dumps_sorted(data: Any) -> str:
    import json

    return json.dumps(data, sort_keys=True)


def open_cache(config: Any, tokenizer: Any) -> TeacherCache:
    cache = TeacherCache(config.teacher.cache)
    settings = cache.settings
    if settings.get("vocab") != len(tokenizer) or settings.get("vocab_digest") != cache_settings(
            config, tokenizer, "")["vocab_digest"]:
        raise OpdError(f"the teacher cache in {config.teacher.cache} was made with another tokenizer "
                       f"({settings.get('vocab')} tokens); rebuild it for this student")
    if config.teacher.top_k is not None and config.teacher.top_k > settings["top_k"]:
        raise OpdError(f"teacher.top_k={config.teacher.top_k} but the cache stores the top {settings['top_k']}; "
                       "lower teacher.top_k or rebuild the cache with a larger one")
    if settings.get("temperature") != config.temperature:
        raise OpdError(f"the teacher cache was scored at temperature {settings.get('temperature')}, "
                       f"the run uses {config.temperature}")
    return cache
