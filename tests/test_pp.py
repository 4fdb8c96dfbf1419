import numpy as np
import pytest
import scanpy as sc

import spatlas
from spatlas import _keys as K
from spatlas.datasets import dlpfc_demo
from spatlas.pp import preprocess_expression, scaled_pca


@pytest.fixture(scope="module")
def demo():
    adata = dlpfc_demo()
    # two slices, every third spot: quick but real
    keep = adata.obs[K.SAMPLE].isin(["151673", "151674"]).to_numpy()
    keep &= np.arange(adata.n_obs) % 3 == 0
    return adata[keep].copy()


def _scanpy_reference(adata, n_top_genes, max_value=None):
    ref = adata.copy()
    sc.pp.filter_genes(ref, min_cells=10)
    ref.layers["counts"] = ref.X.copy()
    if n_top_genes < ref.n_vars:
        sc.pp.highly_variable_genes(
            ref, n_top_genes=n_top_genes, flavor="seurat_v3", batch_key="sample", layer="counts"
        )
    else:
        ref.var["highly_variable"] = True
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    ref = ref[:, ref.var["highly_variable"]].copy()
    sc.pp.scale(ref, max_value=max_value)
    sc.tl.pca(ref, n_comps=20, svd_solver="arpack")
    return ref


@pytest.mark.parametrize("max_value", [None, 10.0])
def test_preprocessing_matches_the_scanpy_recipe(demo, max_value):
    adata = demo.copy()
    preprocess_expression(adata, n_top_genes=400, scale_max_value=max_value)
    ref = _scanpy_reference(demo, 400, max_value)
    assert adata.var_names[adata.var[K.HVG]].tolist() == ref.var_names.tolist()
    ours, theirs = adata.obsm[K.PCA], ref.obsm["X_pca"]
    assert ours.shape == (demo.n_obs, 20) and ours.dtype == np.float32
    for i in range(20):  # same components up to sign
        assert abs(np.corrcoef(ours[:, i], theirs[:, i])[0, 1]) > 0.999
    np.testing.assert_allclose(
        adata.uns["pca"]["variance_ratio"], ref.uns["pca"]["variance_ratio"], rtol=1e-3
    )


def test_preprocessing_keeps_counts_filters_genes_and_normalises(demo):
    adata = demo.copy()
    detected = np.asarray((demo.X > 0).sum(axis=0)).ravel()
    preprocess_expression(adata, n_top_genes=300, min_spots=10)
    assert adata.n_vars == int((detected >= 10).sum())
    assert int(adata.var[K.HVG].sum()) == 300
    kept = demo[:, adata.var_names]
    np.testing.assert_array_equal(adata.layers[K.COUNTS].toarray(), kept.X.toarray())
    totals = np.expm1(adata.X.toarray()).sum(axis=1)
    np.testing.assert_allclose(totals, 1e4, rtol=1e-3)
    assert adata.uns[K.UNS]["preprocessing"]["n_comps"] == 20


def test_preprocessing_is_deterministic(demo):
    a, b = demo.copy(), demo.copy()
    preprocess_expression(a, n_top_genes=300, seed=3)
    preprocess_expression(b, n_top_genes=300, seed=3)
    np.testing.assert_array_equal(a.obsm[K.PCA], b.obsm[K.PCA])


def test_scaled_pca_sparse_and_dense_agree():
    rng = np.random.default_rng(0)
    X = rng.poisson(rng.gamma(1.0, 1.0, size=(300, 60))).astype(np.float64)
    sparse = scaled_pca(__import__("scipy.sparse").sparse.csr_matrix(X), n_comps=5)
    dense_ref = (X - X.mean(0)) / X.std(0, ddof=1)
    u, s, vt = np.linalg.svd(dense_ref, full_matrices=False)
    np.testing.assert_allclose(
        np.abs(sparse.scores), np.abs(u[:, :5] * s[:5]), rtol=1e-4, atol=1e-4
    )


def test_preprocessing_rejects_normalised_input(demo):
    adata = demo.copy()
    adata.X = adata.X * 0.33
    with pytest.raises(spatlas.SpatlasInputError, match="raw counts"):
        preprocess_expression(adata)


def test_preprocessing_rejects_unknown_batch_key(demo):
    with pytest.raises(spatlas.SpatlasInputError, match="batch_key 'slide'"):
        preprocess_expression(demo.copy(), batch_key="slide")
