"""The one interface for state that changes alongside the student.

GAD's discriminator and its optimizer, an EMA self-teacher, DistiLLM's phi and replay buffer,
the data stream's position and a rollout engine's weight push all learn, move or need pushing
while the student trains. Each implements :class:`Hooks`; the training loop calls ``start`` once
(after a resume), ``after_step`` after every optimizer step, ``close`` at the end, and the
checkpoint saves and restores ``state_dict`` — so neither names any of them.
"""

from __future__ import annotations

from typing import Any


class Hooks:
    """No-op defaults; a part overrides the calls it needs.

    ``state_dict`` maps names (unique across the run) to values: an ``nn.Module`` is saved as
    ``NAME.safetensors`` and restored in place; anything else (plain Python values and tensors,
    loadable with ``torch.load(weights_only=True)``) comes back through ``load_state_dict``.
    """

    def start(self, student: Any = None) -> None:
        """Called once before the first step, after a resume restored the student. ``student``
        (:class:`opd.parallel.StudentWeights`) reaches its current weights, for parts that hold a copy."""

    def after_step(self, step: int, stepped: bool) -> dict[str, float]:
        """Called after every optimizer step (``stepped``: False when a non-finite step was skipped);
        returns metrics for the step's log row."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Receives the non-module entries of :meth:`state_dict` as saved."""

    def close(self) -> None:
        """Called once when training ends or fails."""
