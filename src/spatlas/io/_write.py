"""Writing results without ever leaving a user's file half-written or silently replaced."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from io import StringIO
from pathlib import Path

import anndata as ad

from .._errors import SpatlasInputError
from .._logging import logger

PAUSE_AT_ENV = "SPATLAS_TEST_PAUSE_AT"
"""Test hook: name of the point (a pipeline step, ``commit`` or ``swap``) to pause at."""
PAUSE_FILE_ENV = "SPATLAS_TEST_PAUSE_FILE"
"""Test hook: marker file written on pausing; the process waits until it is deleted."""
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_HDF5_FULL_DISK: list[Path] = []  # .h5ad writes that failed on a full disk


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only on success.

    A reader never sees a half-written file and a failed write leaves ``path`` as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_h5ad(adata: ad.AnnData, path: str | Path, *, compression: str | None = "gzip") -> Path:
    """Write ``adata`` to ``path`` through a temporary file renamed into place.

    On a full disk the ``OSError`` (errno ENOSPC) is raised as usual, but libhdf5 also prints
    tracebacks while it fails to close the file and may crash when Python exits (h5py#914):
    those tracebacks are logged at debug level instead of printed, and
    :func:`hdf5_failed_on_full_disk` tells the CLI to exit without running exit handlers.
    """
    stderr, captured = sys.stderr, StringIO()
    failure: BaseException | None = None
    sys.stderr = captured  # h5py prints its __dealloc__ errors here, not through logging
    try:
        with atomic_path(path) as tmp:
            adata.write_h5ad(tmp, compression=compression)
    except BaseException as err:
        failure = err
        raise
    finally:
        sys.stderr = stderr
        text = captured.getvalue()
        if failure is not None and _disk_full(failure):
            _HDF5_FULL_DISK.append(Path(path))
            logger.debug("libhdf5 output while failing on a full disk:\n%s", text)
        elif text:
            stderr.write(text)
    return Path(path)


def hdf5_failed_on_full_disk() -> bool:
    """Whether an ``.h5ad`` write failed on a full disk in this process (see :func:`write_h5ad`)."""
    return bool(_HDF5_FULL_DISK)


def pause_for_tests(point: str) -> None:
    """Test hook: pause at ``point`` so a test can signal this process at a chosen moment.

    Only when the environment sets ``SPATLAS_TEST_PAUSE_AT=point`` and
    ``SPATLAS_TEST_PAUSE_FILE=marker``: writes the marker (holding the pid) and waits until the
    test deletes it (at most 60 s). Points: each pipeline step by name (at its start),
    ``commit`` (the run is complete in the staging folder) and ``swap`` (inside the rename into
    place, where SIGINT/SIGTERM are held back). No effect otherwise.
    """
    if os.environ.get(PAUSE_AT_ENV) != point or not os.environ.get(PAUSE_FILE_ENV):
        return
    marker = Path(os.environ[PAUSE_FILE_ENV])
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def check_output_dir(out: str | Path, *, overwrite: bool) -> Path:
    """Refuse a non-empty output folder unless ``overwrite``; refuse a file in its place."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpatlasInputError(f"--out {out}: a file of that name exists; choose a folder name")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SpatlasInputError(
            f"--out {out}: folder exists and is not empty; choose a new folder or pass --overwrite "
            "(its contents are then replaced only once the new run has finished)"
        )
    return out


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_not_protected(
    out: Path, shown: str, inputs: Iterable[tuple[str, str | Path | None]]
) -> None:
    """Refuse an ``out`` that is, or holds, the cwd, the home folder, ``/`` or a run input."""
    real = Path(os.path.realpath(out))
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor):
        raise SpatlasInputError(
            f"--out {shown}: refusing to replace the root folder; choose a new folder"
        )
    if _within(Path.home().resolve(), real):
        raise SpatlasInputError(
            f"--out {shown}: it is or holds your home folder; choose a new folder for the run"
        )
    if _within(cwd, real):
        raise SpatlasInputError(
            f"--out {shown}: it is or holds the current directory {cwd}; choose a new folder "
            "for the run"
        )
    for what, path in inputs:
        if path is None or not os.path.exists(path):  # a name (obsm key, network) or missing
            continue
        if _within(Path(os.path.realpath(path)), real):
            raise SpatlasInputError(
                f"--out {shown} --overwrite would delete {path} ({what}), an input of this run; "
                "choose a --out folder that holds no inputs"
            )


class _ClaimedFolder:
    """An exclusive claim on a run folder: ``flock`` on ``.NAME.lock`` next to it.

    The kernel drops the lock when the process dies, so a lock file left by a killed run is
    taken over (with a log line); its text (pid, host, start time) names the holder.
    """

    def __init__(self, out: Path, shown: str):
        self.path = out.parent / f".{out.name}.lock"
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "starting"
                os.close(fd)
                raise SpatlasInputError(
                    f"--out {shown}: another spatlas run ({holder}) is writing this folder; "
                    "wait for it to end or choose another --out"
                ) from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)  # the previous holder removed the file while we opened it: again
        else:  # pragma: no cover - needs ten lost races in a row
            raise SpatlasInputError(f"--out {shown}: cannot lock {self.path}; try again")
        self.fd = fd
        stale = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if stale:
            logger.warning(
                "taking over %s, left by a run that is no longer running (%s)", self.path, stale
            )
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock (in that order: nobody locks a dead file)."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


