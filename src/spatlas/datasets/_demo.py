"""The bundled demo cohort (DLPFC donor Br8100), read through the real Space Ranger readers."""

from __future__ import annotations

from pathlib import Path

import anndata as ad

DEMO_DIR = Path(__file__).parent / "_data" / "dlpfc_br8100"


def dlpfc_demo_sheet() -> Path:
    """Path of the bundled demo's sample sheet (``samples.csv``)."""
    return DEMO_DIR / "samples.csv"


def dlpfc_demo() -> ad.AnnData:
    """Four DLPFC Visium slices of donor Br8100 (Maynard et al. 2021), 14,364 spots x 1,125 genes.

    Read from Space Ranger-style folders shipped with spatlas (see the ``README.md`` beside
    them for the source, the partial gene set and the citation).

    Returns
    -------
    The cohort: raw counts in ``X``; ``obs['sample']`` (151673-151676), ``obs['donor']``
    (Br8100), ``obs['label']`` (cortical layer, NaN where unannotated), ``obs['layer']``,
    ``obs['nuclei_count']``, ``obs['array_row'/'array_col']``; ``obsm['spatial']``
    (full-resolution pixels); ``uns['spatial'][sample]`` with the lowres image and scalefactors.
    """
    import pandas as pd

    from ..io import read_cohort

    adata = read_cohort(dlpfc_demo_sheet())
    adata.obs["nuclei_count"] = pd.to_numeric(adata.obs["nuclei_count"], errors="coerce")
    return adata
