"""Where search tasks run: ``local`` (a process pool) or ``ray`` (Ray tasks).

Both run the same task dicts through :func:`spatlas.tune._tasks.run_task`, with the same thread
limit per task, so both give the same numbers and hence the same chosen configurations.

Faults: inside :func:`stop_on_signals` SIGINT and SIGTERM raise :class:`SearchInterrupted`; the
search then closes its backend with ``abort=True``, which terminates the local workers at once
(a task in flight is lost, its finished ones stay cached). Local workers also die with the search
process if it is killed outright (``PR_SET_PDEATHSIG`` on Linux) and leave Ctrl-C to it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

from .._errors import ConfigError, SpatlasError
from .._logging import logger
from .._settings import available_cores
from ._tasks import run_task

BACKENDS = ("local", "ray")


class TaskFailed(SpatlasError, RuntimeError):
    """A search task raised; the finished tasks are kept and a rerun resumes."""


class SearchInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached a search; its workers are stopped, its finished steps kept.

    Attributes
    ----------
    signum
        The signal's number (``exit_code`` is the shell's ``128 + signum``).
    """

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + self.signum
        super().__init__(self.name)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside the block, SIGINT and SIGTERM raise :class:`SearchInterrupted` in the main thread.

    The exception unwinds the search like Ctrl-C does, so its ``finally`` blocks stop the
    workers. A second signal while they are being stopped is ignored; the previous handlers
    are restored on leaving. A signal ignored before (``nohup``, background jobs) stays ignored;
    outside the main thread nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def interrupt(signum: int, frame: Any) -> None:
        for number in previous:
            signal.signal(number, signal.SIG_IGN)
        raise SearchInterrupted(signum)

    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if handler is signal.SIG_IGN:
            continue
        previous[number] = handler
        signal.signal(number, interrupt)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


_PR_SET_PDEATHSIG = 1


def _init_worker(parent: int) -> None:
    """Start-up of a local worker: it dies with the search process and leaves Ctrl-C to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the search stops its workers itself
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: close() still stops us
            pass
    if os.getppid() != parent:  # the search died before prctl took effect
        os._exit(1)


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
                max_workers=self.n_workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(os.getpid(),),
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

    def close(self, *, abort: bool = False) -> None:
        """Stop the worker processes.

        Parameters
        ----------
        abort
            Terminate them now, also in the middle of a task (after a failure or a signal);
            otherwise they finish what they run.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if abort:
            _terminate(list((getattr(pool, "_processes", None) or {}).values()))
        pool.shutdown(wait=True, cancel_futures=True)


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

    def close(self, *, abort: bool = False) -> None:
        """Shut down the local Ray this backend started (a cluster is left running).

        Tasks still running were cancelled (forced) when :meth:`run` was left; ``abort`` is
        accepted for the same call as the local backend.
        """
        if self.started:
            self.ray.shutdown()
            self.started = False


def _terminate(processes: Sequence[Any], timeout: float = 5.0) -> None:
    """SIGTERM each live process, then SIGKILL those still alive after ``timeout`` seconds."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(1.0)


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
