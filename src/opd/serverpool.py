"""JSON over HTTP to one or several OpenAI-compatible servers (served teachers, rollout servers).

:class:`ServerPool` sends each request to the healthy server with the fewest requests in flight
(ties: the one used longest ago). A transport failure, HTTP 429/5xx or an answer that fails the
caller's check takes that server out for ``cooldown_s`` and the request is retried at once on
another healthy one; when none is left it waits (exponential backoff with jitter) and tries the
server that failed longest ago. After ``max_retries`` retries of one request the call fails with
one line. So a run survives losing all but one server, and a server that comes back is used again
after its cool-down. Other HTTP errors (400, 401, 404, 413, ...) are the request's fault and fail at
once, with the server's own message.

Nothing is filled in or guessed: a malformed answer is retried like a lost one, never used.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from opd.errors import ModelError


class ServerError(ModelError):
    """The servers could not be reached or kept answering wrongly."""


class BadResponse(Exception):
    """An answer that arrived but cannot be trusted (truncated, not JSON, wrong shape)."""


def retriable(status: int) -> bool:
    """Overload (429) and server faults (5xx) may pass; any other 4xx is the request's fault and
    would be refused again."""
    return status == 429 or 500 <= status <= 599


def error_message(exc: urllib.error.HTTPError) -> str:
    """The server's own words: ``error.message`` of an OpenAI-style JSON error, else the body's start."""
    try:
        raw = exc.read(64 * 1024)
    except OSError:
        return exc.reason or "(no body)"
    try:
        message = json.loads(raw)["error"]["message"]
        if isinstance(message, str):
            return " ".join(message.split())[:500]
    except (ValueError, KeyError, TypeError):
        pass
    return " ".join(raw[:300].decode(errors="replace").split()) or str(exc.reason)


class ServerPool:
    def __init__(self, urls: str | Sequence[str], *, what: str = "server", api_key: str | None = None,
                 timeout_s: float = 60.0, max_retries: int = 5, backoff_s: float = 0.5,
                 cooldown_s: float = 30.0, hint: str = "raise the retries / timeout") -> None:
        self.urls = [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls:
            raise ServerError(f"no {what} URL given")
        self.what = what
        self.api_key = api_key
        self.timeout = timeout_s
        self.max_retries = max_retries
        self.backoff = backoff_s
        self.cooldown = cooldown_s
        self.hint = hint
        self._lock = threading.Lock()
        self._in_flight = [0] * len(self.urls)
        self._down_until = [0.0] * len(self.urls)
        self._last_used = [0.0] * len(self.urls)
        self._jitter = random.Random(0)  # private: never touches the checkpointed global RNG
        self.stats = {"requests": 0.0, "retries": 0.0, "timeouts": 0.0, "http_errors": 0.0,
                      "connection_errors": 0.0, "bad_responses": 0.0}
        if len(self.urls) > 1:
            self.stats["servers_down"] = 0.0

    @property
    def url(self) -> str:
        return self.urls[0]

    def _pick(self) -> int | None:
        now = time.monotonic()
        healthy = [i for i in range(len(self.urls)) if self._down_until[i] <= now]
        if not healthy:
            return None
        return min(healthy, key=lambda i: (self._in_flight[i], self._last_used[i]))

    def post(self, path: str, body: dict[str, Any], check: Callable[[Any], Any]) -> Any:
        """POST ``body`` to ``path`` and return ``check(answer)`` (which raises :class:`BadResponse`
        for an answer it cannot trust)."""
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last, waits = "no attempt", 0
        for attempt in range(self.max_retries + 1):
            with self._lock:
                index = self._pick()
                delay = 0.0
                if index is None:  # every server is cooling down: back off, then the oldest failure
                    delay = self.backoff * 2 ** waits * (0.75 + 0.5 * self._jitter.random())
                    index = min(range(len(self.urls)), key=lambda i: self._down_until[i])
                    waits += 1
                if attempt:
                    self.stats["retries"] += 1
            if delay:
                time.sleep(delay)
            with self._lock:
                self.stats["requests"] += 1
                self._in_flight[index] += 1
                self._last_used[index] = time.monotonic()
            url = self.urls[index]
            try:
                request = urllib.request.Request(f"{url}{path}", data=payload, headers=headers)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                try:
                    answer = json.loads(raw)
                except ValueError:
                    raise BadResponse(f"invalid JSON ({len(raw)} bytes)") from None
                result = check(answer)
                with self._lock:
                    self._down_until[index] = 0.0
                return result
            except urllib.error.HTTPError as exc:
                if not retriable(exc.code):
                    raise ServerError(f"{self.what} {url} rejected the request: HTTP {exc.code}: "
                                      f"{error_message(exc)}") from None
                kind, last = "http_errors", f"HTTP {exc.code}"
            except TimeoutError:
                kind, last = "timeouts", f"no answer within {self.timeout:g}s"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, TimeoutError):
                    kind, last = "timeouts", f"no answer within {self.timeout:g}s"
                else:
                    kind, last = "connection_errors", f"{type(exc).__name__}: {reason}"
            except BadResponse as exc:
                kind, last = "bad_responses", str(exc)
            finally:
                with self._lock:
                    self._in_flight[index] -= 1
            with self._lock:
                self.stats[kind] += 1
                # A lone server is retried after a back-off; in a pool the others take over meanwhile.
                self._down_until[index] = time.monotonic() + (self.cooldown if len(self.urls) > 1 else 1e9)
                if len(self.urls) > 1:
                    self.stats["servers_down"] = float(sum(d > time.monotonic() for d in self._down_until))
        names = self.urls[0] if len(self.urls) == 1 else f"all {len(self.urls)} {self.what}s ({', '.join(self.urls)})"
        raise ServerError(f"{self.what} {names} failed {self.max_retries + 1} times in a row (last: {last}); "
                          f"check the server or {self.hint}")

    def pop_stats(self, prefix: str) -> dict[str, float]:
        with self._lock:
            out = {f"{prefix}/{k}": v for k, v in self.stats.items()}
            for key in self.stats:
                if key != "servers_down":
                    self.stats[key] = 0.0
        return out

    def map(self, fn: Callable[[Any], Any], items: list[Any], concurrency: int) -> list[Any]:
        """``fn`` over ``items`` with up to ``concurrency`` requests in flight, results in order."""
        if concurrency <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(fn, items))
