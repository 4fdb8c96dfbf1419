"""``run(config, out)``: the whole pipeline, composed from the public API only."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import pandas as pd
import scipy.sparse as sp

from . import _keys as K
from ._config import Config, config_to_dict
from ._errors import ConfigError, SpatlasInputError
from ._logging import add_file_handler, logger
from ._resources import peak_rss_mb, release_memory

DATASETS = ("dlpfc_demo", "synthetic")


@dataclass
class RunResult:
    """What a run produced: the cohort, the metrics table (if labelled), step timings."""

    adata: ad.AnnData
    metrics: pd.DataFrame | None
    timings: pd.DataFrame
    out: Path | None = None
    domain_key: str = ""
    steps: list[dict] = field(default_factory=list)


@contextmanager
def _step(name: str, steps: list[dict]) -> Iterator[None]:
    from .io._write import pause_for_tests

    pause_for_tests(name)  # test hook (SPATLAS_TEST_PAUSE_AT): no effect otherwise
    logger.info("step %s ...", name)
    start = time.perf_counter()
    yield
    release_memory()
    seconds = time.perf_counter() - start
    steps.append(
        {"step": name, "seconds": round(seconds, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
    )
    logger.info("step %s done in %.1f s (peak RSS %.0f MB)", name, seconds, peak_rss_mb())


def load_cohort(config: Config, *, counts: bool = True) -> ad.AnnData:
    """Read the cohort the ``data`` section describes.

    With ``data.expression_embedding``, the embedding is read, checked and stored as
    ``obsm['X_input']`` (see :func:`spatlas.pp.use_expression_embedding`). ``counts=False``
    (streaming, ``data.h5ad`` only): everything but the counts; ``X`` is ``None`` and
    ``obs['file_row']`` maps each spot to its row in the file.
    """
    adata = _read_cohort(config, counts=counts)
    if config.data.expression_embedding is not None:
        from . import pp

        pp.use_expression_embedding(adata, config.data.expression_embedding, seed=config.seed)
    return adata


def _read_cohort(config: Config, *, counts: bool = True) -> ad.AnnData:
    from . import io

    data = config.data
    sources = [
        name
        for name in ("sheet", "samples", "h5ad", "dataset")
        if getattr(data, name) not in (None, [])
    ]
    if len(sources) != 1:
        raise ConfigError(
            "data: give exactly one of sheet, samples, h5ad or dataset"
            + (f" (got {', '.join(sources)})" if sources else "")
        )
    if data.dataset is not None:
        from . import datasets

        if data.dataset == "dlpfc_demo":
            return datasets.dlpfc_demo()
        if data.dataset == "synthetic":
            params = {"seed": config.seed, **data.dataset_params}
            return datasets.synthetic_cohort(**params)
        raise ConfigError(
            f"data.dataset: unknown dataset '{data.dataset}' (known: {', '.join(DATASETS)})"
        )
    if data.h5ad is not None:
        if data.sample_key is None:
            raise ConfigError(
                "data.h5ad needs data.sample_key, the obs column naming each spot's sample"
            )
        parts = io.read_h5ad(
            data.h5ad,
            sample_key=data.sample_key,
            donor_key=data.donor_key,
            counts_layer=data.counts_layer,
            counts=counts,
        )
        if data.label_column is not None:
            for part in parts:
                if data.label_column not in part.obs:
                    raise SpatlasInputError(
                        f"{data.h5ad}: label column '{data.label_column}' does not exist "
                        f"(columns: {', '.join(part.obs.columns)})"
                    )
                part.obs[K.LABEL] = part.obs[data.label_column].astype(str)
        cohort = io.concat_samples(parts, join=data.join, consume=True)
        if not counts:
            cohort.X = None  # the counts stay in the file
        return cohort
    if data.samples is not None:
        from .io._sheet import specs_from_records

        specs = specs_from_records(data.samples, base=Path.cwd(), where="data.samples")
        return io.read_cohort(specs, join=data.join)
    return io.read_cohort(data.sheet, join=data.join)


def _n_clusters(config: Config, adata: ad.AnnData) -> int | str:
    n = config.clustering.n_clusters
    if n is not None:
        return n
    if K.LABEL in adata.obs:
        labels = adata.obs[K.LABEL]
        labels = labels[labels.notna() & ~labels.isin(config.data.exclude_labels)]
        k = int(labels.nunique())
        logger.info("clustering.n_clusters not set: using the %d label classes", k)
        return k
    return "auto"


def run(
    config: Config,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    inputs: tuple[str | Path, ...] = (),
) -> RunResult:
    """Run the pipeline; with ``out``, write the run folder there.

    The folder gets ``config.yaml`` (resolved), ``cohort.h5ad``, ``domains.csv``,
    ``metrics.csv`` (when the cohort has labels), ``timings.csv``, ``run.log`` and
    ``report.html`` (see :func:`spatlas.report.build_report`). It is built in
    a hidden staging folder and renamed into place at the end, so a failed or interrupted run
    leaves ``out`` as it was; a non-empty ``out`` is refused unless ``overwrite``, and so is a
    second run into the same ``out`` while this one goes (see :func:`spatlas.io.atomic_output_dir`).
    With ``overwrite``, an ``out`` that is or holds an input of the run (the sheet, a sample,
    image or annotations file, the ``.h5ad``, weights, embeddings, gene map or network, any of
    ``inputs`` such as the config file) is refused before anything runs.
    """
    from contextlib import suppress

    from . import io

    if out is None:
        return _run(config, stage=None)
    named: list[tuple[str, str | Path | None]] = []
    if overwrite:
        from .io._sheet import specs_from_records

        data, morph, down = config.data, config.morphology, config.downstream
        named = [("the config file", path) for path in inputs] + [
            ("data.sheet", data.sheet),
            ("data.h5ad", data.h5ad),
            ("data.expression_embedding", data.expression_embedding),
            ("morphology.weights", morph.weights),
            ("morphology.stain_reference", morph.stain_reference),
            ("morphology.features", morph.features),
            ("downstream.gene_map", down.gene_map),
            ("downstream.pathways", down.pathways),
        ]
        specs: list = []
        with suppress(SpatlasInputError):  # a bad sheet is reported by the load step
            if data.sheet is not None and Path(data.sheet).is_file():
                specs = io.read_sample_sheet(data.sheet)
            elif data.samples:
                specs = specs_from_records(data.samples, base=Path.cwd(), where="data.samples")
        named += [
            (f"sample {spec.sample} {key}", getattr(spec, key))
            for spec in specs
            for key in ("path", "image", "annotations")
        ]
    with io.atomic_output_dir(out, overwrite=overwrite, inputs=named) as stage:
        handler = add_file_handler(stage / "run.log")
        try:
            result = _run(config, stage=stage)
        finally:
            logger.removeHandler(handler)
            with suppress(OSError):  # a full disk: the log is discarded anyway
                handler.close()
    result.out = Path(out)
    logger.info("run written to %s", out)
    return result


def _run(config: Config, *, stage: Path | None) -> RunResult:
    import yaml

    from . import io, metrics, tl

    steps: list[dict] = []
    check_config(config)
    if _uses_model(config):  # a bad model name or setting fails before the slow steps
        _check_model_settings(config)
    if stage is not None:
        with open(stage / "config.yaml", "w") as fh:
            yaml.safe_dump(config_to_dict(config), fh, sort_keys=False)
    stream = plan_memory(config)  # refuses a cohort that cannot fit, before any work
    with _step("load", steps):
        adata = load_cohort(config, counts=stream is None)
        summary = io.summarize_cohort(adata)
        logger.info(
            "cohort: %d spots x %d genes\n%s",
            adata.n_obs,
            adata.n_vars,
            summary.to_string(index=False),
        )
        if config.morphology.enabled and config.morphology.features is not None:
            morphology_features(config, adata)  # precomputed: read and checked before slow steps
    if config.downstream.pathways:  # the network must match the cohort's genes: say so now
        check_network(config, adata)
    if config.expression.predict:
        check_holdout(config, adata)
    with _step("preprocess", steps):
        preprocess(config, adata, stream=stream)
        deferred = _defer_normalised(config, adata)
    method = integration_method(config)
    if method == "none":
        basis = expression_basis(config)
        method_name = "spatial" if basis == K.SPATIAL_PCA else basis.removeprefix("X_")
    else:
        with _step("integrate", steps):
            basis = integrate(config, adata)
        method_name = method
    morph = config.morphology
    if morph.enabled:
        with _step("morphology", steps):
            if morph.features is None:
                morphology_features(config, adata)
            morphology_embedding(config, adata)
    expression = None
    if config.expression.predict:
        with _step("expression", steps):
            expression = predict_expression(config, adata, stage=stage)
    fitted = None
    if _uses_model(config):
        with _step("model", steps):
            fitted = _fit_model(config, adata, basis)
        basis, method_name = K.embedding_key(config.model.name), config.model.name
    if morph.enabled and fitted is None:
        with _step("fuse", steps):
            basis = fuse_morphology(config, adata, basis)
    domain_key = K.domain_key(method_name)
    clus = config.clustering
    refine = refine_labels(config)
    with _step("cluster", steps):
        raw_key = f"{domain_key}_unrefined" if refine else domain_key
        tl.cluster(
            adata,
            basis=basis,
            method=clus.method,
            n_clusters=_n_clusters(config, adata),
            seed=config.seed,
            key_added=raw_key,
        )
        if refine:
            tl.refine(adata, key=raw_key, k=clus.refine_k, key_added=domain_key)
    table = None
    if K.LABEL in adata.obs and adata.obs[K.LABEL].notna().any():
        with _step("evaluate", steps):
            table = metrics.evaluate(
                adata,
                cluster_key=domain_key,
                embedding_key=basis,
                exclude_labels=tuple(config.data.exclude_labels),
                seed=config.seed,
            )
            mean = table.loc[table["sample"] == "mean"].iloc[0]
            logger.info(
                "ARI per sample: %s; mean %.3f; NMI mean %.3f",
                _ari_line(table),
                mean["ari"],
                mean["nmi"],
            )
    if deferred:  # the log-normalised X again, for the markers, the report and the file
        with _step("normalise", steps):
            from .pp._expression import log_normalised

            adata.X = log_normalised(
                adata.layers[K.COUNTS], target_sum=config.preprocessing.target_sum
            )
    markers = pathways = None
    if config.downstream.markers:
        with _step("markers", steps):
            markers = conserved_markers(config, adata, domain_key)
    if config.downstream.pathways:
        with _step("pathways", steps):
            pathways = domain_pathways(config, adata, domain_key)
    timings = pd.DataFrame(steps)
    if stage is not None:
        with _step("write", steps):
            adata.uns.setdefault(K.UNS, {})["config_yaml"] = yaml.safe_dump(
                config_to_dict(config), sort_keys=False
            )
            io.write_h5ad(adata, stage / "cohort.h5ad", compression=_h5ad_compression(adata))
            domains = adata.obs[[K.SAMPLE, K.DONOR, K.BARCODE, domain_key]].copy()
            if K.LABEL in adata.obs:
                domains[K.LABEL] = adata.obs[K.LABEL]
            domains.to_csv(stage / "domains.csv", index_label="spot")
            if table is not None:
                table.to_csv(stage / "metrics.csv", index=False, float_format="%.4f")
            if markers is not None:
                markers.to_csv(stage / "markers.csv", index=False, float_format="%.5g")
            if pathways is not None:
                pathways.to_csv(stage / "pathways.csv", index=False, float_format="%.5g")
            if expression is not None:
                expression.to_csv(stage / "expression.csv", index=False, float_format="%.5g")
            if fitted is not None:
                fitted.save(stage / "model")
            if config.data.write_spatialdata and _from_spatialdata(adata):
                from .io._spatialdata import write_spatialdata_results

                tables = {"domain_sizes": _domain_sizes(adata, domain_key)}
                for name, frame in (("metrics", table), ("markers", markers)):
                    if frame is not None:
                        tables[name] = frame
                write_spatialdata_results(
                    adata,
                    stage / "spatialdata",
                    domain_key=domain_key,
                    embeddings=tuple(dict.fromkeys([basis, K.PCA])),
                    tables=tables,
                )
        timings = pd.DataFrame(steps)
        timings.to_csv(stage / "timings.csv", index=False)
        _write_report(stage, adata)
    return RunResult(
        adata=adata, metrics=table, timings=timings, domain_key=domain_key, steps=steps
    )


#: Above this many stored count values, ``cohort.h5ad`` is written without gzip: compressing a
#: 1 M-spot cohort's counts and normalised values took 132 s of a 9-minute run (uncompressed:
#: about 15 s, for a file about three times larger).
UNCOMPRESSED_NNZ = 50_000_000


def _h5ad_compression(adata: ad.AnnData) -> str | None:
    """``gzip`` for the run's ``cohort.h5ad``, ``None`` above :data:`UNCOMPRESSED_NNZ` values."""
    X = adata.X
    nnz = X.nnz if sp.issparse(X) else (0 if X is None else X.size)
    if nnz > UNCOMPRESSED_NNZ:
        logger.info(
            "cohort.h5ad: %d stored values, written uncompressed (gzip would take minutes)", nnz
        )
        return None
    return "gzip"


