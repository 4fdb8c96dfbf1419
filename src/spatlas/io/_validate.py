"""The checks every reader shares: one line per problem, naming the file, what is wrong and the fix.

Checks on loaded data return a list of one-line problems (empty when all is well); checks on files
raise :class:`~spatlas.SpatlasInputError` before a reader trusts them; :func:`reading` turns any
exception a third-party reader raises into one such line.
"""

from __future__ import annotations

import gzip
import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import SpatlasInputError

GZIP_MAGIC = b"\x1f\x8b"
# obs columns that, with several values, name the sections of a multi-section file
SECTION_COLUMNS = (
    "section",
    "section_id",
    "slice",
    "slice_id",
    "sample",
    "sample_id",
    "sample_name",
    "library_id",
    "slide",
    "slide_id",
    "capture_area",
)
# a Visium / legacy ST spot barcode inside a spot id (``AAAC...-1``, ``151673_AAAC...-1``)
_BARCODE_CORE = r"([ACGT]{16,})"
# share of spots whose nearest spot of another group is closer than half the spot pitch, above
# which the groups overlap in space (several sections in one coordinate frame)
_OVERLAP_SHARE = 0.05


def _brief(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(err).__name__}: {text}"


@contextmanager
def reading(path: str | Path, what: str, fix: str) -> Iterator[None]:
    """Turn any exception a reader raises on ``path`` into one line: file, what, fix.

    Parameters
    ----------
    path
        The file being read (named first in the line).
    what
        What the file should be, e.g. ``"count matrix (matrix.mtx)"``.
    fix
        How to fix it, e.g. ``"copy it again from the Space Ranger run"``.

    Raises
    ------
    SpatlasInputError
        ``{path}: cannot read {what} ({ExceptionType}: message); {fix}`` (or, for a
        ``MemoryError``, that the file is too large to load); spatlas' own errors pass unchanged.
    """
    try:
        yield
    except SpatlasInputError:
        raise
    except MemoryError:
        raise SpatlasInputError(f"{path}: {what} is too large to load into memory; {fix}") from None
    except Exception as err:  # third-party readers raise many types for a damaged file
        raise SpatlasInputError(f"{path}: cannot read {what} ({_brief(err)}); {fix}") from None


def open_maybe_gzip(path: str | Path) -> IO[bytes]:
    """Open a file for binary reading, decompressing it when its first bytes say gzip.

    A file named ``.gz`` that is not gzip-compressed is refused (it is damaged, or was renamed).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == GZIP_MAGIC:
        return gzip.open(path, "rb")
    if path.suffix == ".gz":
        raise SpatlasInputError(
            f"{path}: named .gz but not gzip-compressed (first bytes {magic!r}); compress it "
            f"with gzip, or drop the .gz from its name if it is plain text"
        )
    return open(path, "rb")


def first_duplicate(values: Sequence | pd.Index | np.ndarray) -> tuple[str, int, int, int] | None:
    """The first value that occurs twice: (value, first position, second position, repeats).

    Positions are 0-based; ``repeats`` counts the entries that repeat an earlier one. ``None``
    when every value is unique.
    """
    index = pd.Index(np.asarray(values, dtype=object))
    repeated = index.duplicated()
    if not repeated.any():
        return None
    second = int(np.flatnonzero(repeated)[0])
    value = index[second]
    first = int(np.flatnonzero(index == value)[0])
    return str(value), first, second, int(repeated.sum())


def _more(repeats: int) -> str:
    return f", and {repeats - 1} more repeat(s)" if repeats > 1 else ""


def check_unique(
    values: Sequence | pd.Index | np.ndarray, *, what: str, where: str, units: str, fix: str
) -> list[str]:
    """One problem line when a value of ``values`` repeats, naming the value and both places.

    ``units`` names the positions (``"entries"``, ``"rows"``, ``"spots"``), counted from 1.
    """
    dup = first_duplicate(values)
    if dup is None:
        return []
    value, first, second, repeats = dup
    return [
        f"{where}: {what} {value} appears twice ({units} {first + 1} and {second + 1}"
        f"{_more(repeats)}); {fix}"
    ]


def _number(value) -> float | None:
    """``value`` as a float when it is a number (not a bool, not a string), else None."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_scalefactors(
    scalefactors: dict, *, where: str, required: Sequence[str] = (), fix: str = ""
) -> list[str]:
    """Scale factors (``scalefactors_json.json``) must be positive, finite numbers.

    Every key in ``required`` must be present; every ``*_scalef``, ``*_fullres`` and ``*_um``
    key present must be a number (not a string or boolean) above 0.
    """
    fix = fix or "use the scalefactors_json.json that Space Ranger wrote for this sample"
    problems = [
        f"{where}: lacks {key} (Space Ranger writes it for every sample); {fix}"
        for key in required
        if key not in scalefactors
    ]
    for key, value in scalefactors.items():
        if not str(key).endswith(("_scalef", "_fullres", "_um", "microns_per_pixel")):
            continue
        number = _number(value)
        if number is None:
            problems.append(
                f"{where}: {key} is {value!r} ({type(value).__name__}), not a number; write it "
                f"as a plain JSON number, or {fix}"
            )
        elif not math.isfinite(number) or number <= 0:
            problems.append(
                f"{where}: {key} is {value!r}; it must be a positive finite number ({fix})"
            )
    return problems


