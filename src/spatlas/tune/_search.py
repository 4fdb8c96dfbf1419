"""Nested cross-validation grid search: tune on one side of a fold, score the winner on the other.

Layout of a search folder (``spatlas tune`` / ``spatlas benchmark`` ``--out DIR``)::

    search.json        what was searched (config, pipelines, folds, input fingerprint);
                       a rerun must match it
    config.yaml        the resolved config
    splits.csv         fold, role (tune / test), groups, samples
    trials.csv         every trial: pipeline, fold, parameters, tuning-side scores
    chosen.csv         the winning parameters per pipeline and fold
    test_scores.csv    the winner's scores per pipeline, fold and test group
    summary.csv        test ARI per group (mean over the folds testing it) and pipeline
    summary.md/.png    the same as a Markdown table (with the gains) and a bar plot
    gains.csv          relative gain of each ``<method>+<model>`` over ``<method>``
    tasks.jsonl        every finished task with its seconds
    cache/             prepared sides and the embeddings of finished steps (resume from here),
                       each with its checksum (``<file>.sha256``); ``inputs.npz``: per-spot
                       hashes of the input data (to say what changed)
    report.html        tables, bar plot, config (``spatlas report DIR`` rebuilds it)
    .search.lock       held by the search running in the folder

Each step writes its own cache entry through a temporary name, so an interrupted search keeps
every finished step and a rerun with the same config, the same input data and ``--out``
continues where it stopped.

What a rerun into an existing folder does:

- another config, pipelines or **input data** (the fingerprint of what the search read, see
  :mod:`spatlas.tune._inputs`): refused, naming what changed (``labels changed in 12 spots``);
  the old search is left as it was. Recomputing in place would silently replace the old
  results, so the user chooses: a new ``--out``, or delete the folder to start over. Every cache
  key also holds the input fingerprint, so no step is ever reused for other data.
- a cache entry that is truncated, emptied or damaged: logged ("cache entry X is corrupt:
  recomputing"), removed and recomputed (see :mod:`spatlas.tune._cache`); a ``search.json``
  that cannot be read is refused (the folder cannot be checked against the search).
- a search still running in the folder: refused (the folder's lock is held).
- SIGINT / SIGTERM: the workers are terminated at once, one line is logged, and the search
  raises :class:`~spatlas.tune.SearchInterrupted` (SIGINT) or exits with status 143 (SIGTERM,
  whose default is to end the process); every finished step is kept and a rerun resumes.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import _keys as K
from .._config import Config, config_to_dict
from .._errors import ConfigError, SpatlasInputError
from .._logging import add_file_handler, logger
from .._progress import progress
from ..io._write import atomic_path
from ._backends import BACKENDS, SearchInterrupted, make_backend, stop_on_signals
from ._cache import entry_ok, entry_problem, remove_temporaries, write_entry
from ._grid import (
    Pipeline,
    apply_point,
    grid_points,
    pipeline_config,
    pipeline_grid,
    point_label,
    stable_hash,
    validate,
)
from ._inputs import describe_changes, fingerprint, inputs_key
from ._splits import Fold, check_folds, donor_splits, sample_groups, side_samples
from ._tasks import save_json


def model_cache_key(integrate_key: str, model: Mapping, k: int) -> str:
    """Cache key of a model step: its input, its config section, K and the model's defaults.

    The defaults are part of the key so that a spatlas whose model defaults changed does not
    resume a search from model outputs computed under the old ones.
    """
    from ..models import get_model

    init, train = get_model(model["name"]).parameters()
    return stable_hash("model", integrate_key, dict(model), k, init, train)


SPEC_FILE = "search.json"
LOCK_FILE = ".search.lock"
INPUTS_FILE = "cache/inputs.npz"
TASK_LOG = "tasks.jsonl"
LEVELS = ("integrate", "model", "score")
TABLE_METRICS = ("composite", "ari", "nmi", "asw_label", "ilisi", "kbet", "ari_donor")


@dataclass
class SearchResult:
    """What a search produced (the same tables are written to its folder)."""

    out: Path
    trials: pd.DataFrame
    chosen: pd.DataFrame
    test: pd.DataFrame
    summary: pd.DataFrame
    seconds: float


@dataclass
class _Trial:
    pipeline: str
    fold: int
    role: str  # tune | test
    side: str
    point: dict
    score_key: str


def tune(
    config: Config,
    *,
    out: str | Path,
    backend: str | None = None,
    n_workers: int | None = None,
    address: str | None = None,
) -> SearchResult:
    """Tune the pipeline of ``config`` (its integration method and model) by nested CV.

    Parameters
    ----------
    config
        A run config with a ``tune`` section (task, group key, grids, backend).
    out
        Search folder; a rerun with the same config and input data continues an interrupted
        search (another config or other data is refused; see the module doc).
    backend, n_workers, address
        Override ``tune.backend``, ``tune.n_workers``, ``tune.address``.

    Returns
    -------
    SearchResult

    Raises
    ------
    SpatlasInputError
        ``out`` holds another search (config or input data), is in use or is not writable.
    SearchInterrupted
        SIGINT reached the search (SIGTERM exits with status 143); see the module doc.
    """
    integ, model = _pipeline().integration_method(config), config.model.name or "none"
    name = integ if model == "none" else f"{integ}+{model}"
    return search(
        config,
        [Pipeline(name, integ, model)],
        out=out,
        kind="tune",
        backend=backend,
        n_workers=n_workers,
        address=address,
    )


def benchmark(
    config: Config,
    *,
    out: str | Path,
    backend: str | None = None,
    n_workers: int | None = None,
    address: str | None = None,
) -> SearchResult:
    """The paper's Figure-2 comparison: each of ``benchmark.methods`` alone and + the model.

    Every pipeline is tuned by the same nested cross-validation; steps shared between pipelines
    (the integration of a side with the same parameters) run once.
    """
    bench = config.benchmark
    if not bench.methods:
        raise ConfigError("benchmark.methods: name at least one integration method")
    pipelines = []
    for method in bench.methods:
        pipelines.append(Pipeline(method, method))
        if bench.model not in ("", "none"):
            pipelines.append(Pipeline(f"{method}+{bench.model}", method, bench.model))
    return search(
        config,
        pipelines,
        out=out,
        kind="benchmark",
        backend=backend,
        n_workers=n_workers,
        address=address,
    )


def search(
    config: Config,
    pipelines: Sequence[Pipeline],
    *,
    out: str | Path,
    kind: str = "tune",
    backend: str | None = None,
    n_workers: int | None = None,
    address: str | None = None,
) -> SearchResult:
    """Nested-CV grid search of ``pipelines`` on the cohort of ``config``; see the module doc."""
    start = time.perf_counter()
    t = config.tune
    backend = backend or t.backend
    n_workers = n_workers or t.n_workers
    address = address or t.address
    if backend not in BACKENDS:
        raise ConfigError(
            f"tune.backend: unknown backend '{backend}' (known: {', '.join(BACKENDS)})"
        )
    from .. import pipeline as run_pipeline

    base = config_to_dict(config)
    morphology = bool(config.morphology.enabled)
    plans = {}
    for p in pipelines:
        pbase = pipeline_config(base, p, t.fixed)
        grid = pipeline_grid(p, t.grids, morphology=morphology)
        points = grid_points(grid)
        for point in points:  # a bad key or value fails now, not in a worker after hours
            run_pipeline.check_config(validate(apply_point(pbase, point)))
        _check_model(p)
        plans[p.name] = (pbase, points)

    out = Path(out)
    adata = run_pipeline.load_cohort(config)
    if t.group_key not in adata.obs:
        raise SpatlasInputError(
            f"tune.group_key '{t.group_key}' is not an obs column "
            f"(columns: {', '.join(adata.obs.columns)})"
        )
    if K.LABEL not in adata.obs or adata.obs[K.LABEL].isna().all():
        raise SpatlasInputError(
            "the search scores trials by the composite score, which needs labels: give the "
            "cohort a label column (data.label_column or the sample sheet's annotations)"
        )
    folds = donor_splits(adata.obs, task=t.task, group_key=t.group_key, n_folds=t.n_folds)
    check_folds(adata.obs, folds, group_key=t.group_key)
    groups = sample_groups(adata.obs, group_key=t.group_key)
    k = run_pipeline._n_clusters(config, adata)
    if not isinstance(k, int):
        raise ConfigError("the search needs a fixed number of domains: set clustering.n_clusters")
    # what the search read: a rerun on other data must not resume from these steps
    digests, per_spot = fingerprint(adata, morphology=base["morphology"] if morphology else None)
    # where the steps run does not change their results: a search may resume on another backend
    spec_config = copy.deepcopy(base)
    for key in ("backend", "n_workers", "address"):
        spec_config["tune"].pop(key, None)
    spec = {
        "kind": kind,
        "config": spec_config,
        "pipelines": [p.__dict__ for p in pipelines],
        "folds": [{"tune": f.tune_groups, "test": [list(s) for s in f.test_sides]} for f in folds],
        "n_clusters": k,
        "inputs": digests,
    }
    side_base = stable_hash(
        inputs_key(digests),
        {name: v for name, v in spec_config.items() if name not in ("tune", "benchmark")},
    )
    resumed, lock = _open_folder(out, spec, per_spot)
    handler = add_file_handler(out / "search.log")
    try:
        with stop_on_signals():
            logger.info(
                "%s: %d pipeline(s), %d fold(s) (%s by '%s'), %d domains, backend %s%s",
                kind,
                len(pipelines),
                len(folds),
                t.task,
                t.group_key,
                k,
                backend,
                " (resuming)" if resumed else "",
            )
            _write_splits(out, folds, groups)
            sides = _prepare_sides(config, adata, folds, groups, out, side_base)
            del adata
            runner = make_backend(backend, n_workers=n_workers, address=address, threads=t.threads)
            try:
                trials, chosen, test_trials, ctx = _run_trials(
                    runner, plans, pipelines, folds, sides, out, k, config, kind
                )
            except BaseException:
                runner.close(abort=True)  # a failure or a signal: do not wait for the workers
                raise
            runner.close()
            test = _test_table(test_trials, ctx, groups)
            summary = summarize(test)
            seconds = time.perf_counter() - start
            _write_tables(out, trials, chosen, test, summary, config)
            _write_report(out)
            logger.info("%s written to %s in %.0f s", kind, out, seconds)
            if len(summary):
                logger.info("test ARI per group:\n%s", summary.to_string(float_format="%.3f"))
    except SearchInterrupted as err:
        logger.error(
            "%s stopped by %s: its worker processes were stopped; the finished steps are kept "
            "in %s and the same command resumes the search",
            kind,
            err.name,
            out,
        )
        if err.signum == signal.SIGTERM:  # SIGTERM's default is to end the process
            raise SystemExit(err.exit_code) from None
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
        _release(lock)
    return SearchResult(out, trials, chosen, test, summary, seconds)


def _run_trials(
    runner: Any,
    plans: Mapping[str, tuple[dict, list[dict]]],
    pipelines: Sequence[Pipeline],
    folds: Sequence[Fold],
    sides: dict[str, str],
    out: Path,
    k: int,
    config: Config,
    kind: str,
) -> tuple[pd.DataFrame, pd.DataFrame, list[_Trial], _Context]:
    """Tune every pipeline on each fold's tuning side, then test the winners."""
    t = config.tune
    ctx = _Context(out, sides, k, t.lam, t.threads, config.data.exclude_labels)
    tune_trials, tasks = [], {}
    for p in pipelines:
        pbase, points = plans[p.name]
        for fold in folds:
            side = _side_id(fold.tune_groups)
            for point in points:
                cfg = apply_point(pbase, point)
                tune_trials.append(ctx.chain(p.name, fold.index, "tune", side, point, cfg, tasks))
    n_points = {name: len(points) for name, (_, points) in plans.items()}
    logger.info(
        "%s: grid points per fold: %s; %d distinct steps",
        kind,
        ", ".join(f"{name} {n}" for name, n in n_points.items()),
        len(tasks),
    )
    _execute(runner, tasks, out, desc="tuning")
    trials = _trial_table(tune_trials, ctx)
    chosen = _choose(trials, folds)
    test_trials, tasks = [], {}
    for row in chosen.itertuples():
        pbase, points = plans[row.pipeline]
        point = points[row.point_index]
        cfg = apply_point(pbase, point)
        for side_groups in folds[row.fold].test_sides:
            test_trials.append(
                ctx.chain(row.pipeline, row.fold, "test", _side_id(side_groups), point, cfg, tasks)
            )
    _execute(runner, tasks, out, desc="testing")
    return trials, chosen, test_trials, ctx


