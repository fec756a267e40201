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


# --- what workers get from the driver: environment, logs, tokenizer ------------------------------


def test_the_forwarded_environment_is_an_allowlist():
    from pipeline.executors import forwarded_env

    env = {"HF_TOKEN": "hf1", "HUGGING_FACE_HUB_TOKEN": "hf2", "HF_ENDPOINT": "https://hub", "AWS_ACCESS_KEY_ID": "a",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://x", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json",
           "GCS_PROJECT": "p", "GCSFS_DEFAULT_PROJECT": "p", "FSSPEC_S3_ANON": "true", "HTTPS_PROXY": "http://px",
           "http_proxy": "http://px", "NO_PROXY": "localhost", "no_proxy": "localhost", "TINYPREP_FAULTS": "x:y:raise",
           # not forwarded: the driver's own business
           "PATH": "/bin", "HOME": "/root", "HF_HOME": "/cache", "RAY_ADDRESS": "ray://h:10001", "MY_SECRET": "no",
           "AWSCLI": "no", "SSH_AUTH_SOCK": "/tmp/agent"}
    got = forwarded_env(env)
    assert set(got) == {k for k in env if k not in
                        {"PATH", "HOME", "HF_HOME", "RAY_ADDRESS", "MY_SECRET", "AWSCLI", "SSH_AUTH_SOCK"}}
    assert all(got[k] == env[k] for k in got)
    # inside `ray job submit`, what the job's runtime_env sets already reaches the workers, and Ray
    # refuses a ray.init runtime_env that sets the same variable again
    job = json.dumps({"runtime_env": {"env_vars": {"HF_TOKEN": "from-job"}}, "metadata": {}})
    got = forwarded_env({**env, "RAY_JOB_CONFIG_JSON_ENV_VAR": job})
    assert "HF_TOKEN" not in got and got["AWS_ACCESS_KEY_ID"] == "a"


def test_a_cluster_gets_the_allowlist_and_the_log_gets_names_only(recipe, monkeypatch, caplog):
    import logging

    import ray

    from pipeline.executors import RayExecutor

    calls = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.update(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64})
    for k in [k for k in __import__("os").environ if k.startswith(("AWS_", "HF_", "TINYPREP_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws_secret_value")
    with caplog.at_level(logging.INFO, logger="tinyprep"):
        ex = RayExecutor(recipe)
    assert calls["address"] == "ray://head:10001" and ex.cpus == 64
    assert calls["runtime_env"] == {"env_vars": {"AWS_SECRET_ACCESS_KEY": "aws_secret_value",
                                                 "HF_TOKEN": "hf_secret_value"}}
    assert "HF_TOKEN" in caplog.text and "secret_value" not in caplog.text


class Logging(Stage):
    """Tasks that log a warning (and one that also fails once)."""

    name = "ingest"

    def plan(self, recipe, run, phase):
        return [Task(self.name, f"web/{i}.jsonl", "web", fingerprint(i)) for i in range(2)]

    def run_task(self, task, recipe, run):
        import logging

        log = logging.getLogger("tinyprep")
        log.info("reading %s", task.id)
        log.warning("%s: 3 lines had no text", task.id)
        if task.id == "web/1.jsonl" and not storage.exists(run.tokenize("failed-once")):
            storage.write_bytes(run.tokenize("failed-once"), b"")
            raise RuntimeError("flaky store")
        return TaskResult(docs=1)


def test_what_a_task_logs_goes_to_the_run(recipe, caplog):
    import logging

    run = RunDir(recipe.output)
    with caplog.at_level(logging.INFO, logger="tinyprep"):
        report = run_stage(LocalExecutor(), Logging(), recipe)
    assert report.ok
    text = open(run.task_log("ingest", "web/0.jsonl")).read()
    assert text.startswith("# ingest task web/0.jsonl, attempt 1") and "INFO reading web/0.jsonl" in text
    assert "WARNING web/0.jsonl: 3 lines had no text" in text
    rec = json.loads(open(run.record("ingest", "web/0.jsonl")).read())
    assert rec["log"] == "logs/tasks/ingest/web/0.jsonl.log" and rec["log_warning_count"] == 1
    # the retried task's log is its last attempt's; the run log says which tasks warned and where
    assert "attempt 2" in open(run.task_log("ingest", "web/1.jsonl")).read()
    assert "ingest task web/1.jsonl logged 1 warning(s), its log: logs/tasks/ingest/web/1.jsonl.log" in caplog.text
    assert "2 task(s) logged messages, in " + run.task_logs("ingest") in caplog.text


def test_a_resume_skips_torn_and_stale_records(recipe):
    run = RunDir(recipe.output)
    run_stage(LocalExecutor(), Counting(), recipe)
    with open(run.record("ingest", "first/0"), "w") as fh:
        fh.write('{"fingerprint": ')  # torn
    rec = json.loads(open(run.record("ingest", "first/1")).read())
    storage.write_json(run.record("ingest", "first/1"), dict(rec, fingerprint="other"))  # stale
    again = Counting()
    report = run_stage(LocalExecutor(), again, recipe)
    assert sorted(again.calls) == ["first/0", "first/1"] and report.skipped == 2 and report.ok


def _tiny_corpus(root) -> tuple[str, str]:
    """A jsonl source and a 300-piece Llama-2-like model trained on it."""
    import random

    from pipeline.tokenize.tokenizer import train_tokenizer

    words = "alpha beta gamma delta token model data prep pipeline shard mix train the a of and".split()
    rng = random.Random(0)
    (root / "in").mkdir()
    docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)]
    (root / "in" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "corpus.txt").write_text("\n".join(docs))
    train_tokenizer([str(root / "corpus.txt")], str(root / "tok.model"), vocab_size=300)
    return str(root / "in" / "*.jsonl"), str(root / "tok.model")


