"""Clustering of an embedding into domains: K-Means, Gaussian mixture, Leiden, automatic K.

The array functions (``kmeans_labels``, ``gmm_labels``, ``leiden_labels``, ``choose_k``) know
nothing about AnnData; :func:`cluster` reads an ``obsm`` embedding and writes ``obs`` labels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import _keys as K
from .._deps import import_optional
from .._errors import SpatlasInputError
from .._logging import logger

ClusterMethod = Literal["kmeans", "gmm", "leiden"]
ChooseKMethod = Literal["silhouette", "stability"]

# Leiden resolution search: bracket by doubling / halving, then bisect on a log scale.
_RESOLUTION_MIN = 1e-4
_RESOLUTION_MAX = 1e3
# Below this many rows K-Means and GMM run single-threaded: OpenMP / BLAS thread barriers cost
# more than they save on small data, and on a busy machine they slow fits down 20-80x.
_SINGLE_THREAD_ROWS = 100_000


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel to ``0..K-1`` by decreasing cluster size, ties broken by first occurrence.

    Makes labels independent of the arbitrary ids a clustering algorithm hands out, so equal
    partitions always get equal label arrays.

    Parameters
    ----------
    labels
        Cluster ids of any sortable dtype, shape ``(n,)``.

    Returns
    -------
    ``int64`` array of shape ``(n,)``: 0 is the largest cluster.
    """
    labels = np.asarray(labels).ravel()
    _, first, inverse, counts = np.unique(
        labels, return_index=True, return_inverse=True, return_counts=True
    )
    order = np.lexsort((first, -counts))  # size descending, then first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse.ravel()].astype(np.int64)


def _as_matrix(X: Any, *, what: str = "X") -> np.ndarray:
    """A finite 2-d float array (float32 kept, everything else float64)."""
    if sp.issparse(X):
        X = X.toarray()
    X = np.asarray(X)
    if X.ndim != 2:
        raise SpatlasInputError(
            f"{what} must be a 2-d (spots x features) array, got shape {X.shape}"
        )
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise SpatlasInputError(f"{what} is empty (shape {X.shape}); nothing to cluster")
    if not np.issubdtype(X.dtype, np.number):
        raise SpatlasInputError(f"{what} has non-numeric dtype {X.dtype}")
    if X.dtype != np.float32:
        X = X.astype(np.float64, copy=False)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise SpatlasInputError(
            f"{what} has NaN or infinite values in {int(bad.sum())} of {X.shape[0]} rows; "
            "drop or impute those spots before clustering"
        )
    return X


@contextlib.contextmanager
def _single_thread_if_small(n_rows: int) -> Iterator[None]:
    if n_rows >= _SINGLE_THREAD_ROWS:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def _check_n_clusters(n_clusters: Any, n_obs: int) -> int:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int | np.integer):
        raise SpatlasInputError(
            f"n_clusters must be an integer, got {n_clusters!r} ({type(n_clusters).__name__})"
        )
    if n_clusters < 2 or n_clusters > n_obs:
        raise SpatlasInputError(
            f"n_clusters={n_clusters} is out of range: it must be between 2 and the number of "
            f"spots ({n_obs})"
        )
    return int(n_clusters)


# ---------------------------------------------------------------------------------------------
# array-level clustering
# ---------------------------------------------------------------------------------------------


