"""The config tree: YAML <-> dataclasses, ``--set key=value`` overrides, clear errors."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import ConfigError


@dataclass
class DataConfig:
    """Where the cohort comes from (exactly one of ``sheet``, ``samples``, ``h5ad``, ``dataset``).

    Attributes
    ----------
    sheet
        Sample sheet (CSV/TSV/YAML): sample, donor, path, image, annotations, label_column.
    samples
        The same rows inline in the config.
    h5ad
        One ``.h5ad`` holding several samples, split by ``sample_key`` (donor from ``donor_key``,
        labels from ``label_column``, counts from ``counts_layer``).
    dataset
        A bundled dataset: ``dlpfc_demo`` or ``synthetic`` (parameters in ``dataset_params``).
    join
        ``inner`` keeps the genes all samples share; ``outer`` keeps all.
    exclude_labels
        Label classes left out of label metrics (e.g. her2st's ``undetermined``).
    expression_embedding
        A precomputed expression embedding (scGPT, Geneformer, CancerFoundation, ...) used as the
        expression basis instead of the HVG PCs: an ``obsm`` key of the input (e.g.
        ``X_scgpt``) or a file (``.npy`` in cohort order, or ``.csv``/``.tsv``/``.parquet``
        keyed by spot id; see ``spatlas.pp.read_embedding``) -> ``obsm['X_input']``. The
        ``augmentation`` then runs on its columns (-> ``X_spatial_pca``); without it, the
        ``integration`` reads ``X_input``. Preprocessing still runs (markers read the
        log-normalised ``X``).
    write_spatialdata
        When samples come from SpatialData stores (sample-sheet rows whose ``path`` is a
        ``.zarr``), write a copy of each store into the run folder (``spatialdata/<store>``)
        with a ``spatlas`` table holding the domains, the embedding and the per-domain tables,
        so the domains can be viewed over the image in tools that read SpatialData. The input
        stores are never modified.
    streaming
        Keep the counts of a ``data.h5ad`` cohort on disk and read them in row chunks
        (``spatlas.pp.preprocess_streaming``): ``auto`` (when the in-memory pipeline would need
        more than 80 % of the memory available: about 12 bytes per stored count value plus
        2 kB per spot), ``true`` or ``false``. Streaming holds per-spot vectors only; it needs
        ``augmentation.enabled: false`` and no step that reads the expression matrix
        (``downstream.markers`` / ``pathways``, ``expression.predict``, ``integration.method:
        scvi``), and ``cohort.h5ad`` then holds no expression (``obs['file_row']`` maps each
        spot to its row in the input). Without streaming, a cohort that does not fit is refused
        before any work with the memory it needs.
    """

    sheet: str | None = None
    samples: list[dict] | None = None
    h5ad: str | None = None
    sample_key: str | None = None
    donor_key: str | None = None
    label_column: str | None = None
    counts_layer: str | None = None
    dataset: str | None = None
    dataset_params: dict = field(default_factory=dict)
    join: str = "inner"
    exclude_labels: list[str] = field(default_factory=list)
    expression_embedding: str | None = None
    write_spatialdata: bool = True
    streaming: bool | str = "auto"


@dataclass
class PreprocessingConfig:
    """Expression preprocessing (paper appendix A.5); see ``spatlas.pp.preprocess_expression``.

    ``min_spots``: genes detected in fewer spots are dropped; ``n_top_genes``: highly variable
    genes kept; ``hvg_flavor``: scanpy's HVG flavour (``seurat_v3`` reads the counts);
    ``batch_key``: obs column the HVGs are selected within (empty: pooled); ``target_sum``:
    counts per spot after normalisation, before the log; ``scale_max_value``: clip of the
    z-scored genes before the PCA (empty: no clip); ``n_comps``: PCs -> ``obsm['X_pca']``;
    ``pca_max_spots``: above this many spots the PCA is fitted on a deterministic subsample of
    this many and every spot projected on it (empty: fit on all).
    """

    min_spots: int = 10
    n_top_genes: int = 3000
    hvg_flavor: str = "seurat_v3"
    batch_key: str | None = "sample"
    target_sum: float = 1e4
    scale_max_value: float | None = None
    n_comps: int = 20
    pca_max_spots: int | None = 200_000


@dataclass
class AugmentationConfig:
    """Neighbourhood-augmented expression before the PCA (``spatlas.pp.spatial_expression``).

    When ``enabled``, each spot's normalised HVG expression is joined by the Gaussian-weighted
    mean of its ``k_geom`` nearest spots and by its local gradient (``agf``), every block
    z-scored within each sample (``scale_by``), weighted by ``lam`` (λ: the neighbourhood's
    share, 0-1) and reduced to ``n_comps`` PCs -> ``obsm['X_spatial_pca']``, which the
    integration step then reads instead of ``X_pca``. ``normalisation`` of the counts: ``log``
    (the shifted logarithm at the mean depth) | ``sqrt`` | ``pearson`` | ``relative``.
    """

    enabled: bool = True
    lam: float = 0.2
    normalisation: str = "log"
    k_geom: int = 18
    agf: bool = True
    scale_by: str | None = "sample"
    n_comps: int = 20


@dataclass
class IntegrationConfig:
    """Horizontal integration of the expression PCs; see ``spatlas.pp.integrate``.

    ``method``: ``auto`` | ``harmony`` | ``scanorama`` | ``scvi`` | ``none``; ``params`` go to
    the method (``theta``, ``sigma``, ``n_layers``, ``max_epochs``, ...); ``batch_key``: obs
    column of the batch the method corrects. ``auto`` is ``none``
    when the ``augmentation`` step runs (its blocks are already z-scored within each sample,
    and Harmony on top over-corrects cohorts whose samples differ in composition) and
    ``harmony`` otherwise.
    """

    method: str = "auto"
    batch_key: str = "sample"
    params: dict = field(default_factory=dict)


@dataclass
class MorphologyConfig:
    """Morphology features and their corrected embedding (``spatlas.pp.morphology_*``).

    See ``spatlas.pp.morphology_features`` and ``spatlas.pp.morphology_embedding``. Runs after
    the expression integration and writes ``obsm['X_morph_pca']`` and
    ``obsm['X_morph_<integration>']`` (clustering still uses the expression embedding).

    ``extractor``: ``handcrafted`` | ``inception_v3`` | ``uni2h`` | ``timm:<arch>``;
    ``weights``: local weights file or directory of a network extractor (never downloaded;
    ``random`` for an untrained baseline); ``image``: ``auto`` | ``fullres`` | ``hires`` |
    ``lowres``; ``stain_norm``: ``macenko`` | ``reinhard`` | empty; ``stain_reference``: an
    image (empty: pooled over all slides); ``patch_scale``: patch side in spot diameters;
    ``integration``: ``harmony`` | ``scanorama`` | ``none`` with ``params`` (e.g. theta);
    ``batch_key``: obs column it corrects; ``extractor_params``: keyword arguments of the
    extractor; ``pad``: how patches at the image edge are filled (``constant`` | ``reflect`` |
    ``edge``); ``batch_size``: patches per forward pass; ``device``: ``auto`` | ``cpu`` |
    ``cuda``; ``n_comps``: PCs of the features -> ``obsm['X_morph_pca']``.
    ``features``: precomputed per-spot image features (e.g. UNI2-h vectors), an ``obsm`` key or
    a file as for ``data.expression_embedding``; when set (and ``enabled``), no image is read
    and no extractor runs (``spatlas.pp.use_morphology_features``); the PCA and the
    ``integration`` run on them as on extracted features.
    """

    enabled: bool = False
    extractor: str = "handcrafted"
    weights: str | None = None
    extractor_params: dict = field(default_factory=dict)
    image: str = "auto"
    patch_scale: float = 1.0
    pad: str = "constant"
    stain_norm: str | None = None
    stain_reference: str | None = None
    batch_size: int = 64
    device: str = "auto"
    n_comps: int = 20
    integration: str = "harmony"
    batch_key: str = "sample"
    params: dict = field(default_factory=dict)
    features: str | None = None


@dataclass
class ModelConfig:
    """The fusion model on the integrated embeddings; see ``spatlas.models`` (``list_models()``).

    ``name``: a registered model (``grid_ae``, ``cross_attention``, ``rank_align``, ``e2e``) or
    ``none`` (cluster the integration output directly). The model reads the integrated
    expression embedding (``e2e``: set ``integration.method: none`` so that it gets the
    uncorrected PCs) and ``obsm[morphology_key]`` when the cohort has it (else expression only:
    the morphology weight is then 0); it writes ``obsm['X_<name>']``,
    and domains come from that embedding (``obs['<name>_domain']``). ``morphology_weight``: α in
    [0, 3] of the paper's loss; ``window``: odd side of the neighbourhood window; ``steps``:
    optimiser steps; ``latent_dim``: width of the learned embedding; ``morphology_key``: the
    ``obsm`` key of the morphology input. ``params`` go to the model as well (e.g. ``scaling``,
    ``batch_size``,
    ``cross_sample_positives``, ``pseudo_labels``, ``n_threads``, ``device``); the pseudo-label K
    defaults to ``clustering.n_clusters``.
    """

    name: str = "none"
    morphology_key: str = "X_morph_harmony"
    morphology_weight: float = 1.5
    window: int = 5
    latent_dim: int = 16
    steps: int = 1000
    params: dict = field(default_factory=dict)


@dataclass
class ClusteringConfig:
    """Domain calling on the final embedding; see ``spatlas.tl.cluster`` and ``spatlas.tl.refine``.

    ``n_clusters``: a number, ``auto`` (chosen from the data), or empty for the number of label
    classes when the cohort has labels (``auto`` otherwise). ``refine``: ``true`` | ``false`` |
    ``auto`` (off after the augmentation, on without it). ``morphology_weight``: when the
    ``morphology`` section runs and no fusion model is set, the morphology embedding joins the
    expression embedding for clustering at this weight (``auto``: half the share of its variance
    that the expression-only domains explain; ``0``: never); see ``spatlas.tl.fuse_morphology``.
    ``method``: ``kmeans`` | ``leiden`` | ``gmm``; ``refine_k``: neighbours of the
    refinement's majority vote.
    """

    method: str = "kmeans"
    n_clusters: int | str | None = None
    refine: bool | str = "auto"
    refine_k: int = 10
    morphology_weight: float | str = "auto"


@dataclass
class TuneConfig:
    """Donor-grouped nested cross-validation and grid search (``spatlas tune`` / ``benchmark``).

    ``task``: ``multi_donor`` (tune on the other groups, test on the held-out ones jointly) or
    ``single_donor`` (tune on one group, test on each other group separately); ``group_key``:
    obs column of the group (``donor``; or e.g. a replicate pair); ``n_folds``: multi_donor
    folds (default: leave one group out). ``grids``: per component (an integration method, a
    model, ``clustering``) a mapping parameter -> values, replacing that component's Table-1
    grid (``{}`` for a component: not searched); ``fixed``: per component, settings held fixed
    (e.g. ``scvi: {max_epochs: 10}``). ``lam``: λ of the composite score the search maximises.
    ``backend``: ``local`` (process pool of ``n_workers``, default the machine's cores) or
    ``ray`` (``address`` of a cluster, or a local Ray); ``threads``: per task.
    """

    task: str = "multi_donor"
    group_key: str = "donor"
    n_folds: int | None = None
    grids: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    lam: float = 0.6
    backend: str = "local"
    n_workers: int | None = None
    threads: int = 1
    address: str | None = None


@dataclass
class BenchmarkConfig:
    """The paper's Figure-2 comparison: each integration method alone and followed by ``model``.

    Every pipeline is tuned by the nested cross-validation of the ``tune`` section.
    ``methods``: the integration methods compared; ``model``: the fusion model after each.
    """

    methods: list[str] = field(default_factory=lambda: ["harmony", "scanorama", "scvi"])
    model: str = "grid_ae"


@dataclass
class DownstreamConfig:
    """The biology after the domains, written by ``spatlas run`` and shown in the report.

    ``markers``: conserved domain markers (``spatlas.tl.conserved_markers``: each domain against
    the rest within every sample, Wilcoxon, samples combined by Stouffer) -> ``markers.csv``.
    ``pathways``: a network to score every spot with (``progeny_human`` | ``progeny_mouse``,
    bundled; or a CSV/TSV file ``source, target, weight``) by decoupler's ``pathway_method``
    -> ``obsm['X_pathways']`` and ``pathways.csv`` (domain x pathway, per sample and combined);
    needs ``pip install 'spatlas[pathways]'``. ``gene_symbols``: ``var`` column with the names
    the network uses; ``gene_map``: two-column file (cohort gene id -> network gene).
    ``min_spots``: a domain is tested in a sample only with at least this many spots there;
    ``min_fraction``: a marker / pathway is *conserved* when significantly up in more than this
    share of the samples where its domain was tested; ``n_top``: markers per domain in the
    report's dot plot.
    """

    markers: bool = False
    pathways: str | None = None
    pathway_method: str = "ulm"
    gene_symbols: str | None = None
    gene_map: str | None = None
    min_spots: int = 10
    min_fraction: float = 0.5
    n_top: int = 3


@dataclass
class ExpressionConfig:
    """Expression read from the H&E image (``spatlas.tl.fit_expression_predictor``).

    Needs ``morphology.enabled``: the predictor reads the morphology section's patch features
    (any extractor). ``predict``: fit a ridge predictor from the features to the log-normalised
    expression of the ``genes`` most variable genes of the training samples, and predict every
    spot -> ``obsm['X_predicted_expression']``, the predictor in ``expression_model/`` (load it
    with ``spatlas.tl.ExpressionPredictor.load``) and ``expression.csv``. ``holdout``: samples
    whose counts the predictor never sees; they are predicted from their image alone and
    ``expression.csv`` holds the Pearson r of predicted vs measured expression per held-out
    sample and gene (they still take part in the domains). ``aligner``: ``none`` or
    ``rank_align`` (trained on the training samples; new spots are embedded by its image branch,
    the EMA teacher); ``aligner_features``: ``both`` (the ridge reads the image features and the
    aligned embedding) or ``aligned`` (the embedding alone); ``aligner_params``: its settings
    (``latent_dim``, ``steps``, ...).
    ``feature_scaling``: ``sample`` (each slide's features z-scored on its own spots) or
    ``global``. ``alpha``: the ridge penalty, or ``auto`` (CV grouped by training sample).
    """

    predict: bool = False
    holdout: list[str] = field(default_factory=list)
    genes: int = 250
    aligner: str = "none"
    aligner_features: str = "both"
    aligner_params: dict = field(default_factory=dict)
    feature_scaling: str = "sample"
    alpha: float | str = "auto"


@dataclass
class Config:
    """A whole run (``tune`` and ``benchmark`` are read by ``spatlas tune`` / ``benchmark``)."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    integration: IntegrationConfig = field(default_factory=IntegrationConfig)
    morphology: MorphologyConfig = field(default_factory=MorphologyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    expression: ExpressionConfig = field(default_factory=ExpressionConfig)


PATH_FIELDS = {
    ("data", "sheet"),
    ("data", "h5ad"),
    ("morphology", "weights"),
    ("morphology", "stain_reference"),
    ("downstream", "gene_map"),
}
NOT_PATHS = {"random"}  # morphology.weights: random for an untrained baseline
# an obsm key or a file: resolved only when it has an embedding file's suffix (X_scgpt stays)
EMBEDDING_FIELDS = {("data", "expression_embedding"), ("morphology", "features")}
EMBEDDING_SUFFIXES = (".npy", ".csv", ".tsv", ".parquet")  # spatlas.pp.read_embedding's files


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int accepted for float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(
            f"{where}: {value!r} is not one of "
            + " | ".join(_type_name(a) for a in typing.get_args(tp))
        )
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected nothing, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path)
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def config_from_dict(data: dict, *, base: Path | None = None) -> Config:
    """Build a :class:`Config` from a nested dict; relative paths are taken from ``base``."""
    config = _build(Config, data, "")
    if base is not None:
        for section, key in PATH_FIELDS:
            obj = getattr(config, section)
            value = getattr(obj, key)
            if value and value not in NOT_PATHS and not Path(value).expanduser().is_absolute():
                setattr(obj, key, str((base / value).resolve()))
        for section, key in EMBEDDING_FIELDS:
            obj = getattr(config, section)
            value = getattr(obj, key)
            if value and Path(value).suffix.lower() in EMBEDDING_SUFFIXES:
                path = Path(value).expanduser()
                setattr(obj, key, str(path if path.is_absolute() else (base / path).resolve()))
        pathways = config.downstream.pathways
        if pathways and Path(pathways).suffix.lower() in (".csv", ".tsv", ".txt"):
            path = Path(pathways).expanduser()
            config.downstream.pathways = str(path if path.is_absolute() else base / path)
        if config.data.samples:
            for row in config.data.samples:
                for key in ("path", "image", "annotations"):
                    if row.get(key) and not Path(row[key]).is_absolute():
                        row[key] = str((base / row[key]).resolve())
    return config


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. clustering.n_clusters=7")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: cannot parse value ({err})") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    import yaml

    data: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file does not exist")
        try:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: a config is a mapping of sections (data:, clustering:, ...)"
            )
        _samples_as_written(path, data)
        base = path.resolve().parent
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, base=base)


def _samples_as_written(path: Path, data: dict) -> None:
    """``data.samples`` rows re-read with every value as the text written.

    YAML 1.1 reads ``sample: 0012`` as the octal number 10 and ``donor: no`` as False; sample
    ids and donors are names, so the rows take the text of the file.
    """
    import yaml

    from .io._sheet import yaml_text_loader

    section = data.get("data")
    if not isinstance(section, dict) or not isinstance(section.get("samples"), list):
        return
    with open(path) as fh:
        text = yaml.load(fh, Loader=yaml_text_loader())  # a SafeLoader: no arbitrary objects
    rows = (text.get("data") or {}).get("samples") if isinstance(text, dict) else None
    if isinstance(rows, list) and len(rows) == len(section["samples"]):
        section["samples"] = rows


def config_to_dict(config: Config) -> dict:
    """Plain nested dict of a config (for writing the resolved ``config.yaml``)."""
    return dataclasses.asdict(config)
