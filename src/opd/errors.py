"""User-facing errors: the CLI prints these as one line and exits with code 2."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


class OpdError(Exception):
    """A problem with the user's input (config, data, models), not a bug in opd."""


class ConfigError(OpdError):
    """Invalid recipe, unknown key or out-of-range value."""


class DataError(OpdError):
    """Malformed or unusable training / evaluation data."""


class ModelError(OpdError):
    """A model or tokenizer that cannot be loaded or does not fit the run."""


class RunDirError(OpdError):
    """The run directory cannot be used (another run in it, nothing to resume, ...)."""


class DiskFullError(OpdError):
    """A write failed because the disk (or quota) is full; committed checkpoints are intact."""


# What writers say when the disk is full: OSError's strerror, Rust's io::Error (safetensors), errno text.
_FULL_MESSAGES = ("no space left on device", "os error 28", "errno 28", "disk quota exceeded", "os error 122")
_NEARLY_FULL_BYTES = 1 << 20


def disk_full(exc: BaseException, target: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``exc`` comes from a full disk: ENOSPC / EDQUOT anywhere in its chain, the message of a
    writer that hides the errno (safetensors' SafetensorError), or — for writers that say neither, such as
    torch.save's ``unexpected pos`` RuntimeError — less than 1 MiB left on the filesystem of ``target``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(current).lower() for text in _FULL_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    if target is None:
        return False
    path = Path(target).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def disk_full_message(target: str | os.PathLike[str] | None) -> str:
    where = f" writing {target}" if target else ""
    return f"disk full{where}; free space and rerun with --resume (committed checkpoints are intact)"


@contextlib.contextmanager
def disk_writes(target: str | os.PathLike[str], cleanup: Path | None = None) -> Iterator[None]:
    """Turn a full disk met by any writer in the block (torch.save, safetensors, DCP, json / yaml text)
    into one :class:`DiskFullError`; ``cleanup`` (the block's temporary file or directory) is removed
    afterwards, so the space it took is freed for the rerun. Other errors pass through unchanged."""
    try:
        yield
    except (OpdError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        full = disk_full(exc, target)  # before cleaning up, which frees space
        if not full:
            raise
        if cleanup is not None:
            if cleanup.is_dir():
                shutil.rmtree(cleanup, ignore_errors=True)
            else:
                cleanup.unlink(missing_ok=True)
        raise DiskFullError(disk_full_message(target)) from exc
