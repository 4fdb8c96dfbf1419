"""Shared helpers of the metrics: k nearest neighbours, label codes, deterministic subsamples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .._errors import SpatlasInputError


@dataclass(frozen=True)
class Neighbors:
    """Euclidean k nearest neighbours of some query spots among all spots.

    Computed once by :func:`neighbors` and shared by :func:`~spatlas.metrics.lisi`,
    :func:`~spatlas.metrics.ilisi` and :func:`~spatlas.metrics.kbet`, each of which uses the
    first columns it needs.

    Attributes
    ----------
    indices
        ``(n_query, m)`` row numbers of each query spot's ``m`` nearest *other* spots, nearest
        first. The query spot itself is never in its own row.
    distances
        ``(n_query, m)`` Euclidean distances matching ``indices``.
    query
        ``(n_query,)`` row numbers of the query spots (all spots, in order, unless subsampled).
    n_spots
        Number of spots searched (rows of the embedding).
    """

    indices: np.ndarray
    distances: np.ndarray
    query: np.ndarray
    n_spots: int

    @property
    def n_neighbors(self) -> int:
        """Neighbours per query spot, the spot itself not counted."""
        return int(self.indices.shape[1])

    def head(self, n_neighbors: int) -> Neighbors:
        """The ``n_neighbors`` nearest of the stored neighbours."""
        if n_neighbors > self.n_neighbors:
            raise SpatlasInputError(
                f"{n_neighbors} neighbours needed but only {self.n_neighbors} were computed; "
                f"call spatlas.metrics.neighbors(X, n_neighbors={n_neighbors})."
            )
        return Neighbors(
            self.indices[:, :n_neighbors],
            self.distances[:, :n_neighbors],
            self.query,
            self.n_spots,
        )


def as_embedding(X: np.ndarray, name: str = "X") -> np.ndarray:
    """``X`` as a finite 2-d float64 array."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise SpatlasInputError(f"{name} must be 2-d (spots × dimensions), got shape {X.shape}.")
    if not np.isfinite(X).all():
        raise SpatlasInputError(f"{name} contains NaN or infinite values.")
    return X


def subsample(n: int, max_spots: int | None, seed: int) -> np.ndarray:
    """Sorted row numbers of a deterministic random subset of at most ``max_spots`` of ``n``."""
    if max_spots is None or n <= max_spots:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_spots, replace=False))


def neighbors(
    X: np.ndarray,
    n_neighbors: int,
    *,
    max_spots: int | None = None,
    seed: int = 0,
) -> Neighbors:
    """Euclidean k nearest neighbours with scikit-learn, the query spot itself excluded.

    Parameters
    ----------
    X
        ``(n_spots, n_dims)`` embedding.
    n_neighbors
        Neighbours per spot, the spot itself not counted (capped at ``n_spots - 1``).
    max_spots
        Above this many spots, query only a deterministic random subset of ``max_spots`` spots
        (their neighbours are still searched among all spots). ``None``: query every spot.
    seed
        Seed of the subset.

    Returns
    -------
    Neighbors
        Indices, distances and the query rows.
    """
    from sklearn.neighbors import NearestNeighbors

    X = as_embedding(X)
    n = X.shape[0]
    if n < 2:
        raise SpatlasInputError("At least 2 spots are needed to compute neighbours.")
    m = min(int(n_neighbors), n - 1)
    if m < 1:
        raise SpatlasInputError(f"n_neighbors must be ≥ 1, got {n_neighbors}.")
    query = subsample(n, max_spots, seed)
    nn = NearestNeighbors(n_neighbors=m).fit(X)
    if len(query) == n:
        # kneighbors() without X leaves each spot out of its own list, duplicates included.
        dist, idx = nn.kneighbors()
    else:
        dist, idx = nn.kneighbors(X[query], n_neighbors=m + 1)
        dist, idx = _drop_self(dist, idx, query)
    return Neighbors(idx.astype(np.int64), dist, query, n)


def _drop_self(dist: np.ndarray, idx: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, ...]:
    """Remove each query spot from its own m + 1 neighbours (or the farthest, if absent)."""
    is_self = idx == query[:, None]
    absent = ~is_self.any(axis=1)  # a duplicate point displaced the spot itself
    is_self[absent, -1] = True
    keep = ~is_self
    m = idx.shape[1] - 1
    return dist[keep].reshape(-1, m), idx[keep].reshape(-1, m)


def codes(values, name: str = "labels") -> tuple[np.ndarray, int]:
    """Integer codes of ``values`` (−1 where missing: NaN / None) and the number of categories."""
    arr = np.asarray(values, dtype=object)
    if arr.ndim != 1:
        raise SpatlasInputError(f"{name} must be 1-d, got shape {arr.shape}.")
    c, uniques = pd.factorize(arr)
    return np.asarray(c, dtype=np.int64), len(uniques)


def check_length(n: int, **arrays) -> None:
    """Raise when an array's length is not ``n``."""
    for name, a in arrays.items():
        if a is not None and len(a) != n:
            raise SpatlasInputError(f"{name} has {len(a)} entries; expected {n} (one per spot).")
