"""Teachers: every kind answers ``score(batch) -> TeacherSignal`` (:mod:`opd.signal`).

What the teacher exposes decides how the divergence can be evaluated (design.md §2):

- :class:`LocalTeacher` — a white-box model: full next-token logits (``text`` kind: only writes answers);
- :class:`CrossTokenizerTeacher` — a white-box model with its own tokenizer: its logits on its own
  re-tokenisation of the completions, byte-aligned with the student's (ULD / GOLD);
- :class:`SelfTeacher` — the student shown privileged context (OPSD, SDFT): full logits;
- :class:`ServedTeacher` — an OpenAI-compatible server: sampled-token and top-k log-probs;
- :class:`RoutedTeacher` — several teachers, each row scored by the one its data names (MOPD);
- :class:`WithSignals` — any of the above plus extra signal sources: a frozen reference policy
  (:class:`ReferencePolicy`, G-OPD / ExOPD) or sequence rewards (a verifier, GAD's discriminator);
- :class:`NoTeacher` — objectives that need no teacher signal (SeqKD's cross-entropy).

The cached teacher lives in :mod:`opd.cache`. Besides ``score``, a teacher may ``generate`` answers
(off-policy teacher rollouts) and reports ``flops_per_token`` (0 when it runs elsewhere),
``scores_tokens`` and ``pop_stats()`` (request counters of remote teachers), all through
:class:`Teacher`'s defaults unless the kind has something to say.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import string
from collections.abc import Callable
from typing import Any

import torch

from opd.config import TeacherConfig
from opd.cpu_linear import OneDNNLinear
from opd.data import Example, render_chat
from opd.errors import DataError, ModelError
from opd.hooks import Hooks
from opd.models import completion_logits, load_causal_lm, load_tokenizer
from opd.rollout import SamplingParams, SequenceBatch, build_batch, hf_generate
from opd.serverpool import BadResponse, ServerError, ServerPool
from opd.signal import CrossTokenizerView, TeacherSignal, merge_rows


def check_same_tokenizer(student_tok: Any, teacher_tok: Any) -> None:
    """Refuse teacher/student pairs whose token ids mean different things.

    Token-level distillation compares distributions index by index, so the two
    vocabularies must be the same mapping (embedding rows beyond the tokenizer are
    handled by :func:`opd.models.shared_vocab_size`).
    """
    student_vocab = student_tok.get_vocab()
    teacher_vocab = teacher_tok.get_vocab()
    if student_vocab == teacher_vocab and student_tok.eos_token_id == teacher_tok.eos_token_id:
        return
    differing = sum(1 for tok, idx in student_vocab.items() if teacher_vocab.get(tok) != idx)
    raise ModelError(
        f"teacher and student tokenizers differ ({len(teacher_vocab)} vs {len(student_vocab)} tokens, "
        f"{differing} student tokens map to other ids"
        + ("" if student_tok.eos_token_id == teacher_tok.eos_token_id else ", different EOS")
        + "); token-level distillation needs one shared tokenizer — pick a teacher from the same family"
    )


def _row(example: Any) -> str:
    return example.where or f"prompt {example.prompt[:40]!r}"


def own_template_prompts(batch: SequenceBatch, teacher_tokenizer: Any, student_template: Any) -> list[list[int]] | None:
    """Chat prompts re-rendered with the teacher's own chat template, when it differs from the
    student's (same vocabulary, so completions stay as they are); None when nothing changes."""
    template = getattr(teacher_tokenizer, "chat_template", None)
    if template is None or template == student_template or batch.examples is None:
        return None
    if not any(e.messages for e in batch.examples):
        return None
    prompts = []
    for i, example in enumerate(batch.examples):
        if example.messages:
            text = render_chat(teacher_tokenizer, example.messages, _row(example), "teacher's chat template")
            prompts.append(teacher_tokenizer(text, add_special_tokens=False).input_ids)
        else:
            row = batch.input_ids_BT[i, : batch.prompt_len]
            prompts.append(row[batch.attention_mask_BT[i, : batch.prompt_len].bool()].tolist())
    return prompts


