"""Seurat-v3 highly variable genes on sparse counts, in row chunks (scanpy's numbers, less memory).

scanpy's ``highly_variable_genes(flavor="seurat_v3", batch_key=...)`` copies each batch's rows and
computes their statistics one batch at a time. Here one pass over row chunks accumulates, per
batch and gene, the sum and the sum of squares of the counts (a batch-indicator matrix times the
chunk), the LOESS fit of log variance on log mean runs per batch as in scanpy (``skmisc``), and a
second pass accumulates the sums of the counts clipped at ``mean + sqrt(n) * sd_fit``. Memory:
one chunk's temporaries plus ``batches x genes`` sums. Ranks, ties and the selection follow
scanpy 1.11's ``_highly_variable_genes_seurat_v3`` (tested against it). Where scanpy's LOESS
fails ("svddc failed in l2fit": a small batch with many genes of the same few counts), the fit
is repeated with a wider span (``LOESS_RETRY_SPANS``) and a warning says so.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import SpatlasInputError
from .._logging import logger

#: Wider LOESS spans tried, in turn, when the fit fails in a batch (scanpy then raises
#: "svddc failed in l2fit": many genes with the same few counts in a small batch).
LOESS_RETRY_SPANS = (0.5, 0.8, 1.0)
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


def accumulate(
    chunk: sp.csr_matrix,
    codes: np.ndarray,
    total: np.ndarray,
    squares: np.ndarray,
    clip: np.ndarray | None = None,
) -> None:
    """Add one row chunk's per-batch, per-gene sums (and sums of squares) into the arrays.

    ``codes``: the batch of each of the chunk's rows; ``total`` / ``squares``: ``(batches,
    genes)`` float64 accumulators; ``clip``: ``(batches, genes)`` upper bounds of the values.
    """
    n_batches, n_genes = total.shape
    rows = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))
    cols = chunk.indices
    values = chunk.data.astype(np.float64)
    batch = codes[rows]
    if clip is not None:
        np.minimum(values, clip[batch, cols], out=values)
    flat = batch.astype(np.int64) * n_genes + cols
    size = n_batches * n_genes
    total += np.bincount(flat, weights=values, minlength=size).reshape(n_batches, n_genes)
    squares += np.bincount(flat, weights=values * values, minlength=size).reshape(
        n_batches, n_genes
    )


def _chunks(X: sp.csr_matrix, chunk_nnz: int):
    for start, stop in row_chunks(X, chunk_nnz):
        yield start, stop, X[start:stop]


def _mean_var(s: np.ndarray, q: np.ndarray, m) -> tuple[np.ndarray, np.ndarray]:
    mean = s / m
    var = (q / m - mean**2) * (m / np.maximum(m - 1, 1))
    return mean, var


class LoessFit(NamedTuple):
    """Per batch: spots, gene means, fitted standard deviations and the clip values."""

    counts: np.ndarray
    mean: np.ndarray
    reg_std: np.ndarray
    clip: np.ndarray


def loess_fit(total: np.ndarray, squares: np.ndarray, counts: np.ndarray, span: float = 0.3):
    """Seurat v3's LOESS of log variance on log mean per batch, and its clip values."""
    from skmisc.loess import loess  # a core dependency (scanpy's seurat_v3 needs it too)

    counts = np.asarray(counts, dtype=np.float64).reshape(-1, 1)
    bmean, bvar = _mean_var(total, squares, counts)
    reg_std = np.zeros_like(bmean)
    clip = np.empty_like(bmean)
    for b in range(bmean.shape[0]):
        not_const = bvar[b] > 0
        fitted = np.zeros(bmean.shape[1])
        x, y = np.log10(bmean[b, not_const]), np.log10(bvar[b, not_const])
        for attempt in (span, *(w for w in LOESS_RETRY_SPANS if w > span)):
            try:
                model = loess(x, y, span=attempt, degree=2)
                model.fit()
                break
            except ValueError as err:  # "svddc failed in l2fit": too few distinct means
                if attempt >= max(span, *LOESS_RETRY_SPANS):
                    raise SpatlasInputError(
                        f"highly variable genes: the LOESS of batch {b} failed ({err}); the "
                        "batch has too few spots or detected genes for Seurat v3: raise "
                        "preprocessing.min_spots or use preprocessing.batch_key: null"
                    ) from None
                logger.warning(
                    "highly variable genes: LOESS (span %.2f) failed in batch %d (%d spots, "
                    "many genes with the same few counts); refitted with a wider span",
                    attempt,
                    b,
                    int(counts[b, 0]),
                )
        fitted[not_const] = model.outputs.fitted_values
        reg_std[b] = np.sqrt(10**fitted)
        clip[b] = reg_std[b] * np.sqrt(counts[b, 0]) + bmean[b]
    return LoessFit(counts, bmean, reg_std, clip)


def select_hvg(
    fit: LoessFit,
    ctotal: np.ndarray,
    csquares: np.ndarray,
    means: np.ndarray,
    variances: np.ndarray,
    n_top_genes: int,
) -> pd.DataFrame:
    """Normalised variances from the clipped sums, ranks per batch and scanpy's selection."""
    m, bmean, reg_std = fit.counts, fit.mean, fit.reg_std
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
    hv = np.zeros(len(df), dtype=bool)
    hv[order[: int(n_top_genes)]] = True
    df["highly_variable"] = hv
    return df


def batch_codes(batches: np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """Batch code of each spot in sorted batch order (as scanpy's ``np.unique``), and the count."""
    if batches is None:
        return np.zeros(n, dtype=np.int64), 1
    uniques, codes = np.unique(np.asarray(batches), return_inverse=True)
    return codes.astype(np.int64), int(uniques.size)


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
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(X)
    n, n_genes = X.shape
    codes, n_batches = batch_codes(batches, n)
    counts = np.bincount(codes, minlength=n_batches)
    total, squares = np.zeros((n_batches, n_genes)), np.zeros((n_batches, n_genes))
    for start, stop, chunk in _chunks(X, chunk_nnz):
        accumulate(chunk, codes[start:stop], total, squares)
    means, variances = _mean_var(total.sum(0), squares.sum(0), float(n))
    fit = loess_fit(total, squares, counts, span)
    ctotal, csquares = np.zeros_like(total), np.zeros_like(squares)
    for start, stop, chunk in _chunks(X, chunk_nnz):
        accumulate(chunk, codes[start:stop], ctotal, csquares, clip=fit.clip)
    return select_hvg(fit, ctotal, csquares, means, variances, n_top_genes)
