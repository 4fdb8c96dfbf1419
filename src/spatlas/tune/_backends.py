"""Where search tasks run: ``local`` (a process pool) or ``ray`` (Ray tasks).

Both run the same task dicts through :func:`spatlas.tune._tasks.run_task`, with the same thread
limit per task, so both give the same numbers and hence the same chosen configurations.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .._errors import ConfigError, SpatlasError
from .._logging import logger
from .._settings import available_cores
from ._tasks import run_task

BACKENDS = ("local", "ray")


class TaskFailed(SpatlasError, RuntimeError):
    """A search task raised; the finished tasks are kept and a rerun resumes."""


def default_workers() -> int:
    """Worker processes for the local backend: the cores this process may use."""
    return available_cores()


def _describe(task: dict) -> str:
    return f"{task['kind']} task {task['key']} ({task.get('label', '')})"


class LocalBackend:
    """A process pool sized to the machine (``n_workers=1``: run in this process)."""

    name = "local"

    def __init__(self, n_workers: int | None = None):
        self.n_workers = n_workers or default_workers()
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing as mp

            # spawn: a forked child of a process that has used torch or OpenMP can hang
            self._pool = ProcessPoolExecutor(
                max_workers=self.n_workers, mp_context=mp.get_context("spawn")
            )
        return self._pool

    def run(self, tasks: Sequence[dict]) -> Iterator[dict]:
        """Run ``tasks``; yield each summary as it finishes."""
        if not tasks:
            return
        if self.n_workers == 1:
            for task in tasks:
                yield _guarded(run_task, task)
            return
        pool = self._get_pool()
        pending = {pool.submit(run_task, task): task for task in tasks}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    task = pending.pop(future)
                    try:
                        yield future.result()
                    except BrokenProcessPool as err:
                        self._pool = None
                        raise TaskFailed(
                            f"{_describe(task)}: a worker process died ({err}). Workers are "
                            f"spawned: a script calling spatlas.tune must do so under "
                            f"`if __name__ == '__main__':`; a worker killed for memory needs "
                            f"fewer workers (--workers / tune.n_workers)"
                        ) from err
                    except Exception as err:
                        raise TaskFailed(f"{_describe(task)} failed: {err}") from err
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        """Stop the worker processes."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayBackend:
    """Ray tasks on an existing cluster (``address``) or on a local Ray started for the run.

    On a cluster every node needs spatlas installed and the search folder on a shared file
    system (tasks read and write files under it).
    """

    name = "ray"

    def __init__(self, n_workers: int | None = None, address: str | None = None, threads: int = 1):
        from .._deps import import_optional

        self.ray = import_optional("ray", purpose="the ray search backend")
        self.threads = threads
        self.started = False
        if not self.ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "configure_logging": False,
            }
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = (n_workers or default_workers()) * threads
                # Ray lowers its workers' priority (nice 15); a local Ray started for this search
                # runs them like the local backend's, so a busy machine does not starve them
                os.environ.setdefault("RAY_worker_niceness", "0")
            self.ray.init(**kwargs)
            self.started = True
            logger.info(
                "ray: %s with %s CPUs",
                f"connected to {address}" if address else "started a local Ray",
                self.ray.cluster_resources().get("CPU"),
            )
        self._remote = self.ray.remote(num_cpus=threads, max_retries=0)(run_task)

    def run(self, tasks: Sequence[dict]) -> Iterator[dict]:
        """Submit every task; yield each summary as it finishes."""
        refs = {self._remote.remote(task): task for task in tasks}
        try:
            while refs:
                done, _ = self.ray.wait(list(refs), num_returns=1)
                for ref in done:
                    task = refs.pop(ref)
                    try:
                        yield self.ray.get(ref)
                    except Exception as err:
                        raise TaskFailed(f"{_describe(task)} failed on Ray: {err}") from err
        finally:
            for ref in refs:
                self.ray.cancel(ref, force=True)

    def close(self) -> None:
        """Shut down the local Ray this backend started (a cluster is left running)."""
        if self.started:
            self.ray.shutdown()


def _guarded(fn: Callable[[dict], dict], task: dict) -> dict:
    try:
        return fn(task)
    except Exception as err:
        raise TaskFailed(f"{_describe(task)} failed: {err}") from err


def make_backend(
    name: str, *, n_workers: int | None = None, address: str | None = None, threads: int = 1
):
    """The backend called ``name`` (``local`` or ``ray``)."""
    if name == "local":
        if address:
            raise ConfigError("--address is for the ray backend; add --backend ray")
        return LocalBackend(n_workers)
    if name == "ray":
        return RayBackend(n_workers, address, threads)
    raise ConfigError(f"tune.backend: unknown backend '{name}' (known: {', '.join(BACKENDS)})")
