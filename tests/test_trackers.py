"""Experiment trackers through Accelerate (``train.report_to``): TensorBoard and W&B (offline) for real,
missing packages refused in one line before any model loads, ``train.tensorboard`` still honoured."""

from __future__ import annotations

import json
import time
import warnings

import pytest

from conftest import base_overrides
from opd import trackers
from opd.cli import main
from opd.config import load_config
from opd.errors import ConfigError


def _train(tiny_setup, out, **extra):
    from opd.trainer import train

    config = load_config("on_policy_rkl", base_overrides(tiny_setup, out, **{"train.steps": 2, "data.eval": "null",
                                                                            **extra}))
    return train(config, log=lambda *_: None)


def test_tensorboard_through_accelerate(tiny_setup, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    _train(tiny_setup, out, **{"train.report_to": "[tensorboard]"})
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # metrics.jsonl is always written


def test_wandb_offline_without_network(tiny_setup, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    out = tmp_path / "wb"
    _train(tiny_setup, out, **{"train.report_to": "[wandb]", "train.report_project": "opd-test"})
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    deadline = time.monotonic() + 20
    while b"loss/total" not in runs[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)  # wandb-core writes the offline file just after run.finish() returns
    data = runs[0].read_bytes()
    assert b"loss/total" in data and b"opd-test" in data
    assert not (out / "tensorboard").exists()


def test_a_missing_tracker_fails_in_one_line_before_loading_models(tiny_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trackers, "installed", lambda name: name != "mlflow")
    overrides = base_overrides(tiny_setup, tmp_path / "r", **{"train.report_to": "[tensorboard, mlflow]",
                                                             "model.student": tmp_path / "not-loaded-yet"})
    tmp_path.joinpath("not-loaded-yet").mkdir()  # exists, so the check runs before the model would load
    assert main(["train", "on_policy_rkl", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "opd: error: train.report_to: mlflow is not installed; pip install mlflow (or remove it from " \
                  "train.report_to)"
    assert not (tmp_path / "r").exists()


def test_names_and_the_deprecated_switch(tiny_setup, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbored'"):
        load_config("on_policy_rkl", base_overrides(tiny_setup, tmp_path, **{"train.report_to": "[tensorbored]"}))
    config = load_config("on_policy_rkl", base_overrides(tiny_setup, tmp_path, **{"train.report_to": "wandb,mlflow"}))
    assert config.train.trackers() == ["wandb", "mlflow"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config("on_policy_rkl", base_overrides(tiny_setup, tmp_path))  # train.tensorboard=False
    assert config.train.trackers() == []
    assert any("train.tensorboard is deprecated" in str(w.message) for w in caught)
    assert trackers.resolve(["wandb"], True) == ["wandb"]  # report_to wins
    monkeypatch.setattr(trackers, "installed", lambda name: False)
    assert trackers.resolve(None, None) == []  # nothing set: TensorBoard only if it is installed
    monkeypatch.setattr(trackers, "installed", lambda name: True)
    assert trackers.resolve(None, None) == ["tensorboard"]


def test_resume_purges_tensorboard_events_after_the_checkpoint(tiny_setup, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from opd.trainer import train

    out = tmp_path / "resume"
    common = {"train.report_to": "[tensorboard]", "data.eval": "null", "train.save_every": 2}
    train(load_config("on_policy_rkl", base_overrides(tiny_setup, out, **{**common, "train.steps": 3})),
          log=lambda *_: None)
    (out / "final").rename(out / "final-first")
    train(load_config("on_policy_rkl", base_overrides(tiny_setup, out, **{**common, "train.steps": 4})),
          resume=True, log=lambda *_: None)
    steps = [e.step for e in EventAccumulator(str(out / "tensorboard")).Reload().Scalars("loss/total")]
    assert steps == [1, 2, 3, 4]  # step 3 of the first run was purged, then written again
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]
