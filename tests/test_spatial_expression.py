"""Neighbourhood-augmented expression (``spatlas.pp.spatial_expression``) and its defaults."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

import spatlas
from spatlas import pipeline
from spatlas._config import config_from_dict, config_to_dict
from spatlas._errors import ConfigError, SpatlasInputError
from spatlas.pp import augment_expression, neighbourhood_weights, normalise_counts


def _grid(n: int = 12, offset: float = 0.0) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(n, dtype=float), np.arange(n, dtype=float))
    return np.column_stack([xs.ravel() + offset, ys.ravel()])


def test_weights_stay_within_samples_and_sum_to_one():
    coords = np.vstack([_grid(), _grid()])  # two samples at the same coordinates
    groups = np.repeat(["a", "b"], coords.shape[0] // 2)
    W, Wcos, Wsin = neighbourhood_weights(coords, groups, k=8)
    np.testing.assert_allclose(np.asarray(W.sum(axis=1)).ravel(), 1.0, rtol=1e-6)
    half = coords.shape[0] // 2
    for M in (W, Wcos, Wsin):
        M = sp.csr_matrix(M)
        assert M[:half, half:].nnz == 0 and M[half:, :half].nnz == 0
    # an interior spot's 12 nearest (the AGF's 2k at k = 6: distances 1, sqrt 2, 2) surround it
    # symmetrically: the direction weights cancel
    _, Wcos, Wsin = neighbourhood_weights(coords, groups, k=6)
    interior = 6 * 12 + 6
    assert abs(Wcos[interior].sum()) < 1e-6 and abs(Wsin[interior].sum()) < 1e-6


def test_gradient_block_sees_a_ramp_not_a_constant():
    coords = _grid(16)
    ramp = coords[:, :1] * 2.0  # expression rising along x
    noise = np.random.default_rng(0).normal(size=(coords.shape[0], 1))
    X = np.hstack([ramp, noise, np.ones_like(ramp)])
    M = augment_expression(X, coords, lam=0.5, k_geom=8)
    assert M.shape == (X.shape[0], 9)
    own, mean, grad = M[:, :3], M[:, 3:6], M[:, 6:]
    # the constant gene is 0 everywhere in every block
    assert np.allclose(own[:, 2], 0) and np.allclose(mean[:, 2], 0) and np.allclose(grad[:, 2], 0)
    # the neighbour mean of the ramp is the ramp (up to the borders); of noise it is not noise
    assert np.corrcoef(mean[:, 0], own[:, 0])[0, 1] > 0.99
    assert abs(np.corrcoef(mean[:, 1], own[:, 1])[0, 1]) < 0.5
    # block weights: sqrt(1 - λ), sqrt(2λ/3), sqrt(λ/3) of unit-variance blocks
    np.testing.assert_allclose(own[:, 0].std(), np.sqrt(0.5), rtol=1e-4)
    np.testing.assert_allclose(mean[:, 0].std(), np.sqrt(1 / 3), rtol=1e-4)


def test_lambda_zero_is_the_z_scored_expression_within_samples():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 5)) + np.repeat([[0.0], [10.0]], 20, axis=0)
    groups = np.repeat(["a", "b"], 20)
    M = augment_expression(X, _grid(7)[:40], groups, lam=0.0, scale_groups=groups)
    for g in ("a", "b"):
        np.testing.assert_allclose(M[groups == g].mean(axis=0), 0, atol=1e-5)
        np.testing.assert_allclose(M[groups == g].std(axis=0), 1, rtol=1e-4)
    with pytest.raises(SpatlasInputError, match="lambda"):
        augment_expression(X, _grid(7)[:40], lam=1.5)


def test_normalisations():
    counts = sp.csr_matrix(np.array([[1, 0, 3], [2, 2, 0], [0, 5, 5]], dtype=np.float32))
    totals = np.array([4.0, 4.0, 10.0])
    log = normalise_counts(counts, method="log")
    expected = np.log1p(counts.toarray() / (totals / totals.mean())[:, None])
    np.testing.assert_allclose(log, expected, rtol=1e-6)
    rel = normalise_counts(counts, method="relative", target_sum=100)
    np.testing.assert_allclose(rel.sum(axis=1), 100, rtol=1e-6)
    # Pearson residuals of Poisson counts at one rate: mean ~0, variance ~1
    rng = np.random.default_rng(0)
    poisson = rng.poisson(5.0, size=(2000, 200))  # many genes: the depth barely conditions
    res = normalise_counts(poisson, method="pearson", theta=1e9)
    np.testing.assert_allclose(res.mean(axis=0), 0, atol=0.05)
    np.testing.assert_allclose(res.var(axis=0), 1, atol=0.1)
    with pytest.raises(SpatlasInputError, match="normalisation"):
        normalise_counts(counts, method="vst")


@pytest.fixture(scope="module")
def cohort():
    adata = spatlas.datasets.synthetic_cohort(
        n_donors=2, n_samples_per_donor=1, n_spots=400, n_genes=150, n_domains=4, image=False
    )
    spatlas.pp.preprocess_expression(adata, n_top_genes=100, n_comps=10, seed=0)
    return adata


def test_spatial_expression_is_deterministic_and_finds_the_domains(cohort):
    a, b = cohort.copy(), cohort.copy()
    spatlas.pp.spatial_expression(a, lam=0.2, n_comps=10, seed=3)
    spatlas.pp.spatial_expression(b, lam=0.2, n_comps=10, seed=3)
    np.testing.assert_array_equal(a.obsm["X_spatial_pca"], b.obsm["X_spatial_pca"])
    assert a.obsm["X_spatial_pca"].shape == (a.n_obs, 10)
    assert a.uns["spatlas"]["spatial_expression"]["lambda"] == 0.2
    labels = spatlas.tl._cluster.kmeans_labels(a.obsm["X_spatial_pca"], 4, seed=0)
    truth = a.obs["label"].astype(str).to_numpy()
    plain = spatlas.tl._cluster.kmeans_labels(a.obsm["X_pca"], 4, seed=0)
    # the neighbourhood helps on a cohort whose domains are spatially contiguous
    assert adjusted_rand_score(truth, labels) > adjusted_rand_score(truth, plain)


def test_spatial_expression_needs_preprocessed_counts(cohort):
    bare = cohort.copy()
    del bare.layers["counts"]
    with pytest.raises(SpatlasInputError, match="preprocess_expression"):
        spatlas.pp.spatial_expression(bare)
    with pytest.raises(SpatlasInputError, match="scale_by"):
        spatlas.pp.spatial_expression(cohort.copy(), scale_by="nope")


def test_default_pipeline_resolves_auto_settings():
    config = config_from_dict({})
    assert pipeline.augmented(config)
    assert pipeline.expression_basis(config) == "X_spatial_pca"
    assert pipeline.integration_method(config) == "none"
    assert pipeline.refine_labels(config) is False
    paper = config_from_dict({"augmentation": {"enabled": False}})
    assert pipeline.expression_basis(paper) == "X_pca"
    assert pipeline.integration_method(paper) == "harmony"
    assert pipeline.refine_labels(paper) is True
    explicit = config_from_dict(
        {"integration": {"method": "scanorama"}, "clustering": {"refine": True}}
    )
    assert pipeline.integration_method(explicit) == "scanorama"
    assert pipeline.refine_labels(explicit) is True


def test_morphology_weight_follows_what_the_image_sees():
    rng = np.random.default_rng(0)
    n = 600
    groups = np.repeat(["a", "b"], n // 2)
    labels = np.tile(np.repeat([0, 1, 2], n // 6), 2)
    expression = np.eye(3)[labels] * 3 + rng.normal(size=(n, 3))
    seeing = np.eye(3)[labels] * 2 + rng.normal(size=(n, 3))  # the image shows the domains
    blind = rng.normal(size=(n, 3))  # the image shows nothing of them
    r2_seeing = spatlas.tl.explained_share(seeing, labels, groups)
    r2_blind = spatlas.tl.explained_share(blind, labels, groups)
    assert r2_seeing > 0.4 and r2_blind < 0.02
    adata = anndata.AnnData(obs=pd.DataFrame({"sample": groups}, index=[str(i) for i in range(n)]))
    adata.obsm["E"], adata.obsm["M"] = expression, seeing
    w = spatlas.tl.fuse_morphology(
        adata, expression_key="E", morphology_key="M", labels=labels, key_added="F"
    )
    assert w == pytest.approx(r2_seeing / 2, rel=1e-6)
    assert adata.obsm["F"].shape == (n, 6)
    adata.obsm["M"] = blind
    assert (
        spatlas.tl.fuse_morphology(adata, expression_key="E", morphology_key="M", labels=labels)
        < 0.01
    )
    # weight 0: the expression embedding itself
    np.testing.assert_array_equal(
        spatlas.tl.fuse_embeddings(expression, blind, 0.0), expression.astype(np.float32)
    )
    adata.obsm["M"] = blind.copy()
    adata.obsm["M"][0, 0] = np.nan
    with pytest.raises(SpatlasInputError, match="NaN"):
        spatlas.tl.fuse_morphology(adata, expression_key="E", morphology_key="M", weight=0.5)
    with pytest.raises(SpatlasInputError, match="needs expression-only labels"):
        adata.obsm["M"] = blind
        spatlas.tl.fuse_morphology(adata, expression_key="E", morphology_key="M")


def test_pipeline_fuses_morphology_only_as_far_as_it_helps(tmp_path):
    config = config_from_dict(
        {
            "data": {"dataset": "synthetic", "dataset_params": {"n_spots": 300, "n_genes": 120}},
            "preprocessing": {"n_top_genes": 100, "n_comps": 10},
            "clustering": {"n_clusters": 4},
            "morphology": {"enabled": True},
        }
    )
    result = pipeline.run(config)
    fusion = result.adata.uns["spatlas"]["fusion"]
    assert fusion["weight"] == pytest.approx(fusion["r2"] / 2)
    assert "fuse" in set(result.timings["step"])
    assert result.domain_key == "spatial_domain"
    off = pipeline.run(
        config_from_dict(
            {**config_to_dict(config), "clustering": {"n_clusters": 4, "morphology_weight": 0}}
        )
    )
    assert "fusion" not in off.adata.uns["spatlas"]
    with pytest.raises(ConfigError, match="morphology_weight"):
        pipeline.run(
            config_from_dict(
                {**config_to_dict(config), "clustering": {"morphology_weight": "much"}}
            )
        )


def test_streamed_pca_matches_the_dense_one(cohort):
    dense, streamed = cohort.copy(), cohort.copy()
    for normalisation in ("log", "pearson"):
        spatlas.pp.spatial_expression(dense, lam=0.2, n_comps=6, normalisation=normalisation)
        spatlas.pp.spatial_expression(
            streamed, lam=0.2, n_comps=6, normalisation=normalisation, max_dense_gb=0
        )
        a, b = dense.obsm["X_spatial_pca"], streamed.obsm["X_spatial_pca"]
        for j in range(3):  # the leading components, well separated
            assert np.corrcoef(a[:, j], b[:, j])[0, 1] > 0.999
        np.testing.assert_allclose(np.abs(a[:, 0]), np.abs(b[:, 0]), rtol=1e-3, atol=1e-3)
