"""Transcriptomics preprocessing as in the paper (appendix A.5).

Genes filtered -> HVG (Seurat v3 on counts) -> normalise -> log1p -> scale -> PCA.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger
from ..io._stream import stack_rows
from ..io._validate import check_counts
from ._hvg import row_chunks, seurat_v3_hvg


def _column_mean_std(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and standard deviation (ddof=1, as scanpy's ``scale``) of a sparse matrix."""
    n = X.shape[0]
    mean = np.asarray(X.mean(axis=0), dtype=np.float64).ravel()
    sq = np.asarray(X.multiply(X).mean(axis=0), dtype=np.float64).ravel()
    var = (sq - mean**2) * (n / max(n - 1, 1))
    std = np.sqrt(np.clip(var, 0, None))
    std[std == 0] = 1.0  # constant genes scale to 0, as scanpy does
    return mean, std


def _canonical_csr(X: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """``X`` as float32 CSR with sorted, unique indices and no stored zeros (in place if it is)."""
    if not sp.issparse(X) or X.format != "csr":
        X = sp.csr_matrix(X)
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    if not X.has_canonical_format:
        X.sum_duplicates()
    if X.nnz and not X.data.all():
        X.eliminate_zeros()
    return X


def _detected(X: sp.spmatrix | np.ndarray) -> np.ndarray:
    """Spots in which each gene has a positive count (row chunks: small temporaries)."""
    if not sp.issparse(X):
        return np.asarray((np.asarray(X) > 0).sum(axis=0)).ravel()
    X = X.tocsr()
    detected = np.zeros(X.shape[1], dtype=np.int64)
    for start, stop in row_chunks(X):
        lo, hi = X.indptr[start], X.indptr[stop]
        positive = X.data[lo:hi] > 0
        detected += np.bincount(X.indices[lo:hi][positive], minlength=X.shape[1])
    return detected


def drop_columns(X: sp.csr_matrix, keep: np.ndarray, *, in_place: bool = False) -> sp.csr_matrix:
    """``X[:, keep]``, computed row chunk by row chunk.

    With ``in_place``, the kept entries move forward inside ``X``'s own arrays (a write never
    overtakes a read) and the result is a view of their first part, so memory never exceeds ``X``
    plus one chunk (the genes dropped for being detected in fewer than ``min_spots`` spots hold
    few entries, so little is left unused); ``X`` is no longer valid afterwards. Otherwise new
    arrays are filled.
    """
    keep = np.asarray(keep, dtype=bool)
    renumber = (np.cumsum(keep) - 1).astype(X.indices.dtype)
    indptr = X.indptr
    kept_per_row = np.zeros(X.shape[0], dtype=np.int64)
    for start, stop in row_chunks(X):
        lo, hi = int(indptr[start]), int(indptr[stop])
        rows = np.repeat(np.arange(stop - start), np.diff(indptr[start : stop + 1]))
        kept_per_row[start:stop] = np.bincount(rows[keep[X.indices[lo:hi]]], minlength=stop - start)
    new_indptr = np.zeros_like(indptr)
    np.cumsum(kept_per_row, out=new_indptr[1:])
    total = int(new_indptr[-1])
    data = X.data if in_place else np.empty(total, dtype=X.data.dtype)
    indices = X.indices if in_place else np.empty(total, dtype=X.indices.dtype)
    for start, stop in row_chunks(X):
        lo, hi = int(indptr[start]), int(indptr[stop])
        kept = keep[X.indices[lo:hi]]
        values, columns = X.data[lo:hi][kept], renumber[X.indices[lo:hi][kept]]
        write = int(new_indptr[start])
        data[write : write + values.size] = values
        indices[write : write + values.size] = columns
    return sp.csr_matrix(
        (data[:total], indices[:total], new_indptr), shape=(X.shape[0], int(keep.sum()))
    )


def log_normalised(counts: sp.csr_matrix, *, target_sum: float = 1e4) -> sp.csr_matrix:
    """``log1p(counts / total * target_sum)`` per spot, float32, sharing ``counts``' indices.

    The result has the sparsity pattern of the (canonical, see :func:`_canonical_csr`) counts, so
    only its values are new: it holds the counts' ``indices`` / ``indptr`` arrays, and the
    normalised matrix costs 4 bytes per non-zero instead of 8. The values are computed row chunk
    by row chunk, in place.
    """
    counts = _canonical_csr(counts)
    totals = np.zeros(counts.shape[0], dtype=np.float32)
    data = counts.data.copy()
    for start, stop in row_chunks(counts):
        lo, hi = counts.indptr[start], counts.indptr[stop]
        sizes = np.diff(counts.indptr[start : stop + 1])
        part = data[lo:hi]
        rows = np.repeat(np.arange(stop - start), sizes)
        totals[start:stop] = np.bincount(rows, weights=part, minlength=stop - start)
        factors = np.divide(
            np.float32(target_sum),
            totals[start:stop],
            out=np.zeros(stop - start, dtype=np.float32),
            where=totals[start:stop] > 0,
        )
        part *= np.repeat(factors, sizes)
        np.log1p(part, out=part)
    if (totals == 0).any():
        logger.warning("%d spots have no counts on the kept genes", int((totals == 0).sum()))
    return sp.csr_matrix((data, counts.indices, counts.indptr), shape=counts.shape, copy=False)


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
    columns: np.ndarray | None = None,
    fit_spots: int | None = None,
    seed: int = 0,
) -> PCAResult:
    """PCA of the z-scored columns of ``X`` without densifying a sparse ``X``.

    Centring and scaling are applied implicitly through a linear operator, so memory stays
    linear in the number of non-zeros; with ``max_value`` (clipping of z-scores) the scaled
    matrix is built densely instead. ``columns`` (a boolean mask, e.g. the HVGs) restricts the
    PCA to those columns. Above ``PCA_BLOCKS_NNZ`` non-zeros a sparse ``X`` is multiplied one
    row chunk at a time (no copy of the matrix; the same components up to rounding). With more
    than ``fit_spots`` spots, the components are fitted on a deterministic random subsample of
    that many spots and every spot is projected on them (see :func:`_blocked_scaled_pca`).

    Returns
    -------
    :class:`PCAResult`. Signs are fixed so that each component's largest-magnitude loading is
    positive (deterministic across runs and solvers).
    """
    from scipy.sparse.linalg import LinearOperator, svds

    large = sp.issparse(X) and X.nnz > PCA_BLOCKS_NNZ
    if max_value is None and (large or (fit_spots is not None and X.shape[0] > fit_spots)):
        X = X if sp.issparse(X) and X.format == "csr" else sp.csr_matrix(X)
        return _blocked_scaled_pca(X, columns, n_comps=n_comps, seed=seed, fit_spots=fit_spots)
    if columns is not None and not np.all(columns):
        X = X[:, columns]
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


