"""Tests of pipeline/ingest/: every input built here, every count exact."""

from __future__ import annotations

import gzip
import importlib
import random
import re
import string
import threading
import time
import tracemalloc
import unicodedata
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline import ingest
from pipeline.ingest import readers, steps
from pipeline.layout import RunDir
from pipeline.recipe import parse_recipe
from pipeline.stats import merge_all
from pipeline.text import slimpajama_normalize

LONG = "The quick brown fox jumps over the lazy dog near the riverbank. " * 5  # 320 chars, kept
SETS = ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaWikipedia"]


# ---------------------------------------------------------------------------------------------
# helpers


def make_recipe(tmp_path: Path, sources: list[dict], **ingest_cfg):
    for s in sources:
        s.setdefault("name", "src")
    return parse_recipe({"name": "t", "output": str(tmp_path / "run"), "stages": ["ingest"],
                         "sources": sources, "ingest": {"max_errors": None, **ingest_cfg}})


def run_all(recipe) -> tuple[list, list[dict], dict]:
    tasks = ingest.stage.plan(recipe, RunDir(recipe.output))
    results = [ingest.stage.run_task(t, recipe, RunDir(recipe.output)) for t in tasks]
    for r in results:
        check_identity(r)
    return tasks, results, merge_all(r.stats for r in results)


def check_identity(result: dict) -> None:
    """read == kept + filtered + unreadable, per source and per subset; errors and docs agree."""
    errors = 0
    for c in result.stats["sources"].values():
        assert c["read"] == c["kept"] + sum(c["filtered"].values()) + sum(c["unreadable"].values())
        for sub in c["subsets"].values():
            assert sub["read"] == sub["kept"] + sum(sub["filtered"].values()) + sum(sub["unreadable"].values())
        for key in ("read", "kept", "bytes_read", "bytes_kept"):
            assert c[key] == sum(s[key] for s in c["subsets"].values())
        errors += sum(c["unreadable"].values()) + c["files_unreadable"]
    assert result.errors == errors
    assert result.docs == sum(c["read"] for c in result.stats["sources"].values())


def jsonl(records: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in records)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def docs_of(result: dict) -> list[dict]:
    return pq.read_table(result.outputs[0]).to_pylist()


def counts(merged: dict, source: str = "src") -> dict:
    return merged["sources"][source]


def slim_record(text: str, set_name: str = "RedPajamaC4") -> dict:
    return {"text": text, "meta": {"redpajama_set_name": set_name}}


def reference_is_short(text: str, min_chars: int) -> bool:
    """SlimPajama's filter written the direct way (regex), to compare against."""
    t = text.lower().translate(str.maketrans("", "", string.punctuation))
    return len(re.sub(r"\s+", " ", t).strip()) < min_chars


# ---------------------------------------------------------------------------------------------
# bad input, exact counts


def test_bad_records_are_counted_with_kind_and_line(tmp_path):
    lines = [
        orjson.dumps(slim_record(LONG)),                        # line 1, row 0: kept
        b'{"text": "unterminated',                             # line 2, row 1: bad_json
        b'{"text": "caf\xff ' + LONG.encode() + b'"}',          # line 3, row 2: bad_utf8
        b"",                                                   # line 4: blank, not a record
        b"[1, 2, 3]",                                          # line 5, row 3: not_an_object
        b"   ",                                                # line 6: blank
        orjson.dumps({"meta": {}}),                            # line 7, row 4: missing_text
        orjson.dumps({"text": None}),                          # line 8, row 5: null_text
        orjson.dumps({"text": 42}),                            # line 9, row 6: text_not_string
        orjson.dumps(slim_record("tiny")),                     # line 10, row 7: short
        orjson.dumps(slim_record(LONG + " second")),           # line 11, row 8: kept
        b'"just a string"',                                    # line 12, row 9: not_an_object
    ]
    write(tmp_path / "in" / "a.jsonl.zst", zst(b"\n".join(lines) + b"\n"))
    recipe = make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "*.jsonl.zst")]}])
    _, (res,), merged = run_all(recipe)
    c = counts(merged)
    assert c["read"] == 10 and c["kept"] == 2
    assert c["filtered"] == {"short": 1}
    assert c["unreadable"] == {"bad_json": 1, "bad_utf8": 1, "missing_text": 1, "not_an_object": 2,
                               "null_text": 1, "text_not_string": 1}
    assert c["files"] == 1 and c["files_unreadable"] == 0
    assert res.errors == 7
    assert [(i["kind"], i["line"]) for i in res.issues] == [
        ("bad_json", 2), ("bad_utf8", 3), ("not_an_object", 5), ("missing_text", 7), ("null_text", 8),
        ("text_not_string", 9), ("not_an_object", 12)]
    assert all(i["file"] == "a.jsonl.zst" and i["message"] for i in res.issues)
    docs = docs_of(res)
    assert [d["row"] for d in docs] == [0, 8]
    assert [d["id"] for d in docs] == [ingest.document_id("src", "a.jsonl.zst", r) for r in (0, 8)]
    assert c["subsets"]["(unreadable)"]["read"] == 7
    assert c["subsets"]["(all)"] == {"read": 3, "kept": 2, "bytes_read": len(LONG) * 2 + 7 + 4,
                                     "bytes_kept": len(LONG) * 2 + 7, "filtered": {"short": 1},
                                     "unreadable": {}}


