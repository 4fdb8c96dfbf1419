"""Spatial domain maps: domains (and the ground truth) as dots on each sample's H&E image."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import EllipseCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .. import _keys as K
from .._errors import SpatlasInputError
from ._utils import (
    MISSING_COLOUR,
    categories,
    colours_of,
    domain_colours,
    new_figure,
    palette,
)

_SPOT_FILL = 0.8  # dot diameter as a fraction of the spot spacing: the tissue shows in between
_MARGIN = 0.04  # of the spots' extent, around each map
#: Above this many spots in a figure, each map's spots are drawn as one raster image (at most
#: ``RASTER_CELLS`` cells across) instead of one dot each: the figure then costs the same at any
#: size (and its PNG stays small: 0.16 MB instead of 6.7 MB for 20 samples of 5,000 spots).
MAX_DOTS = 20_000
RASTER_CELLS = 600


def spatial_domains(
    adata: ad.AnnData,
    *,
    key: str,
    sample_key: str = K.SAMPLE,
    label_key: str = K.LABEL,
    samples: Sequence[str] | None = None,
    image: bool = True,
    ncols: int = 2,
    panel_size: float = 3.4,
    colours: Mapping[str, str] | None = None,
) -> Figure:
    """Spatial domains of each sample as coloured dots on its H&E image, beside the ground truth.

    Parameters
    ----------
    adata
        Cohort with ``obs[key]``, ``obs[sample_key]`` and ``obsm['spatial']`` (full-resolution
        pixels, ``x, y``); the images and scale factors are read from ``uns['spatial'][sample]``
        (``lowres`` preferred, else ``hires``).
    key
        ``obs`` column of the domains, e.g. ``harmony_domain``.
    sample_key
        ``obs`` column of the sample.
    label_key
        ``obs`` column of the ground truth; drawn in a second panel per sample when present
        (unannotated spots in grey).
    samples
        Samples to draw, in this order; default all, in the cohort's order.
    image
        Draw the dots on the sample's image. Without one (or with ``False``) the dots are drawn
        on white, in full-resolution pixels, with the y axis pointing down as in the image.
    ncols
        Samples per row of the figure.
    panel_size
        Height and width of each map, in inches.
    colours
        Colour of each domain (name -> colour). Default: with ground truth, each domain takes
        the colour of the label it overlaps best (:func:`spatlas.pl.domain_colours`), so the two
        maps compare by eye; without, one palette colour per domain.

    Returns
    -------
    The figure: one map (domains) or two (domains, ground truth) per sample. Every domain has
    the same colour in every sample; the legends sit on the right. Above ``MAX_DOTS`` (20,000)
    spots in all, each map is one raster image (cells of at least one spot spacing) instead of
    one dot per spot, so the figure's cost does not grow with the cohort.
    """
    obs = adata.obs
    for column in (key, sample_key):
        if column not in obs:
            raise SpatlasInputError(
                f"spatial_domains: obs has no column '{column}' "
                f"(columns: {', '.join(map(str, obs.columns))})"
            )
    if K.SPATIAL not in adata.obsm:
        raise SpatlasInputError("spatial_domains: obsm['spatial'] (spot coordinates) is missing")
    sample_codes, sample_names = categories(obs[sample_key])
    if samples is None:
        samples = sample_names
    else:
        samples = [str(s) for s in samples]
        unknown = sorted(set(samples) - set(sample_names))
        if unknown:
            raise SpatlasInputError(
                f"spatial_domains: unknown samples {', '.join(unknown)} "
                f"(known: {', '.join(sample_names)})"
            )
    if not samples:
        raise SpatlasInputError("spatial_domains: no samples to draw")
    domain_codes, domain_names = categories(obs[key])
    has_labels = label_key in obs and bool(obs[label_key].notna().any())
    if colours is None:
        colours = domain_colours(obs[key], obs[label_key] if has_labels else None)
    missing = [name for name in domain_names if name not in colours]
    if missing:
        raise SpatlasInputError(f"spatial_domains: no colour for domains {', '.join(missing)}")
    domain_palette = [colours[name] for name in domain_names]
    if has_labels:
        label_codes, label_names = categories(obs[label_key])
        label_colours = palette(len(label_names))
    panels = 2 if has_labels else 1
    ncols = max(1, min(ncols, len(samples)))
    nrows = math.ceil(len(samples) / ncols)
    fig = new_figure(panel_size * panels * ncols + 1.8, panel_size * nrows + 0.2)
    axes = fig.subplots(nrows, panels * ncols, squeeze=False)
    xy = np.asarray(adata.obsm[K.SPATIAL], dtype=np.float64)[:, :2]
    drawn = np.isin(sample_codes, [sample_names.index(s) for s in samples])
    raster = int(drawn.sum()) > MAX_DOTS
    for i, sample in enumerate(samples):
        mask = sample_codes == sample_names.index(sample)
        picture, scalef = _sample_image(adata, sample) if image else (None, 1.0)
        points = xy[mask] * scalef
        row, col = divmod(i, ncols)
        _draw_map(
            axes[row, col * panels],
            points,
            colours_of(domain_codes[mask], domain_palette),
            picture,
            title=f"{sample}: {key}",
            raster=raster,
        )
        if has_labels:
            _draw_map(
                axes[row, col * panels + 1],
                points,
                colours_of(label_codes[mask], label_colours),
                picture,
                title=f"{sample}: {label_key}",
                raster=raster,
            )
    for ax in axes.ravel()[len(samples) * panels :]:
        ax.set_visible(False)
    fig.legend(
        handles=_handles(domain_names, domain_palette),
        title=key,
        loc="outside right upper",
        frameon=False,
        fontsize=8,
        ncols=1 if len(domain_names) <= 20 else 2,
    )
    if has_labels:
        names, colours = list(label_names), list(label_colours)
        if (label_codes < 0).any():
            names.append("unannotated")
            colours.append(MISSING_COLOUR)
        fig.legend(
            handles=_handles(names, colours),
            title=label_key,
            loc="outside right lower",
            frameon=False,
            fontsize=8,
        )
    return fig


def _sample_image(adata: ad.AnnData, sample: str) -> tuple[np.ndarray | None, float]:
    """The sample's lowres (else hires) image and the scale factor from full resolution to it."""
    entry = adata.uns.get(K.SPATIAL, {}).get(sample, {})
    images = entry.get(K.IMAGES, {})
    scalefactors = entry.get(K.SCALEFACTORS, {})
    for name, factor in (("lowres", K.LOWRES_SCALEF), ("hires", K.HIRES_SCALEF)):
        if name in images and factor in scalefactors:
            return np.asarray(images[name]), float(scalefactors[factor])
    return None, 1.0