#: Above this many stored values, the log-normalised ``X`` is released after the preprocessing
#: and computed again (the same numbers) before the markers and the writing: the steps in
#: between read embeddings only, and at 1 M spots it is 1.3 GB that Harmony's and the model's
#: working memory would otherwise come on top of.
DEFER_X_NNZ = 2**25


def _defer_normalised(config: Config, adata: ad.AnnData) -> bool:
    """Release the normalised ``X`` of a large cohort until it is needed (see ``DEFER_X_NNZ``)."""
    X = adata.X
    if X is None or not sp.issparse(X) or X.nnz <= DEFER_X_NNZ or config.expression.predict:
        return False
    if K.COUNTS not in adata.layers:
        return False
    adata.X = adata.layers[K.COUNTS]
    logger.info("log-normalised X released until the markers / writing (%d values)", X.nnz)
    return True


def _from_spatialdata(adata: ad.AnnData) -> bool:
    """Whether any sample was read from a SpatialData store."""
    return any(
        ((info or {}).get(K.METADATA) or {}).get(K.SD_STORE)
        for info in adata.uns.get(K.SPATIAL, {}).values()
    )


def _domain_sizes(adata: ad.AnnData, domain_key: str) -> pd.DataFrame:
    """Spots per domain and sample (long format)."""
    sizes = (
        adata.obs.groupby([K.SAMPLE, domain_key], observed=True)
        .size()
        .rename("spots")
        .reset_index()
    )
    sizes[K.SAMPLE] = sizes[K.SAMPLE].astype(str)
    sizes[domain_key] = sizes[domain_key].astype(str)
    return sizes


