import subprocess
import sys

import harmonypy
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from spatlas import _keys as K
from spatlas.datasets import synthetic_cohort
from spatlas.datasets._synthetic import MORPH_FEATURES, MORPH_TRUTH_KEY

SMALL = {"n_donors": 2, "n_samples_per_donor": 2, "n_spots": 500, "n_genes": 300, "n_domains": 4}


@pytest.fixture(scope="module")
def cohort():
    return synthetic_cohort(**SMALL, seed=1)


def _samples(adata):
    return list(adata.obs[K.SAMPLE].cat.categories)


def _patch_means(adata, sample, half=5):
    """Mean RGB of a (2 half + 1)^2 hires patch centred on each spot of ``sample``."""
    info = adata.uns[K.SPATIAL][sample]
    img = info[K.IMAGES]["hires"].astype(np.float64)
    mask = (adata.obs[K.SAMPLE] == sample).to_numpy()
    xy = np.round(adata.obsm[K.SPATIAL][mask] * info[K.SCALEFACTORS][K.HIRES_SCALEF]).astype(int)
    means = np.stack(
        [
            img[y - half : y + half + 1, x - half : x + half + 1].reshape(-1, 3).mean(0)
            for x, y in xy
        ]
    )
    return means, mask


def _naive_pcs(X) -> np.ndarray:
    """normalize_total 1e4, log1p, scale, PCA 20 (numpy; same maths as scanpy)."""
    X = X.toarray().astype(np.float64)
    X = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1.0) * 1e4)
    X = (X - X.mean(0)) / np.maximum(X.std(0), 1e-12)
    u, s, _ = np.linalg.svd(X, full_matrices=False)
    return u[:, :20] * s[:20]


def test_layout_keys_and_dtypes(cohort):
    a = cohort
    assert sp.isspmatrix_csr(a.X) or isinstance(a.X, sp.csr_array)
    assert a.X.dtype == np.float32
    assert a.n_vars == 300
    assert list(a.var_names[:2]) == ["gene_0000", "gene_0001"]
    assert a.obs_names.is_unique
    expected = (a.obs[K.BARCODE].astype(str) + "-" + a.obs[K.SAMPLE].astype(str)).to_numpy()
    assert np.array_equal(a.obs_names.to_numpy(), expected)
    assert a.obs[K.BARCODE].str.fullmatch(r"[ACGT]{16}-1").all()
    assert _samples(a) == ["d0_s0", "d0_s1", "d1_s0", "d1_s1"]
    assert list(a.obs[K.DONOR].cat.categories) == ["d0", "d1"]
    assert (a.obs[K.DONOR].astype(str) == a.obs[K.SAMPLE].astype(str).str[:2]).all()
    assert list(a.obs[K.LABEL].cat.categories) == [f"domain_{k}" for k in range(4)]
    assert (a.obs[K.IN_TISSUE] == 1).all()
    assert pd.api.types.is_integer_dtype(a.obs[K.ARRAY_ROW])
    assert pd.api.types.is_integer_dtype(a.obs[K.ARRAY_COL])
    sizes = a.obs[K.SAMPLE].value_counts()
    assert sizes.between(0.89 * 500, 1.11 * 500).all()
    assert sizes.nunique() > 1  # samples are not identical copies
    assert a.obsm[K.SPATIAL].dtype == np.float64 and a.obsm[K.SPATIAL].shape == (a.n_obs, 2)
    truth = a.obsm[MORPH_TRUTH_KEY]
    assert truth.dtype == np.float32 and truth.shape == (a.n_obs, len(MORPH_FEATURES))
    assert truth.min() >= 0 and truth.max() <= 1
    assert set(a.uns[K.SPATIAL]) == set(_samples(a))
    for info in a.uns[K.SPATIAL].values():
        img = info[K.IMAGES]["hires"]
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.nbytes < 2_000_000  # ~500 spots: a modest image
        sf = info[K.SCALEFACTORS]
        assert sf[K.SPOT_DIAMETER] == 24.0
        assert 0 < sf[K.LOWRES_SCALEF] < sf[K.HIRES_SCALEF] < 1
        assert 10 <= sf[K.SPOT_DIAMETER] * sf[K.HIRES_SCALEF] <= 16  # a spot is ~12 image px
        assert info[K.METADATA] == {"source": "synthetic", K.FULLRES_PATH: ""}


def test_counts_are_nonnegative_integers_with_varying_depth(cohort):
    data = cohort.X.data
    assert data.size > 0 and (data >= 0).all()
    assert np.array_equal(data, np.round(data))
    depth = (
        pd.Series(np.asarray(cohort.X.sum(1)).ravel())
        .groupby(cohort.obs[K.SAMPLE].to_numpy())
        .median()
    )
    assert depth.min() > 100
    assert depth.max() / depth.min() > 1.1  # library-size shifts between samples


