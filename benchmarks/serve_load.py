"""Load test of ``opd serve-teacher`` on 127.0.0.1 (issue 19): does it stay up, bounded and responsive?

A tiny Llama built from a config (the demo tokenizer, ``--hidden``, 2 layers, ``--positions``
positions) is served by a real ``opd serve-teacher`` process with its default limits except
``--read-timeout`` (short, so the half-open connections are seen to close). Then, all at once:

- ``--requests`` requests from ``--clients`` concurrent clients (keep-alive connections), three in
  four shaped like opd's ServedTeacher (4 token-id sequences, ``max_tokens: 1``, ``prompt_logprobs: 5``)
  and one in four sampling 16 tokens;
- one ``--big-mb`` MB body (past ``--max-body-bytes``: expect 413);
- one 10^6-token prompt (past the model's positions: expect 400);
- ``--half-open`` connections that send nothing or half a request head and never finish it;
- a probe: one normal scoring request every 0.25 s, its latency recorded.

Server RSS is sampled every 50 ms. Reported: answers by status, connection errors (resets,
dropped connections: expected 0), latencies, probe latency during and after the load, RSS before
and at its peak, the oversized and huge requests' answers and times, and how many half-open
connections the server closed, and after how long.

    python benchmarks/serve_load.py                      # the full test
    python benchmarks/serve_load.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def build_model(out: Path, hidden: int, positions: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd.demo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return len(tokenizer)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post(conn: http.client.HTTPConnection, raw: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/v1/completions", body=raw, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="serve_load_"))
    vocab = build_model(workdir / "model", args.hidden, args.positions)
    port_sock = socket.socket()
    port_sock.bind(("127.0.0.1", 0))
    port = port_sock.getsockname()[1]
    port_sock.close()
    command = [sys.executable, "-m", "opd.cli", "serve-teacher", str(workdir / "model"), "--port", str(port),
               "--read-timeout", str(args.read_timeout), *args.server_flags]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.2)
    rng = random.Random(0)

    def scoring_body() -> bytes:
        seqs = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(64, 200))] for _ in range(4)]
        return json.dumps({"prompt": seqs, "max_tokens": 1, "prompt_logprobs": 5,
                           "return_tokens_as_token_ids": True}).encode()

    def sampling_body() -> bytes:
        return json.dumps({"prompt": [[1] + [rng.randrange(3, vocab) for _ in range(32)]], "max_tokens": 16,
                           "return_token_ids": True}).encode()

    bodies = [sampling_body() if i % 4 == 3 else scoring_body() for i in range(args.requests)]
    probe_body = scoring_body()
    results: dict[str, Any] = {"statuses": {}, "connection_errors": [], "latency_s": []}
    lock = threading.Lock()
    stop = threading.Event()
    rss: list[float] = []
    base_rss = rss_mb(server.pid)

    def sample_rss() -> None:
        while not stop.is_set():
            rss.append(rss_mb(server.pid))
            time.sleep(0.05)

    probes: list[tuple[float, float, int]] = []

    def probe() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, _ = post(http.client.HTTPConnection("127.0.0.1", port, timeout=60), probe_body)
            except OSError as exc:
                status = -1
                with lock:
                    results["connection_errors"].append(f"probe: {type(exc).__name__}: {exc}")
            probes.append((started, time.monotonic() - started, status))
            time.sleep(0.25)

    queue = list(range(args.requests))

    def client(_: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop()
            started = time.monotonic()
            try:
                status, _ = post(conn, bodies[i])
            except OSError as exc:  # reset, refused, dropped: what this test must never see
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                with lock:
                    results["connection_errors"].append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                results["statuses"][status] = results["statuses"].get(status, 0) + 1
                results["latency_s"].append(time.monotonic() - started)
            if status == 429:  # back off and retry, as opd's client does (teacher.backoff_s)
                time.sleep(0.5)
                with lock:
                    queue.append(i)

    def send_raw(raw: bytes) -> dict[str, Any]:
        started = time.monotonic()
        try:
            status, body = post(http.client.HTTPConnection("127.0.0.1", port, timeout=120), raw)
            return {"status": status, "seconds": time.monotonic() - started, "bytes": len(raw),
                    "message": json.loads(body)["error"]["message"]}
        except OSError as exc:
            return {"status": None, "error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - started}

    def oversized() -> dict[str, Any]:
        return send_raw(b'{"prompt": [' + b"1, " * (args.big_mb * 1024 * 1024 // 3) + b"1]}")

    def huge() -> dict[str, Any]:
        return send_raw(json.dumps({"prompt": [5] * 10**6, "max_tokens": 1, "prompt_logprobs": 5}).encode())

    half_open = []
    for i in range(args.half_open):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 2:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        half_open.append((s, time.monotonic()))

    closed_after: list[float] = []

    def watch_half_open() -> None:
        """Record when the server closes each half-open connection (EOF, or a reset counted apart)."""
        selector = selectors.DefaultSelector()
        for s, opened in half_open:
            selector.register(s, selectors.EVENT_READ, opened)
        until = time.monotonic() + args.read_timeout * 3 + 60
        while selector.get_map() and time.monotonic() < until:
            for key, _ in selector.select(timeout=0.5):
                try:
                    data = key.fileobj.recv(1024)
                except OSError:
                    data = None
                if data == b"":
                    closed_after.append(time.monotonic() - key.data)
                selector.unregister(key.fileobj)

    watcher = threading.Thread(target=watch_half_open, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=sample_rss, daemon=True), threading.Thread(target=probe, daemon=True)]
    for t in threads:
        t.start()
    started = time.monotonic()
    with ThreadPoolExecutor(args.clients + 2) as pool:
        big, huge_f = pool.submit(oversized), pool.submit(huge)
        list(pool.map(client, range(args.clients)))
        results["oversized_body"] = big.result()
        results["huge_prompt"] = huge_f.result()
    load_s = time.monotonic() - started
    during = [p for p in probes if p[0] < started + load_s]
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    after = []
    for _ in range(5):
        t0 = time.monotonic()
        status, _ = post(http.client.HTTPConnection("127.0.0.1", port, timeout=60), probe_body)
        after.append((time.monotonic() - t0, status))
    watcher.join()
    closed = len(closed_after)
    for s, _ in half_open:
        s.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        health = json.loads(r.read())
    server.terminate()
    server.wait(timeout=30)
    latency = results.pop("latency_s")
    return {
        "settings": {"requests": args.requests, "clients": args.clients, "big_mb": args.big_mb,
                     "half_open": args.half_open, "hidden": args.hidden, "positions": args.positions,
                     "read_timeout_s": args.read_timeout, "server_flags": args.server_flags, "cpus": os.cpu_count()},
        "load_seconds": load_s,
        "statuses": {str(k): v for k, v in sorted(results["statuses"].items())},
        "connection_errors": len(results["connection_errors"]),
        "connection_error_samples": results["connection_errors"][:5],
        "latency_p50_s": percentile(latency, 0.5), "latency_p95_s": percentile(latency, 0.95),
        "latency_max_s": max(latency) if latency else float("nan"),
        "probe_during_load": {"count": len(during), "max_s": max((p[1] for p in during), default=float("nan")),
                              "median_s": statistics.median([p[1] for p in during]) if during else float("nan"),
                              "statuses": sorted({p[2] for p in during}),
                              "answered_within_1s": sum(p[1] < 1.0 for p in during)},
        "probe_after_load_max_s": max(a[0] for a in after), "probe_after_load_statuses": sorted({a[1] for a in after}),
        "rss_before_mb": base_rss, "rss_peak_mb": max(rss) if rss else float("nan"),
        "oversized_body": results["oversized_body"], "huge_prompt": results["huge_prompt"],
        "half_open_closed_by_server": closed,
        "half_open_closed_after_s": {"min": min(closed_after, default=float("nan")),
                                     "max": max(closed_after, default=float("nan"))},
        "server_health": health,
    }


def table(report: dict[str, Any]) -> str:
    rows = [
        ("requests / clients", f"{report['settings']['requests']} / {report['settings']['clients']}"),
        ("load duration", f"{report['load_seconds']:.1f} s"),
        ("answers by status", ", ".join(f"{k}: {v}" for k, v in report["statuses"].items())),
        ("connection errors (resets, drops)", str(report["connection_errors"])),
        ("latency p50 / p95 / max", f"{report['latency_p50_s']:.3f} / {report['latency_p95_s']:.3f} / "
                                    f"{report['latency_max_s']:.3f} s"),
        ("probe during load: n, median, max", f"{report['probe_during_load']['count']}, "
                                              f"{report['probe_during_load']['median_s']:.3f} s, "
                                              f"{report['probe_during_load']['max_s']:.3f} s "
                                              f"(statuses {report['probe_during_load']['statuses']}; "
                                              f"{report['probe_during_load']['answered_within_1s']} within 1 s)"),
        ("probe after load: max", f"{report['probe_after_load_max_s']:.3f} s "
                                  f"(statuses {report['probe_after_load_statuses']})"),
        ("server RSS before / peak", f"{report['rss_before_mb']:.0f} / {report['rss_peak_mb']:.0f} MB"),
        (f"{report['settings']['big_mb']} MB body", f"HTTP {report['oversized_body'].get('status')} in "
                                                    f"{report['oversized_body']['seconds']:.2f} s"),
        ("10^6-token prompt", f"HTTP {report['huge_prompt'].get('status')} in "
                              f"{report['huge_prompt']['seconds']:.2f} s"),
        ("half-open connections closed", f"{report['half_open_closed_by_server']} of "
                                         f"{report['settings']['half_open']} after "
                                         f"{report['half_open_closed_after_s']['min']:.1f}-"
                                         f"{report['half_open_closed_after_s']['max']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 requests, 10 clients, a 20 MB body, 20 half-open")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--big-mb", type=int, default=50)
    parser.add_argument("--half-open", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--read-timeout", type=float, default=5.0)
    parser.add_argument("--server-flag", dest="server_flags", action="append", default=[],
                        help="extra flag for opd serve-teacher (repeat; e.g. --server-flag=--max-batch=1)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.clients, args.big_mb, args.half_open = 40, 10, 20, 20
    report = run(args)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    ok = (report["connection_errors"] == 0 and report["oversized_body"].get("status") == 413
          and report["huge_prompt"].get("status") == 400 and report["probe_after_load_max_s"] < 1.0
          and report["half_open_closed_by_server"] == args.half_open)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
