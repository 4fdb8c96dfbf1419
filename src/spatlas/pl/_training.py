"""Training-loss curves of a fusion model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from .._errors import SpatlasInputError
from ._utils import new_figure, palette

_NOT_LOSSES = ("step", "lr")


def loss_curves(
    history: Sequence[Mapping[str, float]],
    *,
    title: str | None = None,
    width: float = 7.0,
    height: float = 3.8,
) -> Figure:
    """Training loss against step, one line per loss part.

    Parameters
    ----------
    history
        One dict per logged step: ``step`` plus the loss parts (``total``, ``reconstruction``,
        ...), as a model's ``history`` (``model/model.json`` of a run); ``lr`` is not drawn.
    title
        Title of the plot.
    width, height
        Size of the figure, in inches.

    Returns
    -------
    The figure; the y axis is logarithmic when every value drawn is positive.
    """
    if not history:
        raise SpatlasInputError("loss_curves: the history is empty")
    parts = [
        name
        for name in dict.fromkeys(k for record in history for k in record)
        if name not in _NOT_LOSSES
    ]
    if not parts:
        raise SpatlasInputError("loss_curves: the history holds no loss parts besides step/lr")
    steps = np.asarray(
        [record.get("step", i) for i, record in enumerate(history)], dtype=np.float64
    )
    fig = new_figure(width, height)
    ax = fig.subplots()
    drawn = []
    for name, colour in zip(parts, palette(len(parts)), strict=True):
        values = np.asarray([record.get(name, np.nan) for record in history], dtype=np.float64)
        ax.plot(
            steps,
            values,
            label=name,
            color=colour,
            linewidth=2.0 if name == "total" else 1.2,
        )
        drawn.append(values[np.isfinite(values)])
    everything = np.concatenate(drawn)
    if everything.size and (everything > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        ax.set_title(title, fontsize=10)
    return fig