def test_empty_and_not_zstd_files_are_file_level_problems(tmp_path):
    write(tmp_path / "in" / "a_empty.jsonl.zst", b"")
    write(tmp_path / "in" / "b_plain.jsonl.zst", jsonl([slim_record(LONG)]))  # not compressed
    write(tmp_path / "in" / "c_good.jsonl.zst", zst(jsonl([slim_record(LONG)])))
    write(tmp_path / "in" / "d_notgz.jsonl.gz", jsonl([slim_record(LONG)]))
    recipe = make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "*")]}])
    _, results, merged = run_all(recipe)
    c = counts(merged)
    assert (c["files"], c["files_unreadable"], c["read"], c["kept"]) == (4, 3, 1, 1)
    kinds = [[(i["kind"], i["line"]) for i in r.issues] for r in results]
    assert kinds == [[("empty_file", None)], [("not_zstd", None)], [], [("not_gzip", None)]]
    assert [r.errors for r in results] == [1, 1, 0, 1]
    for r in results:  # the output exists, with the schema, even when empty
        assert pq.read_schema(r.outputs[0]).equals(ingest.SCHEMA, check_metadata=False)
    assert [pq.read_metadata(r.outputs[0]).num_rows for r in results] == [0, 0, 1, 0]


def _flushed_zstd(pieces: list[bytes]) -> tuple[bytes, list[int]]:
    """One zstd frame with a block flushed after each piece; the end offset of each piece's blocks."""
    cobj = zstandard.ZstdCompressor(level=3).compressobj()
    out, ends = b"", []
    for p in pieces:
        out += cobj.compress(p) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        ends.append(len(out))
    return out + cobj.flush(), ends


def test_truncated_zstd_keeps_complete_records_and_counts_the_cut_one(tmp_path):
    records = [orjson.dumps(slim_record(f"{i} {LONG}")) + b"\n" for i in range(20)]
    # record 12 arrives in two blocks; the file is cut inside the second one
    pieces = records[:12] + [records[12][:100], records[12][100:]] + records[13:]
    data, ends = _flushed_zstd(pieces)
    cut = (ends[12] + ends[13]) // 2
    write(tmp_path / "in" / "cut.jsonl.zst", data[:cut])
    # the same records, cut inside a block that holds a whole record: no partial record
    data2, ends2 = _flushed_zstd(records)
    write(tmp_path / "in" / "cut2.jsonl.zst", data2[: (ends2[4] + ends2[5]) // 2])
    recipe = make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "*.jsonl.zst")]}])
    _, (r1, r2), merged = run_all(recipe)
    c1 = r1.stats["sources"]["src"]
    assert (c1["read"], c1["kept"], c1["unreadable"], c1["files_unreadable"]) == (13, 12, {"truncated": 1}, 0)
    assert [(i["kind"], i["line"]) for i in r1.issues] == [("truncated", 13)]
    assert [d["row"] for d in docs_of(r1)] == list(range(12))
    c2 = r2.stats["sources"]["src"]
    assert (c2["read"], c2["kept"], c2["unreadable"], c2["files_unreadable"]) == (5, 5, {}, 1)
    assert [(i["kind"], i["line"]) for i in r2.issues] == [("truncated", None)]
    assert counts(merged)["files"] == 2


def test_multi_frame_zstd_and_multi_member_gzip(tmp_path):
    a, b = jsonl([slim_record(LONG)] * 3), jsonl([slim_record(LONG + "!")] * 2)
    write(tmp_path / "in" / "frames.jsonl.zst", zst(a) + zst(b))
    write(tmp_path / "in" / "members.jsonl.gz", gzip.compress(a) + gzip.compress(b))
    write(tmp_path / "in" / "cut.jsonl.gz", gzip.compress(a + b)[:-30])
    recipe = make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "*")]}])
    _, (cut, frames, members), _ = run_all(recipe)
    for r in (frames, members):
        assert r.stats["sources"]["src"]["kept"] == 5 and r.errors == 0
    c = cut.stats["sources"]["src"]
    assert c["kept"] + sum(c["unreadable"].values()) == c["read"] and cut.errors >= 1
    assert cut.issues[-1]["kind"] == "truncated"


def test_huge_document_kept_under_limit_and_too_large_over_it(tmp_path):
    big = ("lorem ipsum dolor sit amet " * 1_200_000)[:30_000_000]
    write(tmp_path / "in" / "big.jsonl.zst", zst(jsonl([slim_record(LONG), slim_record(big), slim_record(LONG)])))
    src = {"urls": [str(tmp_path / "in" / "*.jsonl.zst")], "normalize": "nfc"}
    _, (res,), merged = run_all(make_recipe(tmp_path, [dict(src)]))  # default limit: 16 MiB
    c = counts(merged)
    assert (c["read"], c["kept"], c["filtered"]) == (3, 2, {"too_large": 1})
    assert c["bytes_read"] == 30_000_000 + 2 * len(LONG)
    assert [(i["kind"], i["line"]) for i in res.issues] == [("too_large", 2)]
    _, (res,), merged = run_all(make_recipe(tmp_path, [dict(src)], max_document_bytes=64 << 20))
    c = counts(merged)
    assert (c["read"], c["kept"], c["bytes_kept"]) == (3, 3, 30_000_000 + 2 * len(LONG))
    assert len(docs_of(res)[1]["text"]) == 30_000_000


