"""The work of one search task, run in a worker process (local pool or Ray).

A trial is a chain of three cached steps on one side of a fold (a prepared ``.h5ad`` holding the
side's preprocessed spots): ``integrate`` -> ``model`` (when the pipeline has one) -> ``score``
(clusters, refinement, metrics). Each step writes one cache entry (a temporary file renamed
into place, its checksum beside it; see :mod:`spatlas.tune._cache`), so an interrupted search
leaves only finished steps behind and a rerun skips them. Tasks are plain dicts (paths and the
resolved config), so any backend can ship them.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .. import _keys as K
from ..io._write import atomic_path
from ._cache import write_entry

#: obsm key a task puts the input embedding under.
INPUT = "X_tune_input"


@lru_cache(maxsize=4)
def _read_side(path: str, mtime_ns: int, size: int):
    import anndata as ad

    return ad.read_h5ad(path)


def _side(path: str):
    stat = Path(path).stat()  # a side rewritten since it was read is read again
    return _read_side(path, stat.st_mtime_ns, stat.st_size).copy()


def _save_array(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array, dtype=np.float32))

    write_entry(path, write)


def save_json(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file renamed into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, default=_plain))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def run_task(task: dict) -> dict:
    """Run one task dict (``kind`` = integrate | model | score); return a small summary."""
    from .._settings import torch_threads

    start = time.perf_counter()
    kind = task["kind"]
    with torch_threads(int(task.get("threads", 1))):  # restored after (inline tasks)
        if kind == "integrate":
            _integrate(task)
        elif kind == "model":
            _model(task)
        elif kind == "score":
            _score(task)
        else:  # pragma: no cover - built by the search itself
            raise ValueError(f"unknown task kind {kind!r}")
    from .._resources import peak_rss_mb

    return {
        "key": task["key"],
        "kind": kind,
        "seconds": time.perf_counter() - start,
        "worker_peak_rss_mb": round(peak_rss_mb(), 1),  # the worker's peak so far
    }


def _integrate(task: dict) -> None:
    from ..pipeline import expression_basis, integrate, integration_method
    from ._grid import validate

    config = validate(task["config"])
    adata = _side(task["side"])
    if integration_method(config) == "none":
        out = np.asarray(adata.obsm[expression_basis(config)])
    else:
        out = adata.obsm[integrate(config, adata, key_added=INPUT)]
    _save_array(Path(task["output"]), out)


def _model(task: dict) -> None:
    from ..pipeline import _fit_model
    from ._grid import validate

    config = validate(task["config"])  # clustering.n_clusters is set: the model's pseudo-label K
    adata = _side(task["side"])
    adata.obsm[INPUT] = np.load(task["input"])
    _fit_model(config, adata, INPUT)
    _save_array(Path(task["output"]), adata.obsm[K.embedding_key(config.model.name)])


def _score(task: dict) -> None:
    from .. import metrics, tl
    from ..pipeline import refine_labels
    from ._grid import validate

    config = validate(task["config"])
    adata = _side(task["side"])
    adata.obsm[INPUT] = np.load(task["input"])
    clus = config.clustering
    refine = refine_labels(config)
    key = "tune_domain"
    raw = f"{key}_unrefined" if refine else key
    tl.cluster(
        adata,
        basis=INPUT,
        method=clus.method,
        n_clusters=int(task["n_clusters"]),
        seed=config.seed,
        key_added=raw,
    )
    if refine:
        tl.refine(adata, key=raw, k=clus.refine_k, key_added=key)
    table = metrics.evaluate(
        adata,
        cluster_key=key,
        embedding_key=INPUT,
        exclude_labels=tuple(config.data.exclude_labels),
        lam=float(task["lam"]),
        seed=config.seed,
    )
    payload = {
        "key": task["key"],
        "table": table.to_dict(orient="records"),
        "domains": adata.obs[key].astype(str).tolist() if task.get("keep_domains") else None,
        "obs_names": adata.obs_names.tolist() if task.get("keep_domains") else None,
    }
    text = json.dumps(payload, indent=1, default=_plain)
    write_entry(Path(task["output"]), lambda tmp: tmp.write_text(text))
