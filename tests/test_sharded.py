"""Sharded training with real processes on CPU (gloo): FSDP2 equals data parallel, its sharded
checkpoints resume exactly (after a SIGKILL of one process, and on another process count), LoRA
trains sharded, and the exported student loads with from_pretrained."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides
from opd import checkpoint as ckpt
from opd.config import load_config
from opd.trainer import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
_PORTS = iter(range(29610, 29700))


def torchrun(recipe: str, overrides: list[str], *extra: str, procs: int = 2, wait: bool = True) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(next(_PORTS)), "-m", "opd.cli", "train", recipe, *overrides, *extra]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    if wait:
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err.decode()[-3000:]
    return proc


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=atol, msg=key)


COMMON = {"train.steps": 3, "data.eval": "null", "optim.warmup_steps": 0, "train.threads": 1}


def test_fsdp_token_level_two_processes_match_one(tiny_setup, tmp_path):
    """Supervised KD on the dataset's answers: 2 processes x 4 prompts, student and teacher sharded, end
    on the weights of 1 process x 8 prompts with nothing sharded (the global-token normaliser and FSDP's
    averaged reduce-scatter agree, and the sharded teacher scores like the whole one)."""
    single = tmp_path / "single"
    train(load_config("supervised_kd", base_overrides(tiny_setup, single, **COMMON, **{"train.batch_size": 8})),
          log=lambda *_: None)
    sharded = tmp_path / "sharded"
    torchrun("supervised_kd", base_overrides(tiny_setup, sharded, **COMMON, **{
        "train.batch_size": 4, "train.distributed": "fsdp", "train.save_every": 3, "teacher.shard": True}))
    assert_close(weights(single), weights(sharded))
    checkpoint = sharded / "checkpoints" / "step-00000003"
    shards = sorted(p.name for p in (checkpoint / "student").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "model.safetensors").exists()
    ckpt.verify_checksums(checkpoint)  # the shards are covered by the checksums
    # the exported student is a plain model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sharded / "final")
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in weights(sharded).values())


def test_fsdp_policy_gradient_two_processes_match_one(tiny_setup, tmp_path):
    """Sampled-token OPD from a teacher cache (fixed rollouts, so the process split samples nothing)."""
    from opd.cache_teacher import build_teacher_cache

    cache = tmp_path / "cache"
    build_teacher_cache(load_config("topk_fkl", base_overrides(tiny_setup, tmp_path / "c", **{
        "teacher.top_k": 2})), cache, rows=16, log=lambda *_: None)
    pg = {**COMMON, "teacher.kind": "cache", "teacher.cache": str(cache), "teacher.model": "null"}
    single = tmp_path / "single"
    train(load_config("sampled_token_opd", base_overrides(tiny_setup, single, **pg, **{"train.batch_size": 8})),
          log=lambda *_: None)
    sharded = tmp_path / "sharded"
    torchrun("sampled_token_opd", base_overrides(tiny_setup, sharded, **pg, **{
        "train.batch_size": 4, "train.distributed": "fsdp"}))
    assert_close(weights(single), weights(sharded))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_fsdp_sigkill_of_one_rank_then_resume_is_bitwise_exact(tiny_setup, tmp_path):
    run = {**COMMON, "train.steps": 6, "train.save_every": 1, "train.distributed": "fsdp", "data.eval": "null"}
    straight = tmp_path / "straight"
    torchrun("on_policy_rkl", base_overrides(tiny_setup, straight, **run))

    crashed = tmp_path / "crashed"
    overrides = base_overrides(tiny_setup, crashed, **run)
    proc = torchrun("on_policy_rkl", overrides, wait=False)
    deadline = time.monotonic() + 300
    while proc.poll() is None and len(ckpt.list_checkpoints(crashed)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, "both ranks should be running"
    os.kill(int(sorted(ranks, key=int)[1]), signal.SIGKILL)  # one rank dies mid-run
    proc.communicate(timeout=300)
    assert proc.returncode != 0 and not (crashed / "final").exists()
    for folder in ckpt.list_checkpoints(crashed):
        ckpt.verify_checksums(folder)
    torchrun("on_policy_rkl", overrides, "--resume")
    a, b = weights(straight), weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_resumes_on_another_process_count_and_lora_trains_sharded(tiny_setup, tmp_path):
    """DCP reshards: a 2-process checkpoint resumes on 1 process. LoRA adapters are sharded with the
    model, trained, and exported merged (plus the adapter alone)."""
    run = {**COMMON, "train.steps": 12, "train.save_every": 2, "train.distributed": "fsdp", "model.lora_r": 4}
    out = tmp_path / "lora"
    overrides = base_overrides(tiny_setup, out, **run)
    proc = torchrun("on_policy_rkl", overrides, wait=False)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not ckpt.list_checkpoints(out) and time.monotonic() < deadline:
        time.sleep(0.01)
    for rank in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
        os.kill(int(rank), signal.SIGKILL)  # the ranks run in sessions of their own
    proc.communicate(timeout=120)
    assert ckpt.list_checkpoints(out) and not (out / "final").exists()
    one = subprocess.run([sys.executable, "-m", "opd.cli", "train", "on_policy_rkl", *overrides, "--resume"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed from" in one.stdout
    assert (out / "final" / "adapter" / "adapter_model.safetensors").exists()
    before = load_file(str(tiny_setup / "student" / "model.safetensors"))
    after = weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the merged adapters moved the weights


def test_an_accelerate_fsdp_config_selects_fsdp(tiny_setup, tmp_path):
    """`accelerate launch --config_file` with a user's FSDP config: train.distributed=auto follows it."""
    config = tmp_path / "fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\n"
                      "num_processes: 2\nuse_cpu: true\nmixed_precision: 'no'\nfsdp_config:\n  fsdp_version: 2\n")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                           "--main_process_port", str(next(_PORTS)), "-m", "opd.cli", "train", "supervised_kd",
                           *base_overrides(tiny_setup, out, **COMMON, **{"train.save_every": 3})],
                          env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted(p.name for p in (out / "checkpoints" / "step-00000003" / "student").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_settings_that_cannot_work_are_refused_in_one_line(tiny_setup, tmp_path, capsys):
    from opd.cli import main

    cases = [
        ({"train.distributed": "fsdp", "rollout.engine": "vllm"}, "needs its full weights in one process"),
        ({"teacher.shard": True}, "several processes"),  # one process: nothing to shard over
        ({"teacher.shard": True, "rollout.on_policy_fraction": 0.5, "rollout.off_policy_source": "teacher"},
         "cannot decode"),
    ]
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        cases.append(({"train.distributed": "deepspeed"}, "pip install deepspeed"))
    for index, (extra, message) in enumerate(cases):
        out = tmp_path / f"bad{index}"
        assert main(["train", "gkd", *base_overrides(tiny_setup, out, **extra)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (out / "config.yaml").exists()


# --- DeepSpeed ZeRO (its own tier: `pip install deepspeed`; the first run JIT-compiles a comm op) ---


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_match_one_and_resume_exactly(tiny_setup, tmp_path, stage):
    pytest.importorskip("deepspeed")
    single = tmp_path / "single"
    train(load_config("supervised_kd", base_overrides(tiny_setup, single, **COMMON, **{"train.batch_size": 8})),
          log=lambda *_: None)
    run = {**COMMON, "train.batch_size": 4, "train.distributed": "deepspeed", "train.zero_stage": stage,
           "train.save_every": 1}
    straight = tmp_path / "straight"
    torchrun("supervised_kd", base_overrides(tiny_setup, straight, **run))
    assert_close(weights(single), weights(straight))
    # resume from the step-2 checkpoint: the same weights as the uninterrupted run
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000003")
    shutil.rmtree(resumed / "final")
    torchrun("supervised_kd", base_overrides(tiny_setup, resumed, **run), "--resume")
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
