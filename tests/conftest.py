"""Fixtures shared by several test modules."""

import pytest

import spatlas

N_DOMAINS = 4


@pytest.fixture(scope="module")
def model_cohort():
    """Two small synthetic samples (two donors): Harmony PCs and a morphology embedding."""
    adata = spatlas.datasets.synthetic_cohort(
        n_donors=2,
        n_samples_per_donor=1,
        n_spots=500,
        n_genes=200,
        n_domains=N_DOMAINS,
        image=False,
        seed=0,
    )
    spatlas.pp.preprocess_expression(adata, n_top_genes=150, n_comps=10, seed=0)
    spatlas.pp.integrate(adata, method="harmony", seed=0)
    adata.obsm["X_morph"] = adata.obsm["X_morph_truth"]
    return adata