def test_issues_are_capped_but_all_counted(tmp_path):
    write(tmp_path / "in" / "bad.jsonl", b"{oops\n" * 30 + jsonl([slim_record(LONG)]))
    _, (res,), merged = run_all(make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "*.jsonl")]}],
                                            report_issues=5))
    assert counts(merged)["unreadable"] == {"bad_json": 30} and res.errors == 30
    assert [i["line"] for i in res.issues] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------
# parquet


def _parquet(path: Path, texts: list, row_group_size: int = 1000, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {"id": [f"id{i}" for i in range(len(texts))], "content": pa.array(texts, pa.string()), **extra}
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def test_parquet_problems(tmp_path):
    _parquet(tmp_path / "in" / "python" / "a.parquet", [LONG, None, "x", LONG + "!"])
    p = tmp_path / "in" / "python" / "b_notext.parquet"
    pq.write_table(pa.table({"other": ["a", "b", "c"]}), p)
    write(tmp_path / "in" / "python" / "c_broken.parquet", b"PAR1 not really parquet")
    write(tmp_path / "in" / "python" / "d_empty.parquet", b"")
    recipe = make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "**" / "*.parquet")], "text_field": "content",
                                     "subset": "dir"}])
    _, results, merged = run_all(recipe)
    c = counts(merged)
    assert (c["files"], c["files_unreadable"], c["read"], c["kept"]) == (4, 2, 7, 2)
    assert c["unreadable"] == {"missing_text": 3, "null_text": 1}
    assert c["filtered"] == {"short": 1}
    assert c["subsets"]["python"]["kept"] == 2
    assert [[i["kind"] for i in r.issues] for r in results] == [
        ["null_text"], ["missing_text"], ["bad_parquet"], ["empty_file"]]
    assert results[0].issues[0]["line"] == 1  # the row
    assert [(d["row"], d["subset"]) for d in docs_of(results[0])] == [(0, "python"), (3, "python")]


def test_parquet_damaged_row_group_and_bad_utf8(tmp_path):
    texts = [f"{i} {LONG}" for i in range(30)]
    p = _parquet(tmp_path / "in" / "a.parquet", texts, row_group_size=10)
    md = pq.read_metadata(p)
    col = md.row_group(1).column(1)  # `content` of the second row group
    data = bytearray(p.read_bytes())
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data[start:start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    p.write_bytes(bytes(data))
    q = tmp_path / "in" / "b.parquet"
    pq.write_table(pa.table({"content": pa.array([LONG.encode(), b"\xff" + LONG.encode()], pa.binary())}), q)
    _, (ra, rb), _ = run_all(make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "*.parquet")],
                                                      "text_field": "content"}]))
    ca = ra.stats["sources"]["src"]
    assert (ca["read"], ca["kept"], ca["unreadable"], ca["files_unreadable"]) == (30, 20, {"bad_parquet": 10}, 0)
    assert [(i["kind"], i["line"]) for i in ra.issues] == [("bad_parquet", 10)]
    assert [d["row"] for d in docs_of(ra)] == list(range(10)) + list(range(20, 30))
    cb = rb.stats["sources"]["src"]
    assert (cb["read"], cb["kept"], cb["unreadable"]) == (2, 1, {"bad_utf8": 1})


def test_missing_file_raises_and_byte_order_mark(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "RETRY_BACKOFF_S", 0.0)
    write(tmp_path / "in" / "a.jsonl", b"\xef\xbb\xbf" + jsonl([slim_record(LONG)] * 2))
    b = write(tmp_path / "in" / "b.jsonl", jsonl([slim_record(LONG)]))
    recipe = make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "*.jsonl")]}])
    ta, tb = ingest.stage.plan(recipe, RunDir(recipe.output))
    b.unlink()
    ra = ingest.stage.run_task(ta, recipe, RunDir(recipe.output))
    assert ra.stats["sources"]["src"]["kept"] == 2 and ra.errors == 0
    # gone since the listing: not a bad file, a task that fails (the runner retries it)
    with pytest.raises(readers.InputUnavailable, match=r"b\.jsonl: cannot open \(4 attempt\(s\)\): FileNotFoundError"):
        ingest.stage.run_task(tb, recipe, RunDir(recipe.output))
    assert not (tmp_path / "run" / "docs" / "src" / "b.jsonl.parquet").exists()


