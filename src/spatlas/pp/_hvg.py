"""Seurat-v3 highly variable genes on sparse counts, in row chunks (scanpy's numbers, less memory).

scanpy's ``highly_variable_genes(flavor="seurat_v3", batch_key=...)`` copies each batch's rows and
computes their statistics one batch at a time. Here one pass over row chunks accumulates, per
batch and gene, the sum and the sum of squares of the counts (a batch-indicator matrix times the
chunk), the LOESS fit of log variance on log mean runs per batch as in scanpy (``skmisc``), and a
second pass accumulates the sums of the counts clipped at ``mean + sqrt(n) * sd_fit``. Memory:
one chunk's temporaries plus ``batches x genes`` sums. Ranks, ties and the selection follow
scanpy 1.11's ``_highly_variable_genes_seurat_v3`` (tested against it).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import scipy.sparse as sp

#: Non-zeros per chunk of rows (about 200 MB of temporaries).
CHUNK_NNZ = 4_000_000


def row_chunks(X: sp.csr_matrix, chunk_nnz: int = CHUNK_NNZ) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges holding about ``chunk_nnz`` non-zeros each (at least 1 row)."""
    n = X.shape[0]
    if n == 0:
        return []
    bounds = np.searchsorted(X.indptr, np.arange(0, X.nnz, max(chunk_nnz, 1)), side="right") - 1
    bounds = np.unique(np.concatenate([[0], np.clip(bounds, 0, n), [n]]))
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def _batch_sums(
    X: sp.csr_matrix,
    codes: np.ndarray,
    n_batches: int,
    clip: np.ndarray | None = None,
    chunk_nnz: int = CHUNK_NNZ,
) -> tuple[np.ndarray, np.ndarray]:
    """Per batch and gene: sum and sum of squares of ``X`` (of ``min(X, clip[batch])``)."""
    n_genes = X.shape[1]
    total = np.zeros((n_batches, n_genes))
    squares = np.zeros((n_batches, n_genes))
    for start, stop in row_chunks(X, chunk_nnz):
        ptr = X.indptr[start : stop + 1]
        lo, hi = int(ptr[0]), int(ptr[-1])
        rows = np.repeat(np.arange(stop - start), np.diff(ptr))
        cols = X.indices[lo:hi]
        values = X.data[lo:hi].astype(np.float64)
        batch = codes[start:stop][rows]
        if clip is not None:
            np.minimum(values, clip[batch, cols], out=values)
        flat = batch.astype(np.int64) * n_genes + cols
        total += np.bincount(flat, weights=values, minlength=n_batches * n_genes).reshape(
            n_batches, n_genes
        )
        squares += np.bincount(
            flat, weights=values * values, minlength=n_batches * n_genes
        ).reshape(n_batches, n_genes)
    return total, squares


def seurat_v3_hvg(
    X: sp.spmatrix,
    batches: np.ndarray | None,
    *,
    n_top_genes: int,
    span: float = 0.3,
    chunk_nnz: int = CHUNK_NNZ,
) -> pd.DataFrame:
    """Seurat-v3 HVG statistics of the counts ``X`` (spots x genes), batch by batch.

    Parameters
    ----------
    X
        Raw counts, CSR (other formats are converted).
    batches
        Batch of each spot (``None``: one batch).
    n_top_genes
        Number of genes flagged ``highly_variable``.
    span
        LOESS span.
    chunk_nnz
        Non-zeros per chunk of rows.

    Returns
    -------
    pandas.DataFrame
        One row per gene, columns ``means``, ``variances``, ``variances_norm``,
        ``highly_variable_rank``, ``highly_variable_nbatches``, ``highly_variable`` (scanpy's).
    """
    from skmisc.loess import loess  # a core dependency (scanpy's seurat_v3 needs it too)

    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(X)
    n, n_genes = X.shape
    if batches is None:
        codes, n_batches = np.zeros(n, dtype=np.int64), 1
    else:
        uniques, codes = np.unique(np.asarray(batches), return_inverse=True)
        n_batches = uniques.size
    counts = np.bincount(codes, minlength=n_batches).astype(np.float64)[:, None]
    total, squares = _batch_sums(X, codes, n_batches, chunk_nnz=chunk_nnz)

    def mean_var(s: np.ndarray, q: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = s / m
        var = (q / m - mean**2) * (m / np.maximum(m - 1, 1))
        return mean, var

    means, variances = mean_var(total.sum(0), squares.sum(0), float(n))
    bmean, bvar = mean_var(total, squares, counts)
    reg_std = np.zeros_like(bmean)
    clip = np.empty_like(bmean)
    for b in range(n_batches):
        not_const = bvar[b] > 0
        fitted = np.zeros(n_genes)
        model = loess(
            np.log10(bmean[b, not_const]), np.log10(bvar[b, not_const]), span=span, degree=2
        )
        model.fit()
        fitted[not_const] = model.outputs.fitted_values
        reg_std[b] = np.sqrt(10**fitted)
        clip[b] = reg_std[b] * np.sqrt(counts[b, 0]) + bmean[b]
    ctotal, csquares = _batch_sums(X, codes, n_batches, clip=clip, chunk_nnz=chunk_nnz)
    m = counts
    norm_vars = (1 / ((m - 1) * np.square(reg_std))) * (
        m * np.square(bmean) + csquares - 2 * ctotal * bmean
    )
    ranks = np.argsort(np.argsort(-norm_vars, axis=1), axis=1).astype(np.float32)
    nbatches = np.sum((ranks < n_top_genes).astype(int), axis=0)
    ranks[ranks >= n_top_genes] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)
    df = pd.DataFrame(
        {
            "means": means,
            "variances": variances,
            "variances_norm": norm_vars.mean(axis=0),
            "highly_variable_rank": median_rank,
            "highly_variable_nbatches": nbatches,
        }
    )
    order = (
        df[["highly_variable_rank", "highly_variable_nbatches"]]
        .sort_values(
            ["highly_variable_rank", "highly_variable_nbatches"],
            ascending=[True, False],
            na_position="last",
        )
        .index
    )
    hv = np.zeros(n_genes, dtype=bool)
    hv[order[: int(n_top_genes)]] = True
    df["highly_variable"] = hv
    return df
