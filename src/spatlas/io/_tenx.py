"""10x Genomics count matrices: ``filtered_feature_bc_matrix.h5`` and the ``.mtx`` folder."""

from __future__ import annotations

import csv
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from .._errors import SpatlasInputError
from ._validate import check_unique, open_maybe_gzip, reading
from ._write import atomic_path

FIX_COUNTS = "copy it again from the Space Ranger run (outs/) of this sample"


def _decode(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _check_ids(
    path: Path, barcodes: list[str], ids: list[str], *, barcode_where: str, feature_where: str
) -> list[str]:
    """Barcodes and feature ids of a count matrix must be unique (Space Ranger writes them so)."""
    return check_unique(
        barcodes,
        what="barcode",
        where=barcode_where,
        units="entries",
        fix="a barcode is one spot and must appear once; " + FIX_COUNTS,
    ) + check_unique(
        ids,
        what="feature id",
        where=feature_where,
        units="entries",
        fix="Space Ranger's feature ids are unique (gene symbols need not be); " + FIX_COUNTS,
    )


def _csc_problems(
    path: Path,
    shape: tuple[int, int],
    data: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    n_barcodes: int,
    n_ids: int,
) -> list[str]:
    """The sparse arrays of an HDF5 count matrix must agree with each other and with its shape."""
    n_genes, n_cells = shape
    what = f"{path}: count matrix is damaged ("
    if n_cells != n_barcodes or n_genes != n_ids:
        return [
            f"{what}shape says {n_genes} features x {n_cells} barcodes but it lists {n_ids} "
            f"feature ids and {n_barcodes} barcodes); {FIX_COUNTS}"
        ]
    if indptr.size != n_cells + 1 or data.size != indices.size:
        return [
            f"{what}{indptr.size} column pointers for {n_cells} barcodes, {data.size} values for "
            f"{indices.size} row indices); {FIX_COUNTS}"
        ]
    if indptr[0] != 0 or indptr[-1] != data.size or np.any(np.diff(indptr) < 0):
        return [
            f"{what}column pointers run {indptr[0]}..{indptr[-1]} for {data.size} values, or "
            f"decrease); {FIX_COUNTS}"
        ]
    if indices.size and (indices.min() < 0 or indices.max() >= n_genes):
        return [
            f"{what}row indices {indices.min()}..{indices.max()} outside 0..{n_genes - 1}); "
            f"{FIX_COUNTS}"
        ]
    return []


def read_10x_h5(path: str | Path) -> ad.AnnData:
    """Read a Cell Ranger / Space Ranger HDF5 count matrix (v3 ``matrix`` or v2 genome group).

    Returns an AnnData with spots as observations, raw counts in ``X`` (CSR, float32),
    ``var_names`` = feature ids and ``var['gene_symbols']`` when present. Only
    ``Gene Expression`` features are kept when the file has several feature types.

    Raises
    ------
    SpatlasInputError
        When the file is not HDF5, is truncated or damaged, lacks a dataset, its arrays disagree
        with its shape, or a barcode or feature id repeats.
    """
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise SpatlasInputError(
            f"{path}: not a readable HDF5 count matrix ({err}); expected Space Ranger's "
            "filtered_feature_bc_matrix.h5"
        ) from None
    with f, reading(path, "HDF5 count matrix (damaged or incomplete)", FIX_COUNTS):
        if "matrix" in f:
            grp = f["matrix"]
            feat = grp["features"]
            ids = _decode(feat["id"][:])
            names = _decode(feat["name"][:]) if "name" in feat else ids
            types = _decode(feat["feature_type"][:]) if "feature_type" in feat else None
        elif len(f.keys()) == 1:  # v2: one group per genome
            grp = f[next(iter(f.keys()))]
            ids = _decode(grp["genes"][:])
            names = _decode(grp["gene_names"][:]) if "gene_names" in grp else ids
            types = None
        else:
            raise SpatlasInputError(
                f"{path}: HDF5 file has neither a 'matrix' group (Space Ranger >= 3) nor a single "
                f"genome group (v2); found groups {sorted(f.keys())}"
            )
        n_genes, n_cells = (int(x) for x in grp["shape"][:])
        data, indices, indptr = grp["data"][:], grp["indices"][:], grp["indptr"][:]
        barcodes = _decode(grp["barcodes"][:])
    problems = _csc_problems(
        path, (n_genes, n_cells), data, indices, indptr, len(barcodes), len(ids)
    ) or _check_ids(path, barcodes, ids, barcode_where=str(path), feature_where=str(path))
    if problems:
        raise SpatlasInputError(problems)
    matrix = sp.csc_matrix((data, indices, indptr), shape=(n_genes, n_cells))
    X = matrix.T.tocsr().astype(np.float32)
    var = pd.DataFrame({"gene_symbols": names}, index=pd.Index(ids, name=None))
    if types is not None:
        var["feature_types"] = types
        keep = var["feature_types"].to_numpy() == "Gene Expression"
        if keep.any() and not keep.all():
            X, var = X[:, keep], var.loc[keep]
    return ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(barcodes)), var=var)


