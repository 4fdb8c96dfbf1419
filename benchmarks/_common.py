"""Shared helpers of the benchmark scripts: the real datasets, timing, tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from spatlas._resources import peak_rss_mb  # noqa: F401  (re-exported for the scripts)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / ".cache"

# dataset -> (K, annotated samples, label classes left out of label metrics)
DATASETS = {
    "dlpfc": {"k": 7, "annotated": ["151673", "151674", "151675", "151676"], "exclude": []},
    "dlpfc3837": {"k": 7, "annotated": ["151673", "151674", "151675", "151676"], "exclude": []},
    "her2st": {"k": 6, "annotated": ["A1", "B1", "C1", "D1", "E1"], "exclude": ["undetermined"]},
    "mob": {"k": 5, "annotated": ["MOB_Rep11", "MOB_Rep12"], "exclude": []},
    "her2st_a": {"k": 5, "annotated": ["A1"], "exclude": ["undetermined"]},
    "synthetic": {
        "k": 5,
        "annotated": [f"d{d}_s{s}" for d in range(3) for s in range(2)],
        "exclude": [],
    },
}
DLPFC_SHARED = SHARED / "dlpfc" / "counts_shared_genes" / "dlpfc_br8100_4slices_3837genes.h5ad"
MOB = SHARED / "mob"
# legacy ST: 100 um spots on a 200 um pitch, so a spot is half the centre-to-centre distance
LEGACY_ST_SPOT_PER_PITCH = 0.5


def load_dataset(name: str):
    """The raw cohort of a benchmark dataset.

    - ``dlpfc``: DLPFC Br8100 = the bundled demo (the 1,125 genes the four slices' top-5,000
      files share; lowres H&E, nuclei counts).
    - ``dlpfc3837``: the same spots, images and labels on the 3,837 genes the four slices share
      (``../shared/data/dlpfc/counts_shared_genes``).
    - ``her2st``: patients A-E, 27 sections, 18,758 genes (no images in the cohort).
    - ``mob``: the two mouse olfactory bulb sections with their full H&E (~2,320 px, a spot about
      34 px) and five expert layers; square legacy-ST lattice.
    - ``her2st_a``: her2st patient A's sections A1 (annotated) and A2 with the 2,000 px H&E
      images of ``../shared/data/her2st/images`` (a spot about 31 px).
    - ``synthetic``: ``spatlas.datasets.synthetic_cohort(seed=0)`` (3 donors x 2 samples).
    """
    import spatlas
    from spatlas._config import DataConfig
    from spatlas.pipeline import Config, load_cohort

    if name == "dlpfc":
        return spatlas.datasets.dlpfc_demo()
    if name == "dlpfc3837":
        return _dlpfc_shared_genes()
    if name == "her2st":
        data = DataConfig(
            h5ad=str(SHARED / "her2st" / "her2st_patientsA-E_counts.h5ad"),
            sample_key="section",
            donor_key="patient",
            label_column="label",
        )
        return load_cohort(Config(data=data))
    if name == "mob":
        return _mob()
    if name == "her2st_a":
        return _her2st_a()
    if name == "synthetic":
        return spatlas.datasets.synthetic_cohort(seed=0)
    raise ValueError(f"unknown dataset {name}")


def _dlpfc_shared_genes():
    """The demo cohort (spots, images, labels) with the 3,837 shared genes' counts as ``X``."""
    import anndata as ad
    import scipy.sparse as sp

    import spatlas
    from spatlas import _keys as K

    demo = spatlas.datasets.dlpfc_demo()
    counts = ad.read_h5ad(DLPFC_SHARED)
    ids = (demo.obs[K.SAMPLE].astype(str) + "_" + demo.obs[K.BARCODE].astype(str)).to_numpy()
    missing = ~np.isin(ids, counts.obs_names)
    if missing.any():
        raise ValueError(f"{DLPFC_SHARED}: {int(missing.sum())} demo spots have no counts")
    counts = counts[ids]
    out = ad.AnnData(
        X=sp.csr_matrix(counts.X, dtype=np.float32),
        obs=demo.obs.copy(),
        var=pd.DataFrame(index=counts.var_names.astype(str)),
        obsm={k: v.copy() for k, v in demo.obsm.items()},
        uns=demo.uns,
    )
    return out


