"""Neighbourhood-augmented expression at the gene level (BANKSY-style), before reduction.

A PCA-first pipeline reduces each spot's expression to a few components and only then looks
at space (refinement, the fusion model's windows). BANKSY (Singhal et al., Nat Genet 2024)
keeps the neighbourhood at the gene level: each spot's (z-scored) expression is concatenated
with the Gaussian-weighted mean of its spatial neighbours and with the magnitude of an
azimuthal Gabor filter (AGF, the local expression gradient), the three blocks weighted by
``sqrt(1 - λ)``, ``sqrt(2λ/3)`` and ``sqrt(λ/3)``, and the PCA is taken of that matrix.

spatlas computes the same augmentation (its own implementation) on analytic Pearson residuals
of the counts (Lause et al. 2021) or on relative / log-normalised counts, with every block
z-scored within each sample (``scale_by``) so that one sample's depth or composition does not
become a principal component of its own.
"""

from __future__ import annotations

from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger

Normalisation = Literal["pearson", "relative", "log", "sqrt"]
NORMALISATIONS = ("pearson", "relative", "log", "sqrt")


def knn(coords: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices of the ``k`` nearest other points of every point, each ``(n, k)``.

    Self is dropped by index, not by position, so duplicated coordinates are handled (where self
    did not come back among ties, the farthest is dropped instead); ``k`` is capped at ``n - 1``.
    Among equidistant candidates the KD-tree's order decides, deterministic for a given input.
    """
    n = coords.shape[0]
    k = min(k, n - 1)
    dist, idx = cKDTree(coords).query(coords, k=k + 1)
    dist, idx = dist.reshape(n, k + 1), idx.reshape(n, k + 1)
    is_self = idx == np.arange(n)[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    return dist[keep].reshape(n, k), idx[keep].reshape(n, k)


def neighbourhood_weights(
    coords: np.ndarray, groups: np.ndarray | None = None, *, k: int = 18
) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]:
    """Row-normalised Gaussian neighbour weights and the AGF's cosine / sine weights.

    Within each group (sample), every spot's ``k`` nearest spots get the weight
    ``exp(-d² / 2σ²)`` with σ the spot's median neighbour distance ("scaled Gaussian"),
    normalised to sum to 1. The AGF (first azimuthal harmonic) uses the ``2k`` nearest spots
    with the same kernel, multiplied by ``cos θ`` / ``sin θ`` of the direction to the neighbour.

    Returns
    -------
    ``(W, Wcos, Wsin)``, sparse ``(n, n)`` with no entry across groups.
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    groups = np.zeros(n, dtype=int) if groups is None else np.asarray(groups)
    rows: dict[str, list] = {"w": [], "agf": []}
    for g in np.unique(groups):
        where = np.flatnonzero(groups == g)
        if where.size < 2:
            continue
        xy = coords[where]
        for name, kk in (("w", k), ("agf", 2 * k)):
            dist, idx = knn(xy, kk)
            sigma = np.median(dist, axis=1, keepdims=True)
            sigma[sigma == 0] = 1.0
            w = np.exp(-(dist**2) / (2 * sigma**2))
            w /= w.sum(axis=1, keepdims=True)
            r = np.repeat(where, idx.shape[1])
            c = where[idx.ravel()]
            if name == "w":
                rows["w"].append((r, c, w.ravel(), None))
            else:
                delta = xy[idx] - xy[:, None, :]
                theta = np.arctan2(delta[..., 1], delta[..., 0])
                rows["agf"].append((r, c, w.ravel(), theta.ravel()))

    def build(parts, values) -> sp.csr_matrix:
        if not parts:
            return sp.csr_matrix((n, n))
        r = np.concatenate([p[0] for p in parts])
        c = np.concatenate([p[1] for p in parts])
        v = np.concatenate([values(p) for p in parts])
        return sp.csr_matrix((v, (r, c)), shape=(n, n))

    W = build(rows["w"], lambda p: p[2])
    Wcos = build(rows["agf"], lambda p: p[2] * np.cos(p[3]))
    Wsin = build(rows["agf"], lambda p: p[2] * np.sin(p[3]))
    return W, Wcos, Wsin


def normalise_counts(
    counts: sp.spmatrix | np.ndarray,
    groups: np.ndarray | None = None,
    *,
    method: Normalisation = "pearson",
    theta: float = 100.0,
    target_sum: float | None = None,
) -> np.ndarray:
    """Dense float32 normalised expression of a (spots x genes) count matrix.

    ``pearson``: analytic Pearson residuals ``(x - μ) / sqrt(μ + μ²/θ)`` with ``μ`` = spot total
    × gene share **within the spot's group**, clipped to ``±sqrt(n)`` (``n`` the group's
    spots); ``relative``: counts per ``target_sum`` (no log; BANKSY's input); ``log``: log1p of
    those; ``sqrt``: their square root. ``target_sum`` ``None``: the mean spot total, which makes
    ``log`` the shifted logarithm ``log(x/s + 1)`` with size factors ``s`` = spot total / mean
    total (Ahlmann-Eltze & Huber, Nat Methods 2023): a pseudocount of one count at the average
    depth instead of a fraction of one at 10,000.
    """
    if method not in NORMALISATIONS:
        raise SpatlasInputError(
            f"normalisation must be one of {', '.join(NORMALISATIONS)}; got {method!r}"
        )
    X = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    X = X.astype(np.float32, copy=True)
    totals = X.sum(axis=1, keepdims=True)
    if method in ("relative", "log", "sqrt"):
        if target_sum is None:
            target_sum = float(totals.mean()) if totals.size else 1.0
        np.divide(X * target_sum, totals, out=X, where=totals > 0)
        if method == "log":
            return np.log1p(X, out=X)
        return np.sqrt(X, out=X) if method == "sqrt" else X
    groups = np.zeros(X.shape[0], dtype=int) if groups is None else np.asarray(groups)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        sub = X[rows]
        share = sub.sum(axis=0, keepdims=True) / max(float(sub.sum()), 1.0)
        mu = totals[rows] * share
        denom = np.sqrt(mu + mu**2 / theta)
        res = np.divide(sub - mu, denom, out=np.zeros_like(sub), where=denom > 0)
        clip = float(np.sqrt(rows.size))  # Lause et al.: sqrt(n), n the spots of the group
        X[rows] = np.clip(res, -clip, clip)
    return X


def _zscore(X: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Columns z-scored in place, within each group when ``groups`` is given."""
    parts = (
        [np.arange(X.shape[0])]
        if groups is None
        else [np.flatnonzero(groups == g) for g in np.unique(groups)]
    )
    for rows in parts:
        sub = X[rows]
        mean = sub.mean(axis=0)
        std = sub.std(axis=0)
        std[std == 0] = 1.0
        X[rows] = (sub - mean) / std
    return X


def neighbourhood_blocks(
    X: np.ndarray,
    coords: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    k_geom: int = 18,
    agf: bool = True,
    scale_groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """The z-scored blocks ``[X, W X, |AGF|]`` (without ``agf``: ``[X, W X]``), float32.

    Neighbours never cross ``groups``; each block is z-scored within ``scale_groups``
    (``None``: over all spots). Combine them with :func:`combine_blocks`.
    """
    W, Wcos, Wsin = neighbourhood_weights(coords, groups, k=k_geom)
    X = np.asarray(X, dtype=np.float32)
    blocks = [
        _zscore(np.array(X, dtype=np.float32), scale_groups),
        _zscore(np.asarray(W @ X, dtype=np.float32), scale_groups),
    ]
    if agf:
        # |sum_j w_ij e^{i theta_ij} (x_j - xbar_i)|, xbar_i the AGF-weighted neighbour mean
        wsum_cos = np.asarray(Wcos.sum(axis=1), dtype=np.float32)
        wsum_sin = np.asarray(Wsin.sum(axis=1), dtype=np.float32)
        Wabs = (Wcos.multiply(Wcos) + Wsin.multiply(Wsin)).sqrt()
        xbar = np.asarray(Wabs @ X, dtype=np.float32)
        re = np.asarray(Wcos @ X, dtype=np.float32) - wsum_cos * xbar
        im = np.asarray(Wsin @ X, dtype=np.float32) - wsum_sin * xbar
        # what float32 leaves of an exact cancellation (a constant neighbourhood) is 0, not a
        # pattern for the z-scoring to blow up
        tol = np.float32(1e-5) * (np.abs(xbar) + np.float32(1e-12))
        re[np.abs(re) < tol] = 0
        im[np.abs(im) < tol] = 0
        blocks.append(_zscore(np.sqrt(re**2 + im**2), scale_groups))
    return blocks


def combine_blocks(blocks: list[np.ndarray], lam: float) -> np.ndarray:
    """The weighted blocks ``[sqrt(1-lam) own, sqrt(2 lam/3) mean, sqrt(lam/3) AGF]``.

    With two blocks the mean gets ``sqrt(lam)``; ``lam = 0`` returns the own block alone.
    """
    if not 0.0 <= lam <= 1.0:
        raise SpatlasInputError(f"lambda must lie in [0, 1]; got {lam}")
    if lam == 0:
        return blocks[0]
    weights = [1 - lam, 2 * lam / 3, lam / 3] if len(blocks) == 3 else [1 - lam, lam]
    return np.hstack([b * np.float32(np.sqrt(w)) for b, w in zip(blocks, weights, strict=True)])


def augment_expression(
    X: np.ndarray,
    coords: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    lam: float = 0.2,
    k_geom: int = 18,
    agf: bool = True,
    scale_groups: np.ndarray | None = None,
) -> np.ndarray:
    """The BANKSY matrix ``[sqrt(1-lam) z(X), sqrt(2 lam/3) z(W X), sqrt(lam/3) z(|AGF|)]``.

    Dense float32; see :func:`neighbourhood_blocks` and :func:`combine_blocks`.
    """
    if lam == 0:
        return _zscore(np.array(X, dtype=np.float32), scale_groups)
    blocks = neighbourhood_blocks(
        X, coords, groups, k_geom=k_geom, agf=agf, scale_groups=scale_groups
    )
    return combine_blocks(blocks, lam)


def dense_pca(X: np.ndarray, *, n_comps: int = 20, seed: int = 0) -> np.ndarray:
    """Scores of the first ``n_comps`` principal components of ``X`` (centred), float32.

    Randomised SVD (Halko et al.) with a fixed seed; signs fixed by each component's
    largest-magnitude loading. BLAS runs on one thread here: a multi-threaded sgemm sums in an
    order that depends on the thread count, and the 7 power iterations amplify that rounding
    (2e-4 on the scores between 1 and 2 threads), so the same seed would not give the same
    numbers on another machine. On 14,000 x 9,000 this costs 2.5 s instead of 2.2 s.
    """
    from sklearn.utils.extmath import randomized_svd
    from threadpoolctl import threadpool_limits

    Xc = X - X.mean(axis=0, dtype=np.float64).astype(np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        U, S, Vt = randomized_svd(Xc, n_comps, n_iter=7, random_state=seed)
    signs = np.sign(Vt[np.arange(n_comps), np.abs(Vt).argmax(axis=1)])
    return (U * S * signs).astype(np.float32)


def _streamed_pca(
    counts: sp.spmatrix,
    coords: np.ndarray,
    groups: np.ndarray,
    *,
    n_comps: int,
    seed: int,
    **options,
) -> np.ndarray:
    """PCA of the augmented matrix built one sample at a time (never the whole cohort at once).

    Valid when every block is z-scored within the sample (each sample's rows depend on that
    sample only). Pass 1 accumulates the feature covariance, pass 2 rebuilds each sample's rows
    and projects them; memory: one sample's augmented rows plus a features x features matrix.
    """
    from scipy.sparse.linalg import eigsh

    order = [np.flatnonzero(groups == g) for g in pd.unique(groups)]

    def rows(idx: np.ndarray) -> np.ndarray:
        X = normalise_counts(
            counts[idx], None, method=options["normalisation"], target_sum=options["target_sum"]
        )
        return augment_expression(
            X, coords[idx], None, lam=options["lam"], k_geom=options["k_geom"], agf=options["agf"]
        )

    gram = total = None
    n = 0
    for idx in order:
        M = rows(idx).astype(np.float64)
        gram = M.T @ M if gram is None else gram + M.T @ M
        total = M.sum(axis=0) if total is None else total + M.sum(axis=0)
        n += M.shape[0]
    mean = total / n
    cov = (gram - n * np.outer(mean, mean)) / max(n - 1, 1)
    v0 = np.random.default_rng(seed).standard_normal(cov.shape[0])
    values, vectors = eigsh(cov, k=n_comps, v0=v0)
    vectors = vectors[:, np.argsort(values)[::-1]]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(n_comps)])
    vectors = vectors * signs
    scores = np.empty((counts.shape[0], n_comps), dtype=np.float32)
    for idx in order:
        scores[idx] = (rows(idx) - mean) @ vectors
    return scores


def spatial_expression(
    adata: ad.AnnData,
    *,
    lam: float = 0.2,
    k_geom: int = 18,
    agf: bool = True,
    normalisation: Normalisation = "log",
    scale_by: str | None = K.SAMPLE,
    n_comps: int = 20,
    layer: str = K.COUNTS,
    max_dense_gb: float = 2.0,
    seed: int = 0,
    key_added: str = K.SPATIAL_PCA,
) -> None:
    """PCA of the neighbourhood-augmented expression of the HVGs -> ``obsm[key_added]``.

    Parameters
    ----------
    adata
        Cohort after :func:`spatlas.pp.preprocess_expression` (raw counts in
        ``layers[layer]``, ``var['highly_variable']``, ``obsm['spatial']``, ``obs['sample']``).
    lam
        λ, the neighbourhood's share of the variance (0: the spot's own expression only).
    k_geom
        Neighbours of the Gaussian mean (the AGF uses twice as many).
    agf
        Include the azimuthal Gabor (gradient) block.
    normalisation
        ``log`` | ``sqrt`` | ``pearson`` | ``relative`` (see :func:`normalise_counts`).
    scale_by
        obs column within which every block is z-scored (``None``: over the whole cohort).
    n_comps
        Number of principal components.
    layer
        Layer of the raw counts.
    max_dense_gb
        Above this size of the whole augmented matrix (float32) and with ``scale_by`` the sample
        column, the matrix is built one sample at a time and its PCA taken from the feature
        covariance (two passes; the same components up to numerical precision).
    seed
        Seed of the randomised SVD (or of the eigensolver's start vector).
    key_added
        obsm key of the scores (float32).
    """
    for what, ok in (
        (f"layers['{layer}'] (run spatlas.pp.preprocess_expression first)", layer in adata.layers),
        ("var['highly_variable']", K.HVG in adata.var),
        ("obsm['spatial']", K.SPATIAL in adata.obsm),
    ):
        if not ok:
            raise SpatlasInputError(f"spatial_expression needs {what}")
    if scale_by is not None and scale_by not in adata.obs:
        raise SpatlasInputError(f"scale_by '{scale_by}' is not an obs column")
    hvg = adata.var[K.HVG].to_numpy()
    groups = adata.obs[K.SAMPLE].to_numpy() if K.SAMPLE in adata.obs else None
    scale_groups = None if scale_by is None else adata.obs[scale_by].to_numpy()
    counts = sp.csr_matrix(adata.layers[layer][:, hvg])
    coords = np.asarray(adata.obsm[K.SPATIAL], dtype=np.float64)[:, :2]
    n_features = int(hvg.sum()) * ((3 if agf else 2) if lam > 0 else 1)
    n_comps = min(n_comps, min(adata.n_obs, n_features) - 1)
    streamed = (
        adata.n_obs * n_features * 4 > max_dense_gb * 2**30
        and groups is not None
        and scale_by == K.SAMPLE
    )
    if streamed:
        target_sum = None
        if normalisation != "pearson":
            target_sum = float(np.asarray(counts.sum(axis=1)).mean()) or 1.0
        logger.info(
            "augmented matrix of %d x %d above %.1f GB: built one sample at a time",
            adata.n_obs,
            n_features,
            max_dense_gb,
        )
        adata.obsm[key_added] = _streamed_pca(
            counts,
            coords,
            groups,
            n_comps=n_comps,
            seed=seed,
            normalisation=normalisation,
            target_sum=target_sum,
            lam=lam,
            k_geom=k_geom,
            agf=agf,
        )
    else:
        X = normalise_counts(counts, groups, method=normalisation)
        M = augment_expression(
            X, coords, groups, lam=lam, k_geom=k_geom, agf=agf, scale_groups=scale_groups
        )
        del X
        adata.obsm[key_added] = dense_pca(M, n_comps=n_comps, seed=seed)
    logger.info(
        "neighbourhood-augmented expression: %d genes, λ %.2f, %d neighbours%s, %s, "
        "z-scored within %s -> obsm['%s']",
        int(hvg.sum()),
        lam,
        k_geom,
        " + AGF" if agf and lam > 0 else "",
        normalisation,
        scale_by or "the cohort",
        key_added,
    )
    adata.uns.setdefault(K.UNS, {})["spatial_expression"] = {
        "lambda": lam,
        "k_geom": k_geom,
        "agf": agf,
        "normalisation": normalisation,
        "scale_by": scale_by,
        "n_comps": n_comps,
        "seed": seed,
    }


def spatial_embedding(
    adata: ad.AnnData,
    *,
    basis: str = K.EXPRESSION_INPUT,
    lam: float = 0.2,
    k_geom: int = 18,
    agf: bool = True,
    scale_by: str | None = K.SAMPLE,
    n_comps: int = 20,
    seed: int = 0,
    key_added: str = K.SPATIAL_PCA,
) -> str:
    """PCA of the neighbourhood-augmented columns of an embedding -> ``obsm[key_added]``.

    :func:`spatial_expression` for an expression embedding instead of the HVG counts (e.g. a
    foundation model's, see :func:`spatlas.pp.use_expression_embedding`): its columns take the
    place of the normalised genes in :func:`augment_expression`.

    Parameters
    ----------
    adata
        Cohort with ``obsm[basis]``, ``obsm['spatial']`` and ``obs['sample']`` (neighbours never
        cross samples).
    basis
        obsm key of the embedding.
    lam
        λ, the neighbourhood's share of the variance (0: the spot's own embedding only).
    k_geom
        Neighbours of the Gaussian mean (the AGF uses twice as many).
    agf
        Include the azimuthal Gabor (gradient) block.
    scale_by
        obs column within which every block is z-scored (``None``: over the whole cohort).
    n_comps
        Number of principal components (at most the augmented columns - 1).
    seed
        Seed of the randomised SVD.
    key_added
        obsm key of the scores.

    Returns
    -------
    The obsm key written. Writes ``obsm[key_added]`` (float32) and
    ``uns['spatlas']['spatial_expression']`` (its settings, ``basis`` among them).
    """
    for what, ok in (
        (f"obsm['{basis}']", basis in adata.obsm),
        ("obsm['spatial']", K.SPATIAL in adata.obsm),
    ):
        if not ok:
            raise SpatlasInputError(f"spatial_embedding needs {what}")
    if scale_by is not None and scale_by not in adata.obs:
        raise SpatlasInputError(f"scale_by '{scale_by}' is not an obs column")
    X = np.asarray(adata.obsm[basis], dtype=np.float32)
    groups = adata.obs[K.SAMPLE].to_numpy() if K.SAMPLE in adata.obs else None
    scale_groups = None if scale_by is None else adata.obs[scale_by].to_numpy()
    coords = np.asarray(adata.obsm[K.SPATIAL], dtype=np.float64)[:, :2]
    M = augment_expression(
        X, coords, groups, lam=lam, k_geom=k_geom, agf=agf, scale_groups=scale_groups
    )
    n_comps = max(1, min(n_comps, min(M.shape) - 1))
    adata.obsm[key_added] = dense_pca(M, n_comps=n_comps, seed=seed)
    logger.info(
        "neighbourhood-augmented obsm['%s']: %d columns, λ %.2f, %d neighbours%s, "
        "z-scored within %s -> obsm['%s']",
        basis,
        X.shape[1],
        lam,
        k_geom,
        " + AGF" if agf and lam > 0 else "",
        scale_by or "the cohort",
        key_added,
    )
    adata.uns.setdefault(K.UNS, {})["spatial_expression"] = {
        "basis": basis,
        "lambda": lam,
        "k_geom": k_geom,
        "agf": agf,
        "scale_by": scale_by,
        "n_comps": n_comps,
        "seed": seed,
    }
    return key_added