def write_10x_h5(adata: ad.AnnData, path: str | Path, *, genome: str = "unknown") -> None:
    """Write ``adata.X`` (integer counts) as a Space Ranger v3 ``filtered_feature_bc_matrix.h5``.

    Gene symbols are taken from ``var['gene_symbols']`` when present, else the var names.
    The file is written to a temporary name and renamed, so an existing file is never left
    half-written.
    """
    import h5py

    path = Path(path)
    X = sp.csc_matrix(adata.X.T)  # genes x spots
    data = X.data
    if data.size and not np.array_equal(data, np.round(data)):
        raise SpatlasInputError("write_10x_h5 needs integer counts in adata.X")
    ids = np.asarray(adata.var_names, dtype="S")
    symbols = adata.var["gene_symbols"] if "gene_symbols" in adata.var else adata.var_names
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        grp = f.create_group("matrix")
        opts = {"compression": "gzip", "compression_opts": 9, "shuffle": True}
        grp.create_dataset("barcodes", data=np.asarray(adata.obs_names, dtype="S"))
        grp.create_dataset("data", data=data.astype(np.int32), **opts)
        grp.create_dataset("indices", data=X.indices.astype(np.int64), **opts)
        grp.create_dataset("indptr", data=X.indptr.astype(np.int64))
        grp.create_dataset("shape", data=np.asarray(X.shape, dtype=np.int32))
        feat = grp.create_group("features")
        feat.create_dataset("id", data=ids)
        feat.create_dataset("name", data=np.asarray(symbols, dtype="S"))
        feat.create_dataset("feature_type", data=np.full(len(ids), b"Gene Expression"))
        feat.create_dataset("genome", data=np.full(len(ids), genome.encode()))
        feat.create_dataset("_all_tag_keys", data=np.asarray([b"genome"]))


def _first_existing(folder: Path, names: list[str]) -> Path | None:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.exists():
                return candidate
    return None


def _read_tsv(path: Path, what: str) -> pd.DataFrame:
    """A headerless tab-separated file, every field as the text written (gzip or not)."""
    with reading(path, what, FIX_COUNTS), open_maybe_gzip(path) as fh:
        table = pd.read_csv(
            fh,
            header=None,
            sep="\t",
            dtype=str,
            keep_default_na=False,
            quoting=csv.QUOTE_NONE,
        )
    return table


def read_10x_mtx(folder: str | Path) -> ad.AnnData:
    """Read a ``filtered_feature_bc_matrix/`` folder (``matrix.mtx``, barcodes, features/genes).

    Raises
    ------
    SpatlasInputError
        When a file is missing, named ``.gz`` but not gzip, truncated, or malformed (a
        ``matrix.mtx`` whose header disagrees with its entries), when the matrix's size disagrees
        with the barcode / feature lists, or when a barcode or feature id repeats.
    """
    folder = Path(folder)
    mtx = _first_existing(folder, ["matrix.mtx"])
    barcodes_file = _first_existing(folder, ["barcodes.tsv"])
    features_file = _first_existing(folder, ["features.tsv", "genes.tsv"])
    missing = [
        name
        for name, p in [
            ("matrix.mtx(.gz)", mtx),
            ("barcodes.tsv(.gz)", barcodes_file),
            ("features.tsv(.gz)", features_file),
        ]
        if p is None
    ]
    if missing:
        raise SpatlasInputError(
            f"{folder}: count-matrix folder lacks {', '.join(missing)}; expected Space Ranger's "
            "filtered_feature_bc_matrix/ with matrix.mtx.gz, barcodes.tsv.gz and features.tsv.gz"
        )
    assert mtx is not None and barcodes_file is not None and features_file is not None
    mtx_fix = "the header line (features, barcodes, entries) must match the entries; " + FIX_COUNTS
    with reading(mtx, "Matrix Market count matrix", mtx_fix), open_maybe_gzip(mtx) as fh:
        matrix = scipy.io.mmread(fh)
    barcodes = _read_tsv(barcodes_file, "barcode list")[0].tolist()
    features = _read_tsv(features_file, "feature list")
    ids = features[0].tolist()
    symbols = features[1].tolist() if features.shape[1] > 1 else ids
    if matrix.shape != (len(ids), len(barcodes)):
        raise SpatlasInputError(
            f"{folder}: matrix.mtx is {matrix.shape[0]} features x {matrix.shape[1]} barcodes but "
            f"{features_file.name} lists {len(ids)} and {barcodes_file.name} {len(barcodes)}; "
            "the three files come from different runs: " + FIX_COUNTS
        )
    problems = _check_ids(
        folder,
        barcodes,
        ids,
        barcode_where=str(barcodes_file),
        feature_where=str(features_file),
    )
    if problems:
        raise SpatlasInputError(problems)
    X = sp.csr_matrix(matrix.T).astype(np.float32)
    var = pd.DataFrame({"gene_symbols": symbols}, index=pd.Index(ids))
    if features.shape[1] > 2:
        var["feature_types"] = features[2].tolist()
        keep = var["feature_types"].to_numpy() == "Gene Expression"
        if keep.any() and not keep.all():
            X, var = X[:, keep], var.loc[keep]
    return ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(barcodes)), var=var)
