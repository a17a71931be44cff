"""Experiment trackers (``train.report_to``) through Accelerate's tracker API.

``metrics.jsonl`` in the run directory is always written (it is what ``opd report`` reads); the
trackers named in ``train.report_to`` get the same scalars through Accelerate
(``Accelerator.init_trackers`` / ``log``, each tracker's ``finish`` at the end): ``tensorboard``,
``wandb``, ``mlflow``, ``trackio``, ``comet_ml``, ``aim``, ``clearml``, ``dvclive``, ``swanlab``.
None of them is a dependency of opd; a tracker whose package is missing is refused in one line,
before any model is loaded, saying what to install.

Where they write: TensorBoard to ``RUN_DIR/tensorboard`` (as before ``report_to`` existed; on
resume the events after the checkpoint are purged), W&B to ``RUN_DIR/wandb`` (``WANDB_MODE=offline``
works without network; ``wandb sync`` uploads later), MLflow's artifacts to ``RUN_DIR/mlruns`` (the
tracking store is MLflow's own, ``MLFLOW_TRACKING_URI``); the others use their own defaults.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from opd.errors import ConfigError

# name -> (accelerate's availability check, what to install)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("is_tensorboard_available", "pip install tensorboard"),
    "wandb": ("is_wandb_available", "pip install wandb"),
    "mlflow": ("is_mlflow_available", "pip install mlflow"),
    "trackio": ("is_trackio_available", "pip install trackio"),
    "comet_ml": ("is_comet_ml_available", "pip install comet-ml"),
    "aim": ("is_aim_available", "pip install aim"),
    "clearml": ("is_clearml_available", "pip install clearml"),
    "dvclive": ("is_dvclive_available", "pip install dvclive"),
    "swanlab": ("is_swanlab_available", "pip install swanlab"),
}


def check_names(names: list[str]) -> list[str]:
    """Refuse unknown tracker names (at config load); returns the names without repeats, in order."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r}; use any of {', '.join(TRACKERS)} (or [] for none)")
    return list(dict.fromkeys(names))


def installed(name: str) -> bool:
    utils = importlib.import_module("accelerate.utils")
    return bool(getattr(utils, TRACKERS[name][0])())


def resolve(report_to: list[str] | None, tensorboard: bool | None) -> list[str]:
    """The trackers a run writes to.

    ``report_to`` wins when set. Otherwise the deprecated ``train.tensorboard`` decides (true:
    TensorBoard, false: none); when neither is set, TensorBoard is used if it is installed — the
    behaviour before trackers were optional — and nothing else.
    """
    if report_to is not None:
        return list(report_to)
    if tensorboard is not None:
        return ["tensorboard"] if tensorboard else []
    return ["tensorboard"] if installed("tensorboard") else []


def check_installed(names: list[str]) -> None:
    """One line naming the package to install for the first tracker that is missing."""
    for name in names:
        if not installed(name):
            raise ConfigError(f"train.report_to: {name} is not installed; {TRACKERS[name][1]} "
                              f"(or remove it from train.report_to)")


def _flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys with values every tracker accepts (TensorBoard's hparams take only scalars)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_config(value, name + "."))
        elif value is None or isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def make_trackers(names: list[str], run_dir: Path, project: str, *, resume_step: int | None = None) -> list[Any]:
    """Accelerate ``GeneralTracker`` objects for ``names``, not started yet.

    Built here rather than by name in ``Accelerator(log_with=...)`` because their settings depend on
    the run: TensorBoard keeps its pre-``report_to`` directory and purges events after the resumed
    checkpoint; W&B and MLflow write inside the run directory.
    """
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, TensorBoardTracker

    trackers = []
    for name in names:
        if name == "tensorboard":
            purge = {} if resume_step is None else {"purge_step": resume_step + 1}
            trackers.append(TensorBoardTracker("tensorboard", str(run_dir), **purge))
            continue
        kwargs: dict[str, Any] = {}
        if name == "wandb":
            kwargs = {"dir": str(run_dir), "name": run_dir.resolve().name}
        elif name == "mlflow":
            kwargs = {"logging_dir": str(run_dir / "mlruns"), "run_name": run_dir.resolve().name}
        cls = LOGGER_TYPE_TO_CLASS[name]
        trackers.append(cls(project, str(run_dir), **kwargs) if cls.requires_logging_directory
                        else cls(project, **kwargs))
    return trackers


def start(trackers: list[Any], config: dict[str, Any] | None, accelerator: Any = None, project: str = "opd") -> None:
    """Start the trackers through ``accelerator.init_trackers`` (or directly, without an Accelerator:
    tests, notebooks) and store the run config as their hyper-parameters."""
    values = _flat_config(config) if config else None
    if accelerator is not None:
        accelerator.log_with = trackers  # already built, so init_trackers only starts them
        accelerator.init_trackers(project, config=values)
        return
    from accelerate import PartialState

    PartialState()  # the trackers' main-process guard needs accelerate's state
    for tracker in trackers:
        tracker.start()
        if values:
            tracker.store_init_configuration(values)


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row (lists such as survival curves stay in metrics.jsonl only)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
