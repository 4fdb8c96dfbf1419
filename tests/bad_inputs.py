"""A catalogue of bad inputs: each builds a broken cohort (or config) and names the expected error.

Used by ``tests/test_validate.py`` (one test per case) and ``benchmarks/bad_input_table.py``
(the table). ``CASES``: name -> (builder(root) -> CLI argv, a fragment the first error line
must contain); ``CLASS_OF``: name -> its class of issue 20 (one of ``CLASSES``); ``ACCEPTED``:
valid inputs real users send that must pass, name -> builder(root) -> (argv, check(stdout)).
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from spatlas.io import concat_samples, read_spaceranger, write_10x_h5, write_h5ad

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


# ---- issue 20: sheet dialects and types, identity, numeric fields, corrupt or partial files ----


def _validate(sheet: Path) -> list[str]:
    return ["validate", str(sheet)]


def _small(root: Path, layout: str = "v1_h5") -> Path:
    folder, _, _ = make_spaceranger(root, layout, n_spots=50, n_genes=20)
    return folder


def _h5ad(root: Path, name: str = "sample.h5ad"):
    """A one-section .h5ad (from a Space Ranger folder) and where to write it."""
    adata = read_spaceranger(_small(root), sample="S1")
    return adata, root / name


def _write_text_sheet(root: Path, text: str, name: str = "samples.csv") -> Path:
    path = root / name
    path.write_text(text)
    return path


def _config_samples(root: Path, rows: str) -> list[str]:
    """``spatlas validate`` on a run config whose cohort is inline ``data.samples`` rows."""
    (root / "c.yaml").write_text(f"data:\n  samples:\n{rows}")
    return ["validate", str(root / "c.yaml")]


def _config_h5ad(root: Path, h5ad: Path, sample_key: str) -> list[str]:
    (root / "c.yaml").write_text(f"data:\n  h5ad: {h5ad}\n  sample_key: {sample_key}\n")
    return ["validate", str(root / "c.yaml")]


# sheet dialects and types


def sheet_is_xlsx(root: Path) -> list[str]:
    path = root / "samples.csv"
    path.write_bytes(b"PK\x03\x04\x14\x00\x06\x00" + bytes(200))  # a zip: what Excel saves
    return _validate(path)


def sheet_not_utf8(root: Path) -> list[str]:
    folder = _small(root)
    path = root / "samples.csv"
    path.write_bytes(f"sample,donor,path\nS1,Müller,{folder}\n".encode("cp1252"))
    return _validate(path)


def sheet_unquoted_comma(root: Path) -> list[str]:
    folder = _small(root)
    return _validate(_write_text_sheet(root, f"sample,donor,path\nS1,D1,{folder},extra\n"))


def sheet_header_twice(root: Path) -> list[str]:
    folder = _small(root)
    return _validate(_write_text_sheet(root, f"sample,sample,path\nS1,S2,{folder}\n"))


def sheet_empty(root: Path) -> list[str]:
    return _validate(_write_text_sheet(root, "\n\n"))


def sheet_value_without_column(root: Path) -> list[str]:
    folder = _small(root)
    return _validate(_write_text_sheet(root, f"sample,donor,path,\nS1,D1,{folder},L5\n"))


def sheet_is_a_folder(root: Path) -> list[str]:
    (root / "samples.csv").mkdir()
    return _validate(root / "samples.csv")


def yaml_sheet_list_value(root: Path) -> list[str]:
    folder = _small(root)
    sheet = _write_text_sheet(
        root, f"samples:\n  - sample: S1\n    path: [{folder}, {folder}]\n", "samples.yaml"
    )
    return _validate(sheet)


def config_run_refuses(root: Path) -> list[str]:
    """validate on a run config checks it as ``spatlas run`` does (not only its cohort)."""
    sheet = _one_sample(root, _small(root))
    (root / "c.yaml").write_text(f"data:\n  sheet: {sheet}\nclustering:\n  n_clusters: 1\n")
    return ["validate", str(root / "c.yaml")]


def sheet_row_without_path(root: Path) -> list[str]:
    folder = _small(root)
    return _validate(_write_text_sheet(root, f"sample,donor,path\nS1,D1,{folder}\nS2,D2,\n"))


# identity and uniqueness


def same_folder_two_ids(root: Path) -> list[str]:
    folder = _small(root)
    rows = [
        {"sample": "A", "donor": "D1", "path": str(folder)},
        {"sample": "B", "donor": "D2", "path": str(folder)},
    ]
    return _validate(_sheet(root, rows))


def same_folder_spelled_twice(root: Path) -> list[str]:
    folder = _small(root)
    other = folder.parent / "." / folder.name / "spatial" / ".."
    text = f"sample,path\nA,{folder.relative_to(root)}\nB,{other}/\n"
    return _validate(_write_text_sheet(root, text))


def same_image_two_samples(root: Path) -> list[str]:
    f1, f2 = _small(root / "a"), _small(root / "b")
    rows = [
        {"sample": "A", "path": str(f1), "image": "he.tif"},
        {"sample": "B", "path": str(f2), "image": "he.tif"},
    ]
    return _validate(_sheet(root, rows))


def _edit_h5(path: Path, edit: Callable) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        edit(f["matrix"])


def h5_barcode_twice(root: Path) -> list[str]:
    folder = _small(root)

    def dup(grp):
        barcodes = grp["barcodes"][:]
        barcodes[1] = barcodes[0]
        grp["barcodes"][...] = barcodes

    _edit_h5(folder / "filtered_feature_bc_matrix.h5", dup)
    return _validate(_one_sample(root, folder))


def _rewrite_gz_tsv(path: Path, edit: Callable[[pd.DataFrame], None]) -> None:
    table = pd.read_csv(path, sep="\t", header=None, dtype=str)
    edit(table)
    table.to_csv(path, sep="\t", header=False, index=False)  # .gz: compressed again


def mtx_barcode_twice(root: Path) -> list[str]:
    folder = _small(root, "v2_mtx")
    _rewrite_gz_tsv(
        folder / "filtered_feature_bc_matrix/barcodes.tsv.gz",
        lambda t: t.iloc.__setitem__((3, 0), t.iloc[2, 0]),
    )
    return _validate(_one_sample(root, folder))


def features_id_twice(root: Path) -> list[str]:
    folder = _small(root, "v2_mtx")
    _rewrite_gz_tsv(
        folder / "filtered_feature_bc_matrix/features.tsv.gz",
        lambda t: t.iloc.__setitem__((5, 0), t.iloc[4, 0]),
    )
    return _validate(_one_sample(root, folder))


def h5ad_gene_twice(root: Path) -> list[str]:
    adata, path = _h5ad(root)
    names = adata.var_names.tolist()
    names[7] = names[6]
    with warnings.catch_warnings():  # anndata warns of the repeat we are making on purpose
        warnings.simplefilter("ignore", UserWarning)
        adata.var_names = names
    write_h5ad(adata, path)
    return _validate(_one_sample(root, path))


def h5ad_spot_twice(root: Path) -> list[str]:
    adata, path = _h5ad(root)
    names = adata.obs_names.tolist()
    names[9] = names[8]
    with warnings.catch_warnings():  # anndata warns of the repeat we are making on purpose
        warnings.simplefilter("ignore", UserWarning)
        adata.obs_names = names
    write_h5ad(adata, path)
    return _validate(_one_sample(root, path))


def annotations_barcode_twice(root: Path) -> list[str]:
    folder, counts, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20)
    ann = pd.DataFrame({"barcode": counts.obs_names, "layer": "L1"})
    ann = pd.concat([ann, ann.iloc[[3]].assign(layer="L2")])  # one spot annotated twice
    ann.to_csv(root / "ann.csv", index=False)
    return _validate(_one_sample(root, folder, annotations="ann.csv", label_column="layer"))


def positions_share_array_position(root: Path) -> list[str]:
    folder = _small(root, "v2_mtx")
    path = folder / "spatial/tissue_positions.csv"
    pos = pd.read_csv(path)
    pos.loc[1, ["array_row", "array_col"]] = pos.loc[0, ["array_row", "array_col"]].to_numpy()
    pos.to_csv(path, index=False)
    return _validate(_one_sample(root, folder))


def _cohort_h5ad(root: Path) -> Path:
    """Two sections concatenated (as spatlas' own cohort.h5ad is) into one .h5ad."""
    a = read_spaceranger(_small(root / "a"), sample="A", donor="D1")
    b = read_spaceranger(_small(root / "b"), sample="B", donor="D1")
    path = root / "cohort.h5ad"
    write_h5ad(concat_samples([a, b]), path)
    return path


def cohort_h5ad_as_one_sample(root: Path) -> list[str]:
    return _validate(_one_sample(root, _cohort_h5ad(root)))


def _stacked_sections_h5ad(root: Path, *, gaps: bool = False) -> Path:
    """Two sections in one coordinate frame (her2st-like ids, no array columns) + obs['section']."""
    adata, path = _h5ad(root, "sections.h5ad")
    adata.obs = adata.obs[[]].copy()
    second = adata.copy()
    second.obsm["spatial"] = second.obsm["spatial"] + np.array([30.0, 20.0])
    cohort = ad.concat([adata, second], keys=["A1", "A2"], label="section", index_unique="_")
    cohort.obs_names = [f"{s}_{i}x{i % 7}" for i, s in enumerate(cohort.obs["section"])]
    cohort.obs["patient"] = "A"
    if gaps:
        section = cohort.obs["section"].astype(object)
        section.iloc[[0, 5]] = np.nan
        cohort.obs["section"] = section
    write_h5ad(cohort, path)
    return path


def stacked_sections_as_one_sample(root: Path) -> list[str]:
    return _validate(_one_sample(root, _stacked_sections_h5ad(root)))


def sample_key_names_donors(root: Path) -> list[str]:
    return _config_h5ad(root, _stacked_sections_h5ad(root), "patient")


def sample_key_with_gaps(root: Path) -> list[str]:
    return _config_h5ad(root, _stacked_sections_h5ad(root, gaps=True), "section")


# numeric fields


def _scalefactors_edited(root: Path, edit: Callable[[dict], None], *, hires: bool = False):
    folder, _, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20, hires=hires)
    path = folder / "spatial/scalefactors_json.json"
    sf = json.loads(path.read_text())
    edit(sf)
    path.write_text(json.dumps(sf))
    return _validate(_one_sample(root, folder))


