"""Crash safety: SIGKILL a real `opd train` process at random points, resume, and compare.

The run is killed five times, each time a random short delay after a randomly chosen
checkpoint appears (so kills land in rollout, backward, optimizer step or the middle of
writing the next checkpoint). After every kill each committed checkpoint must verify
against its checksums and at most ``keep_checkpoints`` may exist; the final weights of the
resumed run must equal those of an uninterrupted run bitwise (CPU, same seed).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides
from opd import checkpoint as ckpt
from opd.config import load_config
from opd.trainer import train

STEPS = 12


def _overrides(tiny_setup, out):
    return base_overrides(tiny_setup, out, **{
        "train.steps": STEPS, "train.save_every": 1, "train.keep_checkpoints": 2, "data.eval": "null",
        "train.threads": 1,
    })


def _latest_step(run_dir) -> int:
    found = ckpt.list_checkpoints(run_dir)
    return int(found[-1].name.split("-")[1]) if found else 0


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_at_random_points_then_resume_matches_uninterrupted_run(tiny_setup, tmp_path):
    straight = tmp_path / "straight"
    train(load_config("on_policy_rkl", _overrides(tiny_setup, straight)), log=lambda *_: None)

    crashed = tmp_path / "crashed"
    command = [sys.executable, "-m", "opd.cli", "train", "on_policy_rkl", *_overrides(tiny_setup, crashed)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    rng = random.Random(1234)
    targets = sorted(rng.sample(range(1, STEPS - 1), 5))
    kills = 0
    for target in targets:
        resume = ["--resume"] if (crashed / "config.yaml").exists() else []
        proc = subprocess.Popen(command + resume, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _latest_step(crashed) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            time.sleep(rng.uniform(0.0, 0.08))
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
        committed = ckpt.list_checkpoints(crashed)
        assert len(committed) <= 3  # a kill between commit and pruning leaves one extra
        for folder in committed:
            ckpt.verify_checksums(folder)  # never half-written
    assert kills == 5

    done = subprocess.run(command + ["--resume"], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert not [p for p in (crashed / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert len(ckpt.list_checkpoints(crashed)) == 2
    expected = load_file(str(straight / "final" / "model.safetensors"))
    got = load_file(str(crashed / "final" / "model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