#: Above this many non-zeros, :func:`scaled_pca` multiplies ``X`` one row chunk at a time (no
#: float64 copy of the matrix; the same components up to rounding).
PCA_BLOCKS_NNZ = 2**25
#: Default of ``preprocess_expression(pca_max_spots=...)``: above this many spots the PCA is
#: fitted on a subsample of this many and every spot projected (a 1 M-spot cohort: about 20 s
#: instead of several minutes). Every benchmark cohort is below it.
PCA_MAX_SPOTS = 200_000


def _chunk_views(X: sp.csr_matrix) -> list[tuple[int, int, sp.csr_matrix]]:
    """``(start, stop, X[start:stop])`` per row chunk, the chunks sharing ``X``'s arrays."""
    views = []
    for start, stop in row_chunks(X, 4_000_000):
        lo, hi = int(X.indptr[start]), int(X.indptr[stop])
        # set the arrays directly: the constructor's format check "prunes" a view smaller than
        # half its base into a copy, which would duplicate the whole matrix chunk by chunk
        block = sp.csr_matrix((stop - start, X.shape[1]), dtype=X.dtype)
        block.data, block.indices = X.data[lo:hi], X.indices[lo:hi]
        block.indptr = (X.indptr[start : stop + 1] - lo).astype(X.indices.dtype)
        views.append((start, stop, block))
    return views


