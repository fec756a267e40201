"""tinyprep: download, ingest, dedupe, tokenize and pack pretraining corpora on Ray."""

__version__ = "0.1.0"
