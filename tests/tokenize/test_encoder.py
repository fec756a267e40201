"""Tests of pipeline/tokenize/encoder.py: ids identical to SentencePieceProcessor.encode, always.

Every model is trained here from the bundled sample (small vocabularies, one thread, cached per
session); a few are edited through the model proto to break one rule of the fast path at a time.
"""

from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

from pipeline.tokenize import encoder as encmod
from pipeline.tokenize.cuts import char_groups
from pipeline.tokenize.encoder import (
    WS,
    Encoder,
    fast_path_supported,
    model_info,
    with_bos_eos,
)
from pipeline.tokenize.spmodel import NO_DUMMY_PREFIX

LLAMA = {"model_type": "bpe", "byte_fallback": True, "split_digits": True,
             "normalization_rule_name": "identity", "add_dummy_prefix": True,
             "remove_extra_whitespaces": False, "allow_whitespace_only_pieces": True}

# name -> (trainer settings over LLAMA, whether the fast path applies)
VARIANTS = {
    "llama": ({}, True),
    "no_dummy_prefix": ({"add_dummy_prefix": False}, True),
    "no_byte_fallback": ({"byte_fallback": False}, True),
    "no_ws_only_pieces": ({"allow_whitespace_only_pieces": False}, True),
    "digits_together": ({"split_digits": False, "split_by_number": False}, True),
    "scripts_together": ({"split_by_unicode_script": False, "max_sentencepiece_length": 24}, True),
    "unigram": ({"model_type": "unigram", "input": "small"}, False),  # slow trainer: less text
    "nmt_nfkc": ({"normalization_rule_name": "nmt_nfkc"}, False),
    "remove_extra_ws": ({"remove_extra_whitespaces": True}, False),
    "ws_suffix": ({"treat_whitespace_as_suffix": True}, False),
    "no_ws_split": ({"split_by_whitespace": False}, False),
    "user_defined": ({"user_defined_symbols": ["<tag>", "foo"]}, False),
}
FAST = [k for k, (_, f) in VARIANTS.items() if f]
FALLBACK = [k for k, (_, f) in VARIANTS.items() if not f]


# ---------------------------------------------------------------------------------------------
# data and models


def read_sample(sample_dir: Path) -> tuple[list[str], list[str]]:
    prose = []
    for p in sorted((sample_dir / "slimpajama").rglob("*.jsonl.zst")):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(p.read_bytes())
        for line in data.splitlines():
            if line.strip():
                t = orjson.loads(line).get("text")
                if isinstance(t, str):
                    prose.append(t)
    code = []
    for p in sorted((sample_dir / "starcoderdata").rglob("*.parquet")):
        code += [t for t in pq.read_table(p, columns=["content"]).column("content").to_pylist()
                 if isinstance(t, str)]
    return prose, code


@pytest.fixture(scope="session")
def sample_texts(sample_dir):
    return read_sample(sample_dir)


@pytest.fixture(scope="session")
def train_file(sample_texts, tmp_path_factory) -> Path:
    prose, code = sample_texts
    # prose and some code (indentation: whitespace-only pieces), as lines like SentencePiece reads
    text = "\n".join(prose[:400] + code[:60])
    d = tmp_path_factory.mktemp("spm")
    (d / "train.txt").write_text(text, encoding="utf-8")
    (d / "small.txt").write_text(text[:300_000], encoding="utf-8")
    return d / "train.txt"


@pytest.fixture(scope="session")
def models(train_file, tmp_path_factory):
    """name -> model path, trained on first use (each takes well under a second)."""
    out_dir = tmp_path_factory.mktemp("models")
    cache: dict[str, str] = {}

    class Models:
        def __getitem__(self, name: str) -> str:
            if name not in cache:
                if name in VARIANTS:
                    settings = {**LLAMA, **VARIANTS[name][0]}
                    inp = train_file.with_name(settings.pop("input", "train") + ".txt")
                    prefix = out_dir / name
                    spm.SentencePieceTrainer.train(
                        input=str(inp), model_prefix=str(prefix), vocab_size=3000,
                        num_threads=1, character_coverage=0.9995, minloglevel=2,
                        max_sentence_length=1 << 16, **settings)
                    cache[name] = str(prefix) + ".model"
                else:
                    cache[name] = EDITED[name](self, out_dir)
            return cache[name]

    return Models()