def _check_model(p: Pipeline) -> None:
    if p.model != "none":
        from .. import models

        models.get_model(p.model)


# -- the folder --------------------------------------------------------------------------------


def _open_folder(out: Path, spec: dict, per_spot: Mapping[str, np.ndarray]) -> tuple[bool, Any]:
    """Claim ``out``: create it, or accept it for resuming; return (resuming, the folder lock).

    See the module doc for what is refused. Nothing in a refused folder is changed (the lock
    file aside, in a search folder).
    """
    if out.exists() and not out.is_dir():
        raise SpatlasInputError(f"--out {out}: a file of that name exists; choose a folder name")
    if out.is_dir() and not (out / SPEC_FILE).exists() and _foreign_files(out):
        raise _not_a_search_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock(out)
    except OSError as err:
        raise SpatlasInputError(
            f"--out {out}: cannot write there ({err.strerror or err}); choose a writable folder"
        ) from None
    try:
        return _check_folder(out, spec, per_spot), lock
    except BaseException:
        _release(lock)
        raise


def _foreign_files(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name != LOCK_FILE]


def _not_a_search_folder(out: Path) -> SpatlasInputError:
    return SpatlasInputError(
        f"--out {out}: folder exists, is not empty and is not a spatlas search folder; "
        f"choose a new folder (nothing in it was changed)"
    )


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _check_folder(out: Path, spec: dict, per_spot: Mapping[str, np.ndarray]) -> bool:
    """Under the folder's lock: compare ``search.json`` with ``spec`` or start a new search."""
    spec_path = out / SPEC_FILE
    if not spec_path.exists():
        if _foreign_files(out):  # appeared since the first look
            raise _not_a_search_folder(out)
        (out / "cache").mkdir(parents=True, exist_ok=True)
        _save_inputs(out, per_spot)
        save_json(spec_path, _canonical(spec))
        return False
    try:
        old = _read_spec(spec_path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SpatlasInputError(
            f"--out {out}: its {SPEC_FILE} is unreadable ({_first_line(err)}), so the folder "
            f"cannot be checked against this search; choose a new --out, or delete {out} to "
            f"start over"
        ) from None
    new = _canonical(spec)

    def differs(*keys: str) -> bool:
        return any(old.get(key) != new.get(key) for key in keys)

    if differs("kind", "config", "pipelines"):
        raise SpatlasInputError(
            f"--out {out}: holds a search with a different config, pipelines or folds; "
            f"choose a new folder to start this one (the old search was not changed)"
        )
    if not isinstance(old.get("inputs"), dict):
        raise SpatlasInputError(
            f"--out {out}: holds a search from an older spatlas that did not record its input "
            f"data, so it cannot be resumed safely; choose a new --out"
        )
    if differs("inputs"):
        what = describe_changes(old["inputs"], new["inputs"], _load_inputs(out), per_spot)
        raise SpatlasInputError(
            f"--out {out}: the search folder was made from different input data ({what}); "
            f"choose a new --out for these data, or delete {out} to start over (the old "
            f"search was not changed)"
        )
    if differs("folds", "n_clusters"):
        raise SpatlasInputError(
            f"--out {out}: holds a search with a different config, pipelines or folds; "
            f"choose a new folder to start this one (the old search was not changed)"
        )
    left = remove_temporaries(out)  # written by a killed search; we hold the lock
    if left:
        logger.info("removed %d temporary file(s) of an interrupted search", left)
    if not entry_ok(out / INPUTS_FILE, root=out):
        _save_inputs(out, per_spot)
    _repair_task_log(out)
    logger.info("resuming the search in %s", out)
    return True


def _save_inputs(out: Path, per_spot: Mapping[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **per_spot)

    write_entry(out / INPUTS_FILE, write)


def _load_inputs(out: Path) -> dict[str, np.ndarray] | None:
    """The per-spot hashes of the folder's input data (None when lost or damaged)."""
    path = out / INPUTS_FILE
    if not path.exists() or entry_problem(path) is not None:
        return None
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _repair_task_log(out: Path) -> None:
    """Drop lines of ``tasks.jsonl`` that an interrupted append left unreadable."""
    path = out / TASK_LOG
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    good = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            continue
        good.append(line)
    if len(good) < len(lines):
        logger.warning(
            "%s: dropped %d unreadable line(s) left by an interrupted write",
            TASK_LOG,
            len(lines) - len(good),
        )
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in good), encoding="utf-8")