def kmeans_labels(X: np.ndarray, n_clusters: int, *, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """K-Means labels of the rows of ``X``.

    Parameters
    ----------
    X
        Embedding, shape ``(n, d)``.
    n_clusters
        Number of clusters K, ``2 <= K <= n``.
    seed
        Seed of the centroid initialisation.
    n_init
        Number of k-means++ initialisations; the one with the lowest inertia wins.

    Returns
    -------
    ``int64`` labels ``0..K-1`` ordered by :func:`canonical_labels`.
    """
    from sklearn.cluster import KMeans

    X = _as_matrix(X)
    n_clusters = _check_n_clusters(n_clusters, X.shape[0])
    model = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    with _single_thread_if_small(X.shape[0]):
        labels = model.fit_predict(X)
    return canonical_labels(labels)


def gmm_labels(
    X: np.ndarray,
    n_clusters: int,
    *,
    seed: int = 0,
    covariance_type: Literal["full", "tied", "diag", "spherical"] = "full",
) -> np.ndarray:
    """Gaussian-mixture labels (most probable component) of the rows of ``X``.

    Parameters
    ----------
    X
        Embedding, shape ``(n, d)``.
    n_clusters
        Number of mixture components K, ``2 <= K <= n``.
    seed
        Seed of the k-means initialisation of the mixture.
    covariance_type
        Covariance structure of each component (see :class:`sklearn.mixture.GaussianMixture`).

    Returns
    -------
    ``int64`` labels ``0..K'-1`` ordered by :func:`canonical_labels`; ``K' < K`` when a
    component ends up owning no spot.
    """
    from sklearn.mixture import GaussianMixture

    X = _as_matrix(X)
    n_clusters = _check_n_clusters(n_clusters, X.shape[0])
    model = GaussianMixture(
        n_components=n_clusters,
        covariance_type=covariance_type,
        random_state=seed,
        reg_covar=1e-5,
    )
    with _single_thread_if_small(X.shape[0]):
        labels = model.fit(X).predict(X)
    return canonical_labels(labels)


def knn_graph(X: np.ndarray, n_neighbors: int = 15) -> sp.csr_matrix:
    """Symmetric, unweighted k-nearest-neighbour graph of the rows of ``X`` (self excluded).

    Parameters
    ----------
    X
        Embedding, shape ``(n, d)``.
    n_neighbors
        Neighbours per row (capped at ``n - 1``); the graph is symmetrised with ``max``.

    Returns
    -------
    Sparse ``(n, n)`` CSR adjacency with ones on the edges.
    """
    from sklearn.neighbors import NearestNeighbors

    n = X.shape[0]
    k = min(int(n_neighbors), n - 1)
    if k < 1:
        return sp.csr_matrix((n, n), dtype=np.float64)
    graph = NearestNeighbors(n_neighbors=k).fit(X).kneighbors_graph(mode="connectivity")
    return graph.maximum(graph.T).tocsr()


def _leiden_partition(graph, resolution: float, seed: int) -> np.ndarray:
    leidenalg = import_optional("leidenalg", purpose="Leiden clustering")
    partition = leidenalg.find_partition(
        graph,
        leidenalg.RBConfigurationVertexPartition,
        weights="weight",
        resolution_parameter=float(resolution),
        n_iterations=-1,
        seed=int(seed),
    )
    return np.asarray(partition.membership)


def _leiden(
    X: np.ndarray,
    *,
    n_clusters: int | None = None,
    resolution: float = 1.0,
    n_neighbors: int = 15,
    seed: int = 0,
    max_iter: int = 40,
) -> tuple[np.ndarray, float]:
    """Leiden labels and the resolution that produced them (see :func:`leiden_labels`)."""
    igraph = import_optional("igraph", purpose="Leiden clustering")
    X = _as_matrix(X)
    n = X.shape[0]
    if n_clusters is not None:
        n_clusters = _check_n_clusters(n_clusters, n)
    if resolution <= 0:
        raise SpatlasInputError(f"resolution must be > 0, got {resolution}")

    upper = sp.triu(knn_graph(X, n_neighbors), k=1).tocoo()
    graph = igraph.Graph(n=n, edges=np.column_stack([upper.row, upper.col]).tolist())
    graph.es["weight"] = upper.data.tolist()

    cache: dict[float, np.ndarray] = {}

    def run(res: float) -> tuple[np.ndarray, int]:
        if res not in cache:
            cache[res] = _leiden_partition(graph, res, seed)
        membership = cache[res]
        return membership, int(membership.max()) + 1

    if n_clusters is None:
        return canonical_labels(run(resolution)[0]), float(resolution)

    # Cluster counts grow (almost) monotonically with the resolution: bracket K, then bisect in
    # log-resolution. Non-monotonic steps can make K unreachable; then the closest count wins.
    best_res, best_gap = resolution, np.inf
    lo, hi = None, None  # resolutions giving fewer / more clusters than wanted
    res = float(resolution)
    for _ in range(max_iter):
        _, count = run(res)
        gap = abs(count - n_clusters)
        if gap < best_gap or (gap == best_gap and res < best_res):
            best_res, best_gap = res, gap
        if count == n_clusters:
            break
        if count < n_clusters:
            lo = res
        else:
            hi = res
        if lo is not None and hi is not None:
            res = float(np.sqrt(lo * hi))
        elif hi is None:
            res = res * 2.0
            if res > _RESOLUTION_MAX:
                break
        else:
            res = res / 2.0
            if res < _RESOLUTION_MIN:
                break
        if lo is not None and hi is not None and hi / lo < 1 + 1e-6:
            break
    labels, count = run(best_res)
    if count != n_clusters:
        logger.warning(
            "Leiden: no resolution gave exactly %d clusters within %d tries; using resolution "
            "%.4g with %d clusters (the closest)",
            n_clusters,
            max_iter,
            best_res,
            count,
        )
    else:
        logger.info("Leiden: resolution %.4g gives %d clusters", best_res, count)
    return canonical_labels(labels), float(best_res)


def leiden_labels(
    X: np.ndarray,
    *,
    n_clusters: int | None = None,
    resolution: float = 1.0,
    n_neighbors: int = 15,
    seed: int = 0,
    max_iter: int = 40,
) -> np.ndarray:
    """Leiden community labels on a k-nearest-neighbour graph of the rows of ``X``.

    The graph is the symmetric, unweighted kNN graph of :func:`knn_graph` (sparse); the
    partition maximises modularity with a resolution parameter (``leidenalg``'s
    ``RBConfigurationVertexPartition``), iterated to convergence with a fixed seed.

    Parameters
    ----------
    X
        Embedding, shape ``(n, d)``.
    n_clusters
        When given, the resolution is searched (doubling / halving from ``resolution`` until K is
        bracketed, then bisection on a log scale) until exactly K clusters come out. If K is not
        reached within ``max_iter`` Leiden runs, the closest count is used and a warning logged.
        The resolution found is logged at INFO level.
    resolution
        Resolution used directly (``n_clusters=None``) or as the search's starting point.
    n_neighbors
        Neighbours per spot in the kNN graph.
    seed
        Seed of the Leiden optimiser.
    max_iter
        Most Leiden runs of the resolution search.

    Returns
    -------
    ``int64`` labels ``0..K-1`` ordered by :func:`canonical_labels`.
    """
    return _leiden(
        X,
        n_clusters=n_clusters,
        resolution=resolution,
        n_neighbors=n_neighbors,
        seed=seed,
        max_iter=max_iter,
    )[0]


# ---------------------------------------------------------------------------------------------
# automatic K
# ---------------------------------------------------------------------------------------------


def choose_k(
    X: np.ndarray,
    *,
    k_range: Sequence[int] = range(3, 13),
    method: ChooseKMethod = "stability",
    seed: int = 0,
    n_init: int = 5,
    n_pairs: int = 10,
    subsample_frac: float = 0.8,
    threshold: float = 0.9,
    tolerance: float = 0.02,
    n_subsample: int = 3000,
    n_fit: int = 20_000,
) -> tuple[int, pd.DataFrame]:
    """Choose the number of clusters K for K-Means on ``X`` without labels.

    All fits use at most ``n_fit`` rows (a deterministic random subsample), so the cost does not
    grow with the number of spots. For every ``k`` in ``k_range`` two scores are computed:

    - ``silhouette``: silhouette width of one K-Means fit on a deterministic random subsample of
      at most ``n_subsample`` rows (bounded memory, O(n_subsample²) distances in blocks).
    - ``stability``: mean adjusted Rand index over ``n_pairs`` pairs of K-Means fits, each fitted on
      its own random ``subsample_frac`` share of the rows with its own seed, both then labelling
      the same evaluation subsample. High when the partition into k groups is a property of the
      data rather than of the initialisation or of the particular spots sampled.

    Rule, ``method='silhouette'``: the k with the highest silhouette. On tissue data this favours
    the coarsest split (often 2-3 domains).

    Rule, ``method='stability'`` (default): the **finest reproducible partition**, i.e. the largest
    k whose stability reaches ``min(threshold, best - tolerance)``, where ``best`` is the highest
    stability over ``k_range``. An ARI of 0.9 between independent fits means the partition is
    reproduced almost exactly; coarse partitions are nearly always stable, so the largest
    qualifying k is taken rather than the most stable one. When no k reaches ``threshold`` the
    bar falls to within ``tolerance`` of the best k.

    On real tissue neither rule recovers the annotated number of domains reliably: on the
    expression PCs of DLPFC slices 151673-76 (7 annotated layers) the stability rule picks 6, 4,
    6, 6 and the silhouette rule 3 on every slice. Use a known K when there is one.

    Parameters
    ----------
    X
        Embedding, shape ``(n, d)``.
    k_range
        Candidate K values, each ``>= 2`` and ``< n``.
    method
        ``'silhouette'`` or ``'stability'`` (see the rules above).
    seed
        Seeds every K-Means fit and subsample (derived seeds per k and pair).
    n_init
        K-Means initialisations per fit.
    n_pairs
        Pairs of subsampled K-Means fits per k for the stability score; the cost is
        ``len(k_range) * (1 + 2 * n_pairs)`` K-Means fits.
    subsample_frac
        Share of rows each stability fit sees.
    threshold
        Stability (ARI) that counts as reproducible in the ``'stability'`` rule.
    tolerance
        Slack below the best stability that still qualifies, used when it is below ``threshold``.
    n_subsample
        Most rows used to evaluate the silhouette and the stability.
    n_fit
        Most rows any K-Means fit sees.

    Returns
    -------
    ``(best_k, scores)``: ``scores`` has one row per k and columns ``k``, ``silhouette``,
    ``stability``, ``stability_std``, ``inertia``.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    X = _as_matrix(X)
    n = X.shape[0]
    ks = sorted({int(k) for k in k_range})
    if not ks:
        raise SpatlasInputError("k_range is empty; give candidate numbers of clusters, e.g. 3..12")
    if ks[0] < 2 or ks[-1] >= n:
        raise SpatlasInputError(
            f"k_range must lie between 2 and n_spots - 1 ({n - 1}), got {ks[0]}..{ks[-1]}"
        )
    if method not in ("silhouette", "stability"):
        raise SpatlasInputError(
            f"choose_k method must be 'silhouette' or 'stability', got {method!r}"
        )
    if not 0 < subsample_frac <= 1:
        raise SpatlasInputError(f"subsample_frac must be in (0, 1], got {subsample_frac}")

    rng = np.random.default_rng(seed)
    if n > n_fit:
        X = X[np.sort(rng.choice(n, size=n_fit, replace=False))]
        n = n_fit
    eval_idx = np.sort(rng.choice(n, size=min(n, n_subsample), replace=False))
    X_eval = X[eval_idx]
    fit_size = max(ks[-1] + 1, round(subsample_frac * n))
    fit_idx = [np.sort(rng.choice(n, size=fit_size, replace=False)) for _ in range(2 * n_pairs)]

    rows = []
    with _single_thread_if_small(n):
        for k in ks:
            full = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(X)
            sil = float(silhouette_score(X_eval, full.labels_[eval_idx]))
            aris = []
            for p in range(n_pairs):
                preds = [
                    KMeans(n_clusters=k, n_init=n_init, random_state=seed + 1 + 2 * p + j)
                    .fit(X[fit_idx[2 * p + j]])
                    .predict(X_eval)
                    for j in (0, 1)
                ]
                aris.append(adjusted_rand_score(*preds))
            rows.append(
                {
                    "k": k,
                    "silhouette": sil,
                    "stability": float(np.mean(aris)),
                    "stability_std": float(np.std(aris)),
                    "inertia": float(full.inertia_),
                }
            )
            logger.debug(
                "choose_k: k=%d silhouette %.3f stability %.3f", k, sil, rows[-1]["stability"]
            )
    scores = pd.DataFrame(rows)

    if method == "silhouette":
        best_k = int(scores.loc[scores["silhouette"].idxmax(), "k"])
    else:
        bar = min(threshold, scores["stability"].max() - tolerance)
        ok = scores["stability"] >= bar
        best_k = int(scores.loc[ok, "k"].max())
    logger.info("choose_k (%s): K = %d", method, best_k)
    return best_k, scores


# ---------------------------------------------------------------------------------------------
# AnnData layer
# ---------------------------------------------------------------------------------------------


def _uns_safe(value: Any) -> Any:
    """A value h5ad can store (nested dicts, scalars, strings, arrays); others become strings."""
    if isinstance(value, dict):
        return {str(k): _uns_safe(v) for k, v in value.items()}
    if isinstance(value, str | bool | int | float | np.generic):
        return value
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list | tuple | range) and all(
        isinstance(v, int | float | np.number) for v in value
    ):
        return np.asarray(list(value))
    return str(value)


def cluster(
    adata: AnnData,
    *,
    basis: str = K.PCA,
    method: ClusterMethod = "kmeans",
    n_clusters: int | Literal["auto"] | None = None,
    seed: int = 0,
    key_added: str | None = None,
    k_range: Sequence[int] = range(3, 13),
    choose_k_method: ChooseKMethod = "stability",
    **kwargs: Any,
) -> None:
    """Cluster an embedding in ``adata.obsm`` into domains.

    Parameters
    ----------
    adata
        Annotated data with the embedding in ``obsm[basis]``.
    basis
        ``obsm`` key of the embedding (``'pca'`` is read as ``'X_pca'``).
    method
        ``'kmeans'`` (:func:`kmeans_labels`), ``'gmm'`` (:func:`gmm_labels`) or ``'leiden'``
        (:func:`leiden_labels`).
    n_clusters
        Number of domains K. ``'auto'`` picks K with :func:`choose_k` on the embedding (K-Means
        scores over ``k_range``) and then clusters with ``method`` at that K. ``None`` is allowed
        only for Leiden, which then uses its ``resolution`` as given.
    seed
        Seed of the clustering (and of :func:`choose_k`).
    key_added
        ``obs`` key to write; defaults to :func:`spatlas._keys.domain_key` of ``basis``
        (``'X_pca'`` → ``'pca_domain'``).
    k_range
        Candidate K values when ``n_clusters='auto'``.
    choose_k_method
        Rule of :func:`choose_k` when ``n_clusters='auto'``.
    **kwargs
        Passed to the array function of ``method`` (e.g. ``n_init``, ``covariance_type``,
        ``resolution``, ``n_neighbors``).

    Returns
    -------
    None. Writes

    - ``adata.obs[key_added]``: categorical domain labels with categories ``'0'``, ``'1'``, …
      (``'0'`` the largest domain);
    - ``adata.uns['spatlas']['clustering'][key_added]``: method, basis, K found, seed, the
      parameters, the Leiden resolution used (Leiden), and the per-k scores (``'auto'``).
    """
    basis = K.embedding_key(basis) if basis not in adata.obsm else basis
    if basis not in adata.obsm:
        available = ", ".join(map(repr, adata.obsm.keys())) or "none"
        raise SpatlasInputError(
            f"embedding {basis!r} is not in adata.obsm (available: {available}); run PCA or an "
            "integration first, or pass basis= one of the available keys"
        )
    if method not in ("kmeans", "gmm", "leiden"):
        raise SpatlasInputError(
            f"unknown clustering method {method!r}; use 'kmeans', 'gmm' or 'leiden'"
        )
    X = _as_matrix(adata.obsm[basis], what=f"adata.obsm[{basis!r}]")
    key_added = key_added or K.domain_key(basis)

    record: dict[str, Any] = {"method": method, "basis": basis, "seed": seed, "params": kwargs}
    if isinstance(n_clusters, str):
        if n_clusters != "auto":
            raise SpatlasInputError(f"n_clusters must be an integer or 'auto', got {n_clusters!r}")
        k, scores = choose_k(X, k_range=k_range, method=choose_k_method, seed=seed)
        record["auto"] = {"method": choose_k_method, **{c: scores[c].to_numpy() for c in scores}}
        n_clusters = k
    elif n_clusters is None and method != "leiden":
        raise SpatlasInputError(
            f"method {method!r} needs n_clusters: pass the number of domains or 'auto'"
        )
    if n_clusters is not None:
        n_clusters = _check_n_clusters(n_clusters, X.shape[0])

    if method == "kmeans":
        labels = kmeans_labels(X, n_clusters, seed=seed, **kwargs)
    elif method == "gmm":
        labels = gmm_labels(X, n_clusters, seed=seed, **kwargs)
    else:
        labels, resolution = _leiden(X, n_clusters=n_clusters, seed=seed, **kwargs)
        record["resolution"] = resolution

    n_found = int(labels.max()) + 1
    record["n_clusters"] = n_found
    categories = [str(i) for i in range(n_found)]
    adata.obs[key_added] = pd.Categorical.from_codes(labels, categories=categories)
    uns = adata.uns.setdefault(K.UNS, {}).setdefault("clustering", {})
    uns[key_added] = _uns_safe(record)
    logger.info("cluster: %s on %s -> %d domains in obs[%r]", method, basis, n_found, key_added)