def test_split_parquet_ids_equal_unsplit(tmp_path):
    texts = [f"{i} {LONG}" if i % 4 else "short" for i in range(23)]
    _parquet(tmp_path / "in" / "java" / "train-0.parquet", texts, row_group_size=5)
    src = {"urls": [str(tmp_path / "in" / "**" / "*.parquet")], "text_field": "content", "subset": "dir"}
    t_whole, whole, m_whole = run_all(make_recipe(tmp_path / "a", [dict(src)]))
    t_split, split, m_split = run_all(make_recipe(tmp_path / "b", [dict(src)], split_row_groups=1))
    assert [t.id for t in t_whole] == ["src/java/train-0.parquet"]
    assert [t.id for t in t_split] == [f"src/java/train-0.parquet@rg{i:05d}-{i + 1:05d}" for i in range(5)]
    assert split[1].outputs[0].endswith("docs/src/java/train-0.parquet@rg00001-00002.parquet")
    assert len({t.fingerprint for t in t_split}) == 5
    rows_whole = [(d["id"], d["row"], d["text"]) for d in docs_of(whole[0])]
    rows_split = [(d["id"], d["row"], d["text"]) for r in split for d in docs_of(r)]
    assert rows_whole == rows_split and len(rows_whole) == 17
    assert all(i == ingest.document_id("src", "java/train-0.parquet", r) for i, r, _ in rows_whole)
    assert m_whole == m_split
    c = counts(m_whole)
    assert (c["files"], c["read"], c["kept"], c["filtered"]) == (1, 23, 17, {"short": 6})


def test_parquet_footers_are_read_concurrently_and_plan_in_listing_order(tmp_path, monkeypatch):
    """Planning reads the footers FOOTER_READERS at a time (a slow store's round trips overlap);
    the tasks are those of one-at-a-time reads, in listing order, and of the unreadable footers
    the first listed is the one reported."""
    for i in range(8):
        _parquet(tmp_path / "in" / "java" / f"train-{i}.parquet", [f"{i} {LONG}"] * 6, row_group_size=2)
    recipe = make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "**" / "*.parquet")], "text_field": "content"}],
                         split_row_groups=1)
    module = importlib.import_module("pipeline.ingest.stage")  # `ingest.stage` is the stage object
    real, active, peak = module.parquet_splits, [0], [0]
    lock = threading.Lock()

    def slow_splits(url, every):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)  # a store's round trip
        try:
            return real(url, every)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(module, "parquet_splits", slow_splits)
    tasks = ingest.stage.plan(recipe, RunDir(recipe.output))
    assert peak[0] > 1
    monkeypatch.setattr(module, "FOOTER_READERS", 1)
    serial = ingest.stage.plan(recipe, RunDir(recipe.output))
    assert [(t.id, t.fingerprint, t.payload) for t in tasks] == [(t.id, t.fingerprint, t.payload) for t in serial]
    assert [t.id for t in tasks[:4]] == [f"src/java/train-0.parquet@rg{i:05d}-{i + 1:05d}" for i in range(3)] + [
        "src/java/train-1.parquet@rg00000-00001"]

    def failing(url, every):
        if url.endswith(("train-2.parquet", "train-6.parquet")):
            time.sleep(0.1 if url.endswith("train-2.parquet") else 0)  # the later-listed one fails first
            raise ingest.IngestError(f"planning ingest: {url}: storage failed")
        return real(url, every)

    monkeypatch.setattr(module, "FOOTER_READERS", 8)
    monkeypatch.setattr(module, "parquet_splits", failing)
    with pytest.raises(ingest.IngestError, match=r"train-2\.parquet: storage failed"):
        ingest.stage.plan(recipe, RunDir(recipe.output))


def test_select_dirs_is_exact(tmp_path):
    _parquet(tmp_path / "in" / "java" / "train-0.parquet", [LONG])
    _parquet(tmp_path / "in" / "javascript" / "train-0.parquet", [LONG, LONG])
    recipe = make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "**" / "*.parquet")], "text_field": "content",
                                     "subset": "dir", "select": {"dirs": ["java"]}}])
    tasks, _, merged = run_all(recipe)
    assert [t.id for t in tasks] == ["src/java/train-0.parquet"]
    assert list(counts(merged)["subsets"]) == ["java"] and counts(merged)["kept"] == 1


# ---------------------------------------------------------------------------------------------
# selection, normalization, filters


def test_selection_by_exact_metadata_match(tmp_path):
    recs = [slim_record(LONG, s) for s in SETS] + [slim_record(LONG, "RedPajamaGithubX"), {"text": LONG}]
    write(tmp_path / "in" / "a.jsonl", jsonl(recs))
    src = {"urls": [str(tmp_path / "in" / "*.jsonl")], "subset": "meta.redpajama_set_name",
           "metadata": ["meta.redpajama_set_name"],
           "select": {"exclude": {"meta.redpajama_set_name": ["RedPajamaGithub"]}}}
    _, (res,), merged = run_all(make_recipe(tmp_path, [src]))
    c = counts(merged)
    assert (c["read"], c["kept"], c["filtered"]) == (6, 5, {"selection": 1})
    assert c["subsets"]["RedPajamaGithub"]["filtered"] == {"selection": 1}
    assert c["subsets"]["(missing)"]["kept"] == 1
    docs = docs_of(res)
    assert [d["subset"] for d in docs] == ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaWikipedia",
                                          "RedPajamaGithubX", None]
    assert docs[0]["meta"] == '{"meta.redpajama_set_name":"RedPajamaCommonCrawl"}' and docs[-1]["meta"] == "{}"
    src["select"] = {"include": {"meta.redpajama_set_name": ["RedPajamaC4", "RedPajamaWikipedia"]}}
    _, (res,), merged = run_all(make_recipe(tmp_path / "inc", [src]))
    assert (counts(merged)["kept"], counts(merged)["filtered"]) == (2, {"selection": 4})