def _lock(out: Path) -> Any:
    """Hold ``out/.search.lock`` (released when the process ends, however it ends)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no claim on the folder
        return None
    fh = open(out / LOCK_FILE, "a+")  # held until the search ends
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        raise SpatlasInputError(
            f"--out {out}: another spatlas search is running in this folder"
            + (f" (pid {holder})" if holder.isdigit() else "")
            + "; wait for it to finish or choose another --out"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def _release(lock: Any) -> None:
    if lock is not None:
        lock.close()


def _side_id(groups: Iterable[str]) -> str:
    return "side-" + "+".join(sorted(groups))


def _write_splits(out: Path, folds: Sequence[Fold], groups: dict[str, list[str]]) -> None:
    rows = []
    for fold in folds:
        rows.append(
            {
                "fold": fold.index,
                "role": "tune",
                "groups": " ".join(fold.tune_groups),
                "samples": " ".join(side_samples(groups, fold.tune_groups)),
            }
        )
        for side in fold.test_sides:
            rows.append(
                {
                    "fold": fold.index,
                    "role": "test",
                    "groups": " ".join(side),
                    "samples": " ".join(side_samples(groups, side)),
                }
            )
    _write_csv(pd.DataFrame(rows), out / "splits.csv")


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.4f")


# -- sides -------------------------------------------------------------------------------------


def _prepare_sides(
    config: Config,
    adata,
    folds: Sequence[Fold],
    groups: dict[str, list[str]],
    out: Path,
    base_key: str,
) -> dict[str, str]:
    """Preprocess each side on its own spots only (no leakage) and write it to the cache.

    A side's file is keyed by its groups and ``base_key`` (the input data and the config it
    is prepared with), so every step computed from it is keyed on them too.
    """
    from .. import pipeline as run_pipeline

    wanted: dict[str, tuple[str, ...]] = {}
    for fold in folds:
        wanted[_side_id(fold.tune_groups)] = fold.tune_groups
        for side in fold.test_sides:
            wanted[_side_id(side)] = side
    folder = out / "cache" / "sides"
    folder.mkdir(parents=True, exist_ok=True)
    keys = {sid: stable_hash("side", sid, base_key) for sid in wanted}
    paths = {sid: str(folder / f"{sid}-{keys[sid]}.h5ad") for sid in wanted}
    todo = [sid for sid in wanted if not entry_ok(paths[sid], root=out)]
    if not todo:
        return paths
    if config.morphology.enabled:
        run_pipeline.morphology_features(config, adata)
    samples = adata.obs[K.SAMPLE].astype(str).to_numpy()
    for sid in progress(todo, desc="preparing sides"):
        side = adata[np.isin(samples, side_samples(groups, wanted[sid]))].copy()
        run_pipeline.preprocess(config, side)
        if config.morphology.enabled:
            run_pipeline.morphology_embedding(config, side)
        slim = side[:, side.var[K.HVG].to_numpy()].copy()
        slim.uns = {}
        for key in list(slim.obsm):
            if key == K.MORPH_FEATURES:
                del slim.obsm[key]
        slim.varm = {}
        write_entry(paths[sid], lambda tmp, slim=slim: slim.write_h5ad(tmp, compression=None))
        logger.info("side %s: %d spots, %d samples", sid, slim.n_obs, slim.obs[K.SAMPLE].nunique())
    return paths


# -- tasks -------------------------------------------------------------------------------------


class _Context:
    """Builds the task chain of a trial and finds its outputs."""

    def __init__(self, out, sides, n_clusters, lam, threads, exclude_labels):
        self.out = out
        self.sides = sides
        self.k = n_clusters
        self.lam = lam
        self.threads = threads
        self.exclude = list(exclude_labels)
        for level in LEVELS:
            (out / "cache" / level).mkdir(parents=True, exist_ok=True)

    def path(self, level: str, key: str) -> Path:
        suffix = ".json" if level == "score" else ".npy"
        return self.out / "cache" / level / f"{key}{suffix}"

    def chain(
        self,
        pipeline: str,
        fold: int,
        role: str,
        side: str,
        point: dict,
        cfg: dict,
        tasks: dict[str, dict],
    ) -> _Trial:
        """Add the trial's steps to ``tasks`` (keyed, so shared steps run once)."""
        label = f"{pipeline} fold{fold} {role} {side}"
        cfg["clustering"]["n_clusters"] = self.k  # one K for every side (from the whole cohort)
        common = {"side": self.sides[side], "config": cfg, "threads": self.threads, "label": label}
        # the side's file name holds its key (its groups, the input data and the config)
        side_key = Path(self.sides[side]).stem
        ikey = stable_hash("integrate", side_key, cfg["seed"], cfg["integration"])
        tasks.setdefault(
            ikey,
            {
                **common,
                "kind": "integrate",
                "key": ikey,
                "output": str(self.path("integrate", ikey)),
            },
        )
        last, last_level = ikey, "integrate"
        if cfg["model"]["name"] not in ("", "none"):
            mkey = model_cache_key(ikey, cfg["model"], self.k)
            tasks.setdefault(
                mkey,
                {
                    **common,
                    "kind": "model",
                    "key": mkey,
                    "n_clusters": self.k,
                    "input": str(self.path("integrate", ikey)),
                    "output": str(self.path("model", mkey)),
                },
            )
            last, last_level = mkey, "model"
        skey = stable_hash("score", last, cfg["clustering"], self.lam, self.exclude, self.k)
        tasks.setdefault(
            skey,
            {
                **common,
                "kind": "score",
                "key": skey,
                "n_clusters": self.k,
                "lam": self.lam,
                "input": str(self.path(last_level, last)),
                "output": str(self.path("score", skey)),
            },
        )
        return _Trial(pipeline, fold, role, side, point, skey)

    def table(self, trial: _Trial) -> pd.DataFrame:
        payload = json.loads(self.path("score", trial.score_key).read_text())
        return pd.DataFrame(payload["table"])