#: Above this share of the memory available, ``data.streaming: auto`` streams the counts.
STREAM_SHARE = 0.8


def plan_memory(config: Config):
    """Whether the counts fit in memory; the :class:`~spatlas.io._stream.H5adCounts` to stream.

    For a ``data.h5ad`` cohort the memory the in-memory pipeline needs is estimated from the
    file's metadata (:func:`spatlas.io._stream.memory_estimate`) and compared with the memory
    available. ``data.streaming``: ``auto`` streams above ``STREAM_SHARE`` of it, ``true``
    always, ``false`` never - and a cohort that does not fit is then refused here, before any
    work, with what it needs. Streaming itself needs settings that never read the expression
    matrix (a ``ConfigError`` lists the ones to change).

    Returns
    -------
    The counts to stream, or ``None`` (in memory).
    """
    from .io._stream import (
        H5adCounts,
        available_memory,
        gb,
        memory_estimate,
        streaming_estimate,
    )

    data = config.data
    mode = data.streaming
    if mode not in (True, False, "auto"):
        raise ConfigError(f"data.streaming must be true, false or auto; got {mode!r}")
    if data.h5ad is None or data.sample_key is None or not Path(data.h5ad).is_file():
        if mode is True:
            raise ConfigError(
                "data.streaming: true streams the counts of a data.h5ad cohort (with "
                "data.sample_key); give the cohort as one .h5ad file"
            )
        return None  # other inputs are read sample by sample; their readers say what is wrong
    try:
        counts = H5adCounts(data.h5ad, data.counts_layer)
    except SpatlasInputError as err:
        if mode is True:
            raise
        logger.info("not streaming: %s", err)
        return None
    n, g = counts.shape
    need, available = memory_estimate(n, counts.nnz), available_memory()
    size = f"{n:,} spots x {g:,} genes with {counts.nnz:,} stored counts"
    if mode is False or (mode == "auto" and need <= STREAM_SHARE * available):
        if need > available:
            raise SpatlasInputError(
                f"{data.h5ad}: {size} need about {gb(need)} of memory in spatlas' in-memory "
                f"pipeline and {gb(available)} are available; set data.streaming: auto (or "
                "true) to keep the counts on disk, or run on a machine with more memory"
            )
        return None
    streamed = streaming_estimate(n, counts.nnz, config.preprocessing.pca_max_spots)
    if streamed > available:
        raise SpatlasInputError(
            f"{data.h5ad}: {size} need about {gb(streamed)} of memory even with the counts "
            f"streamed from disk (about 2 kB per spot) and {gb(available)} are available; "
            "split the atlas into several runs or use a machine with more memory"
        )
    blockers = _streaming_blockers(config)
    if blockers:
        raise ConfigError(
            f"{data.h5ad}: {size} need about {gb(need)} in memory and {gb(available)} are "
            "available, so the counts must be streamed from disk (data.streaming), which reads "
            "no expression matrix later: " + "; ".join(blockers)
        )
    logger.info(
        "streaming the counts from %s (%s; in memory they would need about %s of the %s available)",
        data.h5ad,
        size,
        gb(need),
        gb(available),
    )
    return counts


