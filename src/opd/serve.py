"""``opd serve-teacher``: an OpenAI-compatible completions server for a local teacher.

It answers ``POST /v1/completions`` the way vLLM's OpenAI server does, so a teacher can be served
on a machine without vLLM (CPU boxes, tests) and opd's client and the official ``openai`` client
talk to both the same way:

- ``prompt``: token ids (one list or a list of lists) or strings (one or a list),
- ``prompt_logprobs: k`` (vLLM): per prompt position (``null`` first) a dict ``{"<id>": {"logprob",
  "rank", "decoded_token"}}`` holding the actual token and the top-k (raw log-probs, temperature 1),
- ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``n``: sampling (``max_tokens: 0``
  only scores); ``stop``: strings that end a completion (left out of its text),
- ``logprobs: k``: ``tokens``, ``token_logprobs``, ``top_logprobs`` and ``text_offset`` of each
  completion; with ``echo`` the prompt comes first in both the text and the log-probs (the first
  prompt token's log-prob is ``null``), so ``echo, max_tokens: 0, logprobs: 1`` scores a prompt,
- ``stream``: server-sent events, one per token (sent once the completion is computed),
- ``return_tokens_as_token_ids`` (tokens named ``"token_id:<id>"``), ``return_token_ids``.

Anything else the OpenAI API defines (``best_of``, ``suffix``, ``logit_bias``, penalties) is
answered with 400 unless it has its neutral value, as is any unknown field: nothing is silently
ignored. Plus ``GET /v1/models`` and ``GET /health``.

Limits (each a flag of ``opd serve-teacher``, see :class:`ServerLimits`): request bodies over
``max_body_bytes`` get 413, prompts past the model's positions 400, requests past a full queue
429, requests not done within ``request_timeout_s`` 503; connections that send no complete request
within ``read_timeout_s``, or sit idle for ``idle_timeout_s`` between requests, are closed. A
client that goes away cancels its request. Every malformed request gets 400 with a JSON error.
The model runs on one worker thread; queued requests with the same sampling settings are scored
and sampled together in padded batches of up to ``max_batch`` sequences.

It binds 127.0.0.1 unless told otherwise, and with ``--api-key-env NAME`` it requires
``Authorization: Bearer $NAME`` (the key is read from the environment, never from the command
line); listening on another address needs a key.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opd.errors import ConfigError
from opd.models import load_causal_lm, load_tokenizer
from opd.rollout import SamplingParams, hf_generate
from opd.serve_limits import ServerLimits

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BadRequest(ValueError):
    """A request the server will not run; answered with ``status`` and the message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``; ``prompt`` is checked by the backend (token ids need the
    vocabulary, and a long list is refused by its length before its elements are looked at)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str | None = None
    prompt: Any = None
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1)
    logprobs: int | None = Field(None, ge=0)
    prompt_logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    user: str | None = None  # the caller's end-user id: only for their own logs
    # OpenAI fields accepted only at their neutral value
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}" if err["type"] != "extra_forbidden" else f"{where}: not supported")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


@dataclasses.dataclass
class _Job:
    """One request's sequences on their way through the worker thread."""

    prompts: list[list[int]]  # one per choice (prompts repeated n times)
    max_tokens: int
    params: SamplingParams
    seed: int | None
    score_k: int | None  # top-k to score every position with; None: no scoring
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def key(self) -> tuple:
        """Jobs with equal keys are run in one batch: same sampling, and seeded jobs alone (their
        samples must not depend on what else was queued)."""
        if self.max_tokens == 0:
            return ("score",)
        p = self.params
        return ("generate", self.max_tokens, p.temperature, p.top_p, p.top_k, p.greedy,
                id(self) if self.seed is not None else None)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is gone (server shut down)
            pass


class _TimedOut(Exception):
    """A request that ran past its deadline (answered 503)."""


