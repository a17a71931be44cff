"""Two-process (gloo, CPU) data-parallel training equals one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import base_overrides
from opd.config import load_config
from opd.trainer import train


def test_two_processes_match_one_with_the_same_global_batch(tiny_setup, tmp_path):
    common = {"train.steps": 2, "data.eval": "null", "optim.warmup_steps": 0, "train.threads": 1,
              "train.save_every": 2}
    single = tmp_path / "single"
    train(load_config("supervised_kd", base_overrides(tiny_setup, single, **{**common, "train.batch_size": 8})),
          log=lambda *_: None)

    double = tmp_path / "double"
    overrides = base_overrides(tiny_setup, double, **{**common, "train.batch_size": 4})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "opd.cli", "train", "supervised_kd", *overrides],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    a = load_file(str(single / "final" / "model.safetensors"))
    b = load_file(str(double / "final" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # each process saved its own RNG stream in the checkpoint
    checkpoint = double / "checkpoints" / "step-00000002"
    assert (checkpoint / "rng-rank0.safetensors").exists() and (checkpoint / "rng-rank1.safetensors").exists()
