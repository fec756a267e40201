"""The preflight of a run: what would fail hours in, found in seconds before any stage runs.

Three steps, all called by `runner.run_recipe` (so `tinyprep run` and the Python API get them):

- `check_configuration`, before the run directory is created (nothing written): what each
  URL's store needs on this machine (see `check_url`): the fsspec backend is installed (`s3fs`
  for `s3://`, `gcsfs` for `gs://`), and credentials exist where their absence is certain:
  `s3://` with no AWS credentials anywhere botocore looks (environment, config and credential
  files, web identity, container and instance roles; `FSSPEC_S3_ANON` allows anonymous access),
  `gs://` with `GOOGLE_APPLICATION_CREDENTIALS` naming a missing file or no default credentials.
  Unknowable offline and left to `check_sources`: whether a token grants a gated `hf://`
  dataset, whether a key may read a bucket. Then the tokenizer (`preflight_tokenizer`: a
  readable SentencePiece model with the BOS/EOS the recipe asks for, or one the stage trains).
- `check_writable`: the run directory is claimed (`RunDir.claim`) and a probe file is written
  and removed, before anything else is written there.
- `check_sources`: every source the stages read lists (the listing is cached in RUN/inputs/, so
  the first stage reuses it) and its first input opens and yields a byte (a gated dataset
  without `HF_TOKEN`, a bucket the key cannot read, a dead URL in a url list).

Every failure is a `PreflightError`: one line and the exit code the CLI uses (2 for a recipe or
environment to fix before anything can run, 1 for storage that failed when touched).
"""

from __future__ import annotations

import logging
import os
import time

from . import storage
from .inputs import list_inputs
from .layout import RunDir, RunDirError
from .recipe import Recipe

log = logging.getLogger("tinyprep")

READ_STAGES = ("download", "ingest")  # the stages that read the sources