def _with_prompts(batch: SequenceBatch, prompts: list[list[int]], pad_id: int) -> SequenceBatch:
    lengths = batch.completion_mask_BC.sum(-1).long().tolist()
    completions = [batch.completion_ids_BC[i, :n].tolist() for i, n in enumerate(lengths)]
    return build_batch(prompts, completions, pad_id)  # same completions, so the same width C


class Teacher(abc.ABC):
    """Defaults every teacher kind shares; a kind overrides what it has to say."""

    name = "teacher"
    flops_per_token = 0.0  # estimated FLOPs of one scored token (0: unknown or spent elsewhere)
    scores_tokens = True  # whether score() evaluates the teacher on every completion token

    @abc.abstractmethod
    def score(self, batch: SequenceBatch) -> TeacherSignal:
        """The teacher's feedback on the batch's completions."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        raise DataError(f"{self.name} only scores rollouts; it cannot write off-policy answers")

    def pop_stats(self) -> dict[str, float]:
        """Counters since the last call (requests, retries, ... for remote teachers)."""
        return {}


class NoTeacher(Teacher):
    """For objectives that read no teacher signal (cross-entropy on teacher-written text)."""

    name = "no teacher"
    scores_tokens = False

    def score(self, batch: SequenceBatch) -> TeacherSignal:
        return TeacherSignal()


class LocalTeacher(Teacher):
    """A frozen local causal LM in its own dtype, scored without gradients.

    With ``student_tokenizer`` it is a text-only teacher with its own vocabulary: it talks to the
    student through text (prompts decoded with the student's tokenizer and re-encoded with its own,
    answers the other way round) and exposes nothing else.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str = "teacher",
                 student_tokenizer: Any | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.student_tokenizer = student_tokenizer
        self.student_template: Any = None  # set by from_config: the student's chat template
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.model.eval()
        self.model.requires_grad_(False)
        self.compute_dtype: torch.dtype | None = None  # set by compute_in: every call runs under autocast
        self.flops_per_token = 2.0 * sum(p.numel() for p in model.parameters())
        # True (set by the builder once opd.fused.check_fused passed): score() hands back final hidden
        # states + head, whose logits the loss forms a chunk at a time.
        self.fused = False

    def compute_in(self, dtype: torch.dtype) -> None:
        """Compute in ``dtype`` (``train.mixed_precision``): the weights of the plain linear layers are
        stored in it once, and every call of this teacher runs under autocast to it.

        Autocast would cast those weights to ``dtype`` on every forward anyway, so the logits are
        bit-identical to autocast over float32 weights; the per-call casts (~7 % of a SmolLM2-135M
        scoring forward on CPU) and half of the linear weights' memory are saved. Embeddings, norms
        and linear layers tied to the embeddings stay as they are, as under autocast.
        """
        tied = {id(p) for p in self.model.get_input_embeddings().parameters()}
        for module in self.model.modules():
            if (type(module) in (torch.nn.Linear, OneDNNLinear) and module.weight.dtype == torch.float32
                    and id(module.weight) not in tied):
                module.to(dtype)
        self.compute_dtype = dtype

    def precision(self) -> Any:
        """Autocast to the dtype set by :meth:`compute_in` (a no-op context before that)."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        device = next(self.model.parameters()).device
        return torch.autocast(device.type, dtype=self.compute_dtype)

    @classmethod
    def from_config(cls, cfg: TeacherConfig, student_tokenizer: Any, *, cpu_linear: str = "onednn",
                    own_vocabulary: bool = False) -> LocalTeacher:
        """Load ``cfg.model``. A teacher sharing the student's vocabulary must have the same tokenizer;
        ``own_vocabulary`` lets it have its own (text-only and cross-tokenizer teachers)."""
        if cfg.model is None:
            raise ModelError("teacher.model is not set")
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
        if not own_vocabulary:
            check_same_tokenizer(student_tokenizer, tokenizer)
        model = load_causal_lm(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                               attn_implementation=cfg.attn_implementation, cpu_linear=cpu_linear)
        teacher = cls(model, tokenizer, name=cfg.model, student_tokenizer=student_tokenizer if own_vocabulary else None)
        teacher.student_template = getattr(student_tokenizer, "chat_template", None)
        return teacher

    @torch.no_grad()
    def logits(self, batch: SequenceBatch) -> Any:
        """Teacher logits ``[B, C, V_teacher]`` at the positions predicting the completion (behind
        its own chat template when that differs from the student's) — or, when ``fused``, its final
        hidden states there with its head (:class:`opd.fused.HiddenLogits`, the same logits unmade)."""
        from opd.fused import completion_hidden

        device = next(self.model.parameters()).device
        prompts = own_template_prompts(batch, self.tokenizer, self.student_template)
        if prompts is not None:
            batch = _with_prompts(batch, prompts, self.tokenizer.pad_token_id or 0)
        forward = completion_hidden if self.fused else completion_logits
        with self.precision():
            return forward(self.model, batch.input_ids_BT.to(device), batch.attention_mask_BT.to(device),
                           batch.completion_len)

    def score(self, batch: SequenceBatch) -> TeacherSignal:
        return TeacherSignal(logits_BCV=self.logits(batch))

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Teacher samples as student token ids (re-tokenised through text for a text-only teacher)."""
        if self.student_tokenizer is None:
            with self.precision():
                return hf_generate(self.model, prompts, params, self.tokenizer)
        student_tok = self.student_tokenizer
        texts = student_tok.batch_decode(prompts, skip_special_tokens=True)
        teacher_prompts = [self.tokenizer(text).input_ids for text in texts]
        own = SamplingParams(params.max_new_tokens, params.temperature, params.top_p, params.top_k, params.greedy,
                             vocab_size=len(self.tokenizer))
        with self.precision():
            outs = hf_generate(self.model, teacher_prompts, own, self.tokenizer)
        answers = self.tokenizer.batch_decode(outs, skip_special_tokens=True)
        return [student_tok(text, add_special_tokens=False).input_ids[: params.max_new_tokens - 1]
                + [student_tok.eos_token_id] for text in answers]


class CrossTokenizerTeacher(LocalTeacher):
    """A white-box teacher with its own tokenizer (ULD, arXiv 2402.12030; GOLD): it scores its own
    re-tokenisation of each completion, aligned with the student's tokens by byte spans
    (:mod:`opd.cross_tokenizer`)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str = "teacher",
                 student_tokenizer: Any | None = None) -> None:
        super().__init__(model, tokenizer, name, student_tokenizer)
        if tokenizer.eos_token_id is None:
            raise ModelError(f"the teacher tokenizer of {name} has no EOS token, which cross-tokenizer "
                             "alignment pairs with the student's")
        self.matched: tuple[torch.Tensor, torch.Tensor] | None = None  # set with_matched_vocabulary

    def with_matched_vocabulary(self) -> CrossTokenizerTeacher:
        """Also hand over the ids of the token strings both vocabularies share (GOLD's hybrid)."""
        from opd.cross_tokenizer import matched_vocab

        self.matched = matched_vocab(self.student_tokenizer, self.tokenizer)
        return self

    @torch.no_grad()
    def score(self, batch: SequenceBatch) -> TeacherSignal:
        """Its logits ``[B, C_T, V_T]`` on the re-tokenised completions, those ids and the alignments."""
        from opd.cross_tokenizer import teacher_view

        lengths = batch.completion_mask_BC.sum(-1).long().tolist()
        prompts = [row[batch.attention_mask_BT[i, : batch.prompt_len].bool()].tolist()
                   for i, row in enumerate(batch.input_ids_BT[:, : batch.prompt_len])]
        completions = [batch.completion_ids_BC[i, :n].tolist() for i, n in enumerate(lengths)]
        view = teacher_view(self.student_tokenizer, self.tokenizer, prompts, completions)
        device = next(self.model.parameters()).device
        with self.precision():
            logits = completion_logits(self.model, view.input_ids_BT.to(device), view.attention_mask_BT.to(device),
                                       view.completion_len)
        return TeacherSignal(cross=CrossTokenizerView(logits, view.input_ids_BT[:, -view.completion_len :],
                                                      view.alignments, len(self.tokenizer), self.matched))


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a privileged-context template uses."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


class SelfTeacher(Teacher, Hooks):
    """The student itself, shown privileged context the student does not see.

    OPSD (arXiv 2601.18734) and SDFT (arXiv 2601.19897): the teacher is the same network
    conditioned on extra information — the reference answer, a demonstration, feedback —
    placed in its prompt by ``teacher.context_template`` (``{prompt}``, ``{answer}`` or any
    other field of the data row). It scores the student's rollout token by token under
    ``no_grad``, so no gradient flows through the teacher side. Its weights are the live
    student (``live``), a frozen copy of the initial student (``frozen``), or an exponential
    moving average of the student (``ema``, updated after every optimizer step).
    """

    def __init__(self, student: torch.nn.Module, tokenizer: Any, cfg: TeacherConfig) -> None:
        self.tokenizer = tokenizer
        self.template = cfg.context_template
        self.fields = template_fields(cfg.context_template)
        self.weights = cfg.self_weights
        self.ema_decay = cfg.ema_decay
        self.live = student
        self.name = f"self ({cfg.self_weights})"
        self.chat_template = getattr(tokenizer, "chat_template", None)
        if cfg.self_weights == "live":
            self.model = student
        else:
            self.model = copy.deepcopy(student)
            self.model.eval()
            self.model.requires_grad_(False)
        self.flops_per_token = 2.0 * sum(p.numel() for p in self.model.parameters())

    def _values(self, example: Example) -> dict[str, Any]:
        values = {**example.extra, "prompt": example.prompt, "answer": example.answer}
        missing = [name for name in self.fields if values.get(name) in (None, "")]
        if missing:
            raise DataError(f"prompt {example.prompt[:40]!r} has no `{missing[0]}`, which teacher.context_template "
                            "needs for the self-teacher's privileged context")
        return values

    def teacher_prompt_ids(self, example: Example) -> list[int]:
        """The teacher's prompt: for chat rows the template rewrites the last user turn
        (``{prompt}`` = its content) before the chat template is applied."""
        values = self._values(example)
        if example.messages:
            turns = [dict(m) for m in example.messages]
            last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
            turns[last_user]["content"] = self.template.format(**{**values, "prompt": turns[last_user]["content"]})
            text = render_chat(self.tokenizer, turns, _row(example), "self-teacher's chat template")
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer(self.template.format(**values)).input_ids

    def check(self, examples: list[Example]) -> None:
        """Fail before training if any row lacks a field the template needs."""
        for example in examples:
            self._values(example)

    @torch.no_grad()
    def score(self, batch: SequenceBatch) -> TeacherSignal:
        """Teacher logits ``[B, C, V]`` on the student's completions, behind the privileged prompts."""
        if batch.examples is None:
            raise DataError("the self-teacher needs the examples behind the batch")
        lengths = batch.completion_mask_BC.sum(-1).long().tolist()
        completions = [batch.completion_ids_BC[i, :n].tolist() for i, n in enumerate(lengths)]
        prompts = [self.teacher_prompt_ids(e) for e in batch.examples]
        view = build_batch(prompts, completions, self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            logits = completion_logits(self.model, view.input_ids_BT.to(device), view.attention_mask_BT.to(device),
                                       view.completion_len)
        finally:
            self.model.train(was_training)
        if logits.shape[1] < batch.completion_len:  # every row ended early: pad to the student's width
            pad = logits.new_zeros(logits.shape[0], batch.completion_len - logits.shape[1], logits.shape[2])
            logits = torch.cat([logits, pad], dim=1)
        return TeacherSignal(logits_BCV=logits)

    @torch.no_grad()
    def after_step(self, step: int = 0, stepped: bool = True) -> dict[str, float]:
        """EMA update ``theta_T <- d theta_T + (1 - d) theta_S`` after an optimizer step."""
        if self.weights == "ema" and stepped:
            for ema_param, param in zip(self.model.parameters(), self.live.parameters()):
                ema_param.lerp_(param.detach().to(ema_param.dtype), 1.0 - self.ema_decay)
        return {}

    def state_dict(self) -> dict[str, Any]:
        # The EMA weights are training state; frozen and live weights are not.
        return {"teacher_ema": self.model} if self.weights == "ema" else {}


TeacherServerError = ServerError  # the teacher server(s) could not be reached or kept answering wrongly
_BadResponse = BadResponse


class ServedTeacher(Teacher):
    """A teacher behind an OpenAI-compatible completions server (vLLM, ``opd serve-teacher``), or a pool
    of them (``teacher.url`` a list: requests go to the least busy healthy server, see
    :class:`opd.serverpool.ServerPool`).

    Sequences go out as token ids (no re-tokenisation drift) with ``prompt_logprobs: k``; the
    answer gives, per completion token, its log-prob and the teacher's top-k. Requests carry
    ``request_batch`` sequences each and run ``concurrency`` at a time. A timeout, a dropped
    connection, HTTP 429/5xx, a body that is not valid JSON or a response whose shape does not
    match the request (missing positions, missing tokens) is retried with exponential backoff;
    after ``max_retries`` retries the step fails with one line. Nothing is ever filled in or
    guessed, so no batch is silently mis-scored. The API key is read from the environment
    variable named by ``teacher.api_key_env`` and never logged or saved.
    """

    def __init__(self, cfg: TeacherConfig, student_tokenizer: Any, *, temperature: float = 1.0) -> None:
        import os

        if not cfg.url:
            raise ModelError("teacher.kind=served needs teacher.url (e.g. http://127.0.0.1:8000)")
        self.pool = ServerPool(cfg.url, what="teacher server",
                               api_key=os.environ.get(cfg.api_key_env) if cfg.api_key_env else None,
                               timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, backoff_s=cfg.backoff_s,
                               cooldown_s=cfg.server_cooldown_s, hint="raise teacher.max_retries / timeout_s")
        self.url = self.pool.url
        self.model_name = cfg.served_model or cfg.model or "default"
        self.name = f"{self.model_name} at {', '.join(self.pool.urls)}"
        self.top_k = cfg.top_k or 0
        self.concurrency = cfg.concurrency
        self.request_batch = cfg.request_batch
        self.tokenizer = student_tokenizer
        self.chat_template = getattr(student_tokenizer, "chat_template", None)
        # With teacher.tokenizer (a local copy of the served model's tokenizer), chat prompts are
        # rendered with the teacher's own template when it differs from the student's.
        self.teacher_tokenizer = None
        if cfg.tokenizer:
            self.teacher_tokenizer = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
            check_same_tokenizer(student_tokenizer, self.teacher_tokenizer)

    @property
    def stats(self) -> dict[str, float]:
        return self.pool.stats

    # -- transport -------------------------------------------------------------------------------
    def _request(self, body: dict[str, Any], check: Any) -> Any:
        """POST ``body`` to a server of the pool and return ``check(answer)``; transport errors, HTTP
        429/5xx and answers that fail ``check`` (raising BadResponse) are retried (:class:`ServerPool`)."""
        return self.pool.post("/v1/completions", body, check)

    def _map(self, fn: Any, chunks: list[Any]) -> list[Any]:
        return self.pool.map(fn, chunks, self.concurrency)

    # -- scoring ---------------------------------------------------------------------------------
    def _score_chunk(self, sequences: list[tuple[list[int], int]]) -> list[tuple[list[float], list[list[int]],
                                                                               list[list[float]]]]:
        """For (ids, first completion position) pairs: token log-probs and top-k per completion token."""
        k = self.top_k
        body = {"model": self.model_name, "prompt": [ids for ids, _ in sequences], "max_tokens": 1,
                "temperature": 1.0, "prompt_logprobs": k, "return_tokens_as_token_ids": True}

        def check(response: dict[str, Any]) -> list[Any]:
            choices = response.get("choices") if isinstance(response, dict) else None
            if not isinstance(choices, list) or len(choices) != len(sequences):
                raise _BadResponse(f"expected {len(sequences)} choices")
            out = []
            for choice, (ids, start) in zip(sorted(choices, key=lambda c: c.get("index", 0)), sequences):
                entries = choice.get("prompt_logprobs")
                if not isinstance(entries, list) or len(entries) != len(ids):
                    raise _BadResponse("prompt_logprobs do not cover the sequence")
                token_lp, top_ids, top_lp = [], [], []
                for pos in range(start, len(ids)):
                    entry = entries[pos]
                    if not isinstance(entry, dict) or str(ids[pos]) not in entry:
                        raise _BadResponse(f"no log-prob for token {ids[pos]} at position {pos}")
                    token_lp.append(float(entry[str(ids[pos])]["logprob"]))
                    ranked = sorted(((v["rank"], int(t), float(v["logprob"])) for t, v in entry.items()
                                     if v.get("rank") is not None and v["rank"] <= k))
                    if len(ranked) < k:
                        raise _BadResponse(f"{len(ranked)} of {k} top log-probs at position {pos}")
                    top_ids.append([t for _, t, _ in ranked[:k]])
                    top_lp.append([lp for _, _, lp in ranked[:k]])
                out.append((token_lp, top_ids, top_lp))
            return out

        return self._request(body, check)

    def score(self, batch: SequenceBatch) -> TeacherSignal:
        """The teacher's log-probs of the batch's completion tokens (and top-k)."""
        lengths = batch.completion_mask_BC.sum(-1).long().tolist()
        own = own_template_prompts(batch, self.teacher_tokenizer, self.chat_template) \
            if self.teacher_tokenizer is not None else None
        sequences = []
        for i, n in enumerate(lengths):
            if own is not None:
                prompt = own[i]
            else:
                row = batch.input_ids_BT[i, : batch.prompt_len]
                prompt = row[batch.attention_mask_BT[i, : batch.prompt_len].bool()].tolist()
            ids = prompt + batch.completion_ids_BC[i, :n].tolist()
            sequences.append((ids, len(ids) - n))
        chunks = [sequences[i : i + self.request_batch] for i in range(0, len(sequences), self.request_batch)]
        results = [r for chunk in self._map(self._score_chunk, chunks) for r in chunk]
        B, C, k = len(lengths), batch.completion_len, max(self.top_k, 1)
        token_lp = torch.zeros(B, C)
        top_lp = torch.zeros(B, C, k)
        top_ids = torch.zeros(B, C, k, dtype=torch.long)
        for i, (lp, ids, tops) in enumerate(results):
            n = len(lp)
            if n:
                token_lp[i, :n] = torch.tensor(lp)
                if self.top_k:
                    top_ids[i, :n] = torch.tensor(ids)
                    top_lp[i, :n] = torch.tensor(tops)
        return TeacherSignal(token_logprobs_BC=token_lp, topk_logprobs_BCK=top_lp if self.top_k else None,
                             topk_ids_BCK=top_ids if self.top_k else None)

    # -- generation (SeqKD, GAD's teacher text) -----------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id

        def run(chunk: list[list[int]]) -> list[list[int]]:
            body: dict[str, Any] = {"model": self.model_name, "prompt": chunk, "max_tokens": params.max_new_tokens,
                                    "temperature": 0.0 if params.greedy else params.temperature,
                                    "top_p": params.top_p, "return_token_ids": True}
            if params.top_k:
                body["top_k"] = params.top_k

            def check(response: dict[str, Any]) -> list[list[int]]:
                choices = response.get("choices") if isinstance(response, dict) else None
                if not isinstance(choices, list) or len(choices) != len(chunk):
                    raise _BadResponse(f"expected {len(chunk)} choices")
                outs = []
                for choice in sorted(choices, key=lambda c: c.get("index", 0)):
                    ids = choice.get("token_ids")
                    if not isinstance(ids, list):
                        raise _BadResponse("no token_ids in the answer (is return_token_ids supported?)")
                    ids = [int(t) for t in ids]
                    if choice.get("finish_reason") == "stop" and (not ids or ids[-1] != eos):
                        ids.append(eos)  # the server stopped at EOS without returning it
                    outs.append(ids[: params.max_new_tokens])
                return outs

            return self._request(body, check)

        chunks = [prompts[i : i + self.request_batch] for i in range(0, len(prompts), self.request_batch)]
        return [ids for chunk in self._map(run, chunks) for ids in chunk]

    def pop_stats(self) -> dict[str, float]:
        return self.pool.pop_stats("teacher")


def pop_teacher_stats(teachers: dict[str, Teacher]) -> dict[str, float]:
    """Every teacher's counters since the last call, ``teacher/NAME/...`` for named (routed) ones."""
    out: dict[str, float] = {}
    for name, teacher in teachers.items():
        for key, value in teacher.pop_stats().items():
            out[key.replace("teacher/", f"teacher/{name}/", 1) if name else key] = value
    return out


class RoutedTeacher(Teacher):
    """Several teachers, each row scored by the one its data names (MiMo's multi-teacher OPD, MOPD).

    Rows whose ``field`` is missing go to ``default``. Every row group is scored by its teacher,
    cut down to the form the objective reads (``form``: ``logits``, ``topk`` or
    ``token_logprobs``, see :meth:`TeacherSignal.restricted`), and the groups are merged back
    into one signal in batch order, so routing is one loss over the whole batch. ``route_B`` names
    each row's teacher; the objectives turn it into per-teacher token counts and signal sums.
    """

    def __init__(self, default: Teacher, named: dict[str, Teacher], field: str, form: str, **restrict: Any) -> None:
        self.default = default
        self.named = named
        self.field = field
        self.form = form
        self.restrict = restrict  # k, temperature, vocab_size, chunk_size of the restriction
        self.name = f"routed ({', '.join(named)})"
        self.flops_per_token = default.flops_per_token  # an estimate: all rows at the default's cost

    def route_of(self, example: Example) -> str:
        return str(example.extra.get(self.field) or "default")

    def score(self, batch: SequenceBatch) -> TeacherSignal:
        if batch.examples is None:
            raise DataError("routing needs the examples behind the batch")
        groups: dict[str, list[int]] = {}
        for row, example in enumerate(batch.examples):
            groups.setdefault(self.route_of(example), []).append(row)
        parts = []
        for route, rows in groups.items():
            sub = batch.select(rows)
            signal = self.named.get(route, self.default).score(sub)
            restricted = signal.restricted(self.form, sub.completion_ids_BC, sub.completion_mask_BC, **self.restrict)
            restricted.route_B = [route] * len(rows)
            parts.append((rows, restricted))
        return merge_rows(parts, len(batch.examples))



class WithSignals(Teacher):
    """A teacher plus further signal sources filling other fields of its signal (a frozen
    reference policy, a verifier's or discriminator's sequence rewards)."""

    def __init__(self, teacher: Teacher, sources: list[Any]) -> None:
        self.teacher = teacher
        self.sources = sources  # objects with add(batch, signal)
        self.name = teacher.name
        self.flops_per_token = teacher.flops_per_token
        self.scores_tokens = teacher.scores_tokens

    def score(self, batch: SequenceBatch) -> TeacherSignal:
        signal = self.teacher.score(batch)
        for source in self.sources:
            source.add(batch, signal)
        return signal

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        return self.teacher.generate(prompts, params)


class ReferencePolicy:
    """G-OPD / ExOPD's frozen reference policy p_ref (arXiv 2602.12125): the student's initial
    weights, scored like a local teacher into ``signal.reference``."""

    def __init__(self, reference: LocalTeacher) -> None:
        self.reference = reference

    def add(self, batch: SequenceBatch, signal: TeacherSignal) -> None:
        signal.reference = self.reference.score(batch)


class VerifierReward:
    """An outcome reward per sequence (KDRL, arXiv 2506.02208): the verifier's score of the decoded
    completion against the row's reference answer, into ``signal.rewards_B``."""

    def __init__(self, verifier: Callable[..., Any], tokenizer: Any) -> None:
        self.verifier = verifier
        self.tokenizer = tokenizer

    def add(self, batch: SequenceBatch, signal: TeacherSignal) -> None:
        from opd.verifiers import batch_rewards

        if batch.examples is None:
            raise DataError("a verifier needs the examples behind the batch")
        lengths = batch.completion_mask_BC.sum(-1).long().tolist()
        texts = self.tokenizer.batch_decode([batch.completion_ids_BC[i, :n].tolist() for i, n in enumerate(lengths)],
                                            skip_special_tokens=True)
        signal.rewards_B = torch.tensor(
            batch_rewards(self.verifier, [e.prompt for e in batch.examples], texts, [e.answer for e in batch.examples]),
            dtype=torch.float32,
        )
