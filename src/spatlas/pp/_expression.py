"""Transcriptomics preprocessing as in the paper (appendix A.5).

Genes filtered -> HVG (Seurat v3 on counts) -> normalise -> log1p -> scale -> PCA.
"""

from __future__ import annotations

from typing import NamedTuple

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger
from ..io._validate import check_counts


def _column_mean_std(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and standard deviation (ddof=1, as scanpy's ``scale``) of a sparse matrix."""
    n = X.shape[0]
    mean = np.asarray(X.mean(axis=0), dtype=np.float64).ravel()
    sq = np.asarray(X.multiply(X).mean(axis=0), dtype=np.float64).ravel()
    var = (sq - mean**2) * (n / max(n - 1, 1))
    std = np.sqrt(np.clip(var, 0, None))
    std[std == 0] = 1.0  # constant genes scale to 0, as scanpy does
    return mean, std


class PCAResult(NamedTuple):
    """Scores (n, k) float32, loadings (genes, k), variance and variance ratio per component."""

    scores: np.ndarray
    loadings: np.ndarray
    variance: np.ndarray
    variance_ratio: np.ndarray


def scaled_pca(
    X: sp.spmatrix | np.ndarray,
    *,
    n_comps: int = 20,
    max_value: float | None = None,
    seed: int = 0,
) -> PCAResult:
    """PCA of the z-scored columns of ``X`` without densifying a sparse ``X``.

    Centring and scaling are applied implicitly through a linear operator, so memory stays
    linear in the number of non-zeros; with ``max_value`` (clipping of z-scores) the scaled
    matrix is built densely instead.

    Returns
    -------
    :class:`PCAResult`. Signs are fixed so that each component's largest-magnitude loading is
    positive (deterministic across runs and solvers).
    """
    from scipy.sparse.linalg import LinearOperator, svds

    X = sp.csr_matrix(X, dtype=np.float64) if not sp.issparse(X) else X.tocsr().astype(np.float64)
    n, g = X.shape
    if n_comps >= min(n, g):
        raise SpatlasInputError(
            f"PCA needs n_comps < min(spots, genes) = {min(n, g)}; got n_comps={n_comps}"
        )
    mean, std = _column_mean_std(X)
    inv = 1.0 / std
    if max_value is not None:
        Z = (X.toarray() - mean) * inv
        np.clip(Z, -max_value, max_value, out=Z)
        total_variance = float(Z.var(axis=0, ddof=1).sum())
        op = Z
    else:
        # every non-constant z-scored gene has variance 1
        total_variance = float(np.count_nonzero(X.max(axis=0).toarray() != X.min(axis=0).toarray()))
        Xs = X @ sp.diags(inv)
        shift = mean * inv  # the implicit column centring of the scaled matrix

        def matvec(v: np.ndarray) -> np.ndarray:
            v = np.asarray(v).reshape(-1)
            return Xs @ v - shift @ v

        def rmatvec(u: np.ndarray) -> np.ndarray:
            u = np.asarray(u).reshape(-1)
            return Xs.T @ u - shift * u.sum()

        def matmat(V: np.ndarray) -> np.ndarray:
            return Xs @ V - np.outer(np.ones(n), shift @ V)

        def rmatmat(U: np.ndarray) -> np.ndarray:
            return Xs.T @ U - np.outer(shift, U.sum(axis=0))

        op = LinearOperator(
            (n, g),
            matvec=matvec,
            rmatvec=rmatvec,
            matmat=matmat,
            rmatmat=rmatmat,
            dtype=np.float64,
        )
    v0 = np.random.default_rng(seed).standard_normal(min(n, g))
    U, S, Vt = svds(op, k=n_comps, v0=v0, solver="arpack")
    order = np.argsort(S)[::-1]
    U, S, Vt = U[:, order], S[order], Vt[order]
    signs = np.sign(Vt[np.arange(n_comps), np.abs(Vt).argmax(axis=1)])
    U, Vt = U * signs, Vt * signs[:, None]
    variance = S**2 / (n - 1)
    return PCAResult((U * S).astype(np.float32), Vt.T, variance, variance / total_variance)


def preprocess_expression(
    adata: ad.AnnData,
    *,
    min_spots: int = 10,
    n_top_genes: int = 3000,
    hvg_flavor: str = "seurat_v3",
    batch_key: str | None = K.SAMPLE,
    target_sum: float = 1e4,
    scale_max_value: float | None = None,
    n_comps: int = 20,
    seed: int = 0,
    key_added: str = K.PCA,
) -> None:
    """Paper preprocessing of raw counts, in place (MISSION §2.1).

    Drops genes detected in fewer than ``min_spots`` spots; selects ``n_top_genes`` highly
    variable genes (Seurat v3 flavour on the counts, ``batch_key`` as batch); normalises each
    spot to ``target_sum`` counts, log1p; z-scores the HVGs (clipped at ``scale_max_value`` if
    given) and takes ``n_comps`` principal components fitted on all samples pooled.

    Parameters
    ----------
    adata
        Cohort with raw counts in ``X`` (or in ``layers['counts']``).
    min_spots
        Minimum number of spots a gene must be detected in.
    n_top_genes
        Number of HVGs; all genes are used when fewer remain.
    hvg_flavor
        scanpy ``highly_variable_genes`` flavour (``seurat_v3`` works on counts).
    batch_key
        obs column used as HVG batch (``None`` for none).
    target_sum
        Counts per spot after normalisation.
    scale_max_value
        Clip z-scores to this value (``None``: no clipping, as in scanpy's default).
    n_comps
        Number of principal components.
    seed
        Seed of the PCA solver's start vector.
    key_added
        obsm key of the PCA scores.

    Returns
    -------
    None. Writes ``layers['counts']`` (raw counts of the kept genes), ``X`` (log-normalised),
    ``var['highly_variable']``, ``obsm[key_added]`` (float32), ``varm['PCs']``,
    ``uns['pca']`` (variance, variance_ratio) and ``uns['spatlas']['preprocessing']``.
    Genes failing ``min_spots`` are removed from ``adata``.
    """
    import scanpy as sc

    if K.COUNTS not in adata.layers:
        problems = check_counts(adata.X, where="adata.X")
        if problems:
            raise SpatlasInputError(
                [*problems, "preprocess_expression needs raw counts in X or layers['counts']"]
            )
        adata.layers[K.COUNTS] = adata.X.copy()
    if batch_key is not None and batch_key not in adata.obs:
        raise SpatlasInputError(
            f"batch_key '{batch_key}' is not an obs column (columns: {', '.join(adata.obs)})"
        )
    counts = adata.layers[K.COUNTS]
    detected = np.asarray((counts > 0).sum(axis=0)).ravel()
    keep = detected >= min_spots
    logger.info("genes: keeping %d of %d detected in >= %d spots", keep.sum(), keep.size, min_spots)
    if keep.sum() <= n_comps:
        raise SpatlasInputError(
            f"only {keep.sum()} genes are detected in >= {min_spots} spots; lower min_spots "
            f"or check the counts"
        )
    if not keep.all():
        adata._inplace_subset_var(keep)

    n_hvg = min(n_top_genes, adata.n_vars)
    if n_hvg >= adata.n_vars:
        logger.info("using all %d genes (n_top_genes=%d)", adata.n_vars, n_top_genes)
        adata.var[K.HVG] = True
    else:
        batches = batch_key if batch_key and adata.obs[batch_key].nunique() > 1 else None
        sc.pp.highly_variable_genes(
            adata,
            n_top_genes=n_hvg,
            flavor=hvg_flavor,
            batch_key=batches,
            layer=K.COUNTS,
        )
        logger.info("selected %d highly variable genes (%s)", adata.var[K.HVG].sum(), hvg_flavor)

    X = sp.csr_matrix(adata.layers[K.COUNTS], dtype=np.float32)
    totals = np.asarray(X.sum(axis=1)).ravel()
    if (totals == 0).any():
        logger.warning("%d spots have no counts on the kept genes", int((totals == 0).sum()))
    factors = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    X = sp.diags(factors.astype(np.float32)) @ X
    X.data = np.log1p(X.data)
    adata.X = X.tocsr()

    hvg = adata.var[K.HVG].to_numpy()
    pca = scaled_pca(adata.X[:, hvg], n_comps=n_comps, max_value=scale_max_value, seed=seed)
    adata.obsm[key_added] = pca.scores
    pcs = np.zeros((adata.n_vars, n_comps), dtype=np.float32)
    pcs[hvg] = pca.loadings
    adata.varm["PCs"] = pcs
    adata.uns["pca"] = {"variance": pca.variance, "variance_ratio": pca.variance_ratio}
    adata.uns.setdefault(K.UNS, {})["preprocessing"] = {
        "min_spots": min_spots,
        "n_top_genes": n_top_genes,
        "hvg_flavor": hvg_flavor,
        "batch_key": batch_key,
        "target_sum": target_sum,
        "scale_max_value": scale_max_value,
        "n_comps": n_comps,
        "seed": seed,
        "key_added": key_added,
    }
