"""SpatialData stores in and out, Visium HD bin and cell folders."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

import spatlas
from spatlas import _keys as K
from spatlas._config import Config
from spatlas._errors import MissingDependencyError, SpatlasInputError
from spatlas.io._spaceranger import read_cell_polygons
from spatlas.io._tenx import write_10x_h5
from spatlas.pipeline import run
from spatlas.pp._neighbourhoods import detect_layout
from spatlas.pp.morphology import SpotPatches, slide_images

# --------------------------------------------------------------------------------------------
# a tiny SpatialData store: an H&E pyramid placed by a scale + translation, circles, a table


def _cohort(n_spots: int = 160, n_samples: int = 2, seed: int = 3):
    return spatlas.datasets.synthetic_cohort(
        n_donors=n_samples,
        n_samples_per_donor=1,
        n_spots=n_spots,
        n_genes=120,
        n_domains=3,
        n_markers=10,
        seed=seed,
    )


def _store(tmp_path, cohort, *, offset=(40.0, -25.0), scale=0.5, name="cohort.zarr"):
    """Write ``cohort`` as a SpatialData store; return the path and each sample's affine.

    Each sample's hires image is the H&E (two pyramid levels); it maps to the sample's
    coordinate system by ``x_cs = x_px / (hires_scalef * scale) + offset`` (not a pure scale),
    and the circles sit in the coordinate system at ``xy_fullres / scale + offset``.
    """
    sd = pytest.importorskip("spatialdata")
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale, Sequence, Translation

    images, shapes, tables = {}, {}, []
    for sample in cohort.obs[K.SAMPLE].cat.categories:
        part = cohort[(cohort.obs[K.SAMPLE] == sample).to_numpy()].copy()
        info = part.uns[K.SPATIAL][sample]
        hires = info[K.IMAGES]["hires"]
        scalef = info[K.SCALEFACTORS][K.HIRES_SCALEF]
        diameter = info[K.SCALEFACTORS][K.SPOT_DIAMETER]
        to_cs = Sequence(
            [
                Scale([1 / (scalef * scale)] * 2, axes=("x", "y")),
                Translation(list(offset), axes=("x", "y")),
            ]
        )
        images[f"{sample}_he"] = Image2DModel.parse(
            np.moveaxis(hires, -1, 0),
            dims=("c", "y", "x"),
            scale_factors=[2],
            chunks=(3, 32, 32),
            transformations={sample: to_cs},
        )
        xy = part.obsm[K.SPATIAL] / scale + np.asarray(offset)
        frame = gpd.GeoDataFrame(
            {"radius": np.full(part.n_obs, diameter / 2 / scale)},
            geometry=[Point(x, y) for x, y in xy],
            index=pd.RangeIndex(part.n_obs) + 7,
        )
        shapes[sample] = ShapesModel.parse(frame, transformations={sample: Identity()})
        table = part.copy()
        table.obs = pd.DataFrame(
            {
                "region": pd.Categorical([sample] * part.n_obs),
                "cell": np.arange(part.n_obs) + 7,
                "truth": part.obs[K.LABEL].astype(str).to_numpy(),
            },
            index=part.obs[K.BARCODE].astype(str).to_numpy(),
        )
        table.obsm = {}
        table.uns = {}
        tables.append(table)
    import anndata as ad

    table = ad.concat(tables)
    regions = list(cohort.obs[K.SAMPLE].cat.categories)
    table.obs["region"] = pd.Categorical(table.obs["region"], categories=regions)
    table = TableModel.parse(table, region=regions, region_key="region", instance_key="cell")
    sdata = sd.SpatialData(images=images, shapes=shapes, tables={"counts": table})
    path = tmp_path / name
    sdata.write(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    cohort = _cohort()
    return _store(tmp_path_factory.mktemp("sd"), cohort), cohort


def test_read_spatialdata_matches_the_cohort(store):
    path, cohort = store
    adata = spatlas.io.read_spatialdata(path)
    assert list(adata.obs[K.SAMPLE].cat.categories) == list(cohort.obs[K.SAMPLE].cat.categories)
    assert adata.n_obs == cohort.n_obs
    np.testing.assert_array_equal(adata.X.toarray(), cohort.X.toarray())
    for sample in cohort.obs[K.SAMPLE].cat.categories:
        mine = (adata.obs[K.SAMPLE] == sample).to_numpy()
        theirs = (cohort.obs[K.SAMPLE] == sample).to_numpy()
        info = adata.uns[K.SPATIAL][sample]
        sf = info[K.SCALEFACTORS]
        # the image is not a pure scale of the coordinate system: positions are in its pixels
        scalef = cohort.uns[K.SPATIAL][sample][K.SCALEFACTORS][K.HIRES_SCALEF]
        expected = cohort.obsm[K.SPATIAL][theirs] * scalef
        np.testing.assert_allclose(adata.obsm[K.SPATIAL][mine], expected, atol=1e-6)
        diameter = cohort.uns[K.SPATIAL][sample][K.SCALEFACTORS][K.SPOT_DIAMETER] * scalef
        assert sf[K.SPOT_DIAMETER] == pytest.approx(diameter)
        assert sf[K.FULLRES_SCALEF] == pytest.approx(1.0)
        assert info[K.METADATA][K.FULLRES_PATH].endswith(f"images/{sample}_he")
        assert info[K.METADATA][K.SD_REGION] == sample
        np.testing.assert_array_equal(
            adata.obs.loc[mine, K.INSTANCE].to_numpy(), np.arange(theirs.sum()) + 7
        )
        assert (adata.obs.loc[mine, "truth"].to_numpy() == cohort.obs.loc[theirs, K.LABEL]).all()


def test_patches_come_from_the_matching_pyramid_level(store):
    path, _ = store
    adata = spatlas.io.read_spatialdata(path)
    images = slide_images(adata)
    sample = adata.obs[K.SAMPLE].cat.categories[0]
    mask = (adata.obs[K.SAMPLE] == sample).to_numpy()
    diameter = adata.uns[K.SPATIAL][sample][K.SCALEFACTORS][K.SPOT_DIAMETER]
    xy = adata.obsm[K.SPATIAL][mask]
    native = SpotPatches(
        {sample: images[sample]}, np.full(mask.sum(), sample), xy, {sample: diameter}
    )
    assert native.images[sample].level is None  # no out_size: the finest level
    small = max(1, int(diameter / 2) - 1)  # half the window fits in the coarser level
    coarse = SpotPatches(
        {sample: images[sample]},
        np.full(mask.sum(), sample),
        xy,
        {sample: diameter},
        out_size=small,
    )
    assert coarse.images[sample].level == "s1"
    assert coarse.images[sample].scale == pytest.approx(0.5, rel=0.02)
    hires = dict(adata.uns[K.SPATIAL][sample][K.IMAGES])
    # level 0 windows are the store's pixels exactly
    from spatlas.pp.morphology._patches import gather_windows, window_starts

    side = native.sides[sample]
    got = native.get_batch(np.arange(5))
    full = _level0(path, sample)
    want = gather_windows(
        _Array(full), window_starts(xy[:5, 1], side), window_starts(xy[:5, 0], side), side
    )
    np.testing.assert_array_equal(got, want)
    assert "hires" in hires  # a preview for the maps


class _Array:
    def __init__(self, image):
        self.image = image
        self.shape = image.shape[:2]

    def read_region(self, y0, y1, x0, x1):
        return self.image[y0:y1, x0:x1]


def _level0(path, sample):
    import zarr

    return np.moveaxis(
        np.asarray(zarr.open_group(str(path / "images" / f"{sample}_he"))["s0"]), 0, -1
    )


def test_one_region_per_sample_sheet_rows(store, tmp_path):
    path, cohort = store
    samples = list(cohort.obs[K.SAMPLE].cat.categories)
    sheet = tmp_path / "samples.csv"
    rows = [f"{s},donor_{i},{path},{s},truth" for i, s in enumerate(samples)]
    sheet.write_text("sample,donor,path,region,label_column\n" + "\n".join(rows) + "\n")
    adata = spatlas.io.read_cohort(sheet)
    assert list(adata.obs[K.SAMPLE].cat.categories) == samples
    assert (adata.obs[K.LABEL].astype(str).to_numpy() == cohort.obs[K.LABEL].astype(str)).all()
    # a store with several regions needs the region column
    sheet.write_text(f"sample,path\nfirst,{path}\n")
    with pytest.raises(SpatlasInputError, match="give region="):
        spatlas.io.read_cohort(sheet)


def test_store_errors_are_one_clear_line(store, tmp_path):
    sd = pytest.importorskip("spatialdata")
    path, _ = store
    with pytest.raises(SpatlasInputError, match=r"no table 'nope' .*tables: counts"):
        spatlas.io.read_spatialdata(path, table="nope")
    with pytest.raises(SpatlasInputError, match="does not annotate region 'x'"):
        spatlas.io.read_spatialdata(path, region="x")
    empty = tmp_path / "empty.zarr"
    full = sd.read_zarr(path)
    sd.SpatialData(shapes=dict(full.shapes)).write(empty)
    with pytest.raises(SpatlasInputError, match="has no table") as err:
        spatlas.io.read_spatialdata(empty)
    assert len(err.value.problems) == 1


def test_missing_extra_gives_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "spatialdata", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'spatlas\[spatialdata\]'"):
        spatlas.io.read_spatialdata(tmp_path / "x.zarr")


def test_run_on_a_store_writes_domains_into_a_copy(store, tmp_path):
    sd = pytest.importorskip("spatialdata")
    from spatialdata.transformations import get_transformation

    path, cohort = store
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    samples = list(cohort.obs[K.SAMPLE].cat.categories)
    config = Config()
    config.data.samples = [
        {"sample": s, "path": str(path), "region": s, "label_column": "truth"} for s in samples
    ]
    config.clustering.n_clusters = 3
    config.preprocessing.n_top_genes = 100
    result = run(config, out=tmp_path / "run")
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before  # input untouched
    written = sd.read_zarr(tmp_path / "run" / "spatialdata" / path.name)
    table = written.tables["spatlas"]
    key = result.domain_key
    assert table.uns["spatialdata_attrs"]["region"] == samples
    assert set(table.obs[key].astype(str)) == set(result.adata.obs[key].astype(str))
    assert "domain_sizes" in table.uns["spatlas"]
    # a spot's circle, mapped through the copy's transformations, lands on its pixel
    i = 11
    region, instance = table.obs["region"].iloc[i], table.obs["instance_id"].iloc[i]
    point = written.shapes[region].loc[instance].geometry
    affine = [
        np.asarray(
            get_transformation(e, to_coordinate_system=region).to_affine_matrix(
                ("x", "y"), ("x", "y")
            )
        )
        for e in (written.images[f"{region}_he"], written.shapes[region])
    ]
    pixel = (np.linalg.inv(affine[0]) @ affine[1] @ [point.x, point.y, 1.0])[:2]
    np.testing.assert_allclose(pixel, table.obsm[K.SPATIAL][i], atol=1e-6)
    theirs = (cohort.obs[K.SAMPLE] == region).to_numpy()
    scalef = cohort.uns[K.SPATIAL][region][K.SCALEFACTORS][K.HIRES_SCALEF]
    np.testing.assert_allclose(
        pixel, cohort.obsm[K.SPATIAL][theirs][instance - 7] * scalef, atol=1e-6
    )
    np.testing.assert_array_equal(
        table.obs[key].astype(str).to_numpy(), result.adata.obs[key].astype(str).to_numpy()
    )
    np.testing.assert_array_equal(table.obs[K.SAMPLE], result.adata.obs[K.SAMPLE].astype(str))


# --------------------------------------------------------------------------------------------
# Visium HD


def _hd(tmp_path, *, with_cells: bool = True):
    """A miniature Space Ranger HD outs/: 8 and 16 µm bins, and segmented cells."""
    sheet = spatlas.datasets.synthetic_visium_hd(
        tmp_path / "hd",
        n_donors=1,
        n_samples_per_donor=1,
        n_spots=120,
        n_genes=80,
        n_domains=2,
        n_markers=10,
        seed=1,
    )
    outs = tmp_path / "hd" / "d0_s0" / "outs"
    (outs / "binned_outputs" / "square_016um" / "spatial").mkdir(parents=True)
    if with_cells:
        seg = outs / "segmented_outputs"
        (seg / "spatial").mkdir(parents=True)
        bins = spatlas.io.read_spaceranger(outs, sample="s", bin=8)
        cells = bins[:30].copy()
        cells.obs_names = [f"cellid_{i:09d}-1" for i in range(1, 31)]
        write_10x_h5(cells, seg / "filtered_feature_cell_matrix.h5")
        features = []
        for i, (x, y) in enumerate(bins.obsm[K.SPATIAL][:30], start=1):
            r = 5.0 + i % 3  # squares of side 2r around the centre
            ring = [[x - r, y - r], [x + r, y - r], [x + r, y + r], [x - r, y + r], [x - r, y - r]]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {"cell_id": i},
                }
            )
        (seg / "cell_segmentations.geojson").write_text(
            json.dumps({"type": "FeatureCollection", "features": features})
        )
        src = outs / "binned_outputs" / "square_008um" / "spatial" / "scalefactors_json.json"
        (seg / "spatial" / "scalefactors_json.json").write_text(src.read_text())
    return sheet, outs


def test_hd_bins_read_on_the_square_lattice(tmp_path):
    sheet, outs = _hd(tmp_path)
    adata = spatlas.io.read_cohort(sheet)  # the sheet says bin: 8
    sample = adata.obs[K.SAMPLE].iloc[0]
    sf = adata.uns[K.SPATIAL][sample][K.SCALEFACTORS]
    assert sf[K.SPOT_DIAMETER] == pytest.approx(8 / 0.2738)  # the bin side
    assert detect_layout(adata.obs[[K.ARRAY_ROW, K.ARRAY_COL]].to_numpy()) == "square"
    assert adata.obs_names[0].startswith("s_008um_")
    same = spatlas.io.read_spaceranger(outs, sample="x")  # default: the 8 µm bins
    np.testing.assert_array_equal(same.obsm[K.SPATIAL], adata.obsm[K.SPATIAL])
    with pytest.raises(SpatlasInputError, match=r"no binned_outputs/square_004um.*8, 16, cells"):
        spatlas.io.read_spaceranger(outs, sample="x", bin=4)
    with pytest.raises(SpatlasInputError, match="give a bin side in µm"):
        spatlas.io.read_spaceranger(outs, sample="x", bin="big")
    with pytest.raises(SpatlasInputError, match="not a Visium HD outs/ folder"):
        spatlas.io.read_spaceranger(outs / "binned_outputs", sample="x", bin=8)


def test_hd_cells_are_read_at_their_centroids(tmp_path):
    _, outs = _hd(tmp_path)
    bins = spatlas.io.read_spaceranger(outs, sample="s", bin=8)
    cells = spatlas.io.read_spaceranger(outs, sample="s", bin="cells")
    assert cells.n_obs == 30
    np.testing.assert_allclose(cells.obsm[K.SPATIAL], bins.obsm[K.SPATIAL][:30], atol=1e-9)
    sides = 2 * (5.0 + np.arange(1, 31) % 3)
    np.testing.assert_allclose(cells.obs[K.CELL_AREA], sides**2)
    diameter = np.median(2 * np.sqrt(sides**2 / np.pi))
    assert cells.uns[K.SPATIAL]["s"][K.SCALEFACTORS][K.SPOT_DIAMETER] == pytest.approx(diameter)
    assert K.ARRAY_ROW not in cells.obs  # cells have no lattice: the irregular layout
    np.testing.assert_array_equal(cells.X.toarray(), bins.X[:30].toarray())


def test_cell_polygons_reject_bad_geojson(tmp_path):
    bad = tmp_path / "cells.geojson"
    bad.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Point", "coordinates": [1, 2]},
                        "properties": {"cell_id": 1},
                    }
                ],
            }
        )
    )
    with pytest.raises(SpatlasInputError, match="cell 1 is not a Polygon"):
        read_cell_polygons(bad)


def test_hd_cohort_runs_end_to_end(tmp_path):
    sheet = spatlas.datasets.synthetic_visium_hd(
        tmp_path / "hd",
        n_donors=2,
        n_samples_per_donor=1,
        n_spots=400,
        n_genes=120,
        n_domains=3,
        n_markers=10,
        seed=2,
    )
    config = Config()
    config.data.sheet = str(sheet)
    config.preprocessing.n_top_genes = 100
    result = run(config)
    assert result.metrics.loc[result.metrics["sample"] == "mean", "ari"].iloc[0] > 0.3
