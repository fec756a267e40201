"""Stages become Ray tasks: completion records, resume, retries with backoff, fault injection.

This is the only module that imports Ray. A stage module exposes `plan()` and `run_task()` (see
`pipeline/tasks.py`); the runner

- starts an embedded local Ray (all CPUs, or `--workers N`) unless `RAY_ADDRESS` / the recipe's
  `ray.address` names a cluster (or the driver already runs inside `ray job submit`);
- skips tasks whose completion record `RUN/tasks/<stage>/<task>.json` matches the task's
  fingerprint, so a killed run, rerun, only redoes what had not finished;
- runs the others one Ray task each (one CPU), retrying exceptions and dead workers with
  exponential backoff, up to `ray.task_retries` times;
- merges the tasks' stats (in task-id order: the result does not depend on worker count or
  arrival order) into `RUN/stats/<stage>.json` and writes every reported issue to
  `RUN/stats/<stage>.issues.jsonl`;
- fails the stage (after finishing every other task) when a task failed for good or when the
  stage's bad-input count exceeds what the recipe allows.

Fault injection for tests: `TINYPREP_FAULTS="STAGE:TASK_GLOB:MODE[:TIMES]"`, several rules
separated by `;`. MODE is `raise` (the task raises), `exit` (the worker process dies with
`os._exit`), `raise-late` / `exit-late` (the same, after the outputs are committed and before the
completion record is written), `hang` (the task sleeps until the run is killed), `slow` (the
task sleeps 2 s, then runs). TIMES is how many first attempts fail (default 1; `*`: all).
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import storage
from .progress import StageProgress, fmt_duration
from .recipe import Recipe
from .stats import merge_all
from .tasks import Task, record_url

log = logging.getLogger("tinyprep")

STAGE_MODULES = {
    "download": "pipeline.download",
    "ingest": "pipeline.ingest",
    "dedup": "pipeline.dedup",
    "tokenize": "pipeline.tokenize",
    "mix": "pipeline.mix",
}
FAULTS_ENV = "TINYPREP_FAULTS"
FORWARDED_ENV = (FAULTS_ENV,)


class StageFailed(Exception):
    """A stage ended with failed tasks or too many bad inputs; the message is the summary."""


# ---------------------------------------------------------------------------------------------
# Fault injection (runs inside the worker)


_FAULT_MODES = ("raise", "exit", "raise-late", "exit-late", "hang", "slow")


def _faults() -> list[tuple[str, str, str, int | None]]:
    rules = []
    for rule in filter(None, (r.strip() for r in os.environ.get(FAULTS_ENV, "").split(";"))):
        parts = rule.split(":")
        if len(parts) not in (3, 4) or parts[2] not in _FAULT_MODES:
            raise ValueError(f"{FAULTS_ENV}: bad rule {rule!r}; expected STAGE:TASK_GLOB:MODE[:TIMES]")
        times = None if len(parts) == 4 and parts[3] == "*" else int(parts[3]) if len(parts) == 4 else 1
        rules.append((parts[0], parts[1], parts[2], times))
    return rules


def _inject(stage: str, task_id: str, attempt: int, late: bool) -> None:
    for r_stage, glob, mode, times in _faults():
        if r_stage != stage or not fnmatch.fnmatchcase(task_id, glob) or mode.endswith("-late") != late:
            continue
        if times is not None and attempt >= times:
            continue
        if mode == "hang":
            time.sleep(24 * 3600)
        if mode == "slow":
            time.sleep(2.0)
            continue
        if mode.startswith("exit"):
            os._exit(17)
        raise RuntimeError(f"injected fault ({FAULTS_ENV}) in {stage} task {task_id}, attempt {attempt}")


def execute_task(task: Task, recipe: Recipe, run_url: str, attempt: int, node_id: str = "") -> dict:
    """Run one task and write its completion record. Plain function: Ray wraps it below."""
    _inject(task.stage, task.id, attempt, late=False)
    module = importlib.import_module(STAGE_MODULES[task.stage])
    t0 = time.time()
    result = module.run_task(task, recipe, run_url)
    _inject(task.stage, task.id, attempt, late=True)
    record = {
        "stage": task.stage,
        "task": task.id,
        "source": task.source,
        "fingerprint": task.fingerprint,
        "outputs": result.get("outputs", []),
        "stats": result.get("stats", {}),
        "issues": result.get("issues", []),
        "docs": int(result.get("docs", 0)),
        "bytes": int(result.get("bytes", 0)),
        "errors": int(result.get("errors", 0)),
        "transfer": result.get("transfer", {}),  # retry-dependent details, kept out of the stats
        "attempt": attempt,
        "seconds": round(time.time() - t0, 3),
        "node": socket.gethostname(),
        "node_id": node_id,
        "pid": os.getpid(),
    }
    storage.write_json(record_url(run_url, task.stage, task.id), record)
    return record


# ---------------------------------------------------------------------------------------------
# Ray


def _ray_init(recipe: Recipe, workers: int | None):
    import ray

    if ray.is_initialized():
        return ray, False
    address = recipe.ray.address or os.environ.get("RAY_ADDRESS")
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    if address:
        # On a cluster the workers' environment is not ours: forward what the tasks read.
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
        ray.init(address=address, **kwargs)
        log.info("connected to Ray cluster at %s (%s CPUs)", address, ray.cluster_resources().get("CPU"))
    else:
        cpus = workers or recipe.ray.num_cpus or os.cpu_count() or 1
        # Ray carries task descriptions and small results only: a small object store starts faster.
        # address="local": always a new cluster, never one that happens to run on this machine.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=128 << 20, **kwargs)
        log.info("started an embedded local Ray with %d CPUs", cpus)
    return ray, True


@dataclass
class StageReport:
    stage: str
    tasks: int
    skipped: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    errors: int = 0
    allowed_errors: int | None = 0
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0
    docs: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed and (self.allowed_errors is None or self.errors <= self.allowed_errors)


def _allowed_errors(recipe: Recipe, stage: str) -> int | None:
    return recipe.ingest.max_errors if stage == "ingest" else 0


def _existing_records(run_url: str, stage: str, tasks: list[Task]) -> dict[str, dict]:
    """Completion records that match their task's fingerprint and whose outputs still exist."""
    fs, root = storage.url_to_fs(storage.join(run_url, "tasks", stage))
    try:
        present = set(fs.find(root))
    except FileNotFoundError:
        present = set()
    local = storage.is_local(fs)
    done: dict[str, dict] = {}
    for t in tasks:
        url = record_url(run_url, stage, t.id)
        _, path = storage.url_to_fs(url)
        if path not in present:
            continue
        try:
            rec = storage.read_json(url)
        except (orjson.JSONDecodeError, OSError):
            continue  # a torn record (cannot happen with atomic commits, but be safe): redo the task
        if not rec or rec.get("fingerprint") != t.fingerprint:
            continue
        if local and not all(os.path.exists(storage.url_to_fs(o)[1]) for o in rec.get("outputs", [])):
            continue
        done[t.id] = rec
    return done


