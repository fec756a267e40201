"""`tinyprep plan`: estimates against a finished run of the sample, scaling, and the offline fallbacks."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, tinyprep


@pytest.fixture(scope="module")
def sample_plan(workdir):
    r = tinyprep("plan", str(ROOT / "recipes" / "sample.yaml"), "--nodes", "2", "--cpus", "4", "--json", cwd=workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_estimates_match_the_reference_run(sample_plan, reference):
    run, _, _ = reference
    manifest = json.loads((run / "manifest.json").read_text())
    for name, est in sample_plan["sources"].items():
        m = manifest["sources"][name]
        tokens = m["train"]["tokens"] + m["validation"]["tokens"]
        docs = m["train"]["docs"] + m["validation"]["docs"]
        assert tokens / 1.5 <= est["tokens"] <= tokens * 1.5, (name, est["tokens"], tokens)
        assert docs / 1.5 <= est["documents"] <= docs * 1.5, (name, est["documents"], docs)
        assert est["measured_on"] == "its own inputs"
        assert est["input_files"] > 0 and est["input_bytes"] > 0
    assert sample_plan["sources"]["slimpajama"]["duplicate_rate"] > 0  # planted duplicates are seen
    assert set(sample_plan["stages"]) == {"download", "ingest", "dedup", "tokenize", "mix"}
    assert any("no tokenizer file" in a for a in sample_plan["assumptions"])


def test_doubling_nodes_halves_wall_time(workdir, sample_plan):
    r = tinyprep("plan", str(ROOT / "recipes" / "sample.yaml"), "--nodes", "4", "--cpus", "4", "--json", cwd=workdir)
    assert r.returncode == 0, r.stderr
    p4 = json.loads(r.stdout)
    for stage in ("ingest", "dedup", "tokenize"):
        a, b = sample_plan["stages"][stage], p4["stages"][stage]
        assert a["wall_hours"] > 0
        # rates are measured anew in each process: compare wall per core-hour
        assert b["wall_hours"] / b["core_hours"] == pytest.approx(a["wall_hours"] / a["core_hours"] / 2)
    assert p4["stages"]["download"]["wall_hours"] == pytest.approx(sample_plan["stages"]["download"]["wall_hours"] / 2)


def test_tinyllama_offline_uses_size_gb(tmp_path):
    r = tinyprep("plan", str(ROOT / "recipes" / "tinyllama.yaml"), "--nodes", "8", "--cpus", "64", "--json",
                 cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    p = json.loads(r.stdout)
    a = "\n".join(p["assumptions"])
    assert "inputs of slimpajama could not be listed" in a and "size_gb 893" in a
    assert "size_gb 290" in a and "bundled sample" in a and "dedup not in the recipe's stages" in a
    assert p["sources"]["slimpajama"]["input_bytes"] == 893 * 10**9
    assert p["sources"]["starcoderdata"]["input_bytes"] == 290 * 10**9
    tokens = p["total"]["tokens"]
    assert 3e11 < tokens < 3e12  # SlimPajama without GitHub + Starcoderdata: about 0.9T tokens
    assert p["stages"]["tokenize"]["disk_bytes"] == pytest.approx(2 * tokens, rel=0.01)
    text = tinyprep("plan", str(ROOT / "recipes" / "tinyllama.yaml"), cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert text.returncode == 0 and "assumptions:" in text.stdout and "size_gb 893" in text.stdout


def test_unreachable_source_without_size_gb_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\noutput: runs/r\nstages: [ingest, tokenize]\n"
        "sources:\n  - name: lost\n    urls: ['" + str(tmp_path / "nowhere" / "*.jsonl.zst") + "']\n"
        "tokenizer: {train: {vocab_size: 400}}\n")
    r = tinyprep("plan", str(recipe), cwd=tmp_path)
    assert r.returncode == 1
    assert "source lost" in r.stderr and "size_gb" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "runs").exists()  # nothing written into the run directory
