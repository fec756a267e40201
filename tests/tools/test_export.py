"""pipeline/tools/export.py and verify.py: the litgpt (LITPKDS) export and `verify_run`, on the session's reference run."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import tinyprep
from spec_readers import spec_read_litpkds, spec_read_megatron

from pipeline.tools.export import ExportError, export_litgpt
from pipeline.tools.verify import VerifyError, verify_run

BLOCK = 2049


def stream(run: Path, source: str, split: str = "train") -> np.ndarray:
    manifest = json.loads((run / "manifest.json").read_text())
    return np.concatenate([d for s in manifest["shards"] if s["source"] == source and s["split"] == split
                           for d in spec_read_megatron(run / s["path"])])


def tinyllama_blocks(files: list[Path], block_size: int):
    """What lit_gpt/packed_dataset.py's iterator does, from its description in REFERENCES.md: dtype
    and chunk_size from the first file's header, then every file read as chunk_size // block_size
    blocks of block_size tokens after the 24-byte header."""
    raw = files[0].read_bytes()
    assert raw[:7] == b"LITPKDS" and struct.unpack_from("<Q", raw, 7) == (1,)
    dtype = {8: np.uint16, 4: np.int32}[raw[15]]
    (chunk_size,) = struct.unpack_from("<Q", raw, 16)
    n_blocks = chunk_size // block_size
    for f in files:
        buf = memoryview(f.read_bytes())[24:]
        for b in range(n_blocks):
            yield np.frombuffer(buf, dtype=dtype, count=block_size, offset=np.dtype(dtype).itemsize * b * block_size)


def test_litgpt_export_is_read_by_tinyllamas_loader_without_padding(reference, workdir, tmp_path):
    run = reference[0]
    out = tmp_path / "litgpt"
    chunk = BLOCK * 16
    r = tinyprep("export", str(run), "--format", "litgpt", "-o", str(out), "--chunk-size", str(chunk), cwd=workdir)
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "tinyprep-export.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    sep = manifest["tokenizer"]["bos_id"]
    for source, prefix in (("slimpajama", "train_slimpajama"), ("starcoderdata", "train_starcoder")):
        files = sorted(out.glob(f"{prefix}_*.bin"))  # what TinyLlama globs
        assert [f.name for f in files] == [f"{prefix}_{i:010d}.bin" for i in range(len(files))]
        full = stream(run, source)
        assert len(files) == len(full) // chunk > 0
        chunks = []
        for f in files:
            dt, size, toks = spec_read_litpkds(f)
            assert (dt, size) == (np.uint16, chunk)
            chunks.append(toks)
        # the chunks are the source's stream, cut; the last partial chunk is dropped, never padded
        assert np.array_equal(np.concatenate(chunks), full[:len(files) * chunk])
        s = info["sources"][source]
        assert s["prefix"] == prefix and s["tokens_dropped"] == len(full) - len(files) * chunk < chunk
        blocks = list(tinyllama_blocks(files, BLOCK))
        assert len(blocks) == 16 * len(files)
        assert not any((b == sep).all() for b in blocks)  # no sample is padding only
        assert blocks[0][0] == sep  # documents start with BOS, TinyLlama's separator
    assert "train_slimpajama_*.bin" in r.stdout and "dropped" in r.stdout


def test_export_prefixes_and_an_existing_export(reference, tmp_path):
    run = reference[0]
    out = tmp_path / "o"
    s = export_litgpt(str(run), str(out), chunk_size=BLOCK * 64, prefixes={"slimpajama": "train_slim"})
    assert s["sources"]["slimpajama"]["prefix"] == "train_slim" and (out / "train_slim_0000000000.bin").exists()
    with pytest.raises(ExportError, match="use --force"):
        export_litgpt(str(run), str(out), chunk_size=BLOCK * 64, prefixes={"slimpajama": "train_slim"})
    (out / "train_slim_0000000099.bin").write_bytes(b"stale")
    export_litgpt(str(run), str(out), chunk_size=BLOCK * 64, prefixes={"slimpajama": "train_slim"}, force=True)
    assert not (out / "train_slim_0000000099.bin").exists()
    with pytest.raises(ExportError, match=r"--prefix: no source \['c4'\]"):
        export_litgpt(str(run), str(out), prefixes={"c4": "x"})
    v = export_litgpt(str(run), str(tmp_path / "v"), chunk_size=1024, split="validation")
    assert v["sources"]["starcoderdata"]["prefix"] == "validation_starcoder"
    assert v["sources"]["starcoderdata"]["chunks"] > 0


# --- verify -------------------------------------------------------------------------------------


@pytest.fixture()
def run_copy(reference, tmp_path) -> Path:
    src, dst = reference[0], tmp_path / "run"
    shutil.copytree(src / "shards", dst / "shards")
    for name in ("manifest.json", "mixture.json", "recipe.yaml", "tokenizer.model"):
        shutil.copy(src / name, dst / name)
    return dst


def _first_shard(run: Path) -> tuple[dict, Path]:
    manifest = json.loads((run / "manifest.json").read_text())
    s = manifest["shards"][0]
    return s, run / s["path"]


def _edit_manifest(run: Path, edit) -> None:
    m = json.loads((run / "manifest.json").read_text())
    edit(m)
    (run / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_verify_accepts_the_reference_run(reference, workdir):
    r = tinyprep("verify", str(reference[0]), cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "OK: " in r.stdout and "mixture.json" in r.stdout


def _set_docs(m: dict, delta: int) -> None:
    s = m["shards"][0]
    s["docs"] += delta
    m["sources"][s["source"]][s["split"]]["docs"] += delta


def _out_of_vocab(run: Path) -> None:
    shard, prefix = _first_shard(run)
    b = prefix.with_suffix(".bin")
    raw = bytearray(b.read_bytes())
    raw[2:4] = struct.pack("<H", 65000)
    b.write_bytes(bytes(raw))
    _edit_manifest(run, lambda m: m["shards"][0].update(bin_sha256=hashlib.sha256(raw).hexdigest()))


CORRUPTIONS = {
    "missing shard file": lambda run: _first_shard(run)[1].with_suffix(".idx").unlink(),
    "truncated": lambda run: _first_shard(run)[1].with_suffix(".bin").write_bytes(
        _first_shard(run)[1].with_suffix(".bin").read_bytes()[:-10]),
    "size mismatch": lambda run: _first_shard(run)[1].with_suffix(".bin").write_bytes(
        _first_shard(run)[1].with_suffix(".bin").read_bytes() + b"\0\0"),
    "checksum mismatch": lambda run: _flip(_first_shard(run)[1].with_suffix(".bin"), 100),
    "bad magic": lambda run: _flip(_first_shard(run)[1].with_suffix(".idx"), 0),
    "unknown dtype code": lambda run: _flip(_first_shard(run)[1].with_suffix(".idx"), 17),
    "counts differ": lambda run: _edit_manifest(run, lambda m: _set_docs(m, 1)),
    "outside the vocabulary": _out_of_vocab,
    "tokenizer: ": lambda run: (run / "tokenizer.model").write_bytes(b"another tokenizer"),
    "escapes the run directory": lambda run: _edit_manifest(
        run, lambda m: m["shards"][0].update(path="../" + m["shards"][0]["path"])),
    "unsupported version 2": lambda run: _edit_manifest(run, lambda m: m.update(version=2)),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_verify_names_each_kind_of_corruption(run_copy, kind):
    verify_run(str(run_copy))
    CORRUPTIONS[kind](run_copy)
    with pytest.raises(VerifyError) as e:
        verify_run(str(run_copy))
    assert any(kind in p for p in e.value.problems), e.value.problems
    if kind not in ("tokenizer: ", "escapes the run directory", "unsupported version 2"):
        assert _first_shard(run_copy)[0]["path"] in str(e.value)  # names the shard


def test_verify_cli_lists_problems_without_a_traceback(run_copy, workdir):
    _flip(_first_shard(run_copy)[1].with_suffix(".bin"), 5)
    (run_copy / "tokenizer.model").write_bytes(b"x")
    r = tinyprep("verify", str(run_copy), cwd=workdir)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "problem(s):" in r.stderr and "checksum mismatch" in r.stderr and "tokenizer:" in r.stderr