def _edit(models, out_dir: Path, base: str, name: str, fn) -> str:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(Path(models[base]).read_bytes())
    fn(m, pb)
    path = out_dir / f"{name}.model"
    path.write_bytes(m.SerializeToString())
    return str(path)


def _add_piece(m, pb, piece: str):
    p = m.pieces.add()
    p.piece = piece
    p.score = max(x.score for x in m.pieces) + 1.0  # merged before anything else
    p.type = pb.ModelProto.SentencePiece.NORMAL


def _cross_word(models, out_dir):
    return _edit(models, out_dir, "llama", "cross_word", lambda m, pb: _add_piece(m, pb, f"e{WS}t"))


def _newline_piece(models, out_dir):
    return _edit(models, out_dir, "llama", "newline_piece", lambda m, pb: _add_piece(m, pb, "\n\n"))


def _unused(models, out_dir):
    def fn(m, pb):
        m.pieces[-1].type = pb.ModelProto.SentencePiece.UNUSED
    return _edit(models, out_dir, "llama", "unused", fn)


def _no_ws_piece(models, out_dir):
    def fn(m, pb):  # without byte fallback, and "▁" not a piece
        for p in m.pieces:
            if p.piece == WS:
                p.piece = "\u2603\u2603"
    return _edit(models, out_dir, "no_byte_fallback", "no_ws_piece", fn)


def _no_escape(models, out_dir):
    def fn(m, pb):
        m.normalizer_spec.escape_whitespaces = False
    return _edit(models, out_dir, "llama", "no_escape", fn)


def _bridge(models, out_dir):
    # pieces joining groups that the trained vocabulary keeps apart: a letter and punctuation,
    # a digit and a letter, an accented letter and punctuation
    def fn(m, pb):
        for piece in ("e(", "7x", "\u00e9!"):
            _add_piece(m, pb, piece)
    return _edit(models, out_dir, "llama", "bridge", fn)


EDITED = {"cross_word": _cross_word, "newline_piece": _newline_piece, "unused": _unused, "bridge": _bridge,
          "no_ws_piece": _no_ws_piece, "no_escape": _no_escape}


def sp_of(path: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=path)


# ---------------------------------------------------------------------------------------------
# adversarial and random text

ADVERSARIAL = [
    "", " ", "  ", "\t", "\n", "\n\n", "\r\n", "a", "1", ".", WS, WS + WS, " " + WS, WS + " ",
    "é", "😀", "中", "\x00", "x" * 200, " " * 70 + "x",
    "  leading spaces", "trailing spaces   ", "   both   ", "\t\ttabs\tinside\t", "\n\nnewlines\n\n",
    " \n \n ", "\n   \n\t \n", "a \n b", "end with space ", "end with newline\n", "\n start",
    "word" + WS + "with" + WS + WS + "escape", WS + "starts", "ends" + WS, "mixed " + WS + " ws",
    "abc123def 456ghi 7.89 1,000,000 3rd 2nd x2 H2O 0x1F 1e-9 ١٢٣ １２３",
    "Ελληνικά and English mixed 日本語のテキスト 中文 한국어 العربية עברית русский",
    "emoji 😀😃 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽 keycap 1️⃣ ⚡",
    "café naïve coöperate", "cafe\u0301 nai\u0308ve coo\u0308perate",  # NFC / NFD
    "Zu\u0308rich Zürich", "\u00a0nbsp\u00a0 \u3000ideographic\u3000 zero\u200bwidth \u2028ls",
    "tab\tthen\vvt\fff\x1cfs\x85nel",
    "<s> </s> <unk> <0x0A> <pad> ▁▁▁▁",
    "def f(x):\n    return x  # comment\n\n\tif x:\n\t\tpass\n",
    "    indented\n        more\n            most  \n",
    "http://example.com/a/b?c=d&e=f#g data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB",
    "a" + " " * 17 + "b" + "\t" * 9 + "c" + "\n" * 5 + " " * 33,
    "☃ ☃☃ ☃\n☃", "x\u0301\u0302\u0303 combining", "\ufffd replacement \ufffd\ufffd",
]

