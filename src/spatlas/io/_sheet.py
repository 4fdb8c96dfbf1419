"""Sample sheets and cohorts: many samples read, checked and concatenated into one AnnData."""

from __future__ import annotations

import csv
import functools
import io
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _keys as K
from .._errors import SpatlasInputError
from .._logging import logger
from .._progress import progress
from ._h5ad import read_h5ad
from ._spaceranger import parse_bin, read_spaceranger
from ._stream import stack_rows
from ._validate import check_spot_ids, first_duplicate, reading

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
    bin
        For a Visium HD ``outs/`` folder: the bin side in µm (``8`` reads
        ``binned_outputs/square_008um``; default 8) or ``cells`` for the cell segmentation
        (optional).
    region
        For a SpatialData store (``.zarr``): the region (shapes element) of the sample, when the
        store's table annotates several; several rows may read one store, one region each
        (optional).
    table
        For a SpatialData store: the table holding the counts, when the store has several
        (optional).
    """

    sample: str
    path: str
    donor: str | None = None
    image: str | None = None
    annotations: str | None = None
    label_column: str | None = None
    counts_layer: str | None = None
    bin: str | None = None
    region: str | None = None
    table: str | None = None


_SPEC_FIELDS = [f.name for f in fields(SampleSpec)]
_PATH_FIELDS = ("path", "image", "annotations")
# YAML spellings of "no value" (the text loader keeps every scalar as written)
_YAML_NULLS = {"", "~", "null", "Null", "NULL"}
# 3 in one sample, 3.0 in another (a label column with gaps turns float): one spelling, 3
_INTEGRAL_FLOAT = r"^([+-]?\d+)\.0*$"


def _field(value, key: str, row: str, where: str) -> tuple[str | None, str | None]:
    """One sheet field as the text written: (text or None, problem or None)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None, None
    if isinstance(value, bool):
        return None, (
            f"{where}: {row}: {key} is the YAML boolean {value} (YAML reads yes/no/on/off/true/"
            f"false as booleans); quote it as written, e.g. {key}: 'no'"
        )
    if isinstance(value, float):
        return None, (
            f"{where}: {row}: {key} is the number {value!r}; quote it so it is read as written "
            f"(e.g. {key}: '1.10')"
        )
    if isinstance(value, list | dict):
        return None, f"{where}: {row}: {key} is a {type(value).__name__}; give one value"
    text = str(value).strip()
    return text or None, None


