"""10x Genomics count matrices: ``filtered_feature_bc_matrix.h5`` and the ``.mtx`` folder."""

from __future__ import annotations

import gzip
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from .._errors import SpatlasInputError
from ._write import atomic_path


def _decode(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_10x_h5(path: str | Path) -> ad.AnnData:
    """Read a Cell Ranger / Space Ranger HDF5 count matrix (v3 ``matrix`` or v2 genome group).

    Returns an AnnData with spots as observations, raw counts in ``X`` (CSR, float32),
    ``var_names`` = feature ids and ``var['gene_symbols']`` when present. Only
    ``Gene Expression`` features are kept when the file has several feature types.
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
    with f:
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
        matrix = sp.csc_matrix(
            (grp["data"][:], grp["indices"][:], grp["indptr"][:]), shape=(n_genes, n_cells)
        )
        barcodes = _decode(grp["barcodes"][:])
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


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _first_existing(folder: Path, names: list[str]) -> Path | None:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.exists():
                return candidate
    return None


def read_10x_mtx(folder: str | Path) -> ad.AnnData:
    """Read a ``filtered_feature_bc_matrix/`` folder (``matrix.mtx``, barcodes, features/genes)."""
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
    with _open_text(mtx) as fh:
        matrix = scipy.io.mmread(fh)
    barcodes = pd.read_csv(barcodes_file, header=None, sep="\t")[0].astype(str).tolist()
    features = pd.read_csv(features_file, header=None, sep="\t")
    ids = features[0].astype(str).tolist()
    symbols = features[1].astype(str).tolist() if features.shape[1] > 1 else ids
    X = sp.csr_matrix(matrix.T).astype(np.float32)
    if X.shape != (len(barcodes), len(ids)):
        raise SpatlasInputError(
            f"{folder}: matrix.mtx is {matrix.shape[0]} features x {matrix.shape[1]} barcodes but "
            f"features.tsv lists {len(ids)} and barcodes.tsv {len(barcodes)}"
        )
    var = pd.DataFrame({"gene_symbols": symbols}, index=pd.Index(ids))
    if features.shape[1] > 2:
        var["feature_types"] = features[2].astype(str).tolist()
        keep = var["feature_types"].to_numpy() == "Gene Expression"
        if keep.any() and not keep.all():
            X, var = X[:, keep], var.loc[keep]
    return ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(barcodes)), var=var)