def _streaming_blockers(config: Config) -> list[str]:
    """Settings that read the expression matrix, each with the change streaming needs."""
    blockers = []
    if augmented(config):
        blockers.append("set augmentation.enabled: false (the augmentation reads the counts)")
    if config.downstream.markers:
        blockers.append("set downstream.markers: false")
    if config.downstream.pathways:
        blockers.append("set downstream.pathways: false")
    if config.expression.predict:
        blockers.append("set expression.predict: false")
    if integration_method(config) == "scvi":
        blockers.append("choose integration.method harmony, scanorama or none (scVI reads counts)")
    if config.data.expression_embedding is not None:
        blockers.append("remove data.expression_embedding")
    prep = config.preprocessing
    if prep.hvg_flavor != "seurat_v3" or prep.scale_max_value is not None:
        blockers.append("use preprocessing.hvg_flavor: seurat_v3 without scale_max_value")
    return blockers


def augmented(config: Config) -> bool:
    """Whether the ``augmentation`` step runs (enabled with λ > 0)."""
    return config.augmentation.enabled and config.augmentation.lam > 0


def expression_basis(config: Config) -> str:
    """The ``obsm`` key of the expression basis the integration reads.

    ``X_spatial_pca`` after the augmentation, else ``X_input`` with ``data.expression_embedding``,
    else ``X_pca``.
    """
    if augmented(config):
        return K.SPATIAL_PCA
    return K.EXPRESSION_INPUT if config.data.expression_embedding is not None else K.PCA


def integration_method(config: Config) -> str:
    """``integration.method`` with ``auto`` resolved (``none`` after augmentation, else Harmony)."""
    method = config.integration.method
    if method == "auto":
        return "none" if augmented(config) else "harmony"
    return method


