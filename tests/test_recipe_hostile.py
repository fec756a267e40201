"""Hostile recipes: whatever the YAML holds, the answer is one line naming the file, the line
where YAML knows it, and the key path; nothing a recipe names is run, and nothing it says
places a file outside the run (`tinyprep validate` / `tinyprep run` exit 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import tinyprep

from pipeline.plainyaml import MAX_VALUES
from pipeline.recipe import (
    FILTER_ALLOW_ENV,
    MAX_RECIPE_BYTES,
    RecipeError,
    load_recipe,
    parse_recipe,
)

HEAD = "name: t\noutput: /tmp/out\nsources: [{name: a, urls: [/tmp/x.jsonl]}]\n"  # 3 lines: cases start at 4


def _filters(cls: str, args: str = "{}") -> str:
    return ("name: t\noutput: /tmp/out\n"
            f"sources: [{{name: a, urls: [/tmp/x.jsonl], filters: [{{class: {cls}, args: {args}}}]}}]\n")


def _laughs(levels: int) -> str:
    """A "billion laughs" document: each level holds ten aliases of the one before."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return HEAD + "\n".join(lines) + "\n"


BAD_RECIPES = {
    # YAML types a recipe cannot hold
    "!!set": (HEAD + "stages: !!set {ingest, download}\n", "x.yaml:4:9: stages: the YAML tag '!!set' is not allowed"),
    "!!omap": (HEAD + "ray: !!omap [{num_cpus: 1}]\n", "x.yaml:4:6: ray: the YAML tag '!!omap' is not allowed"),
    "!!binary": (HEAD + "ray: {address: !!binary aGVsbG8=}\n", "ray.address: the YAML tag '!!binary' is not allowed"),
    "!!python/object/apply": (HEAD + "ray: {address: !!python/object/apply:os.system [echo hi]}\n",
                              "x.yaml:4:16: ray.address: the YAML tag '!!python/object/apply:os.system' "
                              "is not allowed"),
    "!!python/name": (HEAD + "ray: {address: !!python/name:os.system ''}\n",
                      "'!!python/name:os.system' is not allowed"),
    "a local tag": (HEAD + "ray: !mine {num_cpus: 1}\n", "ray: the YAML tag '!mine' is not allowed"),
    # keys
    "an integer key": (HEAD + "ray: {1: 2}\n",
                       "x.yaml:4:7: ray: the key '1' reads as an integer, not a string; quote it"),
    "a top-level integer key": (HEAD + "3: x\n", "x.yaml:4:1: the key '3' reads as an integer"),
    "a boolean key": (HEAD + "select_like: {yes: [a]}\n", "select_like: the key 'yes' reads as a boolean"),
    "a null key": (HEAD + "ray: {~: 1}\n", "ray: the key '~' reads as a null"),
    "a float key": (HEAD + "ray: {1.5: 1}\n", "ray: the key '1.5' reads as a number"),
    "a date key": (HEAD + "ray: {2020-01-01: 1}\n", "ray: the key '2020-01-01' reads as a date"),
    "a list key": (HEAD + "ray: {? [a, b] : 1}\n", "x.yaml:4:9: ray: a key must be a string, not a list or mapping"),
    "a duplicate key": (HEAD + "name: u\n", "x.yaml:4:1: name: duplicate key (first at line 1)"),
    "a nested duplicate": (HEAD + "ray:\n  num_cpus: 1\n  num_cpus: 2\n",
                           "x.yaml:6:3: ray.num_cpus: duplicate key (first at line 5)"),
    "a key with a newline": (HEAD + '"x\\nerror: y": 1\n', "['x\\nerror: y']: is not a known key"),
    # numbers
    "an integer past 64 bits": (HEAD + "ray: {num_cpus: 123456789012345678901234567890}\n",
                                "x.yaml:4:17: ray.num_cpus: is an integer past 64 bits"),
    "an integer of 5000 digits": (HEAD + "dedup: {seed: " + "9" * 5000 + "}\n",
                                  "dedup.seed: is an integer past 64 bits"),
    "a negative integer past 64 bits": (HEAD + "dedup: {seed: -9223372036854775809}\n",
                                        "dedup.seed: is an integer past 64 bits"),
    ".nan": (HEAD + "ray: {log_every_s: .nan}\n", "x.yaml:4:20: ray.log_every_s: .nan is not a finite number"),
    ".inf": (HEAD + "ray: {log_every_s: .inf}\n", "ray.log_every_s: .inf is not a finite number"),
    "-.inf": (HEAD + "train: {lr: -.inf}\n", "x.yaml:4:13: train.lr: -.inf is not a finite number"),
    "an overflowing float": (HEAD + "train: {lr: 1.0e+999}\n", "train.lr: 1.0e+999 is not a finite number"),
    ".nan in a free-form mapping": (HEAD + "train: {model_args: {dim: .NaN}}\n",
                                    "train.model_args.dim: .NaN is not a finite"),
    ".nan in filter args": (_filters("datatrove.pipeline.filters.RegexFilter", "{regex_exp: x, n: .nan}"),
                            "sources[0].filters[0].args.n: .nan is not a finite number"),
    # the document's shape
    "a top-level list": ("- name: t\n- output: x\n", "x.yaml: the recipe must be a mapping of keys, got list"),
    "a top-level scalar": ("just text\n", "x.yaml: the recipe must be a mapping of keys, got str"),
    "an empty file": ("", "x.yaml: the recipe must be a mapping of keys, got NoneType"),
    "two documents": (HEAD + "---\nname: u\n", "x.yaml:4:1: not valid YAML: but found another document"),
    "billion laughs": (_laughs(9), f"the document expands to more than {MAX_VALUES:,} values (aliases?)"),
    "a self-referring alias": (HEAD + "ray: &r {x: *r}\n",
                               "x.yaml:4:6: ray.x: an alias refers to a node that contains it"),
    "nesting past the bound": (HEAD + "ray: " + "[" * 80 + "]" * 80 + "\n", "nested deeper than 64 levels"),
    "nesting past PyYAML's recursion": (HEAD + "ray: " + "[" * 5000 + "]" * 5000 + "\n",
                                        "x.yaml: not valid YAML: nested too deeply"),
    "a tab": ("name: t\n\toutput: x\n",
              "x.yaml:2:1: not valid YAML: found character '\\t' that cannot start any token"),
    "a NUL character": ("name: t\x00\n", "x.yaml:1:8: not valid YAML: unacceptable character #x0000"),
    "an escaped NUL in a string": (HEAD.replace("/tmp/out", '"/tmp/o\\0ut"'), "x.yaml:2:9: output: contains a NUL"),
    "a huge wrong value is cut short": (
        HEAD.replace("urls: [/tmp/x.jsonl]", "urls: [/tmp/x.jsonl], format: " + "x" * 100000),
        "sources[0].format: Input should be 'auto', 'jsonl', 'jsonl.zst', 'jsonl.gz' or 'parquet' (got '"
        + "x" * 59 + "...)"),
    "a merge of a list": (HEAD + "ray: {<<: [[a]]}\n", "ray: '<<' must merge a mapping"),
    # paths that would leave the run, or be nowhere
    "train.dir ../../..": (HEAD + "train: {dir: ../../..}\n", "train.dir: '../../..' escapes the run directory"),
    "train.dir absolute": (HEAD + "train: {dir: /etc}\n",
                           "train.dir: '/etc' is not a path relative to the run directory"),
    "train.dir a URL": (HEAD + "train: {dir: 's3://b/x'}\n", "train.dir: 's3://b/x' is not a path relative"),
    "train.dir in the run's docs": (HEAD + "train: {dir: docs}\n", "train.dir: 'docs' is inside the run's own 'docs'"),
    "train.dir empty": (HEAD + "train: {dir: ''}\n", "train.dir: must be a non-empty relative path"),
    "output empty": (HEAD.replace("/tmp/out", "''"), "x.yaml: output: must not be empty"),
    "output blank": (HEAD.replace("/tmp/out", "'  '"), "x.yaml: output: must not be empty"),
    "an empty URL": (HEAD.replace("[/tmp/x.jsonl]", "['']"), "sources[0].urls: must not contain an empty URL"),
    "an empty url_list": (HEAD.replace("urls: [/tmp/x.jsonl]", "url_list: ''"),
                          "sources[0].url_list: must not be empty"),
    "an empty tokenizer.model": (HEAD + "tokenizer: {model: ''}\n", "tokenizer.model: must not be empty"),
    # filters[].class: only datatrove filter classes, nothing imported or called otherwise
    "os.system as a filter": (_filters("os.system", "{command: 'touch pwned'}"),
                              "sources[0].filters[0].class: 'os.system' is not a datatrove filter class"),
    "subprocess.Popen as a filter": (_filters("subprocess.Popen"),
                                     "'subprocess.Popen' is not a datatrove filter class"),
    "builtins.eval as a filter": (_filters("builtins.eval"), "'builtins.eval' is not a datatrove filter class"),
    "a datatrove reader": (_filters("datatrove.pipeline.readers.JsonlReader"),
                           "'datatrove.pipeline.readers.JsonlReader' is not a datatrove filter class "
                           "(a subclass of BaseFilter)"),
    "a datatrove module": (_filters("datatrove.pipeline.filters.base_filter.contextlib"),
                           "is not a datatrove filter class"),
    "datatrove's abstract BaseFilter": (_filters("datatrove.pipeline.filters.base_filter.BaseFilter"),
                                        "is abstract: name a concrete filter"),
    "a missing datatrove module": (_filters("datatrove.nope.Filter"), "'datatrove.nope.Filter' cannot be imported"),
    "arguments the filter does not take": (_filters("datatrove.pipeline.filters.RegexFilter", "{regexp: x}"),
                                           "sources[0].filters[0].args: RegexFilter: missing a required argument"),
}


