"""Atomic, resumable checkpoints.

Layout of ``RUN/checkpoints/step-00000010/``::

    model.safetensors   student weights (safetensors only)
    optimizer.pt        optimizer state (loaded with ``weights_only=True``)
    scheduler.pt        LR scheduler state (``weights_only=True``)
    rng.safetensors     torch CPU (and CUDA) generator states
    state.json          step, data position, python / numpy RNG states

A checkpoint is written into a temporary directory and renamed into place, so a
crash leaves either the complete previous checkpoint or the complete new one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from opd.errors import RunDirError

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
    _fsync_dir(path)


def atomic_dir(final: Path) -> Path:
    """A fresh temporary sibling of ``final``; pass it to :func:`commit_dir` when filled."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
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


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    json_state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, json_state


def _set_rng_state(tensors: dict[str, torch.Tensor], json_state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, state, gauss = json_state["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = json_state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep``."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = atomic_dir(final)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng_tensors, rng_json = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state = {"step": step, **trainer_state, "rng": rng_json}
    (tmp / "state.json").write_text(json.dumps(state))
    commit_dir(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG; returns the trainer state (step, data position)."""
    try:
        state = json.loads((path / "state.json").read_text())
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if unexpected or [k for k in missing if not _is_tied(model, k)]:
            raise RunDirError(f"checkpoint {path} does not match the student model (missing {missing[:3]})")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        _set_rng_state(load_file(str(path / "rng.safetensors")), state.pop("rng"))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise RunDirError(f"cannot resume from {path}: {str(exc).splitlines()[0]}") from None
    return state


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    # save_model drops one name of each tied pair; loading leaves it "missing" but filled.
    return "lm_head" in key or "embed" in key