def refine_labels(config: Config) -> bool:
    """``clustering.refine`` with ``auto`` resolved: off after augmentation, else on.

    The augmented embedding already holds each spot's neighbourhood; a second smoothing of the
    labels erases domains one or two spots thin (the olfactory bulb's layers).
    """
    refine = config.clustering.refine
    if refine == "auto":
        return not augmented(config)
    if not isinstance(refine, bool):
        raise ConfigError(f"clustering.refine must be true, false or auto; got {refine!r}")
    return refine


def _check_morphology_weight(config: Config) -> None:
    weight = config.clustering.morphology_weight
    if weight != "auto" and (isinstance(weight, str) or weight < 0):
        raise ConfigError(
            f"clustering.morphology_weight must be a number >= 0 or auto; got {weight!r}"
        )


def check_config(config: Config) -> None:
    """Settings that only a run can judge, checked before any slow step (ConfigError)."""
    from .pp._spatial_expression import NORMALISATIONS

    aug = config.augmentation
    if not 0.0 <= aug.lam <= 1.0:
        raise ConfigError(f"augmentation.lam must lie in [0, 1]; got {aug.lam}")
    if aug.normalisation not in NORMALISATIONS:
        raise ConfigError(
            f"augmentation.normalisation must be one of {', '.join(NORMALISATIONS)}; "
            f"got {aug.normalisation!r}"
        )
    if aug.k_geom < 1:
        raise ConfigError(f"augmentation.k_geom must be at least 1; got {aug.k_geom}")
    refine_labels(config)
    _check_morphology_weight(config)
    _check_settings(config)
    if config.morphology.features is not None and not config.morphology.enabled:
        raise ConfigError(
            "morphology.features is set but morphology.enabled is false, so the features would "
            "be ignored; set morphology.enabled: true (or remove morphology.features)"
        )
    _check_downstream(config)
    _check_expression(config)
    if config.data.expression_embedding is not None:
        from .pp import get_integration

        method = integration_method(config)
        if get_integration(method).reads_counts:
            raise ConfigError(
                f"integration.method {method} reads the counts and would ignore "
                "data.expression_embedding; choose harmony, scanorama or none"
            )


def preprocess(config: Config, adata: ad.AnnData, *, stream=None) -> None:
    """The ``preprocessing`` and ``augmentation`` sections applied to ``adata`` (in place).

    With ``data.expression_embedding``, the augmentation runs on the columns of
    ``obsm['X_input']`` (:func:`spatlas.pp.spatial_embedding`) instead of the HVG counts.
    With ``stream`` (:class:`spatlas.io._stream.H5adCounts`, see :func:`plan_memory`), the
    counts are read from disk in row chunks (:func:`spatlas.pp.preprocess_streaming`).
    """
    from . import pp

    prep = config.preprocessing
    run = pp.preprocess_expression
    if stream is not None:
        run = functools.partial(pp.preprocess_streaming, counts=stream)
    run(
        adata,
        min_spots=prep.min_spots,
        n_top_genes=prep.n_top_genes,
        hvg_flavor=prep.hvg_flavor,
        batch_key=prep.batch_key,
        target_sum=prep.target_sum,
        scale_max_value=prep.scale_max_value,
        n_comps=prep.n_comps,
        pca_max_spots=prep.pca_max_spots,
        seed=config.seed,
    )
    aug = config.augmentation
    if not augmented(config):
        return
    shared = {
        "lam": aug.lam,
        "k_geom": aug.k_geom,
        "agf": aug.agf,
        "scale_by": aug.scale_by,
        "n_comps": aug.n_comps,
        "seed": config.seed,
    }
    if config.data.expression_embedding is not None:
        pp.spatial_embedding(adata, basis=K.EXPRESSION_INPUT, **shared)
    else:
        pp.spatial_expression(adata, normalisation=aug.normalisation, **shared)


def integrate(config: Config, adata: ad.AnnData, *, key_added: str | None = None) -> str:
    """The ``integration`` section on the expression PCs; returns the obsm key written.

    Reads ``obsm['X_spatial_pca']`` when the ``augmentation`` step ran, else ``obsm['X_input']``
    with ``data.expression_embedding``, else ``obsm['X_pca']`` (see :func:`expression_basis`).
    """
    from . import pp

    integ = config.integration
    return pp.integrate(
        adata,
        basis=expression_basis(config),
        batch_key=integ.batch_key,
        method=integration_method(config),
        seed=config.seed,
        key_added=key_added,
        **integ.params,
    )


def morphology_features(config: Config, adata: ad.AnnData) -> None:
    """Patch features of the ``morphology`` section -> ``obsm['X_morph_features']``.

    With ``morphology.features``, the precomputed features instead (no image is read).
    """
    from . import pp

    morph = config.morphology
    if morph.features is not None:
        pp.use_morphology_features(adata, morph.features)
        return
    pp.morphology_features(
        adata,
        extractor=morph.extractor,
        weights=morph.weights,
        extractor_params=morph.extractor_params,
        image=morph.image,
        patch_scale=morph.patch_scale,
        pad=morph.pad,
        stain_norm=morph.stain_norm,
        reference=morph.stain_reference,
        batch_size=morph.batch_size,
        device=morph.device,
        sample_key=K.SAMPLE,
        seed=config.seed,
    )