def test_hex_lattice_and_visium_geometry(cohort):
    a = cohort
    rows = a.obs[K.ARRAY_ROW].to_numpy()
    cols = a.obs[K.ARRAY_COL].to_numpy()
    assert ((rows + cols) % 2 == 0).all()
    assert rows.min() >= 0 and cols.min() >= 0
    diameter = 24.0
    c2c = 100.0 / 55.0 * diameter
    for sample in _samples(a):
        m = (a.obs[K.SAMPLE] == sample).to_numpy()
        r, c, xy = rows[m], cols[m], a.obsm[K.SPATIAL][m]
        pos = {(int(i), int(j)): k for k, (i, j) in enumerate(zip(r, c, strict=True))}
        n_pairs = 0
        for (i, j), k in pos.items():
            for di, dj in ((0, 2), (1, 1), (1, -1)):
                other = pos.get((i + di, j + dj))
                if other is not None:
                    assert np.linalg.norm(xy[k] - xy[other]) == pytest.approx(c2c, rel=1e-6)
                    n_pairs += 1
        assert n_pairs > 2.5 * m.sum()  # a compact patch: most spots have all six neighbours
        # x exactly linear in array_col, y in array_row, with Visium hex spacing
        for index, axis, step in ((c, 0, c2c / 2), (r, 1, c2c * np.sqrt(3) / 2)):
            slope, intercept = np.polyfit(index, xy[:, axis], 1)
            assert slope == pytest.approx(step)
            assert np.allclose(xy[:, axis], slope * index + intercept)
        info = a.uns[K.SPATIAL][sample]
        h, w = info[K.IMAGES]["hires"].shape[:2]
        px = xy * info[K.SCALEFACTORS][K.HIRES_SCALEF]
        assert px.min() > 10 and (px[:, 0] < w - 10).all() and (px[:, 1] < h - 10).all()


def test_domains_are_spatially_coherent(cohort):
    a = cohort
    same, total = 0, 0
    for sample in _samples(a):
        obs = a.obs[a.obs[K.SAMPLE] == sample]
        label = dict(
            zip(
                zip(obs[K.ARRAY_ROW], obs[K.ARRAY_COL], strict=True),
                obs[K.LABEL].cat.codes,
                strict=True,
            )
        )
        for (i, j), lab in label.items():
            for di, dj in ((0, 2), (1, 1), (1, -1)):
                other = label.get((i + di, j + dj))
                if other is not None:
                    same += other == lab
                    total += 1
    assert same / total > 0.85


def test_same_seed_is_identical_and_other_seed_differs(cohort):
    again = synthetic_cohort(**SMALL, seed=1)
    assert (cohort.X != again.X).nnz == 0
    assert np.array_equal(cohort.obs[K.LABEL], again.obs[K.LABEL])
    assert np.array_equal(cohort.obsm[K.SPATIAL], again.obsm[K.SPATIAL])
    assert np.array_equal(cohort.obsm[MORPH_TRUTH_KEY], again.obsm[MORPH_TRUTH_KEY])
    for sample in _samples(cohort):
        assert np.array_equal(
            cohort.uns[K.SPATIAL][sample][K.IMAGES]["hires"],
            again.uns[K.SPATIAL][sample][K.IMAGES]["hires"],
        )
    # the image does not consume the expression stream
    no_image = synthetic_cohort(**SMALL, seed=1, image=False)
    assert (cohort.X != no_image.X).nnz == 0
    assert no_image.uns[K.SPATIAL]["d0_s0"][K.IMAGES] == {}
    # a sample does not depend on how many others are generated
    alone = synthetic_cohort(**{**SMALL, "n_donors": 1}, seed=1, image=False)
    first = (cohort.obs[K.DONOR] == "d0").to_numpy()
    assert (cohort.X[first] != alone.X).nnz == 0

    other = synthetic_cohort(**SMALL, seed=2)
    assert other.n_obs != cohort.n_obs or (other.X != cohort.X).nnz > 0
    img1 = cohort.uns[K.SPATIAL]["d0_s0"][K.IMAGES]["hires"]
    img2 = other.uns[K.SPATIAL]["d0_s0"][K.IMAGES]["hires"]
    assert img1.shape != img2.shape or not np.array_equal(img1, img2)


def test_marker_genes_are_up_in_their_domain(cohort):
    a = cohort
    X = a.X.toarray()
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    codes = a.obs[K.LABEL].cat.codes.to_numpy()
    for k in range(4):
        markers = (a.var["domain_marker"] == f"domain_{k}").to_numpy()
        assert markers.sum() == 20
        inside = X[codes == k][:, markers].mean()
        outside = X[codes != k][:, markers].mean()
        assert inside > outside + 0.3


