"""Runs a recipe's stages: completion records, resume, retries with backoff, stats, logs.

For each stage (`pipeline/stage.py` holds the contract) and each of its phases, the runner

- skips tasks whose completion record `RUN/tasks/<stage>/<task>.json` matches the task's
  fingerprint, so a killed run, rerun, only redoes what had not finished;
- hands the others to an executor (`pipeline/executors.py`: Ray, embedded or a cluster, or
  in-process), retrying exceptions and dead workers with exponential backoff, up to
  `ray.task_retries` times;
- merges the tasks' stats (in task-id order: the result does not depend on worker count or
  arrival order) into `RUN/stats/<stage>.json` and writes every reported issue to
  `RUN/stats/<stage>.issues.jsonl`;
- fails the stage (after finishing every other task) when a task failed for good or when the
  stage's bad-input count exceeds what the stage allows.

Before the first stage, `run_recipe` runs the preflight (`pipeline/preflight.py`) and copies the
recipe's tokenizer model into the run (RUN/assets/), so that workers on any node read what the
driver read. What a task logs (the "tinyprep" logger, INFO and above, wherever the task runs)
goes to RUN/logs/tasks/<stage>/<task>.log through storage; its completion record names the file
and the run log says which tasks logged warnings and where.

Fault injection for tests: `TINYPREP_FAULTS` (see `pipeline/faults.py`).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import orjson

from . import storage
from .faults import inject, parse_faults
from .layout import RunDir
from .preflight import check_configuration, check_sources, check_writable
from .progress import StageProgress, fmt_duration
from .recipe import Recipe
from .retry import backoff_delay
from .stage import STAGES, Stage, StageFailed, Task, TaskResult, get_stage
from .stats import merge_all

log = logging.getLogger("tinyprep")


class _TaskLog(logging.Handler):
    """Collects what one task logs to the "tinyprep" logger (INFO and above), capped."""

    MAX_LINES = 10_000

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.lines: list[str] = []
        self.warnings: list[str] = []  # the first few, for the run log
        self.warning_count = 0
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.levelno >= logging.WARNING:
                self.warning_count += 1
                if len(self.warnings) < 3:
                    self.warnings.append(next(iter(record.getMessage().splitlines()), ""))
            if len(self.lines) < self.MAX_LINES:
                self.lines.append(self.format(record))
            else:
                self.dropped += 1
        except Exception:  # noqa: BLE001 - logging must never fail the task
            self.handleError(record)

    def __enter__(self) -> "_TaskLog":
        logger = logging.getLogger("tinyprep")
        self._level = logger.level
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            # a Ray worker never configured the logger: its effective level is the root's WARNING
            logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger("tinyprep")
        logger.removeHandler(self)
        logger.setLevel(self._level)

    def text(self, header: str) -> bytes:
        tail = [f"... {self.dropped} more line(s) not kept"] if self.dropped else []
        return ("\n".join([header, *self.lines, *tail]) + "\n").encode()


def execute_task(stage: Stage, task: Task, recipe: Recipe, run: RunDir, attempt: int, node_id: str = "") -> dict:
    """Run one task and write its completion record. Plain function: executors call it.

    What the task logs goes to RUN/logs/tasks/<stage>/<task>.log (also when it raises), through
    storage, so a task on a remote node leaves its log where the run is."""
    inject(task.stage, task.id, attempt, late=False)
    t0 = time.time()
    header = f"# {task.stage} task {task.id}, attempt {attempt + 1}, {socket.gethostname()} pid {os.getpid()}"
    with _TaskLog() as tlog:
        try:
            result = stage.run_task(task, recipe, run)
        except Exception as err:
            if tlog.lines:  # what led to the failure is worth keeping; a silent task leaves no file
                tlog.lines.append(f"task failed: {type(err).__name__}: {err}")
                try:
                    _write_task_log(run, task, tlog, header)
                except Exception:  # noqa: BLE001 - the task's own error is the one to report
                    pass
            raise
    if not isinstance(result, TaskResult):
        raise TypeError(f"{task.stage}.run_task returned {type(result).__name__}, not TaskResult")
    inject(task.stage, task.id, attempt, late=True)
    record = {
        "stage": task.stage,
        "task": task.id,
        "source": task.source,
        "fingerprint": task.fingerprint,
        **asdict(result),
        "attempt": attempt,
        "seconds": round(time.time() - t0, 3),
        "node": socket.gethostname(),
        "node_id": node_id,
        "pid": os.getpid(),
    }
    if tlog.lines:
        record["log"] = run.to_relative(_write_task_log(run, task, tlog, header))
        record["log_warnings"] = tlog.warnings
        record["log_warning_count"] = tlog.warning_count
    # on disk, outputs are relative to the run: a moved or copied run directory still finds them
    storage.write_json(run.record(task.stage, task.id),
                       dict(record, outputs=[run.to_relative(o) for o in result.outputs]))
    return record


def _write_task_log(run: RunDir, task: Task, tlog: _TaskLog, header: str) -> str:
    url = run.task_log(task.stage, task.id)
    storage.write_bytes(url, tlog.text(header))
    return url


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
    phases: list[str | None] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and (self.allowed_errors is None or self.errors <= self.allowed_errors)


RECORD_READERS_REMOTE = 64  # concurrent GETs of completion records on an object store
RECORD_READERS_LOCAL = 8  # a shared filesystem's metadata round trips overlap too
_INDEX_FORMAT = "tinyprep-record-index"


def _record_stamp(info: dict) -> str:
    """What identifies one version of a record file in a listing: the object store's ETag (a
    content hash for these small single-part objects), else size and modification time."""
    etag = info.get("ETag") or info.get("etag")
    return "etag:" + str(etag).strip('"') if etag else storage.file_stamp(info)


def _list_records(run: RunDir, stage: str) -> dict[str, dict]:
    """path -> fsspec info of every file under RUN/tasks/<stage>/ (one listing)."""
    fs, root = storage.url_to_fs(run.tasks(stage))
    try:
        return fs.find(root, detail=True)
    except FileNotFoundError:
        return {}


def _read_record_index(run: RunDir, stage: str) -> dict[str, list]:
    """The stage's record index (task id -> [stamp, record as on disk]), {} when absent or unusable."""
    import zstandard

    try:
        doc = orjson.loads(zstandard.ZstdDecompressor().decompress(storage.read_bytes(run.record_index(stage))))
    except FileNotFoundError:
        return {}
    except (zstandard.ZstdError, orjson.JSONDecodeError, OSError) as e:
        log.debug("%s: unreadable (%s); reading the records one by one", run.record_index(stage), e)
        return {}
    if not isinstance(doc, dict) or doc.get("format") != _INDEX_FORMAT or doc.get("version") != 1:
        return {}
    return doc.get("records") or {}


