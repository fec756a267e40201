"""Hostile input to ingest: damaged compressed files, misspelled keys, inputs of no known format.

Every case gives exact counts, and the accounting identity holds in each: read == kept +
filtered + unreadable, per source and per subset. Compressed data is used only once its check has
passed: a zstd frame with a bad content checksum, or a gzip member with a bad CRC, loses its own
lines (counted, with their line range in the issue) and no garbage document is kept.
"""

from __future__ import annotations

import gzip
import logging
import random
import string
import tracemalloc
import zlib
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from conftest import tinyprep

from pipeline import ingest
from pipeline.executors import LocalExecutor
from pipeline.ingest import compressed, readers
from pipeline.layout import RunDir
from pipeline.recipe import parse_recipe
from pipeline.runner import run_stage

LONG = "The quick brown fox jumps over the lazy dog near the riverbank. " * 5  # kept by every filter
SETS = ["RedPajamaC4", "RedPajamaWikipedia", "RedPajamaGithub"]


def record(i: int) -> dict:
    return {"text": f"{i} {LONG}", "meta": {"redpajama_set_name": SETS[i % 3]}}


def lines(first: int, n: int) -> bytes:
    """Records first .. first + n - 1, one JSON line each."""
    return b"".join(orjson.dumps(record(i)) + b"\n" for i in range(first, first + n))


def zst(data: bytes) -> bytes:
    """One zstd frame with a content checksum (as the zstd tool writes by default)."""
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


def raw_zst(data: bytes) -> bytes:
    """One zstd frame of raw (stored) blocks with a content checksum: the data is in it as it is,
    so that changing a byte of it decodes to garbage that only the checksum can tell."""
    out = b"\x28\xb5\x2f\xfd" + bytes([0xE4]) + len(data).to_bytes(8, "little")  # checksum, 8-byte size
    step = 1 << 17
    for at in range(0, len(data), step):
        block = data[at:at + step]
        out += ((len(block) << 3) | (at + step >= len(data))).to_bytes(3, "little") + block  # raw block
    return out + zst(data)[-4:]  # the checksum of the same content


def flip_last(frame: bytes) -> bytes:
    """The frame with its last byte (of the zstd checksum, of the gzip length) changed."""
    return frame[:-1] + bytes([frame[-1] ^ 0x55])


def flip_crc(member: bytes) -> bytes:
    return member[:-8] + bytes([member[-8] ^ 0x55]) + member[-7:]


def garbled(frame: bytes) -> bytes:
    """A stored frame / member with a byte of a document changed (still valid JSON)."""
    assert frame.count(b"quick") > 1
    return frame.replace(b"quick", b"quack", 1)


def bad_deflate(data: bytes) -> bytes:
    """A gzip member whose deflate data starts with a block of the reserved type."""
    m = gzip.compress(data, mtime=0)
    return m[:10] + b"\x07" + m[11:]


def undecodable(data: bytes) -> bytes:
    """A zstd frame whose block is marked compressed while it holds the raw data."""
    f = raw_zst(data)
    v = int.from_bytes(f[13:16], "little") | 0b100  # block type raw (0) -> compressed (2)
    return f[:13] + v.to_bytes(3, "little") + f[16:]


def make_recipe(tmp_path: Path, src: dict, **ingest_cfg):
    return parse_recipe({"name": "t", "output": str(tmp_path / "run"), "stages": ["ingest"],
                         "sources": [{"name": "src", "urls": [str(tmp_path / "in" / "*")], **src}],
                         "ingest": {"max_errors": None, **ingest_cfg}})


def run_task(tmp_path: Path, name: str, data: bytes, src: dict | None = None):
    """Ingest one file; the task's result (its counts checked) and the rows of its documents."""
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    recipe = make_recipe(tmp_path, src or {})
    (task,) = ingest.stage.plan(recipe, RunDir(recipe.output))
    res = ingest.stage.run_task(task, recipe, RunDir(recipe.output))
    check_identity(res)
    return res, pq.read_table(res.outputs[0]).to_pylist()


