"""Atomic, resumable checkpoints.

Layout of ``RUN/checkpoints/step-00000010/``::

    model.safetensors   student weights (safetensors only)       } data parallel (train.distributed=ddp)
    optimizer.pt        optimizer state (``weights_only=True``)   }
    student/            sharded weights and optimizer states: DCP files of every process (fsdp), or
                        DeepSpeed's checkpoint (deepspeed) — see :mod:`opd.parallel`
    scheduler.pt        LR scheduler state (``weights_only=True``)
    rng-rank{R}.safetensors   torch CPU (and CUDA) generator states of process R
    rng-rank{R}.json          python / numpy RNG states of process R
    NAME.safetensors    modules that train or move alongside the student (an EMA self-teacher,
                        GAD's discriminator), from the run's hooks (:mod:`opd.hooks`)
    hooks.pt            the hooks' other state: data position, DistiLLM's phi and replay buffer,
                        the discriminator's optimizer, ... (``weights_only=True``)
    state.json          step, process count and compute counters
    checksums.json      SHA-256 of every file above (in sub-folders too), verified before anything is loaded;
                        it must list every file the folder holds (an emptied or partial manifest fails)

A checkpoint is written into a temporary directory and renamed into place, so a
crash leaves either the complete previous checkpoint or the complete new one; the
checksums catch what renaming cannot (a disk that corrupted a file after the fact, a
copy that was cut short). Resuming skips a corrupted checkpoint for the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from opd.errors import RunDirError, disk_writes

_PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        elif file.is_dir():
            _fsync_tree(file)
    _fsync_dir(path)


def atomic_dir(final: Path, tag: str | None = None) -> Path:
    """A fresh temporary sibling of ``final``; pass it to :func:`commit_dir` when filled."""
    tmp = final.parent / f".tmp-{final.name}-{tag or os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    _fsync_tree(tmp)
    if final.exists():
        # Move the old copy aside first so there is never a moment without a complete one.
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


CHECKSUMS = "checksums.json"
HOOKS_FILE = "hooks.pt"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    # Sharded checkpoints keep every process's files in a sub-folder; one process hashes them all
    # (a filesystem all processes share, as on one node; the written files are fsynced first).
    sums = {f.relative_to(folder).as_posix(): sha256_file(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != CHECKSUMS}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def verify_checksums(folder: Path) -> None:
    """Raise :class:`RunDirError` naming the first missing, altered or unlisted file.

    The manifest must list exactly the files the checkpoint holds (sub-folders included): a manifest
    emptied or cut down would otherwise vouch for files nobody checked.
    """
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except (OSError, ValueError):
        raise RunDirError(f"checkpoint {folder} has no readable {CHECKSUMS}") from None
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise RunDirError(f"checkpoint {folder}: {CHECKSUMS} is not a mapping of file names to SHA-256 sums")
    if "state.json" not in sums:
        raise RunDirError(f"checkpoint {folder}: {CHECKSUMS} does not list state.json (an empty or partial manifest)")
    held = {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file() and f.name != CHECKSUMS}
    unlisted = sorted(held - set(sums))
    if unlisted:
        raise RunDirError(f"checkpoint {folder}: {unlisted[0]} is not in {CHECKSUMS} "
                          f"({len(unlisted)} unlisted file(s); the manifest is partial or was altered)")
    for name, expected in sums.items():
        path = folder / name
        if name not in held:  # also keeps a crafted name ("../x") from pointing outside the checkpoint
            raise RunDirError(f"checkpoint {folder} is incomplete: {name} is missing")
        if sha256_file(path) != expected:
            raise RunDirError(f"checkpoint {folder} is corrupted: {name} does not match its checksum")


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove temporary directories a killed run left behind (never a committed checkpoint)."""
    removed = []
    for parent in (run_dir, run_dir / "checkpoints"):
        if not parent.is_dir():
            continue
        for path in parent.iterdir():
            if path.is_dir() and path.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Only this process's current device: touching the others would create contexts there.
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    json_state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, json_state


