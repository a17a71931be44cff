"""``rollout.engine=vllm_server``: student rollouts from a vLLM OpenAI server shared by every trainer rank.

The server holds its own copy of the student. opd starts it (``python -m vllm.entrypoints.openai.api_server``
on 127.0.0.1, the student's checkpoint, ``--logprobs-mode processed_logprobs``, the
:mod:`opd.vllm_worker` extension, the API key from ``rollout.api_key_env`` when set) or reaches one at
``rollout.url``. Every rank sends its prompts itself, one request per sample with its own seed drawn
from opd's RNG (so the samples are opd's to reproduce), and gets back the token ids and the log-prob
of each under the distribution it was drawn from (after temperature / top-k / top-p), which the
objectives use as ``pi_sampler``.

**Weight push** (every ``rollout.weight_sync_every`` steps, and once at start, after a resume):
every rank takes part in gathering the student's full weights (FSDP / ZeRO shards are all-gathered;
a LoRA student is merged), rank 0 writes them as safetensors into ``/dev/shm``, asks the server to
load them through ``/collective_rpc`` → ``opd_load_weights`` (which checks every name and shape before
touching the model), resets the prefix cache (mandatory: cached KV blocks of prompts longer than one
block were computed with the old weights), and then the other ranks are released. This is vLLM's
same-host path; across hosts a user would point ``rollout.url`` at a server started with vLLM's NCCL
weight transfer (``--weight-transfer-config '{"backend": "nccl"}'``, GPU only), see docs/scaling.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import torch

from opd.errors import ModelError
from opd.hooks import Hooks
from opd.rollout import SamplingParams, truncate_at_eos
from opd.serverpool import BadResponse, ServerPool

SERVED_NAME = "opd-student"


class VLLMServerSampler(Hooks):
    """The student's sampler when ``rollout.engine=vllm_server`` (see the module docstring)."""

    def __init__(self, cfg: Any, *, model_dir: str, tokenizer: Any, eos_ids: list[int], output_rows: int,
                 max_model_len: int, dtype: str, accelerator: Any, log: Any = None) -> None:
        self.cfg = cfg
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.output_rows = output_rows
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.accelerator = accelerator
        self.log = log
        self.api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.process: Any = None  # the server opd started (rank 0)
        self.pool: ServerPool | None = None
        self.served_name = cfg.served_model or SERVED_NAME
        self.masked_vocab = False  # whether the server itself never samples embedding padding rows
        self.student: Any = None  # opd.parallel.StudentWeights, set by start()
        self.version = 0  # optimizer step of the weights the server holds
        self.pushes_on_its_own = True  # False when asynchronous rollouts decide when to push
        self.last_sync_s = 0.0

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self, student: Any = None) -> None:
        self.student = student
        url = self.cfg.url
        if url is None and self.accelerator.is_main_process:
            url = self._launch()
        url = _broadcast(url)
        self.pool = ServerPool(url, what="rollout server", api_key=self.api_key,
                               timeout_s=self.cfg.server_timeout_s, max_retries=self.cfg.server_retries,
                               backoff_s=0.5, hint="raise rollout.server_timeout_s / server_retries")
        if self.cfg.url is not None:
            self.served_name = self.cfg.served_model or self._first_model()
        self.push(getattr(student, "step", 0))

    def _launch(self) -> str:
        from opd.vllm_engine import start_vllm_server

        started = time.perf_counter()
        args = ["--served-model-name", SERVED_NAME, "--logprobs-mode", "processed_logprobs",
                "--worker-extension-cls", "opd.vllm_worker.WeightPush", "--max-model-len", str(self.max_model_len),
                *(["--api-key", self.api_key] if self.api_key else []), *self.cfg.server_args]
        self.process, url = start_vllm_server(self.model_dir, timeout_s=self.cfg.server_start_timeout_s,
                                              extra_args=args, dtype=self.dtype,
                                              kv_cache_gb=max(1, round(self.cfg.vllm_kv_cache_gb)),
                                              cpus=self.cfg.server_cpus)
        self.masked_vocab = True  # start_vllm_server installs the padding-row mask when the model has them
        if self.log is not None:
            self.log(f"vllm rollout server ({self.dtype}) at {url} ready in {time.perf_counter() - started:.0f}s; "
                     f"weights pushed every {self.cfg.weight_sync_every} step(s)")
        return url

    def _first_model(self) -> str:
        import json
        import urllib.request

        assert self.pool is not None
        request = urllib.request.Request(f"{self.pool.url}/v1/models",
                                         headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(json.loads(response.read())["data"][0]["id"])

    def close(self) -> None:
        if self.process is not None:
            from opd.vllm_engine import stop_vllm_server

            stop_vllm_server(self.process)
            self.process = None

    # -- weights -------------------------------------------------------------------------------------
    def push(self, step: int) -> float:
        """The student's current weights into the server (a collective: every rank calls it)."""
        started = time.perf_counter()
        state = self.student.hf_state_dict() if self.student is not None else None
        if self.accelerator.is_main_process:
            if state is None:
                raise ModelError("the rollout server needs the student's weights to push")
            from safetensors.torch import save_file

            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            folder = tempfile.mkdtemp(prefix="opd-push-", dir=shm)
            try:
                # clone: safetensors refuses tensors sharing memory (tied embeddings)
                save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()},
                          os.path.join(folder, "model.safetensors"))
                self._control("/collective_rpc", {"method": "opd_load_weights", "kwargs": {"path": folder}})
                answer = self._control("/reset_prefix_cache", None)
                if isinstance(answer, dict) and answer.get("success") is False:
                    raise ModelError("the rollout server refused to reset its prefix cache after a weight push "
                                     "(requests still running)")
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # the other ranks sample only once the new weights are in
        self.version = step
        self.last_sync_s = time.perf_counter() - started
        return self.last_sync_s

    def _control(self, path: str, body: Any) -> Any:
        assert self.pool is not None

        def check(answer: Any) -> Any:
            return answer

        return self.pool.post(path, body if body is not None else {}, check)

    def after_step(self, step: int, stepped: bool) -> dict[str, float]:
        if self.pushes_on_its_own and step % self.cfg.weight_sync_every == 0:
            self.push(step)
        return {"perf/weight_sync_s": self.last_sync_s}

    # -- sampling ------------------------------------------------------------------------------------
    def sample(self, student: torch.nn.Module, prompts: list[list[int]], params: SamplingParams,
               generator: torch.Generator | None = None) -> tuple[list[list[int]], list[list[float]], dict[str, float]]:
        if not prompts:
            return [], [], {}
        assert self.pool is not None, "the rollout server was not started"
        # One request and one seed per sample, drawn from opd's RNG: the samples are opd's to reproduce.
        seeds = [None] * len(prompts) if params.greedy else \
            torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        restrict = params.vocab_size is not None and params.vocab_size < self.output_rows and not self.masked_vocab
        eos = set(self.eos_ids)

        def one(item: tuple[list[int], int | None]) -> tuple[list[int], list[float]]:
            prompt, seed = item
            body: dict[str, Any] = {
                "model": self.served_name, "prompt": [int(t) for t in prompt], "max_tokens": params.max_new_tokens,
                "temperature": 0.0 if params.greedy else params.temperature, "top_p": params.top_p,
                "top_k": params.top_k if params.top_k > 0 else -1, "logprobs": 0, "return_token_ids": True,
                "return_tokens_as_token_ids": True, "skip_special_tokens": False, "stop_token_ids": self.eos_ids,
            }
            if seed is not None:
                body["seed"] = int(seed)
            if restrict:
                body["allowed_token_ids"] = list(range(int(params.vocab_size)))  # per request: slower

            def check(answer: Any) -> tuple[list[int], list[float]]:
                try:
                    choice = answer["choices"][0]
                    ids = [int(t) for t in choice["token_ids"]]
                    lps = [float(x) for x in choice["logprobs"]["token_logprobs"]]
                except (KeyError, IndexError, TypeError, ValueError):
                    raise BadResponse("no token_ids / token_logprobs in the answer") from None
                if len(lps) != len(ids):
                    raise BadResponse(f"{len(lps)} log-probs for {len(ids)} tokens")
                ids = truncate_at_eos(ids, eos)
                return ids, lps[: len(ids)]

            return self.pool.post("/v1/completions", body, check)

        results = self.pool.map(one, list(zip(prompts, seeds)), self.cfg.request_concurrency)
        return [r[0] for r in results], [r[1] for r in results], {"rollout/weight_version": float(self.version)}


def _broadcast(value: Any) -> Any:
    """``value`` from rank 0 on every rank (itself when there is one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
            torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
