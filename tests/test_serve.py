"""``opd serve-teacher`` as a real process on 127.0.0.1: its limits, its answers to malformed requests,
the OpenAI completions protocol through the official ``openai`` client, and opd's client facing its
request errors. The load test's full version is ``benchmarks/serve_load.py``."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from opd.cli import main
from opd.config import TeacherConfig
from opd.rollout import build_batch
from opd.teachers import ServedTeacher, TeacherServerError
from opd.vllm_engine import free_port

BODY_LIMIT = 4 * 1024 * 1024


def start_server(model_dir: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "opd.cli", "serve-teacher", str(model_dir), "--port", str(port),
                             *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"opd serve-teacher exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("opd serve-teacher did not start")


@pytest.fixture(scope="module")
def served(tiny_setup):
    proc, port = start_server(tiny_setup / "teacher", "--max-body-bytes", str(BODY_LIMIT), "--max-queue", "8",
                              "--max-batch", "4", "--read-timeout", "2", "--request-timeout", "60")
    yield proc, port
    proc.kill()
    proc.wait()


def request(port: int, body: object = None, raw: bytes | None = None, conn: http.client.HTTPConnection | None = None,
            timeout: float = 30) -> tuple[int, dict]:
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/completions", body=raw if raw is not None else json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


NORMAL = {"prompt": [1, 5, 6, 7, 14], "max_tokens": 1, "prompt_logprobs": 3, "return_tokens_as_token_ids": True}


# --- item 8: every malformed request gets 400 and a JSON error, on a connection that stays usable ---------------


@pytest.mark.parametrize("body, message", [
    ({"prompt": [1, -1]}, "token id -1 is outside the vocabulary"),
    ({"prompt": [[1, 2], [1, 10**6]]}, "token id 1000000 is outside the vocabulary"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": []}, "prompt must be a non-empty"),
    ({"prompt": [[]]}, "prompt 0 is empty"),
    ([1, 2, 3], "body must be a JSON object"),
    ({"prompt": [1, 2.5]}, "token ids must be integers"),
    ({"prompt": [1, True]}, "token ids must be integers"),
    ({"prompt": [1, 2], "n": 0}, "n:"),
    ({"prompt": [1, 2], "temperature": "hot"}, "temperature:"),
    ({"prompt": [1, 2], "max_tokens": -1}, "max_tokens:"),
    ({"prompt": [1, 2], "prompt_logprobs": 1000}, "prompt_logprobs must be in"),
    ({"prompt": [1, 2], "guided_json": {}}, "guided_json: not supported"),
    ({"prompt": [1] * 200}, "more than the model's 128 positions"),
    ({"prompt": [1, 2], "max_tokens": 127}, "is more than the model's 128 positions"),
])
def test_malformed_requests_get_400_with_a_json_error(served, body, message):
    _, port = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    status, answer = request(port, body, conn=conn)
    assert status == 400 and message in answer["error"]["message"], answer
    status, answer = request(port, NORMAL, conn=conn)  # same connection: it was not dropped
    assert status == 200 and len(answer["choices"][0]["prompt_logprobs"]) == 5


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[" * 100000 + b"]" * 100000, b""])
def test_bodies_that_are_not_json_objects_get_400(served, raw):
    status, answer = request(served[1], raw=raw)
    assert status == 400 and "error" in answer


def test_concurrent_requests_are_batched_and_score_as_alone(served):
    _, port = served
    bodies = [{"prompt": [[1] + [5 + (i + j) % 10 for j in range(60 + i)] for i in range(2)], "max_tokens": 0,
               "prompt_logprobs": 2} for _ in range(8)]  # --max-queue 8
    alone = request(port, bodies[0])[1]
    before = health(port)["forward_batches"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: request(port, b), bodies))
    assert all(status == 200 for status, _ in answers)
    assert health(port)["forward_batches"] - before < len(bodies)  # some requests shared a forward
    for _, answer in answers:
        for got, want in zip(answer["choices"], alone["choices"]):
            for a, b in zip(got["prompt_logprobs"][1:], want["prompt_logprobs"][1:]):
                assert a.keys() == b.keys()
                assert all(abs(a[t]["logprob"] - b[t]["logprob"]) < 1e-5 for t in a)


def test_load_bounded_and_normal_requests_still_answer(served):
    """20 clients, an oversized body, a 10^6-token prompt and 20 half-open connections at once: every
    request gets an HTTP answer (no reset), memory stays bounded, and a normal request answers in a second."""
    proc, port = served
    base = rss_mb(proc.pid)
    half_open = []
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"")
        half_open.append(s)

    def normal(_: int) -> int:
        return request(port, {"prompt": [1, 5, 6, 7], "max_tokens": 8, "temperature": 0})[0]

    def oversized() -> tuple[int, dict]:
        return request(port, raw=b'{"prompt": [' + b"1, " * (3 * BODY_LIMIT // 3) + b"1]}")

    def huge_prompt() -> tuple[int, dict]:
        return request(port, {"prompt": [1] * 10**6, "max_tokens": 1})

    with ThreadPoolExecutor(24) as pool:
        big, huge = pool.submit(oversized), pool.submit(huge_prompt)
        statuses = list(pool.map(normal, range(20)))
        big_status, big_answer = big.result()
        huge_status, huge_answer = huge.result()
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 8, statuses
    assert big_status == 413 and "max-body-bytes" in big_answer["error"]["message"]
    assert huge_status == 400 and "positions" in huge_answer["error"]["message"]
    started = time.monotonic()
    assert request(port, NORMAL)[0] == 200
    assert time.monotonic() - started < 1.0
    assert rss_mb(proc.pid) - base < 300
    # the half-open connections are closed by the server after --read-timeout (2 s)
    for s in half_open:
        s.settimeout(10)
        assert s.recv(1024) == b""
        s.close()


def test_a_client_that_goes_away_cancels_its_work(served):
    _, port = served
    # greedy from [1, 5, 6] never meets EOS in this model: 64 rows x 120 steps, seconds of work
    long = json.dumps({"prompt": [[1, 5, 6]] * 4, "n": 16, "max_tokens": 120, "temperature": 0}).encode()
    before = health(port)["requests_cancelled"]
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(long)).encode() + b"\r\n\r\n" + long)
    time.sleep(0.5)
    s.close()
    time.sleep(0.2)
    started = time.monotonic()
    assert request(port, NORMAL)[0] == 200
    assert time.monotonic() - started < 1.0  # not queued behind 64 sequences x 120 tokens
    assert health(port)["requests_cancelled"] > before


# --- item 9: output rows must cover the tokenizer ------------------------------------------------------------


def test_a_model_with_fewer_output_rows_than_its_tokenizer_is_refused(tokenizer, tmp_path, capsys):
    model = tiny_llama(len(tokenizer) - 3)
    model.save_pretrained(tmp_path / "short")
    tokenizer.save_pretrained(tmp_path / "short")
    capsys.readouterr()
    assert main(["serve-teacher", str(tmp_path / "short"), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{len(tokenizer) - 3} output rows" in err


# --- item 10: opd's client stops at once on a request error ---------------------------------------------------


def test_a_request_error_stops_the_client_at_once_with_the_servers_message(served, tokenizer):
    _, port = served
    teacher = ServedTeacher(TeacherConfig(kind="served", url=f"http://127.0.0.1:{port}", top_k=2, max_retries=5,
                                          backoff_s=0.5), tokenizer)
    batch = build_batch([[1, 5, 6]], [[7, len(tokenizer) + 3]], tokenizer.pad_token_id)  # an id past the vocabulary
    started = time.monotonic()
    expected = rf"HTTP 400: prompt\[0\]\[4\]: token id {len(tokenizer) + 3} is outside the vocabulary"
    with pytest.raises(TeacherServerError, match=expected):
        teacher.score(batch)
    assert time.monotonic() - started < 2 and teacher.pop_stats()["teacher/retries"] == 0


# --- item 11: the OpenAI completions protocol through the official client --------------------------------------


@pytest.fixture(scope="module")
def client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served[1]}/v1", api_key="unused", max_retries=0)


def test_echo_scores_a_prompt_like_the_local_model(client, tiny_setup, tokenizer):
    from opd.models import load_causal_lm

    answer = client.completions.create(model="t", prompt="1 2 3 =", max_tokens=0, echo=True, logprobs=1)
    choice = answer.choices[0]
    ids = tokenizer("1 2 3 =").input_ids
    assert choice.text == "1 2 3 =" and choice.logprobs.token_logprobs[0] is None
    model = load_causal_lm(str(tiny_setup / "teacher"))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :, : len(tokenizer)]
    expected = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    got = torch.tensor(choice.logprobs.token_logprobs[1:])
    assert len(choice.logprobs.tokens) == len(ids) and torch.allclose(got, expected, atol=1e-5)
    assert len(choice.logprobs.text_offset) == len(ids)
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])


def test_n_stop_text_offset_and_stream(client):
    answer = client.completions.create(model="t", prompt=["1 2 3 =", "4 ="], max_tokens=8, n=3, logprobs=2, seed=3)
    assert [c.index for c in answer.choices] == list(range(6))
    for choice in answer.choices:
        offsets = choice.logprobs.text_offset
        assert len(offsets) == len(choice.logprobs.tokens) and offsets == sorted(offsets)
        assert offsets[0] == 0 and offsets[-1] <= len(choice.text)
        for token, offset in zip(choice.logprobs.tokens, offsets):
            if token.strip() and not token.startswith("<"):
                assert choice.text[offset:].lstrip().startswith(token.strip())
    greedy = client.completions.create(model="t", prompt="1 2 3 =", max_tokens=10, temperature=0)
    text = greedy.choices[0].text
    word = text.split()[2]
    cut = client.completions.create(model="t", prompt="1 2 3 =", max_tokens=10, temperature=0, stop=[word])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(word)]
    events = list(client.completions.create(model="t", prompt="1 2 3 =", max_tokens=10, temperature=0, stream=True))
    assert "".join(e.choices[0].text for e in events) == text
    assert events[-1].choices[0].finish_reason in ("stop", "length")
    assert len(events) == greedy.usage.completion_tokens + 1  # one event per token, then the finish


def test_unsupported_openai_fields_get_400(client):
    import openai

    for extra in ({"best_of": 3}, {"suffix": "x"}, {"logit_bias": {"5": 1.0}}, {"presence_penalty": 0.5}):
        with pytest.raises(openai.BadRequestError, match="not supported"):
            client.completions.create(model="t", prompt="1 2", max_tokens=2, **extra)


# --- item 12: a non-loopback address needs a key; the limits are documented -------------------------------------


def test_a_non_loopback_host_needs_an_api_key(tiny_setup, capsys, monkeypatch):
    monkeypatch.delenv("OPD_NO_SUCH_KEY", raising=False)
    capsys.readouterr()
    assert main(["serve-teacher", str(tiny_setup / "teacher"), "--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--api-key-env" in err
    with pytest.raises(SystemExit):
        main(["serve-teacher", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    for flag in ("--max-body-bytes", "--max-queue", "--max-batch", "--request-timeout", "--read-timeout",
                 "--idle-timeout", "413", "429"):
        assert flag in helptext


def test_a_full_queue_answers_429_and_a_slow_request_503(tiny_setup):
    """In-process (a real uvicorn server on a thread) with a queue of 2 and a 1 s request timeout."""
    import threading

    from opd.serve import CompletionsBackend, make_server
    from opd.serve_limits import ServerLimits

    backend = CompletionsBackend(str(tiny_setup / "teacher"),
                                 limits=ServerLimits(max_queue=2, max_batch=1, request_timeout_s=1.0))
    srv = make_server(backend)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    # greedy from [1, 5, 6] never meets EOS in this model: 64 generations of 120 steps, many seconds
    slow = {"prompt": [[1, 5, 6]], "n": 64, "max_tokens": 120, "temperature": 0}
    try:
        with ThreadPoolExecutor(6) as pool:
            first = pool.submit(request, port, slow)
            time.sleep(0.2)
            rest = [pool.submit(request, port, NORMAL) for _ in range(5)]
            status, answer = first.result()
            others = [f.result() for f in rest]
        assert status == 503 and "--request-timeout" in answer["error"]["message"]
        assert 429 in [s for s, _ in others]
        busy = next(a for s, a in others if s == 429)
        assert "--max-queue" in busy["error"]["message"]
        started = time.monotonic()
        assert request(port, NORMAL)[0] == 200  # the timed-out rows stopped: the worker is free again
        assert time.monotonic() - started < 1.0
    finally:
        srv.shutdown()
        srv.server_close()


def test_one_token_requests_sample_from_the_scoring_forward(served):
    """``max_tokens: 1`` (opd's scoring requests) skips ``generate``: the same greedy token and log-probs as
    the generate path, and seeded samples that repeat."""
    _, port = served
    body = {"prompt": [1, 5, 6, 7], "temperature": 0, "logprobs": 2, "return_token_ids": True}
    one = request(port, {**body, "max_tokens": 1})[1]["choices"][0]
    two = request(port, {**body, "max_tokens": 3})[1]["choices"][0]
    assert one["token_ids"] == two["token_ids"][:1]
    assert abs(one["logprobs"]["token_logprobs"][0] - two["logprobs"]["token_logprobs"][0]) < 1e-5
    assert one["logprobs"]["top_logprobs"][0].keys() == two["logprobs"]["top_logprobs"][0].keys()
    sampled = {"prompt": [1, 5, 6, 7], "max_tokens": 1, "n": 16, "seed": 7, "top_k": 5, "top_p": 0.9,
               "return_token_ids": True}
    first, again = (request(port, sampled)[1]["choices"] for _ in range(2))
    assert [c["token_ids"] for c in first] == [c["token_ids"] for c in again]
    assert len({c["token_ids"][0] for c in first}) > 1  # really sampled


def test_a_body_declared_far_too_large_is_refused_unread(served):
    _, port = served
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000000000\r\n\r\n{\"prompt\": [1")
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += s.recv(65536)
    s.close()
    assert answer.startswith(b"HTTP/1.1 413")