def _execute(runner, tasks: Mapping[str, dict], out: Path, *, desc: str) -> None:
    """Run the missing steps level by level (integrate, then model, then score).

    A step is missing when its cache entry is absent or corrupt (a corrupt one is removed).
    """
    for level in LEVELS:
        level_tasks = [t for t in tasks.values() if t["kind"] == level]
        todo = [t for t in level_tasks if not entry_ok(t["output"], root=out)]
        if not level_tasks:
            continue
        logger.info(
            "%s: %d %s step(s), %d already done",
            desc,
            len(level_tasks),
            level,
            len(level_tasks) - len(todo),
        )
        if not todo:
            continue
        log = out / TASK_LOG
        for result in progress(runner.run(todo), desc=f"{desc}: {level}", total=len(todo)):
            line = json.dumps({**result, "seconds": round(result["seconds"], 2)}) + "\n"
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(line)


# -- tables ------------------------------------------------------------------------------------


def _trial_table(trials: Sequence[_Trial], ctx: _Context) -> pd.DataFrame:
    rows = []
    index: dict[tuple[str, int], int] = {}
    for trial in trials:
        i = index.get((trial.pipeline, trial.fold), 0)
        index[(trial.pipeline, trial.fold)] = i + 1
        table = ctx.table(trial)
        mean = table.loc[table["sample"] == "mean"].iloc[0]
        rows.append(
            {
                "pipeline": trial.pipeline,
                "fold": trial.fold,
                "point_index": i,
                "side": trial.side,
                **point_label(trial.point),
                **{m: float(mean[m]) for m in TABLE_METRICS},
                "trial": trial.score_key,
            }
        )
    return pd.DataFrame(rows)


