"""Checks on loaded data; each returns a list of one-line problems (empty when all is well)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _values(X) -> np.ndarray:
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def check_counts(X, *, where: str) -> list[str]:
    """Raw UMI counts must be finite, non-negative integers."""
    values = _values(X)
    if values.size == 0:
        return []
    problems = []
    if not np.issubdtype(values.dtype, np.number):
        return [f"{where}: counts have non-numeric dtype {values.dtype}"]
    if np.issubdtype(values.dtype, np.floating):
        n_nan = int(np.count_nonzero(~np.isfinite(values)))
        if n_nan:
            problems.append(
                f"{where}: {n_nan} count values are NaN or infinite; raw UMI counts are finite"
            )
            values = values[np.isfinite(values)]
    n_neg = int(np.count_nonzero(values < 0))
    if n_neg:
        problems.append(
            f"{where}: {n_neg} count values are negative (min {values.min():g}); spatlas needs raw "
            "UMI counts, not scaled or centred data"
        )
    if np.issubdtype(values.dtype, np.floating):
        frac = values != np.round(values)
        if frac.any():
            example = values[frac][0]
            problems.append(
                f"{where}: counts are not integers (e.g. {example:g}); spatlas needs raw UMI "
                "counts "
                "(for .h5ad input, keep them in X or name the layer with counts_layer)"
            )
    return problems


def check_coordinates_in_image(
    xy: np.ndarray, shape: tuple[int, int], *, what: str, where: str
) -> list[str]:
    """Spot centres (x, y) in the pixels of an image of (height, width) ``shape`` must lie on it."""
    height, width = shape
    finite = np.isfinite(xy).all(axis=1)
    problems = []
    if not finite.all():
        problems.append(f"{where}: {int((~finite).sum())} spots have NaN or infinite coordinates")
    x, y = xy[finite, 0], xy[finite, 1]
    outside = (x < 0) | (y < 0) | (x >= width) | (y >= height)
    if outside.any():
        hint = "the scalefactors or the image belong to another sample"
        swapped = (y < width) & (x < height) & (y >= 0) & (x >= 0)
        if swapped.all():
            hint = "row and column look swapped"
        problems.append(
            f"{where}: {int(outside.sum())} of {outside.size} spots lie outside {what} "
            f"({width} x {height} px; spot x range {x.min():.0f}-{x.max():.0f}, "
            f"y range {y.min():.0f}-{y.max():.0f}); {hint}"
        )
    return problems
