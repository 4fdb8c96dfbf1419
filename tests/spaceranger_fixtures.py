"""Builders of tiny but real Space Ranger folders (from the bundled DLPFC slice 151673).

Used by the I/O tests and by ``benchmarks/bad_inputs.py``.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from spatlas.datasets._demo import DEMO_DIR
from spatlas.io import read_10x_h5, write_10x_h5

SOURCE = DEMO_DIR / "151673"
LAYOUTS = ("v1_h5", "v2_mtx", "hd_parquet")


def source_counts(n_spots: int = 300, n_genes: int = 120):
    """The first ``n_spots`` x ``n_genes`` of the bundled 151673 counts (real UMI counts)."""
    adata = read_10x_h5(SOURCE / "filtered_feature_bc_matrix.h5")
    detected = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    genes = np.sort(np.argsort(-detected, kind="stable")[:n_genes])
    return adata[:n_spots, genes].copy()


def source_positions() -> pd.DataFrame:
    """All 4,992 positions of 151673 with Space Ranger's column names."""
    return pd.read_csv(
        SOURCE / "spatial/tissue_positions_list.csv.gz",
        header=None,
        names=[
            "barcode",
            "in_tissue",
            "array_row",
            "array_col",
            "pxl_row_in_fullres",
            "pxl_col_in_fullres",
        ],
    )


def write_mtx(adata, folder: Path) -> None:
    """Write a ``filtered_feature_bc_matrix/`` folder (gzipped matrix, barcodes, features)."""
    folder.mkdir(parents=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.csc_matrix(adata.X.T).astype(np.int64))
    pd.Series(adata.obs_names).to_csv(folder / "barcodes.tsv.gz", index=False, header=False)
    pd.DataFrame(
        {"id": adata.var_names, "name": adata.var["gene_symbols"], "type": "Gene Expression"}
    ).to_csv(folder / "features.tsv.gz", sep="\t", index=False, header=False)


def blank_tiff(path: Path, height: int, width: int) -> Path:
    """A white tiled, compressed RGB TIFF of the given size (small on disk, quick to write)."""
    import tifffile

    tile = np.full((512, 512, 3), 255, np.uint8)
    n_tiles = -(-height // 512) * -(-width // 512)
    tifffile.imwrite(
        path,
        (tile for _ in range(n_tiles)),
        shape=(height, width, 3),
        dtype="uint8",
        tile=(512, 512),
        photometric="rgb",
        compression="zlib",
    )
    return path


def make_spaceranger(
    root: Path,
    layout: str = "v1_h5",
    *,
    n_spots: int = 300,
    n_genes: int = 120,
    hires: bool = False,
):
    """Write a Space Ranger ``outs/`` folder in ``layout``; return (folder, counts, positions)."""
    counts = source_counts(n_spots, n_genes)
    positions = source_positions()
    folder = root / f"outs_{layout}"
    spatial = folder / "spatial"
    spatial.mkdir(parents=True)
    if layout == "v1_h5":
        write_10x_h5(counts, folder / "filtered_feature_bc_matrix.h5")
        positions.to_csv(spatial / "tissue_positions_list.csv", header=False, index=False)
    elif layout == "v2_mtx":
        write_mtx(counts, folder / "filtered_feature_bc_matrix")
        positions.to_csv(spatial / "tissue_positions.csv", index=False)
    elif layout == "hd_parquet":
        write_10x_h5(counts, folder / "filtered_feature_bc_matrix.h5")
        positions.to_parquet(spatial / "tissue_positions.parquet", index=False)
    else:
        raise ValueError(layout)
    shutil.copy(SOURCE / "spatial/scalefactors_json.json", spatial / "scalefactors_json.json")
    shutil.copy(SOURCE / "spatial/tissue_lowres_image.png", spatial / "tissue_lowres_image.png")
    if hires:
        from PIL import Image

        sf = json.loads((spatial / "scalefactors_json.json").read_text())
        size = round(600 * sf["tissue_hires_scalef"] / sf["tissue_lowres_scalef"])
        with Image.open(spatial / "tissue_lowres_image.png") as im:
            im.resize((size, size)).save(spatial / "tissue_hires_image.png")
    return folder, counts, positions.set_index("barcode")
