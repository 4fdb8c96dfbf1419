import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from spatlas import tl
from spatlas._errors import SpatlasInputError


@pytest.fixture(scope="module")
def blobs():
    """Four well-separated Gaussian blobs of unequal size in 5 dimensions."""
    centers = np.array([[0, 0, 0, 0, 0], [20, 0, 0, 0, 0], [0, 20, 0, 0, 0], [0, 0, 20, 0, 0]])
    X, y = make_blobs(
        n_samples=[150, 120, 90, 60], centers=centers, cluster_std=1.0, random_state=0
    )
    return X.astype(np.float32), y


def _adata(X):
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(len(X))]))
    adata.obsm["X_pca"] = X
    return adata


def test_canonical_labels_orders_by_size_then_first_occurrence():
    assert tl.canonical_labels(np.array([5, 5, 2, 2, 2, 9])).tolist() == [1, 1, 0, 0, 0, 2]
    assert tl.canonical_labels(np.array([3, 3, 1, 1])).tolist() == [0, 0, 1, 1]
    assert tl.canonical_labels(np.array(["b", "a", "a"])).tolist() == [1, 0, 0]


@pytest.mark.parametrize("fn", [tl.kmeans_labels, tl.gmm_labels])
def test_kmeans_and_gmm_recover_blobs(blobs, fn):
    X, y = blobs
    labels = fn(X, 4, seed=0)
    assert adjusted_rand_score(y, labels) == 1.0
    # canonical order: label 0 is the largest blob (150 spots), 3 the smallest (60)
    assert np.bincount(labels).tolist() == [150, 120, 90, 60]


@pytest.mark.parametrize(
    "fn", [tl.kmeans_labels, tl.gmm_labels, lambda X, k, seed: tl.leiden_labels(X, seed=seed)]
)
def test_same_seed_gives_identical_labels(fn):
    X, _ = make_blobs(n_samples=300, centers=6, cluster_std=3.0, random_state=1)
    assert np.array_equal(fn(X, 6, seed=3), fn(X, 6, seed=3))


def test_leiden_hits_requested_k(blobs, caplog):
    X, y = blobs
    caplog.set_level(logging.INFO, logger="spatlas")
    for k in (4, 6):
        labels = tl.leiden_labels(X, n_clusters=k, seed=0)
        assert labels.max() + 1 == k
        assert set(labels.tolist()) == set(range(k))
    assert adjusted_rand_score(y, tl.leiden_labels(X, n_clusters=4, seed=0)) == 1.0
    assert "resolution" in caplog.text


def test_leiden_warns_and_returns_closest_when_k_unreachable(caplog):
    # four blobs far apart with 5 neighbours each: the kNN graph has 4 components,
    # so no resolution can give 2 clusters
    X, _ = make_blobs(
        n_samples=40, centers=[[0, 0], [100, 0], [0, 100], [100, 100]], random_state=0
    )
    caplog.set_level(logging.WARNING, logger="spatlas")
    labels = tl.leiden_labels(X, n_clusters=2, n_neighbors=5, seed=0, max_iter=15)
    assert labels.max() + 1 == 4
    assert "no resolution gave exactly 2 clusters" in caplog.text


@pytest.mark.parametrize("method", ["stability", "silhouette"])
def test_choose_k_finds_four_blobs(blobs, method):
    X, _ = blobs
    best_k, scores = tl.choose_k(X, k_range=range(2, 8), method=method, seed=0, n_pairs=4)
    assert best_k == 4
    assert scores["k"].tolist() == list(range(2, 8))
    assert list(scores.columns) == ["k", "silhouette", "stability", "stability_std", "inertia"]
    row = scores.set_index("k").loc[4]
    assert row["stability"] == pytest.approx(1.0)
    assert row["silhouette"] == scores["silhouette"].max()


def test_choose_k_is_deterministic_and_subsamples(blobs):
    X, _ = blobs
    k1, s1 = tl.choose_k(X, k_range=[3, 4, 5], seed=7, n_pairs=2, n_fit=300, n_subsample=200)
    k2, s2 = tl.choose_k(X, k_range=[3, 4, 5], seed=7, n_pairs=2, n_fit=300, n_subsample=200)
    assert k1 == k2 == 4
    pd.testing.assert_frame_equal(s1, s2)


