"""UMAP of an embedding, one panel per ``obs`` column."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger
from ._utils import (
    MISSING_COLOUR,
    categories,
    category_colours,
    colours_of,
    is_categorical,
    new_figure,
)

_MAX_LEGEND = 30  # categories; beyond that the legend would hide the plot


def umap(
    adata: ad.AnnData,
    *,
    basis: str,
    color: Sequence[str] = (K.SAMPLE, K.DONOR),
    seed: int = 0,
    max_spots: int = 20_000,
    n_neighbors: int = 15,
    ncols: int = 2,
    panel_size: float = 3.6,
    palettes: Mapping[str, Mapping[str, str]] | None = None,
) -> Figure:
    """UMAP of ``obsm[basis]``, coloured by each of the ``color`` columns (one panel each).

    The exact neighbour graph and the UMAP are computed by scanpy on a lightweight copy holding
    only the embedding (``adata`` is not modified), on at most ``max_spots`` spots drawn without
    replacement by a seeded generator.

    Parameters
    ----------
    adata
        Cohort with ``obsm[basis]``.
    basis
        ``obsm`` key of the embedding, e.g. ``X_pca_harmony`` or ``X_grid_ae``.
    color
        ``obs`` columns to colour by; columns that ``adata`` lacks are skipped (logged).
        Categorical columns get a legend, numeric ones a colour bar.
    seed
        Seed of the subsample, the neighbour search and the UMAP layout.
    max_spots
        Most spots to embed.
    n_neighbors
        Neighbours of the UMAP graph.
    ncols
        Panels per row.
    panel_size
        Height of each panel, in inches.
    palettes
        Per categorical column, the colour of each category (e.g. the domain colours of
        :func:`spatlas.pl.domain_colours`); other categorical columns get one palette colour
        per category of the whole cohort (not of the subsample), as in the other plots.

    Returns
    -------
    The figure, one panel per column found, ``ncols`` panels per row.
    """
    import scanpy as sc

    if basis not in adata.obsm:
        raise SpatlasInputError(
            f"umap: obsm has no '{basis}' (keys: {', '.join(map(str, adata.obsm.keys()))})"
        )
    columns = [c for c in dict.fromkeys(color) if c in adata.obs]
    palettes = dict(palettes or {})
    for column in columns:
        if column not in palettes and is_categorical(adata.obs[column]):
            palettes[column] = category_colours(adata.obs[column])
    skipped = [c for c in color if c not in adata.obs]
    if skipped:
        logger.info("umap: no obs column %s; not drawn", ", ".join(map(repr, skipped)))
    if not columns:
        raise SpatlasInputError(f"umap: none of the columns {', '.join(color)} is in obs")
    if adata.n_obs < 3:
        raise SpatlasInputError(f"umap: needs at least 3 spots, got {adata.n_obs}")
    rng = np.random.default_rng(seed)
    if adata.n_obs > max_spots:
        index = np.sort(rng.choice(adata.n_obs, size=max_spots, replace=False))
    else:
        index = np.arange(adata.n_obs)
    small = ad.AnnData(
        obs=adata.obs.iloc[index][columns].copy(),
        obsm={basis: np.asarray(adata.obsm[basis][index], dtype=np.float32)},
    )
    # exact neighbours (sklearn): deterministic, fast at <= 20k spots, and scanpy 1.11's
    # pynndescent path (> 4096 spots) fails on scipy >= 1.15 sparse arrays (no ``getnnz``)
    sc.pp.neighbors(
        small,
        use_rep=basis,
        n_neighbors=min(n_neighbors, small.n_obs - 1),
        transformer="sklearn",
        random_state=seed,
    )
    sc.tl.umap(small, random_state=seed)
    coords = small.obsm["X_umap"]
    order = rng.permutation(small.n_obs)  # no sample is drawn systematically on top
    size = float(np.clip(30_000 / small.n_obs, 0.5, 12.0))
    logger.info("umap of obsm['%s'] on %d spots", basis, small.n_obs)

    ncols = max(1, min(ncols, len(columns)))
    nrows = -(-len(columns) // ncols)
    fig = new_figure((panel_size + 1.9) * ncols, panel_size * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    for ax, column in zip(axes, columns, strict=False):
        values = small.obs[column]
        if is_categorical(values):
            codes, names = categories(values)
            named = [palettes[column].get(name, MISSING_COLOUR) for name in names]
            colours = colours_of(codes, named)
            ax.scatter(*coords[order].T, c=list(colours[order]), s=size, linewidths=0)
            if len(names) <= _MAX_LEGEND:
                ax.legend(
                    handles=[
                        Line2D([], [], marker="o", linestyle="", markersize=5, color=c, label=n)
                        for n, c in zip(names, named, strict=True)
                    ],
                    loc="center left",
                    bbox_to_anchor=(1.0, 0.5),
                    frameon=False,
                    fontsize=7,
                    ncols=1 if len(names) <= 15 else 2,
                )
        else:
            numbers = values.to_numpy(dtype=np.float64)
            points = ax.scatter(
                *coords[order].T, c=numbers[order], s=size, linewidths=0, cmap="viridis"
            )
            fig.colorbar(points, ax=ax, shrink=0.7)
        ax.set_title(column, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP1", fontsize=8)
        ax.set_ylabel("UMAP2", fontsize=8)
        ax.set_aspect("equal", adjustable="datalim")
    return fig