def _spot_spacing(points: np.ndarray) -> float:
    """Median distance from a spot to its nearest neighbour (the lattice spacing)."""
    from scipy.spatial import cKDTree

    if len(points) < 2:
        return 1.0
    distances, _ = cKDTree(points).query(points, k=2)
    spacing = float(np.median(distances[:, 1]))
    return spacing if spacing > 0 else 1.0


def _draw_map(
    ax: Axes,
    points: np.ndarray,
    colours: np.ndarray,
    picture: np.ndarray | None,
    *,
    title: str,
    raster: bool = False,
) -> None:
    """Dots sized in data units (so they stay on their spots at any zoom) over the image.

    With ``raster``, one image of cells at least a spot spacing wide instead (:func:`_draw_raster`).
    """
    spacing = _spot_spacing(points)
    lo, hi = points.min(axis=0), points.max(axis=0)
    margin = max(float((hi - lo).max()) * _MARGIN, spacing)
    x0, y0 = lo - margin
    x1, y1 = hi + margin
    if picture is not None:
        ax.imshow(picture, interpolation="antialiased")
        height, width = picture.shape[:2]
        # image pixel centres sit at integer coordinates; keep the view on the image
        x0, y0 = max(x0, -0.5), max(y0, -0.5)
        x1, y1 = min(x1, width - 0.5), min(y1, height - 0.5)
    if raster:
        _draw_raster(ax, points, colours, spacing)
    else:
        diameter = np.full(len(points), _SPOT_FILL * spacing)
        ax.add_collection(
            EllipseCollection(
                diameter,
                diameter,
                np.zeros(len(points)),
                units="xy",
                offsets=points,
                offset_transform=ax.transData,
                facecolors=list(colours),
                edgecolors="none",
            )
        )
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # image orientation: y grows downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def _draw_raster(ax: Axes, points: np.ndarray, colours: np.ndarray, spacing: float) -> None:
    """The spots as one RGBA image: a cell takes the colour of a spot in it (the last one).

    Cells are at least one spot spacing wide, so a dense lattice leaves no holes; the image is
    drawn in data coordinates over the H&E.
    """
    from matplotlib.colors import to_rgba_array

    lo, hi = points.min(axis=0), points.max(axis=0)
    cell = max(spacing, float((hi - lo).max()) / RASTER_CELLS)
    shape = (np.floor((hi - lo) / cell).astype(int) + 1)[::-1]  # rows (y), columns (x)
    raster = np.zeros((*shape, 4), dtype=np.float32)
    ij = np.floor((points - lo) / cell).astype(int)
    codes, uniques = pd.factorize(np.asarray(colours, dtype=object))
    rgba = to_rgba_array(list(uniques))
    raster[ij[:, 1], ij[:, 0]] = rgba[codes]
    ax.imshow(
        raster,
        extent=(lo[0], lo[0] + shape[1] * cell, lo[1] + shape[0] * cell, lo[1]),
        interpolation="nearest",
    )


def _handles(names: Sequence[str], colours: Sequence[str]) -> list[Line2D]:
    return [
        Line2D([], [], marker="o", linestyle="", markersize=6, color=c, label=n)
        for n, c in zip(names, colours, strict=True)
    ]
