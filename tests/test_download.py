"""The download stage against a real HTTP server on 127.0.0.1 (Range, dropped connections)."""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import http.server
import os
import random
import re
import socket
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest
from http_helpers import send_range_headers

from pipeline import download
from pipeline.layout import RunDir
from pipeline.recipe import parse_recipe

BIG = 3 * 1024 * 1024 + 12345  # several 1 MB blocks and a ragged tail


# ---------------------------------------------------------------------------------------------
# A static file server with Range support and failure modes


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves `directory` with HTML listings (fsspec's http glob reads them) and `Range: bytes=N-[M]`.

    Failure modes, set on `server.state`:
    - drops[url_path] = [n1, n2, ...]: the next GETs of that file send the headers with the full
      Content-Length, n1 (then n2, ...) bytes of the body, then close the socket; an int n: every
      GET does so (and always stops at least one byte short).
    - norange = True: Range is ignored (always 200 and the whole body).
    """

    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        state = self.server.state
        with state["lock"]:
            state["log"].append(("HEAD", self.path, None))
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return super().do_HEAD()
        self.send_response(200)
        self.send_header("Content-Length", str(os.path.getsize(path)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        state = self.server.state
        rng = self.headers.get("Range")
        with state["lock"]:
            state["log"].append(("GET", self.path, rng))
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return super().do_GET()  # directory listing, redirect or 404
        data = Path(path).read_bytes()
        span = send_range_headers(self, data, use_range=not state["norange"])
        if span is None:
            return
        body = data[span[0] : span[1] + 1]
        with state["lock"]:
            plan = state["drops"].get(self.path)
            if isinstance(plan, int):
                drop = min(plan, len(body) - 1)
            else:
                drop = plan.pop(0) if plan else None
        if drop is not None:
            self.wfile.write(body[:drop])
            self.wfile.flush()
            # let the client take in what was sent: aiohttp drops its unread buffer on the error,
            # and how much sits there depends on socket buffers and load
            time.sleep(0.15)
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


class Server:
    def __init__(self, root: Path):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.httpd.state = {"lock": threading.Lock(), "log": [], "drops": {}, "norange": False}
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def state(self) -> dict:
        return self.httpd.state

    def gets(self, url_path: str) -> list[str | None]:
        """The Range headers of the GETs of one file, in order (None: no Range)."""
        with self.state["lock"]:
            return [r for (m, p, r) in self.state["log"] if m == "GET" and p == url_path]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, bytes]:
    """Files served under /web/: one of a few MB, small ones, one in a nested directory."""
    rng = random.Random(7)
    files = {
        "a/big.bin": rng.randbytes(BIG),
        "a/small.bin": b"hello world\n" * 100,
        "b/c/nested.jsonl": b'{"text": "x"}\n' * 500,
        "b/empty.bin": b"",
    }
    for rel, data in files.items():
        p = tmp_path / "srv" / "web" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


@pytest.fixture
def server(tmp_path: Path, corpus):
    s = Server(tmp_path / "srv")
    yield s
    s.stop()


def _recipe(run: Path | str, urls: list[str] | None = None, url_list: str | None = None, **download_cfg):
    src = {"name": "web", "download": True}
    if urls:
        src["urls"] = urls
    if url_list:
        src["url_list"] = url_list
    return parse_recipe({
        "name": "t",
        "output": str(run),
        "sources": [src, {"name": "inplace", "urls": urls or [url_list], "download": False}],
        "download": {"block_mb": 1, "retries": 3, **download_cfg},
    })


def _run_all(recipe, run_url: str) -> dict[str, dict]:
    """run_task over the plan; results by rel_path."""
    return {t.payload["rel_path"]: download.stage.run_task(t, recipe, RunDir(run_url)) for t in download.stage.plan(recipe, RunDir(run_url))}


def _stats(result: dict) -> dict:
    """A task's counters: the deterministic stats and how this attempt got the file, together."""
    return {**result.stats["sources"]["web"], **result.transfer["sources"]["web"]}


def _leftovers(run: Path) -> list[str]:
    return [str(p) for p in run.rglob("*") if p.name.endswith(".partial") or ".tmp-" in p.name]


def _task(recipe, run_url: str, rel: str):
    return next(t for t in download.stage.plan(recipe, RunDir(run_url)) if t.payload["rel_path"] == rel)


# ---------------------------------------------------------------------------------------------
# plan


def test_plan_one_task_per_file_of_downloaded_sources(tmp_path, server, corpus):
    run = tmp_path / "run"
    recipe = _recipe(run, [f"{server.base}/web/**"])
    tasks = download.stage.plan(recipe, RunDir(str(run)))
    assert [t.id for t in tasks] == [f"web/{rel}" for rel in sorted(corpus)]  # the in-place source has none
    t = tasks[0]
    assert t.stage == "download" and t.source == "web"
    assert t.payload["url"] == f"{server.base}/web/a/big.bin"
    assert t.payload["dest"] == str(run / "raw" / "web" / "a" / "big.bin")
    assert set(t.payload) == {"url", "rel_path", "size", "checksum", "dest"}
    assert len({t.id for t in tasks}) == len(tasks) and all(len(t.fingerprint) == 20 for t in tasks)
    assert download.stage.plan(recipe, RunDir(str(run))) == tasks  # deterministic (listing cached in the run)


# ---------------------------------------------------------------------------------------------
# copying


def test_files_arrive_byte_identical(tmp_path, server, corpus):
    run = tmp_path / "run"
    recipe = _recipe(run, [f"{server.base}/web/**"])
    results = _run_all(recipe, str(run))
    for rel, data in corpus.items():
        assert (run / "raw" / "web" / rel).read_bytes() == data, rel
        r = results[rel]
        assert r.outputs == [str(run / "raw" / "web" / rel)]
        assert r.bytes == len(data) and r.docs == 0 and r.errors == 0 and r.issues == []
        assert r.stats == {"sources": {"web": {"files": 1, "bytes": len(data), "checksum_verified": 0}}}
        assert r.transfer == {"sources": {"web": {"skipped": 0, "resumed": 0, "reconnects": 0}}}
    assert _leftovers(run) == []
    # the big file came as one streaming GET, not one request per block
    assert server.gets("/web/a/big.bin") == [None]


def test_dropped_connection_resumes_with_a_range_request(tmp_path, server, corpus):
    run = tmp_path / "run"
    recipe = _recipe(run, [f"{server.base}/web/**"])
    # the streaming GET drops after 1.6 MB; the first ranged block (1 MB) drops after 0.4 MB
    server.state["drops"]["/web/a/big.bin"] = [1_600_000, 400_000]
    r = download.stage.run_task(_task(recipe, str(run), "a/big.bin"), recipe, RunDir(str(run)))
    assert (run / "raw" / "web" / "a" / "big.bin").read_bytes() == corpus["a/big.bin"]
    assert _stats(r)["reconnects"] == 2 and _stats(r)["resumed"] == 1
    ranges = server.gets("/web/a/big.bin")
    assert ranges[0] is None
    starts = [int(re.match(r"bytes=(\d+)-", x)[1]) for x in ranges[1:]]
    assert 0 < starts[0] <= 1_600_000  # resumed where the stream dropped (aiohttp discards its buffer)
    assert starts[1] == starts[0]  # a ranged block is all or nothing: asked again from its start
    assert len(ranges) == 1 + 1 + 1 + (BIG - starts[0] - 1) // (1 << 20)  # then one GET per block
    assert _leftovers(run) == []


def test_server_that_ignores_range_still_gives_the_right_file(tmp_path, server, corpus):
    run = tmp_path / "run"
    recipe = _recipe(run, [f"{server.base}/web/**"])
    server.state["norange"] = True
    dest = run / "raw" / "web" / "a" / "big.bin"
    dest.parent.mkdir(parents=True)
    Path(str(dest) + ".partial").write_bytes(corpus["a/big.bin"][:1_000_000])
    # resume attempt (answered 200: start over), then a streaming GET that drops (restart again)
    server.state["drops"]["/web/a/big.bin"] = [100, 1_600_000]
    r = download.stage.run_task(_task(recipe, str(run), "a/big.bin"), recipe, RunDir(str(run)))
    assert dest.read_bytes() == corpus["a/big.bin"]
    assert _stats(r)["reconnects"] == 1 and _stats(r)["resumed"] == 0
    assert _leftovers(run) == []
    # and a plain download of a multi-block file from such a server
    _run_all(recipe, str(run))
    for rel, data in corpus.items():
        assert (run / "raw" / "web" / rel).read_bytes() == data


def test_partial_from_a_killed_run_is_resumed(tmp_path, server, corpus):
    run = tmp_path / "run"
    recipe = _recipe(run, [f"{server.base}/web/**"])
    dest = run / "raw" / "web" / "a" / "big.bin"
    dest.parent.mkdir(parents=True)
    kept = 1_234_567
    Path(str(dest) + ".partial").write_bytes(corpus["a/big.bin"][:kept])
    r = download.stage.run_task(_task(recipe, str(run), "a/big.bin"), recipe, RunDir(str(run)))
    assert dest.read_bytes() == corpus["a/big.bin"]
    assert _stats(r)["resumed"] == 1 and _stats(r)["reconnects"] == 0
    ranges = server.gets("/web/a/big.bin")
    assert ranges[0].startswith(f"bytes={kept}-")
    assert all(x is not None for x in ranges)  # nothing before `kept` was fetched again
    assert _leftovers(run) == []


def test_partial_longer_than_the_file_starts_over(tmp_path, server, corpus):
    run = tmp_path / "run"
    recipe = _recipe(run, [f"{server.base}/web/**"])
    dest = run / "raw" / "web" / "a" / "small.bin"
    dest.parent.mkdir(parents=True)
    Path(str(dest) + ".partial").write_bytes(b"z" * (len(corpus["a/small.bin"]) + 10))
    download.stage.run_task(_task(recipe, str(run), "a/small.bin"), recipe, RunDir(str(run)))
    assert dest.read_bytes() == corpus["a/small.bin"]
    assert _leftovers(run) == []


def test_rerun_skips_complete_files(tmp_path, server, corpus):
    run = tmp_path / "run"
    recipe = _recipe(run, [f"{server.base}/web/**"])
    first = _run_all(recipe, str(run))
    server.state["log"].clear()
    again = _run_all(recipe, str(run))
    assert all(_stats(r)["skipped"] == 1 and _stats(r)["bytes"] == len(corpus[rel]) for rel, r in again.items())
    assert {k: r.stats for k, r in again.items()} == {k: r.stats for k, r in first.items()}  # retry-proof
    assert [e for e in server.state["log"] if e[0] == "GET"] == []  # at most a HEAD for the size
    # a truncated destination is not "complete": it is downloaded again
    dest = run / "raw" / "web" / "a" / "big.bin"
    dest.write_bytes(corpus["a/big.bin"][:1000])
    r = download.stage.run_task(_task(recipe, str(run), "a/big.bin"), recipe, RunDir(str(run)))
    assert _stats(r)["skipped"] == 0 and dest.read_bytes() == corpus["a/big.bin"]
    assert r.issues[0]["kind"] == "bad_destination"


def test_retries_exhausted_raise_naming_the_url_and_a_rerun_resumes(tmp_path, server, corpus):
    run = tmp_path / "run"
    recipe = _recipe(run, [f"{server.base}/web/**"], retries=2)
    task = _task(recipe, str(run), "a/big.bin")
    server.state["drops"]["/web/a/big.bin"] = 1_600_000  # every GET
    with pytest.raises(download.DownloadError) as e:
        download.stage.run_task(task, recipe, RunDir(str(run)))
    msg = str(e.value)
    assert f"{server.base}/web/a/big.bin" in msg and f"of {BIG} bytes" in msg and "2 reconnect" in msg
    partial = run / "raw" / "web" / "a" / "big.bin.partial"
    assert 0 < partial.stat().st_size < BIG
    assert len(server.gets("/web/a/big.bin")) == 3  # first try + 2 reconnects
    # the runner retries the task later: it continues from the .partial
    server.state["drops"].clear()
    r = download.stage.run_task(task, recipe, RunDir(str(run)))
    assert (run / "raw" / "web" / "a" / "big.bin").read_bytes() == corpus["a/big.bin"]
    assert _stats(r)["resumed"] == 1
    assert _leftovers(run) == []


def test_missing_file_is_retried_then_fails_naming_the_url(tmp_path, server, monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_FIRST_S", 0.0)
    run = tmp_path / "run"
    lst = tmp_path / "urls.txt"
    lst.write_text(f"{server.base}/web/a/small.bin\n{server.base}/web/a/gone.bin\n")
    recipe = _recipe(run, url_list=str(lst))
    task = _task(recipe, str(run), "gone.bin")
    assert task.payload["size"] == -1
    # a 404 may heal (an object store or hub catching up): reconnected, then the task fails
    with pytest.raises(download.DownloadError, match=r"gone\.bin: download failed after 3 reconnect.*FileNotFoundError"):
        download.stage.run_task(task, recipe, RunDir(str(run)))
    assert _leftovers(run) == [] and not (run / "raw" / "web" / "gone.bin").exists()


def test_unknown_size_from_a_url_list_is_asked_at_run_time(tmp_path, server, corpus):
    run = tmp_path / "run"
    lst = tmp_path / "urls.txt"
    lst.write_text(f"{server.base}/web/a/big.bin\n{server.base}/web/b/c/nested.jsonl\n")
    recipe = _recipe(run, url_list=str(lst))
    server.state["drops"]["/web/a/big.bin"] = [1_600_000]  # resuming needs the size: the HEAD gave it
    results = _run_all(recipe, str(run))
    assert (run / "raw" / "web" / "a" / "big.bin").read_bytes() == corpus["a/big.bin"]
    assert (run / "raw" / "web" / "b" / "c" / "nested.jsonl").read_bytes() == corpus["b/c/nested.jsonl"]
    assert _stats(results["a/big.bin"])["resumed"] == 1
    assert results["a/big.bin"].bytes == BIG


# ---------------------------------------------------------------------------------------------
# checksums (a local source; the listing of local files carries none, so the test adds it)


@pytest.fixture
def local_source(tmp_path: Path):
    data = random.Random(3).randbytes(2 * 1024 * 1024 + 7)
    src = tmp_path / "local" / "part-0.bin"
    src.parent.mkdir()
    src.write_bytes(data)
    run = tmp_path / "run"
    recipe = _recipe(run, [str(tmp_path / "local" / "*.bin")])
    (task,) = download.stage.plan(recipe, RunDir(str(run)))
    return recipe, run, task, data, Path(task.payload["dest"])


def _with_checksum(task, checksum: str):
    return dataclasses.replace(task, payload={**task.payload, "checksum": checksum})


def test_destination_with_right_size_and_wrong_sha256_is_replaced(local_source):
    recipe, run, task, data, dest = local_source
    task = _with_checksum(task, "sha256:" + hashlib.sha256(data).hexdigest())
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"\0" * len(data))
    r = download.stage.run_task(task, recipe, RunDir(str(run)))
    assert dest.read_bytes() == data
    assert _stats(r)["skipped"] == 0 and _stats(r)["checksum_verified"] == 1
    (issue,) = r.issues
    assert issue["kind"] == "bad_destination" and "sha256" in issue["message"] and issue["file"] == "part-0.bin"
    again = download.stage.run_task(task, recipe, RunDir(str(run)))  # now it hashes right: skipped
    assert _stats(again)["skipped"] == 1 and _stats(again)["checksum_verified"] == 1 and again.issues == []


def test_checksum_mismatch_deletes_the_partial_and_names_both_checksums(local_source):
    recipe, run, task, data, dest = local_source
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(download.ChecksumMismatch) as e:
        download.stage.run_task(_with_checksum(task, "sha256:" + wrong), recipe, RunDir(str(run)))
    msg = str(e.value)
    assert task.payload["url"] in msg and wrong in msg and hashlib.sha256(data).hexdigest() in msg
    assert not dest.exists() and _leftovers(run) == []


def test_md5_in_base64_and_etags(local_source):
    recipe, run, task, data, dest = local_source
    b64 = base64.b64encode(hashlib.md5(data).digest()).decode()  # GCS's md5Hash
    r = download.stage.run_task(_with_checksum(task, "md5:" + b64), recipe, RunDir(str(run)))
    assert _stats(r)["checksum_verified"] == 1 and dest.read_bytes() == data
    dest.unlink()
    r = download.stage.run_task(_with_checksum(task, "etag:abc-3"), recipe, RunDir(str(run)))  # not verifiable
    assert _stats(r)["checksum_verified"] == 0 and dest.read_bytes() == data
    with pytest.raises(ValueError, match="neither hex nor base64"):
        download._expected_digest("sha256:nothex")


def test_credentials_never_appear_in_messages():
    assert download.url_for_log("https://user:s3cret@host/x/y.bin") == "https://***@host/x/y.bin"
    assert download.url_for_log("hf://datasets/a/b/c.zst") == "hf://datasets/a/b/c.zst"


# ---------------------------------------------------------------------------------------------
# a non-local run directory: storage.atomic_open, drops resumed inside the task


def test_non_local_run_dir(server, corpus):
    run_url = f"memory://tinyprep-test-{uuid.uuid4().hex[:8]}/run"
    fs = fsspec.filesystem("memory")
    try:
        recipe = _recipe(run_url, [f"{server.base}/web/**"])
        server.state["drops"]["/web/a/big.bin"] = [1_600_000]
        results = _run_all(recipe, run_url)
        for rel, data in corpus.items():
            assert fs.cat_file(f"{run_url}/raw/web/{rel}") == data, rel
        assert _stats(results["a/big.bin"])["reconnects"] == 1 and _stats(results["a/big.bin"])["resumed"] == 1
        again = _run_all(recipe, run_url)
        assert all(_stats(r)["skipped"] == 1 for r in again.values())
        # a failed download leaves no object under the final name (fsspec uploads on close)
        task = _with_checksum(_task(recipe, run_url, "a/small.bin"), "sha256:" + "0" * 64)
        fs.rm(task.payload["dest"])
        with pytest.raises(download.ChecksumMismatch):
            download.stage.run_task(task, recipe, RunDir(run_url))
        assert not fs.exists(task.payload["dest"])
    finally:
        fs.rm(run_url.split("/run")[0], recursive=True)
