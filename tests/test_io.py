import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import spatlas
from spatlas import _keys as K
from spatlas.io import (
    SampleSpec,
    read_cohort,
    read_h5ad,
    read_sample_sheet,
    read_spaceranger,
    write_h5ad,
)

from spaceranger_fixtures import LAYOUTS, blank_tiff, make_spaceranger


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_spaceranger_reads_every_layout_back_exactly(tmp_path, layout):
    folder, counts, positions = make_spaceranger(tmp_path, layout, hires=layout == "v1_h5")
    adata = read_spaceranger(folder, sample="s1", donor="d1")

    assert list(adata.obs_names) == list(counts.obs_names)
    assert list(adata.var_names) == list(counts.var_names)
    np.testing.assert_array_equal(adata.X.toarray(), counts.X.toarray())
    pos = positions.loc[counts.obs_names]
    np.testing.assert_array_equal(adata.obs[K.ARRAY_ROW], pos["array_row"])
    np.testing.assert_array_equal(adata.obs[K.ARRAY_COL], pos["array_col"])
    # obsm['spatial'] is (x, y) = (column, row) in full-resolution pixels
    np.testing.assert_array_equal(adata.obsm[K.SPATIAL][:, 0], pos["pxl_col_in_fullres"])
    np.testing.assert_array_equal(adata.obsm[K.SPATIAL][:, 1], pos["pxl_row_in_fullres"])
    assert adata.obs[K.SAMPLE].unique().tolist() == ["s1"]
    assert adata.obs[K.DONOR].unique().tolist() == ["d1"]

    info = adata.uns[K.SPATIAL]["s1"]
    sf = json.loads((folder / "spatial/scalefactors_json.json").read_text())
    assert info[K.SCALEFACTORS] == pytest.approx(sf)
    expected = np.asarray(Image.open(folder / "spatial/tissue_lowres_image.png").convert("RGB"))
    np.testing.assert_array_equal(info[K.IMAGES]["lowres"], expected)
    assert ("hires" in info[K.IMAGES]) == (layout == "v1_h5")


def test_only_spots_under_tissue_are_kept(tmp_path):
    folder, counts, positions = make_spaceranger(tmp_path, "v2_mtx")
    # mark the first five spots of the matrix as off-tissue
    pos = pd.read_csv(folder / "spatial/tissue_positions.csv")
    off = pos["barcode"].isin(counts.obs_names[:5])
    pos.loc[off, "in_tissue"] = 0
    pos.to_csv(folder / "spatial/tissue_positions.csv", index=False)
    adata = read_spaceranger(folder, sample="s")
    assert adata.n_obs == counts.n_obs - 5
    assert not set(counts.obs_names[:5]) & set(adata.obs_names)
    all_spots = read_spaceranger(folder, sample="s", in_tissue_only=False)
    assert all_spots.n_obs == counts.n_obs


def test_fullres_image_size_is_checked_without_reading_pixels(tmp_path):
    folder, _, positions = make_spaceranger(tmp_path, "v1_h5")
    big = blank_tiff(tmp_path / "fullres.tif", 13332, 13332)  # 600 px / tissue_lowres_scalef
    adata = read_spaceranger(folder, sample="s", fullres_image=big)
    assert adata.uns[K.SPATIAL]["s"][K.METADATA][K.FULLRES_PATH] == str(big.resolve())
    small = tmp_path / "small.png"
    Image.new("RGB", (1000, 1000), "white").save(small)
    with pytest.raises(spatlas.SpatlasInputError, match="outside full-resolution image"):
        read_spaceranger(folder, sample="s", fullres_image=small)


def _write_sheet(tmp_path, rows, suffix=".csv"):
    sheet = tmp_path / f"samples{suffix}"
    if suffix == ".csv":
        pd.DataFrame(rows).to_csv(sheet, index=False)
    else:
        import yaml

        sheet.write_text(yaml.safe_dump({"samples": rows}))
    return sheet


