"""Served teacher (OpenAI/vLLM completions protocol), faults between opd and it, and the teacher cache.

The server here is opd's own ``serve-teacher`` backend on 127.0.0.1 (a real model behind a real
HTTP server); the vLLM tier (``-m vllm``) runs the same client against vLLM itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_served_matches_local, base_overrides
from opd import objectives
from opd.cache import TeacherCache
from opd.cache_teacher import build_teacher_cache
from opd.cli import main
from opd.config import TeacherConfig, load_config
from opd.fault_proxy import FaultProxy
from opd.models import completion_logits
from opd.rollout import build_batch
from opd.serve import CompletionsBackend, make_server
from opd.teachers import ServedTeacher, TeacherServerError


@pytest.fixture(scope="module")
def server(tiny_setup):
    backend = CompletionsBackend(str(tiny_setup / "teacher"))
    srv = make_server(backend)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _batch(tokenizer):
    prompts = [tokenizer("1 2 3 =").input_ids, tokenizer("4 =").input_ids, tokenizer("7 8 =").input_ids]
    completions = [[14, 5, 6, 2], [15, 8], [14, 11, 12, 13, 4, 2]]
    return build_batch(prompts, completions, tokenizer.pad_token_id)


def test_served_scores_equal_the_local_teacher(server, tiny_setup, tokenizer):
    batch = _batch(tokenizer)
    served = ServedTeacher(TeacherConfig(kind="served", url=server, top_k=5, request_batch=2), tokenizer)
    signal = served.score(batch)
    local_lp, top_lp, top_ids = assert_served_matches_local(signal, tiny_setup / "teacher", batch, tokenizer,
                                                            k=5, atol=1e-5)
    vocab = len(tokenizer)
    mask = batch.completion_mask_BC
    # hence the same losses as with the local teacher
    student = torch.randn(3, batch.completion_len, vocab, requires_grad=True)
    a, _ = objectives.sampled_token_pg(student, signal.token_logprobs_BC, batch.completion_ids_BC, mask, num_tokens=12)
    b, _ = objectives.sampled_token_pg(student, local_lp, batch.completion_ids_BC, mask, num_tokens=12)
    assert torch.allclose(a, b, atol=1e-6)
    c, _ = objectives.topk_divergence(student, signal.topk_logprobs_BCK, signal.topk_ids_BCK, mask,
                                      kind="forward_kl", num_tokens=12)
    d, _ = objectives.topk_divergence(student, top_lp, top_ids, mask, kind="forward_kl", num_tokens=12)
    assert torch.allclose(c, d, atol=1e-5)


@pytest.mark.parametrize("recipe, extra", [("sampled_token_opd", {}), ("topk_fkl", {"teacher.top_k": 5}),
                                           ("seqkd", {})])
def test_training_with_a_served_teacher(server, tiny_setup, tmp_path, recipe, extra):
    out = tmp_path / recipe
    overrides = base_overrides(tiny_setup, out, **{"teacher.kind": "served", "teacher.url": server,
                                                   "data.eval": "null", **extra})
    assert main(["train", recipe, *overrides]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["teacher/requests"] >= 1 and rows[-1]["teacher/retries"] == 0


def test_faults_are_retried_and_nothing_is_mis_scored(server, tokenizer):
    batch = _batch(tokenizer)
    clean = ServedTeacher(TeacherConfig(kind="served", url=server, top_k=3), tokenizer).score(batch)
    schedule = ["timeout", "http500", "drop", "truncate", "invalid_json", "http503", "slow", "ok"]
    proxy = FaultProxy(server, schedule=schedule, hold_s=1.0, slow_s=0.2).start()
    try:
        cfg = TeacherConfig(kind="served", url=proxy.url, top_k=3, timeout_s=0.6, backoff_s=0.01, max_retries=8,
                            request_batch=3, concurrency=1)
        served = ServedTeacher(cfg, tokenizer)
        got = served.score(batch)
    finally:
        proxy.stop()
    assert torch.equal(got.token_logprobs_BC, clean.token_logprobs_BC)
    assert torch.equal(got.topk_ids_BCK, clean.topk_ids_BCK)
    stats = served.pop_stats()
    # timeout, 500, drop, truncated, invalid JSON, 503 each cost one retry; slow succeeded
    assert stats["teacher/retries"] == 6
    assert stats["teacher/timeouts"] == 1 and stats["teacher/http_errors"] == 2
    assert stats["teacher/bad_responses"] == 2 and stats["teacher/connection_errors"] == 1
    assert proxy.counts["slow"] == 1


def test_retry_budget_exhausted_is_one_line_and_keeps_the_run(server, tiny_setup, tmp_path, capsys):
    proxy = FaultProxy(server, schedule=["ok"] * 2 + ["http503"] * 100).start()
    out = tmp_path / "run"
    try:
        args = ["train", "sampled_token_opd", *base_overrides(tiny_setup, out, **{
            "teacher.kind": "served", "teacher.url": proxy.url, "teacher.max_retries": 2, "teacher.backoff_s": 0.01,
            "teacher.request_batch": 4, "data.eval": "null", "train.steps": 4, "train.save_every": 1})]
        capsys.readouterr()
        assert main(args) == 2
    finally:
        proxy.stop()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "failed 3 times in a row" in err and "HTTP 503" in err
    # the steps that did finish are checkpointed and verify; resume against a healthy server works
    from opd import checkpoint as ckpt

    done = ckpt.list_checkpoints(out)
    assert done and all(ckpt.verify_checksums(p) is None for p in done)
    healthy = [a.replace(proxy.url, server) for a in args]
    assert main([*healthy, "--resume"]) == 0


def test_api_key_from_the_environment_is_required_and_never_written(tiny_setup, tmp_path, tokenizer, monkeypatch,
                                                                    capsys):
    backend = CompletionsBackend(str(tiny_setup / "teacher"))
    srv = make_server(backend, api_key="s3cret-key")
    assert srv.server_address[0] == "127.0.0.1"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        monkeypatch.delenv("OPD_TEACHER_API_KEY", raising=False)
        without = ServedTeacher(TeacherConfig(kind="served", url=url, backoff_s=0.01), tokenizer)
        with pytest.raises(TeacherServerError, match="HTTP 401"):
            without.score(_batch(tokenizer))
        assert without.pop_stats()["teacher/retries"] == 0  # an auth error is not retried
        monkeypatch.setenv("OPD_TEACHER_API_KEY", "s3cret-key")
        out = tmp_path / "run"
        assert main(["train", "sampled_token_opd", *base_overrides(tiny_setup, out, **{
            "teacher.kind": "served", "teacher.url": url, "data.eval": "null"})]) == 0
    finally:
        srv.shutdown()
        srv.server_close()
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".jsonl", ".json"):
            assert "s3cret-key" not in path.read_text()
    assert "OPD_TEACHER_API_KEY" in (out / "config.yaml").read_text()  # only the variable's name


def test_served_teacher_config_rules():
    from opd.errors import ConfigError

    base = ["model.student=s", "data.train=d.jsonl", "teacher.kind=served"]
    with pytest.raises(ConfigError, match="needs teacher.url"):
        load_config("sampled_token_opd", base)
    with pytest.raises(ConfigError, match="not logits"):
        load_config("on_policy_rkl", [*base, "teacher.url=http://127.0.0.1:1"])
    with pytest.raises(ConfigError, match="temperature=1"):
        load_config("sampled_token_opd", [*base, "teacher.url=http://127.0.0.1:1", "temperature=0.7"])


# --- teacher cache -------------------------------------------------------------------------------------


def test_teacher_cache_resumes_to_the_same_bytes_and_trains(tiny_setup, tmp_path, capsys):
    cfg = load_config("topk_fkl", base_overrides(tiny_setup, tmp_path / "unused", **{"teacher.top_k": 4}))
    whole = build_teacher_cache(cfg, tmp_path / "whole", rows=12, shard_size=5, log=lambda *_: None)
    # an interrupted build: the last shard never made it into the manifest
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    manifest = json.loads((part / "manifest.json").read_text())
    last = manifest["shards"].pop()
    manifest["rows"] -= last["rows"]
    manifest["complete"] = False
    (part / "manifest.json").write_text(json.dumps(manifest))
    (part / last["file"]).rename(part / f".{last['file']}.tmp")  # cut short mid-write
    with pytest.raises(Exception, match="incomplete"):
        TeacherCache(part)
    build_teacher_cache(cfg, part, rows=12, shard_size=5, log=lambda *_: None)
    a = json.loads((whole / "manifest.json").read_text())["shards"]
    b = json.loads((part / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in a] == [s["sha256"] for s in b] and len(a) == 3
    cache = TeacherCache(whole)
    assert cache.rows == 12
    batch = cache.batch([0, 5, 11], 0)
    signal = batch.teacher_signal
    mask = batch.completion_mask_BC.bool()
    assert torch.all(signal.topk_logprobs_BCK[mask][:, 0] >= signal.topk_logprobs_BCK[mask][:, 1])
    assert torch.all(signal.token_logprobs_BC[mask] <= 0)
    for recipe, extra in (("topk_fkl", {"teacher.top_k": 4}), ("sampled_token_opd", {})):
        out = tmp_path / f"train-{recipe}"
        assert main(["train", recipe, *base_overrides(tiny_setup, out, **{
            "teacher.kind": "cache", "teacher.cache": str(whole), "teacher.model": "null", "data.eval": "null",
            **extra})]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["rollout/cached_fraction"] == 1.0 and rows[-1]["compute/teacher_scored_tokens"] == 0
    # a damaged shard is caught before training
    shard = whole / a[1]["file"]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    capsys.readouterr()
    assert main(["train", "topk_fkl", *base_overrides(tiny_setup, tmp_path / "bad", **{
        "teacher.kind": "cache", "teacher.cache": str(whole), "teacher.model": "null", "teacher.top_k": 4})]) == 2
    assert "does not match its checksum" in capsys.readouterr().err


def test_cache_cli_and_settings_mismatch(tiny_setup, tmp_path, capsys):
    out = tmp_path / "cache"
    args = ["cache-teacher", "topk_fkl", *base_overrides(tiny_setup, tmp_path / "u", **{"teacher.top_k": 3}),
            "--out", str(out), "--rows", "6", "--shard-size", "4"]
    assert main(args) == 0
    assert json.loads((out / "manifest.json").read_text())["complete"]
    capsys.readouterr()
    assert main([*args[:-6], "teacher.top_k=5", *args[-6:]]) == 2  # other settings, same dir
    assert "other settings" in capsys.readouterr().err


# --- multi-teacher routing -------------------------------------------------------------------------------


def test_rows_are_routed_to_their_teachers_with_per_teacher_metrics(server, tiny_setup, tmp_path, capsys):
    rows = [json.loads(line) for line in (tiny_setup / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["domain"] = ["math", "code", None][i % 3]  # None: the default teacher
    data = tmp_path / "routed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    overrides = base_overrides(tiny_setup, out, **{
        "data.train": str(data), "data.eval": "null", "data.teacher_field": "domain", "train.batch_size": 6,
        "teachers": json.dumps({"math": {"model": str(tiny_setup / "student"), "top_k": 4},  # another model
                                "code": {"kind": "served", "url": server, "top_k": 4}}),
        "teacher.top_k": 4, "loss.objective": "divergence"})
    assert main(["train", "topk_fkl", *overrides]) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = logged[-1]
    for name in ("math", "code", "default"):
        assert last[f"teacher/{name}/tokens"] > 0 and last[f"teacher/{name}/divergence_mean"] > -1e-6
    total = sum(last[f"teacher/{n}/tokens"] for n in ("math", "code", "default"))
    assert total == last["train/completion_tokens"]
    # a row naming an unknown teacher is a one-line error before training
    rows[0]["domain"] = "physics"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["train", "topk_fkl", *base_overrides(tiny_setup, tmp_path / "bad", **{
        "data.train": str(data), "data.teacher_field": "domain", "teacher.top_k": 4,
        "teachers": json.dumps({"math": {"model": str(tiny_setup / "student"), "top_k": 4}})})]) == 2
    assert "physics" in capsys.readouterr().err


def test_routing_equals_a_single_teacher_when_every_row_goes_to_it(tiny_setup, tmp_path):
    """Routing every row to a named copy of the default teacher gives the same weights."""
    from safetensors.torch import load_file

    from opd.trainer import train

    rows = [json.loads(line) for line in (tiny_setup / "train.jsonl").read_text().splitlines()]
    data = tmp_path / "all.jsonl"
    data.write_text("".join(json.dumps({**r, "domain": "same"}) + "\n" for r in rows))
    common = {"data.train": str(data), "data.eval": "null"}
    train(load_config("on_policy_rkl", base_overrides(tiny_setup, tmp_path / "single", **common)),
          log=lambda *_: None)
    routed = base_overrides(tiny_setup, tmp_path / "routed", **common, **{
        "data.teacher_field": "domain", "teachers": json.dumps({"same": {"model": str(tiny_setup / "teacher")}})})
    train(load_config("on_policy_rkl", routed), log=lambda *_: None)
    a = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "routed" / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_teacher_scores_chat_prompts_with_its_own_template(tiny_setup, tmp_path, tokenizer):
    """Same vocabulary, different chat template: local and served teachers both score the
    student's completion behind the prompt rendered with the teacher's template."""
    import copy

    from opd.data import Example
    from opd.teachers import LocalTeacher

    student_tok = copy.deepcopy(tokenizer)
    student_tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}="
    teacher_tok = copy.deepcopy(tokenizer)
    teacher_tok.chat_template = "{% for m in messages %}+ {{ m['content'] }} {% endfor %}- ="
    teacher_dir = tmp_path / "templated_teacher"
    shutil.copytree(tiny_setup / "teacher", teacher_dir)
    teacher_tok.save_pretrained(teacher_dir)
    messages = [[{"role": "user", "content": "1 2 3"}], [{"role": "user", "content": "4 5"}]]
    examples = []
    for m in messages:
        text = student_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        examples.append(Example(text, student_tok(text, add_special_tokens=False).input_ids, messages=m))
    batch = build_batch([e.prompt_ids for e in examples], [[14, 5, 2], [15, 7, 8, 2]], tokenizer.pad_token_id)
    batch.examples = examples
    local = LocalTeacher.from_config(TeacherConfig(model=str(teacher_dir)), student_tok)
    got = local.score(batch).logits_BCV
    own = [teacher_tok(teacher_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False).input_ids for m in messages]
    manual = build_batch(own, [[14, 5, 2], [15, 7, 8, 2]], tokenizer.pad_token_id)
    expected = completion_logits(local.model, manual.input_ids_BT, manual.attention_mask_BT, manual.completion_len)
    mask = batch.completion_mask_BC.bool()
    assert torch.allclose(got[mask], expected[mask], atol=1e-5)
    plain = completion_logits(local.model, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)
    assert not torch.allclose(got[mask], plain[mask], atol=1e-3)  # the template really changed the scores
    # the served teacher, told where the teacher's tokenizer is, renders the same prompts
    backend = CompletionsBackend(str(teacher_dir))
    srv = make_server(backend)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        served = ServedTeacher(TeacherConfig(kind="served", url=url, tokenizer=str(teacher_dir)), student_tok)
        signal = served.score(batch)
    finally:
        srv.shutdown()
        srv.server_close()
    lp = objectives.token_logprobs(expected, batch.completion_ids_BC, vocab_size=len(tokenizer))
    assert ((signal.token_logprobs_BC - lp).abs() * batch.completion_mask_BC).max() < 1e-5


# --- teacher server pools ------------------------------------------------------------------------------


def _serve(model_dir, port):
    # --max-batch 1: requests are not batched together, so a sequence's scores are bit-identical whichever
    # server of the pool scores it and whatever else it had queued
    proc = subprocess.Popen([sys.executable, "-m", "opd.cli", "serve-teacher", str(model_dir), "--port", str(port),
                             "--max-batch", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("opd serve-teacher did not start")


def test_a_pool_of_served_teachers_survives_losing_one(tiny_setup, tmp_path, tokenizer):
    """Two real teacher servers; requests are spread over both; one is killed (by its PID) mid-run and the
    run finishes on the other, with the same weights as a run against one server (identical scores)."""
    from opd.vllm_engine import free_port

    ports = [free_port(), free_port()]
    servers = [_serve(tiny_setup / "teacher", port) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        pool = ServedTeacher(TeacherConfig(kind="served", url=urls, top_k=3, request_batch=1, concurrency=2),
                             tokenizer)
        batch = _batch(tokenizer)
        first = pool.score(batch)
        stats = pool.pop_stats()
        assert stats["teacher/requests"] == 3 and stats["teacher/servers_down"] == 0
        servers[0].kill()  # the least busy server is gone: its requests move to the other
        servers[0].wait()
        again = pool.score(batch)
        assert torch.equal(first.token_logprobs_BC, again.token_logprobs_BC)
        stats = pool.pop_stats()
        assert stats["teacher/connection_errors"] >= 1 and stats["teacher/servers_down"] == 1

        # one sequence per request: the server's scores then do not depend on how requests were batched
        common = {"teacher.kind": "served", "data.eval": "null", "train.steps": 4, "teacher.server_cooldown_s": 60,
                  "train.threads": 1, "teacher.request_batch": 1, "teacher.concurrency": 2}
        single = tmp_path / "single"
        assert main(["train", "sampled_token_opd", *base_overrides(tiny_setup, single, **common,
                                                                   **{"teacher.url": urls[1]})]) == 0
        servers[0] = _serve(tiny_setup / "teacher", ports[0])
        pooled = tmp_path / "pooled"
        overrides = base_overrides(tiny_setup, pooled, **common, **{"teacher.url": json.dumps(urls)})
        done = subprocess.Popen([sys.executable, "-m", "opd.cli", "train", "sampled_token_opd", *overrides,
                                 "train.log_every=1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        metrics = pooled / "metrics.jsonl"
        while done.poll() is None and not (metrics.exists() and metrics.read_text().strip()) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        servers[0].kill()  # mid-run
        _, err = done.communicate(timeout=300)
        assert done.returncode == 0, err.decode()[-2000:]
        a = load_file(str(single / "final" / "model.safetensors"))
        b = load_file(str(pooled / "final" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        for proc in servers:
            proc.kill()