def morphology_embedding(config: Config, adata: ad.AnnData) -> None:
    """PCA + correction of the morphology features (the ``morphology`` section)."""
    from . import pp

    morph = config.morphology
    pp.morphology_embedding(
        adata,
        n_comps=morph.n_comps,
        method=morph.integration,
        batch_key=morph.batch_key,
        seed=config.seed,
        **morph.params,
    )


def morphology_key(config: Config, adata: ad.AnnData) -> str:
    """The obsm key of the morphology embedding the model or the clustering reads."""
    key = config.model.morphology_key
    return key if key in adata.obsm else K.MORPH_PCA


def fuse_morphology(config: Config, adata: ad.AnnData, basis: str) -> str:
    """The morphology embedding joins ``basis`` at ``clustering.morphology_weight``.

    Returns the obsm key to cluster (``basis`` itself when the weight is 0).
    """
    from . import tl

    weight = config.clustering.morphology_weight
    if weight == 0:
        return basis
    labels = None
    if weight == "auto":
        tl.cluster(
            adata,
            basis=basis,
            method=config.clustering.method,
            n_clusters=_n_clusters(config, adata),
            seed=config.seed,
            key_added="expression_only_domain",
        )
        labels = adata.obs["expression_only_domain"].to_numpy()
    used = tl.fuse_morphology(
        adata,
        expression_key=basis,
        morphology_key=morphology_key(config, adata),
        weight=weight,
        labels=labels,
    )
    return K.FUSED if used > 0 else basis


HVG_FLAVORS = ("seurat_v3", "seurat", "cell_ranger", "pearson_residuals")
CLUSTER_METHODS = ("kmeans", "gmm", "leiden")


def _at_least(where: str, value: float | None, low: float, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value >= low:  # also refuses NaN
        raise ConfigError(f"{where} must be at least {low:g}; got {value!r}")


def _one_of(where: str, value: object, choices: Iterable[str]) -> None:
    import difflib

    choices = list(choices)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where} must be one of {', '.join(choices)}; got {value!r}{hint}")


def _check_settings(config: Config) -> None:
    """Names and ranges of every setting a late step reads, so none fails after slow work."""
    from .models import list_models
    from .pp import list_integrations
    from .pp.morphology._extractors import TIMM_PREFIX, list_extractors
    from .pp.morphology._patches import IMAGE_CHOICES, PAD_MODES
    from .pp.morphology._stain import STAIN_METHODS

    _at_least("seed", config.seed, 0)
    _one_of("data.join", config.data.join, ("inner", "outer"))
    prep = config.preprocessing
    _at_least("preprocessing.min_spots", prep.min_spots, 1)
    _at_least("preprocessing.n_top_genes", prep.n_top_genes, 2)
    _at_least("preprocessing.n_comps", prep.n_comps, 2)
    _at_least("preprocessing.pca_max_spots", prep.pca_max_spots, 1000, allow_none=True)
    _one_of("preprocessing.hvg_flavor", prep.hvg_flavor, HVG_FLAVORS)
    if not prep.target_sum > 0:
        raise ConfigError(f"preprocessing.target_sum must be > 0; got {prep.target_sum!r}")
    _at_least("augmentation.n_comps", config.augmentation.n_comps, 2)
    _one_of("integration.method", config.integration.method, ["auto", *list_integrations()])
    clus = config.clustering
    _one_of("clustering.method", clus.method, CLUSTER_METHODS)
    k = clus.n_clusters
    if isinstance(k, str) and k != "auto":
        raise ConfigError(f"clustering.n_clusters must be a number >= 2, auto or empty; got {k!r}")
    if isinstance(k, int):
        _at_least("clustering.n_clusters", k, 2)
    _at_least("clustering.refine_k", clus.refine_k, 1)
    morph = config.morphology
    if morph.enabled:
        extractors = [e for e in list_extractors() if not e.startswith(TIMM_PREFIX)]
        if morph.features is None and not (
            morph.extractor in extractors or morph.extractor.startswith(TIMM_PREFIX)
        ):
            _one_of("morphology.extractor", morph.extractor, [*extractors, "timm:<arch>"])
        _one_of("morphology.image", morph.image, IMAGE_CHOICES)
        _one_of("morphology.pad", morph.pad, PAD_MODES)
        if morph.stain_norm is not None:
            _one_of("morphology.stain_norm", morph.stain_norm, STAIN_METHODS)
        if not morph.patch_scale > 0:
            raise ConfigError(f"morphology.patch_scale must be > 0; got {morph.patch_scale!r}")
        _at_least("morphology.batch_size", morph.batch_size, 1)
        _at_least("morphology.n_comps", morph.n_comps, 2)
        _one_of("morphology.integration", morph.integration, list_integrations())
    if _uses_model(config):
        m = config.model
        _one_of("model.name", m.name, ["none", *list_models()])
        _at_least("model.steps", m.steps, 1)  # 0 would save an untrained model as trained
        _at_least("model.latent_dim", m.latent_dim, 1)
        if not (isinstance(m.window, int) and m.window >= 1 and m.window % 2 == 1):
            raise ConfigError(
                f"model.window must be a positive odd number (the spot sits in the centre of "
                f"its window); got {m.window!r}"
            )
        _at_least("model.morphology_weight", m.morphology_weight, 0)