NASTY = [" ", "  ", "    ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x00", WS, WS + WS, "a", "e",
         "t", "the", "The", "ing", "tion", "x", "1", "23", "456", "٣", "１", "é", "e\u0301", "ß", "Ω",
         "Ж", "中", "文", "あ", "ア", "ー", "한", "ع", "א", "😀", "👍🏽", "\u200d", "\ufe0f", "\u00a0",
         "\u3000", "\u2028", "\u0085", "\ufffd", "☃", "<s>", "</s>", "<0x0A>", ".", ",", "(", ")",
         "_", "-", "'", '"', "def", "return", "self", "import", "http://", "www.", "=", ":", "#",
         "x" * 70, "ab" * 40]


def random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.choice([0, 1, 1, 2, 3, 5, 8, 13, 21, 40])
        parts = []
        for _ in range(k):
            r = rng.random()
            if r < 0.8:
                parts.append(rng.choice(NASTY))
            elif r < 0.9:  # any code point but surrogates
                c = rng.randrange(0x20, 0x30000)
                parts.append(chr(c) if not 0xD800 <= c < 0xE000 else "?")
            else:
                parts.append(chr(rng.randrange(0, 0x80)))
        out.append("".join(parts))
    return out


def assert_same(enc: Encoder, sp, texts: list[str], batch: int | None = None):
    want = sp.encode(texts, num_threads=2)
    if batch is None:
        got = enc.encode(texts)
    else:
        got = [ids for i in range(0, len(texts), batch) for ids in enc.encode(texts[i:i + batch])]
    assert len(got) == len(want)
    if got != want:
        for t, g, w in zip(texts, got, want):
            assert g == w, f"text {t[:200]!r}: {g[:40]} != {w[:40]}"


# ---------------------------------------------------------------------------------------------
# the decision


@pytest.mark.parametrize("name", list(VARIANTS))
def test_trained_models_decision(models, name):
    ok, why = fast_path_supported(models[name])
    assert ok is VARIANTS[name][1], why
    assert (why is None) is ok
    enc = Encoder(models[name])
    assert enc.fast is ok and enc.why_not == why


@pytest.mark.parametrize("name,fragment", [
    ("unigram", "model type UNIGRAM"), ("nmt_nfkc", "nmt_nfkc"),
    ("remove_extra_ws", "remove_extra_whitespaces"), ("ws_suffix", "treat_whitespace_as_suffix"),
    ("no_ws_split", "split_by_whitespace"), ("user_defined", "user-defined"),
    ("unused", "UNUSED"), ("cross_word", "spans a word boundary"), ("no_ws_piece", "no byte fallback"),
    ("no_escape", "escape_whitespaces"),
])
def test_fallback_reasons(models, name, fragment):
    ok, why = fast_path_supported(models[name])
    assert not ok and fragment in why


def test_fast_path_supported_inputs(models):
    path = models["llama"]
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    for m in (path, Path(path), Path(path).read_bytes(), proto, sp_of(path)):
        assert fast_path_supported(m) == (True, None)
    with pytest.raises(TypeError):
        fast_path_supported(42)