def _choose(trials: pd.DataFrame, folds: Sequence[Fold]) -> pd.DataFrame:
    """The trial with the highest composite per pipeline and fold (first in grid order on ties)."""
    rows = []
    for (pipeline, fold), part in trials.groupby(["pipeline", "fold"], sort=False):
        scores = part["composite"].to_numpy(dtype=float)
        if np.isnan(scores).all():
            raise SpatlasInputError(
                f"{pipeline}, fold {fold}: no trial has a composite score (are there labelled "
                f"spots on the tuning side {part['side'].iloc[0]}?)"
            )
        best = part.iloc[int(np.nanargmax(scores))]
        params = {c: best[c] for c in part.columns if "." in c}
        rows.append(
            {
                "pipeline": pipeline,
                "fold": int(fold),
                "tune_groups": " ".join(folds[int(fold)].tune_groups),
                "point_index": int(best["point_index"]),
                **params,
                "tune_composite": float(best["composite"]),
                "tune_ari": float(best["ari"]),
            }
        )
    return pd.DataFrame(rows)


def _test_table(
    trials: Sequence[_Trial], ctx: _Context, groups: dict[str, list[str]]
) -> pd.DataFrame:
    group_of = {s: g for g, samples in groups.items() for s in samples}
    rows = []
    for trial in trials:
        table = ctx.table(trial)
        per_sample = table.loc[~table["sample"].isin(["mean", "all"])].copy()
        per_sample["group"] = per_sample["sample"].map(group_of)
        mean = table.loc[table["sample"] == "mean"].iloc[0]
        for group, part in per_sample.groupby("group", sort=True):
            labelled = part.loc[part["n_labelled"] > 0]
            rows.append(
                {
                    "pipeline": trial.pipeline,
                    "fold": trial.fold,
                    "side": trial.side,
                    "group": group,
                    "n_labelled_samples": len(labelled),
                    "samples": " ".join(labelled["sample"]),
                    "ari": float(labelled["ari"].mean()) if len(labelled) else float("nan"),
                    "nmi": float(labelled["nmi"].mean()) if len(labelled) else float("nan"),
                    "side_ilisi": float(mean["ilisi"]),
                }
            )
    return pd.DataFrame(rows)