def _check_downstream(config: Config) -> None:
    from .tl._pathways import METHODS, NETWORKS

    down = config.downstream
    if not 0.0 <= down.min_fraction < 1.0:
        raise ConfigError(f"downstream.min_fraction must lie in [0, 1); got {down.min_fraction}")
    if down.min_spots < 2:
        raise ConfigError(f"downstream.min_spots must be at least 2; got {down.min_spots}")
    if down.n_top < 1:
        raise ConfigError(f"downstream.n_top must be at least 1; got {down.n_top}")
    if not down.pathways:
        return
    if down.pathway_method not in METHODS:
        raise ConfigError(
            f"downstream.pathway_method must be one of {', '.join(METHODS)}; "
            f"got {down.pathway_method!r}"
        )
    if down.pathways not in NETWORKS and not Path(down.pathways).expanduser().is_file():
        raise ConfigError(
            f"downstream.pathways: '{down.pathways}' is neither a bundled network "
            f"({', '.join(NETWORKS)}) nor an existing file (CSV/TSV: source, target, weight)"
        )
    if down.gene_map is not None and not Path(down.gene_map).expanduser().is_file():
        raise ConfigError(f"downstream.gene_map: {down.gene_map}: no such file")
    from ._deps import import_optional

    import_optional("decoupler", purpose="downstream.pathways")


def _check_expression(config: Config) -> None:
    from .tl._predict import ALIGNER_FEATURES, ALIGNERS, FEATURE_SCALING, check_aligner_params

    expr = config.expression
    if not expr.predict:
        return
    if not config.morphology.enabled:
        raise ConfigError(
            "expression.predict reads the image features of the morphology section: set "
            "morphology.enabled: true (any extractor, or morphology.features)"
        )
    _at_least("expression.genes", expr.genes, 1)
    _one_of("expression.aligner", expr.aligner, ALIGNERS)
    _one_of("expression.aligner_features", expr.aligner_features, ALIGNER_FEATURES)
    _one_of("expression.feature_scaling", expr.feature_scaling, FEATURE_SCALING)
    if isinstance(expr.alpha, str) and expr.alpha != "auto":
        raise ConfigError(f"expression.alpha must be a number > 0 or auto; got {expr.alpha!r}")
    if not isinstance(expr.alpha, str) and not expr.alpha > 0:
        raise ConfigError(f"expression.alpha must be > 0; got {expr.alpha!r}")
    if len(set(map(str, expr.holdout))) != len(expr.holdout):
        raise ConfigError(f"expression.holdout names a sample twice: {expr.holdout}")
    if expr.aligner == "rank_align":
        try:
            check_aligner_params(dict(expr.aligner_params))
        except SpatlasInputError as err:
            raise ConfigError(f"expression.aligner_params: {err}") from None
    elif expr.aligner_params:
        raise ConfigError(
            "expression.aligner_params is set but expression.aligner is none; set "
            "expression.aligner: rank_align (or remove aligner_params)"
        )


def check_holdout(config: Config, adata: ad.AnnData) -> None:
    """``expression.holdout`` names samples of the cohort and leaves some to train on."""
    expr = config.expression
    samples = set(adata.obs[K.SAMPLE].astype(str))
    unknown = sorted(set(map(str, expr.holdout)) - samples)
    if unknown:
        raise ConfigError(
            f"expression.holdout: {', '.join(unknown)} not in the cohort (samples: "
            f"{', '.join(sorted(samples)[:12])})"
        )
    if samples <= set(map(str, expr.holdout)):
        raise ConfigError(
            "expression.holdout holds out every sample: leave at least one to fit the predictor"
        )


def predict_expression(
    config: Config, adata: ad.AnnData, *, stage: Path | None
) -> pd.DataFrame | None:
    """The ``expression`` section: fit on the training samples, predict every spot.

    Returns the per-gene Pearson r of the held-out samples (``expression.csv``), or ``None``
    when nothing is held out. The predictor is saved to ``stage / 'expression_model'``.
    """
    from . import tl

    expr = config.expression
    predictor = tl.fit_expression_predictor(
        adata,
        features_key=K.MORPH_FEATURES,
        genes=expr.genes,
        exclude_samples=[str(s) for s in expr.holdout],
        feature_scaling=expr.feature_scaling,
        alpha=expr.alpha,
        aligner=expr.aligner,
        aligner_params=dict(expr.aligner_params),
        aligner_features=expr.aligner_features,
        target_sum=config.preprocessing.target_sum,
        seed=config.seed,
        device=config.morphology.device,
    )
    tl.predict_expression(adata, predictor)
    if stage is not None:
        predictor.save(stage / "expression_model")
    if not expr.holdout:
        return None
    table = tl.expression_correlation(
        adata, samples=[str(s) for s in expr.holdout], target_sum=config.preprocessing.target_sum
    )
    summary = tl.correlation_summary(table)
    for _, row in summary.iterrows():
        logger.info(
            "expression from the image, held-out %s: mean r %.3f (top 50 genes), %.3f (top "
            "250); %d of %d genes r > 0.3",
            row["sample"],
            row["mean_r_top50"],
            row["mean_r_top250"],
            row["n_genes_r>0.3"],
            row["n_genes"],
        )
    return table


