"""A fault-injecting HTTP proxy for testing opd against an unreliable teacher server.

It sits on 127.0.0.1 between opd and a served teacher and, request by request, either
forwards faithfully or injects one fault:

- ``timeout``: hold the request past the client's timeout, then drop it,
- ``http500`` / ``http503``: answer with a server error,
- ``drop``: close the connection without answering,
- ``truncate``: forward, but cut the JSON body in half,
- ``invalid_json``: answer 200 with a body that is not JSON,
- ``slow``: forward after a delay shorter than the client's timeout (must succeed),
- ``perturb``: forward, but add seeded Gaussian noise (``perturb_sigma`` nats) to every log-prob in
  the answer: a well-formed response whose numbers are not the model's (a replica that disagrees, a
  server that ignores the requested temperature) — what ``opd doctor``'s signal check must catch.

Faults follow a fixed cyclic ``schedule`` (deterministic tests) or are drawn with
``rates`` from a seeded generator. Usage from the command line::

    python -m opd.fault_proxy --target http://127.0.0.1:8000 --port 9000 --rates http500=0.1,drop=0.1
"""

from __future__ import annotations

import argparse
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("ok", "timeout", "http500", "http503", "drop", "truncate", "invalid_json", "slow", "perturb")


class FaultProxy:
    """Start with :meth:`start`, stop with :meth:`stop`; ``counts`` records what each request got."""

    def __init__(
        self,
        target: str,
        *,
        schedule: list[str] | None = None,
        rates: dict[str, float] | None = None,
        seed: int = 0,
        hold_s: float = 2.0,
        slow_s: float = 0.3,
        port: int = 0,
        perturb_sigma: float = 0.3,
    ) -> None:
        for name in (schedule or []) + list(rates or {}):
            if name not in FAULTS:
                raise ValueError(f"unknown fault {name!r}; choose from {', '.join(FAULTS)}")
        self.target = target.rstrip("/")
        self.schedule = list(schedule or [])
        self.rates = dict(rates or {})
        self.rng = random.Random(seed)
        self.hold_s, self.slow_s = hold_s, slow_s
        self.perturb_sigma = perturb_sigma
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._n = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _next_fault(self) -> str:
        with self._lock:
            if self.schedule:
                fault = self.schedule[self._n % len(self.schedule)]
            else:
                draw, fault = self.rng.random(), "ok"
                for name, rate in self.rates.items():
                    if draw < rate:
                        fault = name
                        break
                    draw -= rate
            self._n += 1
            self.counts[fault] += 1
            return fault

    def _forward(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        request = urllib.request.Request(self.target + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                fault = proxy._next_fault()
                if fault == "timeout":
                    time.sleep(proxy.hold_s)
                    self.close_connection = True
                    return
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault in ("http500", "http503"):
                    self._reply(int(fault[4:]), b'{"error": "injected fault"}')
                    return
                if fault == "invalid_json":
                    self._reply(200, b"<html>upstream error</html>")
                    return
                if fault == "slow":
                    time.sleep(proxy.slow_s)
                status, payload = proxy._forward(method, self.path, body, headers)
                if fault == "truncate":
                    payload = payload[: len(payload) // 2]
                if fault == "perturb" and status == 200:
                    payload = proxy._perturbed(payload)
                self._reply(status, payload)

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                self._handle("POST")

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

        return Handler

    def _perturbed(self, payload: bytes) -> bytes:
        """The answer with noise on every ``logprob`` value (prompt and sampled log-probs alike)."""
        import json

        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: (v + self.rng.gauss(0.0, self.perturb_sigma) if k == "logprob" and isinstance(v, float)
                            else walk(v)) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v) for v in node]
            return node

        with self._lock:
            return json.dumps(walk(json.loads(payload))).encode()

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description="fault-injecting proxy in front of a teacher server")
    parser.add_argument("--target", required=True, help="teacher server base URL")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rates", default="", help="fault=rate,... e.g. http500=0.1,drop=0.05")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rates = {k: float(v) for k, v in (item.split("=") for item in args.rates.split(",") if item)}
    proxy = FaultProxy(args.target, rates=rates, seed=args.seed, port=args.port).start()
    print(f"fault proxy on {proxy.url} -> {args.target}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.stop()


if __name__ == "__main__":
    main()
