"""Cache entries of a search folder: written atomically, checked before they are reused.

Every file under ``cache/`` (a prepared side, an embedding, a score) is written through a
temporary name and renamed into place; then its size and SHA-256 go into a small sidecar file
(``<name>.sha256``). An entry counts as finished only when the sidecar exists and matches, so an
entry that is truncated, emptied or damaged after it was written, or one whose writer was killed
between the two renames, is logged, removed and recomputed instead of being trusted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from .._logging import logger
from ..io._write import atomic_path

SIDECAR = ".sha256"
_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sidecar(path: Path) -> Path:
    """The file holding ``path``'s size and checksum."""
    return path.with_name(path.name + SIDECAR)


def write_entry(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a cache entry: ``write(tmp)`` fills a temporary file that replaces ``path``.

    The entry's size and checksum are recorded beside it once it is in place; until then a
    reader treats it as missing.
    """
    path = Path(path)
    check = sidecar(path)
    check.unlink(missing_ok=True)  # an old record must never vouch for the new bytes
    with atomic_path(path) as tmp:
        write(tmp)
        record = f"{file_digest(tmp)} {tmp.stat().st_size}\n"
    with atomic_path(check) as tmp:
        tmp.write_text(record)
    return path


def entry_problem(path: Path) -> str | None:
    """Why the existing entry ``path`` cannot be trusted, or None when it is intact."""
    try:
        digest, size = sidecar(path).read_text().split()
        expected = int(size)
    except FileNotFoundError:
        return "no checksum was recorded: its writer was interrupted"
    except (OSError, ValueError):
        return "its checksum record is unreadable"
    actual = path.stat().st_size
    if actual != expected:
        return f"{actual} bytes instead of {expected}"
    if file_digest(path) != digest:
        return "its checksum does not match"
    return None


def entry_ok(path: str | Path, *, root: Path | None = None) -> bool:
    """True when the cache entry ``path`` exists and is intact.

    A corrupt entry is logged ("cache entry X is corrupt: recomputing") and removed with its
    record, so the caller recomputes it. ``root`` shortens the path in the log line.
    """
    path = Path(path)
    if not path.exists():
        sidecar(path).unlink(missing_ok=True)
        return False
    problem = entry_problem(path)
    if problem is None:
        return True
    name = path.relative_to(root) if root is not None and path.is_relative_to(root) else path
    logger.warning("cache entry %s is corrupt: recomputing (%s)", name, problem)
    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)
    return False


def remove_temporaries(folder: Path) -> int:
    """Delete temporary files that killed writers left under ``folder``; return how many.

    Only call this while holding the search folder's lock (no writer is running then).
    """
    n = 0
    for path in folder.rglob(".*.tmp-*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            n += 1
    return n
