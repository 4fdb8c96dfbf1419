"""A synthetic Visium HD cohort written in Space Ranger's HD folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .. import _keys as K
from .._errors import SpatlasInputError
from ..io._write import atomic_path

MICRONS_PER_PIXEL = 0.2738  # a typical Visium HD CytAssist registration


def synthetic_visium_hd(
    folder: str | Path,
    *,
    bin_um: int = 8,
    microns_per_pixel: float = MICRONS_PER_PIXEL,
    image: bool = False,
    **cohort_params,
) -> Path:
    """Write a synthetic cohort on a square lattice of bins as Visium HD ``outs/`` folders.

    Each sample becomes ``folder/<sample>/outs/binned_outputs/square_{bin:03d}um/`` with
    ``filtered_feature_bc_matrix.h5`` and ``spatial/`` (``tissue_positions.parquet``,
    ``scalefactors_json.json`` with ``bin_size_um`` and ``microns_per_pixel``, and
    ``tissue_hires_image.png`` when ``image``), barcodes ``s_008um_00012_00034-1`` as Space
    Ranger names them, and ``annotations.csv`` with the planted domains. ``folder/samples.csv``
    lists the samples with ``bin: bin_um``.

    Parameters
    ----------
    folder
        Where to write (created; must not hold a ``samples.csv`` already).
    bin_um
        Bin side in µm.
    microns_per_pixel
        Full-resolution pixel size; the bin side in pixels is ``bin_um / microns_per_pixel``.
    image
        Paint an H&E image per sample (slow for large cohorts).
    **cohort_params
        Passed to :func:`spatlas.datasets.synthetic_cohort` (``n_donors``, ``n_spots``,
        ``n_genes``, ``seed``, ...).

    Returns
    -------
    The path of ``samples.csv``.
    """
    from PIL import Image

    from ..io import write_10x_h5
    from ._synthetic import synthetic_cohort

    folder = Path(folder)
    sheet = folder / "samples.csv"
    if sheet.exists():
        raise SpatlasInputError(f"{sheet} exists; give an empty folder")
    side_px = bin_um / microns_per_pixel
    adata = synthetic_cohort(
        lattice="square",
        image=image,
        spot_diameter_px=side_px,
        hires_spot_px=min(side_px, 4.0),
        **cohort_params,
    )
    rows = []
    for sample in adata.obs[K.SAMPLE].cat.categories:
        part = adata[(adata.obs[K.SAMPLE] == sample).to_numpy()].copy()
        r = part.obs[K.ARRAY_ROW].to_numpy()
        c = part.obs[K.ARRAY_COL].to_numpy()
        barcodes = [f"s_{bin_um:03d}um_{i:05d}_{j:05d}-1" for i, j in zip(r, c, strict=True)]
        part.obs_names = barcodes
        outs = folder / sample / "outs"
        bins = outs / "binned_outputs" / f"square_{bin_um:03d}um"
        spatial = bins / "spatial"
        spatial.mkdir(parents=True, exist_ok=True)
        write_10x_h5(part, bins / "filtered_feature_bc_matrix.h5")
        xy = part.obsm[K.SPATIAL]
        positions = pd.DataFrame(
            {
                "barcode": barcodes,
                "in_tissue": np.ones(part.n_obs, dtype=np.int32),
                "array_row": r.astype(np.int32),
                "array_col": c.astype(np.int32),
                "pxl_row_in_fullres": xy[:, 1],
                "pxl_col_in_fullres": xy[:, 0],
            }
        )
        with atomic_path(spatial / "tissue_positions.parquet") as tmp:
            positions.to_parquet(tmp, index=False)
        sf = dict(part.uns[K.SPATIAL][sample][K.SCALEFACTORS])
        sf.update(
            {
                "bin_size_um": float(bin_um),
                "microns_per_pixel": float(microns_per_pixel),
                "fiducial_diameter_fullres": float(side_px * 10),
            }
        )
        (spatial / "scalefactors_json.json").write_text(json.dumps(sf, indent=1))
        hires = part.uns[K.SPATIAL][sample][K.IMAGES].get("hires")
        if hires is not None:
            Image.fromarray(hires).save(spatial / "tissue_hires_image.png")
        labels = pd.DataFrame({"barcode": barcodes, "domain": part.obs[K.LABEL].to_numpy()})
        labels.to_csv(folder / sample / "annotations.csv", index=False)
        rows.append(
            {
                "sample": sample,
                "donor": str(part.obs[K.DONOR].iloc[0]),
                "path": f"{sample}/outs",
                "bin": bin_um,
                "annotations": f"{sample}/annotations.csv",
                "label_column": "domain",
            }
        )
    pd.DataFrame(rows).to_csv(sheet, index=False)
    return sheet
