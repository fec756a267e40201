"""Failure semantics of reading inputs, through the runner: storage errors are retried and then
fail the task and the stage (naming the file); only content errors count against max_errors.

Each case lists the inputs first (as a stage's plan does, cached in the run), then breaks one of
them (deletes it, or makes a loopback HTTP server answer with an error status), then runs the
stage on the in-process executor with one task retry.
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_helpers import send_range_headers

from pipeline import download, storage
from pipeline.executors import LocalExecutor
from pipeline.ingest import readers
from pipeline.inputs import list_inputs
from pipeline.layout import RunDir
from pipeline.recipe import parse_recipe
from pipeline.runner import run_recipe
from pipeline.stage import StageFailed

TASK_RETRIES = 1
TEXT = "The quick brown fox jumps over the lazy dog near the riverbank. " * 5
N_DOCS = 120  # about 40 KB of JSON lines: several ranged reads of 16 KB


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files (path -> bytes) with `Range: bytes=N-[M]`; server.fail[path] is a list of
    statuses answered to the next requests of that path (None: serve it), or one status for ever."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self, body: bool) -> None:
        srv = self.server
        with srv.lock:
            srv.log.append((self.command, self.path))
            plan = srv.fail.get(self.path)
            status = plan.pop(0) if isinstance(plan, list) and plan else plan if isinstance(plan, int) else None
        data = srv.files.get(self.path)
        if status is None and data is None:
            status = 404
        if status is not None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        span = send_range_headers(self, data, use_range=body)
        if body and span:
            self.wfile.write(data[span[0]:span[1] + 1])

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.fail, httpd.log, httpd.lock = {}, {}, [], threading.Lock()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(readers, "RETRY_BACKOFF_S", 0.0)
    monkeypatch.setattr(readers, "RAW_READ", 4096)  # HTTP reads in blocks of 16 KB
    monkeypatch.setattr(download, "BACKOFF_FIRST_S", 0.0)


def _jsonl(n: int, bad_line: int | None = None) -> bytes:
    lines = [orjson.dumps({"text": f"{i} {TEXT}"}) for i in range(n)]
    if bad_line is not None:
        lines[bad_line] = b'{"text": "cut'
    return b"\n".join(lines) + b"\n"


def _parquet(n: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": [f"{i} {TEXT}" for i in range(n)]}), sink, row_group_size=n // 3)
    return sink.getvalue().to_pybytes()


# (id, stage, where the broken input lives, format, what breaks it, max_errors, expected outcome)
# outcome "fails": the stage fails, its message has one line naming the broken file's task and
# URL, the other file is done and nothing is counted as bad input; "kept": every document kept;
# "counted": the content error is counted and fails the stage through max_errors.
CASES = [
    ("ingest-deleted-after-listing", "ingest", "local", "jsonl", "delete", None, "fails"),
    ("ingest-parquet-deleted-after-listing", "ingest", "local", "parquet", "delete", None, "fails"),
    ("ingest-503-then-200", "ingest", "http", "jsonl", [503, 503], 0, "kept"),
    ("ingest-503-mid-file-then-200", "ingest", "http", "jsonl", [None, None, 503, 503], 0, "kept"),
    ("ingest-parquet-503-then-200", "ingest", "http", "parquet", [503, 503], 0, "kept"),
    ("ingest-404-for-good", "ingest", "http", "jsonl", 404, None, "fails"),
    ("ingest-parquet-404-for-good", "ingest", "http", "parquet", 404, None, "fails"),
    ("ingest-403-not-retried", "ingest", "http", "jsonl", 403, None, "fails"),
    ("ingest-content-error-counted", "ingest", "local", "jsonl", "bad_json", 0, "counted"),
    ("download-deleted-after-listing", "download", "local", "jsonl", "delete", None, "fails"),
    ("download-503-then-200", "download", "http", "jsonl", [503, 503], 0, "kept"),
    ("download-404-for-good", "download", "http", "jsonl", 404, None, "fails"),
    ("download-403-not-retried", "download", "http", "jsonl", 403, None, "fails"),
]


@pytest.mark.parametrize("case, stage, where, fmt, breaks, max_errors, outcome", CASES, ids=[c[0] for c in CASES])
def test_read_failures(tmp_path, server, case, stage, where, fmt, breaks, max_errors, outcome):
    names = [f"a.{fmt}", f"b.{fmt}"]  # b is the one that breaks
    data = {n: _parquet(N_DOCS) if fmt == "parquet" else _jsonl(N_DOCS, 7 if breaks == "bad_json" and n == names[1]
                                                                     else None) for n in names}
    if where == "http":
        for n, d in data.items():
            server.files[f"/d/{n}"] = d
        urls = [f"{server.base}/d/{n}" for n in names]
    else:
        (tmp_path / "in").mkdir()
        for n, d in data.items():
            (tmp_path / "in" / n).write_bytes(d)
        urls = [str(tmp_path / "in" / n) for n in names]
    (tmp_path / "urls.txt").write_text("".join(u + "\n" for u in urls))
    run = RunDir(str(tmp_path / "run"))
    recipe = parse_recipe({
        "name": "t", "output": run.url, "stages": [stage],
        "sources": [{"name": "src", "url_list": str(tmp_path / "urls.txt"), "download": stage == "download",
                     "min_chars": None}],
        "ingest": {"max_errors": max_errors},
        "download": {"retries": 3},
        # where the input heals, the reader's own retries must do it: no task retry to lean on
        "ray": {"task_retries": 0 if outcome == "kept" else TASK_RETRIES, "retry_backoff_s": 0},
    })
    run.claim()
    assert [f.rel_path for f in list_inputs(recipe.sources[0], run)] == names  # the listing the stage plans from

    broken = urls[1]
    if breaks == "delete":
        Path(broken).unlink()
    elif breaks != "bad_json":
        server.fail[f"/d/{names[1]}"] = breaks

    if outcome == "kept":
        run_recipe(recipe, executor=LocalExecutor())
        if stage == "ingest":
            stats = storage.read_json(run.stage_stats("ingest"))
            c = stats["stats"]["sources"]["src"]
            assert (c["read"], c["kept"], c["unreadable"], stats["errors"]) == (2 * N_DOCS, 2 * N_DOCS, {}, 0)
        else:
            assert Path(run.raw("src", names[1])).read_bytes() == data[names[1]]
        assert server.fail[f"/d/{names[1]}"] == []  # the failures were served, and survived
        return

    with pytest.raises(StageFailed) as err:
        run_recipe(recipe, executor=LocalExecutor())
    message = str(err.value)
    stats = storage.read_json(run.stage_stats(stage))
    if outcome == "counted":  # content: the task completed and the bad line counts against max_errors
        assert stats["tasks_failed"] == [] and stats["errors"] == 1
        assert stats["stats"]["sources"]["src"]["unreadable"] == {"bad_json": 1}
        assert f"  {names[1]}:8: bad_json: invalid JSON" in message and "1 bad input(s), the recipe allows 0" in message
        return

    # storage: the task failed after its retries, the stage failed, nothing was counted as bad input
    mentions = [line for line in message.splitlines() if names[1] in line]
    assert len(mentions) == 1, message
    kind = "InputUnavailable" if stage == "ingest" else "DownloadError"
    assert mentions[0].startswith(f"  task src/{names[1]}: {kind}: {broken}: "), message
    assert [t for t, _ in stats["tasks_failed"]] == [f"src/{names[1]}"]
    assert stats["tasks_done"] == 1 and stats["errors"] == 0
    assert storage.read_json(run.record(stage, f"src/{names[0]}"))["errors"] == 0
    assert not storage.exists(run.record(stage, f"src/{names[1]}"))
    if breaks == 403:  # refused: not worth another try inside the task (the runner still retries it)
        assert ("(1 attempt(s))" if stage == "ingest" else "403") in mentions[0] and "reconnect" not in mentions[0]
    elif stage == "ingest":
        assert f"({readers.OPEN_RETRIES + 1} attempt(s))" in mentions[0]
    else:
        assert "download failed after 3 reconnect(s)" in mentions[0]
    if where == "http":  # every try of every task attempt asked the server
        asked = sum(1 for _, p in server.log if p == f"/d/{names[1]}")
        tries = 1 if breaks == 403 else (readers.OPEN_RETRIES + 1 if stage == "ingest" else 4)
        assert asked >= tries * (TASK_RETRIES + 1)