def test_nfc_is_applied(tmp_path):
    nfd = unicodedata.normalize("NFD", "Ça été très élégant à Zürich. " * 10)
    write(tmp_path / "in" / "a.jsonl", jsonl([{"text": nfd}, {"text": "“curly” café " * 30}]))
    _, (res,), merged = run_all(make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "*.jsonl")]}]))
    texts = [d["text"] for d in docs_of(res)]
    assert texts[0] == unicodedata.normalize("NFC", nfd) != nfd
    assert texts[1] == "“curly” café " * 30
    c = counts(merged)
    assert c["bytes_read"] == len(nfd.encode()) + len(texts[1].encode())
    assert c["bytes_kept"] == sum(len(t.encode()) for t in texts)
    _, (res,), _ = run_all(make_recipe(tmp_path / "off", [{"urls": [str(tmp_path / "in" / "*.jsonl")],
                                                            "normalize": "none"}]))
    assert docs_of(res)[0]["text"] == nfd


def test_nfc_inert_characters_never_change_under_nfc():
    # the second characters of every canonical composition (and Hangul's vowel and trailing jamo)
    second = {0x1161 + i for i in range(21)} | {0x11A8 + i for i in range(27)}
    for cp in range(0x110000):
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<") and len(d.split()) == 2:
            second.add(int(d.split()[1], 16))
    inert = [cp for a, b in steps._INERT_BLOCKS for cp in range(a, b + 1) if steps.nfc_inert(chr(cp))]
    assert len(inert) > 40_000
    for cp in inert:
        first = unicodedata.normalize("NFD", chr(cp))[0]
        assert cp not in second and ord(first) not in second and not unicodedata.combining(first), hex(cp)
    fullmatch = steps._nfc_inert_run()
    assert fullmatch("".join(map(chr, inert))) is not None
    assert all(fullmatch(c) is None for c in ("e\u0301", "\u0301", "\u2126", "\u212b", "\u2000", "\u0b3e", "\u1161",
                                              "\u037e", "\u0958", "\u0f73"))


def test_nfc_step_equals_unicodedata():
    rng = random.Random(4)
    inert = "éÉßñçøåÅ“”‘’—–…•€™©°±×÷ΩαβγЖжשׁ日本語한국어😀→★\u00a0\u3000"
    other = ["e\u0301", "u\u031b", "\u0301", "\u0323\u0302", "\u2126", "\u212b", "\u2000", "\u1100\u1161",
             "\uac00\u11a8", "\u0b47\u0b3e", "\u0958", "\u037e", "\u0f73", "\U0001d15e"]
    texts = []
    for _ in range(600):
        parts = rng.choices([string.ascii_letters + " .,", inert], k=rng.randrange(1, 40))
        words = ["".join(rng.choices(p, k=rng.randrange(1, 12))) for p in parts]
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words) + 1), rng.choice(other))
        texts.append(" ".join(words) * rng.choice([1, 1, 20]))
    texts += ["é" * 100, "e\u0301" + "a" * 1000, "日本語" * 50 + "\u2126"]
    T = list(texts)
    U = [t if t.isascii() else t.encode() for t in T]
    blen = [len(u) for u in U]
    steps.nfc(T, U, blen, list(range(len(T))))
    assert T == [unicodedata.normalize("NFC", t) for t in texts]
    assert [u if type(u) is str else u.decode() for u in U] == T and blen == [len(t.encode()) for t in T]
    assert sum(t != n for t, n in zip(texts, T)) > 100


def _varied_texts(rng: random.Random) -> list[str]:
    alphabet = (string.ascii_letters + string.digits + string.punctuation + " \t\n\r\x0b\x0c\x1c\x1f"
                + "\u00a0\u2003\u3000\u2028\u0085éÉßİΣσς日本“”—…\u0301")
    texts = ["", " ", "!!!", "a" * 199, "a" * 200, "A " * 100, "a " * 100, "İ" * 100, "İ" * 99,
             "!" * 100_000 + "word", "." * 5000 + "x" * 199, "." * 5000 + "x" * 200,
             " \u3000 " * 3000 + "y" * 150, "\u00a0".join(["ab"] * 70), "\u2003".join(["ab"] * 66),
             "…" * 300, "—" * 150 + "ab", "e\u0301" * 100, "Σ" * 200, "x" + " " * 10_000 + "y" * 198]
    for _ in range(400):
        n = rng.choice([5, 50, 150, 190, 200, 210, 260, 320, 600, 3000])
        weights = rng.choice([None, [1] * 62 + [30] * 32 + [5] * (len(alphabet) - 94)])
        texts.append("".join(rng.choices(alphabet, weights=weights, k=n)))
    return texts