def test_cluster_writes_categorical_obs_and_params(blobs):
    X, y = blobs
    adata = _adata(X)
    assert tl.cluster(adata, n_clusters=4, seed=0) is None
    domains = adata.obs["pca_domain"]
    assert isinstance(domains.dtype, pd.CategoricalDtype)
    assert list(domains.cat.categories) == ["0", "1", "2", "3"]
    assert adjusted_rand_score(y, domains) == 1.0
    rec = adata.uns["spatlas"]["clustering"]["pca_domain"]
    assert rec["method"] == "kmeans" and rec["basis"] == "X_pca"
    assert rec["n_clusters"] == 4 and rec["seed"] == 0


def test_cluster_auto_leiden_and_h5ad_roundtrip(blobs, tmp_path):
    X, y = blobs
    adata = _adata(X)
    tl.cluster(adata, basis="pca", method="gmm", n_clusters="auto", k_range=range(2, 7))
    tl.cluster(adata, method="leiden", n_clusters=4, key_added="leiden4", n_neighbors=10)
    tl.cluster(adata, method="leiden", key_added="leiden_res", resolution=0.5)
    assert adjusted_rand_score(y, adata.obs["pca_domain"]) == 1.0
    assert adjusted_rand_score(y, adata.obs["leiden4"]) == 1.0
    uns = adata.uns["spatlas"]["clustering"]
    assert uns["pca_domain"]["n_clusters"] == 4
    assert uns["pca_domain"]["auto"]["k"].tolist() == [2, 3, 4, 5, 6]
    assert uns["leiden4"]["resolution"] > 0
    assert uns["leiden4"]["params"]["n_neighbors"] == 10
    assert uns["leiden_res"]["resolution"] == 0.5
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert back.uns["spatlas"]["clustering"]["leiden4"]["n_clusters"] == 4
    assert back.obs["leiden4"].tolist() == adata.obs["leiden4"].tolist()


def test_cluster_custom_basis_and_key(blobs):
    X, _ = blobs
    adata = _adata(X)
    adata.obsm["X_harmony"] = X
    tl.cluster(adata, basis="X_harmony", n_clusters=4)
    assert "harmony_domain" in adata.obs
    tl.cluster(adata, basis="harmony", n_clusters=4, key_added="mine")
    assert adata.obs["mine"].tolist() == adata.obs["harmony_domain"].tolist()


def test_cluster_errors(blobs):
    X, _ = blobs
    adata = _adata(X)
    with pytest.raises(SpatlasInputError, match=r"'X_umap' is not in adata.obsm.*'X_pca'"):
        tl.cluster(adata, basis="X_umap", n_clusters=3)
    with pytest.raises(SpatlasInputError, match="between 2 and the number of spots"):
        tl.cluster(adata, n_clusters=1)
    with pytest.raises(SpatlasInputError, match=r"between 2 and the number of spots \(420\)"):
        tl.cluster(adata, n_clusters=421)
    with pytest.raises(SpatlasInputError, match="needs n_clusters"):
        tl.cluster(adata, method="kmeans")
    with pytest.raises(SpatlasInputError, match="unknown clustering method"):
        tl.cluster(adata, method="dbscan", n_clusters=3)
    with pytest.raises(SpatlasInputError, match="integer or 'auto'"):
        tl.cluster(adata, n_clusters="seven")
    bad = X.copy()
    bad[[3, 8], 1] = np.nan
    adata.obsm["X_pca"] = bad
    with pytest.raises(SpatlasInputError, match="NaN or infinite values in 2 of 420 rows"):
        tl.cluster(adata, n_clusters=3)
    assert "pca_domain" not in adata.obs


def test_choose_k_rejects_bad_range(blobs):
    X, _ = blobs
    with pytest.raises(SpatlasInputError, match="k_range must lie between 2"):
        tl.choose_k(X, k_range=[1, 2, 3])
    with pytest.raises(SpatlasInputError, match="k_range is empty"):
        tl.choose_k(X, k_range=[])
