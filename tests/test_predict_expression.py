"""Expression predicted from the H&E image (spatlas.tl.fit_expression_predictor & co.)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import spatlas
from spatlas import _keys as K
from spatlas._errors import ConfigError, SpatlasInputError
from spatlas.tl._predict import (
    _ridge_fit,
    log_normalised,
    pearson_per_gene,
    variable_genes,
)


@pytest.fixture(scope="module")
def painted():
    """Six synthetic samples whose H&E is painted from a domain-tied morphology signal."""
    adata = spatlas.datasets.synthetic_cohort(n_spots=300, n_genes=150, seed=3)
    spatlas.pp.morphology_features(adata, extractor="handcrafted")
    rng = np.random.default_rng(0)
    adata.obsm["X_random"] = rng.normal(size=(adata.n_obs, 40)).astype(np.float32)
    return adata


def held_out(adata):
    return list(adata.obs[K.SAMPLE].cat.categories[-2:])


def test_marker_genes_are_read_from_the_painted_image_well_above_the_random_floor(painted):
    markers = painted.var_names[painted.var["domain_marker"].astype(bool)].tolist()
    held = held_out(painted)
    scores = {}
    # X_morph_truth: the signal the image was painted from, the ceiling of any image feature
    for key in (K.MORPH_FEATURES, "X_random", "X_morph_truth"):
        predictor = spatlas.tl.fit_expression_predictor(
            painted, features_key=key, genes=markers, exclude_samples=held
        )
        assert set(predictor.info["train_samples"]).isdisjoint(held)
        spatlas.tl.predict_expression(painted, predictor, samples=held)
        table = spatlas.tl.expression_correlation(painted, samples=held)
        scores[key] = table.groupby("sample")["r"].mean()
    image, floor, ceiling = scores[K.MORPH_FEATURES], scores["X_random"], scores["X_morph_truth"]
    # single-spot counts are noisy (about 1,000 UMIs): even the true signal reaches r ~ 0.2
    assert (floor.abs() < 0.05).all(), floor
    assert (image - floor > 0.1).all(), (image, floor)
    assert (image > 0.6 * ceiling).all(), (image, ceiling)


def test_rank_align_features_predict_too_and_the_predictor_round_trips(painted, tmp_path):
    held = held_out(painted)
    markers = painted.var_names[painted.var["domain_marker"].astype(bool)].tolist()
    predictor = spatlas.tl.fit_expression_predictor(
        painted,
        genes=markers,
        exclude_samples=held,
        aligner="rank_align",
        aligner_params={"steps": 150, "latent_dim": 16},
        progress=False,
    )
    # the ridge reads the image features and the 16-d aligned embedding side by side
    width = painted.obsm[K.MORPH_FEATURES].shape[1] + 16
    assert predictor.aligner is not None and predictor.coef.shape == (width, len(markers))
    spatlas.tl.predict_expression(painted, predictor, samples=held)
    table = spatlas.tl.expression_correlation(painted, samples=held)
    assert table["r"].mean() > 0.05  # the random-feature floor is about 0 (test above)
    first = np.asarray(painted.obsm[K.PREDICTED_EXPRESSION]).copy()
    predictor.save(tmp_path / "p")
    with pytest.raises(SpatlasInputError, match="not empty"):
        predictor.save(tmp_path / "p")
    loaded = spatlas.tl.ExpressionPredictor.load(tmp_path / "p")
    assert loaded.genes == predictor.genes
    spatlas.tl.predict_expression(painted, tmp_path / "p", samples=held)
    np.testing.assert_allclose(painted.obsm[K.PREDICTED_EXPRESSION], first, rtol=1e-5, atol=1e-6)
    # the image branch embeds new spots exactly as the model does its training spots
    model = predictor.aligner_model
    np.testing.assert_allclose(
        predictor.aligner(model._morph_raw), model.get_latent(), rtol=1e-5, atol=1e-6
    )


def test_spots_with_only_an_image_are_predicted_like_the_same_spots_in_the_cohort(painted):
    held = held_out(painted)
    predictor = spatlas.tl.fit_expression_predictor(painted, genes=30, exclude_samples=held)
    spatlas.tl.predict_expression(painted, predictor, samples=held)
    rows = painted.obs[K.SAMPLE].isin(held).to_numpy()
    image_only = ad.AnnData(obs=painted.obs.loc[rows, [K.SAMPLE]].copy())  # no genes at all
    image_only.obsm[K.MORPH_FEATURES] = painted.obsm[K.MORPH_FEATURES][rows]
    spatlas.tl.predict_expression(image_only, predictor)
    np.testing.assert_array_equal(
        image_only.obsm[K.PREDICTED_EXPRESSION], painted.obsm[K.PREDICTED_EXPRESSION][rows]
    )
    assert np.isnan(painted.obsm[K.PREDICTED_EXPRESSION][~rows]).all()


def test_same_seed_same_numbers(painted):
    kwargs = {"genes": 20, "exclude_samples": held_out(painted), "aligner": "rank_align"}
    kwargs.update(aligner_params={"steps": 40}, aligner_features="aligned")
    a = spatlas.tl.fit_expression_predictor(painted, progress=False, **kwargs)
    b = spatlas.tl.fit_expression_predictor(painted, progress=False, **kwargs)
    assert a.coef.shape == (64, 20)  # the aligned embedding alone (default latent 64)
    np.testing.assert_array_equal(a.coef, b.coef)
    assert a.alpha == b.alpha and a.genes == b.genes


def test_log_normalised_matches_scanpy():
    rng = np.random.default_rng(1)
    counts = sp.csr_matrix(rng.poisson(2.0, size=(60, 30)).astype(np.float32))
    adata = ad.AnnData(X=counts)
    adata.var_names = [f"g{i}" for i in range(30)]
    ref = adata.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    genes = ["g3", "g0", "g17"]
    np.testing.assert_allclose(
        log_normalised(adata, genes), ref[:, genes].X.toarray(), rtol=1e-5, atol=1e-6
    )


def test_variable_genes_rank_as_scanpy_seurat_v3_on_the_training_spots(painted):
    rows = np.flatnonzero(~painted.obs[K.SAMPLE].isin(held_out(painted)).to_numpy())
    genes = variable_genes(painted, 25, rows=rows)
    sub = painted[rows].copy()
    sub.obs[K.SAMPLE] = sub.obs[K.SAMPLE].cat.remove_unused_categories()
    ref = sc.pp.highly_variable_genes(
        sub, n_top_genes=25, flavor="seurat_v3", batch_key=K.SAMPLE, inplace=False
    )
    ref.index = sub.var_names
    assert set(genes) == set(ref.index[ref["highly_variable"]])
    # held-out spots never enter the gene choice
    other = painted.copy()
    other.X = other.X.copy()
    other.X[~np.isin(np.arange(other.n_obs), rows)] = 0
    assert variable_genes(other, 25, rows=rows) == genes


def test_pearson_per_gene():
    rng = np.random.default_rng(2)
    P, Y = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    Y[:, 2] = 1.0  # constant measured gene: undefined
    P[:, 3] = 5.0  # constant prediction of a varying gene: explains nothing
    r = pearson_per_gene(P, Y)
    assert np.isnan(r[2]) and r[3] == 0.0
    for j in (0, 1):
        assert r[j] == pytest.approx(np.corrcoef(P[:, j], Y[:, j])[0, 1])


def test_ridge_matches_sklearn():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(4)
    X, Y = rng.normal(size=(80, 6)), rng.normal(size=(80, 3))
    coef, intercept = _ridge_fit(X, Y, 3.5)
    ref = Ridge(alpha=3.5).fit(X, Y)
    np.testing.assert_allclose(coef, ref.coef_.T, atol=1e-10)
    np.testing.assert_allclose(intercept, ref.intercept_, atol=1e-10)


def test_bad_inputs_say_what_is_wrong(painted):
    with pytest.raises(SpatlasInputError, match="morphology_features"):
        spatlas.tl.fit_expression_predictor(painted, features_key="X_nothing")
    with pytest.raises(SpatlasInputError, match="unknown sample"):
        spatlas.tl.fit_expression_predictor(painted, exclude_samples=["nope"])
    with pytest.raises(SpatlasInputError, match="feature_scaling"):
        spatlas.tl.fit_expression_predictor(painted, feature_scaling="per-spot")
    with pytest.raises(SpatlasInputError, match="no setting"):
        spatlas.tl.fit_expression_predictor(
            painted, aligner="rank_align", aligner_params={"stepz": 3}
        )
    with pytest.raises(SpatlasInputError, match="set by the predictor"):
        spatlas.tl.fit_expression_predictor(
            painted, aligner="rank_align", aligner_params={"n_neighbors": 3}
        )
    predictor = spatlas.tl.fit_expression_predictor(painted, genes=5)
    narrow = ad.AnnData(obs=painted.obs[[K.SAMPLE]].copy())
    narrow.obsm[K.MORPH_FEATURES] = np.zeros((painted.n_obs, 3), dtype=np.float32)
    with pytest.raises(SpatlasInputError, match="same extractor"):
        spatlas.tl.predict_expression(narrow, predictor)
    with pytest.raises(SpatlasInputError, match="no saved expression predictor"):
        spatlas.tl.ExpressionPredictor.load(painted.uns.get("nowhere", "/nonexistent"))


def _config(tmp_path, expression, *, morphology=True):
    from spatlas._config import config_from_dict

    return config_from_dict(
        {
            "data": {
                "dataset": "synthetic",
                "dataset_params": {"n_donors": 2, "n_spots": 250, "n_genes": 150},
            },
            "preprocessing": {"n_top_genes": 150},
            "clustering": {"n_clusters": 5},
            "morphology": {"enabled": morphology},
            "expression": expression,
        },
        base=tmp_path,
    )


def test_spatlas_run_predicts_held_out_samples_and_reports_them(tmp_path):
    config = _config(tmp_path, {"predict": True, "holdout": ["d1_s1"], "genes": 40})
    out = tmp_path / "run"
    result = spatlas.pipeline.run(config, out=out)
    assert "expression" in set(result.timings["step"])
    table = pd.read_csv(out / "expression.csv")
    assert set(table["sample"]) == {"d1_s1"} and len(table) == 40
    assert table["r"].mean() > 0.1
    predictor = spatlas.tl.ExpressionPredictor.load(out / "expression_model")
    assert "d1_s1" not in predictor.info["train_samples"]
    saved = ad.read_h5ad(out / "cohort.h5ad")
    assert saved.obsm[K.PREDICTED_EXPRESSION].shape == (saved.n_obs, 40)
    page = (out / "report.html").read_text()
    section = page[page.index("id='expression'") :]
    section = section.split("<h2")[0]
    assert "Held-out samples" in section and "<img" in section


def test_bad_expression_settings_fail_before_the_run(tmp_path):
    cases = (
        ({"predict": True}, False, "morphology.enabled"),
        ({"predict": True, "aligner": "magic"}, True, "expression.aligner"),
        ({"predict": True, "alpha": "big"}, True, "expression.alpha"),
        ({"predict": True, "aligner_params": {"steps": 5}}, True, "aligner is none"),
        (
            {"predict": True, "aligner": "rank_align", "aligner_params": {"stepz": 5}},
            True,
            "no setting",
        ),
        ({"predict": True, "holdout": ["nope"]}, True, "not in the cohort"),
    )
    for expression, morphology, message in cases:
        config = _config(tmp_path, expression, morphology=morphology)
        with pytest.raises(ConfigError, match=message):
            spatlas.pipeline.run(config, out=tmp_path / "never")
        assert not (tmp_path / "never").exists()


def test_global_scaling_round_trips(painted, tmp_path):
    held = held_out(painted)
    predictor = spatlas.tl.fit_expression_predictor(
        painted, genes=10, exclude_samples=held, feature_scaling="global"
    )
    assert predictor.stats is not None
    spatlas.tl.predict_expression(painted, predictor, samples=held)
    first = np.asarray(painted.obsm[K.PREDICTED_EXPRESSION]).copy()
    predictor.save(tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["predictor.json", "predictor.npz"]
    spatlas.tl.predict_expression(painted, tmp_path / "g", samples=held)
    np.testing.assert_array_equal(painted.obsm[K.PREDICTED_EXPRESSION], first)
