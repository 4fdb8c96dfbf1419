"""Biological conservation metrics: ARI, NMI, label silhouette; and ARI against donors."""

from __future__ import annotations

import numpy as np

from .._logging import logger
from ._neighbors import as_embedding, check_length, codes, subsample

#: Spots above which silhouettes are estimated on a deterministic random subsample
#: (silhouette costs O(N²) time; scikit-learn keeps its memory bounded by chunking).
ASW_MAX_SPOTS = 20_000


def _paired_codes(a, b, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes of two labelings restricted to the spots where both are present."""
    ca, _ = codes(a, name_a)
    cb, _ = codes(b, name_b)
    check_length(len(ca), **{name_b: cb})
    keep = (ca >= 0) & (cb >= 0)
    return ca[keep], cb[keep]


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index (scikit-learn), ignoring spots where either labeling is missing.

    Parameters
    ----------
    labels_true
        Reference labels per spot; NaN / None mark unlabelled spots.
    labels_pred
        Predicted labels (e.g. clusters) per spot; NaN / None are ignored too.

    Returns
    -------
    float
        ARI in [−0.5, 1] (1 = identical partitions, ≈ 0 = chance); NaN when no spot is left.
    """
    from sklearn.metrics import adjusted_rand_score

    t, p = _paired_codes(labels_true, labels_pred, "labels_true", "labels_pred")
    if t.size == 0:
        return float("nan")
    return float(adjusted_rand_score(t, p))


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information with arithmetic-mean normalisation (scikit-learn).

    Spots where either labeling is missing (NaN / None) are ignored.

    Parameters
    ----------
    labels_true
        Reference labels per spot.
    labels_pred
        Predicted labels per spot.

    Returns
    -------
    float
        NMI in [0, 1]; NaN when no spot is left.
    """
    from sklearn.metrics import normalized_mutual_info_score

    t, p = _paired_codes(labels_true, labels_pred, "labels_true", "labels_pred")
    if t.size == 0:
        return float("nan")
    return float(normalized_mutual_info_score(t, p, average_method="arithmetic"))


def ari_donor(clusters, donors) -> float:
    """ARI between clusters and donor ids: how much the clustering follows donors (lower is better).

    Parameters
    ----------
    clusters
        Cluster per spot.
    donors
        Donor per spot.

    Returns
    -------
    float
        ARI; NaN with fewer than 2 donors, where it says nothing.
    """
    _, n_donors = codes(donors, "donors")
    if n_donors < 2:
        return float("nan")
    return ari(donors, clusters)


def silhouette_samples(
    X: np.ndarray, label_codes: np.ndarray, *, max_spots: int | None, seed: int
) -> np.ndarray:
    """Per-spot silhouette (Euclidean) of codes ≥ 0 on at most ``max_spots`` spots.

    Returns an empty array when there are fewer than 2 groups or fewer spots than groups + 1
    (silhouette is undefined). Singleton groups get 0, as in scikit-learn.
    """
    from sklearn import config_context
    from sklearn.metrics import silhouette_samples as _sk_silhouette_samples

    rows = np.flatnonzero(label_codes >= 0)
    rows = rows[subsample(len(rows), max_spots, seed)]
    y = label_codes[rows]
    n_groups = len(np.unique(y))
    if n_groups < 2 or n_groups >= len(y):
        return np.empty(0)
    # scikit-learn's pairwise chunks default to 1 GB of working memory; 128 MB is as fast here
    with config_context(working_memory=128):
        return _sk_silhouette_samples(X[rows], y, metric="euclidean")


def asw_label(
    X: np.ndarray,
    labels,
    *,
    max_spots: int | None = ASW_MAX_SPOTS,
    seed: int = 0,
) -> float:
    """Average silhouette width of the labels, rescaled to [0, 1] as scib does: (s + 1) / 2.

    Parameters
    ----------
    X
        ``(n_spots, n_dims)`` embedding; Euclidean distances.
    labels
        Label per spot; NaN / None spots are left out.
    max_spots
        With more labelled spots than this, the silhouette is computed on a deterministic random
        subsample of ``max_spots`` of them (like scikit-learn's ``silhouette_score(sample_size=)``).
        ``None``: always exact.
    seed
        Seed of the subsample.

    Returns
    -------
    float
        1 = compact, well-separated labels; 0.5 = overlapping; NaN with fewer than 2 labels.
    """
    X = as_embedding(X)
    c, _ = codes(labels, "labels")
    check_length(X.shape[0], labels=c)
    if max_spots is not None and (c >= 0).sum() > max_spots:
        logger.debug("asw_label: silhouette on a subsample of %d spots", max_spots)
    s = silhouette_samples(X, c, max_spots=max_spots, seed=seed)
    if s.size == 0:
        return float("nan")
    return float((s.mean() + 1.0) / 2.0)