def _resolve(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _same_file_problems(specs: Sequence[SampleSpec], rows: Sequence[str], where: str) -> list[str]:
    """Two rows naming the same Space Ranger folder / .h5ad, or the same image: name both."""
    problems = []
    for key, what in (("path", "Space Ranger folder or .h5ad"), ("image", "image")):
        seen: dict[tuple[str, str | None], int] = {}
        for i, spec in enumerate(specs):
            value = getattr(spec, key)
            if value is None:
                continue
            # one SpatialData store may hold several samples, one region each
            real = (os.path.realpath(value), spec.region if key == "path" else None)
            if real in seen:
                j = seen[real]
                problems.append(
                    f"{where}: samples {specs[j].sample} ({rows[j]}) and {spec.sample} "
                    f"({rows[i]}) both read {value}; each sample needs its own {what} "
                    f"(a copy-paste slip?)"
                )
            else:
                seen[real] = i
    return problems


def specs_from_records(
    records: Sequence[dict],
    *,
    base: Path,
    where: str,
    rows: Sequence[str] | None = None,
) -> list[SampleSpec]:
    """Build :class:`SampleSpec` from dict rows, resolving relative paths against ``base``.

    Every field is kept as the text written (``0012`` stays ``0012``); a YAML boolean or float
    (``donor: no``, ``sample: 1.10``) is refused with the advice to quote it. Duplicated sample
    ids, and two samples reading the same folder / file or the same image, are refused naming
    both rows.

    Parameters
    ----------
    records
        One dict per sample (keys: the :class:`SampleSpec` fields).
    base
        Folder relative paths are taken from.
    where
        The sheet (file name, or ``data.samples``), first in every problem line.
    rows
        How to name each record in a problem line (default ``row 1``, ``row 2``, ...).
    """
    rows = list(rows) if rows is not None else [f"row {i}" for i in range(1, len(records) + 1)]
    problems = []
    specs, spec_rows = [], []
    unknown = sorted({str(k) for r in records for k in r} - set(_SPEC_FIELDS))
    if unknown:
        logger.warning("%s: ignoring unknown column(s) %s", where, ", ".join(unknown))
    for rec, label in zip(records, rows, strict=True):
        row, bad = {}, set()
        for key in _SPEC_FIELDS:
            row[key], problem = _field(rec.get(key), key, label, where)
            if problem:
                problems.append(problem)
                bad.add(key)
        lacking = [k for k in ("sample", "path") if row[k] is None and k not in bad]
        if lacking:
            problems.append(f"{where}: {label} lacks " + " and ".join(lacking))
        if row["sample"] is None or row["path"] is None:
            continue
        for key in _PATH_FIELDS:
            row[key] = _resolve(row[key], base)
        if row["bin"] is not None and "bin" not in bad:
            try:
                row["bin"] = str(parse_bin(row["bin"], where=f"{where}: {label}"))
            except SpatlasInputError as err:
                problems.extend(err.problems)
                continue
        specs.append(SampleSpec(**row))
        spec_rows.append(label)
    ids = pd.Series([s.sample for s in specs])
    dups = list(dict.fromkeys(ids[ids.duplicated(keep=False)]))
    if dups:
        places = "; ".join(
            f"{d} in " + " and ".join(spec_rows[i] for i in np.flatnonzero(ids == d)) for d in dups
        )
        problems.append(
            f"{where}: duplicate sample id(s) {', '.join(dups)} ({places}); each sample needs "
            "its own id"
        )
    problems += _same_file_problems(specs, spec_rows, where)
    if not specs and not problems:
        problems.append(f"{where}: the sample sheet lists no samples")
    if problems:
        raise SpatlasInputError(problems)
    return specs


def _read_text(path: Path) -> str:
    """A sheet's text: UTF-8 with or without BOM (Excel's 'CSV UTF-8'), or UTF-16 with BOM."""
    raw = path.read_bytes()
    if raw.startswith(b"PK\x03\x04"):
        raise SpatlasInputError(
            f"{path}: is an Excel workbook (.xlsx), not text; in Excel use Save As > 'CSV UTF-8'"
        )
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SpatlasInputError(
            f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save the "
            "sheet as UTF-8 ('CSV UTF-8' in Excel)"
        ) from None
    if "\x00" in text:
        raise SpatlasInputError(f"{path}: holds binary data, not a text sample sheet")
    return text


def _delimiter(path: Path, text: str) -> str:
    if path.suffix.lower() == ".tsv":
        return "\t"
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            counts = {d: line.count(d) for d in (",", "\t", ";")}
            best = max(counts, key=lambda d: counts[d])
            return best if counts[best] else ","
    return ","


def _csv_records(path: Path, text: str) -> tuple[list[dict], list[str]]:
    """Rows of a CSV / TSV sheet as dicts of the text written, with their line numbers.

    ``#`` is data inside a field; only a line holding nothing but ``# ...`` in its first cell is
    a comment. Empty rows (blank lines, a spreadsheet's trailing ``,,,,``) and empty unnamed
    columns are skipped; CRLF line ends and a UTF-8 BOM are read as Excel writes them.
    """
    delimiter = _delimiter(path, text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    records, rows = [], []
    for cells in reader:
        cells = [c.strip() for c in cells]
        if not any(cells) or (cells[0].startswith("#") and not any(cells[1:])):
            continue
        if header is None:
            header = [c.lower() for c in cells]
            named = [c for c in header if c]
            dup = next((c for c in named if named.count(c) > 1), None)
            if dup is not None:
                raise SpatlasInputError(
                    f"{path}: the header names column '{dup}' twice; each column once"
                )
            continue
        line = f"line {reader.line_num}"
        extra = cells[len(header) :]
        if any(extra):
            raise SpatlasInputError(
                f"{path}: {line} has {len(cells)} fields but the header has {len(header)}; "
                f"quote values that contain {delimiter!r}"
            )
        cells = cells[: len(header)] + [""] * (len(header) - len(cells))
        unnamed = [v for name, v in zip(header, cells, strict=True) if not name and v]
        if unnamed:
            raise SpatlasInputError(
                f"{path}: {line} has the value {unnamed[0]!r} in a column without a name in the "
                "header; name the column or delete the value"
            )
        records.append({name: v for name, v in zip(header, cells, strict=True) if name})
        rows.append(line)
    if header is None:
        raise SpatlasInputError(
            f"{path}: the sample sheet is empty; the header must name sample, path"
        )
    missing = [c for c in ("sample", "path") if c not in header]
    if missing:
        raise SpatlasInputError(
            f"{path}: sample sheet lacks column(s) {', '.join(missing)} (found: "
            f"{', '.join(c for c in header if c)}); the header must name sample, donor, path"
        )
    return records, rows


@functools.cache
def yaml_text_loader() -> type:
    """A YAML ``SafeLoader`` that reads every plain scalar as the text written.

    YAML 1.1 would read ``sample: 0012`` as the octal number 10 and ``donor: no`` as False;
    sample rows (a YAML sheet, a config's ``data.samples``) are read with this loader instead.
    """
    import yaml

    class TextLoader(yaml.SafeLoader):
        """Reads every plain scalar as a string: no octal 0012 -> 10, no ``no`` -> False."""

    TextLoader.yaml_implicit_resolvers = {}
    return TextLoader


def _yaml_records(path: Path, text: str) -> tuple[list[dict], list[str]]:
    """Rows of a YAML sheet, every scalar kept as the text written (``0012``, ``no``)."""
    import yaml

    with reading(path, "YAML sample sheet", "check its indentation and quoting"):
        data = yaml.load(text, Loader=yaml_text_loader())  # a SafeLoader: no arbitrary objects
    if isinstance(data, dict) and "samples" in data:
        data = data["samples"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise SpatlasInputError(
            f"{path}: YAML sample sheet must be a list of rows (sample, donor, path, ...) "
            "or a mapping with a 'samples:' list"
        )
    records = [
        {
            str(k).strip().lower(): (None if isinstance(v, str) and v.strip() in _YAML_NULLS else v)
            for k, v in row.items()
        }
        for row in data
    ]
    return records, [f"row {i}" for i in range(1, len(records) + 1)]


def read_sample_sheet(path: str | Path) -> list[SampleSpec]:
    """Read a sample sheet (CSV/TSV, or YAML: a list of rows or ``{samples: [...]}``).

    Columns: ``sample``, ``path`` (required); ``donor``, ``image``, ``annotations``,
    ``label_column``, ``counts_layer``, ``bin`` (Visium HD), ``region`` and ``table`` (SpatialData
    stores) (optional); see :class:`SampleSpec`. Relative paths are taken from the sheet's folder.
    Every value is read as the text written (``0012`` stays ``0012``, ``no`` stays ``no``, ``#``
    is part of a value). A sheet saved by Excel (UTF-8 BOM, CRLF line ends, ``;`` separators,
    trailing empty rows) reads as written.
    """
    path = Path(path)
    if not path.exists():
        raise SpatlasInputError(f"{path}: sample sheet does not exist")
    if path.is_dir():
        raise SpatlasInputError(f"{path}: is a folder; give the sample sheet file (CSV/TSV/YAML)")
    suffix = path.suffix.lower()
    if suffix not in {".yaml", ".yml", ".csv", ".tsv", ".txt"}:
        raise SpatlasInputError(
            f"{path}: unknown sample sheet format '{suffix}'; use .csv, .tsv or .yaml"
        )
    with reading(path, "sample sheet", "save it as UTF-8 text"):
        text = _read_text(path)
    if suffix in {".yaml", ".yml"}:
        records, rows = _yaml_records(path, text)
    else:
        records, rows = _csv_records(path, text)
    return specs_from_records(records, base=path.parent, where=str(path), rows=rows)


def _read_annotations(path: Path, *, where: str) -> pd.DataFrame:
    """Per-spot annotations keyed by barcode (a ``barcode`` column, else the first column)."""
    if not path.exists():
        raise SpatlasInputError(f"{where}: annotations file {path} does not exist")
    sep = "\t" if ".tsv" in path.suffixes or ".txt" in path.suffixes else ","
    with reading(path, "annotations table", "save it as a CSV/TSV with one row per barcode"):
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    df.columns = [str(c).strip() for c in df.columns]
    blank = (df.apply(lambda col: col.str.strip()) == "").all(axis=1)
    df = df.loc[~blank.to_numpy()]  # a spreadsheet's trailing ,,,, rows
    key = "barcode" if "barcode" in df.columns else df.columns[0]
    df = df.set_index(key)
    df.index = df.index.astype(str).str.strip()
    dup = first_duplicate(df.index)
    if dup is not None:
        value, first, second, repeats = dup
        positions = np.flatnonzero(~blank.to_numpy()) + 2  # file lines (the header is line 1)
        more = f", and {repeats - 1} more repeat(s)" if repeats > 1 else ""
        raise SpatlasInputError(
            f"{path}: barcode {value} appears twice (lines {positions[first]} and "
            f"{positions[second]}{more}); keep one row per spot"
        )
    return df


def _labels_to_obs(values: pd.Series) -> pd.Categorical:
    """Ground-truth labels as text: missing spellings to NaN, ``3.0`` to ``3`` (see above)."""
    text = values.astype(str).str.strip()
    text = text.where(~text.str.lower().isin(MISSING_LABELS))
    text = text.str.replace(_INTEGRAL_FLOAT, r"\1", regex=True)
    return pd.Categorical(text)


def read_sample(spec: SampleSpec) -> ad.AnnData:
    """Read and check the sample a :class:`SampleSpec` describes (labels into ``obs['label']``).

    Raises
    ------
    SpatlasInputError
        One line per problem; an unexpected error inside a reader also becomes one line naming
        the sample and its path.
    """
    fix = "check that the files this sample's row names are intact and of the right kind"
    with reading(spec.path, f"sample {spec.sample}", fix):
        return _read_sample(spec)


def _read_sample(spec: SampleSpec) -> ad.AnnData:
    path = Path(spec.path)
    where = f"sample {spec.sample}"
    if not path.exists():
        raise SpatlasInputError(f"{where}: {path} does not exist")
    store_fields = [k for k in ("region", "table") if getattr(spec, k) is not None]
    if is_spatialdata_store(path):
        if spec.bin is not None or spec.counts_layer is not None:
            raise SpatlasInputError(
                f"{where}: {path} is a SpatialData store; bin and counts_layer are for Space "
                "Ranger folders and .h5ad files (the store's table holds the counts)"
            )
        from ._spatialdata import read_spatialdata

        adata = read_spatialdata(
            path,
            table=spec.table,
            region=spec.region,
            sample=spec.sample,
            donor=spec.donor,
            image=spec.image,
        )
    elif store_fields:
        raise SpatlasInputError(
            f"{where}: {' and '.join(store_fields)} given, but {path} is not a SpatialData store "
            "(a .zarr folder with a tables/ group); drop them or point path at the store"
        )
    elif path.is_dir():
        adata = read_spaceranger(
            path, sample=spec.sample, donor=spec.donor, fullres_image=spec.image, bin=spec.bin
        )
    elif spec.bin is not None:
        raise SpatlasInputError(
            f"{where}: bin is for a Visium HD outs/ folder, but {path} is a file; drop bin"
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
            f"{where}: {path} is neither a Space Ranger output folder, an .h5ad file nor a "
            "SpatialData store (.zarr)"
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


def is_spatialdata_store(path: Path) -> bool:
    """A folder that is a SpatialData zarr store (``.zarr`` with zarr metadata at its root)."""
    if not path.is_dir():
        return False
    has_meta = any((path / name).exists() for name in ("zarr.json", ".zgroup", ".zattrs"))
    return has_meta and (path.suffix == ".zarr" or (path / "tables").is_dir())


def concat_samples(
    adatas: Sequence[ad.AnnData], *, join: str = "inner", consume: bool = False
) -> ad.AnnData:
    """Concatenate per-sample AnnData into one cohort (``anndata.concat(..., label='sample')``).

    ``obs_names`` become ``{barcode}-{sample}``; ``obs['sample']`` and ``obs['donor']`` are
    categorical in the given order; ``uns['spatial']`` holds every sample's entry; ``obsm``
    entries that every sample has with the same width are kept. With ``consume`` (the readers
    pass their own freshly read samples), each sample's ``X`` is released as soon as it is
    copied into the cohort, so the counts are never held twice; the samples passed are then
    left without ``X``.

    Raises
    ------
    SpatlasInputError
        When two samples share an id, the samples share no gene (inner join), or two spots end up
        with one id.
    """
    samples = [str(a.obs[K.SAMPLE].iloc[0]) for a in adatas]
    dup = first_duplicate(samples)
    if dup is not None:
        raise SpatlasInputError(
            f"samples {dup[1] + 1} and {dup[2] + 1} are both called {dup[0]}; each sample needs "
            "its own id"
        )
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
    # None unless every sample has the same genes in one order (and the caller lets go of them)
    X = _stack_counts(aligned) if consume else None
    if X is not None:
        aligned = [ad.AnnData(obs=a.obs, var=a.var, obsm=dict(a.obsm), uns=a.uns) for a in aligned]
    cohort = ad.concat(
        aligned,
        join=join,
        keys=samples,
        label=K.SAMPLE,
        index_unique="-",
        merge="same",
        fill_value=0,
    )
    if X is not None:
        cohort.X = X
    cohort.obs[K.SAMPLE] = pd.Categorical(cohort.obs[K.SAMPLE].astype(str), categories=samples)
    cohort.obs[K.DONOR] = pd.Categorical(cohort.obs[K.DONOR].astype(str), categories=donors)
    if K.LABEL in cohort.obs:
        cohort.obs[K.LABEL] = _labels_to_obs(cohort.obs[K.LABEL])
    cohort.uns[K.SPATIAL] = {s: a.uns[K.SPATIAL][s] for s, a in zip(samples, adatas, strict=True)}
    problems = check_spot_ids(cohort.obs_names, where="cohort")
    if problems:
        raise SpatlasInputError(problems)
    return cohort


def _stack_counts(adatas: list[ad.AnnData]) -> sp.csr_matrix | None:
    """The samples' CSR ``X`` stacked row-wise, each sample's matrix released once copied.

    ``anndata.concat`` holds every sample's matrix and the result at once (twice the counts);
    here the result is allocated once and each sample's ``X`` is dropped after its copy, so the
    peak is the counts plus one sample. ``None`` when the samples' genes differ (the join then
    needs ``anndata.concat``) or a matrix is not CSR.
    """
    first = adatas[0].var_names
    if not all(
        a.X is not None and sp.issparse(a.X) and a.X.format == "csr" and a.var_names.equals(first)
        for a in adatas
    ):
        return None
    pieces = [a.X for a in adatas]
    for a in adatas:
        a.X = None  # released as it is copied: the stacked matrix replaces it
    return stack_rows(pieces, len(first))


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
    return concat_samples(adatas, join=join, consume=True)


def summarize_cohort(adata: ad.AnnData) -> pd.DataFrame:
    """One row per sample: donor, spots, genes detected, images, labelled spots and classes.

    Without ``X`` (counts streamed from disk) genes and median UMIs are missing.
    """
    rows = []
    for sample in adata.obs[K.SAMPLE].cat.categories:
        mask = (adata.obs[K.SAMPLE] == sample).to_numpy()
        sub_X = adata.X[mask] if adata.X is not None else None  # None: streamed counts
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
                "genes": (
                    int((np.asarray(sub_X.sum(axis=0)).ravel() > 0).sum())
                    if sub_X is not None
                    else pd.NA
                ),
                "median_umi": (
                    float(np.median(np.asarray(sub_X.sum(axis=1)).ravel()))
                    if sub_X is not None
                    else float("nan")
                ),
                "images": ",".join(images) or "-",
                "labelled": int(labels.notna().sum()) if labels is not None else 0,
                "classes": int(labels.nunique()) if labels is not None else 0,
            }
        )
    return pd.DataFrame(rows)


def _is_run_config(path: Path) -> bool:
    """A YAML file with a ``data:`` section is a run config, not a sample sheet."""
    if path.suffix.lower() not in {".yaml", ".yml"} or not path.is_file():
        return False
    import yaml

    try:
        data = yaml.safe_load(_read_text(path))
    except Exception:  # not YAML: read_sample_sheet says why
        return False
    return isinstance(data, dict) and "data" in data and "samples" not in data


def validate_sheet(path: str | Path) -> tuple[pd.DataFrame | None, list[str]]:
    """Check a sample sheet (or a run config) and every sample it names, as ``spatlas run`` does.

    The checks are those of the run's load step (:func:`read_cohort`; for a run config, its
    config checks and :func:`spatlas.pipeline.load_cohort`), so what passes here is not refused
    when a run loads it.

    Returns
    -------
    (summary, problems): the per-sample summary (``None`` when there are problems) and one line per
    problem found (empty when the cohort can be used).
    """
    path = Path(path)
    try:
        if _is_run_config(path):
            from .._config import load_config
            from ..pipeline import check_config, load_cohort

            config = load_config(path)
            check_config(config)
            cohort = load_cohort(config)
        else:
            cohort = read_cohort(path)
    except SpatlasInputError as err:
        return None, err.problems
    return summarize_cohort(cohort), []


def spec_dicts(specs: Sequence[SampleSpec]) -> list[dict]:
    """Plain dicts of specs without empty fields (for the resolved config)."""
    return [{k: v for k, v in asdict(s).items() if v is not None} for s in specs]
