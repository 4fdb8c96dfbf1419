import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatlas
from spatlas import _keys as K
from spatlas.metrics import ilisi
from spatlas.pp import integrate, list_integrations
from spatlas.tl import kmeans_labels


def _shifted_batches(n_per=150, seed=0):
    """Three cell types x two batches; batch 1 is shifted along every axis."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, size=(3, 10))
    X, types, batches = [], [], []
    for b, shift in enumerate([0.0, 2.0]):
        for t in range(3):
            X.append(centres[t] + shift + rng.normal(0, 1, size=(n_per, 10)))
            types += [t] * n_per
            batches += [f"s{b}"] * n_per
    adata = ad.AnnData(
        X=sp.csr_matrix((len(types), 1), dtype=np.float32),
        obs=pd.DataFrame(
            {K.SAMPLE: pd.Categorical(batches), "type": types},
            index=[f"c{i}" for i in range(len(types))],
        ),
    )
    adata.obsm[K.PCA] = np.vstack(X).astype(np.float32)
    return adata


def test_registry_lists_the_paper_methods():
    assert {"harmony", "scanorama", "scvi", "none"} <= set(list_integrations())
    assert spatlas.pp.get_integration("harmony").grid["theta"] == [0, 0.5, 1, 2, 4, 6, 8]


@pytest.mark.parametrize("method", ["harmony", "scanorama"])
def test_integration_mixes_batches_and_keeps_cell_types(method):
    adata = _shifted_batches()
    before = ilisi(adata.obsm[K.PCA], adata.obs[K.SAMPLE].to_numpy())
    key = integrate(adata, method=method)
    assert key == f"X_pca_{method}"
    Z = adata.obsm[key]
    assert Z.shape == adata.obsm[K.PCA].shape and Z.dtype == np.float32
    after = ilisi(Z, adata.obs[K.SAMPLE].to_numpy())
    assert before < 0.05
    assert after > before + 0.2
    labels = kmeans_labels(Z, 3, seed=0)
    assert spatlas.metrics.ari(adata.obs["type"], labels) > 0.9
    assert adata.uns[K.UNS]["integration"][key]["method"] == method


@pytest.mark.parametrize("method", ["harmony", "scanorama", "none"])
def test_integration_is_deterministic(method):
    a, b = _shifted_batches(), _shifted_batches()
    integrate(a, method=method, seed=1)
    integrate(b, method=method, seed=1)
    key = f"X_pca_{method}"
    np.testing.assert_array_equal(a.obsm[key], b.obsm[key])


def test_harmony_theta_zero_corrects_less_than_theta_four():
    weak, strong = _shifted_batches(), _shifted_batches()
    integrate(weak, method="harmony", theta=0)
    integrate(strong, method="harmony", theta=4)
    batch = weak.obs[K.SAMPLE].to_numpy()
    assert ilisi(strong.obsm["X_pca_harmony"], batch) >= ilisi(weak.obsm["X_pca_harmony"], batch)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "combat"}, "unknown integration method 'combat'"),
        ({"method": "harmony", "sigma_typo": 1}, "no parameter"),
        ({"method": "harmony", "basis": "X_umap"}, "basis 'X_umap' is not in obsm"),
        ({"method": "harmony", "batch_key": "slide"}, "batch_key 'slide'"),
    ],
)
def test_integration_errors_are_clear(kwargs, message):
    with pytest.raises(spatlas.SpatlasInputError, match=message):
        integrate(_shifted_batches(), **kwargs)


def test_scvi_latent_from_counts_is_deterministic():
    pytest.importorskip("scvi")
    rng = np.random.default_rng(0)
    n, g = 240, 60
    rates = rng.gamma(2.0, 1.0, size=(3, g))
    types = np.repeat(np.arange(3), n // 3)
    batch = np.tile(["a", "b"], n // 2)
    scale = np.where(batch == "b", 3.0, 1.0)[:, None]
    counts = rng.poisson(rates[types] * scale).astype(np.float32)
    obs = pd.DataFrame({K.SAMPLE: batch}, index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs)
    adata.layers[K.COUNTS] = adata.X.copy()
    adata.var[K.HVG] = True
    first = integrate(adata.copy(), method="scvi", max_epochs=3, n_latent=5, seed=2)
    a, b = adata.copy(), adata.copy()
    integrate(a, method="scvi", max_epochs=3, n_latent=5, seed=2)
    integrate(b, method="scvi", max_epochs=3, n_latent=5, seed=2)
    assert first == "X_scvi"
    assert a.obsm["X_scvi"].shape == (n, 5)
    np.testing.assert_array_equal(a.obsm["X_scvi"], b.obsm["X_scvi"])