def check_identity(res) -> None:
    """read == kept + filtered + unreadable, per source and per subset; errors and docs agree."""
    for c in res.stats["sources"].values():
        assert c["read"] == c["kept"] + sum(c["filtered"].values()) + sum(c["unreadable"].values())
        for sub in c["subsets"].values():
            assert sub["read"] == sub["kept"] + sum(sub["filtered"].values()) + sum(sub["unreadable"].values())
        for key in ("read", "kept", "bytes_read", "bytes_kept"):
            assert c[key] == sum(s[key] for s in c["subsets"].values())
        assert res.errors == sum(c["unreadable"].values()) + c["files_unreadable"]
        assert res.docs == c["read"]


def _cut_gzip_lines(data: bytes, cut: int) -> int:
    """Lines a gzip stream cut `cut` bytes before its end decodes to (as far as zlib gets)."""
    return zlib.decompressobj(31).decompress(gzip.compress(data, mtime=0)[:-cut]).count(b"\n")


A, B, C = lines(0, 3), lines(3, 3), lines(6, 3)  # three frames / members of three records

# name -> (file name, its bytes, kept rows (or (row, record) when they differ), unreadable counts,
#          files_unreadable, issues (kind, line) in order, words of the first issue's message)
CASES = {
    "zstd: bad checksum in the middle frame": (
        "a.jsonl.zst", zst(A) + flip_last(zst(B)) + zst(C),
        [0, 1, 2, 6, 7, 8], {"bad_checksum": 3}, 0, [("bad_checksum", 4)], ["frame 2", "line(s) 4-6"]),
    "zstd: single frame, garbled content": (
        "a.jsonl.zst", garbled(raw_zst(A + B)),
        [], {"bad_checksum": 6}, 0, [("bad_checksum", 1)], ["frame 1", "checksum", "line(s) 1-6"]),
    "zstd: large frame, garbled content in its first block": (  # decoded long before its checksum is read
        "a.jsonl.zst", garbled(raw_zst(lines(0, 600))),
        [], {"bad_checksum": 600}, 0, [("bad_checksum", 1)], ["frame 1", "line(s) 1-600"]),
    "zstd: garbled middle frame among stored ones": (
        "a.jsonl.zst", raw_zst(A) + garbled(raw_zst(B)) + raw_zst(C),
        [0, 1, 2, 6, 7, 8], {"bad_checksum": 3}, 0, [("bad_checksum", 4)], ["frame 2"]),
    "zstd: frame split inside a record": (  # the bad frame's partial lines are lost with it
        "a.jsonl.zst", zst((A + B)[:500]) + flip_last(zst((A + B)[500:1500])) + zst((A + B)[1500:]),
        [0] + list(range((A + B)[:1500].count(b"\n") + 1, 6)), {"bad_checksum": (A + B)[500:1500].count(b"\n") + 1},
        0, [("bad_checksum", 2)], ["frame 2"]),
    "zstd: undecodable middle frame": (  # its lines cannot be counted: one is, the rows after shift
        "a.jsonl.zst", zst(A) + undecodable(B) + zst(C),
        [0, 1, 2, (4, 6), (5, 7), (6, 8)], {"corrupt_zstd": 1}, 0, [("corrupt_zstd", 4)], ["frame 2", "could not be decoded"]),
    "zstd: cut inside a checksummed frame": (
        "a.jsonl.zst", (zst(A) + zst(B))[:-20],
        [0, 1, 2], {"truncated": 1}, 0, [("truncated", 4)], ["ends inside zstd frame 2"]),
    "zstd: garbage after the last frame": (
        "a.jsonl.zst", zst(A) + b"garbage!",
        [0, 1, 2], {}, 1, [("corrupt_zstd", None)], ["no frame magic at byte"]),
    "zstd: skippable frame between frames": (
        "a.jsonl.zst", zst(A) + b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"skip!" + zst(B),
        list(range(6)), {}, 0, [], []),
    "gzip: bad CRC in the middle member": (
        "a.jsonl.gz", gzip.compress(A) + flip_crc(gzip.compress(B)) + gzip.compress(C),
        [0, 1, 2, 6, 7, 8], {"bad_checksum": 3}, 0, [("bad_checksum", 4)], ["member 2", "CRC32", "line(s) 4-6"]),
    "gzip: bad length in the last member": (
        "a.jsonl.gz", gzip.compress(A) + flip_last(gzip.compress(B)),
        [0, 1, 2], {"bad_checksum": 3}, 0, [("bad_checksum", 4)], ["member 2"]),
    "gzip: stored member, garbled content": (
        "a.jsonl.gz", garbled(gzip.compress(A + B, compresslevel=0)),
        [], {"bad_checksum": 6}, 0, [("bad_checksum", 1)], ["member 1", "CRC32"]),
    "gzip: invalid deflate data in the middle member": (  # the member's end is unknown: the rest is lost
        "a.jsonl.gz", gzip.compress(A) + bad_deflate(B) + gzip.compress(C),
        [0, 1, 2], {"bad_gzip": 1}, 1, [("bad_gzip", 4), ("bad_gzip", None)], ["member 2", "invalid deflate data"]),
    "gzip: truncated": (
        "a.jsonl.gz", gzip.compress(A + B, mtime=0)[:-30],
        [], {"truncated": _cut_gzip_lines(A + B, 30) + 1}, 0, [("truncated", 1)], ["ends inside gzip member 1"]),
    "gzip: cut in the second member's header": (
        "a.jsonl.gz", gzip.compress(A) + gzip.compress(B)[:5],
        [0, 1, 2], {}, 1, [("truncated", None)], ["header"]),
    "gzip: not gzip at all": (
        "a.jsonl.gz", A,
        [], {}, 1, [("not_gzip", None)], ["not a gzip file"]),
    "gzip: zero padding after the last member": (
        "a.jsonl.gz", gzip.compress(A) + gzip.compress(B) + b"\x00" * 100,
        list(range(6)), {}, 0, [], []),
    "gzip: garbage after the last member": (
        "a.jsonl.gz", gzip.compress(A) + b"garbage!!!!!",
        [0, 1, 2], {}, 1, [("bad_gzip", None)], ["no member header"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_compressed_input(case, tmp_path):
    name, data, kept, unreadable, files_unreadable, issues, words = CASES[case]
    res, docs = run_task(tmp_path, name, data)
    c = res.stats["sources"]["src"]
    kept = [(k, k) if isinstance(k, int) else k for k in kept]
    assert [d["row"] for d in docs] == [row for row, _ in kept]
    assert [d["text"] for d in docs] == [record(r)["text"] for _, r in kept]  # nothing garbled is kept
    assert c["unreadable"] == unreadable and c["files_unreadable"] == files_unreadable
    assert [(i["kind"], i["line"]) for i in res.issues] == issues
    if words:
        assert all(w in res.issues[0]["message"] for w in words), res.issues[0]["message"]
    assert all(i["file"] == name for i in res.issues)


def test_a_frame_too_large_to_hold_in_memory_is_held_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(compressed, "HOLD_BYTES", 1000)
    big = lines(0, 40)
    res, docs = run_task(tmp_path, "a.jsonl.zst", zst(big) + flip_last(zst(lines(40, 40))) + zst(lines(80, 3)))
    assert [d["row"] for d in docs] == list(range(40)) + [80, 81, 82]
    assert res.stats["sources"]["src"]["unreadable"] == {"bad_checksum": 40}
    res, docs = run_task(tmp_path / "gz", "a.jsonl.gz", gzip.compress(big))
    assert [d["text"] for d in docs] == [record(i)["text"] for i in range(40)]


def test_a_held_frame_is_bounded_in_memory(tmp_path, monkeypatch):
    """A checksummed frame is held until its end: in memory up to HOLD_BYTES, then on disk."""
    rng = random.Random(3)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(3000)]
    raw = b"".join(orjson.dumps({"text": " ".join(rng.choices(words, k=rng.randint(40, 80)))}) + b"\n"
                   for _ in range(20_000))
    path = tmp_path / "in" / "a.jsonl.zst"
    path.parent.mkdir()
    path.write_bytes(zst(raw))
    recipe = make_recipe(tmp_path, {"min_chars": 50})
    (task,) = ingest.stage.plan(recipe, RunDir(recipe.output))
    ingest.stage.run_task(task, recipe, RunDir(recipe.output))  # once untraced: one-time allocations
    peaks = {}
    for limit in (1 << 20, 64 << 20):
        monkeypatch.setattr(compressed, "HOLD_BYTES", limit)
        tracemalloc.start()
        try:
            res = ingest.stage.run_task(task, recipe, RunDir(recipe.output))
            peaks[limit] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert res.docs == 20_000 and res.errors == 0
    # held in memory, the frame adds its whole size to the peak; held on disk, at most the limit
    assert peaks[1 << 20] + 0.75 * len(raw) < peaks[64 << 20], (len(raw), peaks)


def test_the_head_of_a_file_releases_its_cut_frame(tmp_path):
    """`tinyprep plan` samples the first bytes of a file: there the cut frame is read unverified."""
    cobj = zstandard.ZstdCompressor(level=3, write_checksum=True).compressobj()
    first = cobj.compress(A) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)  # A in its own block
    path = tmp_path / "head.jsonl.zst"
    path.write_bytes(first + (cobj.compress(B) + cobj.flush())[:20])
    src = make_recipe(tmp_path, {}).sources[0]
    seen = {}
    for head in (False, True):
        events = list(readers.read_records({"url": str(path), "format": "jsonl.zst", "head": head}, src))
        seen[head] = ([t for e in events if isinstance(e, readers.Batch) for t in e.texts],
                      [(e.kind, e.line, e.rows, e.file) for e in events if isinstance(e, readers.Problem)])
    assert seen[False] == ([], [("truncated", 1, 4, False)])
    assert seen[True] == ([record(i)["text"] for i in range(3)], [("truncated", None, None, True)])


# ---------------------------------------------------------------------------------------------
# selection and subset keys found in no record


KEY_CASES = {
    "exclude": ({"select": {"exclude": {"meta.redpajama_set_nam": ["RedPajamaGithub"]}}},
                ["select.exclude", "'meta.redpajama_set_nam'"]),
    "include": ({"select": {"include": {"meta.set": ["RedPajamaC4"]}}}, ["select.include", "'meta.set'"]),
    "subset": ({"subset": "meta.redpajama_set_nam"}, ["subset", "'meta.redpajama_set_nam'"]),
    "subset and exclude": ({"subset": "meta.x", "select": {"exclude": {"meta.x": ["a"]}}},
                           ["select.exclude and subset", "'meta.x'"]),
}


def _run_stage(tmp_path: Path, src: dict, files: dict[str, bytes], **cfg):
    for name, data in files.items():
        (tmp_path / "in").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
    recipe = make_recipe(tmp_path, src, **cfg)
    return recipe, lambda r=recipe: run_stage(LocalExecutor(), "ingest", r, RunDir(r.output))


@pytest.mark.parametrize("case", list(KEY_CASES))
def test_a_key_in_no_record_fails_the_stage(case, tmp_path):
    src, words = KEY_CASES[case]
    recipe, run = _run_stage(tmp_path, src, {"a.jsonl.zst": zst(A + B), "b.jsonl": lines(10, 2)})
    with pytest.raises(ingest.IngestError) as err:
        run()
    msg = str(err.value)
    assert "\n" not in msg and "source src: a.jsonl.zst:" in msg and "(and 1 more)" in msg
    assert all(w in msg for w in words), msg
    assert "in none of the 6 records read" in msg and "on_unknown_key=warn" in msg
    records = [orjson.loads(p.read_bytes()) for p in sorted(Path(RunDir(recipe.output).tasks("ingest")).rglob("*"))
               if p.is_file()]
    assert len(records) == 2
    for r in records:  # reported first, whatever the cap on issues
        assert r["issues"][0]["kind"] == "unknown_key" and r["issues"][0]["line"] is None
    with pytest.raises(ingest.IngestError):  # a resumed run fails the same way
        run()


def test_a_key_missing_from_some_records_only_is_fine(tmp_path):
    data = lines(0, 3) + orjson.dumps({"text": LONG, "meta": {"other": 1}}) + b"\n"
    _, run = _run_stage(tmp_path, {"select": {"exclude": {"meta.redpajama_set_name": ["RedPajamaGithub"]}},
                                   "subset": "meta.redpajama_set_name"}, {"a.jsonl": data})
    report = run()
    c = report.stats["sources"]["src"]
    assert (c["read"], c["kept"], c["filtered"]) == (4, 3, {"selection": 1})
    assert set(c["subsets"]) == {"(missing)", *SETS}


def test_a_key_in_no_record_of_a_file_without_readable_records_is_not_judged(tmp_path):
    _, run = _run_stage(tmp_path, {"subset": "meta.nothing"}, {"a.jsonl": b"{bad\n"})
    report = run()
    assert report.stats["sources"]["src"]["unreadable"] == {"bad_json": 1}


def test_a_parquet_column_that_does_not_exist(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": [LONG] * 3, "lang": ["en", "fr", "en"]}), tmp_path / "in" / "a.parquet")
    _, run = _run_stage(tmp_path, {"select": {"exclude": {"language": ["fr"]}}}, {})
    with pytest.raises(ingest.IngestError, match="select.exclude key 'language' is in none of the 3 records"):
        run()
    _, run = _run_stage(tmp_path / "ok", {"select": {"exclude": {"lang": ["fr"]}}, "urls": [str(tmp_path / "in/*")]},
                        {})
    assert run().stats["sources"]["src"]["kept"] == 2


def test_on_unknown_key_warn_accepts_it(tmp_path):
    recipe, _ = _run_stage(tmp_path, {"subset": "meta.nope"}, {"a.jsonl": lines(0, 2)})
    # ingest.on_unknown_key is read with getattr (default "error"): set it whether or not the
    # recipe model declares it
    recipe = recipe.model_copy(update={"ingest": recipe.ingest.model_copy(update={"on_unknown_key": "warn"})})
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: logged.append(rec.getMessage())
    logging.getLogger("tinyprep").addHandler(handler)
    try:
        report = run_stage(LocalExecutor(), "ingest", recipe, RunDir(recipe.output))
    finally:
        logging.getLogger("tinyprep").removeHandler(handler)
    assert report.ok and report.stats["sources"]["src"]["kept"] == 2
    assert any("subset key 'meta.nope' is in none of the 2 records read" in m for m in logged), logged


# ---------------------------------------------------------------------------------------------
# through the CLI: one line, exit code 1


CLI_CASES = {
    "an input of unknown format": (
        {}, ["source web", "notes.txt", "unknown input format", ".jsonl.zst", ".parquet", "set its format"]),
    "a misspelled exclude key": (
        {"select": {"exclude": {"meta.redpajama_set_nam": ["RedPajamaGithub"]}}, "urls": ["*.jsonl"]},
        ["source web", "a.jsonl", "select.exclude key 'meta.redpajama_set_nam'", "misspelled"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_one_line(case, tmp_path):
    over, words = CLI_CASES[case]
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_bytes(lines(0, 2))
    (src / "notes.txt").write_text("not a corpus")
    source = {"name": "web", "urls": [str(src / "*")], **over}
    source["urls"] = [str(src / u) for u in over.get("urls", ["*"])]
    data = {"name": "t", "output": str(tmp_path / "run"), "stages": ["ingest"], "sources": [source]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    proc = tinyprep("run", str(tmp_path / "recipe.yaml"), "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in err[0], (word, err[0])
