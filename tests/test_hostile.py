"""Hostile input and hostile runs: every case is one clear line and an exit code, nothing is
written outside the run directory, and nothing the user owns is touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tinyprep

from pipeline.layout import MARKER_NAME, RunDir, RunDirError


def _recipe(tmp_path: Path, **over) -> Path:
    src = tmp_path / "in" / "a"
    src.mkdir(parents=True, exist_ok=True)
    (src / "x.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(5)))
    data = {"name": "hostile", "output": str(tmp_path / "run"), "stages": ["download", "ingest"],
            "sources": [{"name": "web", "urls": [str(src / "*.jsonl")], "download": False, "weight": 1.0}]}
    data.update(over)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _one_line_error(proc, code: int, *words: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in err[0], (w, err[0])
    return err[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _user_dir(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "draft.tmp-0123456789ab").write_text("mine")  # looks like our temporary
    (home / "report.tmp-x").write_text("mine too")
    return home


CASES = {
    "empty --output": (lambda t: ["--output", ""], 2, ["--output", "empty"]),
    "--output is a user's directory": (lambda t: ["--output", str(t / "home")], 2,
                                       ["not a tinyprep run directory"]),
    "--output is a file": (lambda t: ["--output", str(t / "home" / "report.tmp-x")], 2, ["not a directory"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_that_are_not_run_directories_are_refused_untouched(case, tmp_path):
    home = _user_dir(tmp_path)
    before = _tree(home)
    args, code, words = CASES[case]
    proc = tinyprep("run", str(_recipe(tmp_path)), *args(tmp_path), cwd=tmp_path)
    _one_line_error(proc, code, *words)
    assert _tree(home) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "in", "recipe.yaml"]


def test_a_malformed_fault_rule_is_refused_before_the_run(tmp_path):
    proc = tinyprep("run", str(_recipe(tmp_path)), cwd=tmp_path, env={"TINYPREP_FAULTS": "ingest:*:explode"})
    _one_line_error(proc, 2, "TINYPREP_FAULTS", "ingest:*:explode")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("download", [False, True])
def test_url_list_entries_that_escape_are_refused_and_nothing_lands_outside(download, tmp_path):
    lst = tmp_path / "urls.txt"
    deep = tmp_path / "in" / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "x.jsonl").write_text(json.dumps({"text": "a document " * 30}) + "\n")
    (tmp_path / "in" / "e").mkdir()
    (tmp_path / "in" / "e" / "y.jsonl").write_text(json.dumps({"text": "another one " * 30}) + "\n")
    # relative to the list's common root, the second entry is ../../../e/y.jsonl: RUN/docs/web/../../..
    lst.write_text(f"{deep}/x.jsonl\n{deep}/../../../e/y.jsonl\n")
    recipe = _recipe(tmp_path, sources=[{"name": "web", "url_list": str(lst), "download": download, "weight": 1.0}])
    before = {p for p in tmp_path.rglob("*")}
    proc = tinyprep("run", str(recipe), cwd=tmp_path)
    _one_line_error(proc, 1, "escapes the run directory")
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(tmp_path / "run" in p.parents or p == tmp_path / "run" for p in created), created


def test_a_marked_run_is_reused_and_an_earlier_versions_run_is_adopted(tmp_path):
    fresh = RunDir(str(tmp_path / "new"))
    fresh.claim()
    assert (tmp_path / "new" / MARKER_NAME).exists()
    fresh.claim()  # again: fine
    legacy = tmp_path / "legacy"
    (legacy / "tasks").mkdir(parents=True)
    (legacy / "recipe.yaml").write_text("name: x\n")
    RunDir(str(legacy)).claim()
    assert (legacy / MARKER_NAME).exists()
    with pytest.raises(RunDirError, match="not empty"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "file").write_text("x")
        RunDir(str(tmp_path / "other")).claim()


def test_two_globs_with_one_relative_path_are_reported_not_dropped(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d / "x").mkdir(parents=True)
        (tmp_path / d / "x" / "part.jsonl").write_text(json.dumps({"text": d * 300}) + "\n")
    recipe = _recipe(tmp_path, sources=[{"name": "web", "weight": 1.0, "download": False,
                                         "urls": [str(tmp_path / "a" / "*" / "*.jsonl"),
                                                  str(tmp_path / "b" / "*" / "*.jsonl")]}])
    proc = tinyprep("run", str(recipe), "--stages", "ingest", cwd=tmp_path)
    _one_line_error(proc, 1, "a/x/part.jsonl", "b/x/part.jsonl", "x/part.jsonl")


@pytest.mark.parametrize("path", ["../x", "a/../../b", "/etc", "s3://bucket/x", "a//b", "~/x", ""])
def test_paths_from_input_cannot_leave_the_run(path, tmp_path):
    run = RunDir(str(tmp_path))
    for make in (lambda: run.raw("web", path), lambda: run.docs("web", path), lambda: run.removed("web", path),
                 lambda: run.train(path)):
        with pytest.raises(RunDirError):
            make()


def test_an_unexpected_os_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    recipe = _recipe(tmp_path)
    proc = tinyprep("validate", str(recipe), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "run").mkdir()
    RunDir(str(tmp_path / "run")).claim()
    (tmp_path / "run" / "recipe.yaml").write_text("name: x\nstages: [ingest]\n")
    proc = tinyprep("stats", str(tmp_path / "run"), "-o", str(blocker / "stats.json"), cwd=tmp_path)
    line = _one_line_error(proc, 1, "a-file", "File exists", "--debug")
    proc = tinyprep("--debug", "stats", str(tmp_path / "run"), "-o", str(blocker / "stats.json"), cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and line not in proc.stderr


@pytest.mark.parametrize("model", ["missing.model", "not-a-model.txt"])
def test_an_unusable_tokenizer_is_refused_before_any_stage(model, tmp_path):
    (tmp_path / "not-a-model.txt").write_text("hello")
    recipe = _recipe(tmp_path, stages=["download", "ingest", "tokenize"], tokenizer={"model": str(tmp_path / model)})
    for command in (["validate", str(recipe)], ["run", str(recipe)]):
        proc = tinyprep(*command, cwd=tmp_path)
        _one_line_error(proc, 2, "tokenizer.model", model)
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was created
    proc = tinyprep("run", str(recipe), "--stages", "download,ingest", cwd=tmp_path)  # no tokenizer needed
    assert proc.returncode == 0, proc.stderr