def _cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"


def _phases(module, recipe: Recipe, run_url: str):
    """The phases of a stage: one unnamed phase, or what the module's next_phase() yields."""
    if not hasattr(module, "next_phase"):
        yield None
        return
    phase = None
    while (phase := module.next_phase(recipe, run_url, phase)) is not None:
        yield phase


def run_stage(ray, stage: str, recipe: Recipe, run_url: str, cluster_cpus: int) -> StageReport:
    """Plan and run every phase of a stage; merge the stats of all its completion records.

    A stage module may have phases (dedup: signatures, buckets, component rounds, ...): it then
    defines `next_phase(recipe, run_url, previous) -> str | None`, and `plan(recipe, run_url,
    phase)` is called once the previous phase has completed (its outputs are its input). Task
    ids are unique across the stage's phases. `task_cpus(recipe)` gives the CPUs each task gets
    (default 1) and `finish(recipe, run_url, records)` runs after the last phase succeeded.
    """
    module = importlib.import_module(STAGE_MODULES[stage])
    t0 = time.monotonic()
    cpus_per_task = int(module.task_cpus(recipe)) if hasattr(module, "task_cpus") else 1
    records: dict[str, dict] = {}
    failed: list[tuple[str, str]] = []
    n_tasks = n_skipped = 0
    for phase in _phases(module, recipe, run_url):
        label = stage if phase is None else f"{stage}:{phase}"
        tasks: list[Task] = module.plan(recipe, run_url) if phase is None else module.plan(recipe, run_url, phase)
        ids = [t.id for t in tasks]
        if len(set(ids)) != len(ids) or set(ids) & set(records):
            raise RuntimeError(f"{label}: plan produced duplicate task ids")
        done = _existing_records(run_url, stage, tasks)
        todo = [t for t in tasks if t.id not in done]
        log.info("%s: %d tasks, %d already done, %d to run", label, len(tasks), len(done), len(todo))
        records.update(done)
        n_tasks += len(tasks)
        n_skipped += len(done)
        progress = StageProgress(label, len(tasks), sum(t.size for t in tasks), len(done), recipe.ray.log_every_s)
        try:
            if todo:
                _run_tasks(ray, label, todo, recipe, run_url, cluster_cpus, cpus_per_task, records, failed, progress)
        finally:
            progress.close()
        if failed:
            break
    else:
        if hasattr(module, "finish"):
            module.finish(recipe, run_url, [records[i] for i in sorted(records)])

    ordered = [records[i] for i in sorted(records)]
    stats = merge_all(r["stats"] for r in ordered)
    errors = sum(r["errors"] for r in ordered)
    report = StageReport(stage, n_tasks, n_skipped, failed, errors, _allowed_errors(recipe, stage),
                         stats, time.monotonic() - t0, sum(r["docs"] for r in ordered),
                         sum(r["bytes"] for r in ordered))
    storage.write_json(storage.join(run_url, "stats", f"{stage}.json"), {
        "stage": stage, "tasks": n_tasks, "tasks_done": len(ordered), "tasks_failed": sorted(failed),
        "errors": errors, "stats": stats,
    })
    issues = [i for r in ordered for i in r.get("issues", [])]
    storage.write_bytes(storage.join(run_url, "stats", f"{stage}.issues.jsonl"),
                        b"".join(orjson.dumps(i, option=orjson.OPT_SORT_KEYS) + b"\n" for i in issues))
    _append_timeline(run_url, report, ordered)
    return report