@pytest.mark.parametrize("suffix", [".csv", ".yaml"])
def test_sample_sheet_concatenates_samples_with_labels(tmp_path, suffix):
    f1, c1, _ = make_spaceranger(tmp_path / "a", "v1_h5")
    f2, c2, _ = make_spaceranger(tmp_path / "b", "v2_mtx", n_spots=200)
    labels = pd.DataFrame({"barcode": c1.obs_names, "layer": ["L1", "L2", ""] * 100})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    rows = [
        {
            "sample": "A",
            "donor": "D1",
            "path": str(f1.relative_to(tmp_path)),
            "annotations": "labels.csv",
            "label_column": "layer",
        },
        {"sample": "B", "donor": "D2", "path": str(f2)},
    ]
    sheet = _write_sheet(tmp_path, rows, suffix)
    specs = read_sample_sheet(sheet)
    assert [s.sample for s in specs] == ["A", "B"]
    cohort = read_cohort(sheet)

    assert cohort.n_obs == 500
    assert cohort.obs_names.is_unique
    assert cohort.obs[K.SAMPLE].cat.categories.tolist() == ["A", "B"]
    assert cohort.obs[K.DONOR].cat.categories.tolist() == ["D1", "D2"]
    assert set(cohort.uns[K.SPATIAL]) == {"A", "B"}
    a = cohort[cohort.obs[K.SAMPLE] == "A"]
    np.testing.assert_array_equal(a.X.toarray(), c1.X.toarray())
    assert a.obs[K.LABEL].isna().sum() == 100  # the empty labels
    assert a.obs[K.LABEL].value_counts().to_dict() == {"L1": 100, "L2": 100}
    assert cohort.obs.loc[cohort.obs[K.SAMPLE] == "B", K.LABEL].isna().all()


def test_h5ad_input_single_and_split_by_sample_key(tmp_path):
    folder, counts, _ = make_spaceranger(tmp_path, "v1_h5")
    one = read_spaceranger(folder, sample="s")
    one.obs["section"] = np.where(np.arange(one.n_obs) < 100, "x", "y")
    one.obs["patient"] = "P"
    path = tmp_path / "cohort.h5ad"
    write_h5ad(one, path)
    single = read_h5ad(path, sample="only", donor="P")
    np.testing.assert_array_equal(single.X.toarray(), counts.X.toarray())
    parts = read_h5ad(path, sample_key="section", donor_key="patient")
    assert [p.obs[K.SAMPLE].iloc[0] for p in parts] == ["x", "y"]
    assert [p.n_obs for p in parts] == [100, 200]
    assert all(p.obs[K.DONOR].iloc[0] == "P" for p in parts)


def test_h5ad_counts_layer_is_used_when_x_is_normalised(tmp_path):
    folder, counts, _ = make_spaceranger(tmp_path, "v1_h5")
    adata = read_spaceranger(folder, sample="s")
    adata.layers["raw"] = adata.X.copy()
    adata.X = adata.X * 0.37
    path = tmp_path / "norm.h5ad"
    write_h5ad(adata, path)
    with pytest.raises(spatlas.SpatlasInputError, match="not integers"):
        read_h5ad(path, sample="s")
    fixed = read_h5ad(path, sample="s", counts_layer="raw")
    np.testing.assert_array_equal(fixed.X.toarray(), counts.X.toarray())


def test_outer_join_keeps_all_genes_and_fills_zeros(tmp_path):
    f1, c1, _ = make_spaceranger(tmp_path / "a", "v1_h5", n_genes=50)
    f2, c2, _ = make_spaceranger(tmp_path / "b", "v1_h5", n_genes=80)
    specs = [SampleSpec("A", str(f1)), SampleSpec("B", str(f2))]
    inner = read_cohort(specs)
    outer = read_cohort(specs, join="outer")
    assert set(inner.var_names) == set(c1.var_names) & set(c2.var_names)
    assert set(outer.var_names) == set(c1.var_names) | set(c2.var_names)
    only_b = sorted(set(c2.var_names) - set(c1.var_names))
    assert outer[outer.obs[K.SAMPLE] == "A", only_b].X.sum() == 0


def test_write_h5ad_replaces_atomically(tmp_path):
    folder, _, _ = make_spaceranger(tmp_path, "v1_h5")
    adata = read_spaceranger(folder, sample="s")
    path = tmp_path / "x.h5ad"
    path.write_text("old")
    write_h5ad(adata, path)
    assert not list(tmp_path.glob(".x.h5ad.tmp*"))
    assert spatlas.io.read_h5ad(path, sample="s").n_obs == adata.n_obs