class _StopCancelled:
    """Stopping criterion: rows whose request was cancelled or ran out of time stop generating."""

    def __init__(self, rows: list[_Job]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        now = time.monotonic()
        done = [job.cancelled.is_set() or now > job.deadline for job in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class CompletionsBackend:
    """The model side: a worker thread that scores and samples queued requests in batches."""

    def __init__(self, model_dir: str, *, dtype: str = "float32", max_logprobs: int = 20,
                 name: str | None = None, limits: ServerLimits | None = None) -> None:
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self.name = name or model_dir
        self.max_logprobs = max_logprobs
        self.limits = limits or ServerLimits()
        self.vocab = len(self.tokenizer)
        output = self.model.get_output_embeddings()
        rows = output.weight.shape[0] if output is not None else self.model.config.vocab_size
        if rows < self.vocab:
            # Token ids past the output rows would have no log-prob: every score would be wrong.
            raise ConfigError(f"{model_dir}: the model has {rows} output rows but its tokenizer has {self.vocab} "
                              "tokens; refusing to serve a model that cannot score every token")
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.device = next(self.model.parameters()).device
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._decoded: dict[int, str] = {}
        self._queue: collections.deque[_Job] = collections.deque()
        self._ready = threading.Condition()
        self._worker: threading.Thread | None = None
        self.batches_run = 0  # forward batches, for tests of batching
        self.sequences_run = 0
        self.requests_cancelled = 0  # dropped (client gone, or out of time) before or while running

    # -- request checks (event loop side, before anything is queued) ------------------------------
    def _token_ids(self, prompt: Any, where: str) -> list[int]:
        limit = self.max_positions
        if limit is not None and len(prompt) > limit:
            raise BadRequest(f"{where}: {len(prompt)} tokens, more than the model's {limit} positions")
        for j, t in enumerate(prompt):
            if type(t) is not int:
                raise BadRequest(f"{where}[{j}]: token ids must be integers (got {json.dumps(t)[:40]})")
            if not 0 <= t < self.vocab:
                raise BadRequest(f"{where}[{j}]: token id {t} is outside the vocabulary [0, {self.vocab})")
        return list(prompt)

    def _text_ids(self, text: str, where: str) -> list[int]:
        limit = self.max_positions
        # Tokenising a huge text costs seconds of CPU; a text averaging over 64 characters per token
        # within the positions is implausible, so longer ones are refused unread.
        if limit is not None and len(text) > 64 * limit:
            raise BadRequest(f"{where}: {len(text)} characters, far more than the model's {limit} positions")
        return self.tokenizer(text).input_ids

    def prompts(self, prompt: Any) -> tuple[list[list[int]], list[str] | None]:
        """Token ids of each prompt and, for text prompts, the texts themselves."""
        if prompt == "" or (isinstance(prompt, list) and "" in prompt):
            raise BadRequest("prompt is empty")
        if isinstance(prompt, str):
            return [self._text_ids(prompt, "prompt")], [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("prompt must be a non-empty string, a list of token ids, or a list of either")
        if all(isinstance(p, str) for p in prompt):
            return [self._text_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)], list(prompt)
        if all(isinstance(p, list) for p in prompt):
            return [self._token_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)], None
        return [self._token_ids(prompt, "prompt")], None

    def check(self, req: CompletionRequest) -> tuple[list[list[int]], list[str] | None]:
        """The request's prompts as token ids (and texts, for text prompts), or :class:`BadRequest` for
        anything not served."""
        if req.best_of not in (None, req.n):
            raise BadRequest("best_of is not supported (leave it unset or equal to n)")
        if req.suffix:
            raise BadRequest("suffix is not supported")
        if req.logit_bias:
            raise BadRequest("logit_bias is not supported")
        if req.frequency_penalty or req.presence_penalty:
            raise BadRequest("frequency_penalty and presence_penalty are not supported")
        if req.stream_options is not None and not req.stream:
            raise BadRequest("stream_options needs stream: true")
        for label, value in (("prompt_logprobs", req.prompt_logprobs), ("logprobs", req.logprobs)):
            if value is not None and value > self.max_logprobs:
                raise BadRequest(f"{label} must be in [0, {self.max_logprobs}] (got {value})")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if any(not s for s in stops) or len(stops) > 16:
            raise BadRequest("stop must be up to 16 non-empty strings")
        prompts, texts = self.prompts(req.prompt)
        if len(prompts) * req.n > self.limits.max_sequences:
            raise BadRequest(f"{len(prompts)} prompts x n={req.n} is more than {self.limits.max_sequences} "
                             "sequences in one request (--max-sequences)")
        for i, ids in enumerate(prompts):
            if not ids:
                raise BadRequest(f"prompt {i} is empty")
            if self.max_positions is not None and len(ids) + req.max_tokens > self.max_positions:
                raise BadRequest(f"prompt {i} ({len(ids)} tokens) + max_tokens ({req.max_tokens}) is more than "
                                 f"the model's {self.max_positions} positions")
        return prompts, texts

    def job(self, req: CompletionRequest, prompts: list[list[int]], loop: asyncio.AbstractEventLoop,
            deadline: float) -> _Job:
        temperature = req.temperature
        params = SamplingParams(max_new_tokens=max(1, req.max_tokens),
                                temperature=temperature if temperature > 0 else 1.0, top_p=req.top_p,
                                top_k=max(0, req.top_k or 0), greedy=temperature == 0.0, vocab_size=self.vocab)
        wanted = [k for k in (req.prompt_logprobs, req.logprobs) if k is not None]
        return _Job(prompts=[p for p in prompts for _ in range(req.n)], max_tokens=req.max_tokens, params=params,
                    seed=req.seed, score_k=max(wanted) if wanted else None, deadline=deadline, loop=loop,
                    future=loop.create_future())

    # -- the worker thread ---------------------------------------------------------------------------
    def submit(self, job: _Job) -> None:
        with self._ready:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="opd-serve-model", daemon=True)
                self._worker.start()
            self._queue.append(job)
            self._ready.notify()

    def _take(self) -> list[_Job]:
        """The oldest job plus queued jobs that can share its forward passes."""
        with self._ready:
            while not self._queue:
                self._ready.wait()
            first = self._queue.popleft()
            jobs, size = [first], len(first.prompts)
            for other in list(self._queue):
                if size >= self.limits.max_batch:
                    break
                if other.key == first.key and size + len(other.prompts) <= self.limits.max_batch:
                    self._queue.remove(other)
                    jobs.append(other)
                    size += len(other.prompts)
            return jobs

    def _work(self) -> None:
        while True:
            jobs = self._take()
            now = time.monotonic()
            live = [j for j in jobs if not j.cancelled.is_set() and now <= j.deadline]
            self.requests_cancelled += len(jobs) - len(live)
            if not live:
                continue
            try:
                results = self._run(live)
            except Exception as exc:  # a model failure answers 500 to these requests, the server stays up
                for job in live:
                    job.finish(error=exc)
                continue
            for job, result in zip(live, results):
                if job.cancelled.is_set():
                    self.requests_cancelled += 1
                elif time.monotonic() > job.deadline:  # its rows may have been stopped short: not an answer
                    self.requests_cancelled += 1
                    job.finish(error=_TimedOut())
                else:
                    job.finish(result)

    @torch.no_grad()
    def _run(self, jobs: list[_Job]) -> list[tuple[list[list[int]], list[dict[str, torch.Tensor]] | None]]:
        rows = [(job, p) for job in jobs for p in job.prompts]
        gens: list[list[int]] = [[] for _ in rows]
        first = jobs[0]
        step = self.limits.max_batch
        if first.max_tokens == 1:
            return self._run_one_token(jobs, rows)
        if first.max_tokens > 0:
            with _seeded(first.seed):
                for start, chunk in _live_chunks(rows, step):
                    from transformers import StoppingCriteriaList

                    stop = StoppingCriteriaList([_StopCancelled([job for job, _ in chunk])])
                    gens[start : start + step] = hf_generate(self.model, [p for _, p in chunk], first.params,
                                                             self.tokenizer, stopping_criteria=stop)
                    self.batches_run += 1
                    self.sequences_run += len(chunk)
        scores: list[dict[str, torch.Tensor] | None] = [None] * len(rows)
        scored = [i for i, (job, _) in enumerate(rows) if job.score_k is not None and not job.cancelled.is_set()]
        for start in range(0, len(scored), step):
            index = scored[start : start + step]
            k = max(rows[i][0].score_k or 0 for i in index)
            for i, s in zip(index, self._score([rows[i][1] + gens[i] for i in index], k)):
                scores[i] = s
            self.batches_run += 1
            self.sequences_run += len(index)
        return _split_by_job(jobs, gens, scores)

    def _run_one_token(self, jobs: list[_Job], rows: list[tuple[_Job, list[int]]]) -> list[Any]:
        """``max_tokens: 1`` (how opd's client scores): the token is sampled from the last position of
        the scoring forward, so one forward serves both instead of ``generate`` plus a second pass."""
        first, step = jobs[0], self.limits.max_batch
        gens: list[list[int]] = [[] for _ in rows]
        scores: list[dict[str, torch.Tensor] | None] = [None] * len(rows)
        with _seeded(first.seed):
            for start, chunk in _live_chunks(rows, step):
                k = max(job.score_k or 0 for job, _ in chunk)
                for i, score in enumerate(self._score([p for _, p in chunk], k, sample=first.params), start):
                    gens[i] = [int(score.pop("sampled"))]
                    scores[i] = score
                self.batches_run += 1
                self.sequences_run += len(chunk)
        return _split_by_job(jobs, gens, scores)

    def _sample(self, logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """One token per row as ``generate`` picks it: argmax, or softmax(logits / T) after top-k and
        top-p filtering (transformers' own warpers, in generate's order)."""
        if params.greedy:
            return logits_BV.argmax(-1)
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        scores_BV = TemperatureLogitsWarper(params.temperature)(None, logits_BV.float())
        if params.top_k:
            scores_BV = TopKLogitsWarper(params.top_k)(None, scores_BV)
        if params.top_p < 1.0:
            scores_BV = TopPLogitsWarper(params.top_p)(None, scores_BV)
        return torch.multinomial(torch.softmax(scores_BV, dim=-1), num_samples=1)[:, 0]

    def _score(self, sequences: list[list[int]], k: int, sample: SamplingParams | None = None,
               ) -> list[dict[str, torch.Tensor]]:
        """Per sequence, for each position j >= 1: the log-prob of token j and its rank, and the top-k
        (raw log-probs, temperature 1), from one right-padded forward. With ``sample``, one more token
        is sampled from the last position (``"sampled"``) and scored as token ``len``."""
        width = max(len(s) for s in sequences)
        ids_BT = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask_BT = torch.zeros(len(sequences), width, dtype=torch.long)
        for i, s in enumerate(sequences):
            ids_BT[i, : len(s)] = torch.tensor(s)
            mask_BT[i, : len(s)] = 1
        out = []
        if width > 1 or sample is not None:
            ids_BT, mask_BT = ids_BT.to(self.device), mask_BT.to(self.device)
            positions_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
            logits_BTV = self.model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=positions_BT).logits
        if sample is not None:
            last_B = torch.tensor([len(s) - 1 for s in sequences], device=self.device)
            rows_B = torch.arange(len(sequences), device=self.device)
            sampled_B = self._sample(logits_BTV[rows_B, last_B, : self.vocab], sample)
            ids_BT = torch.cat([ids_BT, torch.full_like(ids_BT[:, :1], self.pad_id)], dim=1)
            ids_BT[rows_B, last_B + 1] = sampled_B
        for i, s in enumerate(sequences):
            n = len(s) - 1 + (sample is not None)
            if n == 0:
                empty = torch.zeros(0)
                out.append({"logprob": empty, "rank": empty.long(), "top_values": torch.zeros(0, k),
                            "top_ids": torch.zeros(0, k, dtype=torch.long)})
                continue
            lp_NV = torch.log_softmax(logits_BTV[i, :n, : self.vocab].float(), dim=-1)
            actual_N = ids_BT[i, 1 : n + 1]
            lp_N = lp_NV.gather(-1, actual_N[:, None])[:, 0]
            top = lp_NV.topk(min(k, self.vocab), dim=-1) if k > 0 else None
            out.append({"logprob": lp_N.cpu(), "rank": ((lp_NV > lp_N[:, None]).sum(-1) + 1).cpu(),
                        "top_values": top.values.cpu() if top is not None else torch.zeros(n, 0),
                        "top_ids": top.indices.cpu() if top is not None else torch.zeros(n, 0, dtype=torch.long)})
            if sample is not None:
                out[-1]["sampled"] = ids_BT[i, len(s)].item()
        return out

    # -- answers -------------------------------------------------------------------------------------
    def decoded(self, token: int) -> str:
        text = self._decoded.get(token)
        if text is None:
            text = self._decoded[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def _cut_at_stop(self, gen: list[int], stops: list[str]) -> tuple[list[int], str, str | None]:
        """The completion's tokens up to the one that completes the first stop string, its text without
        the stop string, and that string."""
        text = self.tokenizer.decode(gen, skip_special_tokens=True)
        if not stops:
            return gen, text, None
        hits = [(text.find(s), s) for s in stops if s in text]
        if not hits:
            return gen, text, None
        at, stop = min(hits)
        for m in range(1, len(gen) + 1):
            if len(self.tokenizer.decode(gen[:m], skip_special_tokens=True)) >= at + len(stop):
                return gen[:m], text[:at], stop
        return gen, text[:at], stop

    def respond(self, req: CompletionRequest, prompts: list[list[int]], texts: list[str] | None,
                result: tuple[list[list[int]], list[dict[str, torch.Tensor]] | None]) -> dict[str, Any]:
        gens, scores = result
        eos_ids = {self.tokenizer.eos_token_id}
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        name = (lambda t: f"token_id:{t}") if req.return_tokens_as_token_ids else self.decoded
        choices, completion_tokens = [], 0
        for index, raw in enumerate(gens):
            p = index // req.n
            prompt = prompts[p]
            gen, text, stop = self._cut_at_stop(raw, stops)
            completion_tokens += len(gen)
            finish = "stop" if stop is not None or (gen and gen[-1] in eos_ids) else "length"
            prefix = ""
            if req.echo:
                prefix = texts[p] if texts is not None else self.tokenizer.decode(prompt, skip_special_tokens=True)
                text = prefix + text
            choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None, "finish_reason": finish,
                                      "stop_reason": stop}
            if req.return_token_ids:
                choice["token_ids"] = gen
                choice["prompt_token_ids"] = prompt
            score = scores[index] if scores is not None else None
            if req.prompt_logprobs is not None and score is not None:
                choice["prompt_logprobs"] = self._prompt_logprobs(prompt, score, req.prompt_logprobs)
            echoed = prompt if req.echo else []
            offsets = None
            if req.stream or req.logprobs is not None:
                offsets = [min(o, len(prefix)) for o in self._offsets(echoed, 0)] + self._offsets(gen, len(prefix))
            if req.logprobs is not None and score is not None:
                choice["logprobs"] = self._logprobs(echoed, gen, len(prompt), score, req.logprobs, name, offsets)
            elif req.stream:
                choice["_offsets"] = offsets  # where the stream cuts the text into one event per token
            choices.append(choice)
        prompt_tokens = sum(len(p) for p in prompts)
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": "text_completion", "created": int(time.time()),
            "model": self.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    def _prompt_logprobs(self, seq: list[int], score: dict[str, torch.Tensor], k: int) -> list[dict | None]:
        lp, rank = score["logprob"].tolist(), score["rank"].tolist()
        top_v, top_i = score["top_values"][:, :k].tolist(), score["top_ids"][:, :k].tolist()
        entries: list[dict[str, Any] | None] = [None]
        for j in range(1, len(seq)):
            actual = seq[j]
            entry = {str(actual): {"logprob": lp[j - 1], "rank": rank[j - 1], "decoded_token": self.decoded(actual)}}
            for r, (value, tok) in enumerate(zip(top_v[j - 1], top_i[j - 1]), 1):
                entry.setdefault(str(tok), {"logprob": value, "rank": r, "decoded_token": self.decoded(tok)})
            entries.append(entry)
        return entries

    def _offsets(self, tokens: list[int], base: int) -> list[int]:
        """Where each token's text starts in the decoded text of ``tokens`` (plus ``base``): the end of the
        text up to it less its own piece, so a leading space or a joining space belongs to the token."""
        out, prev = [], 0
        for j in range(len(tokens)):
            end = len(self.tokenizer.decode(tokens[: j + 1], skip_special_tokens=True))
            piece = len(self.tokenizer.decode(tokens[j : j + 1], skip_special_tokens=True))
            prev = min(max(prev, end - piece), end)
            out.append(base + prev)
        return out

    def _logprobs(self, echoed: list[int], gen: list[int], prompt_len: int, score: dict[str, torch.Tensor],
                  k: int, name: Any, offsets: list[int]) -> dict[str, Any]:
        """OpenAI's ``logprobs`` object over the echoed prompt (first token: ``null``) and the completion."""
        lp, top_v, top_i = score["logprob"].tolist(), score["top_values"][:, :k].tolist(), \
            score["top_ids"][:, :k].tolist()
        tokens, token_lp, tops = [], [], []
        positions = list(range(len(echoed))) + list(range(prompt_len, prompt_len + len(gen)))
        for pos in positions:
            tok = echoed[pos] if pos < len(echoed) else gen[pos - prompt_len]
            tokens.append(tok)
            if pos == 0:  # nothing predicts the first token
                token_lp.append(None)
                tops.append(None)
                continue
            token_lp.append(lp[pos - 1])
            tops.append({name(t): v for v, t in zip(top_v[pos - 1], top_i[pos - 1])})
        return {"tokens": [name(t) for t in tokens], "token_logprobs": token_lp, "top_logprobs": tops,
                "text_offset": offsets}