def _write(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "x.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_a_hostile_recipe_is_one_line_naming_the_file_and_key(case, tmp_path):
    text, message = BAD_RECIPES[case]
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, text))
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "x.yaml")), msg
    assert message in msg, msg
    assert "\n" not in msg and "Traceback" not in msg


def test_files_that_are_not_yaml_text(tmp_path):
    with pytest.raises(RecipeError, match=r"x.yaml:2: not UTF-8 text \(byte 0xff at offset 16\)"):
        load_recipe(_write(tmp_path, b"name: t\noutput: \xff\n"))
    with pytest.raises(RecipeError, match=f"x.yaml: larger than {MAX_RECIPE_BYTES >> 20} MiB: not a recipe"):
        load_recipe(_write(tmp_path, b"# " + b"x" * MAX_RECIPE_BYTES + b"\n"))
    with pytest.raises(RecipeError, match="cannot read the recipe: Is a directory"):
        load_recipe(tmp_path)


def test_several_problems_are_still_one_line(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, "ray: {task_retries: -1}\n"))
    assert str(e.value) == (f"{tmp_path / 'x.yaml'}: name: is required; output: is required; "
                            f"sources: is required; ray.task_retries: must be >= 0")


GOOD_RECIPES = {
    "merge keys share a source's settings": (
        "name: t\noutput: /tmp/out\nsources:\n  - &s {name: a, urls: [/tmp/x.jsonl], min_chars: 5}\n"
        "  - <<: *s\n    name: b\n",
        lambda r: [(s.name, s.min_chars) for s in r.sources] == [("a", 5), ("b", 5)]),
    "a byte-order mark": ("\ufeff" + HEAD, lambda r: r.name == "t"),
    "a date-like string stays as written": (HEAD + "ray: {address: 2020-01-01}\n",
                                            lambda r: r.ray.address == "2020-01-01"),
    "a seed of 64 bits": (HEAD + "dedup: {seed: 18446744073709551615}\n", lambda r: r.dedup.seed == 2**64 - 1),
    "a train.dir below train/": (HEAD + "train: {dir: train/exp1}\n", lambda r: r.train.dir == "train/exp1"),
    "a train.dir of its own": (HEAD + "train: {dir: checkpoints-a}\n", lambda r: r.train.dir == "checkpoints-a"),
    "a datatrove filter": (_filters("datatrove.pipeline.filters.RegexFilter", "{regex_exp: '(?i)subscribe'}"),
                           lambda r: r.sources[0].filters[0].args == {"regex_exp": "(?i)subscribe"}),
    "many values, no aliases": (
        HEAD.replace("[/tmp/x.jsonl]", "[" + ", ".join(f"/tmp/{i}.jsonl" for i in range(5000)) + "]"),
        lambda r: len(r.sources[0].urls) == 5000),
}


