"""A catalogue of bad inputs: each builds a broken cohort (or config) and names the expected error.

Used by ``tests/test_validate.py`` (one test per case) and ``benchmarks/bad_input_table.py``
(the table).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from spatlas.io import read_spaceranger, write_10x_h5, write_h5ad

from spaceranger_fixtures import make_spaceranger


def _sheet(root: Path, rows: list[dict]) -> Path:
    path = root / "samples.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _one_sample(root: Path, folder: Path, **extra) -> Path:
    return _sheet(root, [{"sample": "S1", "donor": "D1", "path": str(folder), **extra}])


def missing_sheet(root: Path) -> list[str]:
    return ["validate", str(root / "nope.csv")]


def sheet_without_path_column(root: Path) -> list[str]:
    (root / "s.csv").write_text("sample,donor\nS1,D1\n")
    return ["validate", str(root / "s.csv")]


def duplicate_sample_ids(root: Path) -> list[str]:
    folder, _, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20)
    rows = [{"sample": "S1", "donor": "D1", "path": str(folder)}] * 2
    return ["validate", str(_sheet(root, rows))]


def sample_path_missing(root: Path) -> list[str]:
    return ["validate", str(_one_sample(root, root / "no_such_outs"))]


def unknown_input_format(root: Path) -> list[str]:
    (root / "counts.txt").write_text("x")
    return ["validate", str(_one_sample(root, root / "counts.txt"))]


def no_count_matrix(root: Path) -> list[str]:
    folder, _, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20)
    (folder / "filtered_feature_bc_matrix.h5").unlink()
    return ["validate", str(_one_sample(root, folder))]


def no_positions(root: Path) -> list[str]:
    folder, _, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20)
    (folder / "spatial/tissue_positions_list.csv").unlink()
    return ["validate", str(_one_sample(root, folder))]


def missing_scalefactors(root: Path) -> list[str]:
    folder, _, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20)
    (folder / "spatial/scalefactors_json.json").unlink()
    return ["validate", str(_one_sample(root, folder))]


def barcodes_without_positions(root: Path) -> list[str]:
    folder, counts, _ = make_spaceranger(root, "v2_mtx", n_spots=50, n_genes=20)
    pos = pd.read_csv(folder / "spatial/tissue_positions.csv")
    pos = pos.loc[~pos["barcode"].isin(counts.obs_names[:10])]  # 10 matrix barcodes lose theirs
    pos.to_csv(folder / "spatial/tissue_positions.csv", index=False)
    return ["validate", str(_one_sample(root, folder))]


def coordinates_outside_image(root: Path) -> list[str]:
    folder, _, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20)
    sf_path = folder / "spatial/scalefactors_json.json"
    sf = json.loads(sf_path.read_text())
    sf["tissue_lowres_scalef"] = sf["tissue_hires_scalef"]  # a classic mix-up
    sf_path.write_text(json.dumps(sf))
    return ["validate", str(_one_sample(root, folder))]


def _counts_edited(root: Path, edit: Callable[[np.ndarray], None]) -> list[str]:
    folder, counts, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20)
    adata = read_spaceranger(folder, sample="S1")
    edit(adata.X.data)
    path = root / "sample.h5ad"
    write_h5ad(adata, path)
    return ["validate", str(_one_sample(root, path))]


def negative_counts(root: Path) -> list[str]:
    return _counts_edited(root, lambda d: d.__setitem__(slice(0, 3), -2))


def nan_counts(root: Path) -> list[str]:
    return _counts_edited(root, lambda d: d.__setitem__(slice(0, 3), np.nan))


def non_integer_counts(root: Path) -> list[str]:
    return _counts_edited(root, lambda d: np.log1p(d, out=d))


def empty_sample(root: Path) -> list[str]:
    folder, _, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20)
    path = folder / "spatial/tissue_positions_list.csv"
    pos = pd.read_csv(path, header=None)
    pos[1] = 0  # no spot under tissue
    pos.to_csv(path, header=False, index=False)
    return ["validate", str(_one_sample(root, folder))]


def label_column_missing(root: Path) -> list[str]:
    folder, counts, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20)
    pd.DataFrame({"barcode": counts.obs_names, "layer": "L1"}).to_csv(root / "ann.csv", index=False)
    return ["validate", str(_one_sample(root, folder, annotations="ann.csv", label_column="Layer"))]


def h5ad_without_spatial(root: Path) -> list[str]:
    folder, _, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20)
    adata = read_spaceranger(folder, sample="S1")
    del adata.obsm["spatial"]
    write_h5ad(adata, root / "nospatial.h5ad")
    return ["validate", str(_one_sample(root, root / "nospatial.h5ad"))]


def corrupt_count_matrix(root: Path) -> list[str]:
    folder, _, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20)
    (folder / "filtered_feature_bc_matrix.h5").write_bytes(b"not an hdf5 file")
    return ["validate", str(_one_sample(root, folder))]


def no_shared_genes(root: Path) -> list[str]:
    f1, c1, _ = make_spaceranger(root / "a", "v1_h5", n_spots=50, n_genes=20)
    f2, c2, _ = make_spaceranger(root / "b", "v1_h5", n_spots=50, n_genes=20)
    c2.var_names = [f"other_{g}" for g in c2.var_names]
    write_10x_h5(c2, f2 / "filtered_feature_bc_matrix.h5")
    rows = [
        {"sample": "A", "donor": "D1", "path": str(f1)},
        {"sample": "B", "donor": "D2", "path": str(f2)},
    ]
    return ["validate", str(_sheet(root, rows))]


def missing_fullres_image(root: Path) -> list[str]:
    folder, _, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20)
    return ["validate", str(_one_sample(root, folder, image="he_fullres.tif"))]


def config_unknown_key(root: Path) -> list[str]:
    (root / "c.yaml").write_text("data:\n  dataset: dlpfc_demo\nclustering:\n  n_cluster: 7\n")
    return ["run", str(root / "c.yaml"), "--out", str(root / "run")]


def config_bad_value(root: Path) -> list[str]:
    (root / "c.yaml").write_text("data:\n  dataset: dlpfc_demo\nclustering:\n  refine: maybe\n")
    return ["run", str(root / "c.yaml"), "--out", str(root / "run")]


def out_dir_not_empty(root: Path) -> list[str]:
    (root / "run").mkdir()
    (root / "run" / "results.csv").write_text("precious")
    return ["demo", "--out", str(root / "run")]


# name -> (builder, a fragment the error line must contain)
CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "sample sheet does not exist": (missing_sheet, "sample sheet does not exist"),
    "sheet lacks the path column": (sheet_without_path_column, "lacks column(s) path"),
    "duplicate sample ids": (duplicate_sample_ids, "duplicate sample id(s) S1"),
    "sample folder missing": (sample_path_missing, "does not exist"),
    "unknown input format": (unknown_input_format, "neither a Space Ranger output folder"),
    "no count matrix": (no_count_matrix, "no count matrix"),
    "no positions file": (no_positions, "no spot positions"),
    "missing scalefactors": (missing_scalefactors, "scalefactors_json.json"),
    "barcodes without positions": (barcodes_without_positions, "have no position"),
    "coordinates outside the image": (coordinates_outside_image, "lie outside tissue_lowres_image"),
    "negative counts": (negative_counts, "negative"),
    "NaN counts": (nan_counts, "NaN"),
    "non-integer counts": (non_integer_counts, "not integers"),
    "empty sample": (empty_sample, "sample is empty"),
    "label column does not exist": (label_column_missing, "label column 'Layer' does not exist"),
    "h5ad without obsm['spatial']": (h5ad_without_spatial, "obsm['spatial'] is missing"),
    "corrupt count matrix": (corrupt_count_matrix, "not a readable HDF5 count matrix"),
    "samples share no gene": (no_shared_genes, "share no gene"),
    "full-res image missing": (missing_fullres_image, "full-resolution image does not exist"),
    "config: unknown key": (config_unknown_key, "did you mean 'n_clusters'"),
    "config: wrong value type": (config_bad_value, "clustering.refine"),
    "run folder not empty": (out_dir_not_empty, "not empty"),
}

# the classes of issue 20 live in their own modules; one corpus for the tests and the table
from bad_inputs_config import CASES as _CONFIG_CASES  # noqa: E402
from bad_inputs_output import CASES as _OUTPUT_CASES  # noqa: E402
from bad_inputs_tune import CASES as _TUNE_CASES  # noqa: E402

CASES.update(_CONFIG_CASES)
CASES.update(_OUTPUT_CASES)
CASES.update(_TUNE_CASES)