def _set_rng_state(tensors: dict[str, torch.Tensor], json_state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, state, gauss = json_state["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = json_state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _split_states(states: dict[str, Any]) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    modules = {name: value for name, value in states.items() if isinstance(value, torch.nn.Module)}
    return modules, {name: value for name, value in states.items() if name not in modules}


def save_checkpoint(
    run_dir: Path,
    step: int,
    parallel: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int,
    *,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    hooks: Sequence[Any] = (),
) -> Path:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep``.

    Called by every process: each writes its own RNG states and its part of the student
    (:meth:`opd.parallel.Parallel.save`: everything on process 0 for data parallel, a shard each
    under FSDP / DeepSpeed); process 0 writes the rest and renames the directory into place once all
    have written. ``hooks`` are the run's :class:`opd.hooks.Hooks`; their ``state_dict`` entries are
    saved beside the student.
    """
    root = run_dir / "checkpoints"
    final = root / f"{_PREFIX}{step:08d}"
    tmp = final.parent / f".tmp-{final.name}-writing"
    # Every writer below fails its own way on a full disk (torch.save: RuntimeError "unexpected pos",
    # safetensors: SafetensorError, DCP: CheckpointException, text: OSError); all become one DiskFullError,
    # and the half-written directory is removed so its space is free for the rerun.
    with disk_writes(final, cleanup=tmp if rank == 0 else None):
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            atomic_dir(final, tag="writing")
        barrier()
        rng_tensors, rng_json = _rng_state()
        save_file(rng_tensors, str(tmp / f"rng-rank{rank}.safetensors"))
        (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rng_json))
        parallel.save(tmp, model, optimizer)
        barrier()
        if rank == 0:
            modules, others = _split_states({k: v for hook in hooks for k, v in hook.state_dict().items()})
            for name, module in modules.items():  # e.g. an EMA self-teacher
                save_model(module, str(tmp / f"{name}.safetensors"))
            torch.save(others, tmp / HOOKS_FILE)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "world": world, **trainer_state}))
            write_checksums(tmp)
            commit_dir(tmp, final)
    if rank == 0:
        prune(run_dir, keep)
    barrier()
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints. Runs after the new one is committed, so a kill in
    between leaves one extra checkpoint (removed by the next save or resume), never one too few."""
    for old in list_checkpoints(run_dir)[:-keep]:
        # Rename first: a kill during rmtree must not leave a half-deleted "step-*" directory
        # that still looks like a checkpoint.
        doomed = old.parent / f".old-{old.name}-{os.getpid()}"
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def save_student_weights(path: Path, model: torch.nn.Module) -> None:
    """A data-parallel student's weights as ``path/model.safetensors`` (one name per shared tensor)."""
    save_model(model, str(path / "model.safetensors"))


def load_student_weights(path: Path, model: torch.nn.Module) -> None:
    """A data-parallel checkpoint's ``model.safetensors`` into ``model`` (tied aliases allowed)."""
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    untied_missing = [k for k in missing if not _is_tied_alias(model, k, set(missing))]
    if unexpected or untied_missing:
        raise RunDirError(
            f"checkpoint {path} does not match the student model "
            f"(missing {untied_missing[:3]}, unexpected {unexpected[:3]})"
        )


def load_checkpoint(
    path: Path, parallel: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
    rank: int = 0, world: int = 1, seed: int = 0, hooks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Restore the student (weights and optimizer, through ``parallel``), scheduler, the hooks' state
    and this process's RNG; returns the trainer state (step, counters).

    A checkpoint written by another number of processes resumes only when ``parallel`` reshards
    (FSDP's DCP); a process with no saved RNG state then starts from a stream seeded by the seed,
    the step and its rank — the run continues deterministically, though not bitwise as it would have
    on the old process count. The checksums are verified first, so a corrupted checkpoint raises
    before anything is changed.
    """
    verify_checksums(path)
    try:
        state = json.loads((path / "state.json").read_text())
        saved_world = int(state.get("world", world))
        if saved_world != world and not parallel.resharding:
            raise RunDirError(f"checkpoint {path} was written by {saved_world} process(es); resume with "
                              f"{saved_world} (train.distributed=fsdp can resume on another count)")
        parallel.load(path, model, optimizer)
        saved = torch.load(path / HOOKS_FILE, weights_only=True) if (path / HOOKS_FILE).is_file() else {}
        for hook in hooks:
            modules, others = _split_states(hook.state_dict())
            for name, module in modules.items():
                if not (path / f"{name}.safetensors").is_file():
                    raise RunDirError(f"checkpoint {path} has no {name}.safetensors, which this run needs")
                load_model(module, str(path / f"{name}.safetensors"))
            absent = [name for name in others if name not in saved]
            if absent:
                raise RunDirError(f"checkpoint {path} has no {absent[0]} state, which this run needs")
            if others:
                hook.load_state_dict({name: saved[name] for name in others})
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng_file = path / f"rng-rank{rank}.safetensors"
        if rng_file.exists() and saved_world == world:
            _set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng-rank{rank}.json").read_text()))
        elif saved_world == world:
            raise RunDirError(f"checkpoint {path} has no RNG state for process {rank}; "
                              "resume with the same number of processes")
        else:
            _seed_everything(seed * 1_000_003 + int(state["step"]) * 1_009 + rank)
    except RunDirError:
        raise
    except Exception as exc:  # corrupt files raise many unrelated types (SafetensorError, UnpicklingError, ...)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunDirError(f"cannot resume from {path}: {first}") from None
    return state


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _is_tied_alias(model: torch.nn.Module, key: str, missing: set[str]) -> bool:
    """save_model stores one name per shared tensor; a missing key is fine only if it
    shares storage with a key that was loaded."""
    state = model.state_dict()
    if key not in state:
        return False
    pointer = state[key].data_ptr()
    return any(other not in missing and tensor.data_ptr() == pointer for other, tensor in state.items())
