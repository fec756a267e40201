"""Recipe loading: errors name the file and the key path, overrides, the shipped recipes."""

from pathlib import Path

import pytest

from pipeline.recipe import RecipeError, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]


def _minimal(**extra):
    data = {"name": "t", "output": "/tmp/out", "sources": [{"name": "a", "urls": ["/tmp/x/*.jsonl"]}]}
    data.update(extra)
    return data


@pytest.mark.parametrize("name, stages", [
    ("sample", ["download", "ingest", "dedup", "tokenize", "mix"]),
    ("tinyllama", ["download", "ingest", "tokenize", "mix"]),   # SlimPajama is already deduplicated
    ("slimpajama", ["download", "ingest", "dedup"]),
])
def test_shipped_recipes_validate(name, stages):
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert r.name == name
    assert r.stages == stages


def test_tinyllama_recipe_matches_the_published_mixture():
    r = load_recipe(ROOT / "recipes" / "tinyllama.yaml")
    slim, star = r.source("slimpajama"), r.source("starcoderdata")
    assert (slim.weight, star.weight) == (0.693584, 0.306416)
    assert slim.select.exclude == {"meta.redpajama_set_name": ["RedPajamaGithub"]}
    assert all(u.startswith("hf://datasets/") for u in slim.urls + star.urls)
    assert r.mix.token_budget == 3_000_000_000_000
    assert r.tokenizer.model.endswith("tokenizer.model")


def test_slimpajama_recipe_has_every_redpajama_set():
    r = load_recipe(ROOT / "recipes" / "slimpajama.yaml")
    assert sorted(s.name for s in r.sources) == sorted(
        ["commoncrawl", "c4", "github", "book", "arxiv", "wikipedia", "stackexchange"])
    assert all(s.min_chars == 200 and s.normalize == "nfc" for s in r.sources)


@pytest.mark.parametrize("override, message", [
    ("sources[1].weight=0", "recipes/sample.yaml: sources[1].weight: must be > 0"),
    ("sources[0].weight=-1", "sources[0].weight: must be > 0"),
    ("ray.task_retries=-1", "ray.task_retries: must be >= 0"),
    ("ray.bogus=1", "ray.bogus: is not a known key"),
    ("sources[0].format=csv", "sources[0].format:"),
    ("stages=[ingest, download]", "stages: stages must follow the flow order"),
    ("stages=[bogus]", "stages[0]:"),
    ("sources[1].name=slimpajama", "sources: source name 'slimpajama' is used twice"),
    ("sources[0].name=Bad Name", "sources[0].name: must match"),
    ("sources[0].filters=[{class: nodots}]", "sources[0].filters[0].class: must match"),
])
def test_errors_name_file_and_key_path(override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "recipes" / "sample.yaml", [override])
    assert message in str(e.value)
    assert "Traceback" not in str(e.value)


def test_missing_keys_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match=r"x.yaml: output: is required"):
        p = tmp_path / "x.yaml"
        p.write_text("name: t\nsources: [{name: a, urls: [a.jsonl]}]\n")
        load_recipe(p)
    p = tmp_path / "bad.yaml"
    p.write_text("name: t\nsources: [\n  - a: b\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+:\d+: not valid YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="sources\\[0\\]: needs urls or url_list"):
        parse_recipe(_minimal(sources=[{"name": "a"}]))
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_and_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(ROOT / "recipes" / "sample.yaml",
                    ["ingest.max_errors=null", "sources[0].min_chars=50", "ray.num_cpus=2"], output="elsewhere")
    assert r.ingest.max_errors is None
    assert r.source("slimpajama").min_chars == 50
    assert r.ray.num_cpus == 2
    # relative local paths are resolved against the working directory
    assert r.output == str(tmp_path / "elsewhere")
    assert r.source("slimpajama").urls[0].startswith(str(tmp_path) + "/data/sample/")
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(ROOT / "recipes" / "sample.yaml", ["nokey"])


def test_resolved_recipe_round_trips():
    r = load_recipe(ROOT / "recipes" / "tinyllama.yaml")
    import yaml

    again = parse_recipe(yaml.safe_load(r.to_yaml()))
    assert again == r
