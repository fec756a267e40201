"""The stage contract run by the in-process executor: phases, records, resume, retries, errors."""

from __future__ import annotations

import json
from typing import Iterator

import pytest

from pipeline import storage
from pipeline.executors import LocalExecutor
from pipeline.layout import RunDir
from pipeline.recipe import parse_recipe
from pipeline.runner import run_stage
from pipeline.stage import STAGES, Stage, Task, TaskResult, fingerprint, get_stage


class Counting(Stage):
    """Two phases; the second is planned from what the first wrote."""

    name = "ingest"  # fault rules and records are keyed by a registered stage name

    def __init__(self, bad: int = 0):
        self.calls: list[str] = []
        self.bad = bad

    def phases(self, recipe, run: RunDir) -> Iterator[str]:
        yield "first"
        yield "second"

    def plan(self, recipe, run: RunDir, phase):
        if phase == "first":
            return [Task(self.name, f"first/{i}", "src", fingerprint(i), size=10) for i in range(3)]
        total = sum(storage.read_json(run.tokenize(f"{i}.json"))["n"] for i in range(3))
        return [Task(self.name, "second", "src", fingerprint("second", total), payload={"total": total})]

    def run_task(self, task, recipe, run: RunDir) -> TaskResult:
        self.calls.append(task.id)
        if task.id == "second":
            return TaskResult(stats={"sources": {"src": {"total": task.payload["total"]}}}, docs=1)
        i = int(task.id.split("/")[1])
        out = run.tokenize(f"{i}.json")
        storage.write_json(out, {"n": i + 1})
        return TaskResult(outputs=[out], stats={"sources": {"src": {"n": i + 1}}}, docs=i + 1, bytes=10,
                          errors=1 if i < self.bad else 0,
                          issues=[{"file": f"{i}", "line": 1, "kind": "bad_json", "message": "x"}] if i < self.bad else [])

    def allowed_errors(self, recipe):
        return 1


@pytest.fixture
def recipe(tmp_path):
    return parse_recipe({"name": "t", "output": str(tmp_path / "run"), "sources": [{"name": "src", "urls": ["x"]}],
                         "ray": {"retry_backoff_s": 0.01}})


def test_phases_records_stats_and_resume(recipe, tmp_path):
    stage = Counting()
    report = run_stage(LocalExecutor(), stage, recipe)
    assert report.ok and report.phases == ["first", "second"] and report.tasks == 4 and report.skipped == 0
    assert report.stats == {"sources": {"src": {"n": 6, "total": 6}}} and report.docs == 7
    run = RunDir(recipe.output)
    rec = json.loads(open(run.record("ingest", "first/2")).read())
    assert rec["outputs"] == ["tokenize/2.json"] and rec["docs"] == 3 and rec["attempt"] == 0  # run-relative
    assert json.loads(open(run.stage_stats("ingest")).read())["stats"] == report.stats
    again = Counting()
    report = run_stage(LocalExecutor(), again, recipe)
    assert again.calls == [] and report.skipped == 4 and report.stats["sources"]["src"]["total"] == 6


def test_failures_are_retried_then_reported(recipe, monkeypatch):
    monkeypatch.setenv("TINYPREP_FAULTS", "ingest:first/1:raise:2")
    stage = Counting()
    report = run_stage(LocalExecutor(), stage, recipe)
    assert report.ok and stage.calls.count("first/1") == 1  # two injected failures, then it ran
    assert json.loads(open(RunDir(recipe.output).record("ingest", "first/1")).read())["attempt"] == 2
    monkeypatch.setenv("TINYPREP_FAULTS", "ingest:second:raise:*")
    storage.write_json(RunDir(recipe.output).tokenize("0.json"), {"n": 10})  # the second phase's input changed
    report = run_stage(LocalExecutor(), Counting(), recipe)
    assert not report.ok and [t for t, _ in report.failed] == ["second"]
    assert "injected fault" in report.failed[0][1]


def test_bad_inputs_beyond_the_allowance_fail_the_stage(recipe):
    report = run_stage(LocalExecutor(), Counting(bad=2), recipe)
    assert report.errors == 2 and report.allowed_errors == 1 and not report.ok
    issues = storage.read_bytes(RunDir(recipe.output).stage_issues("ingest")).splitlines()
    assert [json.loads(i)["file"] for i in issues] == ["0", "1"]


def test_a_task_must_return_a_task_result(recipe):
    class Untyped(Counting):
        def run_task(self, task, recipe, run):
            return {"outputs": []}

    report = run_stage(LocalExecutor(), Untyped(), recipe)
    assert not report.ok and "TaskResult" in report.failed[0][1]


def test_every_registered_stage_keeps_the_contract():
    for name in STAGES:
        stage = get_stage(name)
        assert isinstance(stage, Stage) and stage.name == name