@pytest.mark.parametrize("name", ["llama", "unigram", "nmt_nfkc", "no_byte_fallback", "user_defined"])
def test_model_info_matches_protobuf(models, name):
    from sentencepiece import sentencepiece_model_pb2 as pb
    data = Path(models[name]).read_bytes()
    m = pb.ModelProto()
    m.ParseFromString(data)
    info = model_info(data)
    assert info["pieces"] == [p.piece for p in m.pieces]
    assert info["types"] == [p.type for p in m.pieces]
    ts, ns = m.trainer_spec, m.normalizer_spec
    for k in ("model_type", "vocab_size", "split_by_whitespace", "treat_whitespace_as_suffix",
              "byte_fallback", "split_digits", "allow_whitespace_only_pieces", "split_by_number",
              "split_by_unicode_script", "max_sentencepiece_length"):
        assert info[k] == getattr(ts, k), k
    for k in ("add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces",
              "precompiled_charsmap"):
        assert info[k] == getattr(ns, k), k
    assert info["normalizer_name"] == ns.name


def test_no_dummy_prefix_suffix_changes_only_that_flag(models):
    from sentencepiece import sentencepiece_model_pb2 as pb
    data = Path(models["llama"]).read_bytes()
    a, b = pb.ModelProto(), pb.ModelProto()
    a.ParseFromString(data)
    b.ParseFromString(data + NO_DUMMY_PREFIX)
    assert a.normalizer_spec.add_dummy_prefix and not b.normalizer_spec.add_dummy_prefix
    b.normalizer_spec.add_dummy_prefix = True
    assert a == b
    info, info2 = model_info(data), model_info(data + NO_DUMMY_PREFIX)
    assert info2.pop("add_dummy_prefix") is False and info.pop("add_dummy_prefix") is True
    assert info == info2
    raw = spm.SentencePieceProcessor(model_proto=data + NO_DUMMY_PREFIX)
    sp = sp_of(models["llama"])
    assert raw.encode(" the") == sp.encode("the") and raw.encode("") == []


def test_fallback_logged_once(models, caplog):
    encmod._logged.clear()
    with caplog.at_level(logging.INFO, logger="tinyprep"):
        Encoder(models["unigram"])
        Encoder(models["unigram"])
        Encoder(models["llama"])
    msgs = [r.getMessage() for r in caplog.records if r.name == "tinyprep"]
    assert len(msgs) == 1 and "UNIGRAM" in msgs[0] and "batched encode" in msgs[0]


# ---------------------------------------------------------------------------------------------
# the rules, one by one


def test_segments_rules(models):
    enc = Encoder(models["llama"])
    assert enc.cut_chars == "\n\r\t\x0c\x0b"
    # the dummy prefix is the first segment's leading space; whitespace runs stay with the next
    # word; trailing whitespace is its own segment; control-character runs are cut around
    assert enc.segments("") == []
    assert enc.segments("a") == [" a"]
    assert enc.segments("  hello world\n\n\tfoo  ") == ["   hello", " world", "\n\n\t", "foo", "  "]
    assert enc.segments(f"a{WS}b {WS} c") == [" a", f"{WS}b", f" {WS} c"]
    # pair cuts: letters and punctuation are different groups (no piece mixes scripts); split
    # digits are in no multi-character piece, so every digit is a segment
    assert enc.segments("x1 23y") == [" x", "1", " 2", "3", "y"]
    assert enc.segments("f(a, b);") == [" f", "(", "a", ",", " b", ");"]
    nd = Encoder(models["no_dummy_prefix"])
    assert nd.segments("a b") == ["a", " b"] and nd.segments(" a") == [" a"]
    assert nd.segments("") == []


def test_cut_chars_follow_the_vocabulary(models):
    # a piece containing "\n" (none is trained: SentencePiece reads lines) stops newline cuts
    enc = Encoder(models["newline_piece"])
    assert enc.fast and "\n" not in enc.cut_chars
    sp = sp_of(models["newline_piece"])
    nl = sp.piece_to_id("\n\n")
    text = "one\n\ntwo\n\n\nthree"
    assert nl in sp.encode(text)  # the piece is used, so a cut at "\n" would be wrong
    assert_same(enc, sp, [text] + ADVERSARIAL)
    # without byte fallback an unknown "\n" would merge with unknown neighbours: no cut at it
    assert "\n" not in Encoder(models["no_byte_fallback"]).cut_chars