class _SignalGuard:
    """Notes SIGINT/SIGTERM during a run and, while ``held``, defers them.

    Noting them lets the run stop even when a library swallowed the ``KeyboardInterrupt``;
    holding them keeps the rename into place from being cut in half. Raising goes through the
    handler that was installed before (``KeyboardInterrupt`` for SIGINT; the CLI's for SIGTERM;
    ``KeyboardInterrupt`` for a SIGTERM that would have killed the process).
    Only the main thread can install handlers; elsewhere the guard does nothing.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.held = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:
                    self._previous[signum] = previous
                    signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]

    def _note(self, signum: int, frame) -> None:
        self.received.append(signum)
        if not self.held:
            self.raise_for(signum)

    def raise_for(self, signum: int, note: str = "") -> None:
        """Raise what the signal's previous handler raises, with ``note`` as its text."""
        previous = self._previous.get(signum)
        try:
            if callable(previous):
                previous(signum, None)
            interrupt = KeyboardInterrupt()
            interrupt.signum = signum  # type: ignore[attr-defined]
            raise interrupt
        except KeyboardInterrupt as err:
            if note:
                err.args = (note,)
            raise


def _signal_name(err: BaseException) -> str:
    signum = getattr(err, "signum", signal.SIGINT)
    return signal.Signals(signum).name


def _disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it came from) says the disk or the quota is full."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return True
        text = str(err)  # h5py/HDF5 put errno 28 in the message only
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2`` RENAME_EXCHANGE); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _move_into_place(staging: Path, out: Path, shown: str, *, overwrite: bool) -> None:
    """Rename ``staging`` to ``out``; at every instant ``out`` holds either run, never none.

    Without ``overwrite`` only an absent or empty ``out`` is replaced (the rename itself
    checks, so nothing that appeared in ``out`` during the run is lost).
    """
    try:
        os.rename(staging, out)  # out absent or an empty folder
        return
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
    if not overwrite or not out.is_dir():
        kept = out.parent / f"{out.name}.finished-{os.getpid()}"
        try:
            os.rename(staging, kept)
        except OSError:
            kept = staging
        logger.error("%s was filled during the run; the finished run is kept in %s", out, kept)
        raise SpatlasInputError(
            f"--out {shown}: files appeared in it during the run and were left alone; the "
            f"finished run is in {kept} (move it yourself, or rerun with --overwrite)"
        )
    if _exchange(staging, out):
        old = staging
    else:
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        try:
            os.rename(staging, out)
        except OSError:
            os.rename(old, out)
            raise
    _remove(old)


@contextmanager
def atomic_output_dir(
    out: str | Path,
    *,
    overwrite: bool = False,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
) -> Iterator[Path]:
    """Yield a fresh staging folder that becomes ``out`` only when the block succeeds.

    Parameters
    ----------
    out
        The run folder to create.
    overwrite
        Replace a non-empty ``out`` (only once the block has succeeded). Refused when ``out``
        is, or holds, one of ``inputs``, the current directory, the home folder or ``/``.
    inputs
        ``(what, path)`` of the files and folders the run reads (names that are no path are
        skipped).

    Notes
    -----
    ``out`` is claimed for the whole block (``.NAME.lock`` next to it), so a second run into it
    is refused at once. The run writes into the hidden sibling ``.NAME.partial-PID``; at the end
    it is renamed to ``out`` with SIGINT/SIGTERM held back, so ``out`` always holds either the
    old or the new run. Without ``overwrite``, anything that appeared in ``out`` during the run is
    kept and the finished run goes to ``NAME.finished-PID`` instead (an error says so). On
    SIGINT/SIGTERM (``KeyboardInterrupt``) or a full disk the staging folder is removed; on
    other errors it is kept so its ``run.log`` can be read. ``out`` is untouched in every case.
    """
    shown = str(out)
    out = Path(os.path.abspath(out))
    check_output_dir(shown, overwrite=overwrite)
    _check_not_protected(out, shown, inputs if overwrite else ())
    existed = out.exists()
    unchanged = f"the previous run in {shown} is intact" if existed else f"{shown} was not created"
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        claim = _ClaimedFolder(out, shown)
    except OSError as err:
        found = next(p for p in (out.parent, *out.parent.parents) if p.exists())
        reason = (
            f"{found} is a file, not a folder"
            if not found.is_dir()
            else f"cannot write in {out.parent} ({err.strerror or err})"
        )
        raise SpatlasInputError(
            f"--out {shown}: {reason}; choose a writable location for --out"
        ) from None
    try:
        with _SignalGuard() as guard:
            try:
                if staging.exists():
                    shutil.rmtree(staging)
                staging.mkdir()
                yield staging
                pause_for_tests("commit")
                guard.held = True  # from here SIGINT/SIGTERM wait until the rename is done
                if guard.received:  # a library swallowed the KeyboardInterrupt: stop anyway
                    guard.raise_for(guard.received[0])
            except KeyboardInterrupt as err:
                guard.held = True
                _remove(staging)
                note = f"{unchanged}; the partial run folder {staging.name} was removed"
                logger.error("interrupted by %s: %s", _signal_name(err), note)
                err.args = (note,)
                raise
            except BaseException as err:
                guard.held = True
                if not _disk_full(err):
                    logger.error(
                        "run failed; %s is unchanged, partial output kept in %s", out, staging
                    )
                    raise
                _remove(staging)
                logger.error("disk full: partial run folder %s removed", staging)
                raise SpatlasInputError(
                    f"no space left on device while writing {shown}; {unchanged} and the "
                    "partial run was removed; free space or choose another --out"
                ) from None
            try:
                pause_for_tests("swap")
                _move_into_place(staging, out, shown, overwrite=overwrite)
            except OSError as err:
                raise SpatlasInputError(
                    f"--out {shown}: cannot move the finished run into place "
                    f"({err.strerror or err}); it is kept in {staging}"
                ) from None
        if guard.received:  # arrived during the rename: it is done, so say so
            guard.raise_for(guard.received[0], f"the run had finished: {shown} holds the new run")
    finally:
        claim.release()