def test_short_filter_equals_reference():
    rng = random.Random(7)
    for text in _varied_texts(rng):
        for m in (1, 50, 200):
            assert steps.is_short(text, m) == reference_is_short(text, m), (m, text[:80])
        assert len(slimpajama_normalize(text)) == steps.normalized_length(text)


def test_short_step_equals_reference():
    # the batch step (prefix bound, then is_short) on texts as the task hands them: ASCII str or UTF-8
    texts = _varied_texts(random.Random(11))
    texts += [t * 40 for t in texts[-50:]] + ["é" * 150 + "x" * 190, "x" * 150 + "\u3000" * 400 + "y" * 60]
    U = [t if t.isascii() else t.encode() for t in texts]
    for m in (1, 50, 200):
        got = steps.short(texts, U, list(range(len(texts))), m).positions
        assert got == [p for p, t in enumerate(texts) if reference_is_short(t, m)], m


def test_short_and_empty_filters_in_a_run(tmp_path):
    texts = ["   \n\t ", "", "!" * 3000, LONG, "x" * 100]
    write(tmp_path / "in" / "a.jsonl", jsonl([{"text": t} for t in texts]))
    _, _, merged = run_all(make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "*.jsonl")]}]))
    assert counts(merged)["filtered"] == {"short": 4}
    _, _, merged = run_all(make_recipe(tmp_path / "b", [{"urls": [str(tmp_path / "in" / "*.jsonl")],
                                                          "min_chars": None}]))
    assert (counts(merged)["filtered"], counts(merged)["kept"]) == ({"empty": 2}, 3)


def test_datatrove_filter_from_the_recipe(tmp_path):
    texts = [LONG, "Click here to subscribe! " * 20, LONG + " more", "SUBSCRIBE now " * 30]
    write(tmp_path / "in" / "a.jsonl", jsonl([{"text": t} for t in texts]))
    src = {"urls": [str(tmp_path / "in" / "*.jsonl")],
           "filters": [{"class": "datatrove.pipeline.filters.RegexFilter", "args": {"regex_exp": "(?i)subscribe"}}]}
    _, (res,), merged = run_all(make_recipe(tmp_path, [src]))
    assert (counts(merged)["kept"], counts(merged)["filtered"]) == (2, {"RegexFilter": 2})
    assert [d["row"] for d in docs_of(res)] == [0, 2]


# ---------------------------------------------------------------------------------------------
# formats, determinism, plan


def test_all_formats_give_the_same_documents(tmp_path):
    recs = [slim_record(f"{i} {LONG}", SETS[i % 4]) for i in range(50)] + [slim_record("short")]
    raw = jsonl(recs)
    write(tmp_path / "in" / "a.jsonl", raw)
    write(tmp_path / "in" / "b.json", raw)
    write(tmp_path / "in" / "c.jsonl.gz", gzip.compress(raw))
    write(tmp_path / "in" / "d.jsonl.zst", zst(raw))
    (tmp_path / "in" / "e.parquet").parent.mkdir(exist_ok=True)
    pq.write_table(pa.table({"text": [r["text"] for r in recs],
                             "meta": [r["meta"] for r in recs]}), tmp_path / "in" / "e.parquet", row_group_size=7)
    src = {"urls": [str(tmp_path / "in" / "*")], "subset": "meta.redpajama_set_name",
           "metadata": ["meta.redpajama_set_name"]}
    tasks, results, merged = run_all(make_recipe(tmp_path, [src], rows_per_group=16))
    assert [t.payload["format"] for t in tasks] == ["jsonl", "jsonl", "jsonl.gz", "jsonl.zst", "parquet"]
    seen = [[(d["row"], d["text"], d["subset"], d["meta"]) for d in docs_of(r)] for r in results]
    assert all(s == seen[0] for s in seen) and len(seen[0]) == 50
    assert [rg.num_rows for rg in (pq.ParquetFile(results[0].outputs[0]).metadata.row_group(i)
                                   for i in range(4))] == [16, 16, 16, 2]
    assert counts(merged)["read"] == 5 * 51 and counts(merged)["subsets"]["RedPajamaC4"]["kept"] == 5 * 13


def test_output_is_byte_identical_across_runs(tmp_path):
    rng = random.Random(3)
    recs = [slim_record(" ".join(rng.choice(["alpha", "beta", "γάμμα", "e\u0301"]) for _ in range(80)),
                        rng.choice(SETS)) for _ in range(3000)]
    write(tmp_path / "in" / "a.jsonl.zst", zst(jsonl(recs) + b"{bad\n"))
    src = {"urls": [str(tmp_path / "in" / "*.jsonl.zst")], "subset": "meta.redpajama_set_name",
           "metadata": ["meta.redpajama_set_name"]}
    outs = []
    for run in ("r1", "r2"):
        _, (res,), _ = run_all(make_recipe(tmp_path / run, [dict(src)], rows_per_group=1000))
        outs.append(Path(res.outputs[0]).read_bytes())
    assert outs[0] == outs[1]
    assert not list((tmp_path / "r1" / "run" / "docs").rglob("*.tmp-*"))


