"""pipeline/tools/inspect.py: `tinyprep inspect` on the reference run, one of its shards and a LITPKDS chunk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import tinyprep
from spec_readers import spec_read_megatron

from pipeline.tools.export import export_litgpt
from pipeline.tools.inspect import InspectError, inspect_file, inspect_run


def ingested_texts(run: Path, source: str) -> set[str]:
    return {t for p in (run / "docs" / source).rglob("*.parquet")
            for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()}


def test_inspect_run_decodes_random_documents_to_the_ingested_text(reference, workdir):
    run = reference[0]
    r = tinyprep("inspect", str(run), "--n", "4", "--seed", "7", "--json", cwd=workdir)
    assert r.returncode == 0, r.stderr
    samples = [json.loads(line) for line in r.stdout.splitlines()]
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["source"] for s in samples] == ["slimpajama"] * 4 + ["starcoderdata"] * 4
    for s in samples:
        assert s["split"] == "train" and s["format"] == "megatron" and s["bos"] and not s["eos"]
        assert s["text"] in ingested_texts(run, s["source"])
        # the boundaries are the shard's: its index-th document, at its token offset
        doc = spec_read_megatron(run / s["file"])[s["index"]]
        assert s["tokens"] == s["end"] - s["start"] == len(doc)
        shard = next(x for x in manifest["shards"] if x["path"] == s["file"])
        assert shard["source"] == s["source"] and s["docs_in_file"] == shard["docs"]
        assert s["head"][0] == "<s>"
    # the draw is a pure function of the seed
    again = tinyprep("inspect", str(run), "--n", "4", "--seed", "7", "--json", cwd=workdir).stdout
    other = tinyprep("inspect", str(run), "--n", "4", "--seed", "8", "--json", cwd=workdir).stdout
    assert again == r.stdout and other != r.stdout
    # text output: a header per document with its place, token count and boundaries, then the text
    r = tinyprep("inspect", str(run), "--source", "starcoderdata", "--split", "validation", "--n", "2",
                 "--max-chars", "0", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("starcoderdata · validation · shards/starcoderdata/validation/") == 2
    assert "tokens at [" in r.stdout and "starts with BOS, no EOS" in r.stdout and "tokens: │ <s> │" in r.stdout
    picked = inspect_run(str(run), "starcoderdata", "validation", 2, 0)
    assert all(p.text in r.stdout for p in picked)


def test_inspect_one_megatron_shard(reference):
    run = reference[0]
    manifest = json.loads((run / "manifest.json").read_text())
    shard = next(s for s in manifest["shards"] if s["source"] == "slimpajama" and s["split"] == "train")
    samples = inspect_file(str(run / (shard["path"] + ".bin")), n=shard["docs"] + 10, seed=3)
    assert len(samples) == shard["docs"]  # every document once, in order
    assert [s.index for s in samples] == list(range(shard["docs"]))
    assert all(s.source == "slimpajama" and s.split == "train" for s in samples)
    texts = ingested_texts(run, "slimpajama")
    assert all(s.text in texts for s in samples)
    assert sum(s.tokens for s in samples) == shard["tokens"] and samples[-1].end == shard["tokens"]


def test_inspect_a_litpkds_chunk(reference, workdir, tmp_path):
    run = reference[0]
    out = tmp_path / "litgpt"
    export_litgpt(str(run), str(out), chunk_size=2049 * 8)
    chunk = sorted(out.glob("train_starcoder_*.bin"))[1]
    # outside the run directory the tokenizer must be named
    r = tinyprep("inspect", str(chunk), cwd=workdir)
    assert r.returncode == 1 and "--tokenizer" in r.stderr and "Traceback" not in r.stderr
    samples = inspect_file(str(chunk), n=10_000, seed=0, tokenizer=str(run / "tokenizer.model"))
    assert len(samples) >= 2 and [s.index for s in samples] == list(range(len(samples)))
    assert samples[0].start == 0 and samples[-1].end == 2049 * 8
    texts = ingested_texts(run, "starcoderdata")
    for s in samples:
        assert s.format == "litpkds"
        if s.partial is None:  # whole documents: their text is an ingested document
            assert s.bos and s.text in texts
    assert samples[-1].partial == "may continue in the next chunk"
    if not samples[0].bos:
        assert samples[0].partial.startswith("begins in the previous chunk")
    r = tinyprep("inspect", str(chunk), "--tokenizer", str(run / "tokenizer.model"), "--n", "2", cwd=workdir)
    assert r.returncode == 0 and r.stdout.count("(litpkds)") == 2, r.stderr


def test_inspect_errors_name_what_to_change(reference, tmp_path):
    run = reference[0]
    with pytest.raises(InspectError, match="sources: slimpajama, starcoderdata"):
        inspect_run(str(run), source="wikipedia")
    with pytest.raises(InspectError, match="manifest.json"):
        inspect_run(str(tmp_path))
    other = tmp_path / "other.model"
    model = (run / "tokenizer.model").read_bytes()
    other.write_bytes(model[:-1] + bytes([model[-1] ^ 1]))
    with pytest.raises(InspectError, match="tokenized with"):
        inspect_run(str(run), tokenizer=str(other))
    with pytest.raises(InspectError, match="no such file"):
        inspect_file(str(tmp_path / "missing.bin"))


def test_inspect_takes_the_runs_copy_when_the_manifests_tokenizer_is_not_on_this_machine(reference, tmp_path):
    """manifest.json records the driver's path of the tokenizer; on another machine the run's own
    copy in RUN/assets/ (checked by sha256) decodes the same text."""
    run = tmp_path / "moved"
    shutil.copytree(reference[0], run, ignore=shutil.ignore_patterns("dedup", "raw", "tasks", "logs"))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["tokenizer"]["path"] = str(tmp_path / "driver-only" / "tokenizer.model")
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "assets").mkdir(exist_ok=True)
    (run / "tokenizer.model").rename(run / "assets" / "tokenizer.model")
    picked = inspect_run(str(run), "slimpajama", n=3, seed=1)
    assert [p.text for p in picked] == [p.text for p in inspect_run(str(reference[0]), "slimpajama", n=3, seed=1)]
    model = (run / "assets" / "tokenizer.model").read_bytes()
    (run / "assets" / "tokenizer.model").write_bytes(model[:-1] + bytes([model[-1] ^ 1]))
    with pytest.raises(InspectError, match=r"assets/tokenizer\.model has sha256"):  # other bytes: said first
        inspect_run(str(run), "slimpajama", n=1)


@pytest.mark.parametrize("evil", ["\x1b]0;pwned\x07", "\x1b[2J", "\x9b31m", "line\roverwritten", "\u202eevil"])
def test_render_never_sends_terminal_controls_from_the_data(evil):
    from pipeline.tools.inspect import Sample, render

    s = Sample(file=f"shards/web/{evil}", format="megatron", index=0, docs_in_file=1, start=0, end=3, bos=True,
               eos=False, text=f"before {evil} after\n\tindented", head=[evil, "x"], tail=[], source="web", split="train")
    out = render([s])
    assert not any(c in out for c in "\x1b\x9b\r\u202e"), repr(out)
    assert "before " in out and " after\n\tindented" in out  # newlines and tabs are kept
