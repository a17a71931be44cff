"""Prompt datasets: JSONL / Parquet / ``datasets`` sources rendered into token ids.

Each row holds either a plain ``prompt`` string or chat ``messages`` (rendered with
the tokenizer's chat template and a generation prompt), and optionally a reference
``answer``. Field names are configurable (:class:`opd.config.DataConfig`).

Sequence format used throughout opd: ``prompt_ids = tokenizer(prompt).input_ids``
(special tokens as the tokenizer adds them), ``completion_ids =
tokenizer(answer, add_special_tokens=False).input_ids + [eos]``.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd.config import DataConfig
from opd.errors import DataError


@dataclass
class Example:
    """One prompt, tokenised, with its optional reference answer."""

    prompt: str
    prompt_ids: list[int]
    answer: str | None = None
    answer_ids: list[int] | None = None  # reference completion incl. EOS
    extra: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] | None = None  # chat turns of the prompt (without a trailing answer)
    where: str | None = None  # the row it came from (`file:line`), for errors found after loading


@dataclass
class LoadReport:
    rows: int = 0
    kept: int = 0
    skipped_overlong: int = 0
    truncated: int = 0


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    try:
        with path.open("rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{lineno}: line is not valid UTF-8") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
                rows.append((f"{path}:{lineno}", row))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    return rows


def _numbered(source: str, rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{source}: row {i}", row) for i, row in enumerate(rows, start=1)]


def _read_rows(source: str, split: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows with a location string (``file:line`` for JSONL, ``source: row N`` otherwise)."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path)
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{path}: file is not valid UTF-8") from None
            except json.JSONDecodeError:
                return _read_jsonl(path)  # JSON Lines saved as .json (e.g. datasets' to_json)
            if isinstance(data, list) and all(isinstance(r, dict) for r in data):
                return _numbered(str(path), data)
            raise DataError(f"{path}: a .json file must hold a list of objects or JSON Lines")
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                return _numbered(str(path), pq.read_table(path).to_pylist())
            except Exception as exc:  # pyarrow raises several unrelated types
                raise DataError(f"{path}: cannot read Parquet ({exc})") from None
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"{path}: not a saved `datasets` directory ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r}; available: {', '.join(ds)}")
            ds = ds[split]
        return _numbered(str(path), ds.to_list())
    if source.endswith((".jsonl", ".json", ".parquet", ".ndjson")) or "/" not in source:
        raise DataError(f"data file {source} does not exist")
    import datasets

    try:
        return _numbered(source, datasets.load_dataset(source, split=split).to_list())
    except Exception as exc:
        raise DataError(f"cannot load dataset {source!r} split {split!r}: {str(exc).splitlines()[0]}") from None


def chat_template_source(tokenizer: Any) -> str:
    """Where the tokenizer's chat template was read from: the file in its folder, else its hub id."""
    origin = str(getattr(tokenizer, "name_or_path", "") or "")
    folder = Path(origin) if origin else None
    if folder is not None and folder.is_dir():
        for name in ("chat_template.jinja", "chat_template.json"):
            if (folder / name).is_file():
                return str(folder / name)
        config = folder / "tokenizer_config.json"
        if config.is_file() and '"chat_template"' in config.read_text(encoding="utf-8", errors="replace"):
            return str(config)
    return f"of {origin}" if origin else "(set in code)"


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], where: str, whose: str = "chat template") -> str:
    """``messages`` through the tokenizer's chat template with a generation prompt. A template that raises
    (``raise_exception('Unknown role: ...')``, a missing key, a syntax error) names the row, the template's
    file and the template line, as :class:`DataError`."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:
        # jinja maps errors onto the template's own lines: frames named "<template>" (or a syntax error's lineno)
        lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == "<template>"]
        line = lines[-1] if lines else getattr(exc, "lineno", None)
        at = f" (line {line})" if line else ""
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{where}: the {whose} {chat_template_source(tokenizer)}{at} failed on this row: "
                        f"{message}") from None


def render_prompt(row: dict[str, Any], cfg: DataConfig, tokenizer: Any, where: str) -> tuple[str, str | None]:
    """The prompt text the model sees, and the answer taken from a trailing assistant turn.

    Chat ``messages`` go through the tokenizer's chat template with a generation prompt;
    a final assistant message is the reference answer, not part of the prompt.
    """
    if cfg.messages_field in row and row[cfg.messages_field] is not None:
        messages = row[cfg.messages_field]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DataError(f"{where}: `{cfg.messages_field}` must be a list of {{role, content}} objects")
        answer = None
        if messages and messages[-1]["role"] == "assistant":
            answer = str(messages[-1].get("content") or "") or None
            messages = messages[:-1]
        if not messages:
            raise DataError(f"{where}: `{cfg.messages_field}` has no prompt turn")
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{where}: chat `messages` given but the tokenizer has no chat template")
        return render_chat(tokenizer, messages, where), answer
    if cfg.prompt_field not in row:
        raise DataError(f"{where}: missing field `{cfg.prompt_field}` (or `{cfg.messages_field}`)")
    prompt = row[cfg.prompt_field]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: `{cfg.prompt_field}` must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise DataError(f"{where}: `{cfg.prompt_field}` is empty")
    return prompt, None


def load_examples(
    source: str, cfg: DataConfig, tokenizer: Any, *, limit: int | None = None, need_answers: bool = False,
    why: str = "needed by this recipe",
) -> tuple[list[Example], LoadReport]:
    """Read ``source`` and tokenise every row; raises :class:`DataError` with file and row (``why`` says
    what a missing reference answer is needed for, when ``need_answers``)."""
    rows = _read_rows(source, cfg.split)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"{source}: the dataset is empty")
    report = LoadReport(rows=len(rows))
    examples: list[Example] = []
    for where, row in rows:
        prompt, chat_answer = render_prompt(row, cfg, tokenizer, where)
        has_template_bos = cfg.messages_field in row and row[cfg.messages_field] is not None
        prompt_ids = tokenizer(prompt, add_special_tokens=not has_template_bos).input_ids
        if len(prompt_ids) > cfg.max_prompt_tokens:
            if cfg.overlong == "skip":
                report.skipped_overlong += 1
                continue
            prompt_ids = prompt_ids[-cfg.max_prompt_tokens :]
            report.truncated += 1
        answer = row.get(cfg.answer_field)
        if answer is None:
            answer = chat_answer
        if answer is not None and not isinstance(answer, str):
            answer = str(answer)
        if need_answers and not answer:
            raise DataError(f"{where}: missing reference `{cfg.answer_field}` ({why})")
        answer_ids = None
        if answer:
            answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        extra = {k: v for k, v in row.items() if k not in (cfg.prompt_field, cfg.messages_field, cfg.answer_field)}
        messages = None
        if has_template_bos:
            turns = list(row[cfg.messages_field])
            messages = turns[:-1] if turns and turns[-1]["role"] == "assistant" else turns
        examples.append(Example(prompt, prompt_ids, answer or None, answer_ids, extra, messages, where))
    report.kept = len(examples)
    if not examples:
        raise DataError(
            f"{source}: all {report.rows} prompts are longer than data.max_prompt_tokens="
            f"{cfg.max_prompt_tokens}; raise it or set data.overlong=truncate"
        )
    return examples, report
