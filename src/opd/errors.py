"""User-facing errors: the CLI prints these as one line and exits with code 2."""

from __future__ import annotations


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