@pytest.mark.parametrize("codec", [{"parquet_compression": "zstd", "parquet_compression_level": -5},
                                   {"parquet_compression": "zstd", "parquet_compression_level": 3},
                                   {"parquet_compression": "lz4_raw"}, {"parquet_compression": "snappy"},
                                   {"parquet_compression": "none"}])
def test_every_codec_writes_the_same_documents(tmp_path, codec):
    rng = random.Random(5)
    recs = [slim_record(" ".join(rng.choice(["alpha", "beta", "γάμμα", "e\u0301", "“q”"]) for _ in range(80)),
                        rng.choice(SETS)) for _ in range(300)]
    write(tmp_path / "in" / "a.jsonl.zst", zst(jsonl(recs)))
    src = {"urls": [str(tmp_path / "in" / "*.jsonl.zst")], "subset": "meta.redpajama_set_name",
           "metadata": ["meta.redpajama_set_name"]}
    _, (ref,), _ = run_all(make_recipe(tmp_path / "ref", [dict(src)], rows_per_group=100))
    _, (res,), _ = run_all(make_recipe(tmp_path / "codec", [dict(src)], rows_per_group=100, **codec))
    assert pq.read_table(res.outputs[0]).equals(pq.read_table(ref.outputs[0]))
    md = pq.ParquetFile(res.outputs[0]).metadata
    text = md.schema.names.index("text")
    expected = {"zstd": "ZSTD", "lz4_raw": "LZ4", "snappy": "SNAPPY", "none": "UNCOMPRESSED"}  # pyarrow's names
    assert {md.row_group(i).column(text).compression for i in range(md.num_row_groups)} == {
        expected[codec["parquet_compression"]]}
    ref_md = pq.ParquetFile(ref.outputs[0]).metadata
    assert ref_md.row_group(0).column(text).compression == "ZSTD"  # the default
    size = Path(res.outputs[0]).stat().st_size
    if codec.get("parquet_compression_level") == 3:
        assert size < Path(ref.outputs[0]).stat().st_size  # level 3 compresses more than the default 1
    if codec["parquet_compression"] == "none":
        assert size > sum(len(r["text"].encode()) for r in recs)


def test_compression_level_is_for_zstd_only(tmp_path):
    from pipeline.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"ingest.*parquet_compression_level is a zstd level; .*'snappy'"):
        make_recipe(tmp_path, [{"urls": ["x.jsonl"]}], parquet_compression="snappy", parquet_compression_level=3)
    with pytest.raises(RecipeError, match=r"ingest\.parquet_compression_level"):
        make_recipe(tmp_path, [{"urls": ["x.jsonl"]}], parquet_compression_level=23)
    assert make_recipe(tmp_path, [{"urls": ["x.jsonl"]}], parquet_compression_level=-7).ingest.parquet_compression_level == -7


def test_plan_formats_and_fingerprints(tmp_path):
    write(tmp_path / "in" / "a.jsonl.zst", zst(jsonl([slim_record(LONG)])))
    base = {"urls": [str(tmp_path / "in" / "*")], "weight": 0.5}
    fp = lambda src=None, **cfg: ingest.stage.plan(make_recipe(tmp_path, [dict(base, **(src or {}))], **cfg),
                                                   RunDir(str(tmp_path / "run")))[0].fingerprint
    ref = fp()
    assert fp({"weight": 0.7}) == ref and fp(max_errors=5) == ref and fp(report_issues=3) == ref
    assert fp(max_document_bytes=100) != ref and fp(rows_per_group=10) != ref
    assert fp({"min_chars": 10}) != ref
    # the codec encodes the same documents: changing it redoes nothing (nor dedup, tokenize after it)
    assert fp(parquet_compression="snappy") == ref == fp(parquet_compression="none")
    assert fp(parquet_compression="zstd", parquet_compression_level=-5) == ref
    write(tmp_path / "in2" / "b.txt", b"hello")
    with pytest.raises(ingest.IngestError, match="b.txt"):
        ingest.stage.plan(make_recipe(tmp_path / "x", [{"urls": [str(tmp_path / "in2" / "*")]}]), RunDir(str(tmp_path / "x")))


def test_document_id_definition():
    import hashlib

    # the documented definition, computed here with Python integers
    def splitmix64(x):
        m = (1 << 64) - 1
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    k = int.from_bytes(hashlib.blake2b(b"slim/chunk1/x.jsonl.zst", digest_size=8).digest(), "little")
    expected = splitmix64((k + 8 * 0x9E3779B97F4A7C15) % (1 << 64))
    assert ingest.document_id("slim", "chunk1/x.jsonl.zst", 7) == expected
    ids = ingest.document_ids("slim", "chunk1/x.jsonl.zst", range(100_000))
    assert len(set(ids.tolist())) == 100_000  # no collision within a file
    assert list(ingest.document_ids("slim", "chunk1/x.jsonl.zst", [7, 8])) == [
        ingest.document_id("slim", "chunk1/x.jsonl.zst", r) for r in (7, 8)]


# ---------------------------------------------------------------------------------------------
# I/O errors, streaming