def spot_diameter_string(root: Path) -> list[str]:
    return _scalefactors_edited(root, lambda sf: sf.update(spot_diameter_fullres="96.4"))


def spot_diameter_boolean(root: Path) -> list[str]:
    return _scalefactors_edited(root, lambda sf: sf.update(spot_diameter_fullres=True))


def lowres_scalef_zero(root: Path) -> list[str]:
    return _scalefactors_edited(root, lambda sf: sf.update(tissue_lowres_scalef=0))


def hires_scalef_negative(root: Path) -> list[str]:
    return _scalefactors_edited(root, lambda sf: sf.update(tissue_hires_scalef=-0.15))


def lowres_scalef_nan(root: Path) -> list[str]:
    return _scalefactors_edited(root, lambda sf: sf.update(tissue_lowres_scalef=float("nan")))


def hires_scalef_missing(root: Path) -> list[str]:
    return _scalefactors_edited(root, lambda sf: sf.pop("tissue_hires_scalef"))


def scalefactors_not_an_object(root: Path) -> list[str]:
    folder = _small(root)
    (folder / "spatial/scalefactors_json.json").write_text("[96.4, 0.15, 0.045]")
    return _validate(_one_sample(root, folder))


def h5ad_nan_coordinates(root: Path) -> list[str]:
    adata, path = _h5ad(root)
    adata.obsm["spatial"][4] = np.nan
    write_h5ad(adata, path)
    return _validate(_one_sample(root, path))


