"""On-disk formats: Megatron `.bin`/`.idx` shards, lit-gpt `LITPKDS` chunks, manifest and mixture.

Every reader validates what it reads and raises `FormatError("<path>: <reason>")`; bad files never
surface as numpy or struct tracebacks.
"""

from __future__ import annotations


class FormatError(Exception):
    """A file that does not follow its format; the message names the file and what is wrong."""
