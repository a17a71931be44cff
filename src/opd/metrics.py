"""Metrics sinks: ``metrics.jsonl`` (always) and experiment trackers (``train.report_to``).

Names are namespaced: ``loss/...``, ``teacher/...``, ``rollout/...``, ``perf/...``,
``eval/...``, ``train/...``. Lists (e.g. first-error curves) go to JSONL only. Trackers
(TensorBoard, W&B, MLflow, ...) are Accelerate's (:mod:`opd.trackers`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    """``trackers``: names from :data:`opd.trackers.TRACKERS` (``None``: TensorBoard if ``tensorboard``,
    the pre-``report_to`` switch, else none). ``accelerator``: the run's Accelerator, whose tracker API
    (``init_trackers`` / ``log``) carries the rows; without one the same tracker classes are driven
    directly. ``config``: stored as the trackers' hyper-parameters."""

    def __init__(
        self, run_dir: Path, *, tensorboard: bool = True, enabled: bool = True, resume_step: int | None = None,
        trackers: list[str] | None = None, accelerator: Any = None, project: str = "opd",
        config: dict[str, Any] | None = None,
    ) -> None:
        from opd import trackers as tracking

        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.accelerator = accelerator
        self.trackers: list[Any] = []
        if enabled and resume_step is not None:
            self.truncate_after(resume_step)
        names = trackers if trackers is not None else (["tensorboard"] if tensorboard else [])
        if enabled and names:
            tracking.check_installed(names)
            self.trackers = tracking.make_trackers(names, run_dir, project, resume_step=resume_step)
            tracking.start(self.trackers, config, accelerator, project)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step}
        for key, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)
            row[key] = value
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.trackers:
            from opd.trackers import scalars

            values = scalars(metrics)
            if self.accelerator is not None:
                self.accelerator.log(values, step=step)
            else:
                for tracker in self.trackers:
                    tracker.log(values, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so curves do not double up."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def close(self) -> None:
        # Each tracker's own finish, not Accelerator.end_training: that also destroys the process
        # group, which the loop still needs for its final barrier.
        for tracker in self.trackers:
            tracker.finish()
        if self.accelerator is not None:
            self.accelerator.trackers = [t for t in self.accelerator.trackers if t not in self.trackers]
        self.trackers = []
