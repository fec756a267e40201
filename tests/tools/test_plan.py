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
        lo, hi = est["tokens"]
        assert lo <= hi and tokens / 1.5 <= hi and lo <= tokens * 1.5, (name, est["tokens"], tokens)
        assert docs / 1.5 <= est["documents"][0] == est["documents"][1] <= docs * 1.5, (name, est["documents"], docs)
        assert est["measured_on"] == "its own inputs"
        assert est["input_files"] > 0 and est["input_bytes"] > 0
    assert sample_plan["sources"]["slimpajama"]["duplicate_rate"] > 0  # planted duplicates are seen
    assert set(sample_plan["stages"]) == {"download", "ingest", "dedup", "tokenize", "mix"}
    assert any("no tokenizer file" in a and "bench_plan_rates.py" in a for a in sample_plan["assumptions"])
    assert sample_plan["published"]["sources"] == {} and "tinyllama" not in sample_plan["published"]


def test_doubling_nodes_halves_wall_time(workdir, sample_plan):
    r = tinyprep("plan", str(ROOT / "recipes" / "sample.yaml"), "--nodes", "4", "--cpus", "4", "--json", cwd=workdir)
    assert r.returncode == 0, r.stderr
    p4 = json.loads(r.stdout)
    for stage in ("ingest", "dedup", "tokenize"):
        a, b = sample_plan["stages"][stage], p4["stages"][stage]
        assert 0 < a["wall_hours"][0] <= a["wall_hours"][1]
        # rates are measured anew in each process: compare wall per core-hour; the fast end is
        # every CPU busy, the slow end adds the longest task, which more nodes do not shorten
        assert b["wall_hours"][0] / b["core_hours"][0] == pytest.approx(a["wall_hours"][0] / a["core_hours"][0] / 2)
        assert b["wall_hours"][1] / b["core_hours"][1] < a["wall_hours"][1] / a["core_hours"][1]
    assert p4["stages"]["download"]["wall_hours"][0] == pytest.approx(
        sample_plan["stages"]["download"]["wall_hours"][0] / 2)


def test_tinyllama_offline_shows_published_figures_beside_the_estimate(tmp_path):
    r = tinyprep("plan", str(ROOT / "recipes" / "tinyllama.yaml"), "--nodes", "8", "--cpus", "64", "--json",
                 cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    p = json.loads(r.stdout)
    a = "\n".join(p["assumptions"])
    assert "inputs of slimpajama could not be listed" in a and "size_gb 893" in a and "size_gb 290" in a
    assert "dedup not in the recipe's stages" in a and "bench_plan_rates.py" in a
    slim, star = p["sources"]["slimpajama"], p["sources"]["starcoderdata"]
    assert slim["input_bytes"] == 893 * 10**9 and star["input_bytes"] == 290 * 10**9
    pub = p["published"]["sources"]
    assert pub["slimpajama"]["dataset"] == "SlimPajama-627B train without RedPajamaGithub"
    assert pub["starcoderdata"]["dataset"] == "Starcoderdata"
    # offline, the ratios are the published ones: the estimate falls within the published ranges
    assert 590e9 <= slim["tokens"][0] < slim["tokens"][1] <= 660e9
    assert (star["tokens"], star["text_bytes"]) == ([250 * 10**9, 291 * 10**9], [882 * 10**9] * 2)
    assert slim["measured_on"].startswith("published figures")
    tl = p["published"]["tinyllama"]
    assert tl["combined_tokens"]["published"][0] == 950e9 and tl["shards_bytes"]["published"][0] == 1.8e12
    assert tl["slimpajama_prepare_core_hours"]["published"][0] == 24 * 128
    lo, hi = p["stages"]["tokenize"]["core_hours"]
    assert lo < hi  # plain SentencePiece to the exact encoder: a range, not one number
    assert p["stages"]["tokenize"]["disk_bytes"] == [2 * t for t in p["total"]["tokens"]]
    text = tinyprep("plan", str(ROOT / "recipes" / "tinyllama.yaml"), "--nodes", "8", "--cpus", "64", cwd=tmp_path,
                    env={"HF_HUB_OFFLINE": "1"})
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "published (for what the recipe selects):" in out and "TinyLlama, published, beside this estimate:" in out
    assert "[TL146] github.com/jzhang38/TinyLlama/issues/146" in out and "assumptions:" in out


def test_published_figures_follow_the_selection():
    from pipeline.recipe import SourceConfig
    from pipeline.tools.published import published_for

    url = "hf://datasets/cerebras/SlimPajama-627B/train/chunk*/*.jsonl.zst"
    whole = published_for(SourceConfig(name="s", urls=[url]))
    no_gh = published_for(SourceConfig(name="s", urls=[url],
                                       select={"exclude": {"meta.redpajama_set_name": ["RedPajamaGithub"]}}))
    assert whole["tokens"][:2] == (627e9, 690e9)
    assert no_gh["tokens"][:2] == (594e9, 659e9) and no_gh["input_bytes"] == whole["input_bytes"]
    assert no_gh["text_bytes"][0] == pytest.approx(whole["text_bytes"][0] * 0.948)
    star = "hf://datasets/bigcode/starcoderdata/*/train-*.parquet"
    assert published_for(SourceConfig(name="c", urls=[star]))["text_bytes"][:2] == (882e9, 882e9)
    assert published_for(SourceConfig(name="c", urls=[star], select={"dirs": ["python"]})) is None  # a part of it
    assert published_for(SourceConfig(name="x", urls=["data/*.jsonl"])) is None


def test_tokenizing_rates_are_measured_on_real_text_not_the_bundled_sample(tmp_path):
    import sentencepiece as spm

    from pipeline.recipe import parse_recipe
    from pipeline.tools import plan
    from pipeline.tools.realtext import real_text

    code = real_text("code", 1.0)
    if not code:
        pytest.skip("no /usr/include or /usr/lib/python3*/ sources on this machine")
    (tmp_path / "train.txt").write_text("\n".join(code)[:2_000_000])
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "t"),
                                   vocab_size=2000, model_type="bpe", byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   allow_whitespace_only_pieces=True, minloglevel=2, num_threads=1)
    recipe = parse_recipe({"name": "t", "output": str(tmp_path / "run"), "tokenizer": {"model": str(tmp_path / "t.model")},
                           "sources": [{"name": "code", "urls": ["x/*.parquet"], "text_field": "content"}]})
    notes: list[str] = []
    rate, bpt = plan._tokenize_estimate(recipe, recipe.sources[0], [], "code", notes)
    assert 0 < rate[0] <= rate[1] and bpt == plan.BYTES_PER_TOKEN["code"][:2]
    assert "MB of this machine's real code" in notes[0] and "cold cache" in notes[0]


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
