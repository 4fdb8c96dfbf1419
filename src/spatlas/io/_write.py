"""Writing results without ever leaving a user's file half-written or silently replaced."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anndata as ad

from .._errors import SpatlasInputError
from .._logging import logger


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
    """Write ``adata`` to ``path`` through a temporary file renamed into place."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression=compression)
    return Path(path)


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


@contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging folder that becomes ``out`` only when the block succeeds.

    The run writes everything into a hidden sibling folder; on success it is renamed to ``out``
    (an existing ``out`` is replaced only with ``overwrite`` and only at that moment). On failure
    ``out`` is untouched and the staging folder is kept so its log can be read.
    """
    out = check_output_dir(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        logger.error("run failed; %s is unchanged, partial output kept in %s", out, staging)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)
