"""opd: on-policy distillation of language models.

The design axes live in one module each: ``rollout`` (who writes the response),
``divergences`` / ``objectives`` (how teacher and student are compared),
``teachers`` (what the teacher exposes); ``trainer`` is the one training loop.
"""

__version__ = "0.1.0"