def _write_record_index(run: RunDir, stage: str, records: dict[str, dict], listed: dict | None = None) -> None:
    """Every record of the stage in one file with the stamp of its file as listed now (`listed`: a
    listing just made), so that a resume reads one object instead of one per task; a record whose
    file has changed since (a rerun task, a hand edit) no longer matches its stamp and is read from
    its file."""
    import zstandard

    listed = _list_records(run, stage) if listed is None else listed
    entries = {}
    for tid, rec in records.items():
        info = listed.get(storage.url_to_fs(run.record(stage, tid))[1])
        if info is not None:
            entries[tid] = [_record_stamp(info), dict(rec, outputs=[run.to_relative(o) for o in rec.get("outputs", [])])]
    doc = {"format": _INDEX_FORMAT, "version": 1, "stage": stage, "records": entries}
    storage.write_bytes(run.record_index(stage), zstandard.ZstdCompressor(level=3).compress(orjson.dumps(doc)))


def _existing_records(run: RunDir, stage: str, tasks: list[Task]) -> tuple[dict[str, dict], int]:
    """Completion records that match their task's fingerprint and whose outputs still exist, and
    how many were read from their own file rather than the stage's index.

    One listing of RUN/tasks/<stage>/ (which records exist, and their stamps), then
    `_load_records`: a resume on an object store would otherwise make one GET per task, tens of
    thousands per stage, each paying the store's latency."""
    present = _list_records(run, stage)
    return _load_records(run, stage, tasks, present) if present else ({}, 0)