def _execute_on_node(task: Task, recipe: Recipe, run_url: str, attempt: int) -> dict:
    import ray

    return execute_task(task, recipe, run_url, attempt, ray.get_runtime_context().get_node_id())


def _run_tasks(ray, label: str, todo: list[Task], recipe: Recipe, run_url: str, cluster_cpus: int,
               cpus_per_task: int, records: dict[str, dict], failed: list[tuple[str, str]],
               progress: StageProgress) -> None:
    """Run tasks on Ray, retrying failures with backoff; fill `records` and `failed`."""
    remote = ray.remote(num_cpus=cpus_per_task, max_retries=0)(_execute_on_node)
    recipe_ref = ray.put(recipe)
    max_inflight = max(2 * cluster_cpus // max(cpus_per_task, 1), 2)
    queue: list[tuple[float, int, Task]] = [(0.0, 0, t) for t in todo]  # (not_before, attempt, task)
    inflight: dict[Any, tuple[int, Task]] = {}
    while queue or inflight:
        now = time.monotonic()
        take = [i for i, (nb, _, _) in enumerate(queue) if nb <= now][: max(0, max_inflight - len(inflight))]
        picked = [queue[i] for i in take]
        for i in reversed(take):
            queue.pop(i)
        for _, attempt, task in picked:
            inflight[remote.remote(task, recipe_ref, run_url, attempt)] = (attempt, task)
        if not inflight:
            time.sleep(min(0.2, max(0.0, min(nb for nb, _, _ in queue) - now)))
            continue
        done_refs, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
        for ref in done_refs:
            attempt, task = inflight.pop(ref)
            try:
                rec = ray.get(ref)
            except Exception as err:  # task raised, or its worker died
                why = _cause(err)
                if attempt < recipe.ray.task_retries:
                    delay = min(recipe.ray.retry_backoff_s * 2**attempt, recipe.ray.retry_backoff_max_s)
                    log.warning("%s task %s failed (attempt %d): %s; retrying in %.1fs",
                                label, task.id, attempt + 1, why, delay)
                    queue.append((time.monotonic() + delay, attempt + 1, task))
                else:
                    log.error("%s task %s failed after %d attempts: %s", label, task.id, attempt + 1, why)
                    failed.append((task.id, why))
                    progress.task_failed()
                continue
            records[task.id] = rec
            progress.task_done(rec["docs"], rec["bytes"], task.size)


def _append_timeline(run_url: str, report: StageReport, records: list[dict]) -> None:
    url = storage.join(run_url, "stats", "timeline.json")
    timeline = storage.read_json(url, default=[]) or []
    timeline.append({
        "stage": report.stage, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(report.seconds, 3), "tasks": report.tasks, "skipped": report.skipped,
        "failed": len(report.failed), "docs": report.docs, "bytes": report.bytes,
        "task_seconds": round(sum(r.get("seconds", 0.0) for r in records), 3),
        "nodes": sorted({r.get("node_id") or r.get("node", "") for r in records}),
    })
    storage.write_json(url, timeline)


# ---------------------------------------------------------------------------------------------
# The run


class _RunLog:
    """Log to RUN/logs/<time>-run.log (local run dirs directly; remote ones uploaded at the end)."""

    def __init__(self, run_url: str):
        self.run_url = run_url
        fs, path = storage.url_to_fs(run_url)
        name = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}-run.log"
        self.remote = None if storage.is_local(fs) else storage.join(run_url, "logs", name)
        if self.remote:
            fd, self.local = tempfile.mkstemp(suffix=".log")
            os.close(fd)
        else:
            os.makedirs(os.path.join(path, "logs"), exist_ok=True)
            self.local = os.path.join(path, "logs", name)
        self.handler = logging.FileHandler(self.local, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("tinyprep").addHandler(self.handler)

    def close(self) -> None:
        logging.getLogger("tinyprep").removeHandler(self.handler)
        self.handler.close()
        if self.remote:
            with open(self.local, "rb") as fh:
                storage.write_bytes(self.remote, fh.read())
            os.unlink(self.local)


def issue_summary(run_url: str, stage: str, limit: int = 10) -> list[str]:
    raw = storage.read_bytes(storage.join(run_url, "stats", f"{stage}.issues.jsonl"))
    issues = [orjson.loads(line) for line in raw.splitlines() if line.strip()]
    lines = []
    for i in issues[:limit]:
        where = i.get("file", "?") + (f":{i['line']}" if i.get("line") is not None else "")
        lines.append(f"  {where}: {i.get('kind')}: {i.get('message')}")
    if len(issues) > limit:
        lines.append(f"  ... {len(issues) - limit} more in {storage.join(run_url, 'stats', f'{stage}.issues.jsonl')}")
    return lines


def _remove_stale_temporaries(run_url: str) -> None:
    """Temp files of a killed run (atomic commits that never renamed). One run per directory."""
    fs, root = storage.url_to_fs(run_url)
    if not storage.is_local(fs) or not fs.exists(root):
        return
    stale = [p for p in fs.find(root) if ".tmp-" in p.rsplit("/", 1)[-1]]
    for p in stale:
        fs.rm(p)
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted run", len(stale))


def run_recipe(recipe: Recipe, stages: list[str] | None = None, workers: int | None = None) -> list[StageReport]:
    """Run the recipe's stages (or the given subset, in flow order); raise StageFailed on failure."""
    wanted = stages or recipe.stages
    unknown = [s for s in wanted if s not in STAGE_MODULES]
    if unknown:
        raise StageFailed(f"unknown stage(s) {unknown}; available: {list(STAGE_MODULES)}")
    order = [s for s in STAGE_MODULES if s in wanted]
    run_url = recipe.output
    storage.write_bytes(storage.join(run_url, "recipe.yaml"), recipe.to_yaml().encode())
    _remove_stale_temporaries(run_url)
    runlog = _RunLog(run_url)
    reports: list[StageReport] = []
    try:
        log.info("run %s: stages %s, output %s", recipe.name, ",".join(order), run_url)
        ray, owned = _ray_init(recipe, workers)
        try:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            for stage in order:
                report = run_stage(ray, stage, recipe, run_url, cpus)
                reports.append(report)
                if not report.ok:
                    msg = [f"stage {stage} failed:"]
                    for tid, why in report.failed:
                        msg.append(f"  task {tid}: {why}")
                    if report.allowed_errors is not None and report.errors > report.allowed_errors:
                        msg.append(f"  {report.errors} bad input(s), the recipe allows {report.allowed_errors} "
                                   f"(set {stage}.max_errors to accept them):")
                        msg += issue_summary(run_url, stage)
                    raise StageFailed("\n".join(msg))
                if report.errors:
                    log.warning("%s: %d bad input(s) accepted (max_errors=%s):\n%s", stage, report.errors,
                                report.allowed_errors, "\n".join(issue_summary(run_url, stage)))
                log.info("%s done in %s", stage, fmt_duration(report.seconds))
        finally:
            if owned:
                ray.shutdown()
    finally:
        runlog.close()
    return reports

