"""Benchmarks run on demand, but their entry points must at least fail cleanly where they cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present; gpu.sh would run for real")
def test_gpu_script_fails_fast_on_cpu(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "out")],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "no CUDA GPU visible" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_memory_long_summary_reads_its_own_rows():
    """The summary of benchmarks/memory_long.py (fits and targets) on synthetic rows, without running a case."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memory_long
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = [{"impl": impl, "vocab": 7, "tokens": n, "peak_mb": peak + slope * n / 1000, "seconds": n / 500,
             "fits": impl != "trl" or n < 4096}
            for impl, peak, slope in (("opd_fused", 500.0, 0.0), ("liger", 1700.0, 0.0), ("trl", 0.0, 5000.0))
            for n in (1024, 4096, 8192)]
    summary = memory_long.summarise(rows, rows[:3], rows[:3], (7,))
    targets = summary["targets"]
    assert abs(targets["opd_fused peak slope, MB per 1k tokens @7"]) < 1e-9
    assert "does not fit" in targets["trl / opd_fused peak at 8k @7"]
    assert abs(targets["opd_fused / liger peak @7 T=8192"] - 500 / 1700) < 1e-9
    assert summary["step_fits"]["opd_fused@7"]["seconds"]["per_1k_tokens"] == 2.0