def _load_records(run: RunDir, stage: str, tasks: list[Task], present: dict[str, dict]) -> tuple[dict[str, dict], int]:
    """The tasks' records among `present` (a listing): from the stage's index (RUN/tasks/<stage>
    .index.json.zst, one object for the whole stage) where the file's stamp matches, else from
    their files, read concurrently."""
    fs, _ = storage.url_to_fs(run.tasks(stage))
    local = storage.is_local(fs)
    wanted = [(t, path) for t in tasks if (path := storage.url_to_fs(run.record(stage, t.id))[1]) in present]
    index = _read_record_index(run, stage) if wanted else {}
    indexed = {t.id: index[t.id][1] for t, path in wanted
               if t.id in index and index[t.id][0] == _record_stamp(present[path])}

    def load(item: tuple[Task, str]) -> dict | None:
        t, path = item
        rec = indexed.get(t.id)
        if rec is None:
            try:
                rec = orjson.loads(fs.cat_file(path))
            except (orjson.JSONDecodeError, OSError):
                return None  # a torn or vanished record (atomic commits make it unlikely): redo the task
        if not isinstance(rec, dict) or rec.get("fingerprint") != t.fingerprint:
            return None
        rec = dict(rec, outputs=[run.relative(o) for o in rec.get("outputs", [])])
        if local and not all(os.path.exists(storage.url_to_fs(o)[1]) for o in rec["outputs"]):
            return None
        return rec

    misses = len(wanted) - len(indexed)
    workers = min(RECORD_READERS_LOCAL if local else RECORD_READERS_REMOTE, misses)
    if workers <= 1:
        loaded = list(map(load, wanted))
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="tinyprep-records") as pool:
            loaded = list(pool.map(load, wanted))
    return {t.id: rec for (t, _), rec in zip(wanted, loaded) if rec is not None}, misses


def _cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"


def run_stage(executor, stage: Stage | str, recipe: Recipe, run: RunDir | str | None = None) -> StageReport:
    """Plan and run every phase of a stage on `executor`; merge the stats of all its records.

    Each phase is planned once the previous one has completed (its outputs are its input); task
    ids are unique across the stage's phases. `finish` runs after the last phase succeeded.
    """
    stage = get_stage(stage) if isinstance(stage, str) else stage
    run = RunDir(recipe.output) if run is None else run if isinstance(run, RunDir) else RunDir(run)
    t0 = time.monotonic()
    cpus_per_task = int(stage.cpus_per_task(recipe))
    records: dict[str, dict] = {}
    failed: list[tuple[str, str]] = []
    n_tasks = n_skipped = 0
    phases: list[str | None] = []
    index_stale = False  # a record was read from its own file, or a task ran: rewrite the index
    for phase in stage.phases(recipe, run):
        phases.append(phase)
        label = stage.name if phase is None else f"{stage.name}:{phase}"
        tasks = stage.plan(recipe, run, phase)
        ids = [t.id for t in tasks]
        if len(set(ids)) != len(ids) or set(ids) & set(records):
            raise RuntimeError(f"{label}: plan produced duplicate task ids")
        done, misses = _existing_records(run, stage.name, tasks)
        todo = [t for t in tasks if t.id not in done]
        log.info("%s: %d tasks, %d already done, %d to run", label, len(tasks), len(done), len(todo))
        records.update(done)
        n_tasks += len(tasks)
        n_skipped += len(done)
        progress = StageProgress(label, len(tasks), sum(t.size for t in tasks), len(done), recipe.ray.log_every_s)
        try:
            index_stale = index_stale or bool(misses or todo)
            if todo:
                _run_tasks(executor, stage, label, todo, recipe, run, cpus_per_task, records, failed, progress)
        finally:
            progress.close()
        if failed:
            break
    if index_stale and records:
        try:
            _write_record_index(run, stage.name, records)
        except Exception as e:  # noqa: BLE001 - a cache: without it a resume reads the records one by one
            log.warning("%s: could not write %s (%s)", stage.name, run.record_index(stage.name), _cause(e))
    ordered = [records[i] for i in sorted(records)]
    stats = merge_all(r["stats"] for r in ordered)
    errors = sum(r["errors"] for r in ordered)
    report = StageReport(stage.name, n_tasks, n_skipped, failed, errors, stage.allowed_errors(recipe),
                         stats, time.monotonic() - t0, sum(r["docs"] for r in ordered),
                         sum(r["bytes"] for r in ordered), phases)
    storage.write_json(run.stage_stats(stage.name), {
        "stage": stage.name, "tasks": n_tasks, "tasks_done": len(ordered), "tasks_failed": sorted(failed),
        "errors": errors, "stats": stats,
    })
    issues = [i for r in ordered for i in r.get("issues", [])]
    storage.write_bytes(run.stage_issues(stage.name),
                        b"".join(orjson.dumps(i, option=orjson.OPT_SORT_KEYS) + b"\n" for i in issues))
    logged = sum(1 for r in ordered if r.get("log"))
    if logged:
        log.info("%s: %d task(s) logged messages, in %s", stage.name, logged, run.task_logs(stage.name))
    if report.ok:  # the stats and issues are written first: a failing finish still leaves them
        stage.finish(recipe, run, ordered)
    report.seconds = time.monotonic() - t0
    _append_timeline(run, report, ordered)
    return report