def test_batch_effects_dominate_naive_clustering_and_harmony_recovers_domains():
    gains, vs_sample = [], []
    for seed in range(6):
        a = synthetic_cohort(**SMALL, seed=seed, image=False)
        pcs = _naive_pcs(a.X)
        kmeans = KMeans(4, n_init=10, random_state=0)
        naive = kmeans.fit_predict(pcs)
        z = np.asarray(
            harmonypy.run_harmony(pcs, a.obs, K.SAMPLE, random_state=0, verbose=False).Z_corr
        )
        corrected = kmeans.fit_predict(z if z.shape[0] == a.n_obs else z.T)
        label, sample = a.obs[K.LABEL].to_numpy(), a.obs[K.SAMPLE].to_numpy()

        def per_sample(clusters, label=label, sample=sample):
            return np.mean(
                [
                    adjusted_rand_score(label[sample == s], clusters[sample == s])
                    for s in np.unique(sample)
                ]
            )

        gains.append(per_sample(corrected) - per_sample(naive))
        vs_sample.append(adjusted_rand_score(sample, naive))
    assert min(vs_sample) > 0.3  # naive clusters follow the samples
    assert min(gains) > 0.1  # Harmony always helps ...
    assert np.mean(gains) > 0.3  # ... by a wide margin on average


def test_image_colour_follows_domain_and_morphology(cohort):
    a = cohort
    for sample in _samples(a):
        means, mask = _patch_means(a, sample)
        codes = a.obs[K.LABEL].cat.codes.to_numpy()[mask]
        by_domain = np.stack([means[codes == k].mean(0) for k in np.unique(codes)])
        gaps = np.linalg.norm(by_domain[:, None] - by_domain[None], axis=-1)
        assert gaps.max() > 15  # RGB units
        truth = a.obsm[MORPH_TRUTH_KEY][mask]
        # haematoxylin absorbs red: more nuclei / haematoxylin -> darker red channel
        assert np.corrcoef(means[:, 0], truth[:, 1])[0, 1] < -0.4
        assert np.corrcoef(means[:, 0], truth[:, 0])[0, 1] < -0.25
        # off tissue is bright background
        img = a.uns[K.SPATIAL][sample][K.IMAGES]["hires"]
        assert img[:3].mean() > 200


def _domain_colours(adata):
    out = {}
    for sample in _samples(adata):
        means, mask = _patch_means(adata, sample)
        codes = adata.obs[K.LABEL].cat.codes.to_numpy()[mask]
        out[sample] = np.stack([means[codes == k].mean(0) for k in range(4)])
    return out


def test_stain_shift_differs_between_slides(cohort):
    flat = synthetic_cohort(**SMALL, seed=1, stain_shift=0.0)
    backgrounds = {
        name: np.stack(
            [
                adata.uns[K.SPATIAL][s][K.IMAGES]["hires"][:3].reshape(-1, 3).mean(0)
                for s in _samples(adata)
            ]
        )
        for name, adata in (("shifted", cohort), ("flat", flat))
    }
    assert np.ptp(backgrounds["flat"], axis=0).max() < 1.5
    assert np.ptp(backgrounds["shifted"], axis=0).max() > 5

    def between_slides(adata):
        colours = _domain_colours(adata)
        names = list(colours)
        return np.mean(
            [
                np.linalg.norm(colours[s] - colours[t], axis=1).mean()
                for i, s in enumerate(names)
                for t in names[i + 1 :]
            ]
        )

    assert between_slides(cohort) > 2 * between_slides(flat)


@pytest.mark.parametrize("layout", ["layers", "blobs", "mixed"])
def test_layouts_plant_all_domains_or_miss_exactly_one(layout):
    kwargs = {**SMALL, "n_donors": 1, "image": False, "layout": layout}
    full = synthetic_cohort(**kwargs, missing_domain_prob=0.0)
    for _, labels in full.obs.groupby(K.SAMPLE, observed=True)[K.LABEL]:
        assert labels.nunique() == 4
        assert labels.value_counts().min() > 0.03 * labels.size
    missing = synthetic_cohort(**kwargs, missing_domain_prob=1.0)
    for _, labels in missing.obs.groupby(K.SAMPLE, observed=True)[K.LABEL]:
        assert labels.nunique() == 3


def test_domain_proportions_differ_between_samples(cohort):
    props = pd.crosstab(cohort.obs[K.SAMPLE], cohort.obs[K.LABEL], normalize="index")
    assert (props.max() - props.min()).max() > 0.03


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_domains": 1},
        {"layout": "rings"},
        {"n_spots": 10},
        {"seed": -1},
        {"n_genes": 50, "n_domains": 5},
        {"dropout": 1.5},
        {"donor_effect": -0.1},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        synthetic_cohort(**kwargs)


def test_importing_datasets_does_not_import_torch():
    code = "import sys, spatlas.datasets; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cohort_survives_an_h5ad_round_trip(cohort, tmp_path):
    import anndata as ad

    cohort.write_h5ad(tmp_path / "cohort.h5ad")
    back = ad.read_h5ad(tmp_path / "cohort.h5ad")
    assert (back.X != cohort.X).nnz == 0
    assert np.array_equal(
        back.uns[K.SPATIAL]["d1_s1"][K.IMAGES]["hires"],
        cohort.uns[K.SPATIAL]["d1_s1"][K.IMAGES]["hires"],
    )
    assert (
        back.uns[K.SPATIAL]["d1_s1"][K.SCALEFACTORS]
        == cohort.uns[K.SPATIAL]["d1_s1"][K.SCALEFACTORS]
    )
