"""pipeline/formats: Megatron .bin/.idx, LITPKDS chunks, manifest.json and mixture.json.

The files we write are read back here by readers written in this file from the byte layouts in
REFERENCES.md (struct / np.frombuffer), not by the project's readers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct

import numpy as np
import orjson
import pytest
from spec_readers import (
    SPEC_MEGATRON_DTYPES,
    spec_read_litpkds,
    spec_read_megatron,
)

from pipeline.formats import FormatError, litpkds
from pipeline.formats.manifest import (
    ManifestError,
    ShardEntry,
    TokenizerInfo,
    load_manifest,
    load_mixture,
    load_plan,
    make_manifest,
    manifest_fingerprint,
    parse_manifest,
    parse_mixture,
    safe_relative_path,
    shard_prefix,
    write_manifest,
)
from pipeline.formats.megatron import (
    DTYPE_CODES,
    MegatronReader,
    MegatronWriter,
    check_vocab_fits,
    dtype_for_vocab,
    read_index,
)

# --- independent readers, from the spec ---------------------------------------------------------

# --- Megatron ----------------------------------------------------------------------------------


def _docs(seed=0, n=50, vocab=4000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(0, 300)).astype(np.int64) for _ in range(n)]


def test_megatron_round_trip_read_by_the_spec(tmp_path):
    docs = _docs()
    w = MegatronWriter(str(tmp_path / "s"), np.uint16)
    for d in docs[:20]:
        w.add_document(d)
    w.add_documents(np.concatenate(docs[20:]), np.array([len(d) for d in docs[20:]]))
    meta = w.close()
    got = spec_read_megatron(tmp_path / "s")
    assert [list(g) for g in got] == [list(d) for d in docs]
    assert meta["docs"] == 50 and meta["tokens"] == sum(map(len, docs))
    assert meta["bin_bytes"] == 2 * meta["tokens"] == (tmp_path / "s.bin").stat().st_size
    assert meta["bin_sha256"] == hashlib.sha256((tmp_path / "s.bin").read_bytes()).hexdigest()
    assert meta["idx_sha256"] == hashlib.sha256((tmp_path / "s.idx").read_bytes()).hexdigest()
    r = MegatronReader(str(tmp_path / "s"))
    assert r.dtype == np.uint16 and r.num_docs == 50 and r.doc_lengths.dtype == np.int32
    assert [list(r.document(i)) for i in range(50)] == [list(d) for d in docs]
    assert int(r.doc_pointers[-1]) == 2 * sum(map(len, docs[:-1]))
    assert list(tmp_path.iterdir()) and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_megatron_empty_shard_and_int32(tmp_path):
    MegatronWriter(str(tmp_path / "e"), np.uint16).close()
    assert spec_read_megatron(tmp_path / "e") == [] and MegatronReader(str(tmp_path / "e")).num_docs == 0
    w = MegatronWriter(str(tmp_path / "big"), np.int32)
    w.add_document(np.array([70000, 1, 2]))
    w.close()
    assert [list(d) for d in spec_read_megatron(tmp_path / "big")] == [[70000, 1, 2]]


def test_dtype_codes_and_vocab_fit():
    assert {k: v.name for k, v in DTYPE_CODES.items()} == {k: np.dtype(v).name for k, v in SPEC_MEGATRON_DTYPES.items()}
    assert dtype_for_vocab(32000) == np.uint16 and dtype_for_vocab(65499) == np.uint16
    assert dtype_for_vocab(65500) == np.int32 and dtype_for_vocab(128256) == np.int32
    check_vocab_fits(np.uint16, 65536)
    with pytest.raises(FormatError, match="vocabulary of 70000 ids does not fit dtype uint16"):
        check_vocab_fits(np.uint16, 70000)


def test_writer_refuses_tokens_that_do_not_fit_and_aborts_cleanly(tmp_path):
    with pytest.raises(FormatError, match="token id 70000 does not fit dtype uint16"):
        with MegatronWriter(str(tmp_path / "x"), np.uint16) as w:
            w.add_document(np.array([1, 70000]))
    assert list(tmp_path.iterdir()) == []  # nothing under a final or temporary name


def _shard(tmp_path, name="s"):
    w = MegatronWriter(str(tmp_path / name), np.uint16)
    for d in _docs(1, 10):
        w.add_document(d)
    w.close()
    return tmp_path / name


@pytest.mark.parametrize("corrupt,message", [
    (lambda p: p.with_suffix(".idx").write_bytes(b"NOTANIDX!" + p.with_suffix(".idx").read_bytes()[9:]), "bad magic"),
    (lambda p: _patch(p.with_suffix(".idx"), 9, struct.pack("<Q", 2)), "unsupported index version 2"),
    (lambda p: _patch(p.with_suffix(".idx"), 17, struct.pack("<B", 9)), "unknown dtype code 9"),
    (lambda p: _truncate(p.with_suffix(".bin"), 7), "truncated"),
    (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes() + b"xx"), "the index describes"),
    (lambda p: _truncate(p.with_suffix(".idx"), 8), "sequences and"),
    (lambda p: _truncate(p.with_suffix(".idx"), 10 ** 6), "truncated header"),
    (lambda p: p.with_suffix(".bin").unlink(), "missing"),
    (lambda p: _patch(p.with_suffix(".idx"), 34 + 40 + 8, struct.pack("<q", 3)), "sequence_pointers"),
])
def test_reader_names_each_corruption(tmp_path, corrupt, message):
    p = _shard(tmp_path)
    corrupt(p)
    with pytest.raises(FormatError, match=message) as e:
        MegatronReader(str(p))
    assert str(p) in str(e.value)


def test_read_index_reads_only_the_index(tmp_path):
    p = _shard(tmp_path)
    want = spec_read_megatron(p)
    dtype, lengths, pointers = read_index(str(p))
    assert dtype == np.uint16 and lengths.tolist() == [len(d) for d in want]
    assert pointers.tolist() == (np.cumsum([0] + lengths.tolist()[:-1]) * 2).tolist()
    assert read_index(str(p), pointers=False)[2] is None
    p.with_suffix(".bin").unlink()  # the .bin is never opened
    assert read_index(str(p))[1].tolist() == lengths.tolist()


@pytest.mark.parametrize("corrupt,message", [
    (lambda p: p.with_suffix(".idx").write_bytes(b"NOTANIDX!" + p.with_suffix(".idx").read_bytes()[9:]), "bad magic"),
    (lambda p: _patch(p.with_suffix(".idx"), 9, struct.pack("<Q", 2)), "unsupported index version 2"),
    (lambda p: _patch(p.with_suffix(".idx"), 17, struct.pack("<B", 9)), "unknown dtype code 9"),
    (lambda p: _truncate(p.with_suffix(".idx"), 8), "sequences and"),
    (lambda p: _truncate(p.with_suffix(".idx"), 10 ** 6), "truncated header"),
    (lambda p: p.with_suffix(".idx").unlink(), "missing"),
])
def test_read_index_names_each_corruption(tmp_path, corrupt, message):
    p = _shard(tmp_path)
    corrupt(p)
    with pytest.raises(FormatError, match=message) as e:
        read_index(str(p))
    assert str(p) in str(e.value)


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _truncate(path, nbytes):
    raw = path.read_bytes()
    path.write_bytes(raw[:max(len(raw) - nbytes, 0)])


# --- LITPKDS -----------------------------------------------------------------------------------


def test_litpkds_full_chunks_only_read_by_the_spec(tmp_path):
    stream = np.arange(1, 1000, dtype=np.uint16)
    w = litpkds.ChunkWriter(str(tmp_path), "train_x", 100, np.uint16, sep=1)
    for part in np.array_split(stream, 7):
        w.add(part)
    assert w.close() == 99  # 999 tokens: 9 full chunks, 99 dropped
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == [f"train_x_{i:010d}.bin" for i in range(9)]
    got = []
    for f in files:
        dt, chunk, toks = spec_read_litpkds(f)
        assert dt == np.uint16 and chunk == 100
        assert f.read_bytes()[15] == 8  # uint16 is code 8 in LITPKDS too
        got.append(toks)
    assert np.array_equal(np.concatenate(got), stream[:900])
    assert litpkds.DTYPE_CODES[6] == np.float32 and litpkds.DTYPE_CODES[7] == np.float64  # swapped vs Megatron
    assert litpkds.DEFAULT_CHUNK_SIZE == 2049 * 1024
    with pytest.raises(FormatError, match="a chunk of 100 uint16 tokens"):
        _truncate(files[0], 2)
        litpkds.read_chunk(str(files[0]))


# --- manifest.json -----------------------------------------------------------------------------


def _manifest(tmp_path) -> dict:
    shards = []
    for source, split, n in (("a", "train", 3), ("a", "validation", 1), ("b", "train", 2)):
        for i in range(n):
            path = f"shards/{source}/{split}/{i:06d}-0000"
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            w = MegatronWriter(str(tmp_path / path), np.uint16)
            for d in _docs(i + n, 5):
                w.add_document(d)
            meta = w.close()
            shards.append(ShardEntry(path=path, source=source, split=split, dtype="uint16", **meta))
    info = TokenizerInfo(path="tokenizer.model", sha256="0" * 64, vocab_size=4000, bos_id=1, eos_id=2)
    m = make_manifest(info, True, False, "uint16", list(reversed(shards)))
    write_manifest(str(tmp_path), m)
    return json.loads((tmp_path / "manifest.json").read_text())


def test_manifest_round_trip(tmp_path):
    data = _manifest(tmp_path)
    assert data["format"] == "tinyprep-manifest" and data["version"] == 1
    assert [s["path"] for s in data["shards"]] == sorted(s["path"] for s in data["shards"])
    assert data["sources"]["a"]["train"]["shards"] == 3 and data["sources"]["b"]["validation"]["docs"] == 0
    m = load_manifest(str(tmp_path))
    assert m.tokenizer.vocab_size == 4000 and len(m.shards_of("a", "train")) == 3
    assert shard_prefix(str(tmp_path), m.shards[0]) == f"{tmp_path}/{m.shards[0].path}"


@pytest.mark.parametrize("path", ["../outside/x", "shards/../../x", "/etc/passwd", "s3://bucket/x", "C:/x",
                                  "shards\\..\\x", "./shards/x", ""])
def test_manifest_paths_must_stay_inside_the_run(tmp_path, path):
    data = _manifest(tmp_path)
    data["shards"][0]["path"] = path
    (tmp_path / "manifest.json").write_bytes(orjson.dumps(data))
    with pytest.raises(ManifestError, match=r"shards\[0\]\.path") as e:
        load_manifest(str(tmp_path))
    assert repr(path) in str(e.value) or path == ""
    with pytest.raises(ManifestError):
        safe_relative_path(path, "x")


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(version=2), "unsupported version 2"),
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d["tokenizer"].update(vocab_size=70000), "70000 ids does not fit dtype uint16"),
    (lambda d: d["shards"][0].update(docs=99), "per-source totals"),
    (lambda d: d["shards"][0].update(bin_sha256="zz"), "bin_sha256: must be a sha256"),
    (lambda d: d["shards"][0].update(split="test"), "split"),
    (lambda d: d["shards"].reverse(), "sorted"),
    (lambda d: d["shards"][0].pop("tokens"), r"shards\[0\]\.tokens: is required"),
    (lambda d: d["shards"][1].update(path=d["shards"][0]["path"]), "listed twice"),
])
def test_manifest_validation_names_the_key(tmp_path, edit, message):
    data = _manifest(tmp_path)
    edit(data)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(data, "manifest.json")


def test_manifest_not_json_or_missing(tmp_path):
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(str(tmp_path))


# --- mixture.json ------------------------------------------------------------------------------


def _mixture(tmp_path) -> dict:
    data = _manifest(tmp_path)
    m = load_manifest(str(tmp_path))
    weights = {"a": 0.75, "b": 0.25}
    sources = []
    for name, w, k in (("a", 0.75, 3), ("b", 0.25, 1)):
        avail = data["sources"][name]["train"]["tokens"]
        spe = (avail - 1) // 16
        sources.append({"name": name, "weight": w, "available_tokens": avail, "samples_per_epoch": spe,
                        "samples": k, "epochs": k / spe, "tokens": k * 16,
                        "shards": [s.path for s in m.shards_of(name)]})
    mix = {"format": "tinyprep-mixture", "version": 1, "seq_len": 16, "seed": 3, "token_budget": 64,
           "weights": "explicit", "manifest_sha256": hashlib.sha256((tmp_path / "manifest.json").read_bytes()).hexdigest(),
           "fingerprint": manifest_fingerprint(m, weights, 16, 3), "sources": sources, "total_samples": 4,
           "warnings": []}
    (tmp_path / "mixture.json").write_bytes(orjson.dumps(mix))
    return mix


def test_mixture_loads_and_checks_the_manifest(tmp_path):
    mix = _mixture(tmp_path)
    loaded = load_mixture(str(tmp_path))
    assert loaded.total_samples == 4 and loaded.source("a").shards == mix["sources"][0]["shards"]
    # the manifest changes after planning: the loader refuses the plan
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    with pytest.raises(ManifestError, match="manifest.json changed"):
        load_mixture(str(tmp_path))
    # a wrong fingerprint
    mix2 = copy.deepcopy(mix)
    mix2["manifest_sha256"] = hashlib.sha256((tmp_path / "manifest.json").read_bytes()).hexdigest()
    mix2["seed"] = 4
    (tmp_path / "mixture.json").write_bytes(orjson.dumps(mix2))
    with pytest.raises(ManifestError, match="fingerprint"):
        load_mixture(str(tmp_path))


def test_load_plan_reads_both_files_and_says_which_stage_is_missing(tmp_path):
    mix = _mixture(tmp_path)
    manifest, mixture = load_plan(str(tmp_path))
    assert mixture.fingerprint == mix["fingerprint"]
    assert [s.path for s in manifest.shards if s.split == "train"] == [p for s in mix["sources"] for p in s["shards"]]
    assert load_mixture(str(tmp_path), check_manifest=False).fingerprint == mixture.fingerprint
    (tmp_path / "mixture.json").unlink()
    with pytest.raises(ManifestError, match="mixture.json: missing; run the mix stage first"):
        load_plan(str(tmp_path))
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="manifest.json: missing; run the tokenize stage first"):
        load_plan(str(tmp_path))


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(version=7), "unsupported version 7"),
    (lambda d: d["sources"][0].update(weight=0.5), "weights sum"),
    (lambda d: d["sources"][0].update(tokens=1), "tokens"),
    (lambda d: d["sources"][0].update(samples_per_epoch=1), "samples_per_epoch"),
    (lambda d: d["sources"][0].update(epochs=9.0), "epochs"),
    (lambda d: d.update(total_samples=5), "total_samples"),
    (lambda d: d["sources"][1]["shards"].append("../x"), "escapes the run directory"),
])
def test_mixture_validation(tmp_path, edit, message):
    mix = _mixture(tmp_path)
    edit(mix)
    with pytest.raises(ManifestError, match=message):
        parse_mixture(mix)