def _run_tasks(executor, stage: Stage, label: str, todo: list[Task], recipe: Recipe, run: RunDir,
               cpus_per_task: int, records: dict[str, dict], failed: list[tuple[str, str]],
               progress: StageProgress) -> None:
    """Run tasks on the executor, retrying failures with backoff; fill `records` and `failed`."""
    max_inflight = max(2 * executor.cpus // max(cpus_per_task, 1), 2)
    queue: list[tuple[float, int, Task]] = [(0.0, 0, t) for t in todo]  # (not_before, attempt, task)
    inflight: dict[Any, tuple[int, Task]] = {}
    while queue or inflight:
        now = time.monotonic()
        take = [i for i, (nb, _, _) in enumerate(queue) if nb <= now][: max(0, max_inflight - len(inflight))]
        picked = [queue[i] for i in take]
        for i in reversed(take):
            queue.pop(i)
        for _, attempt, task in picked:
            inflight[executor.submit(stage, task, recipe, run, attempt, cpus_per_task)] = (attempt, task)
        if not inflight:
            time.sleep(min(0.2, max(0.0, min(nb for nb, _, _ in queue) - now)))
            continue
        for handle, outcome in executor.wait(list(inflight), timeout=0.5):
            attempt, task = inflight.pop(handle)
            if isinstance(outcome, BaseException):  # the task raised, or its worker died
                why = _cause(outcome)
                if attempt < recipe.ray.task_retries:
                    delay = backoff_delay(attempt, recipe.ray.retry_backoff_s, recipe.ray.retry_backoff_max_s)
                    log.warning("%s task %s failed (attempt %d): %s; retrying in %.1fs",
                                label, task.id, attempt + 1, why, delay)
                    queue.append((time.monotonic() + delay, attempt + 1, task))
                else:
                    log.error("%s task %s failed after %d attempts: %s", label, task.id, attempt + 1, why)
                    failed.append((task.id, why))
                    progress.task_failed()
                continue
            records[task.id] = outcome
            _relay_task_warnings(label, task, outcome)
            progress.task_done(outcome["docs"], outcome["bytes"], task.size)


def _relay_task_warnings(label: str, task: Task, record: dict) -> None:
    """Say in the run log that a task logged warnings, where its log is and what the first was
    (a task in this process has already logged it here: only where, then)."""
    n = record.get("log_warning_count", 0)
    if not n:
        return
    here = record.get("pid") == os.getpid() and record.get("node") == socket.gethostname()
    first = "" if here else f": {record['log_warnings'][0]}" + (" ..." if n > 1 else "")
    log.warning("%s task %s logged %d warning(s), its log: %s%s", label, task.id, n, record["log"], first)


def _append_timeline(run: RunDir, report: StageReport, records: list[dict]) -> None:
    timeline = storage.read_json(run.timeline, default=[]) or []
    timeline.append({
        "stage": report.stage, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(report.seconds, 3), "tasks": report.tasks, "skipped": report.skipped,
        "failed": len(report.failed), "docs": report.docs, "bytes": report.bytes,
        "task_seconds": round(sum(r.get("seconds", 0.0) for r in records), 3),
        "nodes": sorted({r.get("node_id") or r.get("node", "") for r in records}),
    })
    storage.write_json(run.timeline, timeline)


# ---------------------------------------------------------------------------------------------
# The run


class _RunLog:
    """Log to RUN/logs/<time>-run.log: local run dirs directly; remote ones through a local file
    uploaded after each stage and at the end (an object store has no append: a driver killed in
    a stage leaves the log up to the previous stage's end)."""

    def __init__(self, run: RunDir):
        name = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}-run.log"
        url = run.log(name)
        fs, path = storage.url_to_fs(url)
        self.remote = None if storage.is_local(fs) else url
        if self.remote:
            fd, self.local = tempfile.mkstemp(suffix=".log")
            os.close(fd)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.local = path
        self.handler = logging.FileHandler(self.local, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("tinyprep").addHandler(self.handler)

    def sync(self) -> None:
        """Upload what is logged so far (remote run directories; a local one is written as it goes)."""
        if self.remote:
            self.handler.flush()
            with open(self.local, "rb") as fh:
                storage.write_bytes(self.remote, fh.read())

    def close(self) -> None:
        logging.getLogger("tinyprep").removeHandler(self.handler)
        self.handler.close()
        if self.remote:
            self.sync()
            os.unlink(self.local)


def issue_summary(run: RunDir, stage: str, limit: int = 10) -> list[str]:
    url = run.stage_issues(stage)
    issues = [orjson.loads(line) for line in storage.read_bytes(url).splitlines() if line.strip()]
    lines = []
    for i in issues[:limit]:
        where = i.get("file", "?") + (f":{i['line']}" if i.get("line") is not None else "")
        lines.append(f"  {where}: {i.get('kind')}: {i.get('message')}")
    if len(issues) > limit:
        lines.append(f"  ... {len(issues) - limit} more in {url}")
    return lines


def _remove_stale_temporaries(run: RunDir) -> None:
    """Temp files of a killed run (atomic commits that never renamed), in a marked run directory
    only and by their exact name pattern: nothing else is ever deleted. One run per directory."""
    fs, root = storage.url_to_fs(run.url)
    if not storage.is_local(fs) or not run.is_marked():
        return
    stale = [p for p in fs.find(root) if storage.is_temporary(p)]
    for p in stale:
        fs.rm(p)
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted run", len(stale))


def _stage_failure(run: RunDir, report: StageReport) -> str:
    msg = [f"stage {report.stage} failed:"]
    for tid, why in report.failed:
        msg.append(f"  task {tid}: {why}")
    if report.allowed_errors is not None and report.errors > report.allowed_errors:
        msg.append(f"  {report.errors} bad input(s), the recipe allows {report.allowed_errors} "
                   f"(set {report.stage}.max_errors to accept them):")
        msg += issue_summary(run, report.stage)
    return "\n".join(msg)


def stage_order(wanted: Iterable[str]) -> list[str]:
    """The wanted stages in flow order; StageFailed naming any unknown one."""
    wanted = list(wanted)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise StageFailed(f"unknown stage(s) {unknown}; available: {list(STAGES)}")
    return [s for s in STAGES if s in wanted]


def run_recipe(recipe: Recipe, stages: list[str] | None = None, workers: int | None = None,
               executor=None) -> list[StageReport]:
    """Run the recipe's stages (or the given subset, in flow order); raise StageFailed on failure.

    First the preflight (`pipeline/preflight.py`; PreflightError, before any stage): the
    tokenizer and the stores' backends and credentials before the run directory is created, then
    the run directory is claimed and proven writable, then the sources are listed. Then the recipe's tokenizer model is
    copied into RUN/assets/ for the tasks. The executor defaults to Ray (embedded, or the
    cluster of `RAY_ADDRESS` / `ray.address`).
    """
    order = stage_order(stages or recipe.stages)
    parse_faults()  # a malformed rule is refused before anything runs
    check_configuration(recipe, order)
    run = RunDir(recipe.output)
    check_writable(run)
    storage.write_bytes(run.recipe, recipe.to_yaml().encode())
    _remove_stale_temporaries(run)
    runlog = _RunLog(run)
    reports: list[StageReport] = []
    try:
        log.info("run %s: stages %s, output %s", recipe.name, ",".join(order), run.url)
        check_sources(recipe, run, order)
        from .tokenize.tokenizer import copy_tokenizer_asset

        asset = copy_tokenizer_asset(recipe, run, order)
        if asset:
            log.info("tokenizer.model %s copied to %s for the workers", recipe.tokenizer.model, asset)
        owned = executor is None
        if owned:
            from .executors import RayExecutor

            executor = RayExecutor(recipe, workers)
        try:
            for name in order:
                report = run_stage(executor, name, recipe, run)
                reports.append(report)
                if not report.ok:
                    raise StageFailed(_stage_failure(run, report))
                if report.errors:
                    log.warning("%s: %d bad input(s) accepted (max_errors=%s):\n%s", name, report.errors,
                                report.allowed_errors, "\n".join(issue_summary(run, name)))
                log.info("%s done in %s", name, fmt_duration(report.seconds))
                runlog.sync()
        finally:
            if owned:
                executor.close()
    finally:
        runlog.close()
    return reports