class PreflightError(Exception):
    """A run that cannot work, found before any stage: one line; `code` is the exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _first_line(err: BaseException) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return text or type(err).__name__


def _protocol(url: str) -> str:
    proto, _ = storage.split_protocol(url)
    return proto[:-3].lower() if proto else "file"


# where botocore found credentials that only this machine has (a cluster's workers do not)
_LOCAL_CREDENTIAL_METHODS = frozenset({"shared-credentials-file", "config-file", "custom-process", "sso"})


def _s3_credentials(cluster: bool = False) -> str | None:
    """None when botocore finds credentials (or anonymous access is configured), else why not.
    On a cluster, credentials from a file of this machine are worth a warning: the workers read
    their own (environment variables are forwarded to them, files are not)."""
    import fsspec.config

    anon = os.environ.get("FSSPEC_S3_ANON", fsspec.config.conf.get("s3", {}).get("anon", ""))
    if str(anon).lower() in ("1", "true", "yes"):
        return None
    import botocore.session

    try:
        creds = botocore.session.Session().get_credentials()
    except Exception as e:  # noqa: BLE001 - a broken profile or config file: say which
        return f"the AWS configuration is unusable ({_first_line(e)})"
    if creds is None:
        return ("no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run "
                "where an instance or pod role provides them; FSSPEC_S3_ANON=true for a public bucket)")
    if cluster and getattr(creds, "method", "") in _LOCAL_CREDENTIAL_METHODS:
        log.warning("s3: the AWS credentials come from a file on this machine (%s); workers on other nodes "
                    "need their own (an instance or pod role, or AWS_* variables, which are forwarded)", creds.method)
    return None


def _gcs_credentials() -> str | None:
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if path and not os.path.isfile(path):
        return f"GOOGLE_APPLICATION_CREDENTIALS names {path}, which does not exist"
    try:
        import google.auth
        import google.auth.exceptions
    except ImportError:
        return None
    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        return ("no Google credentials (set GOOGLE_APPLICATION_CREDENTIALS, run `gcloud auth application-default "
                "login`, or run where a service account provides them)")
    return None


def check_url(url: str, what: str, cluster: bool = False) -> None:
    """PreflightError (code 2) when this machine cannot reach `url`'s store at all: its fsspec
    backend is missing, or it needs credentials that are certainly absent."""
    proto = _protocol(url)
    if proto in ("file", "local"):
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(proto)
    except (ImportError, ValueError) as e:
        hint = {"s3": " (pip install '.[s3]')", "s3a": " (pip install '.[s3]')", "gs": " (pip install '.[gcs]')",
                "gcs": " (pip install '.[gcs]')"}.get(proto, "")
        raise PreflightError(f"{what}: {url}: {_first_line(e)}{hint}", 2) from None
    why = _s3_credentials(cluster) if proto in ("s3", "s3a") else _gcs_credentials() if proto in ("gs", "gcs") else None
    if why:
        raise PreflightError(f"{what}: {url}: {why}", 2)


def _urls(recipe: Recipe, stages: list[str]) -> list[tuple[str, str]]:
    """(what, url) of everything the stages touch outside the run, and the run itself."""
    out = [("output", recipe.output)]
    if set(stages) & set(READ_STAGES):
        for i, src in enumerate(recipe.sources):
            out += [(f"sources[{i}].urls", u) for u in src.urls or ()]
            if src.url_list:
                out.append((f"sources[{i}].url_list", src.url_list))
    if set(stages) & {"tokenize", "mix"} and recipe.tokenizer is not None and recipe.tokenizer.model:
        out.append(("tokenizer.model", recipe.tokenizer.model))
    return out


def check_configuration(recipe: Recipe, stages: list[str]) -> None:
    """The offline checks (module docstring), before anything is created; PreflightError(code 2)."""
    from .tokenize.tokenizer import preflight_tokenizer

    cluster = bool(recipe.ray.address or os.environ.get("RAY_ADDRESS"))
    checked: set[str] = set()
    for what, url in _urls(recipe, stages):
        proto = _protocol(url)
        if proto not in checked:  # one look-up per store: credentials do not differ by path
            check_url(url, what, cluster)
            checked.add(proto)
    problem = preflight_tokenizer(recipe, stages)  # after the stores: a model on s3:// needs their credentials
    if problem:
        raise PreflightError(problem, 2)


def check_writable(run: RunDir) -> None:
    """Claim the run directory and prove it writable (write and remove a probe): PreflightError
    (code 2 for a directory that is not a run's, 1 for storage that refuses the write)."""
    try:
        run.claim()
    except RunDirError as e:
        raise PreflightError(str(e), 2) from None
    except OSError as e:
        raise PreflightError(f"output: {run.url}: not writable ({_one_line(e)})", 1) from None
    probe = run.probe()
    try:
        storage.write_bytes(probe, b"tinyprep preflight\n")
        storage.remove(probe)
    except Exception as e:  # noqa: BLE001 - object stores refuse in their own ways (AccessDenied, ...): one line
        raise PreflightError(f"output: {run.url}: not writable ({_one_line(e)})", 1) from None


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {_first_line(err)}"


def _check_source(src, run: RunDir, stages: list[str]) -> int:
    """List the source (cached in the run); open its first input when a stage reads the originals."""
    try:
        files = list_inputs(src, run)
    except (FileNotFoundError, RunDirError) as e:
        msg = _first_line(e)
        raise PreflightError(msg if msg.startswith(f"source {src.name}") else f"source {src.name}: {msg}", 1) \
            from None
    except Exception as e:  # noqa: BLE001 - fsspec backends fail in their own ways: one line
        raise PreflightError(f"source {src.name}: cannot be listed ({_one_line(e)})", 1) from None
    reads_originals = "download" in stages or ("ingest" in stages and not src.download)
    if files and reads_originals:
        first = files[0].url
        try:
            with storage.fsspec_open(first, "rb") as fh:
                fh.read(1)
        except Exception as e:  # noqa: BLE001 - as above
            hint = ""
            if _protocol(first) == "hf" and not (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")):
                hint = " (a gated dataset needs HF_TOKEN, from an account that accepted its terms)"
            raise PreflightError(f"source {src.name}: {first}: cannot be read ({_one_line(e)}){hint}", 1) from None
    return len(files)


def check_sources(recipe: Recipe, run: RunDir, stages: list[str]) -> None:
    """Every source the stages read lists and its first input opens (module docstring)."""
    t0 = time.monotonic()
    listed = 0
    if set(stages) & set(READ_STAGES):
        for src in recipe.sources:
            listed += _check_source(src, run, stages)
    log.info("preflight: %d input file(s) of %d source(s) listed (%.1fs)", listed,
             len(recipe.sources) if set(stages) & set(READ_STAGES) else 0, time.monotonic() - t0)
