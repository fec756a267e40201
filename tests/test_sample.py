"""Tests for pipeline.sample: the deterministic bundled sample corpus."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import defaultdict
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline import sample as S
from pipeline.sample import (
    GITHUB_SET,
    SAMPLE_VERSION,
    SLIMPAJAMA_SETS,
    STARCODER_COLUMNS,
    STARCODER_LANGUAGES,
    generate_sample,
    jaccard,
    shingles,
    slimpajama_normalize,
    starcoder_schema,
)


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _key(loc: dict) -> tuple[str, str, int]:
    return (loc["source"], loc["path"], loc["row"])


@pytest.fixture(scope="session")
def gen(tmp_path_factory):
    base = tmp_path_factory.mktemp("sample")
    a = generate_sample(base / "a")
    b = generate_sample(base / "b")
    return base, a, b


@pytest.fixture(scope="session")
def corpus(gen):
    """All records of sample 'a': {(source, path, row): (text, set_or_language)}."""
    base, info, _ = gen
    root = Path(info["root"])
    records = {}
    dctx = zstandard.ZstdDecompressor()
    for f in sorted((root / "slimpajama").rglob("*.jsonl.zst")):
        rel = f.relative_to(root / "slimpajama").as_posix()
        dobj = dctx.decompressobj()
        data = dobj.decompress(f.read_bytes())
        assert dobj.eof and dobj.unused_data == b"", f"{rel}: not exactly one zstd frame"
        assert data.endswith(b"\n")
        for row, line in enumerate(data.split(b"\n")[:-1]):
            rec = orjson.loads(line)
            assert set(rec) == {"text", "meta"}
            assert isinstance(rec["text"], str) and rec["text"]
            assert rec["meta"]["redpajama_set_name"] in SLIMPAJAMA_SETS
            records[("slimpajama", rel, row)] = (rec["text"], rec["meta"]["redpajama_set_name"])
    for f in sorted((root / "starcoderdata").rglob("*.parquet")):
        rel = f.relative_to(root / "starcoderdata").as_posix()
        table = pq.read_table(f)
        for row, content in enumerate(table.column("content").to_pylist()):
            records[("starcoderdata", rel, row)] = (content, rel.split("/")[0])
    return records


# --------------------------------------------------------------------------- helpers
def test_normalize_and_shingles():
    assert slimpajama_normalize("  Hello,\tWORLD!!\n\n  It's  (fine). ") == "hello world its fine"
    assert slimpajama_normalize("a - b") == "a b"
    assert shingles("abc") == {"abc"}
    assert shingles("") == set() and shingles("...") == set()
    assert shingles("abcdefghijklmn", n=13) == {"abcdefghijklm", "bcdefghijklmn"}
    assert shingles("Hello, World", n=5) == shingles("hello world", n=5)
    assert jaccard("The same text here.", "the SAME text, here") == 1.0
    assert 0.0 < jaccard("the quick brown fox jumps over", "the quick brown cat jumps over") < 1.0


# --------------------------------------------------------------------------- files
def test_layout_and_determinism(gen):
    base, a, b = gen
    ha, hb = _file_hashes(base / "a"), _file_hashes(base / "b")
    assert ha == hb
    assert a["root"] == str(base / "a")
    assert {k: v for k, v in a.items() if k != "root"} == {k: v for k, v in b.items() if k != "root"}
    slim = [p for p in ha if p.startswith("slimpajama/")]
    assert 8 <= len(slim) <= 12
    assert all(p.startswith("slimpajama/train/chunk") and p.endswith(".jsonl.zst") for p in slim)
    assert {p.split("/")[2] for p in slim} == {"chunk1", "chunk2"}
    star = [p for p in ha if p.startswith("starcoderdata/")]
    assert {p.split("/")[1] for p in star} == set(STARCODER_LANGUAGES)
    assert sum(p.startswith("starcoderdata/python/") for p in star) >= 2
    assert set(ha) == set(slim) | set(star) | {"planted.json", "SAMPLE_VERSION"}
    assert (base / "a" / "SAMPLE_VERSION").read_text().strip() == SAMPLE_VERSION == a["version"]
    stored = json.loads((base / "a" / "planted.json").read_text())
    assert "root" not in stored and stored == {k: v for k, v in a.items() if k != "root"}
    # no temporary directories left behind
    assert sorted(p.name for p in base.iterdir()) == ["a", "b"]


def test_total_size(gen):
    base, _, _ = gen
    total = sum(p.stat().st_size for p in (base / "a").rglob("*") if p.is_file())
    assert 2_000_000 <= total <= 8_000_000, total


def test_parquet_schema_and_row_groups(gen):
    _, info, _ = gen
    root = Path(info["root"]) / "starcoderdata"
    max_groups = 0
    ids = []
    for f in sorted(root.rglob("*.parquet")):
        meta = pq.ParquetFile(f)
        schema = meta.schema_arrow
        assert tuple(schema.names) == STARCODER_COLUMNS
        assert schema.equals(starcoder_schema(), check_metadata=False)
        rel = f.relative_to(root).as_posix()
        assert meta.metadata.num_rows == info["counts"]["files"]["starcoderdata"][rel] > 0
        max_groups = max(max_groups, meta.metadata.num_row_groups)
        table = meta.read()
        ids += table.column("id").to_pylist()
        assert min(table.column("max_stars_count").to_pylist()) >= 0
        assert all("/" in r for r in table.column("max_stars_repo_name").to_pylist())
        ext = STARCODER_LANGUAGES[rel.split("/")[0]]
        assert all(p.endswith(ext) for p in table.column("max_stars_repo_path").to_pylist())
    assert max_groups >= 4
    assert len(ids) == len(set(ids)) == info["counts"]["rows"]["starcoderdata"]


def test_slimpajama_records_and_counts(gen, corpus):
    _, info, _ = gen
    counts = info["counts"]
    slim = {k: v for k, v in corpus.items() if k[0] == "slimpajama"}
    per_file = defaultdict(int)
    per_set = defaultdict(int)
    nbytes = 0
    for (_, path, _), (text, name) in slim.items():
        per_file[path] += 1
        per_set[name] += 1
        nbytes += len(text.encode())
    assert dict(per_file) == counts["files"]["slimpajama"]
    assert dict(per_set) == counts["sets"]
    assert set(per_set) == set(SLIMPAJAMA_SETS)
    assert len(slim) == counts["rows"]["slimpajama"]
    assert nbytes == counts["text_bytes"]["slimpajama"]
    assert info["github_rows"] == per_set[GITHUB_SET]
    assert 0.07 <= info["github_rows"] / len(slim) <= 0.13
    books = [len(t) for t, s in slim.values() if s == "RedPajamaBook"]
    assert books and all(20_000 <= n <= 60_000 for n in books)
    star_bytes = sum(len(t.encode()) for k, (t, _) in corpus.items() if k[0] == "starcoderdata")
    assert star_bytes == counts["text_bytes"]["starcoderdata"]


# --------------------------------------------------------------------------- planted items
def test_near_duplicates(gen, corpus):
    _, info, _ = gen
    pairs = info["near_duplicates"]
    assert 120 <= len(pairs) <= 180
    assert len({p["target"] for p in pairs}) >= 8
    assert min(p["target"] for p in pairs) <= 0.35 and max(p["target"] for p in pairs) >= 0.9
    text_count = defaultdict(int)
    for text, _ in corpus.values():
        text_count[text] += 1
    for p in pairs:
        ta, sa = corpus[_key(p["a"])]
        tb, sb = corpus[_key(p["b"])]
        assert sa == sb and sa != GITHUB_SET
        j = jaccard(ta, tb)
        assert j == pytest.approx(p["jaccard"], abs=1e-12)
        assert abs(j - p["target"]) <= 0.02
        assert j < 1.0
        assert 1000 <= len(ta) <= 4000
        assert text_count[tb] == 1 and text_count[ta] == 1


def test_short_documents(gen, corpus):
    _, info, _ = gen
    planted = {_key(loc) for loc in info["short_documents"]}
    assert 30 <= len(planted) <= 50
    short = {k for k, (t, _) in corpus.items()
             if k[0] == "slimpajama" and len(slimpajama_normalize(t)) < 200}
    assert short == planted  # exactly the planted ones are short
    for k in planted:
        assert corpus[k][1] != GITHUB_SET and 0 < len(slimpajama_normalize(corpus[k][0])) < 200


def test_nfd_documents(gen, corpus):
    _, info, _ = gen
    items = info["nfd_documents"]
    assert 15 <= len(items) <= 25
    for item in items:
        text, name = corpus[_key(item)]
        assert name != GITHUB_SET
        nfc = unicodedata.normalize("NFC", text)
        assert text != nfc and unicodedata.normalize("NFD", text) == text
        assert hashlib.sha256(nfc.encode()).hexdigest() == item["nfc_sha256"]
    changed = {k for k, (t, s) in corpus.items()
               if k[0] == "slimpajama" and s != GITHUB_SET and unicodedata.normalize("NFC", t) != t}
    assert changed == {_key(i) for i in items}  # only the planted prose docs change under NFC


def test_exact_duplicates(gen, corpus):
    _, info, _ = gen
    groups = info["exact_duplicates"]
    assert 25 <= len(groups) <= 35
    cross_source = 0
    planted = {}
    for g in groups:
        locs = [g["original"]] + g["copies"]
        assert 1 <= len(g["copies"]) <= 3
        texts = {corpus[_key(loc)][0] for loc in locs}
        assert len(texts) == 1
        text = texts.pop()
        assert hashlib.sha256(text.encode()).hexdigest() == g["sha256"]
        assert len({(loc["source"], loc["path"]) for loc in locs}) == len(locs)  # all in different files
        cross_source += len({loc["source"] for loc in locs}) > 1
        planted[text] = {_key(loc) for loc in locs}
    assert cross_source >= 1
    assert any(corpus[_key(g["original"])][1] == "RedPajamaStackExchange" for g in groups)
    # no duplicates other than the planted ones, across both sources
    where = defaultdict(set)
    for k, (text, _) in corpus.items():
        where[text].add(k)
    dups = {t: ks for t, ks in where.items() if len(ks) > 1}
    assert dups == planted


# --------------------------------------------------------------------------- idempotence / atomicity
def test_idempotent_no_rewrite(gen):
    base, a, _ = gen
    root = base / "a"
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = generate_sample(root)
    assert again == a
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_stale_version_regenerates_in_place(gen):
    base, a, b = gen
    root = base / "b"
    (root / "SAMPLE_VERSION").write_text("old-version\n")
    (root / "unrelated.txt").write_text("keep me")
    planted = root / "planted.json"
    old_mtime = planted.stat().st_mtime_ns
    info = generate_sample(root)
    assert info["version"] == SAMPLE_VERSION
    assert planted.stat().st_mtime_ns != old_mtime  # really regenerated
    assert (root / "unrelated.txt").read_text() == "keep me"
    (root / "unrelated.txt").unlink()
    assert _file_hashes(root) == _file_hashes(base / "a")
    assert sorted(p.name for p in base.iterdir()) == ["a", "b"]


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(out):
        (out / "slimpajama").mkdir()
        (out / "slimpajama" / "partial.jsonl.zst").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "_build", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_sample(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