def _select(X: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> sp.csr_matrix:
    """``X[rows][:, cols]`` (``rows`` sorted) built one row chunk at a time."""
    pieces = []
    for start, stop, block in _chunk_views(X):
        a, b = np.searchsorted(rows, [start, stop])
        if b > a:
            pieces.append(block[rows[a:b] - start][:, cols].astype(np.float32))
    return stack_rows(pieces, cols.size)


class _Scaled:
    """The implicitly z-scored columns ``cols`` of a CSR matrix, multiplied chunk by chunk."""

    def __init__(self, X: sp.csr_matrix, cols: np.ndarray, mean: np.ndarray, inv: np.ndarray):
        self.views, self.cols, self.n, self.g_all = _chunk_views(X), cols, X.shape[0], X.shape[1]
        self.inv, self.shift = inv, mean * inv

    def matmat(self, V: np.ndarray) -> np.ndarray:
        W = np.zeros((self.g_all, V.shape[1]))
        W[self.cols] = self.inv[:, None] * V
        out = np.empty((self.n, V.shape[1]))
        for start, stop, block in self.views:
            out[start:stop] = block @ W
        return out - (self.shift @ V)[None, :]

    def rmatmat(self, U: np.ndarray) -> np.ndarray:
        out = np.zeros((self.g_all, U.shape[1]))
        for start, stop, block in self.views:
            out += block.T @ U[start:stop]
        return self.inv[:, None] * out[self.cols] - np.outer(self.shift, U.sum(axis=0))

    def operator(self):
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(
            (self.n, self.cols.size),
            matvec=lambda v: self.matmat(np.asarray(v).reshape(-1, 1)).ravel(),
            rmatvec=lambda u: self.rmatmat(np.asarray(u).reshape(-1, 1)).ravel(),
            matmat=self.matmat,
            rmatmat=self.rmatmat,
            dtype=np.float64,
        )


def _svd(op, n_comps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ARPACK's truncated SVD of ``op``, largest first, signs fixed by the largest loading."""
    from scipy.sparse.linalg import svds

    v0 = np.random.default_rng(seed).standard_normal(min(op.shape))
    U, S, Vt = svds(op, k=n_comps, v0=v0, solver="arpack")
    order = np.argsort(S)[::-1]
    U, S, Vt = U[:, order], S[order], Vt[order]
    signs = np.sign(Vt[np.arange(n_comps), np.abs(Vt).argmax(axis=1)])
    return U * signs, S, Vt * signs[:, None]


def _components(op, n_comps: int, seed: int) -> np.ndarray:
    """The ``(n_comps, genes)`` loadings of :func:`_svd`."""
    return _svd(op, n_comps, seed)[2]


def _blocked_scaled_pca(
    X: sp.csr_matrix,
    columns: np.ndarray | None,
    *,
    n_comps: int,
    seed: int,
    fit_spots: int | None = None,
) -> PCAResult:
    """:func:`scaled_pca` of a large sparse ``X``, multiplied one row chunk at a time.

    The z-scoring stays implicit (the scale folds into the vectors multiplied, the centring is
    a rank-one correction), the columns are selected by zero rows of those vectors (no copy of
    ``X[:, columns]``), each chunk is upcast only while it is multiplied, and the statistics are
    accumulated in float64 chunk by chunk. With more than ``fit_spots`` spots, the components are
    fitted on a deterministic random subsample of ``fit_spots`` spots (z-scored with the whole
    cohort's means and deviations) and every spot is then projected on them; the variances are
    those of the projected scores.
    """
    n, g_all = X.shape
    cols = np.flatnonzero(np.ones(g_all, dtype=bool) if columns is None else columns)
    g = cols.size
    if n_comps >= min(n, g):
        raise SpatlasInputError(
            f"PCA needs n_comps < min(spots, genes) = {min(n, g)}; got n_comps={n_comps}"
        )
    total = np.zeros(g_all)
    squares = np.zeros(g_all)
    for _, _, block in _chunk_views(X):
        values = block.data.astype(np.float64)
        total += np.bincount(block.indices, weights=values, minlength=g_all)
        squares += np.bincount(block.indices, weights=values * values, minlength=g_all)
    mean = total[cols] / n
    var = (squares[cols] / n - mean**2) * (n / max(n - 1, 1))
    std = np.sqrt(np.clip(var, 0, None))
    constant = std == 0
    std[constant] = 1.0
    total_variance = float(np.count_nonzero(~constant))
    inv = 1.0 / std
    whole = _Scaled(X, cols, mean, inv)
    subsampled = fit_spots is not None and n > fit_spots
    if subsampled:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=fit_spots, replace=False))
        fit = _select(X, rows, cols)
        logger.info(
            "PCA fitted on a deterministic subsample of %d of %d spots, then every spot projected",
            fit_spots,
            n,
        )
        op = _Scaled(fit, np.arange(g), mean, inv).operator()
    else:
        op = whole.operator()
    U, S, Vt = _svd(op, n_comps, seed)
    if subsampled:
        scores = whole.matmat(Vt.T)
        variance = scores.var(axis=0, ddof=1)
    else:
        scores = U * S
        variance = S**2 / (n - 1)
    return PCAResult(scores.astype(np.float32), Vt.T, variance, variance / total_variance)


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
    pca_max_spots: int | None = PCA_MAX_SPOTS,
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
    pca_max_spots
        Above this many spots, the PCA is fitted on a deterministic random subsample of this many
        spots and every spot is projected on its components (``None``: always fitted on all).
    seed
        Seed of the PCA solver's start vector (and of that subsample).
    key_added
        obsm key of the PCA scores.

    Returns
    -------
    None. Writes ``layers['counts']`` (raw counts of the kept genes), ``X`` (log-normalised),
    ``var['highly_variable']``, ``obsm[key_added]`` (float32), ``varm['PCs']``,
    ``uns['pca']`` (variance, variance_ratio) and ``uns['spatlas']['preprocessing']``.
    Genes failing ``min_spots`` are removed from ``adata``.
    """
    if batch_key is not None and batch_key not in adata.obs:
        raise SpatlasInputError(
            f"batch_key '{batch_key}' is not an obs column (columns: {', '.join(adata.obs)})"
        )
    counts_in_x = K.COUNTS not in adata.layers
    if counts_in_x:
        problems = check_counts(adata.X, where="adata.X")
        if problems:
            raise SpatlasInputError(
                [*problems, "preprocess_expression needs raw counts in X or layers['counts']"]
            )
    detected = _detected(adata.X if counts_in_x else adata.layers[K.COUNTS])
    keep = detected >= min_spots
    logger.info("genes: keeping %d of %d detected in >= %d spots", keep.sum(), keep.size, min_spots)
    if keep.sum() <= n_comps:
        raise SpatlasInputError(
            f"only {keep.sum()} genes are detected in >= {min_spots} spots; lower min_spots "
            f"or check the counts"
        )
    if not keep.all():
        if counts_in_x and sp.issparse(adata.X) and adata.X.format == "csr":
            # scipy's column indexing would hold the counts two to three times over
            X, adata.X = adata.X, None
            adata._inplace_subset_var(keep)
            # in place unless someone else (the caller) holds the matrix: the references are
            # then only X and getrefcount's argument
            alone = sys.getrefcount(X) <= 2
            adata.X = drop_columns(X, keep, in_place=alone)
            del X
        else:
            adata._inplace_subset_var(keep)
    if counts_in_x:  # one matrix: the counts, shared with the normalised X below
        adata.X = _canonical_csr(adata.X)
        adata.layers[K.COUNTS] = adata.X
    else:
        adata.layers[K.COUNTS] = _canonical_csr(adata.layers[K.COUNTS])
    counts = adata.layers[K.COUNTS]

    n_hvg = min(n_top_genes, adata.n_vars)
    if n_hvg >= adata.n_vars:
        logger.info("using all %d genes (n_top_genes=%d)", adata.n_vars, n_top_genes)
        adata.var[K.HVG] = True
    else:
        batches = batch_key if batch_key and adata.obs[batch_key].nunique() > 1 else None
        if hvg_flavor == "seurat_v3":
            stats = seurat_v3_hvg(
                counts,
                None if batches is None else adata.obs[batches].to_numpy(),
                n_top_genes=n_hvg,
            )
            columns = ["highly_variable", "highly_variable_rank", "means", "variances"]
            columns += ["variances_norm"] + (["highly_variable_nbatches"] if batches else [])
            for column in columns:
                adata.var[column] = stats[column].to_numpy()
            adata.uns["hvg"] = {"flavor": hvg_flavor}
        else:
            import scanpy as sc

            sc.pp.highly_variable_genes(
                adata,
                n_top_genes=n_hvg,
                flavor=hvg_flavor,
                batch_key=batches,
                layer=K.COUNTS,
            )
        logger.info("selected %d highly variable genes (%s)", adata.var[K.HVG].sum(), hvg_flavor)

    adata.X = log_normalised(counts, target_sum=target_sum)
    hvg = adata.var[K.HVG].to_numpy()
    pca = scaled_pca(
        adata.X,
        columns=hvg,
        n_comps=n_comps,
        max_value=scale_max_value,
        fit_spots=pca_max_spots,
        seed=seed,
    )
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
        "pca_max_spots": pca_max_spots,
        "pca_fit_spots": adata.n_obs if pca_max_spots is None else min(adata.n_obs, pca_max_spots),
        "seed": seed,
        "key_added": key_added,
    }