def test_char_groups_follow_the_vocabulary(models):
    # groups are the connected components of "adjacent in a piece", "▁" left out
    assert char_groups(["ab", "b(", "xy", f"{WS}z", f"{WS}{WS}", f"{WS}k("]) == ["(abk", "xy", "z"]
    enc = Encoder(models["llama"])
    letters = next(g for g in enc.groups if "e" in g)
    assert "(" not in letters and "," not in letters and not any(c.isdigit() for g in enc.groups for c in g)
    bridged = Encoder(models["bridge"])
    assert bridged.fast
    joined = next(g for g in bridged.groups if "e" in g)
    assert {"(", "7", "x"} <= set(joined)  # "e(" and "7x" put them in the letters' group
    assert bridged.segments("be(7x") == [" be(7x"] and enc.segments("be(7x") == [" be", "(", "7", "x"]


def test_pair_cut_rule_is_necessary(models):
    # cutting where the trained model's groups allow, on the bridged model, gives other ids
    path = models["bridge"]
    sp = sp_of(path)
    raw = spm.SentencePieceProcessor(model_proto=Path(path).read_bytes() + NO_DUMMY_PREFIX)
    text = "ye(s 7x"
    naive = [i for seg in Encoder(models["llama"]).segments(text) for i in raw.encode(seg)]
    assert sp.piece_to_id("e(") in sp.encode(text) and naive != sp.encode(text)
    assert Encoder(path).encode([text]) == sp.encode([text])


PAIR_STRESS = ["e", "(", ")", ",", ".", "7", "x", "1", "0", "é", "!", "_", "-", "'", '"', "//",
               "->", "::", "a", "Z", "ß", "Ω", "中", "😀", "\u0301", "\u00a0", "\t", "\t\t", "\n",
               "\r\n", " ", "  ", "   ", WS, WS + WS, "\x00", "\x7f", "\ufffd", "the", "tion",
               "0x1F", "{}", "[]", "<s>", "<0x0A>", "#", "@", "$"]


