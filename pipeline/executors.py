"""Executors run a stage's tasks: on Ray (a local embedded Ray or a cluster), or in this process.

Both have one interface, used by `runner.run_stage`: `cpus` (what the cluster offers), `submit(
stage, task, recipe, run, attempt, cpus_per_task)` returning a handle (the Stage object travels
with the task: it is small and stateless), and `wait(handles, timeout)`
returning `(handle, record or exception)` pairs for the tasks that ended. Retries, backoff,
completion records and progress live in the runner, once for both.

This is the only module that imports Ray.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import orjson

from .layout import RunDir
from .recipe import Recipe
from .stage import Stage, Task

log = logging.getLogger("tinyprep")

# What tasks read from the environment, forwarded to a cluster's workers (whose environment is not
# the driver's): Hugging Face tokens and endpoint, the object stores' credentials and settings
# (fsspec's own FSSPEC_<PROTOCOL>_<OPTION> included), proxies, and tinyprep's switches
# (TINYPREP_FAULTS...). The one list: nothing else leaves the driver's environment.
FORWARDED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT",
                 "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "GCSFS_", "FSSPEC_", "TINYPREP_")
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in a `ray job submit` entrypoint


def _job_env_vars(environ: Mapping[str, str]) -> set[str]:
    """The variables a submitted job's own runtime_env already sets (it reaches the workers): Ray
    refuses a ray.init runtime_env that sets one of them again."""
    try:
        job = orjson.loads(environ.get(_JOB_CONFIG_ENV) or "{}")
        return set(((job.get("runtime_env") or {}).get("env_vars") or {}).keys())
    except (orjson.JSONDecodeError, AttributeError):
        return set()


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver's variables the workers get (FORWARDED_ENV, FORWARDED_ENV_PREFIXES), less those
    the submitted job's runtime_env sets itself. Values are never logged, only names."""
    environ = os.environ if environ is None else environ
    taken = _job_env_vars(environ)
    return {k: v for k, v in sorted(environ.items())
            if (k in FORWARDED_ENV or k.startswith(FORWARDED_ENV_PREFIXES)) and k not in taken}


class LocalExecutor:
    """Runs each task when it is submitted, in this process: for tests, benchmarks and `plan`."""

    def __init__(self, cpus: int = 1):
        self.cpus = cpus
        self._done: dict[int, Any] = {}
        self._next = 0

    def submit(self, stage: Stage, task: Task, recipe: Recipe, run: RunDir, attempt: int, cpus_per_task: int) -> int:
        from .runner import execute_task

        handle = self._next
        self._next += 1
        try:
            self._done[handle] = execute_task(stage, task, recipe, run, attempt)
        except Exception as err:  # noqa: BLE001 - handed to the runner's retry logic
            self._done[handle] = err
        return handle

    def wait(self, handles: list[int], timeout: float) -> list[tuple[int, Any]]:
        return [(h, self._done.pop(h)) for h in handles if h in self._done]

    def close(self) -> None:
        self._done.clear()


def _execute_on_node(stage: Stage, task: Task, recipe: Recipe, run: RunDir, attempt: int) -> dict:
    import ray

    from .runner import execute_task

    return execute_task(stage, task, recipe, run, attempt, ray.get_runtime_context().get_node_id())


class RayExecutor:
    """Tasks as Ray tasks on an embedded local Ray (`workers` CPUs) or the cluster at `address`."""

    def __init__(self, recipe: Recipe, workers: int | None = None):
        import ray

        self.ray = ray
        self.owned = False
        if not ray.is_initialized():
            self._init(recipe, workers)
            self.owned = True
        self.cpus = int(ray.cluster_resources().get("CPU", 1))
        self._remote: dict[int, Any] = {}
        self._recipe_ref: tuple[Recipe, Any] | None = None

    def _init(self, recipe: Recipe, workers: int | None) -> None:
        ray = self.ray
        address = recipe.ray.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
        if address:
            # On a cluster the workers' environment is not ours: forward what the tasks read.
            env = forwarded_env()
            if env:
                kwargs["runtime_env"] = {"env_vars": env}
            ray.init(address=address, **kwargs)
            log.info("connected to Ray cluster at %s (%s CPUs)", address, ray.cluster_resources().get("CPU"))
            if env:
                log.info("forwarded to the workers: %s", ", ".join(env))  # names only, never values
        else:
            cpus = workers or recipe.ray.num_cpus or os.cpu_count() or 1
            # Ray carries task descriptions and small results only: a small object store starts faster.
            # address="local": always a new cluster, never one that happens to run on this machine.
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=128 << 20,
                     **kwargs)
            log.info("started an embedded local Ray with %d CPUs", cpus)

    def submit(self, stage: Stage, task: Task, recipe: Recipe, run: RunDir, attempt: int, cpus_per_task: int):
        remote = self._remote.get(cpus_per_task)
        if remote is None:
            remote = self._remote[cpus_per_task] = self.ray.remote(num_cpus=cpus_per_task, max_retries=0)(
                _execute_on_node)
        if self._recipe_ref is None or self._recipe_ref[0] is not recipe:
            self._recipe_ref = (recipe, self.ray.put(recipe))
        return remote.remote(stage, task, self._recipe_ref[1], run, attempt)

    def wait(self, handles: list, timeout: float) -> list[tuple[Any, Any]]:
        done, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        out = []
        for ref in done:
            try:
                out.append((ref, self.ray.get(ref)))
            except Exception as err:  # noqa: BLE001 - the task raised, or its worker died
                out.append((ref, err))
        return out

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()