def _error(status: int, message: str, kind: str = "BadRequestError", headers: dict | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


def _stream_events(answer: dict[str, Any], include_usage: bool) -> list[str]:
    """The answer as OpenAI's completion stream: per choice, one event per token (the echoed prompt
    first), then one with its finish reason; usage last when asked for; then ``[DONE]``."""
    head = {k: answer[k] for k in ("id", "object", "created", "model")}
    events = []
    for choice in answer["choices"]:
        logprobs = choice.get("logprobs")
        text = choice["text"]
        offsets = logprobs["text_offset"] if logprobs else choice.pop("_offsets")
        pieces: list[tuple[str, Any]] = []
        for j, start in enumerate(offsets):
            end = offsets[j + 1] if j + 1 < len(offsets) else len(text)  # the last piece takes the rest
            piece = text[min(start, len(text)) : min(end, len(text))]
            pieces.append((piece, {key: logprobs[key][j : j + 1] for key in logprobs} if logprobs else None))
        if not offsets and text:
            pieces.append((text, None))
        for piece, lp in pieces:
            events.append(json.dumps({**head, "choices": [{"index": choice["index"], "text": piece,
                                                             "logprobs": lp, "finish_reason": None}]}))
        events.append(json.dumps({**head, "choices": [{"index": choice["index"], "text": "", "logprobs": None,
                                                         "finish_reason": choice["finish_reason"],
                                                         "stop_reason": choice["stop_reason"]}]}))
    if include_usage:
        events.append(json.dumps({**head, "choices": [], "usage": answer["usage"]}))
    return [f"data: {e}\n\n" for e in events] + ["data: [DONE]\n\n"]


class _Authorise:
    """ASGI middleware: every request needs the API key (compared in constant time, so the key leaks
    nothing by timing)."""

    def __init__(self, app: Any, expected: bytes) -> None:
        self.app = app
        self.expected = expected

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _error(401, "invalid or missing API key", "unauthorized")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(backend: CompletionsBackend, api_key: str | None = None) -> Any:
    """The ASGI app: routes, authorisation, body and queue limits."""
    import anyio
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, StreamingResponse

    limits = backend.limits
    app = FastAPI(title="opd serve-teacher", docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {api_key}".encode() if api_key else None
    state = {"pending": 0}
    if expected is not None:
        app.add_middleware(_Authorise, expected=expected)

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Any:
        return _error(404, f"no route {request.method} {request.url.path}", "NotFoundError")

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc: Exception) -> Any:
        return _error(405, f"{request.method} is not allowed on {request.url.path}", "MethodNotAllowed")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Any:  # a bug answers JSON too (and is logged)
        return _error(500, f"{type(exc).__name__}: {str(exc)[:300]}", "InternalServerError")

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "requests_in_queue": state["pending"], "forward_batches": backend.batches_run,
                "sequences_run": backend.sequences_run, "requests_cancelled": backend.requests_cancelled}

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": backend.name, "object": "model", "owned_by": "opd",
                                            "max_model_len": backend.max_positions}]}

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit()):
            raise BadRequest("bad Content-Length")
        too_big = BadRequest(f"request body over {limits.max_body_bytes} bytes (--max-body-bytes)", 413)
        # A client that writes its whole body before reading sees the 413 only if the body is read
        # (dropped) first: closing on unread data resets the connection. Up to this much is drained.
        drain = 4 * limits.max_body_bytes + (1 << 20)
        if declared is not None and int(declared) > drain:
            raise too_big
        chunks, size = [], 0
        oversized = declared is not None and int(declared) > limits.max_body_bytes
        async for chunk in request.stream():
            size += len(chunk)
            if oversized or size > limits.max_body_bytes:
                oversized = True
                if size > drain:
                    break
                continue
            chunks.append(chunk)
        if oversized:
            raise too_big
        return b"".join(chunks)

    async def wait_disconnect(request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + limits.request_timeout_s
        try:
            with anyio.fail_after(limits.read_timeout_s):
                raw = await read_body(request)
        except TimeoutError:
            return _error(408, f"request body not received within {limits.read_timeout_s:g}s (--read-timeout)",
                          "Timeout", headers={"Connection": "close"})
        except ClientDisconnect:
            return _error(499, "client closed the request", "Cancelled")
        except BadRequest as exc:
            return _error(exc.status, str(exc), headers={"Connection": "close"} if exc.status == 413 else None)
        try:
            payload = await anyio.to_thread.run_sync(json.loads, raw) if len(raw) > 65536 else json.loads(raw)
        except (ValueError, RecursionError) as exc:
            return _error(400, f"body is not valid JSON: {str(exc)[:200]}")
        if not isinstance(payload, dict):
            return _error(400, f"body must be a JSON object, not {type(payload).__name__}")
        try:
            req = CompletionRequest.model_validate(payload)
            prompts, texts = await anyio.to_thread.run_sync(backend.check, req)
        except ValidationError as exc:
            return _error(400, _validation_message(exc))
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        if state["pending"] >= limits.max_queue:
            return _error(429, f"server busy: {state['pending']} requests queued (--max-queue)", "RateLimitError",
                          headers={"Retry-After": "1"})
        job = backend.job(req, prompts, loop, deadline)
        state["pending"] += 1
        watcher = asyncio.ensure_future(wait_disconnect(request))
        try:
            backend.submit(job)
            done, _ = await asyncio.wait({job.future, watcher}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if job.future not in done or isinstance(job.future.exception(), _TimedOut):
                job.cancelled.set()
                if watcher in done:  # nobody is left to answer
                    return _error(499, "client closed the request", "Cancelled")
                return _error(503, f"not done within {limits.request_timeout_s:g}s (--request-timeout)", "Timeout")
            result = job.future.result()
        except Exception as exc:
            return _error(500, f"{type(exc).__name__}: {str(exc)[:300]}", "InternalServerError")
        finally:
            state["pending"] -= 1
            job.cancelled.set()  # a no-op for finished jobs; drops queued ones of a vanished client
            watcher.cancel()
        answer = await anyio.to_thread.run_sync(backend.respond, req, prompts, texts, result)
        if req.stream:
            events = _stream_events(answer, bool(req.stream_options and req.stream_options.include_usage))

            async def send() -> AsyncIterator[str]:
                for event in events:
                    yield event

            return StreamingResponse(send(), media_type="text/event-stream")
        return JSONResponse(answer)

    return app


def _protocol_class(limits: ServerLimits) -> type:
    """uvicorn's h11 protocol plus a deadline on each request head, so connections that open and
    send nothing (or half a request line) are closed instead of held forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(limits.read_timeout_s, self._head_timeout)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _head_timeout(self) -> None:
            waiting_for_head = self.cycle is None or self.cycle.response_complete
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

    return Protocol


class ServerHandle:
    """A uvicorn server on a socket bound at creation (so the port is known at once), run with
    :meth:`serve_forever` (blocking, any thread) and stopped with :meth:`shutdown`."""

    def __init__(self, app: Any, host: str, port: int, limits: ServerLimits) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(limits.backlog)
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(app, http=_protocol_class(limits), lifespan="off", log_level="warning",
                                access_log=False, timeout_keep_alive=max(1, round(limits.idle_timeout_s)),
                                limit_concurrency=limits.max_connections, backlog=limits.backlog,
                                h11_max_incomplete_event_size=64 * 1024, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self.server.should_exit = True
        self._stopped.wait(30)

    def server_close(self) -> None:
        self.socket.close()


def make_server(backend: CompletionsBackend, host: str = "127.0.0.1", port: int = 0,
                api_key: str | None = None) -> ServerHandle:
    return ServerHandle(build_app(backend, api_key), host, port, backend.limits)


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32",
          api_key_env: str | None = None, max_logprobs: int = 20, limits: ServerLimits | None = None,
          log: Any = print) -> None:
    """Run until interrupted."""
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {api_key_env}: that environment variable is not set")
    if host not in LOOPBACK and not api_key:
        raise ConfigError(f"--host {host} would serve the model to other machines without a key; "
                          "set --api-key-env NAME (or bind 127.0.0.1)")
    backend = CompletionsBackend(model_dir, dtype=dtype, max_logprobs=max_logprobs, limits=limits)
    server = make_server(backend, host, port, api_key)
    where = f"http://{server.server_address[0]}:{server.server_address[1]}"
    lim = backend.limits
    log(f"serving {model_dir} at {where}/v1/completions" + (" (API key required)" if api_key else "")
        + f"; limits: body {lim.max_body_bytes} B, {backend.max_positions} positions, queue {lim.max_queue}, "
        f"batch {lim.max_batch}, request timeout {lim.request_timeout_s:g}s")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _split_by_job(jobs: list[_Job], gens: list[list[int]], scores: list[Any]) -> list[Any]:
    """The batch's rows handed back to the jobs they came from, in order."""
    out, at = [], 0
    for job in jobs:
        n = len(job.prompts)
        out.append((gens[at : at + n], scores[at : at + n] if job.score_k is not None else None))
        at += n
    return out


@contextlib.contextmanager
def _seeded(seed: int | None) -> Any:
    """A request's own seed for its sampling, without touching the server's global random state."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def _live_chunks(rows: list[tuple[_Job, list[int]]], step: int) -> Any:
    """``(start, rows[start:start + step])`` for every chunk some job still waits for."""
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        if not all(job.cancelled.is_set() or time.monotonic() > job.deadline for job, _ in chunk):
            yield start, chunk