def check_network(config: Config, adata: ad.AnnData) -> None:
    """The ``downstream.pathways`` network is readable and shares genes with the cohort."""
    from .tl._pathways import match_network, read_network

    down = config.downstream
    match_network(
        adata,
        read_network(down.pathways),
        gene_symbols_key=down.gene_symbols,
        gene_map=down.gene_map,
        warn=False,  # the pathways step says which sources it leaves out
    )


def conserved_markers(config: Config, adata: ad.AnnData, domain_key: str) -> pd.DataFrame:
    """``downstream.markers``: the conserved markers of the domains (``markers.csv``)."""
    from . import tl

    down = config.downstream
    return tl.conserved_markers(
        adata, domain_key=domain_key, min_spots=down.min_spots, min_fraction=down.min_fraction
    )


def domain_pathways(config: Config, adata: ad.AnnData, domain_key: str) -> pd.DataFrame:
    """``downstream.pathways``: activity per spot, then per domain (``pathways.csv``)."""
    from . import tl

    down = config.downstream
    tl.pathway_activity(
        adata,
        net=down.pathways,
        method=down.pathway_method,
        gene_symbols_key=down.gene_symbols,
        gene_map=down.gene_map,
    )
    return tl.domain_pathways(
        adata, domain_key=domain_key, min_spots=down.min_spots, min_fraction=down.min_fraction
    )


def _write_report(stage: Path, adata: ad.AnnData) -> None:
    """``report.html`` from the finished run folder; a failure is a warning, not a failed run."""
    from . import report

    start = time.perf_counter()
    try:
        report.build_report(stage, adata=adata)
    except Exception as err:  # the results are written; a missing report must not lose them
        from .io._write import _disk_full

        if _disk_full(err):  # a full disk fails the run: the old run must stay in place
            raise
        logger.warning(
            "report.html not written (%s: %s); rebuild it with `spatlas report RUN_FOLDER`",
            type(err).__name__,
            err,
        )
        return
    logger.info("report.html written in %.1f s", time.perf_counter() - start)


def _uses_model(config: Config) -> bool:
    return config.model.name not in ("", "none")


def _check_model_settings(config: Config) -> None:
    """The model's name and settings checked without importing torch (see ``_model_params``)."""
    from . import models

    m = config.model
    init, train = models.parameter_names(m.name)
    common = {
        "morphology_weight": m.morphology_weight,
        "window": m.window,
        "latent_dim": m.latent_dim,
        "steps": m.steps,
        "n_pseudo_labels": 7,
    }
    params = {k: v for k, v in common.items() if k in init or k in train}
    params.update(m.params)
    models.check_params(m.name, params)


def _model_params(config: Config, cls: type, n_pseudo_labels: int) -> dict:
    """Settings of the model: the section's common fields the model takes, then ``params``.

    Unknown names in ``params`` are an error (raised here, before any slow step).
    """
    m = config.model
    init, train = cls.parameters()
    common = {
        "morphology_weight": m.morphology_weight,
        "window": m.window,
        "latent_dim": m.latent_dim,
        "steps": m.steps,
        "n_pseudo_labels": n_pseudo_labels,
    }
    params = {k: v for k, v in common.items() if k in init or k in train}
    params.update(m.params)
    cls.split_params(params)
    return params


def _fit_model(config: Config, adata: ad.AnnData, basis: str):
    """The fusion model on the integrated expression (+ morphology) embedding -> obsm."""
    from . import models

    m = config.model
    morphology_key = m.morphology_key if m.morphology_key in adata.obsm else None
    if morphology_key is None:
        logger.info(
            "model: no obsm['%s'] (morphology off): %s runs on expression only",
            m.morphology_key,
            m.name,
        )
    k = _n_clusters(config, adata)
    cls = models.get_model(m.name)
    return models.fit_model(
        adata,
        m.name,
        expression_key=basis,
        morphology_key=morphology_key,
        sample_key=K.SAMPLE,
        seed=config.seed,
        **_model_params(config, cls, k if isinstance(k, int) else 7),
    )


def _ari_line(table: pd.DataFrame) -> str:
    rows = table.loc[~table["sample"].isin(["mean", "all"]) & table["ari"].notna()]
    return " ".join(f"{r.sample}={r.ari:.3f}" for r in rows.itertuples())
