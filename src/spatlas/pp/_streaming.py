"""The expression preprocessing of a cohort whose counts stay on disk (streaming mode).

:func:`preprocess_streaming` computes what :func:`spatlas.pp.preprocess_expression` computes -
genes detected in ``min_spots`` spots, Seurat-v3 HVGs per batch (the same sums, so the same
genes), normalisation to ``target_sum`` + log1p, and the PCA of the z-scored HVGs - in four
passes over the counts read from the ``.h5ad`` file in row chunks
(:class:`spatlas.io._stream.H5adCounts`):

1. counts checked, genes' detection, per-batch sums and sums of squares, spot totals;
2. the clipped sums of Seurat v3 and the totals of the genes dropped;
3. the normalised HVGs' means and deviations, and the rows of the PCA's fitting subsample;
4. every spot projected on the components.

Memory: per-spot vectors and one chunk, plus the fitting subsample (``pca_max_spots`` spots x
HVGs); the cohort's ``X`` stays ``None``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger
from .._progress import progress
from ..io._stream import H5adCounts, stack_rows
from ..io._validate import check_counts
from ._expression import PCA_MAX_SPOTS, _components, _Scaled
from ._hvg import accumulate, batch_codes, loess_fit, select_hvg


def _normalised(chunk: sp.csr_matrix, totals: np.ndarray, target_sum: float) -> sp.csr_matrix:
    """``log1p(chunk / total * target_sum)`` per row (float32, in place on the chunk's values)."""
    factors = np.divide(
        np.float32(target_sum),
        totals.astype(np.float32),
        out=np.zeros(totals.size, dtype=np.float32),
        where=totals > 0,
    )
    chunk.data *= np.repeat(factors, np.diff(chunk.indptr))
    np.log1p(chunk.data, out=chunk.data)
    return chunk


def preprocess_streaming(
    adata: ad.AnnData,
    counts: H5adCounts,
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
    """:func:`spatlas.pp.preprocess_expression` with the counts streamed from ``counts``.

    Parameters
    ----------
    adata
        The cohort without ``X`` (``X`` is ``None``), with ``obs['file_row']``: each spot's row
        in the file.
    counts
        The file's counts (:class:`spatlas.io._stream.H5adCounts`), with ``adata``'s genes as
        columns.
    min_spots, n_top_genes, hvg_flavor, batch_key, target_sum, scale_max_value, n_comps, seed
        As in :func:`spatlas.pp.preprocess_expression` (only ``hvg_flavor='seurat_v3'``, no
        ``scale_max_value``).
    key_added
        obsm key of the PCA scores.
    pca_max_spots
        Spots the PCA is fitted on (a deterministic subsample); every spot is then projected.
        ``None``: all spots (they are then all held in memory as normalised HVGs).

    Returns
    -------
    None. Writes ``obsm[key_added]``, ``var['highly_variable']`` and the HVG statistics,
    ``varm['PCs']``, ``uns['pca']`` and ``uns['spatlas']['preprocessing']`` (``streamed``:
    the file); genes failing ``min_spots`` are removed from ``var``. ``X`` stays ``None``.
    """
    if hvg_flavor != "seurat_v3" or scale_max_value is not None:
        raise SpatlasInputError(
            "streaming preprocessing supports hvg_flavor: seurat_v3 without scale_max_value "
            f"(got {hvg_flavor}, {scale_max_value})"
        )
    if K.FILE_ROW not in adata.obs:
        raise SpatlasInputError(f"preprocess_streaming needs obs['{K.FILE_ROW}']")
    n, n_genes = adata.n_obs, adata.n_vars
    if counts.shape != (n, n_genes):
        raise SpatlasInputError(
            f"{counts.path}: its counts are {counts.shape[0]} x {counts.shape[1]}, the cohort "
            f"{n} x {n_genes}"
        )
    to_cohort = np.empty(n, dtype=np.int64)
    to_cohort[adata.obs[K.FILE_ROW].to_numpy(dtype=np.int64)] = np.arange(n)
    batches = None
    if batch_key is not None:
        if batch_key not in adata.obs:
            raise SpatlasInputError(f"batch_key '{batch_key}' is not an obs column")
        if adata.obs[batch_key].nunique() > 1:
            batches = adata.obs[batch_key].to_numpy()
    codes, n_batches = batch_codes(batches, n)

    def passes(what: str):
        return progress(counts.chunks(), desc=f"streaming counts: {what}", total=None)

    # pass 1: checks, detection, per-batch sums, spot totals
    detected = np.zeros(n_genes, dtype=np.int64)
    total = np.zeros((n_batches, n_genes))
    squares = np.zeros((n_batches, n_genes))
    spot_totals = np.zeros(n)
    problems: list[str] = []
    for start, stop, chunk in passes("gene statistics"):
        rows = to_cohort[start:stop]
        if not problems:
            problems = check_counts(chunk, where=f"{counts.path} rows {start}-{stop}")
        detected += np.bincount(chunk.indices[chunk.data > 0], minlength=n_genes)
        accumulate(chunk, codes[rows], total, squares)
        spot_totals[rows] = np.asarray(chunk.sum(axis=1), dtype=np.float64).ravel()
    if problems:
        raise SpatlasInputError([*problems, "streaming needs raw counts in X or counts_layer"])
    keep = detected >= min_spots
    logger.info("genes: keeping %d of %d detected in >= %d spots", keep.sum(), keep.size, min_spots)
    if keep.sum() <= n_comps:
        raise SpatlasInputError(
            f"only {keep.sum()} genes are detected in >= {min_spots} spots; lower min_spots "
            "or check the counts"
        )
    batch_n = np.bincount(codes, minlength=n_batches)
    kt, ks = total[:, keep], squares[:, keep]
    means = kt.sum(0) / n
    variances = (ks.sum(0) / n - means**2) * (n / max(n - 1, 1))
    n_hvg = min(n_top_genes, int(keep.sum()))
    fit = loess_fit(kt, ks, batch_n) if n_hvg < keep.sum() else None

    # pass 2: clipped sums (Seurat v3), totals of the dropped genes
    dropped = np.zeros(n)
    clip = np.zeros((n_batches, n_genes))
    ctotal, csquares = np.zeros_like(total), np.zeros_like(squares)
    if fit is not None:
        clip[:, keep] = fit.clip
    if fit is not None or not keep.all():
        for start, stop, chunk in passes("clipped sums"):
            rows = to_cohort[start:stop]
            if fit is not None:
                accumulate(chunk, codes[rows], ctotal, csquares, clip=clip)
            if not keep.all():
                weights = np.where(keep[chunk.indices], 0.0, chunk.data.astype(np.float64))
                row_of = np.repeat(np.arange(stop - start), np.diff(chunk.indptr))
                dropped[rows] = np.bincount(row_of, weights=weights, minlength=stop - start)
    adata._inplace_subset_var(keep)
    if fit is None:
        adata.var[K.HVG] = True
    else:
        stats = select_hvg(fit, ctotal[:, keep], csquares[:, keep], means, variances, n_hvg)
        columns = ["highly_variable", "highly_variable_rank", "means", "variances"]
        columns += ["variances_norm"] + (
            ["highly_variable_nbatches"] if batches is not None else []
        )
        for column in columns:
            adata.var[column] = stats[column].to_numpy()
        adata.uns["hvg"] = {"flavor": hvg_flavor}
    logger.info("selected %d highly variable genes (%s)", adata.var[K.HVG].sum(), hvg_flavor)
    totals = spot_totals - dropped
    if (totals == 0).any():
        logger.warning("%d spots have no counts on the kept genes", int((totals == 0).sum()))
    hvg_file = np.zeros(n_genes, dtype=bool)
    hvg_file[np.flatnonzero(keep)[adata.var[K.HVG].to_numpy()]] = True
    g = int(hvg_file.sum())

    # pass 3: the normalised HVGs' moments and the PCA's fitting rows
    subsampled = pca_max_spots is not None and n > pca_max_spots
    in_fit = np.ones(n, dtype=bool)
    if subsampled:
        in_fit[:] = False
        in_fit[np.random.default_rng(seed).choice(n, size=pca_max_spots, replace=False)] = True
    hsum, hsq = np.zeros(g), np.zeros(g)
    pieces, piece_rows = [], []
    for start, stop, chunk in passes("normalised HVGs"):
        rows = to_cohort[start:stop]
        block = _normalised(chunk, totals[rows], target_sum)[:, hvg_file]
        values = block.data.astype(np.float64)
        hsum += np.bincount(block.indices, weights=values, minlength=g)
        hsq += np.bincount(block.indices, weights=values * values, minlength=g)
        chosen = np.flatnonzero(in_fit[rows])
        if chosen.size:
            pieces.append(block[chosen].astype(np.float32))
            piece_rows.append(rows[chosen])
    mean = hsum / n
    std = np.sqrt(np.clip((hsq / n - mean**2) * (n / max(n - 1, 1)), 0, None))
    constant = std == 0
    std[constant] = 1.0
    inv = 1.0 / std
    fit_rows = np.concatenate(piece_rows)
    fit_matrix = stack_rows(pieces, g)
    if subsampled:
        logger.info(
            "PCA fitted on a deterministic subsample of %d of %d spots, then every spot projected",
            pca_max_spots,
            n,
        )
    Vt = _components(_Scaled(fit_matrix, np.arange(g), mean, inv).operator(), n_comps, seed)

    # pass 4: every spot's scores
    scores = np.empty((n, n_comps), dtype=np.float32)
    if subsampled:
        W = inv[:, None] * Vt.T
        shift = (mean * inv) @ Vt.T
        for start, stop, chunk in passes("projection"):
            rows = to_cohort[start:stop]
            block = _normalised(chunk, totals[rows], target_sum)[:, hvg_file]
            scores[rows] = block @ W - shift
    else:
        scores[fit_rows] = _Scaled(fit_matrix, np.arange(g), mean, inv).matmat(Vt.T)
    del fit_matrix
    variance = scores.astype(np.float64).var(axis=0, ddof=1)
    adata.obsm[key_added] = scores
    pcs = np.zeros((adata.n_vars, n_comps), dtype=np.float32)
    pcs[adata.var[K.HVG].to_numpy()] = Vt.T
    adata.varm["PCs"] = pcs
    adata.uns["pca"] = {
        "variance": variance,
        "variance_ratio": variance / float(np.count_nonzero(~constant)),
    }
    adata.uns.setdefault(K.UNS, {})["preprocessing"] = {
        "min_spots": min_spots,
        "n_top_genes": n_top_genes,
        "hvg_flavor": hvg_flavor,
        "batch_key": batch_key,
        "target_sum": target_sum,
        "scale_max_value": scale_max_value,
        "n_comps": n_comps,
        "pca_max_spots": pca_max_spots,
        "pca_fit_spots": int(fit_rows.size),
        "seed": seed,
        "key_added": key_added,
        "streamed": str(counts.path),
    }
