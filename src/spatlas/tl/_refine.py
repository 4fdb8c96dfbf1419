"""Spatial refinement of domain labels: one k-nearest-neighbour majority vote within each sample."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger

_CHUNK = 65536  # rows per vote block: the (rows, k+1, k+1) comparison stays ~10 MB at k = 10


def _spatial_neighbours(coords: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` nearest other points of every point, shape ``(n, k)``.

    Self is dropped by index, not by position, so duplicated coordinates are handled; among
    equidistant candidates (hex and square lattices) the KD-tree's order decides, which is
    deterministic for a given input.
    """
    from ..pp._spatial_expression import knn

    return knn(coords, k)[1]


def _vote(votes: np.ndarray) -> np.ndarray:
    """Majority of each row of ``votes`` (column 0 = the spot's own label), by the refine rule."""
    out = np.empty(votes.shape[0], dtype=votes.dtype)
    for start in range(0, votes.shape[0], _CHUNK):
        v = votes[start : start + _CHUNK]
        counts = (v[:, :, None] == v[:, None, :]).sum(axis=2)  # occurrences of each entry's label
        top = counts.max(axis=1)
        smallest_top = np.where(counts == top[:, None], v, np.iinfo(v.dtype).max).min(axis=1)
        out[start : start + _CHUNK] = np.where(counts[:, 0] == top, v[:, 0], smallest_top)
    return out


def refine_labels(
    labels: np.ndarray,
    coords: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    k: int = 10,
) -> np.ndarray:
    """Smooth domain labels by one majority vote over spatial nearest neighbours.

    Rule: each spot takes the most frequent label among itself and its ``k`` nearest spots
    (Euclidean on ``coords``) **of the same group**; neighbours never cross groups (samples).
    Ties: if the spot's own label is among the most frequent it is kept, otherwise the smallest
    tied label wins. All spots vote on the input labels (one synchronous pass). A group with
    ``k`` or fewer spots uses ``k = group size - 1``; a single-spot group keeps its label.
    On a Visium hex lattice ``k = 10`` covers the 6 adjacent spots and 4 of the 6 next-nearest
    (equidistant candidates are taken in the KD-tree's deterministic order).

    Parameters
    ----------
    labels
        Domain labels, shape ``(n,)``, any sortable dtype ("smallest" follows that sort order).
    coords
        Spatial coordinates, shape ``(n, 2)`` (or ``(n, d)``).
    groups
        Sample of each spot, shape ``(n,)``; ``None`` treats all spots as one sample.
    k
        Neighbours per spot besides the spot itself (reference: 10).

    Returns
    -------
    Refined labels, shape ``(n,)``, same dtype and values as ``labels``.
    """
    labels = np.asarray(labels)
    coords = np.asarray(coords, dtype=np.float64)
    n = labels.shape[0]
    if labels.ndim != 1:
        raise SpatlasInputError(f"labels must be 1-d, got shape {labels.shape}")
    if coords.ndim != 2 or coords.shape[0] != n:
        raise SpatlasInputError(
            f"coords must have shape (n_spots, 2) with n_spots = {n} labels, got {coords.shape}"
        )
    if not np.isfinite(coords).all():
        bad = int((~np.isfinite(coords).all(axis=1)).sum())
        raise SpatlasInputError(f"coords have NaN or infinite values for {bad} spots; fix them")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise SpatlasInputError(f"k must be a positive integer number of neighbours, got {k!r}")
    if groups is None:
        group_codes = np.zeros(n, dtype=np.int64)
    else:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise SpatlasInputError(
                f"groups must have one entry per label ({n}), got shape {groups.shape}"
            )
        group_codes = np.unique(groups, return_inverse=True)[1].ravel()

    values, codes = np.unique(labels, return_inverse=True)
    codes = codes.ravel().astype(np.int64)
    refined = codes.copy()
    order = np.argsort(group_codes, kind="stable")
    bounds = np.cumsum(np.bincount(group_codes))[:-1]
    for members in np.split(order, bounds) if n else []:
        k_g = min(int(k), members.size - 1)
        if k_g < 1:
            continue
        nbrs = _spatial_neighbours(coords[members], k_g)
        own = codes[members]
        refined[members] = _vote(np.column_stack([own, own[nbrs]]))
    return values[refined]


def refine(
    adata: AnnData,
    *,
    key: str = K.domain_key(K.PCA),
    k: int = 10,
    sample_key: str | None = K.SAMPLE,
    spatial_key: str = K.SPATIAL,
    key_added: str | None = None,
) -> None:
    """Spatially refine domain labels within each sample (see :func:`refine_labels`).

    Parameters
    ----------
    adata
        Annotated data with labels in ``obs[key]`` and coordinates in ``obsm[spatial_key]``.
    key
        ``obs`` key of the domain labels to refine, e.g. ``'pca_domain'``.
    k
        Spatial neighbours per spot besides itself (reference: 10).
    sample_key
        ``obs`` key of the sample; votes never cross samples. ``None`` for a single sample.
    spatial_key
        ``obsm`` key of the coordinates (the first two columns are used).
    key_added
        ``obs`` key to write; defaults to ``f"{key}_refined"`` (the input is never overwritten
        unless ``key_added == key``).

    Returns
    -------
    None. Writes

    - ``adata.obs[key_added]``: categorical refined labels with the categories of ``obs[key]``;
    - ``adata.uns['spatlas']['refinement'][key_added]``: key, k, sample_key, spatial_key and the
      share of spots whose label changed.
    """
    if key not in adata.obs:
        domain_like = [c for c in adata.obs.columns if "domain" in str(c)]
        raise SpatlasInputError(
            f"labels {key!r} are not in adata.obs (domain-like columns: {domain_like or 'none'}); "
            "run spatlas.tl.cluster first or pass key= the column to refine"
        )
    if spatial_key not in adata.obsm:
        raise SpatlasInputError(
            f"coordinates {spatial_key!r} are not in adata.obsm (available: "
            f"{list(adata.obsm.keys())}); pass spatial_key= the coordinate key"
        )
    if sample_key is not None and sample_key not in adata.obs:
        raise SpatlasInputError(
            f"sample column {sample_key!r} is not in adata.obs; pass sample_key= the column naming "
            "each spot's sample, or sample_key=None for a single sample"
        )
    labels = adata.obs[key]
    if not isinstance(labels.dtype, pd.CategoricalDtype):
        labels = labels.astype("category")
    codes = labels.cat.codes.to_numpy()
    if (codes < 0).any():
        raise SpatlasInputError(
            f"obs[{key!r}] has {int((codes < 0).sum())} missing labels; refinement needs a "
            "label for every spot"
        )
    coords = np.asarray(adata.obsm[spatial_key])[:, :2]
    groups = None if sample_key is None else adata.obs[sample_key].to_numpy()

    refined = refine_labels(codes, coords, groups, k=k)
    key_added = key_added or f"{key}_refined"
    changed = float(np.mean(refined != codes)) if codes.size else 0.0
    adata.obs[key_added] = pd.Categorical.from_codes(refined, dtype=labels.dtype)
    adata.uns.setdefault(K.UNS, {}).setdefault("refinement", {})[key_added] = {
        "key": key,
        "k": int(k),
        "sample_key": sample_key if sample_key is not None else "",
        "spatial_key": spatial_key,
        "fraction_changed": changed,
    }
    logger.info("refine: %.1f%% of labels in obs[%r] changed", 100 * changed, key_added)