@pytest.mark.parametrize("case", list(GOOD_RECIPES))
def test_plain_yaml_still_loads(case, tmp_path):
    text, check = GOOD_RECIPES[case]
    assert check(load_recipe(_write(tmp_path, text)))


PYTHON_DATA = {
    "a set": ({"stages": {"ingest"}}, "<recipe>: stages: a set is not a recipe value"),
    "bytes": ({"output": b"/tmp/x"}, "<recipe>: output: a bytes is not a recipe value"),
    "an integer key": ({"ray": {1: 2}}, "<recipe>: ray: the key 1 is not a string"),
    "NaN": ({"train": {"lr": float("nan")}}, "<recipe>: train.lr: nan is not a finite number"),
    "infinity": ({"train": {"lr": float("inf")}}, "<recipe>: train.lr: inf is not a finite number"),
    "an integer past 64 bits": ({"dedup": {"seed": 2**64}}, "<recipe>: dedup.seed: is an integer past 64 bits"),
    "output empty": ({"output": ""}, "<recipe>: output: must not be empty"),
}


@pytest.mark.parametrize("case", list(PYTHON_DATA))
def test_data_given_in_python_follows_the_same_rules(case):
    extra, message = PYTHON_DATA[case]
    data = {"name": "t", "output": "/tmp/out", "sources": [{"name": "a", "urls": ["/tmp/x.jsonl"]}], **extra}
    with pytest.raises(RecipeError) as e:
        parse_recipe(data)
    assert message in str(e.value) and "\n" not in str(e.value)


