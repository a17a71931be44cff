"""``opd serve-teacher``: a small OpenAI-compatible completions server for a local teacher.

It answers ``POST /v1/completions`` the way vLLM's OpenAI server does for the fields opd
uses, so a teacher can be served on a machine without vLLM (CPU boxes, tests) and opd's
client talks to both the same way:

- ``prompt``: token ids (one list or a list of lists) or strings,
- ``prompt_logprobs: k``: per prompt position (``null`` first) a dict ``{"<id>": {"logprob",
  "rank", "decoded_token"}}`` holding the actual token and the top-k (raw log-probs,
  temperature 1, as vLLM returns them),
- ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``: sampling (``max_tokens: 0``
  only scores),
- ``logprobs: n`` with ``return_tokens_as_token_ids``: generated tokens as ``"token_id:<id>"``,
- ``return_token_ids``: ``token_ids`` of the generated tokens on each choice.

Plus ``GET /v1/models`` and ``GET /health``. It binds 127.0.0.1 unless told otherwise, and
with ``--api-key-env NAME`` it requires ``Authorization: Bearer $NAME`` (the key is read from
the environment, never from the command line).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from opd.models import load_causal_lm, load_tokenizer
from opd.rollout import SamplingParams, build_batch, hf_generate


class CompletionsBackend:
    """The model side: scoring and sampling for one request at a time."""

    def __init__(self, model_dir: str, *, dtype: str = "float32", max_logprobs: int = 20,
                 name: str | None = None) -> None:
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self.name = name or model_dir
        self.max_logprobs = max_logprobs
        self.vocab = len(self.tokenizer)
        self.lock = threading.Lock()

    def _prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.tokenizer(prompt).input_ids]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [list(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [self.tokenizer(p).input_ids for p in prompt]
        if isinstance(prompt, list) and prompt and all(
                isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
        raise ValueError("prompt must be a string, a list of token ids, or a list of either")

    def _decoded(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    @torch.no_grad()
    def _position_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Raw next-token log-probs ``[len - 1, V]`` for each sequence (position j predicts token j + 1)."""
        if any(not s for s in sequences):
            raise ValueError("empty prompt")
        batch = build_batch([s[:1] for s in sequences], [s[1:] for s in sequences], self.tokenizer.pad_token_id
                            if self.tokenizer.pad_token_id is not None else 0)
        device = next(self.model.parameters()).device
        ids, mask = batch.input_ids_BT.to(device), batch.attention_mask_BT.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = []
        for i, seq in enumerate(sequences):
            n = len(seq) - 1
            # first real token sits at column prompt_len - 1; its successors follow
            start = batch.prompt_len - 1
            out.append(torch.log_softmax(logits[i, start : start + n, : self.vocab].float(), dim=-1))
        return out

    def _prompt_logprobs(self, seq: list[int], logprobs_NV: torch.Tensor, k: int) -> list[dict[str, Any] | None]:
        entries: list[dict[str, Any] | None] = [None]
        if k > 0:
            top = logprobs_NV.topk(min(k, self.vocab), dim=-1)
        for j in range(1, len(seq)):
            row = logprobs_NV[j - 1]
            actual = seq[j]
            value = float(row[actual])
            entry = {str(actual): {"logprob": value, "rank": int((row > row[actual]).sum()) + 1,
                                   "decoded_token": self._decoded(actual)}}
            if k > 0:
                for rank, (lp, tok) in enumerate(zip(top.values[j - 1].tolist(), top.indices[j - 1].tolist()), 1):
                    entry.setdefault(str(tok), {"logprob": lp, "rank": rank, "decoded_token": self._decoded(tok)})
            entries.append(entry)
        return entries

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        prompts = self._prompts(body.get("prompt"))
        max_tokens = int(body.get("max_tokens", 16))
        prompt_k = body.get("prompt_logprobs")
        gen_k = body.get("logprobs")
        for label, value in (("prompt_logprobs", prompt_k), ("logprobs", gen_k)):
            if value is not None and not 0 <= int(value) <= self.max_logprobs:
                raise ValueError(f"{label} must be in [0, {self.max_logprobs}] (got {value})")
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        temperature = float(body.get("temperature", 1.0))
        params = SamplingParams(
            max_new_tokens=max(1, max_tokens), temperature=temperature if temperature > 0 else 1.0,
            top_p=float(body.get("top_p", 1.0)), top_k=max(0, int(body.get("top_k") or 0)),
            greedy=temperature == 0.0, vocab_size=self.vocab,
        )
        with self.lock:
            generated: list[list[int]] = [[] for _ in prompts]
            if max_tokens > 0:
                devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
                with torch.random.fork_rng(devices=devices):
                    if body.get("seed") is not None:
                        torch.manual_seed(int(body["seed"]))
                    generated = hf_generate(self.model, prompts, params, self.tokenizer)
            need_scores = prompt_k is not None or gen_k is not None
            scores = self._position_logprobs([p + g for p, g in zip(prompts, generated)]) if need_scores else None
        choices = []
        for i, (prompt, gen) in enumerate(zip(prompts, generated)):
            eos_ids = {self.tokenizer.eos_token_id}
            choice: dict[str, Any] = {
                "index": i,
                "text": self.tokenizer.decode(gen, skip_special_tokens=True),
                "logprobs": None,
                "finish_reason": "stop" if gen and gen[-1] in eos_ids else "length",
                "stop_reason": None,
            }
            if body.get("return_token_ids"):
                choice["token_ids"] = gen
                choice["prompt_token_ids"] = prompt
            if prompt_k is not None:
                choice["prompt_logprobs"] = self._prompt_logprobs(prompt, scores[i][: len(prompt) - 1], int(prompt_k))
            if gen_k is not None and gen:
                rows = scores[i][len(prompt) - 1 : len(prompt) - 1 + len(gen)]
                name = (lambda t: f"token_id:{t}") if as_ids else self._decoded
                tops = rows.topk(min(int(gen_k), self.vocab), dim=-1) if int(gen_k) > 0 else None
                choice["logprobs"] = {
                    "tokens": [name(t) for t in gen],
                    "token_logprobs": [float(rows[j, t]) for j, t in enumerate(gen)],
                    "top_logprobs": [
                        {name(t): lp for lp, t in zip(tops.values[j].tolist(), tops.indices[j].tolist())}
                        if tops is not None else {} for j in range(len(gen))],
                    "text_offset": [],
                }
            choices.append(choice)
        completion_tokens = sum(len(g) for g in generated)
        prompt_tokens = sum(len(p) for p in prompts)
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": "text_completion", "created": int(time.time()),
            "model": self.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


