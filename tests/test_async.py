"""Asynchronous rollouts (rollout.async_steps): written beside training from a snapshot of the student,
deterministic, lag logged and corrected, resumed exactly from a checkpoint that carries them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides
from opd.config import load_config
from opd.objectives import importance_ratio
from opd.trainer import train


def _run(tiny_setup, out, **extra):
    overrides = base_overrides(tiny_setup, out, **{"data.eval": "null", "train.steps": 6, "train.save_every": 2,
                                                   "rollout.async_steps": 1, **extra})
    return train(load_config("sampled_token_opd", overrides), log=lambda *_: None)


def _weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.parametrize("lag", [1, 2])
def test_async_rollouts_log_their_lag_are_deterministic_and_resume_exactly(tiny_setup, tmp_path, lag):
    straight = tmp_path / "straight"
    _run(tiny_setup, straight, **{"rollout.async_steps": lag, "train.log_every": 1, "loss.importance_cap": 2.0})
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    lags = [r["rollout/policy_lag"] for r in rows if "rollout/policy_lag" in r]
    # step t is written from the weights after step t-1-k (step 0's for the first k + 1 steps)
    assert lags == [min(step - 1, lag) for step in range(1, 7)]
    assert all("loss/importance_capped_mean" in r for r in rows if "loss/total" in r)
    again = tmp_path / "again"
    _run(tiny_setup, again, **{"rollout.async_steps": lag, "loss.importance_cap": 2.0})
    a, b = _weights(straight), _weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)  # timing never changes what is written
    # resume from step 4: the checkpoint carries the rollouts written ahead from older weights
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    shutil.rmtree(resumed / "final")
    train(load_config("sampled_token_opd", base_overrides(tiny_setup, resumed, **{
        "data.eval": "null", "train.steps": 6, "train.save_every": 2, "rollout.async_steps": lag,
        "loss.importance_cap": 2.0})), resume=True, log=lambda *_: None)
    c = _weights(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_async_rollouts_differ_from_synchronous_ones_only_by_their_staleness(tiny_setup, tmp_path):
    """Both runs train; the asynchronous one writes its rollouts from older weights, so the two differ."""
    sync = tmp_path / "sync"
    _run(tiny_setup, sync, **{"rollout.async_steps": 0})
    lagged = tmp_path / "lagged"
    _run(tiny_setup, lagged)
    a, b = _weights(sync), _weights(lagged)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_capped_importance_ratio_value_and_gradient():
    student = torch.tensor([0.0, -1.0, -3.0], dtype=torch.float64, requires_grad=True)
    sampler = torch.tensor([-2.0, -1.0, -1.0], dtype=torch.float64)
    ratio = importance_ratio(student, sampler, cap=2.0)
    assert torch.allclose(ratio, torch.tensor([2.0, 1.0, torch.exp(torch.tensor(-2.0)).item()], dtype=torch.float64))
    ratio.sum().backward()
    # d/d log q of (w * q / sg(q)) = w: the capped weight scales grad log q
    assert torch.allclose(student.grad, ratio.detach())
    uncapped = importance_ratio(student.detach().requires_grad_(), sampler)
    assert torch.allclose(uncapped, torch.exp(student.detach() - sampler))


def test_async_settings_that_cannot_work_are_refused():
    from opd.errors import ConfigError

    base = ["model.student=s", "teacher.model=t", "data.train=d", "rollout.async_steps=1"]
    for bad, message in ((["rollout.engine=vllm"], "needs a sampler"),
                         (["rollout.sampler=mixture"], "needs a sampler"),
                         (["train.distributed=fsdp"], "full copy of the student"),
                         (["loss.divergence_importance=true"], "set loss.importance_cap")):
        with pytest.raises(ConfigError, match=message):
            load_config("on_policy_rkl", [*base, *bad])
