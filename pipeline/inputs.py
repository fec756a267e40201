"""The input files of a source: listed once per run, from its URLs, globs and URL list.

Listing a remote dataset (59,166 SlimPajama files) is slow, so the first stage that needs it
stores the listing in RUN/inputs/<source>.json and later stages read it back.
"""

from __future__ import annotations

from . import storage
from .layout import RunDir, RunDirError, contained
from .recipe import SourceConfig
from .stage import fingerprint


class InputListingError(RunDirError):
    """Two inputs of a source would share one place under the run (one line, names both)."""


def _listing_key(src: SourceConfig) -> str:
    return fingerprint(src.urls, src.url_list, src.url_list_match, src.select.dirs)


def list_inputs(src: SourceConfig, run: RunDir) -> list[storage.InputFile]:
    """The source's input files, sorted, filtered to `select.dirs`; listed once per run."""
    cache = run.inputs_listing(src.name)
    key = _listing_key(src)
    cached = storage.read_json(cache)
    if cached and cached.get("key") == key:
        return [storage.InputFile(**f) for f in cached["files"]]
    files = expand_source(src)
    storage.write_json(cache, {"key": key, "source": src.name, "files": [f.to_json() for f in files]})
    return files


def expand_source(src: SourceConfig) -> list[storage.InputFile]:
    """List a source's input files (urls, url_list), sorted, filtered to `select.dirs`."""
    files = storage.expand_urls(src.urls) if src.urls else []
    if src.url_list:
        files += storage.expand_url_list(src.url_list, src.url_list_match)
    if src.select.dirs is not None:
        wanted = set(src.select.dirs)
        files = [f for f in files if "/" in f.rel_path and f.rel_path.split("/", 1)[0] in wanted]
        if not files:
            raise FileNotFoundError(
                f"source {src.name}: no input file under the directories {sorted(wanted)} (select.dirs)"
            )
    seen: dict[str, storage.InputFile] = {}
    for f in files:
        contained(f.rel_path, f"source {src.name}: input {f.url}")
        other = seen.setdefault(f.rel_path, f)
        if other.url != f.url:
            raise InputListingError(f"source {src.name}: {other.url} and {f.url} both sit at {f.rel_path!r} under "
                                    f"the source's root; give them separate sources (or one glob over a common root)")
    return [seen[k] for k in sorted(seen)]