OVERRIDES = {
    "ray.num_cpus=.nan": "--set ray.num_cpus: .nan is not a finite number",
    "stages=!!set {ingest}": "--set stages: the YAML tag '!!set' is not allowed",
    "ray.address=!!python/name:os.system ''":
        "--set ray.address: the YAML tag '!!python/name:os.system' is not allowed",
    "dedup.seed=99999999999999999999999": "--set dedup.seed: is an integer past 64 bits",
    "ray={a: 1, a: 2}": "--set ray: a: duplicate key",
    "ray.address=[": "--set ray.address:1:2: not valid YAML: expected the node content",
    "train.dir=../x": "train.dir: '../x' escapes the run directory",
    "sources[0].filters=[{class: os.system}]": "sources[0].filters[0].class: 'os.system' is not a datatrove filter",
}


@pytest.mark.parametrize("override", list(OVERRIDES))
def test_set_values_follow_the_same_rules(override, tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, HEAD), [override])
    assert OVERRIDES[override] in str(e.value) and "\n" not in str(e.value)


# --- filters: nothing outside datatrove is imported unless the environment allows it -------------


def _module(tmp_path: Path, name: str, body: str, monkeypatch) -> None:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


FILTER_MODULE = """
from pathlib import Path
Path(__file__).with_name("imported").write_text("the module ran")
from datatrove.pipeline.filters.base_filter import BaseFilter

class Mine(BaseFilter):
    def __init__(self, limit: int = 3):
        super().__init__()
        self.limit = limit

    def filter(self, doc):
        return True

def helper(**kw):
    return kw
"""


def test_a_module_outside_datatrove_is_not_even_imported(tmp_path, monkeypatch):
    _module(tmp_path, "hostile_filters", FILTER_MODULE, monkeypatch)
    monkeypatch.delenv(FILTER_ALLOW_ENV, raising=False)
    refused = f"'hostile_filters.Mine' is not a datatrove filter class .*{FILTER_ALLOW_ENV}"
    with pytest.raises(RecipeError, match=refused):
        load_recipe(_write(tmp_path, _filters("hostile_filters.Mine")))
    assert not (tmp_path / "imported").exists() and "hostile_filters" not in sys.modules


