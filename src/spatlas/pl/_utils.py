"""Shared helpers of the plots: Agg figures and one categorical palette."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

MISSING_COLOUR = "#d0d0d0"
"""Colour of spots whose category is missing (e.g. unannotated spots)."""


def new_figure(width: float, height: float, *, layout: str | None = "constrained") -> Figure:
    """A figure drawn by the Agg canvas; it is never registered with pyplot (nothing to close)."""
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def palette(n: int) -> list[str]:
    """``n`` distinct colours: tab10 / tab20 when they suffice, else evenly spaced on ``turbo``."""
    import matplotlib

    if n <= 10:
        colours = matplotlib.colormaps["tab10"].colors[:n]
    elif n <= 20:
        tab20 = matplotlib.colormaps["tab20"].colors
        # dark shades first, so the first ten stay as distinct as tab10
        colours = [*tab20[0::2], *tab20[1::2]][:n]
    else:
        colours = matplotlib.colormaps["turbo"](np.linspace(0.05, 0.95, n))
    return [to_hex(c) for c in colours]


def categories(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer codes (-1 = missing) and category names of ``values``, in a stable order.

    Categorical columns keep their order (unused categories dropped); other columns are sorted,
    numerically when every value is a number (so domains ``"2"`` < ``"10"``).
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        cat = values.cat.remove_unused_categories()
        return cat.cat.codes.to_numpy(), [str(c) for c in cat.cat.categories]
    present = values.dropna().astype(str)
    names = sorted(present.unique())
    numeric = pd.to_numeric(pd.Series(names), errors="coerce")
    if len(names) and numeric.notna().all():
        names = [names[i] for i in np.argsort(numeric.to_numpy(), kind="stable")]
    lookup = {name: i for i, name in enumerate(names)}
    codes = np.full(len(values), -1, dtype=np.int64)
    mask = values.notna().to_numpy()
    codes[mask] = present.map(lookup).to_numpy()
    return codes, names


def colours_of(codes: np.ndarray, colours: list[str]) -> np.ndarray:
    """Colour of each code (``MISSING_COLOUR`` for -1)."""
    table = np.asarray([*colours, MISSING_COLOUR], dtype=object)
    return table[np.where(codes < 0, len(colours), codes)]


def is_categorical(values: pd.Series, *, max_numeric_levels: int = 20) -> bool:
    """Whether to colour ``values`` by category (strings, booleans, few numeric levels)."""
    if isinstance(values.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(values):
        return True
    return pd.api.types.is_bool_dtype(values) or values.nunique() <= max_numeric_levels


def category_colours(values: pd.Series) -> dict[str, str]:
    """Colour of each category of ``values`` (in the order of :func:`categories`)."""
    _, names = categories(values)
    return dict(zip(names, palette(len(names)), strict=True))


def domain_colours(domains: pd.Series, labels: pd.Series | None = None) -> dict[str, str]:
    """Colour of each domain; with ``labels``, a domain takes the colour of its best label.

    Domains and labels are matched one to one by the assignment that maximises the spots they
    share (Hungarian algorithm on the contingency table), so that a map of the domains can be
    compared by eye with the map of the labels (coloured by :func:`category_colours`). Domains
    left without a label get the colours after the labels' ones. Without labels, domains get
    :func:`category_colours`.
    """
    if labels is None or not labels.notna().any():
        return category_colours(domains)
    from scipy.optimize import linear_sum_assignment

    _, domain_names = categories(domains)
    _, label_names = categories(labels)
    both = domains.notna() & labels.notna()
    table = pd.crosstab(domains[both].astype(str), labels[both].astype(str))
    table = table.reindex(index=domain_names, columns=label_names, fill_value=0)
    rows, cols = linear_sum_assignment(-table.to_numpy())
    colours = palette(len(label_names) + len(domain_names))
    mapping = {
        domain_names[r]: colours[c] for r, c in zip(rows, cols, strict=True) if table.iat[r, c] > 0
    }
    spare = iter(colours[len(label_names) :])
    return {name: mapping.get(name) or next(spare) for name in domain_names}