def h5ad_scalefactor_zero(root: Path) -> list[str]:
    adata, path = _h5ad(root)
    adata.uns["spatial"]["S1"]["scalefactors"]["tissue_hires_scalef"] = 0.0
    write_h5ad(adata, path)
    return _validate(_one_sample(root, path))


def positions_not_numbers(root: Path) -> list[str]:
    folder = _small(root, "v2_mtx")
    path = folder / "spatial/tissue_positions.csv"
    pos = pd.read_csv(path)
    pos["pxl_row_in_fullres"] = pos["pxl_row_in_fullres"].astype(object)
    pos.loc[2, "pxl_row_in_fullres"] = "12,5"  # a decimal comma
    pos.to_csv(path, index=False)
    return _validate(_one_sample(root, folder))


# corrupt or partial files


def features_gz_not_gzip(root: Path) -> list[str]:
    folder = _small(root, "v2_mtx")
    path = folder / "filtered_feature_bc_matrix/features.tsv.gz"
    path.write_bytes(gzip.decompress(path.read_bytes()))  # plain text under a .gz name
    return _validate(_one_sample(root, folder))


def _edit_mtx_text(folder: Path, edit: Callable[[list[str]], None]) -> None:
    path = folder / "filtered_feature_bc_matrix/matrix.mtx.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    edit(lines)
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def _header_index(lines: list[str]) -> int:
    return next(i for i, line in enumerate(lines) if not line.startswith("%"))


