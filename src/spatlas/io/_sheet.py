"""Sample sheets and cohorts: many samples read, checked and concatenated into one AnnData."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger
from .._progress import progress
from ._h5ad import read_h5ad
from ._spaceranger import read_spaceranger

MISSING_LABELS = {"", "nan", "na", "none", "null"}
RESERVED_OBS = {K.SAMPLE, K.DONOR, K.BARCODE, K.IN_TISSUE, K.ARRAY_ROW, K.ARRAY_COL, K.LABEL}


@dataclass
class SampleSpec:
    """One row of a sample sheet.

    Attributes
    ----------
    sample
        Unique sample id.
    path
        Space Ranger output folder or ``.h5ad`` file.
    donor
        Donor id (defaults to the sample id: every sample its own donor).
    image
        Full-resolution H&E image (optional).
    annotations
        CSV/TSV of per-spot annotations keyed by barcode (first column or a ``barcode`` column);
        every column is added to ``obs`` (optional).
    label_column
        Column (of ``annotations``, or of the ``.h5ad`` obs) holding ground-truth domains; copied
        to ``obs['label']`` (optional).
    counts_layer
        For ``.h5ad`` input, the layer holding raw counts when ``X`` does not (optional).
    """

    sample: str
    path: str
    donor: str | None = None
    image: str | None = None
    annotations: str | None = None
    label_column: str | None = None
    counts_layer: str | None = None


_SPEC_FIELDS = [f.name for f in fields(SampleSpec)]


def _clean(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _resolve(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def specs_from_records(records: Sequence[dict], *, base: Path, where: str) -> list[SampleSpec]:
    """Build :class:`SampleSpec` from dict rows, resolving relative paths against ``base``."""
    problems = []
    specs = []
    unknown = sorted({k for r in records for k in r} - set(_SPEC_FIELDS))
    if unknown:
        logger.warning("%s: ignoring unknown column(s) %s", where, ", ".join(unknown))
    for i, rec in enumerate(records, start=1):
        row = {k: _clean(rec.get(k)) for k in _SPEC_FIELDS}
        if row["sample"] is None or row["path"] is None:
            problems.append(
                f"{where}: row {i} lacks "
                + " and ".join(k for k in ("sample", "path") if row[k] is None)
            )
            continue
        for key in ("path", "image", "annotations"):
            row[key] = _resolve(row[key], base)
        specs.append(SampleSpec(**row))
    ids = [s.sample for s in specs]
    dups = sorted({s for s in ids if ids.count(s) > 1})
    if dups:
        problems.append(
            f"{where}: duplicate sample id(s) {', '.join(dups)}; each sample needs its own id"
        )
    if not specs and not problems:
        problems.append(f"{where}: the sample sheet lists no samples")
    if problems:
        raise SpatlasInputError(problems)
    return specs


def read_sample_sheet(path: str | Path) -> list[SampleSpec]:
    """Read a sample sheet (CSV/TSV, or YAML: a list of rows or ``{samples: [...]}``).

    Columns: ``sample``, ``path`` (required); ``donor``, ``image``, ``annotations``,
    ``label_column``, ``counts_layer`` (optional). Relative paths are taken from the sheet's folder.
    """
    path = Path(path)
    if not path.exists():
        raise SpatlasInputError(f"{path}: sample sheet does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in {".yaml", ".yml"}:
            import yaml

            with open(path) as fh:
                data = yaml.safe_load(fh)
            if isinstance(data, dict) and "samples" in data:
                data = data["samples"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise SpatlasInputError(
                    f"{path}: YAML sample sheet must be a list of rows (sample, donor, path, ...) "
                    "or a mapping with a 'samples:' list"
                )
            records = data
        elif suffix in {".csv", ".tsv", ".txt"}:
            sep = "\t" if suffix == ".tsv" else None
            df = pd.read_csv(path, sep=sep, engine="python", dtype=str, comment="#")
            df.columns = [str(c).strip().lower() for c in df.columns]
            missing = [c for c in ("sample", "path") if c not in df.columns]
            if missing:
                raise SpatlasInputError(
                    f"{path}: sample sheet lacks column(s) {', '.join(missing)} (found: "
                    f"{', '.join(df.columns)}); the header must name sample, donor, path"
                )
            records = df.to_dict(orient="records")
        else:
            raise SpatlasInputError(
                f"{path}: unknown sample sheet format '{suffix}'; use .csv, .tsv or .yaml"
            )
    except (OSError, ValueError) as err:
        if isinstance(err, SpatlasInputError):
            raise
        raise SpatlasInputError(f"{path}: cannot parse sample sheet ({err})") from None
    except Exception as err:  # yaml.YAMLError and friends
        raise SpatlasInputError(f"{path}: cannot parse sample sheet ({err})") from None
    return specs_from_records(records, base=path.parent, where=str(path))


def _read_annotations(path: Path, *, where: str) -> pd.DataFrame:
    if not path.exists():
        raise SpatlasInputError(f"{where}: annotations file {path} does not exist")
    sep = "\t" if ".tsv" in path.suffixes or ".txt" in path.suffixes else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise SpatlasInputError(f"{where}: cannot read annotations {path} ({err})") from None
    key = "barcode" if "barcode" in df.columns else df.columns[0]
    df = df.set_index(key)
    df.index = df.index.astype(str)
    return df


def _labels_to_obs(values: pd.Series) -> pd.Categorical:
    text = values.astype(str).str.strip()
    text = text.where(~text.str.lower().isin(MISSING_LABELS))
    return pd.Categorical(text)


def read_sample(spec: SampleSpec) -> ad.AnnData:
    """Read and check the sample a :class:`SampleSpec` describes (labels into ``obs['label']``)."""
    path = Path(spec.path)
    where = f"sample {spec.sample}"
    if not path.exists():
        raise SpatlasInputError(f"{where}: {path} does not exist")
    if path.is_dir():
        adata = read_spaceranger(
            path, sample=spec.sample, donor=spec.donor, fullres_image=spec.image
        )
    elif path.suffix == ".h5ad":
        adata = read_h5ad(
            path,
            sample=spec.sample,
            donor=spec.donor,
            counts_layer=spec.counts_layer,
            fullres_image=spec.image,
        )
    else:
        raise SpatlasInputError(
            f"{where}: {path} is neither a Space Ranger output folder nor an .h5ad file"
        )
    if spec.annotations is not None:
        ann = _read_annotations(Path(spec.annotations), where=where)
        barcodes = adata.obs[K.BARCODE].astype(str)
        found = barcodes.isin(ann.index)
        if not found.any():
            raise SpatlasInputError(
                f"{where}: none of the {adata.n_obs} barcodes appear in {spec.annotations} "
                f"(its first barcodes: {', '.join(ann.index[:3])})"
            )
        if not found.all():
            logger.warning(
                "%s: %d of %d spots have no row in %s (left unlabelled)",
                where,
                (~found).sum(),
                found.size,
                spec.annotations,
            )
        joined = ann.reindex(barcodes.to_numpy())
        for col in joined.columns:
            if col in RESERVED_OBS:
                continue
            adata.obs[col] = joined[col].to_numpy()
    if spec.label_column is not None:
        if spec.label_column not in adata.obs:
            source = spec.annotations or spec.path
            cols = (
                list(ann.columns)
                if spec.annotations is not None
                else [c for c in adata.obs.columns if c not in RESERVED_OBS]
            )
            raise SpatlasInputError(
                f"{where}: label column '{spec.label_column}' does not exist in {source} "
                f"(columns: {', '.join(map(str, cols))})"
            )
        adata.obs[K.LABEL] = _labels_to_obs(adata.obs[spec.label_column])
    return adata


def concat_samples(adatas: Sequence[ad.AnnData], *, join: str = "inner") -> ad.AnnData:
    """Concatenate per-sample AnnData into one cohort (``anndata.concat(..., label='sample')``).

    ``obs_names`` become ``{barcode}-{sample}``; ``obs['sample']`` and ``obs['donor']`` are
    categorical in the given order; ``uns['spatial']`` holds every sample's entry; ``obsm``
    entries that every sample has with the same width are kept.
    """
    samples = [str(a.obs[K.SAMPLE].iloc[0]) for a in adatas]
    if join == "inner":
        shared = set(adatas[0].var_names)
        for a in adatas[1:]:
            shared &= set(a.var_names)
        if not shared:
            raise SpatlasInputError(
                "the samples share no gene: check they use the same gene ids (Ensembl ids vs "
                "symbols), or concatenate with join='outer'"
            )
        n_union = len(set().union(*(a.var_names for a in adatas)))
        if len(shared) < n_union:
            logger.info("keeping the %d genes all samples share (of %d)", len(shared), n_union)
    donors = list(dict.fromkeys(str(a.obs[K.DONOR].iloc[0]) for a in adatas))
    # anndata's inner join would also drop obs columns that only some samples have (labels!)
    columns = list(dict.fromkeys(c for a in adatas for c in a.obs.columns))
    # an obsm entry is kept only where every sample has it with the same width (inner and
    # outer joins would otherwise drop it or silently cut its columns)
    widths = [{k: v.shape[1:] for k, v in a.obsm.items()} for a in adatas]
    shared_obsm = {k for k in widths[0] if all(w.get(k) == widths[0][k] for w in widths[1:])}
    dropped = sorted(set().union(*widths) - shared_obsm - {K.SPATIAL})
    if dropped:
        logger.info("obsm entries not in every sample with one width, dropped: %s", dropped)
    aligned = []
    for a in adatas:
        missing = [c for c in columns if c not in a.obs]
        if missing or set(a.obsm) - shared_obsm:
            a = a.copy()
            for c in missing:
                a.obs[c] = pd.Series(np.nan, index=a.obs_names, dtype=object)
            for k in set(a.obsm) - shared_obsm:
                del a.obsm[k]
        aligned.append(a)
    cohort = ad.concat(
        aligned,
        join=join,
        keys=samples,
        label=K.SAMPLE,
        index_unique="-",
        merge="same",
        fill_value=0,
    )
    cohort.obs[K.SAMPLE] = pd.Categorical(cohort.obs[K.SAMPLE].astype(str), categories=samples)
    cohort.obs[K.DONOR] = pd.Categorical(cohort.obs[K.DONOR].astype(str), categories=donors)
    if K.LABEL in cohort.obs:
        cohort.obs[K.LABEL] = _labels_to_obs(cohort.obs[K.LABEL])
    cohort.uns[K.SPATIAL] = {s: a.uns[K.SPATIAL][s] for s, a in zip(samples, adatas, strict=True)}
    return cohort


def _read_all(specs: Sequence[SampleSpec]) -> tuple[list[ad.AnnData], list[str]]:
    adatas, problems = [], []
    for spec in progress(specs, desc="reading samples", total=len(specs)):
        try:
            adatas.append(read_sample(spec))
        except SpatlasInputError as err:
            problems.extend(
                p if p.startswith(f"sample {spec.sample}") else f"sample {spec.sample}: {p}"
                for p in err.problems
            )
    labelled = [s.label_column is not None for s in specs]
    if any(labelled) and not all(labelled):
        logger.info(
            "label columns given for %d of %d samples; the others count as unlabelled",
            sum(labelled),
            len(labelled),
        )
    return adatas, problems


def read_cohort(sheet: str | Path | Sequence[SampleSpec], *, join: str = "inner") -> ad.AnnData:
    """Read every sample of a sample sheet, check it, and concatenate into one AnnData.

    Parameters
    ----------
    sheet
        Path of a sample sheet (see :func:`read_sample_sheet`) or a list of :class:`SampleSpec`.
    join
        ``'inner'`` keeps the genes all samples share; ``'outer'`` keeps all, filling zeros.

    Returns
    -------
    The cohort: raw counts in ``X``; ``obs['sample']``, ``obs['donor']`` (categorical),
    ``obs['label']`` where label columns are given; ``obsm['spatial']``; ``uns['spatial']``.

    Raises
    ------
    SpatlasInputError
        Listing every problem found in every sample.
    """
    specs = read_sample_sheet(sheet) if isinstance(sheet, str | Path) else list(sheet)
    adatas, problems = _read_all(specs)
    if problems:
        raise SpatlasInputError(problems)
    return concat_samples(adatas, join=join)


def summarize_cohort(adata: ad.AnnData) -> pd.DataFrame:
    """One row per sample: donor, spots, genes detected, images, labelled spots and classes."""
    rows = []
    for sample in adata.obs[K.SAMPLE].cat.categories:
        mask = (adata.obs[K.SAMPLE] == sample).to_numpy()
        sub_X = adata.X[mask]
        info = adata.uns.get(K.SPATIAL, {}).get(sample, {})
        images = sorted(info.get(K.IMAGES, {}))
        if info.get(K.METADATA, {}).get(K.FULLRES_PATH):
            images.append("fullres")
        labels = adata.obs.loc[mask, K.LABEL] if K.LABEL in adata.obs else None
        rows.append(
            {
                "sample": sample,
                "donor": str(adata.obs.loc[mask, K.DONOR].iloc[0]),
                "spots": int(mask.sum()),
                "genes": int((np.asarray(sub_X.sum(axis=0)).ravel() > 0).sum()),
                "median_umi": float(np.median(np.asarray(sub_X.sum(axis=1)).ravel())),
                "images": ",".join(images) or "-",
                "labelled": int(labels.notna().sum()) if labels is not None else 0,
                "classes": int(labels.nunique()) if labels is not None else 0,
            }
        )
    return pd.DataFrame(rows)


def validate_sheet(path: str | Path) -> tuple[pd.DataFrame | None, list[str]]:
    """Check a sample sheet and all its samples.

    Returns
    -------
    (summary, problems): the per-sample summary (``None`` when there are problems) and one line per
    problem found (empty when the cohort can be used).
    """
    try:
        specs = read_sample_sheet(path)
    except SpatlasInputError as err:
        return None, err.problems
    adatas, problems = _read_all(specs)
    if problems:
        return None, problems
    try:
        cohort = concat_samples(adatas)
    except SpatlasInputError as err:
        return None, err.problems
    return summarize_cohort(cohort), []


def spec_dicts(specs: Sequence[SampleSpec]) -> list[dict]:
    """Plain dicts of specs without empty fields (for the resolved config)."""
    return [{k: v for k, v in asdict(s).items() if v is not None} for s in specs]
