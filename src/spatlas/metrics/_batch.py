"""Batch-mixing metrics: LISI / iLISI, kBET, batch silhouette."""

from __future__ import annotations

import numpy as np

from .._errors import SpatlasInputError
from .._logging import logger
from ._bio import ASW_MAX_SPOTS, silhouette_samples
from ._neighbors import Neighbors, as_embedding, check_length, codes, neighbors

#: Rows of the neighbour table processed at once by the LISI binary search (bounds memory).
_LISI_CHUNK = 65_536


def _as_neighbors(
    X_or_knn: np.ndarray | Neighbors, n_neighbors: int, max_spots: int | None, seed: int
) -> Neighbors:
    """The first ``n_neighbors`` neighbours (self excluded) from a table or an embedding."""
    if isinstance(X_or_knn, Neighbors):
        return X_or_knn.head(min(n_neighbors, X_or_knn.n_spots - 1))
    return neighbors(X_or_knn, n_neighbors, max_spots=max_spots, seed=seed)


def _gaussian_weights(distances: np.ndarray, perplexity: float, tol: float, n_iter: int):
    """Row-wise Gaussian kernel weights whose entropy matches log(perplexity).

    The same binary search on the precision ``beta`` as harmonypy's ``compute_lisi`` (start at
    1, double / halve until bracketed, then bisect; stop at ``|H − log perplexity| < tol`` or
    after ``n_iter`` updates), run on all rows at once. Distances are shifted by each row's
    minimum before exponentiating; this leaves the normalised weights and the entropy unchanged
    and avoids underflow when all distances are large.
    """
    d = distances - distances.min(axis=1, keepdims=True)
    n = d.shape[0]
    log_u = np.log(perplexity)
    beta = np.ones(n)
    beta_min = np.full(n, -np.inf)
    beta_max = np.full(n, np.inf)

    def entropy(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.exp(-d[rows] * beta[rows, None])
        p_sum = p.sum(axis=1)
        h = np.log(p_sum) + beta[rows] * (d[rows] * p).sum(axis=1) / p_sum
        return h, p / p_sum[:, None]

    h, p = entropy(np.arange(n))
    h_diff = h - log_u
    for _ in range(n_iter):
        active = np.flatnonzero(np.abs(h_diff) >= tol)
        if active.size == 0:
            break
        too_flat = h_diff[active] > 0  # entropy too high: sharpen the kernel
        up, down = active[too_flat], active[~too_flat]
        beta_min[up] = beta[up]
        beta[up] = np.where(np.isfinite(beta_max[up]), (beta[up] + beta_max[up]) / 2, beta[up] * 2)
        beta_max[down] = beta[down]
        beta[down] = np.where(
            np.isfinite(beta_min[down]), (beta[down] + beta_min[down]) / 2, beta[down] / 2
        )
        h_a, p_a = entropy(active)
        h_diff[active] = h_a - log_u
        p[active] = p_a
    return p


def lisi(
    X_or_knn: np.ndarray | Neighbors,
    labels,
    *,
    k: int = 90,
    perplexity: float = 30.0,
    max_spots: int | None = None,
    seed: int = 0,
    tol: float = 1e-5,
    n_iter: int = 50,
) -> np.ndarray:
    """Local inverse Simpson index of ``labels`` per spot, as harmonypy's ``compute_lisi``.

    For each spot, Gaussian weights on the Euclidean distances to its ``k`` nearest other spots
    are calibrated to the given perplexity by binary search; LISI is the inverse Simpson index
    ``1 / Σ_b (Σ_{j in b} p_j)²`` of the label composition under those weights. Vectorised
    over all spots.

    Parameters
    ----------
    X_or_knn
        ``(n_spots, n_dims)`` embedding, or :class:`Neighbors` from
        :func:`~spatlas.metrics.neighbors` with at least ``k`` neighbours.
    labels
        Category per spot (batch for iLISI). Must have no missing values.
    k
        Neighbours per spot, the spot itself not counted (harmonypy ≥ 2 uses
        ``3 · perplexity`` = 90 others; its pure-Python versions < 2 used 89).
    perplexity
        Effective number of neighbours of the Gaussian kernel.
    max_spots
        With an embedding: query only a deterministic random subset of this many spots.
    seed
        Seed of that subset.
    tol, n_iter
        Binary-search tolerance on the entropy and maximum number of updates.

    Returns
    -------
    numpy.ndarray
        LISI per query spot, in [1, number of categories].
    """
    c, n_cat = codes(labels, "labels")
    if (c < 0).any():
        raise SpatlasInputError("labels for LISI must not contain missing values.")
    knn = _as_neighbors(X_or_knn, k, max_spots, seed)
    check_length(knn.n_spots, labels=c)
    out = np.empty(len(knn.query))
    for start in range(0, len(knn.query), _LISI_CHUNK):
        sl = slice(start, start + _LISI_CHUNK)
        p = _gaussian_weights(knn.distances[sl], perplexity, tol, n_iter)
        rows = np.repeat(np.arange(p.shape[0]), p.shape[1])
        share = np.bincount(
            rows * n_cat + c[knn.indices[sl]].ravel(),
            weights=p.ravel(),
            minlength=p.shape[0] * n_cat,
        ).reshape(-1, n_cat)
        out[sl] = 1.0 / (share**2).sum(axis=1)
    return out


def ilisi(
    X_or_knn: np.ndarray | Neighbors,
    batch,
    *,
    k: int = 90,
    perplexity: float = 30.0,
    max_spots: int | None = None,
    seed: int = 0,
) -> float:
    """Integration LISI: median batch LISI over spots, scaled to [0, 1] as scib does.

    ``(median LISI − 1) / (n_batches − 1)``: 1 = neighbourhoods hold all batches in equal
    shares, 0 = each neighbourhood holds a single batch. With unequal batch sizes even perfect
    mixing scores below 1 (the inverse Simpson index of the global batch shares, rescaled).

    Parameters
    ----------
    X_or_knn
        Embedding or precomputed :class:`Neighbors` (see :func:`lisi`).
    batch
        Batch per spot.
    k, perplexity, max_spots, seed
        As in :func:`lisi`.

    Returns
    -------
    float
        Scaled iLISI; NaN with fewer than 2 batches.
    """
    _, n_batches = codes(batch, "batch")
    if n_batches < 2:
        return float("nan")
    values = lisi(X_or_knn, batch, k=k, perplexity=perplexity, max_spots=max_spots, seed=seed)
    return float((np.median(values) - 1.0) / (n_batches - 1))


def _kbet_acceptance(knn: Neighbors, c: np.ndarray, k: int, alpha: float) -> float:
    """Acceptance rate of kBET on precomputed neighbours; ``c``: batch codes 0..B−1, all used."""
    from scipy.stats import chi2

    n_batches = int(c.max()) + 1
    freq = np.bincount(c, minlength=n_batches) / len(c)
    # Neighbourhood = the spot itself + its k − 1 nearest other spots (kBET's convention).
    hood = np.concatenate([c[knn.query][:, None], c[knn.indices[:, : k - 1]]], axis=1)
    size = hood.shape[1]
    rows = np.repeat(np.arange(hood.shape[0]), size)
    observed = np.bincount(
        rows * n_batches + hood.ravel(), minlength=hood.shape[0] * n_batches
    ).reshape(-1, n_batches)
    expected = freq * size
    stat = ((observed - expected) ** 2 / expected).sum(axis=1)
    p_values = chi2.sf(stat, df=n_batches - 1)
    return float((p_values >= alpha).mean())


#: Labels with fewer spots than this are skipped by the per-label kBET (as scib does).
KBET_MIN_LABEL_SPOTS = 10


def kbet(
    X_or_knn: np.ndarray | Neighbors,
    batch,
    *,
    labels=None,
    k: int = 50,
    alpha: float = 0.05,
    max_spots: int | None = None,
    seed: int = 0,
) -> float:
    """Acceptance rate of kBET: share of neighbourhoods whose batch mix matches the global one.

    For each spot, the neighbourhood is the spot itself plus its ``k − 1`` nearest other spots
    (as the kBET R package and scib-metrics do). Pearson's χ² statistic compares the
    neighbourhood's batch counts with ``k ×`` the global batch frequencies, with
    ``n_batches − 1`` degrees of freedom; a neighbourhood is accepted when ``p ≥ alpha``.

    With ``labels``, kBET is computed within each label as scib does: neighbours are searched
    among that label's spots only (in the embedding; scib uses diffusion distances on the kNN
    graph), the expected frequencies are that label's batch frequencies, ``k`` is capped at the
    label's size; labels with fewer than 10 spots or a single batch are skipped, and the result
    is the mean acceptance rate over the remaining labels.

    Parameters
    ----------
    X_or_knn
        ``(n_spots, n_dims)`` embedding, or :class:`Neighbors` with at least ``k − 1``
        neighbours (only without ``labels``).
    batch
        Batch per spot; no missing values.
    labels
        Optional label per spot for the per-label version; spots with missing labels are left
        out.
    k
        Neighbourhood size, the spot itself included.
    alpha
        Significance level of the χ² test.
    max_spots
        With an embedding: test only a deterministic random subset of this many spots (per label
        with ``labels``); neighbours are still searched among all spots.
    seed
        Seed of that subset.

    Returns
    -------
    float
        Acceptance rate in [0, 1] (1 = well mixed); NaN with fewer than 2 batches (or no label
        that can be tested).
    """
    c, n_batches = codes(batch, "batch")
    if (c < 0).any():
        raise SpatlasInputError("batch for kBET must not contain missing values.")
    if k < 2:
        raise SpatlasInputError(f"kBET needs k ≥ 2, got {k}.")
    if labels is None:
        if n_batches < 2:
            return float("nan")
        knn = _as_neighbors(X_or_knn, k - 1, max_spots, seed)
        check_length(knn.n_spots, batch=c)
        return _kbet_acceptance(knn, c, min(k, knn.n_neighbors + 1), alpha)

    if isinstance(X_or_knn, Neighbors):
        raise SpatlasInputError(
            "kbet(labels=...) searches neighbours within each label and needs the embedding, "
            "not a precomputed Neighbors table."
        )
    X = as_embedding(X_or_knn)
    lab, n_labels = codes(labels, "labels")
    check_length(X.shape[0], batch=c, labels=lab)
    scores = []
    for g in range(n_labels):
        rows = np.flatnonzero(lab == g)
        sub, n_sub = codes(c[rows], "batch")  # re-coded: only this label's batches
        if len(rows) < KBET_MIN_LABEL_SPOTS or n_sub < 2:
            logger.debug("kBET: label %d has %d spots, %d batch(es); skipped", g, len(rows), n_sub)
            continue
        k_g = min(k, len(rows))
        knn = neighbors(X[rows], k_g - 1, max_spots=max_spots, seed=seed)
        scores.append(_kbet_acceptance(knn, sub, k_g, alpha))
    return float(np.mean(scores)) if scores else float("nan")


def asw_batch(
    X: np.ndarray,
    batch,
    labels=None,
    *,
    max_spots: int | None = ASW_MAX_SPOTS,
    seed: int = 0,
) -> float:
    """Batch silhouette as scib-metrics' ``silhouette_batch``: 1 = well mixed.

    Within each label, the silhouette of the batches is computed per spot and mapped to
    ``1 − |s|``; scores are averaged over the label's spots, then over labels. Labels holding a
    single batch, or as many batches as spots, are skipped.

    Parameters
    ----------
    X
        ``(n_spots, n_dims)`` embedding; Euclidean distances.
    batch
        Batch per spot; no missing values.
    labels
        Label per spot (missing labels are left out). ``None``: all spots form one group.
    max_spots
        Per label, above this many spots the silhouette uses a deterministic random subsample
        of ``max_spots`` spots. ``None``: always exact.
    seed
        Seed of the subsample.

    Returns
    -------
    float
        In [0, 1]; NaN when no label can be scored.
    """
    X = as_embedding(X)
    c, _ = codes(batch, "batch")
    if (c < 0).any():
        raise SpatlasInputError("batch for asw_batch must not contain missing values.")
    if labels is None:
        lab, n_labels = np.zeros(len(c), dtype=np.int64), 1
    else:
        lab, n_labels = codes(labels, "labels")
    check_length(X.shape[0], batch=c, labels=lab)
    per_label = []
    for g in range(n_labels):
        rows = np.flatnonzero(lab == g)
        s = silhouette_samples(X[rows], c[rows], max_spots=max_spots, seed=seed)
        if s.size:
            per_label.append(float(np.mean(1.0 - np.abs(s))))
    return float(np.mean(per_label)) if per_label else float("nan")
