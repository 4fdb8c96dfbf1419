"""The fingerprint of a search's input data: what its cached steps were computed from.

A search folder records a digest per component of the cohort it read (spot ids, each obs
column, genes, the count matrix, layers, obsm arrays and, with morphology, the images and
feature files), computed once after loading. A rerun into the folder compares them, so cached
steps are never reused for other data, and it can say what changed (``labels changed in 12
spots``) from the per-spot hashes kept in ``cache/inputs.npz``.

Arrays are hashed by content (the count matrix: shape, nnz, data, indices and pointers). Files
that are only read later (full-resolution images, morphology feature / weight files) are hashed
by size and by the content of their first, middle and last MiB.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import _keys as K

#: obs columns whose per-spot values are kept, to count the spots that changed.
PER_SPOT = (K.SAMPLE, K.DONOR, K.LABEL)
_BLOCK = 1 << 20


def _digest(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, str | bytes | int | float | tuple):
            h.update(repr(a).encode())
        else:
            h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1))
    return h.hexdigest()[:24]


def spot_hashes(values: Any) -> np.ndarray:
    """One uint64 per value (strings as written; missing values hash alike)."""
    series = pd.Series(np.asarray(values, dtype=object)).astype(str)
    return pd.util.hash_pandas_object(series, index=False).to_numpy(np.uint64)


def _matrix_digest(x: Any) -> str:
    import scipy.sparse as sp

    if sp.issparse(x):
        x = sp.csr_matrix(x)
        return _digest(("csr", x.shape, int(x.nnz), str(x.dtype)), x.data, x.indices, x.indptr)
    x = np.asarray(x)
    return _digest(("dense", x.shape, str(x.dtype)), x)


def file_stamp(path: str | Path) -> str:
    """Size + the first, middle and last MiB of a file (a whole small file).

    A folder (an OME-Zarr image in a SpatialData store) is stamped by the relative path, size
    and modification time of every file in it.
    """
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:24]
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for start in sorted({0, max(0, size // 2 - _BLOCK // 2), max(0, size - _BLOCK)}):
            fh.seek(start)
            h.update(fh.read(_BLOCK))
    return h.hexdigest()[:24]


def fingerprint(
    adata, *, morphology: Mapping[str, Any] | None = None
) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Digest per input component, and per-spot hashes of the spot ids and :data:`PER_SPOT`.

    Parameters
    ----------
    adata
        The cohort as loaded (before any preprocessing).
    morphology
        The config's ``morphology`` section when morphology is enabled (images and files it
        names are then part of the input).

    Returns
    -------
    ``{component: digest}`` (components: ``spots``, ``obs:<column>``, ``genes``, ``counts``,
    ``layer:<name>``, ``obsm:<key>``, ``images``, ``file:<setting>``) and ``{name: uint64 array}``
    (``spots`` and each :data:`PER_SPOT` column present).
    """
    spots = spot_hashes(adata.obs_names)
    per_spot = {"spots": spots}
    digests = {"spots": _digest(spots), "genes": _digest(spot_hashes(adata.var_names))}
    for column in adata.obs.columns:
        values = spot_hashes(adata.obs[column])
        digests[f"obs:{column}"] = _digest(values)
        if column in PER_SPOT:
            per_spot[column] = values
    digests["counts"] = _matrix_digest(adata.X)
    for name in adata.layers:
        digests[f"layer:{name}"] = _matrix_digest(adata.layers[name])
    for key in adata.obsm:
        digests[f"obsm:{key}"] = _matrix_digest(np.asarray(adata.obsm[key]))
    if morphology is not None:
        digests.update(_morphology_digests(adata, morphology))
    return digests, per_spot


def _morphology_digests(adata, morphology: Mapping[str, Any]) -> dict[str, str]:
    parts: list[Any] = []
    for sample, info in sorted((adata.uns.get(K.SPATIAL) or {}).items()):
        parts.append(str(sample))
        for name, image in sorted((info.get(K.IMAGES) or {}).items()):
            parts += [str(name), _matrix_digest(np.asarray(image))]
        parts.append(repr(sorted((info.get(K.SCALEFACTORS) or {}).items())))
        fullres = (info.get(K.METADATA) or {}).get(K.FULLRES_PATH) or ""
        if fullres and Path(fullres).exists():
            parts.append(file_stamp(fullres))
    out = {"images": _digest(*parts)}
    for setting in ("features", "weights", "stain_reference", "image"):
        value = morphology.get(setting)
        if isinstance(value, str) and value and Path(value).is_file():
            out[f"file:{setting}"] = file_stamp(value)
    return out


def inputs_key(digests: Mapping[str, str]) -> str:
    """One short key over all components (part of every cache key)."""
    return _digest(repr(sorted(digests.items())))[:16]


_NAMES = {"genes": "genes", "counts": "the count matrix", "images": "the images"}


def describe_changes(
    old: Mapping[str, str],
    new: Mapping[str, str],
    old_spots: Mapping[str, np.ndarray] | None,
    new_spots: Mapping[str, np.ndarray],
) -> str:
    """What differs between two fingerprints, e.g. ``labels changed in 12 spots``.

    ``old_spots`` (the per-spot hashes of the old fingerprint) may be None when they were lost;
    the changed components are then named without counts.
    """
    changed = [c for c in sorted(set(old) | set(new)) if old.get(c) != new.get(c)]
    parts: list[str] = []
    aligned = None
    if "spots" in changed and old_spots is not None and "spots" in old_spots:
        before, after = old_spots["spots"], new_spots["spots"]
        added = int(np.isin(after, before, invert=True).sum())
        removed = int(np.isin(before, after, invert=True).sum())
        if added or removed:
            # every per-spot component follows the spot set: name only what else changed
            parts.append(f"{added} spots added, {removed} removed")
            changed = [c for c in changed if c in ("genes", "images") or c.startswith("file:")]
        else:
            parts.append("spots reordered")
            aligned = pd.Index(before).get_indexer(after)
    elif "spots" in changed:
        parts.append("spot ids changed")
    elif old_spots is not None and "spots" in old_spots:
        aligned = np.arange(len(new_spots["spots"]))
    for component in changed:
        kind, _, name = component.partition(":")
        if component == "spots":
            continue
        if kind == "obs" and component in old and component in new:
            counts = aligned is not None and name in old_spots and name in new_spots  # type: ignore[operator]
            if counts:
                n = int((old_spots[name][aligned] != new_spots[name]).sum())  # type: ignore[index]
                if n == 0:
                    continue  # the same values in another spot order
                what = "labels" if name == K.LABEL else f"obs column '{name}'"
                parts.append(f"{what} changed in {n} spots")
            elif "spots reordered" not in parts:
                parts.append(f"obs column '{name}' changed")
        elif kind == "obs":
            parts.append(f"obs column '{name}' {'removed' if component in old else 'added'}")
        elif "spots reordered" in parts and kind in ("counts", "layer", "obsm"):
            continue  # may be the order alone
        elif kind == "layer":
            parts.append(f"layer '{name}' changed")
        elif kind == "obsm":
            parts.append(f"obsm['{name}'] changed")
        elif kind == "file":
            parts.append(f"the file of morphology.{name} changed")
        else:
            parts.append(f"{_NAMES.get(component, component)} changed")
    return ", ".join(parts) or "the input data changed"
