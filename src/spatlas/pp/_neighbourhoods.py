"""Per-sample spatial neighbourhood windows for grid models (MISSION §2.4).

A spot's neighbourhood is a ``w x w`` window of lattice positions around it, stored as one row
of an ``(N, w²)`` index table (``-1`` where no spot sits); windows of features are gathered from
that table per mini-batch, so an ``N x C x w x w`` array is never built. Windows never cross
samples. Three layouts:

- ``hex``: Visium array coordinates (``array_row``, ``array_col``; ``row + col`` of one parity).
  They are mapped to axial coordinates ``(r, q) = (row, (col - row) / 2)`` and the window is the
  ``w x w`` rhombus of axial offsets, so **every cell is a real lattice position**: the six
  adjacent spots are the cells ``(±1, 0), (0, ±1), (+1, -1), (-1, +1)`` around the centre. (A
  square window on (row, col) hits a lattice position at only about half of its cells.)
- ``square``: integer coordinates on a square lattice (legacy ST, her2st's x / y; Visium HD
  bins); cell ``(i, j)`` is offset ``(i - h, j - h)``.
- ``irregular``: any coordinates (cells of Xenium / CosMx, jittered spots). The window is a
  square grid of step ``s`` (the sample's median nearest-neighbour distance) centred on the spot;
  each cell takes the spot nearest to its centre if one lies within ``s / 2``, else it is empty.

``h = w // 2``; cell ``(i, j)`` is column ``i * w + j`` of the table and the centre cell is the
spot itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from anndata import AnnData

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger

Layout = Literal["auto", "hex", "square", "irregular"]
LAYOUTS = ("auto", "hex", "square", "irregular")
_QUERY_CHUNK = 1 << 20  # target points per KD-tree query block (irregular layout)


def window_offsets(window: int) -> np.ndarray:
    """Offsets ``(di, dj)`` of the window cells in table-column order, shape ``(w², 2)``."""
    _check_window(window)
    h = window // 2
    di, dj = np.meshgrid(np.arange(-h, h + 1), np.arange(-h, h + 1), indexing="ij")
    return np.column_stack([di.ravel(), dj.ravel()]).astype(np.int64)


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int | np.integer) or window < 1:
        raise SpatlasInputError(f"window must be a positive odd integer, got {window!r}")
    if window % 2 == 0:
        raise SpatlasInputError(f"window must be odd so that the spot sits in the centre: {window}")


def _is_integer(coords: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(coords)) and np.all(coords == np.round(coords)))


def detect_layout(coords: np.ndarray) -> Literal["hex", "square", "irregular"]:
    """Lattice of one sample's coordinates.

    ``hex`` when the coordinates are integers whose sum has one parity (Visium array row /
    column), ``square`` for other integer coordinates, ``irregular`` otherwise.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.shape[0] == 0 or not _is_integer(coords):
        return "irregular"
    parity = (coords[:, 0] + coords[:, 1]).astype(np.int64) % 2
    if coords.shape[0] > 1 and np.all(parity == parity[0]):
        # one parity and both axes used: the doubled-column hex lattice of Visium
        if np.unique(coords[:, 0]).size > 1 and np.unique(coords[:, 1]).size > 1:
            return "hex"
    return "square"


def _lattice_table(cells: np.ndarray, offsets: np.ndarray, what: str) -> np.ndarray:
    """Rows (local indices) of the spots at ``cells + offset`` for every offset; ``-1`` if none.

    ``cells``: integer lattice positions, shape ``(n, 2)``. Lookup is by sorted keys
    (``searchsorted``), so memory stays linear in ``n`` whatever the coordinate span.
    """
    n = cells.shape[0]
    lo = cells.min(axis=0) - np.abs(offsets).max()
    span = cells.max(axis=0) - lo + np.abs(offsets).max() + 1
    keys = (cells[:, 0] - lo[0]) * span[1] + (cells[:, 1] - lo[1])
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    dup = sorted_keys[1:] == sorted_keys[:-1]
    if dup.any():
        raise SpatlasInputError(
            f"{what}: {int(dup.sum())} spots share a lattice position with another spot; "
            "check the array coordinates (or use layout='irregular')"
        )
    target = cells[:, None, :] + offsets[None, :, :]  # (n, w², 2)
    tkeys = (target[..., 0] - lo[0]) * span[1] + (target[..., 1] - lo[1])
    pos = np.searchsorted(sorted_keys, tkeys)
    pos_c = np.minimum(pos, n - 1)
    found = sorted_keys[pos_c] == tkeys
    return np.where(found, order[pos_c], -1)