class _FlakyFile:
    """A file that raises OSError once its read position passes `fail_at` (`times` times); with
    `below`, on reads that start before `fail_at` instead."""

    state = {"failures": 0}

    def __init__(self, path, fail_at, times, below=False):
        self.fh, self.fail_at, self.times, self.below = open(path, "rb"), fail_at, times, below

    def read(self, n):
        pos = self.fh.tell()
        hit = pos < self.fail_at if self.below else pos + n > self.fail_at
        if hit and _FlakyFile.state["failures"] < self.times:
            _FlakyFile.state["failures"] += 1
            raise OSError("connection reset")
        return self.fh.read(n)

    def seek(self, *a):
        return self.fh.seek(*a)

    def close(self):
        self.fh.close()


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst"])
@pytest.mark.parametrize("times", [2, 100])
def test_io_error_mid_file(tmp_path, monkeypatch, times, fmt):
    rng = random.Random(5)  # text that does not compress away: the failure falls mid-file in both formats
    raw = jsonl([slim_record(" ".join("".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(60)))
                 for _ in range(40)])
    data = raw if fmt == "jsonl" else zst(raw)
    write(tmp_path / "in" / f"a.{fmt}", data)
    _FlakyFile.state = {"failures": 0}
    monkeypatch.setattr(readers, "RETRY_BACKOFF_S", 0.0)
    monkeypatch.setattr(readers, "RAW_READ", 4096)
    monkeypatch.setattr(readers, "_RAW_READ_COMPRESSED", 1024)
    monkeypatch.setattr(readers, "open_input", lambda url: _FlakyFile(url, len(data) // 2, times))
    recipe = make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "*")]}])
    if times <= readers.OPEN_RETRIES:  # re-opened and resumed at the same offset: nothing lost
        _, (res,), merged = run_all(recipe)
        assert counts(merged)["kept"] == 40 and res.errors == 0 and _FlakyFile.state["failures"] == times
        return
    # a connection that stays broken fails the task; nothing read before it is counted or kept
    (task,) = ingest.stage.plan(recipe, RunDir(recipe.output))
    with pytest.raises(readers.InputUnavailable, match=r"read failed at byte \d+ \(4 attempt\(s\)\): OSError"):
        ingest.stage.run_task(task, recipe, RunDir(recipe.output))
    assert _FlakyFile.state["failures"] == readers.OPEN_RETRIES + 1
    assert not list((tmp_path / "run" / "docs").rglob("*.parquet"))


@pytest.mark.parametrize("times", [2, 100])
def test_parquet_io_error_in_a_row_group_is_not_bad_parquet(tmp_path, monkeypatch, times):
    rng = random.Random(6)
    texts = [" ".join("".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(60)) for _ in range(400)]
    path = _parquet(tmp_path / "in" / "a.parquet", texts, row_group_size=100)
    md = pq.ParquetFile(path).metadata
    footer = max(c.data_page_offset + c.total_compressed_size  # where the data of the row groups ends
                 for c in (md.row_group(g).column(k) for g in range(4) for k in range(md.num_columns)))
    assert path.stat().st_size - footer < 64 << 10 < footer  # the footer read does not reach the row groups
    _FlakyFile.state = {"failures": 0}
    monkeypatch.setattr(readers, "RETRY_BACKOFF_S", 0.0)
    monkeypatch.setattr(readers, "open_input", lambda url: _FlakyFile(url, footer // 2, times, below=True))
    recipe = make_recipe(tmp_path, [{"urls": [str(path)], "text_field": "content"}])
    if times <= readers.OPEN_RETRIES:
        _, (res,), merged = run_all(recipe)
        assert counts(merged)["kept"] == 400 and res.errors == 0 and _FlakyFile.state["failures"] == times
        return
    (task,) = ingest.stage.plan(recipe, RunDir(recipe.output))
    with pytest.raises(readers.InputUnavailable, match=r"a\.parquet: read failed at byte \d+ \(4 attempt\(s\)\)"):
        ingest.stage.run_task(task, recipe, RunDir(recipe.output))


def test_streaming_memory_is_bounded(tmp_path):
    rng = random.Random(1)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)]
    lines, size = [], 0
    while size < 40_000_000:
        text = " ".join(rng.choices(words, k=rng.randint(20, 60)))
        lines.append(orjson.dumps({"text": text, "meta": {"redpajama_set_name": "RedPajamaC4"}}))
        size += len(lines[-1]) + 1
    raw = b"\n".join(lines) + b"\n"
    write(tmp_path / "in" / "big.jsonl.zst", zstandard.ZstdCompressor(level=1).compress(raw))
    del lines
    recipe = make_recipe(tmp_path, [{"urls": [str(tmp_path / "in" / "*")], "min_chars": 50}])
    tasks = ingest.stage.plan(recipe, RunDir(recipe.output))
    tracemalloc.start()
    try:
        res = ingest.stage.run_task(tasks[0], recipe, RunDir(recipe.output))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.docs == raw.count(b"\n") and res.errors == 0
    assert peak < len(raw) / 4, f"peak traced memory {peak / 1e6:.1f} MB for {len(raw) / 1e6:.1f} MB of input"
