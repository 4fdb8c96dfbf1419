"""Embeddings the user brings: the expression basis and the morphology features."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import adjusted_rand_score

import spatlas
from spatlas import _keys as K
from spatlas._config import config_from_dict, load_config
from spatlas._errors import ConfigError, SpatlasInputError
from spatlas.cli import main
from spatlas.pipeline import check_config, run


def _quadrants(adata: ad.AnnData) -> np.ndarray:
    """Each sample cut into four quadrants: a partition the synthetic expression does not hold."""
    xy = adata.obsm[K.SPATIAL]
    out = np.zeros(adata.n_obs, dtype=int)
    for sample in adata.obs[K.SAMPLE].unique():
        rows = (adata.obs[K.SAMPLE] == sample).to_numpy()
        x, y = xy[rows, 0], xy[rows, 1]
        out[rows] = 2 * (x > np.median(x)) + (y > np.median(y))
    return out


@pytest.fixture(scope="module")
def cohort():
    """Two samples; ``obsm['X_fm']``: a noisy one-hot of the quadrants plus four noise columns."""
    adata = spatlas.datasets.synthetic_cohort(
        n_donors=2, n_samples_per_donor=1, n_spots=250, n_genes=100, n_domains=4, image=False
    )
    quadrant = _quadrants(adata)
    rng = np.random.default_rng(0)
    adata.obsm["X_fm"] = np.hstack(
        [
            np.eye(4)[quadrant] + rng.normal(0, 0.3, (adata.n_obs, 4)),
            rng.normal(0, 0.3, (adata.n_obs, 4)),
        ]
    ).astype(np.float32)
    adata.obs["quadrant"] = pd.Categorical(quadrant.astype(str))
    return adata


@pytest.fixture(scope="module")
def h5ad_config(cohort, tmp_path_factory):
    """The cohort as one ``.h5ad`` split by sample, its embedding also as ``emb.npy``."""
    root = tmp_path_factory.mktemp("embedding")
    spatlas.io.write_h5ad(cohort, root / "cohort.h5ad")
    np.save(root / "emb.npy", cohort.obsm["X_fm"])
    config = {
        "seed": 0,
        "data": {
            "h5ad": "cohort.h5ad",
            "sample_key": "sample",
            "donor_key": "donor",
            "label_column": "quadrant",
            "expression_embedding": "X_fm",
        },
        "preprocessing": {"n_top_genes": 80, "n_comps": 10},
        "clustering": {"n_clusters": 4},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root / "config.yaml"


# -- reading and checking --------------------------------------------------------------------


def test_missing_obsm_key_lists_the_keys_and_says_a_file_works(cohort):
    with pytest.raises(SpatlasInputError, match="X_scgpt") as err:
        spatlas.pp.read_embedding(cohort, "X_scgpt", where="data.expression_embedding")
    message = str(err.value)
    assert message.startswith("data.expression_embedding:")
    assert "X_fm" in message and "X_morph_truth" in message and ".npy" in message
    assert "\n" not in message


def test_nan_spots_are_counted_and_the_first_named(cohort):
    adata = cohort.copy()
    X = adata.obsm["X_fm"].copy()
    X[[5, 9, 9], [0, 1, 2]] = [np.nan, np.inf, np.nan]
    adata.obsm["X_bad"] = X
    with pytest.raises(SpatlasInputError, match="2 spots") as err:
        spatlas.pp.read_embedding(adata, "X_bad")
    assert adata.obs_names[5] in str(err.value)


def test_npy_with_another_row_count_is_refused(cohort, tmp_path):
    path = tmp_path / "short.npy"
    np.save(path, cohort.obsm["X_fm"][:-3])
    with pytest.raises(SpatlasInputError, match=f"{cohort.n_obs - 3} rows but the cohort has"):
        spatlas.pp.read_embedding(cohort, path)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.zeros((0,)), "shape"),
        (np.array(["a", "b"]), "not numbers"),
        ("empty", "no columns"),
    ],
)
def test_not_a_numeric_matrix_is_refused(cohort, tmp_path, value, message):
    value = np.zeros((cohort.n_obs, 0)) if isinstance(value, str) else value
    if value.ndim == 1:
        value = np.resize(value, cohort.n_obs)
    np.save(tmp_path / "emb.npy", value)
    with pytest.raises(SpatlasInputError, match=message):
        spatlas.pp.read_embedding(cohort, tmp_path / "emb.npy")


def test_table_rows_are_put_in_cohort_order_and_missing_spot_ids_named(cohort, tmp_path):
    table = pd.DataFrame(cohort.obsm["X_fm"], index=cohort.obs_names)
    table.columns = [f"dim{i}" for i in range(table.shape[1])]
    shuffled = table.sample(frac=1.0, random_state=0)
    shuffled.to_csv(tmp_path / "emb.csv", index_label="spot")
    shuffled.to_parquet(tmp_path / "emb.parquet")
    for name in ("emb.csv", "emb.parquet"):
        np.testing.assert_array_equal(
            spatlas.pp.read_embedding(cohort, tmp_path / name), cohort.obsm["X_fm"]
        )
    gone = [cohort.obs_names[3], cohort.obs_names[7]]
    shuffled.drop(index=gone).to_csv(tmp_path / "holes.tsv", sep="\t")
    with pytest.raises(SpatlasInputError, match=f"2 of {cohort.n_obs} spots have no row") as err:
        spatlas.pp.read_embedding(cohort, tmp_path / "holes.tsv")
    assert all(name in str(err.value) for name in gone)


def test_expression_embedding_is_reduced_and_recorded(cohort):
    adata = cohort.copy()
    key = spatlas.pp.use_expression_embedding(adata, "X_fm", n_comps=3, seed=0)
    assert key == K.EXPRESSION_INPUT
    X = adata.obsm[key]
    assert X.shape == (adata.n_obs, 3) and X.dtype == np.float32
    np.testing.assert_allclose(X.mean(axis=0), 0, atol=1e-4)  # centred PCs
    # the first PCs keep what separates the quadrants
    labels = adata.obs["quadrant"].to_numpy()
    centroids = np.stack([X[labels == q].mean(axis=0) for q in np.unique(labels)])
    assert np.linalg.norm(centroids - centroids.mean(axis=0), axis=1).min() > 0.5
    assert adata.uns["spatlas"]["expression_input"] == {
        "source": "X_fm",
        "dims": 8,
        "n_comps": 3,
        "key": K.EXPRESSION_INPUT,
        "seed": 0,
    }
    again = cohort.copy()
    spatlas.pp.use_expression_embedding(again, "X_fm", n_comps=3, seed=0)
    np.testing.assert_array_equal(again.obsm[key], X)


def test_config_resolves_embedding_files_but_not_obsm_keys(tmp_path):
    data = {
        "data": {"expression_embedding": "X_scgpt"},
        "morphology": {"features": "features/uni.parquet"},
    }
    config = config_from_dict(data, base=tmp_path)
    assert config.data.expression_embedding == "X_scgpt"
    assert config.morphology.features == str((tmp_path / "features/uni.parquet").resolve())
    data["data"]["expression_embedding"] = "emb.NPY"
    assert config_from_dict(data, base=tmp_path).data.expression_embedding == str(
        (tmp_path / "emb.NPY").resolve()
    )


def test_integration_reading_counts_is_refused_with_an_embedding():
    config = config_from_dict(
        {"data": {"expression_embedding": "X_fm"}, "integration": {"method": "scvi"}}
    )
    with pytest.raises(ConfigError, match="scvi reads the counts"):
        check_config(config)


def test_obsm_of_an_h5ad_survives_the_split_by_sample(cohort, h5ad_config):
    parts = spatlas.io.read_h5ad(
        h5ad_config.parent / "cohort.h5ad", sample_key="sample", donor_key="donor"
    )
    joined = spatlas.io.concat_samples(parts)
    np.testing.assert_array_equal(joined.obsm["X_fm"], cohort.obsm["X_fm"])
    np.testing.assert_array_equal(joined.obsm["X_morph_truth"], cohort.obsm["X_morph_truth"])
    # an entry one sample lacks cannot be joined and is dropped, not cut or padded
    del parts[1].obsm["X_fm"]
    assert "X_fm" not in spatlas.io.concat_samples(parts).obsm


# -- the pipeline ----------------------------------------------------------------------------


def test_run_with_an_obsm_embedding_finds_its_domains(h5ad_config, tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(h5ad_config), "--out", str(out)]) == 0
    cohort = ad.read_h5ad(out / "cohort.h5ad")
    assert cohort.uns["spatlas"]["expression_input"]["source"] == "X_fm"
    assert cohort.uns["spatlas"]["expression_input"]["dims"] == 8
    assert cohort.uns["spatlas"]["spatial_expression"]["basis"] == K.EXPRESSION_INPUT
    domains = pd.read_csv(out / "domains.csv")
    ari = adjusted_rand_score(domains["label"], domains["spatial_domain"])
    assert ari > 0.8
    # the expression alone does not hold the quadrants: the embedding made the domains
    plain = run(load_config(h5ad_config, ["data.expression_embedding=null"]))
    assert plain.metrics.set_index("sample").loc["all", "ari"] < 0.5


def test_run_with_an_npy_embedding_through_harmony(h5ad_config):
    config = load_config(
        h5ad_config, ["data.expression_embedding=emb.npy", "augmentation.enabled=false"]
    )
    assert config.data.expression_embedding == str(h5ad_config.parent / "emb.npy")
    result = run(config)
    assert result.domain_key == "harmony_domain"
    assert result.adata.obsm["X_input_harmony"].shape[1] == 8
    assert result.metrics.set_index("sample").loc["all", "ari"] > 0.8


def test_precomputed_morphology_features_need_no_image(h5ad_config):
    config = load_config(
        h5ad_config,
        [
            "data.expression_embedding=null",
            "morphology.enabled=true",
            "morphology.features=X_morph_truth",
            "morphology.n_comps=3",
        ],
    )
    result = run(config)  # the cohort has no image: extraction would fail
    adata = result.adata
    np.testing.assert_array_equal(adata.obsm[K.MORPH_FEATURES], adata.obsm["X_morph_truth"])
    meta = adata.uns["spatlas"]["morphology"]
    assert meta[K.MORPH_FEATURES]["extractor"] == "precomputed"
    assert meta[K.MORPH_FEATURES]["source"] == "X_morph_truth"
    assert meta["embedding"]["features_key"] == K.MORPH_FEATURES
    assert adata.obsm[K.MORPH_HARMONY].shape == (adata.n_obs, 3)
    config.morphology.features = "X_nothing"
    with pytest.raises(SpatlasInputError, match="X_nothing"):
        run(config)
