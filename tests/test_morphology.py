"""Morphology: patches, stain normalisation, handcrafted features, embedding, pipeline."""

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

import spatlas
from spatlas import _keys as K
from spatlas._errors import SpatlasInputError
from spatlas.pp.morphology import (
    OpenImage,
    SlideImage,
    SpotPatches,
    StainNormalizer,
    fit_stain_normalizer,
    gather_windows,
    resize_patches,
    tissue_mask,
    window_starts,
)
from spatlas.pp.morphology._handcrafted import (
    GLCM_ANGLES,
    GLCM_DISTANCES,
    GLCM_PROPS,
    glcm_features,
    rgb_to_hed,
)


@pytest.fixture(scope="module")
def image():
    """A textured 'slide': smooth colour gradients plus noise, (240, 320, 3) uint8."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    base = np.stack([120 + 0.3 * xx, 80 + 0.5 * yy, 160 + 0.1 * (xx - yy)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _spots():
    # interior spots at integer centres, two border spots, one corner spot
    xy = np.array([[50, 40], [160, 120], [200, 100], [3, 60], [318, 200], [1, 1]], dtype=float)
    return xy


# ---------------------------------------------------------------------------------------------
# patches


@pytest.mark.parametrize("side", [11, 12])
def test_interior_patches_equal_the_image_window(image, side):
    xy = _spots()[:3]
    top = window_starts(xy[:, 1], side)
    left = window_starts(xy[:, 0], side)
    patches = gather_windows(OpenImage(image), top, left, side)
    for k, (x, y) in enumerate(xy.astype(int)):
        y0, x0 = y - (side - 1) // 2 - (side % 2 == 0) * 0, x - (side - 1) // 2
        if side % 2 == 0:  # even side: window split evenly about the centre, start = c - side/2 + 1
            y0, x0 = y - side // 2 + 1, x - side // 2 + 1
        np.testing.assert_array_equal(patches[k], image[y0 : y0 + side, x0 : x0 + side])


def test_border_patches_are_padded_white_or_reflected(image):
    side = 11
    xy = _spots()[3:]
    top, left = window_starts(xy[:, 1], side), window_starts(xy[:, 0], side)
    white = gather_windows(OpenImage(image), top, left, side, pad="constant")
    mirrored = gather_windows(OpenImage(image), top, left, side, pad="reflect")
    # spot at x=3: columns -2, -1 lie outside
    assert (white[0, :, :2] == 255).all()
    np.testing.assert_array_equal(white[0, :, 2:], image[55:66, 0:9])
    ref = np.pad(image, ((10, 10), (10, 10), (0, 0)), mode="reflect")
    for k in range(3):
        y0, x0 = top[k] + 10, left[k] + 10
        np.testing.assert_array_equal(mirrored[k], ref[y0 : y0 + side, x0 : x0 + side])
    # corner spot at (1, 1): 4 rows and 4 columns outside
    assert (white[2, :4] == 255).all() and (white[2, :, :4] == 255).all()


def test_resize_matches_pillow_bilinear():
    rng = np.random.default_rng(1)
    patch = rng.integers(0, 256, (1, 37, 37, 3), dtype=np.uint8)
    for size in (16, 64):
        ours = resize_patches(patch, size)[0].astype(int)
        pil = np.asarray(Image.fromarray(patch[0]).resize((size, size), Image.BILINEAR)).astype(int)
        assert np.abs(ours - pil).max() <= 1


def _cohort_on(kind, image, tmp_path, *, scalef=1.0, hires=None):
    xy = _spots()
    obs = pd.DataFrame({K.SAMPLE: "s1"}, index=[f"spot{i}" for i in range(len(xy))])
    adata = ad.AnnData(obs=obs)
    adata.obsm[K.SPATIAL] = xy
    meta = {K.FULLRES_PATH: ""}
    images = {}
    if kind == "png":
        Image.fromarray(image).save(tmp_path / "full.png")
        meta[K.FULLRES_PATH] = str(tmp_path / "full.png")
    elif kind == "tiled_tiff":
        tifffile.imwrite(tmp_path / "full.tif", image, tile=(64, 64), compression="zlib")
        meta[K.FULLRES_PATH] = str(tmp_path / "full.tif")
    elif kind == "flat_tiff":
        tifffile.imwrite(tmp_path / "flat.tif", image)
        meta[K.FULLRES_PATH] = str(tmp_path / "flat.tif")
    else:
        images["hires"] = image if hires is None else hires
    adata.uns[K.SPATIAL] = {
        "s1": {
            K.IMAGES: images,
            K.SCALEFACTORS: {K.SPOT_DIAMETER: 12.0, K.HIRES_SCALEF: scalef},
            K.METADATA: meta,
        }
    }
    return adata


def test_tiff_png_and_in_memory_sources_give_the_same_patches(image, tmp_path):
    results = {}
    for kind in ("png", "tiled_tiff", "flat_tiff", "hires"):
        adata = _cohort_on(kind, image, tmp_path)
        patches = SpotPatches.from_adata(adata)
        assert patches.images["s1"].kind == ("hires" if kind == "hires" else "fullres")
        results[kind] = patches.get_batch(np.arange(len(patches)))
    for kind in ("tiled_tiff", "flat_tiff", "hires"):
        np.testing.assert_array_equal(results[kind], results["png"])


def test_hires_image_with_scalefactor_matches_the_fullres_patch(tmp_path):
    # a smooth slide; hires = full resolution averaged over 2 x 2 blocks, scalefactor 0.5
    yy, xx = np.mgrid[0:240, 0:320]
    image = np.stack(
        [120 + 40 * np.sin(xx / 9.0), 80 + 0.5 * yy, 160 + 40 * np.cos((xx + yy) / 11.0)], axis=-1
    ).astype(np.uint8)
    small = image.reshape(120, 2, 160, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    full = SpotPatches.from_adata(_cohort_on("png", image, tmp_path), out_size=6)
    half = SpotPatches.from_adata(_cohort_on("hires", image, tmp_path, scalef=0.5, hires=small))
    assert half.sides["s1"] == 6 and half.pixels_per_spot["s1"] == 6.0
    idx = np.arange(3)  # interior spots
    diff = np.abs(full.get_batch(idx).astype(int) - half.get_batch(idx).astype(int))
    assert diff.mean() < 3  # same tissue, two resamplings of it


def test_extraction_streams_and_opens_each_slide_once(image, tmp_path, monkeypatch):
    opened = []
    original = Image.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    rng = np.random.default_rng(0)
    xy = np.column_stack([rng.uniform(0, 320, 300), rng.uniform(0, 240, 300)])
    Image.fromarray(image).save(tmp_path / "full.png")
    slide = SlideImage("s1", "fullres", 1.0, path=str(tmp_path / "full.png"))
    patches = SpotPatches({"s1": slide}, np.full(300, "s1"), xy, {"s1": 12.0})
    seen = np.concatenate([idx for idx, _ in patches.batches(32)])
    assert sorted(seen) == list(range(300))
    assert len(opened) == 1 and patches.n_opens == 1


def test_tiled_tiff_batches_read_thin_strips(image, tmp_path):
    tifffile.imwrite(tmp_path / "full.tif", image, tile=(32, 32), compression="zlib")
    slide = SlideImage("s1", "fullres", 1.0, path=str(tmp_path / "full.tif"))
    opened = slide.open()
    assert not isinstance(opened.pixels, np.ndarray)  # read through the zarr store
    opened.close()
    rng = np.random.default_rng(0)
    xy = np.column_stack([rng.uniform(0, 320, 400), rng.uniform(0, 240, 400)])
    patches = SpotPatches({"s1": slide}, np.full(400, "s1"), xy, {"s1": 10.0})
    regions = []
    original = OpenImage.read_region

    def recording(self, y0, y1, x0, x1):
        regions.append((y1 - y0) * (x1 - x0))
        return original(self, y0, y1, x0, x1)

    OpenImage.read_region = recording
    try:
        batches = list(patches.batches(16))
    finally:
        OpenImage.read_region = original
    assert len(regions) == len(batches) == 25
    assert np.median(regions) < 0.25 * image.shape[0] * image.shape[1]


def test_torch_dataloader_fetches_whole_batches(image, tmp_path):
    torch = pytest.importorskip("torch")
    patches = SpotPatches.from_adata(_cohort_on("hires", image, tmp_path), out_size=8)
    loader = torch.utils.data.DataLoader(patches.torch_dataset(), batch_size=4, shuffle=False)
    got = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(got, patches.get_batch(np.arange(len(patches))))


def test_missing_image_and_spot_diameter_are_clear_errors(image, tmp_path):
    adata = _cohort_on("hires", image, tmp_path)
    adata.uns[K.SPATIAL]["s1"][K.IMAGES] = {}
    with pytest.raises(SpatlasInputError, match="no H&E image"):
        SpotPatches.from_adata(adata)
    adata = _cohort_on("hires", image, tmp_path)
    del adata.uns[K.SPATIAL]["s1"][K.SCALEFACTORS][K.SPOT_DIAMETER]
    with pytest.raises(SpatlasInputError, match="spot_diameter_fullres"):
        SpotPatches.from_adata(adata)


# ---------------------------------------------------------------------------------------------
# stain normalisation


def _tissue_lab_means(adata, transform=None):
    from skimage.color import rgb2lab

    patches = SpotPatches.from_adata(adata, transform=transform)
    means = []
    for sample in patches.images:
        idx = np.flatnonzero(patches.samples == sample)
        px = patches.native(idx).reshape(-1, 3)
        px = px[tissue_mask(px)]
        means.append(rgb2lab(px[None] / 255.0)[0].mean(axis=0))
    return np.array(means)


def _mean_pairwise(points):
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    return d[np.triu_indices(len(points), 1)].mean()


@pytest.fixture(scope="module")
def stained():
    return spatlas.datasets.synthetic_cohort(
        n_donors=2,
        n_samples_per_donor=2,
        n_spots=300,
        n_genes=120,
        n_domains=3,
        seed=3,
        stain_shift=2.0,
        hires_spot_px=16,
    )


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stain_normalisation_reduces_between_slide_colour_difference(stained, method):
    before = _mean_pairwise(_tissue_lab_means(stained))
    patches = SpotPatches.from_adata(stained)
    norm = fit_stain_normalizer(patches, method=method, seed=0)
    after = _mean_pairwise(_tissue_lab_means(stained, transform=norm.transform))
    assert after < 0.6 * before, (before, after)
    again = fit_stain_normalizer(SpotPatches.from_adata(stained), method=method, seed=0)
    assert again.as_dict() == norm.as_dict()  # deterministic


def test_stain_shifted_copy_moves_towards_a_reference_image(stained):
    from skimage.color import rgb2lab

    ref = stained.uns[K.SPATIAL]["d0_s0"][K.IMAGES]["hires"]
    od = -np.log((ref.astype(float) + 1) / 256)
    shifted = np.clip(256 * np.exp(-od * np.array([1.35, 0.8, 1.15])) - 1, 0, 255).astype(np.uint8)
    adata = stained[stained.obs[K.SAMPLE] == "d0_s0"].copy()
    adata.uns[K.SPATIAL] = {"d0_s0": dict(stained.uns[K.SPATIAL]["d0_s0"])}
    adata.uns[K.SPATIAL]["d0_s0"][K.IMAGES] = {"hires": shifted}
    mask = tissue_mask(ref)

    def lab_gap(img):
        return np.linalg.norm(rgb2lab(img[mask]).mean(0) - rgb2lab(ref[mask]).mean(0))

    for method in ("macenko", "reinhard"):
        norm = fit_stain_normalizer(SpotPatches.from_adata(adata), method=method, reference=ref)
        fixed = norm.transform(shifted, "d0_s0")
        assert lab_gap(fixed) < 0.5 * lab_gap(shifted), method


def test_unknown_stain_method_is_refused():
    with pytest.raises(SpatlasInputError, match="macenko, reinhard"):
        StainNormalizer("vahadane")


# ---------------------------------------------------------------------------------------------
# handcrafted features


def test_handcrafted_building_blocks_match_scikit_image():
    from skimage.color import rgb2hed
    from skimage.feature import graycomatrix, graycoprops

    rng = np.random.default_rng(2)
    patches = rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        rgb_to_hed(patches), rgb2hed(patches.reshape(-1, 20, 3)).reshape(patches.shape), atol=1e-5
    )
    levels = 8
    q = rng.integers(0, levels, (3, 20, 20))
    ours = glcm_features(q, levels)
    for b in range(3):
        glcm = graycomatrix(
            q[b].astype(np.uint8),
            GLCM_DISTANCES,
            GLCM_ANGLES,
            levels=levels,
            symmetric=True,
            normed=True,
        )
        ref = np.concatenate(
            [[graycoprops(glcm, p)[d].mean() for p in GLCM_PROPS] for d in range(2)]
        )
        np.testing.assert_allclose(ours[b], ref, rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def cohort():
    adata = spatlas.datasets.synthetic_cohort(
        n_donors=2,
        n_samples_per_donor=2,
        n_spots=500,
        n_genes=120,
        n_domains=4,
        seed=2,
        hires_spot_px=24,
    )
    spatlas.pp.morphology_features(adata)
    spatlas.pp.morphology_embedding(adata)
    return adata


def test_handcrafted_morphology_separates_planted_domains(cohort):
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import adjusted_rand_score

    features = cohort.obsm[K.MORPH_FEATURES]
    assert features.dtype == np.float32 and features.shape == (cohort.n_obs, 52)
    emb = cohort.obsm[K.MORPH_HARMONY]
    assert emb.shape == (cohort.n_obs, 20) and cohort.obsm[K.MORPH_PCA].dtype == np.float32
    labels = cohort.obs[K.LABEL].to_numpy()

    def mean_ari(X):
        aris = []
        for sample in cohort.obs[K.SAMPLE].cat.categories:
            m = (cohort.obs[K.SAMPLE] == sample).to_numpy()
            pred = KMeans(4, n_init=4, random_state=0).fit_predict(X[m])
            aris.append(adjusted_rand_score(labels[m], pred))
        return np.mean(aris)

    truth = cohort.obsm["X_morph_truth"]
    assert mean_ari(truth) > 0.85  # the planted morphology does separate these domains
    assert mean_ari(emb) > 0.35
    r2 = [LinearRegression().fit(emb, truth[:, j]).score(emb, truth[:, j]) for j in range(4)]
    assert r2[0] > 0.75 and r2[3] > 0.6 and min(r2) > 0.3, r2  # haematoxylin, fibres best


def test_morphology_metadata_records_images_and_resolution(cohort):
    meta = cohort.uns["spatlas"]["morphology"][K.MORPH_FEATURES]
    assert meta["extractor"] == "handcrafted" and meta["input_size"] == 24
    info = meta["samples"]["d0_s0"]
    assert info["image"] == "hires" and info["pixels_per_spot"] == pytest.approx(24.0)
    assert len(meta["feature_names"]) == 52


def test_morphology_features_is_deterministic(cohort):
    again = cohort.copy()
    spatlas.pp.morphology_features(again)
    np.testing.assert_array_equal(again.obsm[K.MORPH_FEATURES], cohort.obsm[K.MORPH_FEATURES])


def test_handcrafted_morphology_does_not_import_torch():
    code = (
        "import sys, spatlas\n"
        "a = spatlas.datasets.synthetic_cohort(n_donors=1, n_samples_per_donor=2, n_spots=60,"
        " n_genes=60, n_domains=2)\n"
        "spatlas.pp.morphology_features(a, stain_norm='macenko')\n"
        "spatlas.pp.morphology_embedding(a, n_comps=5)\n"
        "print([m for m in ('torch', 'torchvision', 'timm') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------------------------
# pipeline


def test_pipeline_morphology_section_writes_the_embeddings(tmp_path):
    from spatlas._config import config_from_dict
    from spatlas.pipeline import run

    config = config_from_dict(
        {
            "data": {
                "dataset": "synthetic",
                "dataset_params": {
                    "n_donors": 2,
                    "n_samples_per_donor": 1,
                    "n_spots": 200,
                    "n_genes": 150,
                    "n_domains": 3,
                },
            },
            "preprocessing": {"n_top_genes": 100, "n_comps": 10},
            "morphology": {"enabled": True, "stain_norm": "reinhard", "n_comps": 8},
            "clustering": {"n_clusters": 3},
        }
    )
    result = run(config, out=tmp_path / "run")
    adata = ad.read_h5ad(tmp_path / "run" / "cohort.h5ad")
    assert adata.obsm[K.MORPH_PCA].shape == (result.adata.n_obs, 8)
    assert adata.obsm[K.MORPH_HARMONY].shape == (result.adata.n_obs, 8)
    assert "morphology" in set(result.timings["step"])
    assert adata.uns["spatlas"]["morphology"][K.MORPH_FEATURES]["stain_norm"] == "reinhard"
