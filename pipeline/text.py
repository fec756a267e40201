"""SlimPajama's text normalization, the one definition every stage uses.

Lowercase, drop ASCII punctuation, collapse whitespace runs (as `str.split()` sees them) to one
space, strip. Ingest's short-document filter measures the length of this form, dedup shingles it
(`dedup.normalize: slimpajama`), and the bundled sample plants duplicates of known Jaccard over it.
"""

from __future__ import annotations

import string

PUNCT_TABLE = str.maketrans("", "", string.punctuation)
PUNCT_BYTES = string.punctuation.encode()  # for deleting ASCII punctuation from UTF-8 bytes


def slimpajama_normalize(text: str) -> str:
    """Lowercase, no ASCII punctuation, whitespace runs -> one space, stripped."""
    return " ".join(text.lower().translate(PUNCT_TABLE).split())
