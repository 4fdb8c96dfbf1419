"""Progress bars for long work (tqdm; silent when stderr is not a terminal)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar labelled ``desc``."""
    from tqdm import tqdm  # tqdm.auto would want ipywidgets in notebooks (a warning without)

    return tqdm(iterable, desc=desc, total=total, disable=None, leave=False)