def mtx_header_more_entries(root: Path) -> list[str]:
    folder = _small(root, "v2_mtx")

    def edit(lines):
        i = _header_index(lines)
        rows, cols, nnz = lines[i].split()
        lines[i] = f"{rows} {cols} {int(nnz) + 5}"

    _edit_mtx_text(folder, edit)
    return _validate(_one_sample(root, folder))


def mtx_entry_outside_header(root: Path) -> list[str]:
    folder = _small(root, "v2_mtx")

    def edit(lines):
        i = _header_index(lines)
        rows = int(lines[i].split()[0])
        _, col, value = lines[i + 1].split()
        lines[i + 1] = f"{rows + 3} {col} {value}"

    _edit_mtx_text(folder, edit)
    return _validate(_one_sample(root, folder))


def barcodes_gz_truncated(root: Path) -> list[str]:
    folder = _small(root, "v2_mtx")
    path = folder / "filtered_feature_bc_matrix/barcodes.tsv.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a partial copy
    return _validate(_one_sample(root, folder))


def h5_truncated(root: Path) -> list[str]:
    folder = _small(root)
    path = folder / "filtered_feature_bc_matrix.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return _validate(_one_sample(root, folder))


def h5_dataset_missing(root: Path) -> list[str]:
    folder = _small(root)
    _edit_h5(folder / "filtered_feature_bc_matrix.h5", lambda grp: grp.__delitem__("indptr"))
    return _validate(_one_sample(root, folder))