def test_tasks_read_the_tokenizer_from_the_runs_copy(tmp_path, monkeypatch):
    """A worker on another node cannot see the driver's tokenizer path: the run copies the model
    into RUN/assets/ and the tasks read it from there; manifest.json records the recipe's path."""
    import pipeline.runner as runner
    from pipeline.runner import run_recipe

    urls, model = _tiny_corpus(tmp_path)
    recipe = parse_recipe({"name": "t", "output": str(tmp_path / "run"), "stages": ["ingest", "tokenize"],
                           "sources": [{"name": "web", "urls": [urls], "weight": 1.0}],
                           "tokenizer": {"model": model}, "tokenize": {"holdout_fraction": 0.1}})
    read_in_tasks: list[str] = []
    in_task = [False]
    real_read, real_execute = storage.read_bytes, runner.execute_task

    def read_bytes(url):
        if in_task[0]:
            read_in_tasks.append(url)
        return real_read(url)

    def execute_task(*args, **kw):
        in_task[0] = True
        try:
            return real_execute(*args, **kw)
        finally:
            in_task[0] = False

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    monkeypatch.setattr(runner, "execute_task", execute_task)
    run_recipe(recipe, executor=LocalExecutor())
    run = RunDir(recipe.output)
    asset = run.assets("tokenizer.model")
    assert open(asset, "rb").read() == open(model, "rb").read()
    assert asset in read_in_tasks and model not in read_in_tasks
    manifest = json.loads(open(run.manifest).read())
    assert manifest["tokenizer"]["path"] == model  # what the manifest records is unchanged


@pytest.mark.slow
def test_a_warning_logged_in_a_ray_task_reaches_the_run(recipe, caplog):
    """On Ray the task runs in a worker process whose logs never reach the driver (log_to_driver
    is off): what it logged is in RUN/logs/tasks/, and the run log points there."""
    import sys

    import ray.cloudpickle

    from pipeline.executors import RayExecutor

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    executor = RayExecutor(recipe, workers=1)
    try:
        with caplog.at_level("INFO", logger="tinyprep"):
            report = run_stage(executor, Logging(), recipe)
    finally:
        executor.close()
    run = RunDir(recipe.output)
    assert report.ok
    rec = json.loads(open(run.record("ingest", "web/0.jsonl")).read())
    assert rec["pid"] != __import__("os").getpid()  # it ran in a worker
    text = open(run.task_log("ingest", "web/0.jsonl")).read()
    assert "INFO reading web/0.jsonl" in text and "WARNING web/0.jsonl: 3 lines had no text" in text
    # the driver's log names the file and, the task being elsewhere, repeats its first warning
    assert ("ingest task web/0.jsonl logged 1 warning(s), its log: logs/tasks/ingest/web/0.jsonl.log: "
            "web/0.jsonl: 3 lines had no text") in caplog.text


def test_a_resume_reads_a_finished_stage_from_its_record_index(recipe, monkeypatch):
    """One object per stage instead of one GET per task; a record changed or deleted since the
    index was written is noticed (the listing a resume makes anyway gives each file's stamp)."""
    import os

    import pipeline.runner as runner

    run = RunDir(recipe.output)
    run_stage(LocalExecutor(), Counting(), recipe)
    index = run.record_index("ingest")
    assert storage.exists(index) and not index.startswith(run.tasks("ingest") + "/")
    before = open(index, "rb").read()
    # nothing changed: every record comes from the index, none from its file, the index stays
    assert runner._existing_records(run, "ingest", Counting().plan(recipe, run, "first"))[1] == 0
    again = Counting()
    assert run_stage(LocalExecutor(), again, recipe).skipped == 4 and again.calls == []
    assert open(index, "rb").read() == before
    os.unlink(run.record("ingest", "first/2"))  # a deleted record: its task runs again
    again = Counting()
    report = run_stage(LocalExecutor(), again, recipe)
    assert again.calls == ["first/2"] and report.skipped == 3 and report.ok
    assert runner._existing_records(run, "ingest", Counting().plan(recipe, run, "first"))[1] == 0  # rewritten