def summarize(test: pd.DataFrame, metric: str = "ari") -> pd.DataFrame:
    """Test ``metric`` per group (mean over the folds that test it) x pipeline, plus a mean row."""
    if test.empty:
        return pd.DataFrame()
    order = list(dict.fromkeys(test["pipeline"]))
    wide = test.pivot_table(index="group", columns="pipeline", values=metric, aggfunc="mean")
    wide = wide.dropna(how="all")[order]
    wide.loc["mean"] = wide.mean(axis=0)
    wide.index.name = "group"
    return wide


def gains(summary: pd.DataFrame, *, min_baseline: float = 0.05) -> pd.DataFrame:
    """Relative gain of each ``<method>+<model>`` column over ``<method>``, per row.

    A ratio to a baseline score near zero says nothing, so rows whose baseline is below
    ``min_baseline`` get NaN.
    """
    out = {}
    for column in summary.columns:
        base, _, model = column.partition("+")
        if model and base in summary.columns:
            baseline = summary[base].where(summary[base] >= min_baseline)
            out[f"{column} vs {base}"] = summary[column] / baseline - 1.0
    return pd.DataFrame(out, index=summary.index)


def _write_tables(out, trials, chosen, test, summary, config: Config) -> None:
    import yaml

    _write_csv(trials, out / "trials.csv")
    _write_csv(chosen, out / "chosen.csv")
    _write_csv(test, out / "test_scores.csv")
    _write_csv(summary.reset_index(), out / "summary.csv")
    g = gains(summary)
    if not g.empty:
        _write_csv(g.reset_index(), out / "gains.csv")
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    if not summary.empty:
        _write_summary_md(out / "summary.md", summary, g)
        from .. import pl

        fig = pl.benchmark_bars(summary, title="test ARI per held-out group")
        with atomic_path(out / "summary.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110, facecolor="white")


def _write_summary_md(path: Path, summary: pd.DataFrame, g: pd.DataFrame) -> None:
    """The summary (and gains) as Markdown tables."""

    def table(frame: pd.DataFrame, fmt) -> list[str]:
        head = ["group", *map(str, frame.columns)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, row in frame.iterrows():
            lines.append("| " + " | ".join([str(name), *(fmt(v) for v in row)]) + " |")
        return lines

    lines = ["Test ARI per held-out group (mean over the folds testing it)", ""]
    lines += table(summary, lambda v: "" if pd.isna(v) else f"{v:.3f}")
    if not g.empty:
        lines += ["", "Relative gain of + model over its baseline", ""]
        lines += table(g, lambda v: "n/a" if pd.isna(v) else f"{v * 100:+.0f} %")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _write_report(out: Path) -> None:
    from ..report import build_report

    try:
        build_report(out)
    except Exception as err:  # the tables are written; a missing report must not lose them
        logger.warning(
            "report.html not written (%s: %s); rebuild it with `spatlas report %s`",
            type(err).__name__,
            err,
            out,
        )


def read_search(out: str | Path) -> dict[str, Any]:
    """The tables of a finished search folder (for reports and notebooks).

    Raises
    ------
    SpatlasInputError
        ``search.json`` or a table cannot be read (it names the file; a rerun of the search
        with the same config and ``--out`` rewrites the tables from its cache).
    """
    out = Path(out)
    spec_path = out / SPEC_FILE
    try:
        spec = _read_spec(spec_path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SpatlasInputError(
            f"{spec_path}: unreadable ({_first_line(err)}); is {out} a search folder? A "
            f"damaged one cannot be repaired: rerun the search into a new --out"
        ) from None
    tables: dict[str, Any] = {"spec": spec}
    for name in ("trials", "chosen", "test_scores", "summary", "gains", "splits"):
        path = out / f"{name}.csv"
        try:
            tables[name] = pd.read_csv(path) if path.exists() else None
        except (OSError, UnicodeDecodeError, ValueError) as err:  # pandas' errors included
            raise SpatlasInputError(
                f"{path}: unreadable ({_first_line(err)}); a rerun of the search with the "
                f"same config and --out rewrites it from the cache"
            ) from None
    return tables


def _read_spec(path: Path) -> dict:
    """``search.json`` as a dict (OSError / ValueError when missing, damaged or not an object)."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(spec, dict):
        raise ValueError("not a JSON object")
    return spec


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _pipeline():
    from .. import pipeline

    return pipeline
