"""Same seed, 1 or 2 threads: byte-identical results (with morphology and grid_ae)."""

from __future__ import annotations

import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

CONFIG = """seed: 3
data:
  dataset: synthetic
  dataset_params: {n_donors: 2, n_samples_per_donor: 1, n_spots: 300, n_genes: 150}
preprocessing: {n_top_genes: 150}
morphology: {enabled: true, extractor: handcrafted, image: hires}
model: {name: grid_ae, steps: 30, window: 3}
clustering: {n_clusters: 4}
"""

# spatlas' own setting (torch in the training loops) and the BLAS / OpenMP pools of numpy & co.
THREAD_VARIABLES = (
    "SPATLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
)


def _run(tmp_path, threads: int, text: str = CONFIG):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    out = tmp_path / f"run{threads}"
    env = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}
    proc = subprocess.run(
        [sys.executable, "-m", "spatlas.cli", "-q", "run", str(config), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_one_and_two_threads_give_identical_results(tmp_path):
    one, two = _run(tmp_path, 1), _run(tmp_path, 2)
    for name in ("domains.csv", "metrics.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    a, b = ad.read_h5ad(one / "cohort.h5ad"), ad.read_h5ad(two / "cohort.h5ad")
    assert set(a.obsm) == set(b.obsm)
    for key in ("X_spatial_pca", "X_morph_features", "X_morph_harmony", "X_grid_ae"):
        assert key in a.obsm, key
    for key in a.obsm:
        np.testing.assert_array_equal(np.asarray(a.obsm[key]), np.asarray(b.obsm[key]), key)


@pytest.mark.slow
def test_default_pipeline_with_morphology_fusion_is_thread_invariant(tmp_path):
    text = CONFIG.replace("model: {name: grid_ae, steps: 30, window: 3}\n", "")
    one, two = _run(tmp_path, 1, text), _run(tmp_path, 2, text)
    for name in ("domains.csv", "metrics.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    a, b = ad.read_h5ad(one / "cohort.h5ad"), ad.read_h5ad(two / "cohort.h5ad")
    assert "X_fused" in a.obsm and "X_grid_ae" not in a.obsm
    for key in a.obsm:
        np.testing.assert_array_equal(np.asarray(a.obsm[key]), np.asarray(b.obsm[key]), key)
