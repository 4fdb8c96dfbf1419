"""spatlas.tune: donor-grouped nested cross-validation and grid search.

::

    folds = spatlas.tune.donor_splits(adata.obs, task="multi_donor", group_key="donor")
    result = spatlas.tune.tune(config, out="search/")          # spatlas tune CONFIG --out DIR
    result = spatlas.tune.benchmark(config, out="bench/")      # spatlas benchmark CONFIG --out DIR

The search runs on the ``local`` backend (a process pool) or on ``ray``; both give the same
numbers. See :mod:`spatlas.tune._search` for the layout of a search folder and what a rerun
into it does (resume, or refuse other config / input data); damaged cache entries are
recomputed, and SIGINT / SIGTERM stop the workers at once, keeping every finished step.
"""

from ._backends import (
    BACKENDS,
    LocalBackend,
    RayBackend,
    SearchInterrupted,
    TaskFailed,
    make_backend,
)
from ._grid import (
    CLUSTERING_GRID,
    MODEL_GRIDS,
    Pipeline,
    default_grid,
    grid_points,
    pipeline_grid,
)
from ._search import SearchResult, benchmark, gains, read_search, search, summarize, tune
from ._splits import TASKS, Fold, check_folds, donor_splits, sample_groups

__all__ = [
    "BACKENDS",
    "CLUSTERING_GRID",
    "MODEL_GRIDS",
    "TASKS",
    "Fold",
    "LocalBackend",
    "Pipeline",
    "RayBackend",
    "SearchInterrupted",
    "SearchResult",
    "TaskFailed",
    "benchmark",
    "check_folds",
    "default_grid",
    "donor_splits",
    "gains",
    "grid_points",
    "make_backend",
    "pipeline_grid",
    "read_search",
    "sample_groups",
    "search",
    "summarize",
    "tune",
]
