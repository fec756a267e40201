"""Tokenize + pack: SentencePiece over the ingested documents into Megatron `.bin`/`.idx` shards.

The stage runs in phases (see `runner.run_stage`); everything it writes besides the shards and
`manifest.json` lives under `RUN/tokenize/`:

1. `tokenizer` (only when the recipe gives `tokenizer.train` and the model file does not exist,
   or this stage trained it before): one task trains a SentencePiece BPE model from the run's
   documents (`train_tokenizer`, deterministic) and stores it at `tokenizer.model`
   (default `RUN/tokenizer.model`). tokenizer.py: which model a run uses, loading and checking it.
2. `holdout` (holdout.py): one task per docs file. A document goes to the validation split when
   `splitmix64(id ^ splitmix64(holdout_seed)) < holdout_fraction * 2**64`, a pure function of
   its stable id. The task writes the file's validation documents with the SHA-256 of their
   UTF-8 text to `RUN/tokenize/holdout/<source>/<rel>.parquet` (and the file's train/validation
   text bytes in its metadata).
3. `group` (groups.py): one task merges the holdout digests into `RUN/tokenize/holdout.sha256`
   (sorted, 32 bytes each) and cuts each source's files, in sorted order, into groups of about
   `shard_mb` of tokens (`RUN/tokenize/groups.json`), estimating each source's text bytes per
   token by encoding its first 256 KB of documents.
4. `encode` (packer.py): one task per group and split. It reads the group's documents in order,
   drops validation documents (train) and train documents whose text hash is a holdout text
   (`duplicate_holdout`), encodes batches of `batch_docs` documents with the exact
   segment-caching `Encoder` (encoder.py, argued in ENCODER.md) when the model allows it and
   `tokenize.cache_entries` > 0, else with SentencePiece's batched `encode` (`num_threads =
   cpus_per_task`), BOS/EOS added as the recipe says, and writes
   `RUN/shards/<source>/<split>/<group:06d>-<part:04d>.bin/.idx`, a new part starting at the
   first document boundary past `shard_mb`.

`finish` writes `RUN/manifest.json` (pipeline/formats/manifest.py) from the tasks' shard lists
and removes shard files of earlier configurations that the manifest no longer lists.

Every output is a function of the documents, the tokenizer and the recipe only (groups are
cut by bytes, parts by tokens), so shards and manifest are byte-identical whatever the number of
workers, retries or kills. Accounting, per source (`stats.sources.<source>`):
`read = train.docs + validation.docs + removed.dedup + removed.duplicate_holdout`.
"""

from .docs import removed_ids
from .errors import TokenizeError
from .holdout import holdout_mask
from .packer import encode_batch
from .stage import stage
from .tokenizer import train_tokenizer

__all__ = ["TokenizeError", "encode_batch", "holdout_mask", "removed_ids", "stage", "train_tokenizer"]
