"""The limits of ``opd serve-teacher`` (apart from :mod:`opd.serve` so ``opd --help`` stays light)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ServerLimits:
    """What one server accepts; the defaults suit one CPU or GPU teacher behind opd's client."""

    max_body_bytes: int = 16 * 1024 * 1024  # a full-length token-id batch is a few MB
    max_queue: int = 64  # requests waiting or running; more get 429
    max_batch: int = 8  # sequences in one forward
    max_sequences: int = 256  # sequences (prompts x n) in one request
    request_timeout_s: float = 300.0  # body read + queue + compute
    idle_timeout_s: float = 5.0  # keep-alive connection with no request
    read_timeout_s: float = 30.0  # for a request's head to arrive, and again for its body
    max_connections: int = 1024  # open connections (and requests); more get 503
    backlog: int = 2048  # listen queue of the socket