def pair_stress_texts(seed: int, n: int) -> list[str]:
    """Strings made of characters and short runs that meet across every kind of pair cut:
    letters next to punctuation and digits, byte-fallback characters (emoji, controls,
    combining marks), whitespace runs and "▁" before and after each."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(0, 24)
        out.append("".join(rng.choice(PAIR_STRESS) for _ in range(k)))
    return out


@pytest.mark.parametrize("name", ["llama", "no_dummy_prefix", "digits_together", "scripts_together",
                                  "no_ws_only_pieces", "bridge", "newline_piece"])
def test_fuzz_pair_cuts(models, name):
    sp = sp_of(models[name])
    texts = pair_stress_texts(seed=len(name), n=2500)
    assert_same(Encoder(models[name], cache_entries=300, max_segment_chars=6), sp, texts, batch=97)


def test_cross_word_piece_would_break_segments(models):
    # the rule is necessary: with a piece "e▁t", encoding word by word differs from SentencePiece
    path = models["cross_word"]
    sp = sp_of(path)
    raw = spm.SentencePieceProcessor(model_proto=Path(path).read_bytes() + NO_DUMMY_PREFIX)
    text = "the test"
    naive = raw.encode(" the") + raw.encode(" test")
    assert sp.piece_to_id(f"e{WS}t") in sp.encode(text) and naive != sp.encode(text)
    enc = Encoder(path)
    assert not enc.fast
    assert_same(enc, sp, [text] + ADVERSARIAL)


def test_whitespace_only_pieces_exact(models):
    sp = sp_of(models["llama"])
    ws_pieces = [p for p in (sp.id_to_piece(i) for i in range(sp.get_piece_size()))
                 if set(p) == {WS} and len(p) > 1]
    assert ws_pieces, "the test model should have whitespace-only pieces"
    enc = Encoder(models["llama"])
    texts = [" " * n + w for n in range(40) for w in ("x", "the", "\n", "", "\tx", WS)]
    texts += ["a" + " " * n for n in range(40)] + [" " * n for n in range(1, 40)]
    texts += [f"{WS * n}the{' ' * m}end" for n in range(6) for m in range(6)]
    assert_same(enc, sp, texts)


# ---------------------------------------------------------------------------------------------
# identical ids


def test_sample_corpus_identical(models, sample_texts):
    prose, code = sample_texts
    sp = sp_of(models["llama"])
    enc = Encoder(models["llama"])
    assert enc.fast
    assert_same(enc, sp, prose, batch=97)
    assert_same(enc, sp, code, batch=64)
    st = enc.stats()
    assert st["hits"] + st["misses"] == st["segments"] > 0 and st["fallback_docs"] == 0
    assert st["long_segments"] > 0 and st["tokens"] > 0


@pytest.mark.parametrize("name", [n for n in FAST if n != "llama"] + FALLBACK
                         + ["newline_piece", "unused", "cross_word", "no_escape"])
def test_other_models_identical(models, sample_texts, name):
    prose, code = sample_texts
    texts = prose[::4] + code[::40] + ADVERSARIAL
    enc = Encoder(models[name])
    assert_same(enc, sp_of(models[name]), texts, batch=50)
    st = enc.stats()
    assert st["fallback_docs"] == (0 if enc.fast else len(texts))


@pytest.mark.parametrize("name", FAST + ["newline_piece"])
def test_adversarial_identical(models, name):
    sp = sp_of(models[name])
    for batch in (None, 1, 7):
        assert_same(Encoder(models[name], max_segment_chars=8), sp, ADVERSARIAL, batch=batch)


@pytest.mark.parametrize("name", FAST + ["newline_piece", "unigram"])
def test_fuzz_identical(models, name):
    texts = random_texts(seed=sum(map(ord, name)), n=3000)
    sp = sp_of(models[name])
    assert_same(Encoder(models[name], cache_entries=500, max_segment_chars=16), sp, texts, batch=113)


def test_cache_never_changes_results(models, sample_texts):
    prose, code = sample_texts
    texts = prose[:150] + code[:40] + ADVERSARIAL + random_texts(7, 500)
    sp = sp_of(models["llama"])
    want = sp.encode(texts)
    off = Encoder(models["llama"], cache_entries=0)
    tiny = Encoder(models["llama"], cache_entries=50, max_segment_chars=4)
    big = Encoder(models["llama"])
    assert off.encode(texts) == want
    assert off.stats()["entries"] == 0
    for _ in range(2):  # cold, then warm
        assert big.encode(texts) == want
        assert [i for k in range(0, len(texts), 10) for i in tiny.encode(texts[k:k + 10])] == want
    assert big.stats()["hit_rate"] > 0.5 and tiny.stats()["evictions"] > 0
    assert tiny.stats()["entries"] <= 50
    # one document at a time, after the cache saw everything; two SentencePiece threads
    assert [big.encode([t])[0] for t in texts[:50]] == want[:50]
    assert Encoder(models["llama"], threads=2).encode(texts) == want


def test_fill_paths_exact(models, sample_texts):
    # misses are encoded in groups joined by "\n"; a separator id that does not split them
    # back sends the group one segment at a time; without a separator, one at a time too
    prose, code = sample_texts
    texts = prose[:20] + code[:5] + ADVERSARIAL
    sp = sp_of(models["llama"])
    want = sp.encode(texts)
    enc = Encoder(models["llama"])
    assert enc._sep == "\n" and enc._sep_id == sp.piece_to_id("<0x0A>")
    assert enc.encode(texts) == want
    wrong = Encoder(models["llama"])
    wrong._sep_id = sp.piece_to_id(f"{WS}the")
    assert wrong.encode(texts) == want
    none = Encoder(models["llama"])
    none._sep = None
    assert none.encode(texts) == want


def test_long_segments_not_cached(models):
    enc = Encoder(models["llama"], max_segment_chars=10)
    long_word = "supercalifragilistic"
    texts = [f"a {long_word} b", f"({long_word}"]
    assert enc.encode(texts) == sp_of(models["llama"]).encode(texts)
    assert all(len(k) <= 10 for k in enc._cache)
    assert enc.stats()["long_segments"] == 2


def test_eviction_keeps_frequent_segments(models, sample_texts):
    prose, _ = sample_texts
    enc = Encoder(models["llama"], cache_entries=300)
    for i in range(0, 400, 20):
        enc.encode(prose[i:i + 20])
        assert enc.stats()["entries"] <= 300
    assert " the" in enc._cache and " of" in enc._cache
    st = enc.stats()
    assert st["evictions"] > 0 and 300 * 80 < st["approx_bytes"] < 300 * 1000


def test_encode_to_array(models, sample_texts):
    prose, code = sample_texts
    texts = prose[:30] + ["", " "] + code[:10] + ADVERSARIAL
    for name in ("llama", "unigram"):
        enc = Encoder(models[name])
        want = sp_of(models[name]).encode(texts)
        ids, lengths = enc.encode_to_array(texts)
        assert ids.dtype == np.uint16 == enc.dtype and lengths.dtype == np.int64
        assert lengths.tolist() == [len(w) for w in want]
        assert ids.tolist() == [i for w in want for i in w]
        assert ids.flags.writeable
        ids[:1] = 0  # owns its memory


def test_non_str_and_bad_input_like_sentencepiece(models):
    enc = Encoder(models["llama"])
    sp = sp_of(models["llama"])
    assert enc.encode([]) == [] and enc.encode_to_array([])[0].size == 0
    with pytest.raises(TypeError):
        sp.encode(["a\ud800b"])
    with pytest.raises(TypeError):
        enc.encode(["a\ud800b"])  # a lone surrogate: not encodable, as in SentencePiece
    assert enc.encode(["ok"]) == sp.encode(["ok"])


def test_pickle_carries_model_not_cache(models):
    enc = Encoder(models["llama"], cache_entries=1234, max_segment_chars=20)
    enc.encode(["some text here"])
    enc2 = pickle.loads(pickle.dumps(enc))
    assert enc2.fast and enc2.cache_entries == 1234 and enc2.max_segment_chars == 20
    assert enc2.stats()["entries"] == 0
    assert enc2.encode(ADVERSARIAL) == sp_of(models["llama"]).encode(ADVERSARIAL)


def test_bytes_input_like_sentencepiece(models):
    enc = Encoder(models["llama"])
    sp = sp_of(models["llama"])
    texts = [b"bytes in", "str in", "caf\xc3\xa9".encode("latin-1")]
    assert enc.encode(texts) == sp.encode(texts)
    assert enc.stats()["fallback_docs"] == 3


def test_with_bos_eos_like_sentencepiece(models):
    texts = ["", "a", " two words ", "x" * 100] + ADVERSARIAL
    sp = sp_of(models["llama"])
    ids, lengths = Encoder(models["llama"]).encode_to_array(texts)
    for bos, eos in ((True, True), (True, False), (False, True), (False, False)):
        want = sp.encode(texts, add_bos=bos, add_eos=eos)
        got, n = with_bos_eos(ids, lengths, sp.bos_id() if bos else None, sp.eos_id() if eos else None)
        assert got.dtype == ids.dtype and n.tolist() == [len(w) for w in want]
        assert got.tolist() == [i for w in want for i in w]


def test_sub_batches(models, sample_texts, monkeypatch):
    # a batch is processed in sub-batches of about _CHUNK_CHARS characters: same ids
    prose, code = sample_texts
    texts = prose[:40] + ADVERSARIAL + code[:5]
    sp = sp_of(models["llama"])
    monkeypatch.setattr(encmod, "_CHUNK_CHARS", 3000)
    enc = Encoder(models["llama"], cache_entries=200)
    assert enc.encode(texts) == sp.encode(texts)
    ids, _lengths = enc.encode_to_array(texts)
    assert ids.tolist() == [i for w in sp.encode(texts) for i in w]
    mixed = texts + [b"bytes at the end"]
    assert enc.encode(mixed) == sp.encode(mixed)


def _novel_words(seed: int, n_docs: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(rng.randint(7, 12)))
                     for _ in range(150)) for _ in range(n_docs)]


def test_plain_sub_batches_same_ids(models, sample_texts, monkeypatch):
    # whichever way each sub-batch goes (segment cache or plain SentencePiece), the ids are
    # SentencePiece's; the decision only moves time
    prose, code = sample_texts
    texts = prose[:60] + code[:20] + ADVERSARIAL + pair_stress_texts(3, 300)
    sp = sp_of(models["llama"])
    want = sp.encode(texts)
    flat = [i for w in want for i in w]
    monkeypatch.setattr(encmod, "_CHUNK_CHARS", 20_000)
    monkeypatch.setattr(encmod, "_PROBE_MIN", 16)
    for ratio, plain in ((0.0, True), (float("inf"), False)):
        monkeypatch.setattr(encmod, "_PROBE_RATIO", ratio)  # never / always pays
        enc = Encoder(models["llama"])
        assert enc.encode(texts) == want
        ids, lengths = enc.encode_to_array(texts)
        assert ids.tolist() == flat and lengths.tolist() == list(map(len, want))
        st = enc.stats()
        assert st["probes"] > 0 and st["fallback_docs"] == 0
        if plain:
            assert st["plain_docs"] == 2 * len(texts) and st["segments"] == 0
        else:
            assert st["plain_docs"] == 0 and st["segments"] > 0


def test_segments_that_keep_missing_go_plain(models, sample_texts, monkeypatch):
    # text whose segments never repeat: after _NOVEL_BATCHES sub-batches of mostly misses the
    # next _HOLD_MIN go to plain SentencePiece; text that repeats brings the cache back
    monkeypatch.setattr(encmod, "_CHUNK_CHARS", 10_000)
    monkeypatch.setattr(encmod, "_PROBE_RATIO", float("inf"))  # the timing alone always says pay
    sp = sp_of(models["llama"])
    enc = Encoder(models["llama"])
    novel = _novel_words(5, 60)  # about 1,600 characters each: 7 documents a sub-batch
    assert enc.encode(novel) == sp.encode(novel)
    st = enc.stats()
    assert st["plain_docs"] > 0 and st["segments"] > 0
    prose = sample_texts[0][:40]
    for _ in range(3):
        assert enc.encode(prose) == sp.encode(prose)
    assert enc.stats()["segments"] > st["segments"] and enc._hold == 0 and enc._novel == 0


def test_random_unicode_goes_plain(models, monkeypatch):
    # one character a segment: segmenting costs several times what SentencePiece spends on such
    # text (ratio about 1-2 against the 0.45 threshold), so the probes send it to plain encode
    monkeypatch.setattr(encmod, "_CHUNK_CHARS", 40_000)
    rng = random.Random(11)
    texts = ["".join(chr(c) if not 0xD800 <= c < 0xE000 else "?"
                     for c in (rng.randrange(0x100, 0x30000) for _ in range(4000))) for _ in range(60)]
    sp = sp_of(models["llama"])
    enc = Encoder(models["llama"])
    assert enc.encode(texts) == sp.encode(texts)
    st = enc.stats()
    assert st["probes"] > 0 and st["plain_docs"] >= len(texts) // 2, (st, enc._probe_ratio)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_ids_array_packs_short_and_long_lists_alike(dtype):
    """SentencePiece's id lists to one writable array: struct for long lists, fromiter for short
    ones; the same values either way, and the largest id of the dtype survives."""
    from pipeline.tokenize.encoder import ids_array

    rng = np.random.default_rng(3)
    top = np.iinfo(dtype).max
    for mean in (0, 1, 5, 63, 64, 700):
        lists = [rng.integers(0, top, size=int(rng.integers(0, 2 * mean + 1)), endpoint=True).tolist()
                 for _ in range(40)]
        got = ids_array(lists, np.dtype(dtype))
        want = np.array([x for lst in lists for x in lst], dtype=dtype)
        assert got.dtype == np.dtype(dtype) and got.flags.writeable
        np.testing.assert_array_equal(got, want)