def h5_shape_disagrees(root: Path) -> list[str]:
    folder = _small(root)

    def edit(grp):
        shape = grp["shape"][:]
        grp["shape"][...] = [shape[0], shape[1] + 5]

    _edit_h5(folder / "filtered_feature_bc_matrix.h5", edit)
    return _validate(_one_sample(root, folder))


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header (IHDR, with a valid CRC) claims ``width`` x ``height`` px."""
    from PIL import Image

    Image.new("RGB", (8, 8), "white").save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def hires_png_header_huge(root: Path) -> list[str]:
    folder = _small(root)
    _png_claiming(folder / "spatial/tissue_hires_image.png", 60_000, 60_000)
    return _validate(_one_sample(root, folder))


def fullres_png_header_huge(root: Path) -> list[str]:
    folder = _small(root)
    _png_claiming(root / "he.png", 60_000, 60_000)
    return _validate(_one_sample(root, folder, image="he.png"))


def lowres_png_truncated(root: Path) -> list[str]:
    folder = _small(root)
    path = folder / "spatial/tissue_lowres_image.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return _validate(_one_sample(root, folder))


def h5ad_truncated(root: Path) -> list[str]:
    adata, path = _h5ad(root)
    write_h5ad(adata, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return _validate(_one_sample(root, path))


def scalefactors_not_json(root: Path) -> list[str]:
    folder = _small(root)
    path = folder / "spatial/scalefactors_json.json"
    path.write_text(path.read_text()[:40])  # cut mid-way
    return _validate(_one_sample(root, folder))


def positions_parquet_corrupt(root: Path) -> list[str]:
    folder = _small(root, "hd_parquet")
    (folder / "spatial/tissue_positions.parquet").write_bytes(b"PAR1" + bytes(64))
    return _validate(_one_sample(root, folder))


def annotations_gz_not_gzip(root: Path) -> list[str]:
    folder, counts, _ = make_spaceranger(root, "v1_h5", n_spots=50, n_genes=20)
    pd.DataFrame({"barcode": counts.obs_names, "layer": "L1"}).to_csv(
        root / "ann.csv.gz", index=False, compression=None
    )
    return _validate(_one_sample(root, folder, annotations="ann.csv.gz", label_column="layer"))


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

SHEET = "sheet dialects and types"
IDENTITY = "identity and uniqueness"
NUMERIC = "numeric fields"
CORRUPT = "corrupt or partial files"
CONFIG = "config"
OUTPUT = "output safety"
TUNE = "tune"
CLASSES = (SHEET, IDENTITY, NUMERIC, CORRUPT, CONFIG, OUTPUT, TUNE)

# name -> class, for the cases above
CLASS_OF: dict[str, str] = {
    "sample sheet does not exist": SHEET,
    "sheet lacks the path column": SHEET,
    "duplicate sample ids": IDENTITY,
    "sample folder missing": CORRUPT,
    "unknown input format": CORRUPT,
    "no count matrix": CORRUPT,
    "no positions file": CORRUPT,
    "missing scalefactors": CORRUPT,
    "barcodes without positions": IDENTITY,
    "coordinates outside the image": NUMERIC,
    "negative counts": NUMERIC,
    "NaN counts": NUMERIC,
    "non-integer counts": NUMERIC,
    "empty sample": CORRUPT,
    "label column does not exist": SHEET,
    "h5ad without obsm['spatial']": CORRUPT,
    "corrupt count matrix": CORRUPT,
    "samples share no gene": IDENTITY,
    "full-res image missing": CORRUPT,
    "config: unknown key": CONFIG,
    "config: wrong value type": CONFIG,
    "run folder not empty": OUTPUT,
}

# issue 20: name -> (builder, fragment of the first error line, class)
_INPUT_CASES: dict[str, tuple[Callable[[Path], list[str]], str, str]] = {
    "sheet: an Excel workbook named .csv": (sheet_is_xlsx, "is an Excel workbook", SHEET),
    "sheet: not UTF-8 (Windows-1252)": (sheet_not_utf8, "not UTF-8 text", SHEET),
    "sheet: unquoted comma in a value": (
        sheet_unquoted_comma,
        "line 2 has 4 fields but the header has 3",
        SHEET,
    ),
    "sheet: a column named twice": (sheet_header_twice, "names column 'sample' twice", SHEET),
    "sheet: empty file": (sheet_empty, "the sample sheet is empty", SHEET),
    "sheet: a value under an unnamed column": (
        sheet_value_without_column,
        "in a column without a name",
        SHEET,
    ),
    "sheet: a folder, not a file": (sheet_is_a_folder, "is a folder", SHEET),
    "sheet: YAML path is a list": (yaml_sheet_list_value, "path is a list", SHEET),
    "sheet: a row without a path": (sheet_row_without_path, "line 3 lacks path", SHEET),
    "validate: a run config that run refuses": (
        config_run_refuses,
        "clustering.n_clusters",
        CONFIG,
    ),
    "same Space Ranger folder under two sample ids": (
        same_folder_two_ids,
        "samples A (line 2) and B (line 3) both read",
        IDENTITY,
    ),
    "same folder spelled two ways": (
        same_folder_spelled_twice,
        "samples A (line 2) and B (line 3) both read",
        IDENTITY,
    ),
    "same full-res image for two samples": (
        same_image_two_samples,
        "each sample needs its own image",
        IDENTITY,
    ),
    "count matrix (.h5) holds a barcode twice": (
        h5_barcode_twice,
        "barcode AAACAAGTATCTCCCA-1 appears twice (entries 1 and 2)",
        IDENTITY,
    ),
    "barcodes.tsv.gz lists a barcode twice": (
        mtx_barcode_twice,
        "barcodes.tsv.gz: barcode",
        IDENTITY,
    ),
    "features.tsv.gz lists a gene id twice": (
        features_id_twice,
        "features.tsv.gz: feature id",
        IDENTITY,
    ),
    "h5ad: a gene id twice in var_names": (h5ad_gene_twice, "gene id", IDENTITY),
    "h5ad: a spot id twice in obs_names": (h5ad_spot_twice, "spot id", IDENTITY),
    "annotations: a barcode twice": (
        annotations_barcode_twice,
        "ann.csv: barcode",
        IDENTITY,
    ),
    "positions: two spots at one array position": (
        positions_share_array_position,
        "array position (row,col)",
        IDENTITY,
    ),
    "cohort .h5ad listed as one sample": (
        cohort_h5ad_as_one_sample,
        "holds several sections, not one (spot barcode",
        IDENTITY,
    ),
    "stacked sections (obs['section']) as one sample": (
        stacked_sections_as_one_sample,
        "holds several sections, not one (obs['section'] has 2 values",
        IDENTITY,
    ),
    "config: data.sample_key names donors, not sections": (
        sample_key_names_donors,
        "data.sample_key: section",
        IDENTITY,
    ),
    "config: data.sample_key with missing values": (
        sample_key_with_gaps,
        "2 spots have no value in obs['section']",
        IDENTITY,
    ),
    "scalefactors: spot diameter is a string": (
        spot_diameter_string,
        "spot_diameter_fullres is '96.4' (str), not a number",
        NUMERIC,
    ),
    "scalefactors: spot diameter is a boolean": (
        spot_diameter_boolean,
        "spot_diameter_fullres is True (bool), not a number",
        NUMERIC,
    ),
    "scalefactors: lowres scale 0": (
        lowres_scalef_zero,
        "tissue_lowres_scalef is 0; it must be a positive finite number",
        NUMERIC,
    ),
    "scalefactors: hires scale negative": (
        hires_scalef_negative,
        "tissue_hires_scalef is -0.15",
        NUMERIC,
    ),
    "scalefactors: lowres scale NaN": (lowres_scalef_nan, "tissue_lowres_scalef is nan", NUMERIC),
    "scalefactors: hires scale missing": (
        hires_scalef_missing,
        "lacks tissue_hires_scalef",
        NUMERIC,
    ),
    "scalefactors: a JSON list": (
        scalefactors_not_an_object,
        "scalefactors must be a JSON object",
        NUMERIC,
    ),
    "h5ad: NaN spot coordinates": (
        h5ad_nan_coordinates,
        "1 spots have NaN or infinite coordinates in obsm['spatial']",
        NUMERIC,
    ),
    "h5ad: scale factor 0 in uns['spatial']": (
        h5ad_scalefactor_zero,
        "scalefactors: tissue_hires_scalef is 0.0",
        NUMERIC,
    ),
    "positions: a decimal comma": (positions_not_numbers, "non-numeric spot positions", NUMERIC),
    "features.tsv.gz is not gzip": (
        features_gz_not_gzip,
        "named .gz but not gzip-compressed",
        CORRUPT,
    ),
    "matrix.mtx header: more entries than written": (
        mtx_header_more_entries,
        "cannot read Matrix Market count matrix (ValueError: Truncated file",
        CORRUPT,
    ),
    "matrix.mtx: an entry outside the header's size": (
        mtx_entry_outside_header,
        "Row index out of bounds",
        CORRUPT,
    ),
    "barcodes.tsv.gz cut short": (barcodes_gz_truncated, "cannot read barcode list", CORRUPT),
    "count matrix (.h5) cut short": (h5_truncated, "HDF5 count matrix", CORRUPT),
    "count matrix (.h5) lacks a dataset": (
        h5_dataset_missing,
        "cannot read HDF5 count matrix (damaged or incomplete)",
        CORRUPT,
    ),
    "count matrix (.h5) shape disagrees": (
        h5_shape_disagrees,
        "count matrix is damaged (shape says",
        CORRUPT,
    ),
    "tissue_hires_image.png header claims 60,000 x 60,000 px": (
        hires_png_header_huge,
        "image header says 60,000 x 60,000 px",
        CORRUPT,
    ),
    "full-res PNG header claims 60,000 x 60,000 px": (
        fullres_png_header_huge,
        "image header says 60,000 x 60,000 px",
        CORRUPT,
    ),
    "tissue_lowres_image.png cut short": (lowres_png_truncated, "cannot read image", CORRUPT),
    ".h5ad cut short": (h5ad_truncated, "not a readable .h5ad file", CORRUPT),
    "scalefactors cut short": (scalefactors_not_json, "cannot read scalefactors", CORRUPT),
    "positions .parquet damaged": (
        positions_parquet_corrupt,
        "cannot read spot positions",
        CORRUPT,
    ),
    "annotations .csv.gz is not gzip": (
        annotations_gz_not_gzip,
        "cannot read annotations table",
        CORRUPT,
    ),
}
for _name, (_build, _fragment, _class) in _INPUT_CASES.items():
    CASES[_name] = (_build, _fragment)
    CLASS_OF[_name] = _class

# the classes of issue 20 live in their own modules; one corpus for the tests and the table
import bad_inputs_config  # noqa: E402
import bad_inputs_output  # noqa: E402
import bad_inputs_tune  # noqa: E402

for _module, _class in (
    (bad_inputs_config, CONFIG),
    (bad_inputs_output, OUTPUT),
    (bad_inputs_tune, TUNE),
):
    CASES.update(_module.CASES)
    # a module may tag its cases with CLASS_OF (name -> class); else its class is the module's
    _tags = getattr(_module, "CLASS_OF", {})
    CLASS_OF.update({name: _tags.get(name, _class) for name in _module.CASES})


# ---- valid inputs real users send: must be accepted, sample ids printed as written ----


def _prints(*rows: tuple[str, ...]) -> Callable[[str], None]:
    """A check that the summary has a line starting with each row's fields (sample, donor)."""

    def check(out: str) -> None:
        lines = [line.split() for line in out.splitlines()]
        for row in rows:
            assert any(tuple(line[: len(row)]) == row for line in lines), (row, out)
        assert f"{len(rows)} samples" in out, out

    return check