def _values(X) -> np.ndarray:
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def check_counts(X, *, where: str, chunk: int = 1 << 24) -> list[str]:
    """Raw UMI counts must be finite, non-negative integers.

    The stored values are checked ``chunk`` at a time, so the temporaries stay small whatever
    the size of ``X``.
    """
    values = _values(X)
    if values.size == 0:
        return []
    if not np.issubdtype(values.dtype, np.number):
        return [f"{where}: counts have non-numeric dtype {values.dtype}"]
    floating = np.issubdtype(values.dtype, np.floating)
    n_nan = n_neg = 0
    minimum, fraction = np.inf, None
    for start in range(0, values.size, chunk):
        part = values[start : start + chunk]
        if floating:
            finite = np.isfinite(part)
            if not finite.all():
                n_nan += int(np.count_nonzero(~finite))
                part = part[finite]
        negative = part < 0
        if negative.any():
            n_neg += int(np.count_nonzero(negative))
            minimum = min(minimum, float(part.min()))
        if floating and fraction is None:
            frac = part != np.round(part)
            if frac.any():
                fraction = part[frac][0]
    problems = []
    if n_nan:
        problems.append(
            f"{where}: {n_nan} count values are NaN or infinite; raw UMI counts are finite"
        )
    if n_neg:
        problems.append(
            f"{where}: {n_neg} count values are negative (min {minimum:g}); spatlas needs raw "
            "UMI counts, not scaled or centred data"
        )
    if fraction is not None:
        problems.append(
            f"{where}: counts are not integers (e.g. {fraction:g}); spatlas needs raw UMI "
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


def check_spot_ids(obs_names: Sequence[str] | pd.Index, *, where: str) -> list[str]:
    """Spot ids (barcodes) must be unique: a repeated one would give two rows one spot id."""
    return check_unique(
        obs_names,
        what="spot id",
        where=where,
        units="spots",
        fix="each spot must appear once (were two sections concatenated without unique names?)",
    )


def _groups_overlap(xy: np.ndarray, groups: np.ndarray) -> float:
    """Share of spots closer to a spot of another group than half the spot pitch.

    The pitch is the 5th percentile of the distance from a spot to its nearest spot of the same
    group (the lattice step, also when a group is a sparse subset). Groups that are regions of one
    section never come closer than a step (share 0); sections stacked in one coordinate frame
    interleave (a large share).
    """
    from scipy.spatial import cKDTree

    codes, _ = pd.factorize(groups)
    own = []
    for g in np.unique(codes):
        members = xy[codes == g]
        if len(members) >= 2:
            d, _ = cKDTree(members).query(members, k=2)
            own.append(d[:, 1])
    steps = np.concatenate(own) if own else np.empty(0)
    steps = steps[steps > 0]
    if steps.size == 0:
        return 0.0
    pitch = float(np.quantile(steps, 0.05))
    close = cKDTree(xy).query_pairs(0.5 * pitch, output_type="ndarray")
    if close.size == 0:
        return 0.0
    across = close[codes[close[:, 0]] != codes[close[:, 1]]]
    return float(np.unique(across).size / len(xy))


def check_one_section(
    obs: pd.DataFrame,
    xy: np.ndarray | None,
    *,
    where: str,
    hint: str,
    exclude: Sequence[str] = (),
) -> list[str]:
    """Evidence that a table said to hold one section holds several (a cohort read as a sample).

    Evidence: the spot barcode inside the spot ids repeats (``AAAC...-1`` in two sections); two
    spots share an array position (``array_row``, ``array_col``); or an obs column naming
    sections (``section``, ``slice``, ``sample_id``, ...; not those in ``exclude``) has several
    values whose spots overlap in space.

    Parameters
    ----------
    obs
        The spots' obs table (index: spot ids).
    xy
        Spot centres (n, 2), or None.
    where
        Prefix of the problem line.
    hint
        How to give the file as several samples (ends the line; ``{column}`` is filled with the
        column naming the sections, when one is found).
    exclude
        obs columns not to read as section names (the sample / donor keys already used).
    """
    columns = [
        c
        for c in obs.columns
        if str(c).lower() in SECTION_COLUMNS and c not in exclude and obs[c].nunique() > 1
    ]
    column = columns[0] if columns else None
    evidence = []
    names = pd.Series(obs.index.astype(str))
    core = names.str.extract(_BARCODE_CORE, expand=False)
    if core.notna().mean() >= 0.9:
        dup = first_duplicate(core.dropna())
        if dup is not None:
            value, first, second, repeats = dup
            kept = names[core.notna()].to_numpy()
            evidence.append(
                f"spot barcode {value} occurs in spots {kept[first]} and {kept[second]} "
                f"({repeats} repeats)"
            )
    if not evidence and {"array_row", "array_col"} <= set(obs.columns):
        positions = obs["array_row"].astype(str) + "," + obs["array_col"].astype(str)
        dup = first_duplicate(positions.to_numpy())
        if dup is not None:
            value, first, second, repeats = dup
            evidence.append(
                f"spots {obs.index[first]} and {obs.index[second]} share array position "
                f"({value}) ({repeats} repeats)"
            )
    if not evidence and column is not None and xy is not None and np.isfinite(xy).all():
        share = _groups_overlap(xy, obs[column].astype(str).to_numpy())
        if share >= _OVERLAP_SHARE:
            evidence.append(
                f"obs['{column}'] has {obs[column].nunique()} values whose spots overlap in "
                f"space ({share:.0%} of spots lie within half a spot of another {column}'s)"
            )
    if not evidence:
        return []
    split = (
        hint.format(column=column)
        if column is not None
        else hint.format(column="<the obs column naming each spot's section>")
    )
    return [f"{where}: holds several sections, not one ({evidence[0]}); {split}"]