def _mob():
    """The two MOB sections as a spatlas cohort with their full-resolution H&E."""
    import anndata as ad
    from scipy.spatial import cKDTree

    import spatlas
    from spatlas import _keys as K

    raw = ad.read_h5ad(MOB / "mob_2sections.h5ad")
    parts = []
    for sample in pd.unique(raw.obs["sample_id"].astype(str)):
        sub = raw[raw.obs["sample_id"].astype(str).to_numpy() == sample].copy()
        key = sub.obs["spot_key"].astype(str).str.split("_", expand=True).astype(int)
        sub.obs[K.ARRAY_ROW] = key[1].to_numpy()  # array y: image rows
        sub.obs[K.ARRAY_COL] = key[0].to_numpy()  # array x: image columns
        sub.obs[K.LABEL] = sub.obs["domain"].astype(object).where(sub.obs["domain"].notna())
        xy = np.asarray(sub.obsm["spatial"], dtype=np.float64)
        pitch = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))
        sub.uns[K.SPATIAL] = {
            sample: {
                K.IMAGES: {},
                K.SCALEFACTORS: {K.SPOT_DIAMETER: LEGACY_ST_SPOT_PER_PITCH * pitch},
            }
        }
        image = MOB / "images" / f"{sample.removeprefix('MOB_Rep')}.jpg"
        parts.append(
            spatlas.io._h5ad.standardise_h5ad_sample(
                sub, sample=sample, donor="mouse", fullres_image=image, where=f"mob {sample}"
            )
        )
    return spatlas.io.concat_samples(parts)


# her2st A1 / A2: originals 6,954 / 6,966 px wide, the shipped images 2,000 px (data README)
HER2ST_A_WIDTH = {"A1": 6954, "A2": 6966}


def _her2st_a():
    """her2st A1 and A2 with their 2,000 px H&E (pixel_x, pixel_y rescaled to the image)."""
    import anndata as ad
    from scipy.spatial import cKDTree

    import spatlas
    from spatlas import _keys as K

    raw = ad.read_h5ad(SHARED / "her2st" / "her2st_patientsA-E_counts.h5ad")
    parts = []
    for sample, width in HER2ST_A_WIDTH.items():
        sub = raw[raw.obs["section"].astype(str).to_numpy() == sample].copy()
        sub.X = sub.X.astype(np.float32)
        sub.obs[K.ARRAY_ROW] = sub.obs["y"].astype(int).to_numpy()
        sub.obs[K.ARRAY_COL] = sub.obs["x"].astype(int).to_numpy()
        label = sub.obs["label"].astype(object)
        sub.obs[K.LABEL] = label.where(label.notna() & (label != "NA"))
        xy = np.asarray(sub.obs[["pixel_x", "pixel_y"]], dtype=np.float64) * (2000 / width)
        sub.obsm[K.SPATIAL] = xy
        pitch = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))
        sub.uns[K.SPATIAL] = {
            sample: {
                K.IMAGES: {},
                K.SCALEFACTORS: {K.SPOT_DIAMETER: LEGACY_ST_SPOT_PER_PITCH * pitch},
            }
        }
        image = SHARED / "her2st" / "images" / f"{sample}_HE_image_dark.png"
        parts.append(
            spatlas.io._h5ad.standardise_h5ad_sample(
                sub, sample=sample, donor="A", fullres_image=image, where=f"her2st {sample}"
            )
        )
    return spatlas.io.concat_samples(parts)


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table (no tabulate dependency)."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
