"""Nested cross-validation splits grouped by donor (or any other group of samples).

Two tasks, as in the paper (§3.3):

- **multi-donor**: the groups are dealt into folds; each fold tunes on all the other groups
  together and tests on its own held-out groups, processed jointly.
- **single-donor**: each group in turn is the tuning side; every other group is a test side of
  its own (the samples of that group integrated jointly).

A group's spots never appear on both sides of a fold, and the splits depend only on the group
names (sorted), so every backend and every rerun sees the same folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from .. import _keys as K
from .._errors import SpatlasInputError

TASKS = ("multi_donor", "single_donor")
Task = Literal["multi_donor", "single_donor"]


@dataclass(frozen=True)
class Fold:
    """One outer fold: the groups tuned on and the test sides scored with the winner.

    Attributes
    ----------
    index
        Position of the fold (0-based).
    tune_groups
        Groups of the tuning side (processed jointly).
    test_sides
        Each entry is one test side: the groups processed jointly there.
    """

    index: int
    tune_groups: tuple[str, ...]
    test_sides: tuple[tuple[str, ...], ...]

    @property
    def test_groups(self) -> tuple[str, ...]:
        """Every group on the test side of this fold."""
        return tuple(g for side in self.test_sides for g in side)

    @property
    def name(self) -> str:
        """Short label, e.g. ``fold0``."""
        return f"fold{self.index}"


def sample_groups(
    obs: pd.DataFrame, *, group_key: str = K.DONOR, sample_key: str = K.SAMPLE
) -> dict[str, list[str]]:
    """Samples of each group, both sorted by name.

    Raises
    ------
    SpatlasInputError
        If a key is missing, a value is missing, or a sample belongs to several groups.
    """
    for key, what in ((group_key, "group_key"), (sample_key, "sample_key")):
        if key not in obs.columns:
            raise SpatlasInputError(
                f"{what} '{key}' is not an obs column "
                f"(columns: {', '.join(map(str, obs.columns))}); set tune.group_key to "
                f"the column naming each spot's donor (or replicate group)"
            )
    pairs = obs[[sample_key, group_key]]
    if pairs.isna().any().any():
        raise SpatlasInputError(
            f"obs['{group_key}'] or obs['{sample_key}'] has missing values; every spot needs "
            f"a group for a grouped split"
        )
    pairs = pairs.astype(str).drop_duplicates()
    spread = pairs.groupby(sample_key, observed=True)[group_key].nunique()
    mixed = spread[spread > 1].index.tolist()
    if mixed:
        raise SpatlasInputError(
            f"sample(s) {', '.join(mixed)} belong to several '{group_key}' groups; a sample "
            f"must lie in one group so that no group is on both sides of a fold"
        )
    groups: dict[str, list[str]] = {}
    for sample, group in sorted(pairs.itertuples(index=False, name=None)):
        groups.setdefault(group, []).append(sample)
    return dict(sorted(groups.items()))


def donor_splits(
    obs: pd.DataFrame,
    *,
    task: Task = "multi_donor",
    group_key: str = K.DONOR,
    sample_key: str = K.SAMPLE,
    n_folds: int | None = None,
) -> list[Fold]:
    """The outer folds of a donor-grouped nested cross-validation.

    Parameters
    ----------
    obs
        ``adata.obs`` of the whole cohort (one row per spot).
    task
        ``multi_donor`` or ``single_donor`` (see the module docstring).
    group_key
        obs column of the group (donor; or e.g. a replicate pair when there is one donor).
    sample_key
        obs column of the sample id.
    n_folds
        ``multi_donor`` only: number of folds the groups are dealt into (round robin over the
        sorted group names); default one fold per group (leave one group out).

    Returns
    -------
    list of Fold

    Raises
    ------
    SpatlasInputError
        Fewer than two groups; ``n_folds`` out of range; in the single-donor task a group with
        one sample (its tuning side would have nothing to integrate).
    """
    if task not in TASKS:
        raise SpatlasInputError(f"tune.task: unknown task '{task}' (known: {', '.join(TASKS)})")
    groups = sample_groups(obs, group_key=group_key, sample_key=sample_key)
    names = list(groups)
    if len(names) < 2:
        raise SpatlasInputError(
            f"a split grouped by '{group_key}' needs at least 2 groups, the cohort has "
            f"{len(names)} ({', '.join(names)}); group by another column (tune.group_key, e.g. "
            f"a replicate pair) or use `spatlas run` without cross-validation"
        )
    if task == "single_donor":
        if n_folds is not None:
            raise SpatlasInputError(
                "tune.n_folds applies to the multi_donor task only; the single_donor task has "
                "one fold per group"
            )
        single = [g for g in names if len(groups[g]) < 2]
        if single:
            raise SpatlasInputError(
                f"single_donor task: group(s) {', '.join(single)} of '{group_key}' have one "
                f"sample only, so tuning on them integrates nothing and the batch metrics are "
                f"undefined; use the multi_donor task or group by another column"
            )
        return [Fold(i, (g,), tuple((h,) for h in names if h != g)) for i, g in enumerate(names)]
    n = len(names) if n_folds is None else n_folds
    if not isinstance(n, int | np.integer) or not 2 <= n <= len(names):
        raise SpatlasInputError(
            f"tune.n_folds must be between 2 and the number of groups ({len(names)}), got {n_folds}"
        )
    dealt = [names[i::n] for i in range(n)]
    return [
        Fold(i, tuple(g for g in names if g not in held), (tuple(held),))
        for i, held in enumerate(dealt)
    ]


def side_samples(groups: dict[str, list[str]], side: Sequence[str]) -> list[str]:
    """The samples of a side (a tuple of groups), sorted."""
    return sorted(s for g in side for s in groups[g])


def check_folds(obs: pd.DataFrame, folds: Sequence[Fold], *, group_key: str) -> None:
    """Assert that no group and no spot lies on both sides of any fold (raises if so)."""
    values = obs[group_key].astype(str).to_numpy()
    for fold in folds:
        tune = np.isin(values, fold.tune_groups)
        for side in fold.test_sides:
            test = np.isin(values, side)
            both = set(fold.tune_groups) & set(side)
            if both or (tune & test).any():
                raise AssertionError(f"{fold.name}: group(s) {sorted(both)} on both sides")
