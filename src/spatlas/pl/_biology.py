"""Plots of the biology after the domains: marker dot plot, domain x pathway heat map."""

from __future__ import annotations

from collections.abc import Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .._errors import SpatlasInputError
from ._utils import MISSING_COLOUR, categories, category_colours, new_figure


def _domain_ticks(ax, names: list[str], colours: Mapping[str, str], *, axis: str = "y") -> None:
    """Domain names as tick labels, each beside a square of the domain's colour."""
    positions = np.arange(len(names))
    if axis == "y":
        ax.set_yticks(positions, [f"{n}  " for n in names])
        ax.scatter(
            np.full(len(names), -0.9),
            positions,
            marker="s",
            s=60,
            c=[colours.get(n, MISSING_COLOUR) for n in names],
            clip_on=False,
        )


def marker_dotplot(
    adata: ad.AnnData,
    markers: pd.DataFrame,
    *,
    domain_key: str,
    n_genes: int = 3,
    colours: Mapping[str, str] | None = None,
    gene_labels: Mapping[str, str] | None = None,
) -> Figure:
    """Dot plot of the top conserved markers of each domain (:func:`spatlas.tl.conserved_markers`).

    Rows are domains, columns the first ``n_genes`` conserved markers of each domain (in domain
    order; a gene is drawn once). Dot size: share of the domain's spots expressing the gene; dot
    colour: the domain's mean log-normalised expression, scaled to 0-1 per gene across domains.

    Parameters
    ----------
    adata
        The cohort the table was computed on (log-normalised ``X``).
    markers
        Table of :func:`spatlas.tl.conserved_markers`.
    domain_key
        ``obs`` column of the domains.
    n_genes
        Markers per domain.
    colours
        Colour of each domain (squares beside the row names).
    gene_labels
        Name to show for a gene id (default: the table's ``symbol`` column when present).
    """
    if domain_key not in adata.obs:
        raise SpatlasInputError(f"marker_dotplot: obs has no column '{domain_key}'")
    top = markers.loc[markers["conserved"]].groupby("domain", sort=False).head(n_genes)
    genes = list(dict.fromkeys(top["gene"]))
    if not genes:
        top = markers.groupby("domain", sort=False).head(n_genes)
        genes = list(dict.fromkeys(top["gene"]))
    if not genes:
        raise SpatlasInputError("marker_dotplot: the marker table is empty")
    if gene_labels is None and "symbol" in markers:
        gene_labels = dict(zip(markers["gene"], markers["symbol"], strict=False))
    codes, names = categories(adata.obs[domain_key])
    colours = dict(colours or category_colours(adata.obs[domain_key]))
    columns = adata.var_names.get_indexer(genes)
    X = adata.X[:, columns]
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    onehot = sp.csr_matrix(
        (np.ones((codes >= 0).sum()), (codes[codes >= 0], np.flatnonzero(codes >= 0))),
        shape=(len(names), adata.n_obs),
    )
    sizes = np.asarray(onehot.sum(axis=1)).ravel()[:, None]
    mean = (onehot @ X) / np.maximum(sizes, 1)
    frac = (onehot @ (X > 0).astype(np.float64)) / np.maximum(sizes, 1)
    span = mean.max(axis=0) - mean.min(axis=0)
    scaled = (mean - mean.min(axis=0)) / np.where(span > 0, span, 1)

    fig = new_figure(max(4.0, 0.42 * len(genes) + 2.8), max(2.5, 0.38 * len(names) + 1.6))
    ax = fig.add_subplot()
    gx, dy = np.meshgrid(np.arange(len(genes)), np.arange(len(names)))
    points = ax.scatter(
        gx.ravel(),
        dy.ravel(),
        s=(frac.ravel() * 180) + 2,
        c=scaled.ravel(),
        cmap="Reds",
        vmin=0,
        vmax=1,
        edgecolors="#777777",
        linewidths=0.3,
    )
    labels = [str((gene_labels or {}).get(g, g)) for g in genes]
    ax.set_xticks(np.arange(len(genes)), labels, rotation=90, fontsize=7)
    _domain_ticks(ax, names, colours)
    ax.set_xlim(-1.3, len(genes) - 0.5)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel("conserved markers (top of each domain)")
    ax.set_ylabel(domain_key)
    ax.tick_params(axis="y", labelsize=8)
    fig.colorbar(points, ax=ax, shrink=0.6, label="mean expression\n(scaled per gene)")
    fig.legend(
        handles=[
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                color="#999999",
                markersize=np.sqrt(s * 180 + 2),
                label=f"{int(s * 100)} %",
            )
            for s in (0.25, 0.5, 1.0)
        ],
        title="spots expressing",
        loc="outside right upper",
        frameon=False,
        fontsize=7,
        title_fontsize=7,
    )
    return fig


def pathway_heatmap(
    table: pd.DataFrame,
    *,
    value: str = "z_combined",
    colours: Mapping[str, str] | None = None,
    limit: float | None = None,
) -> Figure:
    """Domain x pathway heat map of a :func:`spatlas.tl.domain_pathways` table.

    Cells are coloured by ``value`` (default the combined z of the domain against the rest;
    red: higher in the domain) and labelled with the per-sample agreement: ``3/4`` means
    significantly higher in 3 of the 4 samples where the domain was tested, ``-2/4``
    significantly lower in 2.
    """
    from .._errors import SpatlasInputError as _Error

    if table.empty:
        raise _Error("pathway_heatmap: the pathway table is empty")
    matrix = table.pivot(index="domain", columns="pathway", values=value)
    up = table.pivot(index="domain", columns="pathway", values="n_up")
    down = table.pivot(index="domain", columns="pathway", values="n_down")
    tested = table.pivot(index="domain", columns="pathway", values="n_tested")
    order = list(dict.fromkeys(table["domain"]))
    pathways = sorted(dict.fromkeys(table["pathway"]), key=str.lower)
    matrix, up, down, tested = (
        m.reindex(index=order, columns=pathways) for m in (matrix, up, down, tested)
    )
    values = matrix.to_numpy(dtype=np.float64)
    if limit is None:
        finite = np.abs(values[np.isfinite(values)])
        limit = float(np.percentile(finite, 98)) if finite.size else 1.0
    limit = max(limit, 1e-9)
    fig = new_figure(max(4.0, 0.5 * len(pathways) + 2.5), max(2.5, 0.4 * len(order) + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for i in range(len(order)):
        for j in range(len(pathways)):
            m = tested.iat[i, j]
            if not np.isfinite(values[i, j]) or not m:
                continue
            n = up.iat[i, j] if values[i, j] >= 0 else -down.iat[i, j]
            strong = abs(values[i, j]) > 0.6 * limit
            ax.text(
                j,
                i,
                f"{int(n)}/{int(m)}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if strong else "#222222",
            )
    ax.set_xticks(np.arange(len(pathways)), pathways, rotation=90, fontsize=8)
    _domain_ticks(ax, order, dict(colours or {}))
    ax.set_xlim(-1.4, len(pathways) - 0.5)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_ylabel("domain")
    label = {"z_combined": "combined z (domain vs rest)"}.get(value, value)
    fig.colorbar(image, ax=ax, shrink=0.7, label=label)
    return fig