def test_the_environment_allowlist_admits_filter_classes_only(tmp_path, monkeypatch):
    _module(tmp_path, "hostile_filters", FILTER_MODULE, monkeypatch)
    monkeypatch.setenv(FILTER_ALLOW_ENV, "other.*, hostile_filters.*")
    r = load_recipe(_write(tmp_path, _filters("hostile_filters.Mine", "{limit: 5}")))
    assert r.sources[0].filters[0].class_ == "hostile_filters.Mine"
    with pytest.raises(RecipeError, match=r"args: Mine: got an unexpected keyword argument 'size'"):
        load_recipe(_write(tmp_path, _filters("hostile_filters.Mine", "{size: 5}")))
    with pytest.raises(RecipeError, match="'hostile_filters.helper' is not a datatrove filter class"):
        load_recipe(_write(tmp_path, _filters("hostile_filters.helper")))


def test_a_class_reachable_under_datatrove_but_defined_elsewhere_is_refused(tmp_path, monkeypatch):
    import datatrove.pipeline.filters as filters
    from datatrove.pipeline.filters.base_filter import BaseFilter

    # a filter class placed under a datatrove module but defined elsewhere (here)
    sneaky = type("Sneaky", (BaseFilter,), {"filter": lambda self, doc: True, "__module__": __name__})
    monkeypatch.setattr(filters, "Sneaky", sneaky, raising=False)
    monkeypatch.delenv(FILTER_ALLOW_ENV, raising=False)
    with pytest.raises(RecipeError, match=f"is defined in {__name__}, not in datatrove"):
        load_recipe(_write(tmp_path, _filters("datatrove.pipeline.filters.Sneaky")))
    monkeypatch.setenv(FILTER_ALLOW_ENV, "datatrove.pipeline.filters.Sneaky")
    assert load_recipe(_write(tmp_path, _filters("datatrove.pipeline.filters.Sneaky")))


# --- through the CLI: exit 2, one `error:` line, nothing created or run ---------------------------


def _one_error_line(proc, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_validate_refuses_a_python_tag_in_one_line(tmp_path):
    path = _write(tmp_path, HEAD + "ray: {address: !!python/object/apply:os.system ['touch pwned']}\n")
    proc = tinyprep("validate", str(path), cwd=tmp_path)
    _one_error_line(proc, f"{path}:4:16: ray.address: the YAML tag '!!python/object/apply:os.system' is not allowed")
    assert not (tmp_path / "pwned").exists()


def test_run_refuses_a_callable_filter_before_anything_runs(tmp_path):
    text = _filters("os.system", f"{{command: 'touch {tmp_path}/pwned'}}").replace("/tmp/out", str(tmp_path / "run"))
    proc = tinyprep("run", str(_write(tmp_path, text)), cwd=tmp_path)
    _one_error_line(proc, "sources[0].filters[0].class: 'os.system' is not a datatrove filter class")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.yaml"]  # no pwned, no run directory


def test_run_refuses_an_escaping_train_dir_and_an_alias_bomb(tmp_path):
    text = HEAD.replace("/tmp/out", str(tmp_path / "run")) + "train: {dir: ../../..}\n"
    proc = tinyprep("run", str(_write(tmp_path, text)), cwd=tmp_path)
    _one_error_line(proc, "x.yaml: train.dir: '../../..' escapes the run directory")
    proc = tinyprep("validate", str(_write(tmp_path, _laughs(9))), cwd=tmp_path)
    _one_error_line(proc, "values (aliases?)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.yaml"]


def test_run_refuses_an_unknown_stage_as_a_usage_error(tmp_path):
    text = HEAD.replace("/tmp/out", str(tmp_path / "run"))
    proc = tinyprep("run", str(_write(tmp_path, text)), "--stages", "ingest,bogus", cwd=tmp_path)
    _one_error_line(proc, "--stages: unknown stage(s) bogus; the stages are download, ingest, dedup, tokenize, mix")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.yaml"]
