"""Bar plot of a cross-validated comparison (``spatlas benchmark``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ._utils import new_figure, palette


def benchmark_bars(
    summary: pd.DataFrame,
    *,
    metric: str = "ARI",
    title: str | None = None,
) -> Figure:
    """Grouped bars: one group of bars per held-out group (and the mean), one bar per pipeline.

    Parameters
    ----------
    summary
        Rows = groups (a last row ``mean`` is drawn apart), columns = pipelines, values = the
        test score, as :func:`spatlas.tune.summarize` returns it. A pipeline ``<m>+<model>``
        is drawn in the dark shade of ``<m>``'s colour.
    metric
        Axis label.
    title
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if summary.empty:
        raise ValueError("benchmark_bars: the summary table is empty")
    pipelines = list(summary.columns)
    bases = list(dict.fromkeys(p.partition("+")[0] for p in pipelines))
    base_colour = dict(zip(bases, palette(max(len(bases), 1)), strict=False))
    rows = list(summary.index)
    width = 0.8 / len(pipelines)
    fig = new_figure(max(5.0, 0.5 + 0.9 * len(rows) * max(1, len(pipelines) / 3)), 3.6)
    ax = fig.add_subplot()
    x = np.arange(len(rows), dtype=float)
    x[[i for i, r in enumerate(rows) if str(r) == "mean"]] += 0.4  # set the mean apart
    for j, name in enumerate(pipelines):
        base, _, model = name.partition("+")
        values = summary[name].to_numpy(dtype=float)
        ax.bar(
            x - 0.4 + width * (j + 0.5),
            np.nan_to_num(values),
            width=width * 0.95,
            color=base_colour[base],
            alpha=1.0 if model else 0.45,
            edgecolor="black" if model else "none",
            linewidth=0.5,
            label=name,
        )
    ax.set_xticks(x, [str(r) for r in rows])
    ax.set_ylabel(f"test {metric}")
    ax.set_xlabel("held-out group")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize="small", ncols=min(len(pipelines), 3), frameon=False, loc="upper left")
    top = np.nanmax(summary.to_numpy(dtype=float))
    ax.set_ylim(min(0.0, np.nanmin(summary.to_numpy(dtype=float))), max(0.05, top * 1.3))
    if title:
        ax.set_title(title)
    return fig
