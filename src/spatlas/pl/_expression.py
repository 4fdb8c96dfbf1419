"""Predicted vs measured expression maps (expression read from the H&E image)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
from matplotlib.figure import Figure

from .. import _keys as K
from .._errors import SpatlasInputError
from ._spatial import _draw_map
from ._utils import new_figure


def _scaled(values: np.ndarray) -> np.ndarray:
    """Values mapped to [0, 1] between their 2nd and 98th percentiles (each panel its own)."""
    lo, hi = np.nanpercentile(values, [2, 98]) if values.size else (0.0, 1.0)
    if not hi > lo:
        return np.full(values.shape, 0.5)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def expression_maps(
    adata: ad.AnnData,
    *,
    sample: str,
    genes: Sequence[str],
    predicted_key: str = K.PREDICTED_EXPRESSION,
    r: Mapping[str, float] | None = None,
    target_sum: float = 1e4,
    cmap: str = "viridis",
) -> Figure:
    """Measured and predicted log-normalised expression of ``genes`` on one sample.

    One row per gene: the measured map (from the counts) beside the map predicted from the image
    (``obsm[predicted_key]``, :func:`spatlas.tl.predict_expression`). Each panel has its own
    colour scale (2nd to 98th percentile): the Pearson r compares patterns, not levels.

    Parameters
    ----------
    adata
        Cohort with counts and ``obsm[predicted_key]``.
    sample
        The sample to draw (e.g. a held-out section).
    genes
        Genes among the predicted ones.
    predicted_key
        obsm key of the prediction.
    r
        Pearson r per gene, shown in the titles.
    target_sum
        Library size of the measured log-normalisation (as the predictor's).
    cmap
        Matplotlib colour map.
    """
    import matplotlib

    from ..tl._predict import log_normalised

    meta = adata.uns.get(K.UNS, {}).get(K.PREDICTED, {}).get(predicted_key)
    if predicted_key not in adata.obsm or meta is None:
        raise SpatlasInputError(
            f"obsm['{predicted_key}'] is missing; run spatlas.tl.predict_expression first"
        )
    predicted_genes = list(meta["genes"])
    unknown = [g for g in genes if g not in predicted_genes]
    if unknown:
        raise SpatlasInputError(f"genes not predicted: {', '.join(unknown)}")
    rows = np.flatnonzero(adata.obs[K.SAMPLE].astype(str).to_numpy() == str(sample))
    if rows.size == 0:
        raise SpatlasInputError(f"sample {sample!r} is not in the cohort")
    points = np.asarray(adata.obsm[K.SPATIAL], dtype=np.float64)[rows, :2]
    measured = log_normalised(adata, list(genes), rows=rows, target_sum=target_sum)
    cols = [predicted_genes.index(g) for g in genes]
    predicted = np.asarray(adata.obsm[predicted_key])[rows][:, cols]
    colour_map = matplotlib.colormaps[cmap]
    fig = new_figure(6.4, 3.0 * max(len(genes), 1))
    axes = fig.subplots(max(len(genes), 1), 2, squeeze=False)
    for i, gene in enumerate(genes):
        score = f" (r = {r[gene]:.2f})" if r is not None and gene in r else ""
        for j, (what, values) in enumerate(
            (("measured", measured[:, i]), ("predicted from H&E", predicted[:, i]))
        ):
            _draw_map(
                axes[i, j],
                points,
                colour_map(_scaled(values)),
                None,
                title=f"{gene}: {what}{score if j else ''}",
            )
    return fig