def make_server(backend: CompletionsBackend, host: str = "127.0.0.1", port: int = 0,
                api_key: str | None = None) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            if api_key is None:
                return True
            if self.headers.get("Authorization") == f"Bearer {api_key}":
                return True
            self._send(401, {"error": {"message": "invalid or missing API key", "type": "unauthorized"}})
            return False

        def do_GET(self) -> None:  # noqa: N802
            if not self._authorised():
                return
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": backend.name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorised():
                return
            if self.path != "/v1/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                self._send(200, backend.complete(body))
            except (ValueError, KeyError, TypeError) as exc:
                self._send(400, {"error": {"message": str(exc), "type": "BadRequestError"}})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32",
          api_key_env: str | None = None, max_logprobs: int = 20, log: Any = print) -> None:
    """Run until interrupted."""
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            from opd.errors import ConfigError

            raise ConfigError(f"--api-key-env {api_key_env}: that environment variable is not set")
    backend = CompletionsBackend(model_dir, dtype=dtype, max_logprobs=max_logprobs)
    server = make_server(backend, host, port, api_key)
    where = f"http://{server.server_address[0]}:{server.server_address[1]}"
    log(f"serving {model_dir} at {where}/v1/completions" + (" (API key required)" if api_key else ""))
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: listening on {host}, reachable from other machines")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