def _irregular_table(xy: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Nearest spot within half a step of each window cell's centre (see the module doc)."""
    from scipy.spatial import cKDTree

    n = xy.shape[0]
    if n == 1:
        table = np.full((1, offsets.shape[0]), -1, dtype=np.int64)
        table[0, np.flatnonzero((offsets == 0).all(axis=1))] = 0
        return table
    tree = cKDTree(xy)
    d, _ = tree.query(xy, k=2)
    step = float(np.median(d[:, 1]))
    if not step > 0:
        raise SpatlasInputError("irregular layout: spots share coordinates; cannot set a step")
    # cell (i, j): row offset along y, column offset along x (image convention)
    shift = offsets[:, ::-1].astype(np.float64) * step
    table = np.empty((n, offsets.shape[0]), dtype=np.int64)
    rows_per_chunk = max(1, _QUERY_CHUNK // offsets.shape[0])
    for start in range(0, n, rows_per_chunk):
        block = xy[start : start + rows_per_chunk]
        targets = (block[:, None, :] + shift[None]).reshape(-1, 2)
        dist, idx = tree.query(targets, k=1, distance_upper_bound=step / 2)
        idx = np.where(np.isfinite(dist), idx, -1)
        table[start : start + block.shape[0]] = idx.reshape(block.shape[0], -1)
    centre = np.flatnonzero((offsets == 0).all(axis=1))
    table[:, centre[0]] = np.arange(n)
    return table


def neighbourhood_table(
    coords: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    window: int = 5,
    layout: Layout = "auto",
) -> tuple[np.ndarray, dict[str, str]]:
    """Index table of every spot's ``window x window`` neighbourhood within its own group.

    Parameters
    ----------
    coords
        Coordinates, shape ``(n, 2)``: integer array (row, column) for ``hex`` / ``square``,
        anything for ``irregular``.
    groups
        Sample of each spot, shape ``(n,)``; neighbours never cross groups. ``None``: one group.
    window
        Odd window side ``w``.
    layout
        ``hex``, ``square``, ``irregular`` or ``auto`` (:func:`detect_layout` per group).

    Returns
    -------
    ``(table, layouts)``: ``table`` is ``int64`` of shape ``(n, w²)`` holding global row indices
    (``-1`` for an empty cell; column ``i * w + j`` is window cell ``(i, j)``, the centre column
    is the spot itself); ``layouts`` maps each group (as a string) to the layout used.
    """
    _check_window(window)
    if layout not in LAYOUTS:
        raise SpatlasInputError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise SpatlasInputError(f"coords must have shape (n_spots, 2), got {coords.shape}")
    coords = coords[:, :2]
    if not np.isfinite(coords).all():
        raise SpatlasInputError("coords have NaN or infinite values; fix them before windows")
    if groups is None:
        groups = np.zeros(n, dtype=np.int64)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise SpatlasInputError(f"groups must have one entry per spot ({n}), got {groups.shape}")
    names, codes = np.unique(groups, return_inverse=True)
    offsets = window_offsets(window)
    table = np.full((n, window * window), -1, dtype=np.int64)
    layouts: dict[str, str] = {}
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes.ravel(), minlength=names.size))[:-1]
    for name, members in zip(names, np.split(order, bounds), strict=True):
        if members.size == 0:
            continue
        xy = coords[members]
        used = detect_layout(xy) if layout == "auto" else layout
        what = f"sample {name}"
        if used in ("hex", "square") and not _is_integer(xy):
            raise SpatlasInputError(
                f"{what}: layout '{used}' needs integer array coordinates; use layout='irregular'"
            )
        if used == "hex":
            cells = xy.astype(np.int64)
            if np.unique((cells[:, 0] + cells[:, 1]) % 2).size > 1:
                raise SpatlasInputError(
                    f"{what}: hex layout needs row + column of one parity (Visium array "
                    "coordinates); use layout='square' or 'irregular'"
                )
            axial = np.column_stack([cells[:, 0], (cells[:, 1] - cells[:, 0]) // 2])
            local = _lattice_table(axial, offsets, what)
        elif used == "square":
            local = _lattice_table(xy.astype(np.int64), offsets, what)
        else:
            local = _irregular_table(xy, offsets)
        table[members] = np.where(local >= 0, members[np.maximum(local, 0)], -1)
        layouts[str(name)] = used
    return table, layouts


def gather_windows(
    X: np.ndarray, table: np.ndarray, rows: np.ndarray | None = None, *, fill: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Feature windows of some spots, gathered from a neighbourhood table.

    Parameters
    ----------
    X
        Per-spot features, shape ``(N, C)``.
    table
        Neighbourhood table from :func:`neighbourhood_table`, shape ``(N, w²)``.
    rows
        Spots whose windows to build (a mini-batch); ``None`` for all.
    fill
        Value of empty cells in the feature channels.

    Returns
    -------
    ``(windows, mask)``: ``windows`` float32 of shape ``(B, C, w, w)``; ``mask`` float32 of shape
    ``(B, 1, w, w)``, 1 where a spot sits and 0 for empty cells.
    """
    X = np.asarray(X, dtype=np.float32)
    idx = table if rows is None else table[np.asarray(rows)]
    w = math.isqrt(table.shape[1])
    valid = idx >= 0
    out = X[np.maximum(idx, 0)]  # (B, w², C)
    out[~valid] = fill
    windows = np.ascontiguousarray(out.transpose(0, 2, 1)).reshape(idx.shape[0], -1, w, w)
    mask = valid.astype(np.float32).reshape(idx.shape[0], 1, w, w)
    return windows, mask


def build_neighbourhoods(
    adata: AnnData,
    *,
    window: int = 5,
    layout: Layout = "auto",
    coords: str | Sequence[str] | None = None,
    sample_key: str | None = K.SAMPLE,
    key_added: str | None = None,
) -> str:
    """Per-sample ``window x window`` neighbourhood table of every spot (see the module doc).

    Parameters
    ----------
    adata
        Cohort.
    window
        Odd window side ``w`` (reference: 5 or 7).
    layout
        ``auto`` (per sample: ``hex`` for Visium array coordinates, ``square`` for other integer
        coordinates, ``irregular`` otherwise), or one of ``hex``, ``square``, ``irregular``.
    coords
        Where the coordinates are: two ``obs`` columns, or an ``obsm`` key. Default:
        ``obs[['array_row', 'array_col']]`` when present, else ``obsm['spatial']``.
    sample_key
        ``obs`` column of the sample; windows never cross samples. ``None``: one sample.
    key_added
        ``obsm`` key of the table; default ``neighbourhood_w{window}``.

    Returns
    -------
    The ``obsm`` key written. Writes ``obsm[key_added]`` (``int32``, ``(N, w²)``, ``-1`` for empty
    cells) and ``uns['spatlas']['neighbourhoods'][key_added]`` (window, coordinates used, layout
    per sample, share of window cells holding a spot).
    """
    xy, where = _coordinates(adata, coords)
    if sample_key is not None and sample_key not in adata.obs:
        raise SpatlasInputError(
            f"sample column {sample_key!r} is not in adata.obs; pass sample_key=None for one sample"
        )
    groups = None if sample_key is None else adata.obs[sample_key].astype(str).to_numpy()
    table, layouts = neighbourhood_table(xy, groups, window=window, layout=layout)
    key_added = key_added or K.neighbourhood_key(window)
    adata.obsm[key_added] = table.astype(np.int32)
    filled = float((table >= 0).mean()) if table.size else 0.0
    adata.uns.setdefault(K.UNS, {}).setdefault("neighbourhoods", {})[key_added] = {
        "window": int(window),
        "coords": where,
        "sample_key": sample_key or "",
        "layouts": layouts,
        "fraction_filled": filled,
    }
    kinds = sorted(set(layouts.values()))
    logger.info(
        "neighbourhoods: %dx%d windows on %s (%s), %.0f%% of cells hold a spot -> obsm['%s']",
        window,
        window,
        where,
        "/".join(kinds),
        100 * filled,
        key_added,
    )
    return key_added


def _coordinates(adata: AnnData, coords: str | Sequence[str] | None) -> tuple[np.ndarray, str]:
    if coords is None:
        if K.ARRAY_ROW in adata.obs and K.ARRAY_COL in adata.obs:
            coords = (K.ARRAY_ROW, K.ARRAY_COL)
        else:
            coords = K.SPATIAL
    if isinstance(coords, str):
        if coords not in adata.obsm:
            raise SpatlasInputError(
                f"coordinates {coords!r} are not in adata.obsm (available: {list(adata.obsm)})"
            )
        return np.asarray(adata.obsm[coords], dtype=np.float64)[:, :2], f"obsm['{coords}']"
    cols = list(coords)
    missing = [c for c in cols if c not in adata.obs]
    if len(cols) != 2 or missing:
        raise SpatlasInputError(
            f"coords must be two obs columns or an obsm key; got {cols} (missing: {missing})"
        )
    xy = adata.obs[cols].apply(lambda c: c.astype(np.float64)).to_numpy()
    return xy, f"obs[{cols}]"