Accepted = tuple[list[str], Callable[[str], None]]


def excel_bom_crlf(root: Path) -> Accepted:
    f1, f2 = _small(root / "a"), _small(root / "b")
    text = f"sample,donor,path\r\nS1,D1,{f1}\r\nS2,D2,{f2}\r\n"
    (root / "samples.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    return _validate(root / "samples.csv"), _prints(("S1", "D1"), ("S2", "D2"))


def trailing_empty_rows(root: Path) -> Accepted:
    f1 = _small(root)
    text = f"sample,donor,path,image,annotations\nS1,D1,{f1},,\n,,,,\n,,,,\n\n"
    return _validate(_write_text_sheet(root, text)), _prints(("S1", "D1"))


def hash_in_id_and_folder(root: Path) -> Accepted:
    folder = _small(root / "run #2")
    text = f"sample,donor,path\nS#1,D#1,{folder}\n"
    return _validate(_write_text_sheet(root, text)), _prints(("S#1", "D#1"))


def leading_zero_ids_csv(root: Path) -> Accepted:
    f1, f2 = _small(root / "a"), _small(root / "b")
    text = f"sample,donor,path\n0012,007,{f1}\n0013,007,{f2}\n"
    return _validate(_write_text_sheet(root, text)), _prints(("0012", "007"), ("0013", "007"))


def config_samples_as_written(root: Path) -> Accepted:
    folder = _small(root)
    row = f"    - {{sample: 0012, donor: no, path: {folder}}}\n"
    return _config_samples(root, row), _prints(("0012", "no"))


def leading_zero_ids_yaml(root: Path) -> Accepted:
    f1, f2 = _small(root / "a"), _small(root / "b")
    text = (
        f"samples:\n  - sample: 0012\n    donor: no\n    path: {f1}\n"
        f"  - sample: 1.10\n    donor: on\n    path: {f2}\n"
    )
    sheet = _write_text_sheet(root, text, "samples.yaml")
    return _validate(sheet), _prints(("0012", "no"), ("1.10", "on"))


def semicolon_sheet(root: Path) -> Accepted:
    f1 = _small(root)
    text = f"sample;donor;path\nS1;D1;{f1}\n"
    return _validate(_write_text_sheet(root, text)), _prints(("S1", "D1"))


def utf16_tab_sheet(root: Path) -> Accepted:
    f1 = _small(root)
    text = f"sample\tdonor\tpath\r\nS1\tDü\t{f1}\r\n"
    (root / "samples.txt").write_bytes(text.encode("utf-16"))  # Excel's "Unicode Text"
    return _validate(root / "samples.txt"), _prints(("S1", "Dü"))


def comment_line(root: Path) -> Accepted:
    f1 = _small(root)
    text = f"# cohort of 2024\nsample,donor,path\n# S0 failed QC\nS1,D1,{f1}\n"
    return _validate(_write_text_sheet(root, text)), _prints(("S1", "D1"))


def gzip_without_gz_name(root: Path) -> Accepted:
    folder = _small(root, "v2_mtx")
    mtx = folder / "filtered_feature_bc_matrix"
    shutil.move(mtx / "features.tsv.gz", mtx / "features.tsv")  # gzip under a plain name
    return _validate(_one_sample(root, folder)), _prints(("S1", "D1"))


def labels_3_and_3_0(root: Path) -> Accepted:
    fa, ca, _ = make_spaceranger(root / "a", "v1_h5", n_spots=50, n_genes=20)
    fb, cb, _ = make_spaceranger(root / "b", "v1_h5", n_spots=50, n_genes=20)
    pd.DataFrame({"barcode": ca.obs_names, "layer": [3, 4] * 25}).to_csv(
        root / "a.csv", index=False
    )
    pd.DataFrame({"barcode": cb.obs_names, "layer": [3.0, 4.0] * 25}).to_csv(
        root / "b.csv", index=False
    )
    rows = [
        {"sample": "A", "path": str(fa), "annotations": "a.csv", "label_column": "layer"},
        {"sample": "B", "path": str(fb), "annotations": "b.csv", "label_column": "layer"},
    ]
    return _validate(_sheet(root, rows)), _prints(("A", "A"), ("B", "B"))


def run_config_to_validate(root: Path) -> Accepted:
    sheet = _one_sample(root, _small(root))
    (root / "c.yaml").write_text(f"data:\n  sheet: {sheet}\n")
    return ["validate", str(root / "c.yaml")], _prints(("S1", "D1"))


ACCEPTED: dict[str, Callable[[Path], Accepted]] = {
    "Excel sheet: UTF-8 BOM and CRLF line ends": excel_bom_crlf,
    "spreadsheet's trailing ,,,, rows": trailing_empty_rows,
    "# in a sample id, a donor and a folder name": hash_in_id_and_folder,
    "CSV ids 0012 and donor 007": leading_zero_ids_csv,
    "YAML sample: 0012, donor: no, sample: 1.10": leading_zero_ids_yaml,
    "config data.samples: sample 0012, donor no": config_samples_as_written,
    "sheet separated by ; (Excel, European locale)": semicolon_sheet,
    "UTF-16 tab-separated sheet (Excel 'Unicode Text')": utf16_tab_sheet,
    "a comment line before and after the header": comment_line,
    "gzip-compressed features.tsv without .gz": gzip_without_gz_name,
    "labels 3 in one sample, 3.0 in another": labels_3_and_3_0,
    "a run config given to validate": run_config_to_validate,
}
