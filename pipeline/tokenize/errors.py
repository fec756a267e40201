"""The tokenize stage's error, shared by its modules (the tokenizer checks, the phases)."""

from __future__ import annotations

from ..stage import StageFailed


class TokenizeError(StageFailed):
    """The tokenize stage cannot run with this recipe or run directory (the message says why)."""
